"""``attach`` never raises into the job but for a programming error in its arguments, and the agent
measures what the optimizer updates: parameters that exist only after the first forward (lazy
modules), parameter groups added later; a second agent on one optimizer is refused; a store that
cannot be reached or written is spooled to and sent later (``moxco spool push``); a malformed URL
is a clear error, never a directory."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

import moxco.agent
from moxco.cli import main as moxco_main
from moxco.collector import open_store
from tests.servers import free_port


@pytest.fixture(autouse=True)
def private_spool(tmp_path, monkeypatch):
    monkeypatch.setenv("MOXCO_SPOOL", str(tmp_path / "spool-root"))
    monkeypatch.delenv("MOXCO_URL", raising=False)


def flat(tensors):
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def data(step, inputs=4):
    gen = torch.Generator().manual_seed(step)
    return torch.randn(16, inputs, generator=gen, dtype=torch.float64), torch.randn(16, 1, generator=gen,
                                                                                     dtype=torch.float64)


def test_a_second_agent_on_the_same_optimizer_is_refused_and_the_first_keeps_the_jobs_losses(tmp_path):
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    opt, criterion = torch.optim.SGD(model.parameters(), lr=0.1), nn.MSELoss()
    agent = moxco.agent.attach(model, opt, url=url, run="one", criterion=criterion, reeval_every=1, probe_every=0)
    with pytest.raises(RuntimeError, match=r"already has a moxco agent attached \(run 'one'\)"):
        moxco.agent.attach(model, opt, url=url, run="two", criterion=criterion)
    losses = []
    for step in range(6):
        x, y = data(step)
        loss = criterion(model(x), y)
        losses.append(float(loss.detach()))
        loss.backward()
        opt.step()
        opt.zero_grad()
    agent.close()
    assert agent.errors == {}
    store = open_store(url)
    np.testing.assert_allclose(store.series("one", "loss")[1], losses, rtol=1e-12)
    assert store.list_runs(name="two")[0] == 0
    again = moxco.agent.attach(model, opt, url=url, run="two")  # closed: the optimizer is free again
    again.close()


def test_a_parameter_group_added_after_attach_is_measured_from_the_next_step(tmp_path):
    """``opt.add_param_group`` after 3 steps: from step 3 on ``grad_norm_sq``, ``update_norm`` and
    ``distance`` cover both groups (equal to the values recomputed from the optimizer's parameters),
    ``x_0`` of the new group being where it joined; the change is said once, nothing fails."""
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    opt, criterion = torch.optim.SGD(first, lr=0.1, momentum=0.5), nn.MSELoss()
    agent = moxco.agent.attach(model, opt, url=url, run="groups", criterion=criterion, reeval_every=1, probe_every=0)
    grads, xs, origins = [], [], []
    for step in range(8):
        if step == 3:
            opt.add_param_group({"params": second, "lr": 0.05})
        params = [p for g in opt.param_groups for p in g["params"]]
        xs.append(flat(params))
        origins.append(flat(first) if step < 3 else None)
        x, y = data(step)
        criterion(model(x), y).backward()
        grads.append(flat(p.grad for p in params))
        opt.step()
        model.zero_grad()
    agent.close()
    assert agent.errors == {}
    store = open_store(url)
    steps, norm_sq = store.series("groups", "grad_norm_sq")
    assert steps.tolist() == list(range(8))
    np.testing.assert_allclose(norm_sq, [float(g @ g) for g in grads], rtol=1e-12)
    final = flat([p for g in opt.param_groups for p in g["params"]])
    after = xs[1:] + [final]
    steps, update = store.series("groups", "update_norm")
    assert steps.tolist() == list(range(8))
    want = [float((after[t][: xs[t].numel()] - xs[t]).norm()) for t in range(8)]
    np.testing.assert_allclose(update, want, rtol=1e-9)
    x0 = torch.cat([xs[0], xs[3][xs[0].numel():]])  # the second group's x_0: where it joined
    distance = store.series("groups", "distance")[1]
    np.testing.assert_allclose(distance[3:], [float((xs[t] - x0).norm()) for t in range(3, 8)], rtol=1e-9)


def test_lazy_parameters_are_measured_from_the_first_step(tmp_path):
    """A ``LazyLinear`` model: ``attach`` before the first forward works, and every step's
    ``grad_norm_sq``, ``update_norm`` and ``distance`` are those recomputed from the parameters."""
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    torch.manual_seed(0)
    model = nn.Sequential(nn.LazyLinear(8), nn.Tanh(), nn.Linear(8, 1)).double()
    opt, criterion = torch.optim.SGD(model.parameters(), lr=0.1), nn.MSELoss()
    agent = moxco.agent.attach(model, opt, url=url, run="lazy", criterion=criterion, reeval_every=1, probe_every=2)
    xs, grads = [], []
    for step in range(6):
        x, y = data(step, inputs=5)
        out = model(x)
        xs.append(flat(model.parameters()))
        criterion(out, y).backward()
        grads.append(flat(p.grad for p in model.parameters()))
        opt.step()
        opt.zero_grad()
    xs.append(flat(model.parameters()))
    agent.close()
    assert agent.errors == {}
    store = open_store(url)
    steps, norm_sq = store.series("lazy", "grad_norm_sq")
    assert steps.tolist() == list(range(6))
    np.testing.assert_allclose(norm_sq, [float(g @ g) for g in grads], rtol=1e-12)
    np.testing.assert_allclose(store.series("lazy", "update_norm")[1],
                               [float((xs[t + 1] - xs[t]).norm()) for t in range(6)], rtol=1e-9)
    np.testing.assert_allclose(store.series("lazy", "distance")[1], [float((xs[t] - xs[0]).norm()) for t in range(6)],
                               rtol=1e-9, atol=1e-15)
    assert store.series("lazy", "sharpness")[0].tolist() == [0, 2, 4]


def test_a_malformed_url_is_a_clear_error_and_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"'sqlite:/runs.db'.*needs '://'.*sqlite:///runs.db"):
        moxco.agent.attach(model, opt, url="sqlite:/runs.db")
    with pytest.raises(ValueError, match="sqlite:///path.db, postgresql://"):
        moxco.agent.attach(model, opt, url="mysql://db/runs")
    assert list(tmp_path.iterdir()) == []
    agent = moxco.agent.attach(model, opt, url="sqlite:///runs.db", run="ok")  # the optimizer is free again
    agent.close()


def small_job(url, run, steps=12, **options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    opt, criterion = torch.optim.SGD(model.parameters(), lr=0.1), nn.MSELoss()
    agent = moxco.agent.attach(model, opt, url=url, run=run, criterion=criterion, reeval_every=1, probe_every=4,
                               **options)
    losses = []
    for step in range(steps):
        x, y = data(step)
        loss = criterion(model(x), y)
        losses.append(float(loss.detach()))
        loss.backward()
        opt.step()
        opt.zero_grad()
    agent.close()
    return agent, losses


@pytest.mark.parametrize("store_is", ["an unreachable PostgreSQL", "an unwritable default SQLite file"])
def test_a_store_that_cannot_be_reached_or_written_is_spooled_to_and_pushed_later(store_is, tmp_path, monkeypatch,
                                                                                   caplog, capsys):
    """``attach`` does not raise: it says once that it spools, training goes on, ``close()`` says
    what is left in the spool (errors, stats and log agree), and ``moxco spool push`` sends it to a
    store later: the run with every point the job measured, decisions' and run's registration
    included."""
    if store_is.startswith("an unreachable"):
        url = f"postgresql://moxco@127.0.0.1:{free_port()}/nowhere"
    else:  # the working directory's moxco.db cannot be a database file (a directory is in the way)
        monkeypatch.chdir(tmp_path)
        (tmp_path / "moxco.db").mkdir()
        url = None
    with caplog.at_level(logging.WARNING, logger="moxco.agent"):
        agent, losses = small_job(url, "away")
    assert "spooling to" in agent.errors["store"]
    spool = agent.store.spool_dir
    left = agent.store.stats.points_left
    assert left == agent.writer.written > 0 and f"{left} points" in agent.errors["spool"]
    assert f"{left} points left in the spool" in caplog.text and f"moxco spool push {spool}" in caplog.text
    assert sum("spooling to" in r.getMessage() for r in caplog.records) == 1

    target = f"sqlite:///{tmp_path / 'later.db'}"
    assert moxco_main(["spool", "list"]) == 0
    assert f"{left} points" in capsys.readouterr().out
    assert moxco_main(["spool", "push", str(spool), "--store", target]) == 0
    assert f"{left} points sent" in capsys.readouterr().out and not spool.exists()
    store = open_store(target)
    run = store.run("away")
    assert run.status == "finished" and run.config["reeval_every"] == 1
    np.testing.assert_allclose(store.series("away", "loss")[1], losses, rtol=1e-12)
    assert sum(store.series("away", m)[0].size for m in store.metrics("away")) == left
