"""The agent under gradient clipping, AMP (GradScaler, bf16 autocast) and torch.compile."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import moxco.agent
from moxco.agent.groups.free import TIMING
from moxco.collector import open_store

from tests.agent.test_agent import Quadratic, make_quadratic


@pytest.fixture
def url(tmp_path):
    return f"sqlite:///{tmp_path / 'runs.db'}"


def flat_params(model):
    return torch.cat([model.head.detach(), model.tail.detach().reshape(-1)]).clone()


def test_clip_grad_norm_metrics_use_the_raw_gradient_and_the_update_is_what_the_optimizer_did(url):
    a, b, x0 = make_quadratic(6)
    model = Quadratic(a, b, x0 * 10).double()  # far from the minimum: clipping is active
    lr, max_norm = 0.05, 0.5
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    x_star = -torch.linalg.solve(a, b)
    reference = {"head": x_star[:3].clone(), "tail": x_star[3:].reshape(2, 2).clone()}
    agent = moxco.agent.attach(model, opt, url=url, run="clip", reeval_every=1, probe_every=0, reference=reference)
    grad = lambda x: a @ x + b
    f = lambda x: float(0.5 * x @ a @ x + b @ x)
    xs = [flat_params(model)]
    for _ in range(15):
        model(torch.zeros(1, dtype=torch.float64)).backward()
        total = nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        assert total > max_norm
        opt.step()
        opt.zero_grad()
        xs.append(flat_params(model))
    agent.close()
    assert agent.errors == {}
    store = open_store(url)
    grad_sq = store.series("clip", "grad_norm_sq")[1]
    updates = store.series("clip", "update_norm")[1]
    gaps = store.series("clip", "inst_gap")[1]
    for t in range(15):
        g = grad(xs[t])
        assert grad_sq[t] == pytest.approx(float(g @ g), rel=1e-9)  # raw, not clipped
        assert updates[t] == pytest.approx(lr * max_norm, rel=1e-6)  # Δ_t: what the optimizer did
    for t in range(1, 15):
        d = xs[t] - xs[t - 1]
        assert gaps[t - 1] == pytest.approx(float(-0.5 * d @ a @ d), rel=1e-6)
    # every metric of g_t, the raw gradient (never formed: the sums over .grad are rescaled)
    series = lambda name: dict(zip(*store.series("clip", name)))
    corr, smooth = series("update_corr"), series("inst_smooth")
    gap_ref, smooth_ref = series("inst_gap_ref"), series("inst_smooth_ref")
    assert sorted(corr) == sorted(smooth) == list(range(1, 15)) and sorted(gap_ref) == list(range(15))
    for t in range(15):
        g, e = grad(xs[t]), xs[t] - x_star
        if t:
            d = xs[t] - xs[t - 1]
            assert corr[t] == pytest.approx(float(g @ d), rel=1e-9)
            assert smooth[t] == pytest.approx(float((a @ d).norm() / d.norm()), rel=1e-9)
        assert gap_ref[t] == pytest.approx(f(xs[t]) - f(x_star) - float(g @ e), rel=1e-9, abs=1e-9)
        assert smooth_ref[t] == pytest.approx(float((a @ e).norm() / e.norm()), rel=1e-9)


def test_clipping_that_starts_mid_run_costs_one_steps_gradient_metrics(url, caplog):
    """While ``.grad`` is never changed after backward, the end-of-backward record reads no norms
    (``‖g_t‖²`` comes from the free metrics' pass); the first clipped step after that cannot undo
    the clipping and stores no gradient metric (said once in the log); from the next step on the
    norms are recorded again and every gradient metric is the raw gradient's closed form."""
    a, b, x0 = make_quadratic(9)
    model = Quadratic(a, b, x0 * 10).double()  # far from the minimum: clipping is active
    lr, max_norm, start = 0.05, 0.5, 4
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    agent = moxco.agent.attach(model, opt, url=url, run="late", reeval_every=1, probe_every=0)
    grad = lambda x: a @ x + b
    xs, recorded = [flat_params(model)], []
    for t in range(10):
        model(torch.zeros(1, dtype=torch.float64)).backward()
        recorded.append(agent.raw_gradient.has_norms())
        if t >= start:
            assert nn.utils.clip_grad_norm_(model.parameters(), max_norm) > max_norm
        opt.step()
        opt.zero_grad()
        xs.append(flat_params(model))
    agent.close()
    assert agent.errors == {}
    assert recorded == [True] + [False] * start + [True] * (9 - start)
    store = open_store(url)
    series = lambda name: dict(zip(*store.series("late", name)))
    grad_sq, corr, smooth = series("grad_norm_sq"), series("update_corr"), series("inst_smooth")
    assert sorted(grad_sq) == [t for t in range(10) if t != start]
    assert sorted(corr) == sorted(smooth) == [t for t in range(1, 10) if t != start]
    assert sorted(series("loss")) == list(range(10))  # the step itself is recorded
    for t in grad_sq:
        g = grad(xs[t])
        assert grad_sq[t] == pytest.approx(float(g @ g), rel=1e-9)  # raw, not clipped
        if t:
            d = xs[t] - xs[t - 1]
            assert corr[t] == pytest.approx(float(g @ d), rel=1e-9)
            assert smooth[t] == pytest.approx(float((a @ d).norm() / d.norm()), rel=1e-9)
    said = [r.message for r in caplog.records if "began changing .grad" in r.message]
    assert len(said) == 1 and f"step {start}" in said[0]


def test_grad_scaler_scale_is_removed_from_g_t(url):
    a, b, x0 = make_quadratic(7)
    model = Quadratic(a, b, x0).float()
    model.a, model.b = a.float(), b.float()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    agent = moxco.agent.attach(model, opt, url=url, run="scaler", reeval_every=1, probe_every=0, scaler=scaler)
    xs = [flat_params(model).double()]
    for _ in range(8):
        scaler.scale(model(torch.zeros(1))).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        xs.append(flat_params(model).double())
    agent.close()
    store = open_store(url)
    grad_sq = store.series("scaler", "grad_norm_sq")[1]
    corr, smooth = (dict(zip(*store.series("scaler", name))) for name in ("update_corr", "inst_smooth"))
    assert sorted(corr) == sorted(smooth) == list(range(1, 8))
    for t in range(8):
        g = a @ xs[t] + b
        assert grad_sq[t] == pytest.approx(float(g @ g), rel=1e-4)
        if t:  # ⟨g_t, x_t − x_{t−1}⟩ and ‖g_t − ∇f(x_{t−1})‖ / ‖x_t − x_{t−1}‖ with g_t unscaled
            d = xs[t] - xs[t - 1]
            assert corr[t] == pytest.approx(float(g @ d), rel=1e-3)
            assert smooth[t] == pytest.approx(float((a @ d).norm() / d.norm()), rel=1e-3)


def test_convexity_ratio_sums_only_the_probes_whose_raw_gradient_is_known(url):
    """``convexity_ratio`` (audit eq. 6) on a quadratic with a reference ``x*``, a probe every
    step, and ``clip_grad_value_`` (a non-uniform change: ``g_t`` unknown) on every other step:
    the stored ratio is the closed form summed over the other steps only, and no point is stored
    at the clipped ones."""
    a, b, x0 = make_quadratic(11)
    model = Quadratic(a, b, x0 * 10).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x_star = -torch.linalg.solve(a, b)
    reference = {"head": x_star[:3].clone(), "tail": x_star[3:].reshape(2, 2).clone()}
    agent = moxco.agent.attach(model, opt, url=url, run="ratio", reeval_every=0, probe_every=1, reference=reference)
    f = lambda x: float(0.5 * x @ a @ x + b @ x)
    numerator = denominator = 0.0
    for t in range(8):
        x = flat_params(model)
        model(torch.zeros(1, dtype=torch.float64)).backward()
        if t % 2:
            nn.utils.clip_grad_value_(model.parameters(), 1e-3)
        else:
            numerator += float((a @ x + b) @ (x - x_star))
            denominator += f(x) - f(x_star)
        opt.step()
        opt.zero_grad()
    agent.close()
    steps, ratio = open_store(url).series("ratio", "convexity_ratio")
    assert list(steps) == [0, 2, 4, 6]
    assert ratio[-1] == pytest.approx(numerator / denominator, rel=1e-9)


def test_clip_grad_value_is_detected_and_gradient_metrics_are_skipped(url, caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    criterion = nn.MSELoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    agent = moxco.agent.attach(model, opt, url=url, run="clipvalue", reeval_every=1, probe_every=0, criterion=criterion)
    for _ in range(5):
        criterion(model(torch.randn(16, 4) * 10), torch.randn(16, 1) * 10).backward()
        nn.utils.clip_grad_value_(model.parameters(), 1e-3)
        opt.step()
        opt.zero_grad()
    agent.close()
    store = open_store(url)
    assert store.series("clipvalue", "loss")[0].size == 5
    assert store.series("clipvalue", "grad_norm_sq")[0].size == 0
    assert any("non-uniformly" in r.message for r in caplog.records)


def test_bf16_autocast_forward_is_replayed_under_autocast(url):
    """lr = 0 keeps x_{t−1} = x_t: the replayed bf16 loss must equal the user's bf16 loss exactly."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 1))
    criterion = nn.MSELoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    agent = moxco.agent.attach(model, opt, url=url, run="bf16", reeval_every=1, probe_every=0, criterion=criterion,
                               loss_fn=lambda output, target: criterion(output.float(), target))
    for _ in range(4):
        x, y = torch.randn(32, 16), torch.randn(32, 1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = model(x)
            assert output.dtype == torch.bfloat16
            loss = criterion(output.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    agent.close()
    assert agent.errors == {}
    np.testing.assert_array_equal(open_store(url).series("bf16", "loss_diff")[1], 0.0)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compiled_model(url, backend):
    torch.manual_seed(2)
    base = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    model = torch.compile(base, backend=backend)
    criterion = nn.MSELoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    agent = moxco.agent.attach(model, opt, url=url, run=f"compiled-{backend}", reeval_every=1, probe_every=2,
                               criterion=criterion)
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    for _ in range(6):
        criterion(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    agent.close()
    assert agent.errors == {}
    store = open_store(url)
    assert store.series(f"compiled-{backend}", "inst_smooth")[0].size == 5
    assert store.series(f"compiled-{backend}", "sharpness")[0].size == 3
    assert np.all(np.isfinite(store.series(f"compiled-{backend}", "inst_gap")[1]))


class SparseEmbeddingModel(nn.Module):
    """A scalar loss through an embedding with sparse gradients (``sparse=True``) or dense ones."""

    def __init__(self, sparse: bool) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 4, sparse=sparse)
        self.head = nn.Linear(8, 1)

    def forward(self, ids):
        return self.head(self.embedding(ids).flatten(1)).pow(2).mean()


def test_sparse_embedding_gradients_give_the_dense_model_metrics(tmp_path):
    """``nn.Embedding(sparse=True)`` (repeated ids: uncoalesced gradient rows): every metric, the
    re-evaluation and the probe included, equals the dense twin's, and nothing is disabled (the
    replay's sparse gradients used to fail ``inst_smooth`` and the probe)."""
    ids = torch.tensor([[1, 1], [1, 2], [3, 1], [1, 1], [2, 2]])
    stored = {}
    for sparse in (False, True):
        torch.manual_seed(0)
        model = SparseEmbeddingModel(sparse)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        url = f"sqlite:///{tmp_path / f'sparse-{sparse}.db'}"
        agent = moxco.agent.attach(model, opt, url=url, run="emb", reeval_every=1, probe_every=2)
        for _ in range(6):
            model(ids).backward()
            assert model.embedding.weight.grad.is_sparse == sparse
            opt.step()
            opt.zero_grad()
        agent.close()
        assert agent.errors == {}
        store = open_store(url)
        stored[sparse] = {name: store.series("emb", name) for name in store.metrics("emb")}
    assert set(stored[True]) == set(stored[False]) >= {"grad_norm_sq", "update_corr", "inst_gap", "inst_smooth",
                                                       "sharpness", "goodness"}
    for name, (steps, values) in stored[False].items():
        if name in TIMING:  # wall-clock time: the same steps, not the same values
            continue
        sparse_steps, sparse_values = stored[True][name]
        assert np.array_equal(steps, sparse_steps), name
        np.testing.assert_allclose(sparse_values, values, rtol=1e-4, atol=1e-7, err_msg=name)
