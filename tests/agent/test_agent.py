"""The agent on real training loops: closed forms, bit-identity, replay fidelity, failure isolation."""

from __future__ import annotations

import copy
import logging
import sqlite3
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

import moxco.agent
from moxco.collector import open_store


@pytest.fixture
def url(tmp_path):
    return f"sqlite:///{tmp_path / 'runs.db'}"


class Quadratic(nn.Module):
    """A model whose forward returns ½xᵀAx + bᵀx (the batch is ignored): every metric has a closed form."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, x0: torch.Tensor) -> None:
        super().__init__()
        self.a, self.b = a, b
        self.head = nn.Parameter(x0[:3].clone())
        self.tail = nn.Parameter(x0[3:].clone().reshape(2, 2))

    def forward(self, batch):
        x = torch.cat([self.head, self.tail.reshape(-1)])
        return 0.5 * x @ self.a @ x + self.b @ x + 0.0 * batch.sum()


def make_quadratic(seed=0):
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(7, 7, generator=gen, dtype=torch.float64)
    a = m @ m.T / 7 + 0.2 * torch.eye(7, dtype=torch.float64)
    b = torch.randn(7, generator=gen, dtype=torch.float64)
    x0 = torch.randn(7, generator=gen, dtype=torch.float64)
    return a, b, x0


def test_every_metric_equals_its_closed_form_on_a_quadratic(url):
    a, b, x0 = make_quadratic()
    model = Quadratic(a, b, x0).double()
    lr, steps = 0.1, 40
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    agent = moxco.agent.attach(model, opt, url=url, run="quad", reeval_every=1, probe_every=1, sharpness_iters=3,
                               goodness={"tau": 1.0, "sharpness_target": 100.0})
    f = lambda x: float(0.5 * x @ a @ x + b @ x)
    grad = lambda x: a @ x + b
    xs = [x0.clone()]
    for _ in range(steps):
        loss = model(torch.zeros(4, 1, dtype=torch.float64))
        loss.backward()
        opt.step()
        opt.zero_grad()
        xs.append(torch.cat([model.head.detach(), model.tail.detach().reshape(-1)]).clone())
    agent.close()
    assert agent.errors == {}

    store = open_store(url)
    series = {m: store.series("quad", m) for m in store.metrics("quad")}
    for t in range(steps):
        x, g = xs[t], grad(xs[t])
        assert series["loss"][1][t] == pytest.approx(f(x), rel=1e-12)
        assert series["grad_norm_sq"][1][t] == pytest.approx(float(g @ g), rel=1e-12)
        assert series["distance"][1][t] == pytest.approx(float((x - x0).norm()), rel=1e-9, abs=1e-15)
        assert series["update_norm"][1][t] == pytest.approx(float((xs[t + 1] - x).norm()), rel=1e-9)
    for t in range(1, steps):
        x, x_prev, g = xs[t], xs[t - 1], grad(xs[t])
        d = x - x_prev
        i = t - 1  # re-evaluation metrics start at step 1
        assert series["update_corr"][0][i] == t
        assert series["update_corr"][1][i] == pytest.approx(float(g @ d), rel=1e-9)
        assert series["update_corr_rs"][1][i] == pytest.approx(float(g @ d), rel=1e-9)
        assert series["loss_diff"][1][i] == pytest.approx(f(x) - f(x_prev), rel=1e-9, abs=1e-14)
        assert series["inst_gap"][1][i] == pytest.approx(float(-0.5 * d @ a @ d), rel=1e-6, abs=1e-14)
        assert series["inst_smooth"][1][i] == pytest.approx(float((a @ d).norm() / d.norm()), rel=1e-9)
    gaps = series["inst_gap"][1]
    np.testing.assert_allclose(series["avg_gap"][1], np.cumsum(gaps) / np.arange(1, len(gaps) + 1), rtol=1e-12)
    assert series["max_smooth"][1][-1] == pytest.approx(series["inst_smooth"][1].max())
    lam_max = float(torch.linalg.eigvalsh(a).max())
    assert series["sharpness"][1][-1] == pytest.approx(lam_max, rel=1e-6)


def test_users_gradients_and_parameters_are_bit_identical_with_and_without_the_agent(url):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 2))
    data = [(torch.randn(16, 6), torch.randint(0, 2, (16,))) for _ in range(12)]

    def train(with_agent: bool):
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        criterion = nn.CrossEntropyLoss()
        agent = moxco.agent.attach(model, opt, url=url, run=f"bits-{with_agent}", reeval_every=1, probe_every=3,
                                   criterion=criterion) if with_agent else None
        torch.manual_seed(123)
        trace = []
        for x, y in data:
            loss = criterion(model(x), y)
            loss.backward()
            trace.append([p.grad.clone() for p in model.parameters()])
            opt.step()
            opt.zero_grad()
            trace.append([p.detach().clone() for p in model.parameters()] + [b.clone() for b in model.buffers()])
        trace.append([torch.rand(3)])  # the user's RNG stream is where it would have been
        if agent is not None:
            agent.close()
            assert agent.errors == {}
        return trace

    plain, watched = train(False), train(True)
    for a_list, b_list in zip(plain, watched):
        for a, b in zip(a_list, b_list):
            assert torch.equal(a, b)


def test_replay_reproduces_dropout_masks_and_leaves_batchnorm_statistics_alone(url):
    """With x_{t−1} = x_t (lr = 0) the replayed loss equals the user's loss exactly: same dropout
    masks, and BatchNorm running statistics are not updated by the replay."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    agent = moxco.agent.attach(model, opt, url=url, run="replay", reeval_every=1, probe_every=0)
    for _ in range(6):
        x, y = torch.randn(32, 5), torch.randn(32, 1)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        stats = model[1].running_mean.clone(), int(model[1].num_batches_tracked)
        opt.step()
        assert torch.equal(model[1].running_mean, stats[0]) and int(model[1].num_batches_tracked) == stats[1]
        opt.zero_grad()
    agent.close()
    # the loss here is MSE computed outside the model, so the agent needs the criterion: it disabled
    # only what it could not compute and said why
    assert set(agent.errors) == {"loss"} and "criterion" in agent.errors["loss"]


def test_dropout_replay_with_criterion_gives_zero_loss_diff_at_zero_step(url):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    criterion = nn.MSELoss()
    agent = moxco.agent.attach(model, opt, url=url, run="zero-step", reeval_every=1, probe_every=0, criterion=criterion)
    for _ in range(5):
        x, y = torch.randn(32, 5), torch.randn(32, 1)
        criterion(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    agent.close()
    assert agent.errors == {}
    store = open_store(url)
    np.testing.assert_array_equal(store.series("zero-step", "loss_diff")[1], 0.0)
    np.testing.assert_array_equal(store.series("zero-step", "inst_gap")[1], 0.0)


def test_gradient_accumulation_counts_optimizer_steps(url):
    a, b, x0 = make_quadratic(1)
    model = Quadratic(a, b, x0).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    agent = moxco.agent.attach(model, opt, url=url, run="accum", reeval_every=1, probe_every=0)
    for _ in range(5):
        for _ in range(4):  # 4 micro-batches, loss divided by 4 as usual
            (model(torch.zeros(2, 1, dtype=torch.float64)) / 4).backward()
        opt.step()
        opt.zero_grad()
    agent.close()
    store = open_store(url)
    steps, losses = store.series("accum", "loss")
    assert steps.tolist() == [0, 1, 2, 3, 4]
    steps, gaps = store.series("accum", "inst_gap")
    assert steps.tolist() == [1, 2, 3, 4] and np.all(gaps <= 1e-12)


def test_random_scaling_applies_exponential_scales_and_corr_rs_is_unscaled(url):
    a, b, x0 = make_quadratic(2)
    model = Quadratic(a, b, x0).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    agent = moxco.agent.attach(model, opt, url=url, run="rs", reeval_every=1, probe_every=0, random_scaling=True, seed=7)
    grad = lambda x: a @ x + b
    xs = [x0.clone()]
    for _ in range(200):
        model(torch.zeros(1, 1, dtype=torch.float64)).backward()
        opt.step()
        opt.zero_grad()
        xs.append(torch.cat([model.head.detach(), model.tail.detach().reshape(-1)]).clone())
    agent.close()
    store = open_store(url)
    corr, corr_rs = store.series("rs", "update_corr")[1], store.series("rs", "update_corr_rs")[1]
    scales = []
    for t in range(1, 200):
        proposed = -0.05 * grad(xs[t - 1])  # Δ_{t−1} of SGD
        actual = xs[t] - xs[t - 1]
        s = float(actual @ proposed / (proposed @ proposed))
        scales.append(s)
        np.testing.assert_allclose(actual.numpy(), (s * proposed).numpy(), rtol=1e-9, atol=1e-15)
        assert corr_rs[t - 1] == pytest.approx(float(grad(xs[t]) @ proposed), rel=1e-8)
        assert corr[t - 1] == pytest.approx(s * corr_rs[t - 1], rel=1e-8)
    scales = np.array(scales)
    assert np.all(scales > 0) and abs(scales.mean() - 1.0) < 0.2 and scales.std() > 0.5  # Exp(1)


def test_cumulative_update_corr_rs_tracks_cumulative_loss_diff_under_random_scaling(url):
    """Audit eq. 12: with s_t ~ Exp(1), ⟨∇F(x_{t+1}), Δ_t⟩ is unbiased for F(x_{t+1}) − F(x_t)."""
    torch.manual_seed(3)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(256, 4, generator=gen, dtype=torch.float64)
    y = torch.sin(x @ torch.tensor([1.0, -2.0, 0.5, 1.5], dtype=torch.float64)).unsqueeze(1)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    criterion = nn.MSELoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    agent = moxco.agent.attach(model, opt, url=url, run="rs-progress", reeval_every=1, probe_every=0,
                               random_scaling=True, seed=11, criterion=criterion)
    for _ in range(400):
        criterion(model(x), y).backward()  # full batch: f = F
        opt.step()
        opt.zero_grad()
    agent.close()
    store = open_store(url)
    corr_rs = store.series("rs-progress", "update_corr_rs")[1]
    loss_diff = store.series("rs-progress", "loss_diff")[1]
    total_progress = loss_diff.sum()
    assert total_progress < 0
    assert corr_rs.sum() == pytest.approx(total_progress, rel=0.25)


def test_injected_failures_never_reach_the_training_loop(url, caplog, monkeypatch):
    a, b, x0 = make_quadratic(3)
    model = Quadratic(a, b, x0).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    agent = moxco.agent.attach(model, opt, url=url, run="faults", reeval_every=1, probe_every=2)

    def boom(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(agent.capture, "replay", boom)
    monkeypatch.setattr(agent.probe, "sharpness", boom)
    monkeypatch.setattr(agent.writer.loss_denoiser, "update", boom)
    with caplog.at_level(logging.WARNING, logger="moxco.agent"):
        for _ in range(10):
            model(torch.zeros(1, 1, dtype=torch.float64)).backward()
            opt.step()
            opt.zero_grad()
        agent.close()
    assert set(agent.errors) == {"reeval", "sharpness", "goodness"}  # goodness: the writer thread's ALIGATOR
    assert all("injected" in message for message in agent.errors.values())
    assert sum("disabled" in r.message for r in caplog.records) == 3  # logged once per failure
    store = open_store(url)
    assert store.run("faults").config["errors"] == agent.errors  # stored with the run
    assert store.series("faults", "loss")[0].size >= 1  # the free metrics still flowed


def test_the_training_thread_never_writes_the_store_and_nothing_is_lost_while_it_is_locked(url, monkeypatch):
    """Another process holds the SQLite file's write lock while a metric fails: the step does not
    wait on the store (a write from the training thread would block for the busy timeout and then
    lose the error), and the error reaches the run once the lock is gone."""
    a, b, x0 = make_quadratic(6)
    model = Quadratic(a, b, x0).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    agent = moxco.agent.attach(model, opt, url=url, run="locked", reeval_every=1, probe_every=0)
    from_training_thread = []
    put_run = agent.store.put_run

    def recording_put_run(*args, **kwargs):
        from_training_thread.append(threading.current_thread() is threading.main_thread())
        return put_run(*args, **kwargs)

    def boom(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(agent.store, "put_run", recording_put_run)
    monkeypatch.setattr(agent.capture, "replay", boom)
    holder = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        for _ in range(5):
            model(torch.zeros(1, 1, dtype=torch.float64)).backward()
            opt.step()
            opt.zero_grad()
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    agent.close()
    assert set(agent.errors) == {"reeval"}
    assert from_training_thread and not any(from_training_thread)  # only ever the writer thread
    store = open_store(url)
    assert store.run("locked").config["errors"] == agent.errors
    assert store.series("locked", "loss")[0].size == 5  # and no point lost either


def test_a_failing_end_of_backward_record_never_leaves_backward(url, monkeypatch):
    """The gradient norms are recorded in an autograd callback, inside the user's ``backward()``:
    a failure there is kept and reported at the step (the metrics that need the raw gradient are
    dropped), never raised from ``backward()``; the run's parameters are those of the same loop
    without the agent."""
    a, b, x0 = make_quadratic(9)
    plain, watched = Quadratic(a, b, x0).double(), Quadratic(a, b, x0).double()
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (plain, watched)]
    agent = moxco.agent.attach(watched, opts[1], url=url, run="record-fails", reeval_every=1, probe_every=0)

    def boom():
        raise RuntimeError("injected in the autograd callback")

    monkeypatch.setattr(agent.raw_gradient, "_record", boom)
    for _ in range(4):
        for model, opt in zip((plain, watched), opts):
            model(torch.zeros(1, 1, dtype=torch.float64)).backward()  # must not raise
            opt.step()
            opt.zero_grad()
    agent.close()
    assert set(agent.errors) == {"gradient"} and "injected in the autograd callback" in agent.errors["gradient"]
    assert all(torch.equal(p, q) for p, q in zip(plain.parameters(), watched.parameters()))
    assert agent.overhead()["free"] > 0  # the callbacks' time is counted with the free metrics


def test_a_long_error_is_stored_as_its_first_line(url, caplog, monkeypatch):
    """PyTorch's dispatcher errors list every backend (kilobytes): the run keeps the type and the
    first line, at most ERROR_SUMMARY_CHARS characters; the log has the whole message once."""
    from moxco.agent.failures import ERROR_SUMMARY_CHARS

    a, b, x0 = make_quadratic(2)
    model = Quadratic(a, b, x0).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    agent = moxco.agent.attach(model, opt, url=url, run="long-error", reeval_every=1, probe_every=1)
    first = "Could not run 'aten::view' with arguments from the 'SparseCPU' backend."
    detail = "\n".join(f"Backend{i}: registered at somewhere.cpp:{i} [kernel]" for i in range(200))

    def dispatcher_error(*args, **kwargs):
        raise NotImplementedError(f"{first}\n\n{detail}")

    def long_line(*args, **kwargs):
        raise RuntimeError("x" * 5000)

    monkeypatch.setattr(agent.capture, "replay", dispatcher_error)
    monkeypatch.setattr(agent.probe, "sharpness", long_line)
    with caplog.at_level(logging.WARNING, logger="moxco.agent"):
        model(torch.zeros(1, 1, dtype=torch.float64)).backward()
        opt.step()
        opt.zero_grad()
        model(torch.zeros(1, 1, dtype=torch.float64)).backward()
        opt.step()
        agent.close()
    assert agent.errors["reeval"] == f"NotImplementedError: {first}"
    assert len(agent.errors["sharpness"]) == ERROR_SUMMARY_CHARS and agent.errors["sharpness"].endswith("…")
    assert open_store(url).run("long-error").config["errors"] == agent.errors
    assert "Backend199" in caplog.text  # the log keeps the whole message


def test_a_training_loop_runs_on_when_the_store_breaks(url, monkeypatch):
    a, b, x0 = make_quadratic(4)
    model = Quadratic(a, b, x0).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    agent = moxco.agent.attach(model, opt, url=url, run="store-down", reeval_every=1, probe_every=0)

    def unavailable(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(agent.store, "ingest", unavailable)
    monkeypatch.setattr(agent.store, "set_status", unavailable)
    for _ in range(5):
        model(torch.zeros(1, 1, dtype=torch.float64)).backward()
        opt.step()
        opt.zero_grad()
    agent.close()
    assert "store" in agent.errors and "disk full" in agent.errors["store"]


def test_attach_validates_its_options(url):
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="reeval_every"):
        moxco.agent.attach(model, opt, url=url, reeval_every=-1)
    other = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="not the model's"):
        moxco.agent.attach(model, other, url=url)
    with pytest.raises(ValueError, match="reference is missing"):
        moxco.agent.attach(model, opt, url=url, reference={"weight": torch.zeros(1, 2)})


def test_reference_point_metrics_and_convexity_ratio_on_a_quadratic(url):
    a, b, x0 = make_quadratic(5)
    x_star = -torch.linalg.solve(a, b)
    model = Quadratic(a, b, x0).double()
    reference = {"head": x_star[:3].clone(), "tail": x_star[3:].reshape(2, 2).clone()}
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    agent = moxco.agent.attach(model, opt, url=url, run="ref", reeval_every=1, probe_every=5, reference=reference)
    xs = [x0.clone()]
    for _ in range(20):
        model(torch.zeros(1, 1, dtype=torch.float64)).backward()
        opt.step()
        opt.zero_grad()
        xs.append(torch.cat([model.head.detach(), model.tail.detach().reshape(-1)]).clone())
    agent.close()
    store = open_store(url)
    steps, gaps = store.series("ref", "inst_gap_ref")
    for step, gap in zip(steps, gaps):
        d = xs[step] - x_star
        assert gap == pytest.approx(float(-0.5 * d @ a @ d), rel=1e-9)
    # ⟨∇F(x), x − x*⟩ = 2(F(x) − F(x*)) on a quadratic around its minimiser: the ratio is exactly 2
    assert store.series("ref", "convexity_ratio")[1][-1] == pytest.approx(2.0, rel=1e-9)


def test_runs_are_named_and_closed_with_status(url):
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with moxco.agent.attach(model, opt, url=url, criterion=nn.MSELoss()) as agent:
        nn.MSELoss()(model(torch.randn(4, 3)), torch.randn(4, 1)).backward()
        opt.step()
    store = open_store(url)
    (listed,) = store.list_runs()[1]
    run = store.run(listed.name)
    assert run.name == agent.run and run.status == "finished" and run.config["optimizer"] == "SGD"
    assert len(run.name.split("-")) == 4


def test_manual_pre_step_measures_a_closure_loop_like_a_plain_loop(tmp_path):
    """optimizer.step(closure) runs forward and backward inside step(): the pre-hook would come too
    early, so attach(manual_pre_step=True) + before_optimizer_step() after backward gives the same
    series as the plain loop."""
    def run(closure_loop: bool) -> dict:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        criterion = torch.nn.MSELoss()
        x, y = torch.randn(32, 3), torch.randn(32, 1)
        url = f"sqlite:///{tmp_path / f'closure{closure_loop}.db'}"
        agent = moxco.agent.attach(model, opt, url=url, run="r", reeval_every=1, probe_every=0,
                                   criterion=criterion, manual_pre_step=closure_loop)
        for _ in range(6):
            if closure_loop:
                def closure():
                    opt.zero_grad()
                    loss = criterion(model(x), y)
                    loss.backward()
                    agent.before_optimizer_step()
                    return loss
                opt.step(closure)
            else:
                opt.zero_grad()
                criterion(model(x), y).backward()
                opt.step()
        agent.close()
        assert agent.errors == {}
        store = open_store(url)
        return {m: store.series("r", m) for m in ("loss", "grad_norm_sq", "update_corr", "inst_gap", "update_norm")}

    plain, closure = run(False), run(True)
    for metric, (steps, values) in plain.items():
        assert steps.size > 0
        np.testing.assert_array_equal(closure[metric][0], steps, err_msg=metric)
        np.testing.assert_allclose(closure[metric][1], values, rtol=1e-12, err_msg=metric)


def test_overhead_accounts_the_training_threads_time_per_metric_group(url, monkeypatch):
    """agent.overhead(): seconds spent in each group on the training thread. A replay slowed by a
    known sleep shows up under `reeval` (and only there); groups that never ran are absent."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    criterion = nn.MSELoss()
    agent = moxco.agent.attach(model, opt, url=url, criterion=criterion, reeval_every=2, probe_every=0)
    replay = agent.capture.replay
    delay, steps, replays = 0.02, 8, []

    def slow_replay(*args, **kwargs):
        replays.append(1)
        time.sleep(delay)
        return replay(*args, **kwargs)

    monkeypatch.setattr(agent.capture, "replay", slow_replay)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    for _ in range(steps):
        criterion(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    spent = agent.overhead()
    agent.close()
    assert len(replays) == 3  # steps 2, 4, 6: every second step once x_{t-1} exists
    assert spent["reeval"] >= len(replays) * delay
    assert 0 < spent["free"] < delay * steps  # the free metrics of a 49-parameter model take far less
    assert "probe" not in spent and "reference" not in spent
    assert agent.overhead()["free"] >= spent["free"]  # close() adds the last update norm to `free`


class _Output:
    def __init__(self, loss, logits):
        self.loss, self.logits = loss, logits


class _LanguageModelLike(nn.Module):
    """Returns an object with ``.loss`` and ``.logits``, like Hugging Face models."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 64)

    def forward(self, x):
        logits = self.proj(x)
        return _Output(logits.sum() * 1e-3, logits)  # sum's backward keeps no reference to the logits


def test_the_agent_does_not_keep_the_models_output_alive(url):
    """A language model's output holds its logits (batch × sequence × vocabulary): the user's loop
    frees them once the loss is formed, and the agent must not keep them until the step ends."""
    import weakref

    torch.manual_seed(0)
    model = _LanguageModelLike()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    agent = moxco.agent.attach(model, opt, url=url, reeval_every=1, probe_every=0)
    for _ in range(3):
        out = model(torch.randn(8, 4))
        loss, logits = out.loss, weakref.ref(out.logits)
        del out
        loss.backward()
        assert logits() is None  # freed before the step: nothing of the agent's holds the output
        opt.step()
        opt.zero_grad()
    assert not agent.errors and agent.writer is not None
    agent.close()
    (steps, values) = open_store(url).series(agent.run, "loss_diff")
    assert steps.size == 2 and np.isfinite(values).all()  # the replays still ran on the captured batch

    # with a criterion, the output is needed until the criterion has run, and not after
    model, criterion = nn.Linear(4, 64), nn.MSELoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with moxco.agent.attach(model, opt, url=url, criterion=criterion, reeval_every=1, probe_every=0) as agent:
        for _ in range(2):
            out = model(torch.randn(8, 4))
            logits = weakref.ref(out)
            loss = criterion(out, torch.zeros(8, 64))
            del out
            loss.backward()  # MSE's backward held the output until here
            assert logits() is None
            opt.step()
            opt.zero_grad()
    assert not agent.errors


class _CommittingSGD(torch.optim.SGD):
    """An optimizer with ``commit(...)``, as the decision protocol applies decisions through."""

    def commit(self, **kwargs):
        self.committed = kwargs


def test_a_decision_applied_before_a_probe_step_records_its_phase_once(url):
    """The decision applied at the boundary before step 5 records phase 2 at step 5, and the probe
    of step 5 does not send the same point again (the fault test saw ('phase', 260) sent twice);
    a later probe still records the phase, and the store holds one point per step."""
    from moxco.decision import Decision

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = _CommittingSGD(model.parameters(), lr=0.05)
    criterion = nn.MSELoss()
    agent = moxco.agent.attach(model, opt, url=url, criterion=criterion, reeval_every=0, probe_every=5)
    submitted = []
    submit = agent._submit
    agent._submit = lambda record: (submitted.append(record), submit(record))[1]
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    for step in range(11):
        if step == 4:  # queued before step 4 runs: applied at its end, the boundary before step 5
            decision = Decision(step=4, action={"phase": 2, "alpha": 0.1}, source="operator")
            stored, _ = open_store(url).add_decision(agent.run, decision)
            agent._receive_decision(stored.id, stored)
        criterion(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    agent.close()
    phase_points = [(r.step, r.values["phase"]) for r in submitted if "phase" in r.values]
    assert phase_points == [(0, 1), (5, 2), (10, 2)]
    assert opt.committed == {"alpha": 0.1}
    steps, values = open_store(url).series(agent.run, "phase")
    assert steps.tolist() == [0, 5, 10] and values.tolist() == [1.0, 2.0, 2.0]


@pytest.mark.parametrize("where", ["before", "after"])
def test_reevaluation_stays_exact_when_the_free_metrics_fail(url, monkeypatch, where):
    """The free metrics advance the agent's copy of x_{t−1} to x_t in place, after the replay. When
    they fail (at step 3, before or after overwriting that copy), that step keeps loss_diff alone,
    and from the next step the re-evaluation takes its products from x_{t−1} itself. Every value
    stored is the closed form, and training never notices."""
    from moxco import tensors

    a, b, x0 = make_quadratic(4)
    model = Quadratic(a, b, x0).double()
    lr, steps, fail_at = 0.1, 8, 3
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    agent = moxco.agent.attach(model, opt, url=url, run="free-fails", reeval_every=1, probe_every=0)
    real = tensors.step_sums

    def failing(*args, **kwargs):
        if agent.step == fail_at:
            if where == "after":
                real(*args, **kwargs)  # x_{t−1} is now x_t
            raise RuntimeError("injected")
        return real(*args, **kwargs)

    monkeypatch.setattr(tensors, "step_sums", failing)
    f = lambda x: float(0.5 * x @ a @ x + b @ x)
    xs = [x0.clone()]
    for _ in range(steps):
        model(torch.zeros(1, 1, dtype=torch.float64)).backward()
        opt.step()
        opt.zero_grad()
        xs.append(torch.cat([model.head.detach(), model.tail.detach().reshape(-1)]).clone())
    agent.close()
    assert set(agent.errors) == {"free"} and "injected" in agent.errors["free"]
    for t in range(1, steps):  # SGD on the quadratic: the agent changed nothing
        assert torch.allclose(xs[t], xs[t - 1] - lr * (a @ xs[t - 1] + b), rtol=0, atol=1e-12)
    store = open_store(url)
    series = {m: store.series("free-fails", m) for m in ("loss_diff", "inst_gap", "inst_smooth", "update_corr")}
    assert list(series["loss_diff"][0]) == list(range(1, steps))
    gap_steps = [t for t in range(1, steps) if t != fail_at]
    assert list(series["inst_gap"][0]) == gap_steps and list(series["inst_smooth"][0]) == gap_steps
    assert list(series["update_corr"][0]) == list(range(1, fail_at))  # free metrics off from step 3
    for t, loss_diff in zip(series["loss_diff"][0], series["loss_diff"][1]):
        assert loss_diff == pytest.approx(f(xs[t]) - f(xs[t - 1]), rel=1e-9, abs=1e-14)
    for t, gap, smooth in zip(series["inst_gap"][0], series["inst_gap"][1], series["inst_smooth"][1]):
        d = xs[t] - xs[t - 1]
        assert gap == pytest.approx(float(-0.5 * d @ a @ d), rel=1e-6, abs=1e-14)
        assert smooth == pytest.approx(float((a @ d).norm() / d.norm()), rel=1e-9)


class TiedLanguageModel(nn.Module):
    """Embedding and output layer sharing one weight (as GPT-2's ``lm_head`` and ``wte``)."""

    def __init__(self, vocab: int = 11, width: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):  # logits of every position, (batch · length, vocab)
        return self.head(torch.tanh(self.mix(self.embed(ids)))).reshape(-1, self.head.out_features)


def test_replays_substitute_every_alias_of_a_tied_weight(url):
    """The replay at x_{t−1} must substitute the tied weight under both of its names: loss_diff,
    inst_gap and inst_smooth equal a recomputation on a copy of the model loaded with x_{t−1}
    (float64, the gradient of the shared weight summing both uses)."""
    torch.manual_seed(5)
    model = TiedLanguageModel().double()
    criterion = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    agent = moxco.agent.attach(model, opt, url=url, run="tied", reeval_every=1, probe_every=0, criterion=criterion)
    batches = [torch.randint(0, 11, (8, 5)) for _ in range(5)]
    states = []
    for ids in batches:
        states.append(copy.deepcopy(model.state_dict()))
        criterion(model(ids[:, :-1]), ids[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
    agent.close()
    assert agent.errors == {}

    def loss_and_grad(state, ids):
        twin = TiedLanguageModel().double()
        twin.load_state_dict(state)
        loss = criterion(twin(ids[:, :-1]), ids[:, 1:].reshape(-1))
        grads = torch.autograd.grad(loss, list(twin.parameters()))  # the shared weight once
        flat = lambda ts: torch.cat([t.reshape(-1) for t in ts])
        return float(loss), flat(grads), flat([p.detach() for p in twin.parameters()])

    store = open_store(url)
    series = {m: dict(zip(*store.series("tied", m))) for m in ("loss_diff", "inst_gap", "inst_smooth")}
    assert sorted(series["inst_smooth"]) == list(range(1, len(batches)))
    for t in range(1, len(batches)):
        f_t, g_t, x_t = loss_and_grad(states[t], batches[t])
        f_prev, g_prev, x_prev = loss_and_grad(states[t - 1], batches[t])
        assert series["loss_diff"][t] == pytest.approx(f_t - f_prev, rel=1e-9)
        assert series["inst_gap"][t] == pytest.approx(f_t - f_prev - float(g_t @ (x_t - x_prev)), rel=1e-9)
        assert series["inst_smooth"][t] == pytest.approx(float((g_t - g_prev).norm() / (x_t - x_prev).norm()),
                                                         rel=1e-9)


def test_an_acknowledgement_the_store_refuses_for_good_does_not_hold_the_others(url):
    """The writer applies decision acknowledgements in order and retries while the store is away;
    one the store refuses for good (its decision's row is gone) is reported once and dropped, and
    the acknowledgements behind it are stored."""
    from moxco.decision import Decision

    a, b, x0 = make_quadratic(7)
    model = Quadratic(a, b, x0).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    agent = moxco.agent.attach(model, opt, url=url, run="acks", reeval_every=0, probe_every=0)
    kept = open_store(url).add_decision("acks", Decision(step=1, action={"lr": 0.01}, source="operator"))[0].id
    agent.writer.acknowledge("acks:operator:999", 2)  # no such decision
    agent.writer.acknowledge(kept, 3)
    for _ in range(3):
        model(torch.zeros(1, 1, dtype=torch.float64)).backward()
        opt.step()
        opt.zero_grad()
    agent.close()
    assert "acks:operator:999" in agent.errors["store"]
    (decision,) = open_store(url).decisions("acks")
    assert decision.id == kept and decision.applied_step == 3


class ScaledLinear(nn.Module):
    """A linear map times a buffer the user may replace between steps."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 1)
        self.register_buffer("scale", torch.tensor(1.0))

    def forward(self, x):
        return self.linear(x) * self.scale


def test_replays_follow_a_buffer_the_user_replaces(url):
    """The replay finds where the module keeps its tensors once, and again when one was replaced:
    with lr = 0 the replay at x_{t−1} reproduces the user's loss exactly (loss_diff = 0) before and
    after the user assigns a new tensor to a buffer, and the user's buffer is never written."""
    torch.manual_seed(8)
    model = ScaledLinear()
    criterion = nn.MSELoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    agent = moxco.agent.attach(model, opt, url=url, run="buffer", reeval_every=1, probe_every=0, criterion=criterion)
    for step in range(6):
        if step == 3:
            model.scale = torch.tensor(3.0)  # a new tensor in the module's _buffers
        x, y = torch.randn(8, 4), torch.randn(8, 1)
        criterion(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    agent.close()
    assert agent.errors == {} and float(model.scale) == 3.0
    steps, diffs = open_store(url).series("buffer", "loss_diff")
    assert list(steps) == [1, 2, 3, 4, 5]
    np.testing.assert_array_equal(diffs, 0.0)
