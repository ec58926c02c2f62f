"""Decisions on the agent's side: applied at the step the run's configuration fixes (one seed, one
run, whatever the threads do), waits bounded and counted, bad decisions rejected one by one."""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import pytest
import torch
from torch import nn

import moxco.agent
import moxco.agent.writer as writer_module
from moxco.agent.decisions import DecisionInbox, apply_decision
from moxco.agent.distributed import DataParallelGroup
from moxco.agent.writer import MetricWriter
from moxco.catalogue import needing
from moxco.collector import open_store
from moxco.decision import Decision, reproducibility
from moxco.optim import MoXCo
from moxco.policy import DEFAULT_LAG
from tests.agent.test_optim_integration import regression


@pytest.fixture
def url(tmp_path):
    return f"sqlite:///{tmp_path / 'runs.db'}"


POLICY = {"threshold": 0.9, "consecutive": 2, "min_step": 20, "action": {"phase": 2, "alpha": 0.1, "beta": 0.1}}


def moxco_loop(url, run, steps=90, pace=0.0, **options):
    """A MoXCo regression whose policy fires (at step 50 with this seed); the parameters after
    every step, and the agent."""
    model, x, y = regression()
    criterion = nn.MSELoss()
    opt = MoXCo(model.parameters(), torch.optim.SGD, lr=0.05, alpha=0.9, beta=0.5, seed=0)
    agent = moxco.agent.attach(model, opt, url=url, run=run, reeval_every=1, probe_every=5, criterion=criterion,
                               sharpness_iters=3, seed=0, goodness={"tau": 1.0, "loss_target": 0.0025, "form": "eos"},
                               policy=POLICY, **options)
    gen = torch.Generator().manual_seed(1)
    after = []
    for _ in range(steps):
        index = torch.randint(0, x.shape[0], (64,), generator=gen)
        criterion(model(x[index]), y[index]).backward()
        opt.step()
        opt.zero_grad()
        after.append(torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()]))
        if pace:
            time.sleep(pace)
    agent.close()
    return agent, opt, after


def stored_run(store, run):
    """Every stored series of ``run`` (steps, values) and its decisions' steps."""
    series = {name: store.series(run, name) for name in store.metrics(run)}
    decisions = [(d.step, d.apply_at, d.applied_step, d.status, dict(d.action)) for d in store.decisions(run)]
    return series, decisions


def same_series(a, b):
    """Every stored series equal, but those read from the wall clock (step time, throughput)."""
    assert a.keys() == b.keys()
    for name in set(a) - set(needing("clock")):
        (sa, va), (sb, vb) = a[name], b[name]
        assert np.array_equal(sa, sb), name
        assert np.array_equal(va, vb, equal_nan=True), name


def test_a_moxco_loop_run_three_times_with_one_seed_is_the_same_run_whatever_the_threads_do(url, monkeypatch):
    """Embedded mode, default ``sync`` decisions: the policy's decision is applied exactly at the
    boundary its configuration fixes (probe step + 1 + lag), with the writer thread slowed down in
    one run and the training thread in another; so the parameters after every step, the decisions
    and every stored series are identical."""
    runs = []
    runs.append(moxco_loop(url, "plain"))
    absorb = MetricWriter._absorb

    def slow_absorb(self, record):  # a loaded machine: the writer lags far behind the steps
        time.sleep(0.01)
        return absorb(self, record)

    monkeypatch.setattr(MetricWriter, "_absorb", slow_absorb)
    runs.append(moxco_loop(url, "slow-writer"))
    monkeypatch.undo()
    runs.append(moxco_loop(url, "slow-steps", pace=0.02))  # the writer far ahead of the steps

    store = open_store(url)
    reference = stored_run(store, "plain")
    (decision,) = store.decisions("plain")
    assert decision.source == "policy" and decision.apply_at == decision.step + 1 + DEFAULT_LAG
    assert decision.applied_step == decision.apply_at and decision.lateness == 0
    for (agent, opt, after), name in zip(runs, ("plain", "slow-writer", "slow-steps")):
        assert agent.errors == {} and opt.phase == 2
        assert opt.hyperparameters()["committed_at"] == decision.apply_at
        assert agent.inbox.stats.timeouts == 0 and agent.inbox.stats.late == 0
        series, decisions = stored_run(store, name)
        assert decisions == reference[1]
        same_series(series, reference[0])
        for step, (mine, first) in enumerate(zip(after, runs[0][2])):
            assert torch.equal(mine, first), f"{name}: parameters differ after step {step}"
        assert store.run(name).config["decisions"]["mode"] == "sync"
        assert reproducibility(store.run(name).config, store.decisions(name))["reproducible"] is True
    # the slow writer made the training thread wait at the boundaries; the waits were answered
    slow = runs[1][0].inbox.stats
    assert slow.waits > 0 and slow.timeouts == 0 and slow.max_wait_seconds <= slow.timeout


def test_the_demo_run_three_times_with_one_seed_is_the_same_run(tmp_path, capsys):
    """``moxco demo`` (embedded store, MoXCo, its policy): the same decision, applied at the same
    step, and the same stored series, three times."""
    from moxco.agent.demo import run_demo

    url = f"sqlite:///{tmp_path / 'demo.db'}"
    for run in ("demo-a", "demo-b", "demo-c"):
        assert run_demo(steps=70, seed=0, url=url, run=run, quiet=True) == 0
    capsys.readouterr()
    store = open_store(url)
    reference = stored_run(store, "demo-a")
    assert [(d[0], d[1], d[2]) for d in reference[1]] == [(60, 63, 63)]
    for run in ("demo-b", "demo-c"):
        series, decisions = stored_run(store, run)
        assert decisions == reference[1]
        same_series(series, reference[0])


def test_a_probe_the_policy_cannot_decide_on_never_holds_the_step(url):
    """No loss (so no goodness) at any probe: the writer answers each probe at once, so no wait
    reaches the (long) timeout; a dropped probe record is answered too."""
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    agent = moxco.agent.attach(model, opt, url=url, run="no-goodness", reeval_every=0, probe_every=2,
                               decision_timeout=60.0)
    for _ in range(12):
        (model(torch.randn(4, 3)) ** 2).mean().backward()  # a plain function loss nobody told the agent
        opt.step()
        opt.zero_grad()
    agent.close()
    assert "loss" in agent.errors  # no loss, no goodness
    assert agent.inbox.stats.timeouts == 0 and agent.inbox.stats.skipped == 0


def test_the_mode_is_recorded_with_the_run_and_checked(url):
    model = nn.Linear(2, 1)
    agent = moxco.agent.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), url=url, run="modes",
                               decisions="async", decision_timeout=2)
    agent.close()
    recorded = open_store(url).run("modes").config["decisions"]
    assert recorded["mode"] == "async" and recorded["timeout"] == 2.0 and recorded["lag"] == DEFAULT_LAG
    for bad in ({"decisions": "fast"}, {"decision_timeout": 0}, {"decision_timeout": math.inf},
                {"policy": {"lag": -1}}):
        with pytest.raises(ValueError):
            moxco.agent.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), url=url, **bad)


# --- bad decisions are rejected one by one ------------------------------------------------------------


class _Committing(torch.optim.SGD):
    """An optimizer whose ``commit`` refuses α ≥ 0.5 (as an optimizer with its own checks would)."""

    def __init__(self, params, **kw):
        super().__init__(params, **kw)
        self.commits = []

    def commit(self, alpha=0.1, **kw):
        if alpha >= 0.5:
            raise ValueError(f"alpha {alpha} is too large for this optimizer")
        self.commits.append({"alpha": alpha, **kw})


def operator_loop(url, run, opt_factory, decisions, steps=12, **options):
    """A small loop in which operator ``decisions`` ({step: action}) are written to the store and
    handed to the agent before ``step`` runs (applied at the boundary after it)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    opt = opt_factory(model.parameters())
    criterion = nn.MSELoss()
    agent = moxco.agent.attach(model, opt, url=url, run=run, criterion=criterion, reeval_every=0, probe_every=4,
                               **options)
    store = open_store(url)
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    for step in range(steps):
        if step in decisions:
            stored, _ = store.add_decision(run, Decision(step, decisions[step], source="operator", issued_by="ops"))
            agent._receive_decision(stored.id, stored)
        criterion(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    agent.close()
    return agent, opt, store


def test_a_decision_whose_commit_raises_is_rejected_and_the_next_one_is_applied(url, caplog):
    with caplog.at_level(logging.WARNING, logger="moxco.agent"):
        agent, opt, store = operator_loop(url, "bad-commit", lambda p: _Committing(p, lr=0.05),
                                          {2: {"alpha": 0.7}, 5: {"alpha": 0.6}, 8: {"alpha": 0.2}})
    bad, worse, good = store.decisions("bad-commit")
    assert (bad.status, bad.applied_step) == ("rejected", 3)
    assert bad.rejected == "ValueError: alpha 0.7 is too large for this optimizer"
    assert (worse.status, worse.applied_step) == ("rejected", 6)
    assert (good.status, good.applied_step) == ("applied", 9)
    assert opt.commits == [{"alpha": 0.2}]
    assert agent.errors == {}  # no metric was lost: the decision path goes on
    assert agent.inbox.stats.rejected == 2 and store.run("bad-commit").config["decisions"]["rejected"] == 2
    logged = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert len(logged) == 2 and "bad-commit:operator:2" in logged[0] and "bad-commit:operator:5" in logged[1]
    assert bad.rejected in logged[0]
    assert agent.phase == 2  # set by the applied one only
    steps, phase = store.series("bad-commit", "phase")
    assert (steps.tolist(), phase.tolist()) == ([0, 4, 8, 9], [1.0, 1.0, 1.0, 2.0])


def test_a_decision_nothing_can_apply_is_rejected_and_acknowledged(url):
    """A plain optimizer (no ``commit``) and no ``on_decision``: refused with the reason, not left
    pending; an ``on_decision`` that raises refuses only that decision."""
    agent, opt, store = operator_loop(url, "no-commit", lambda p: torch.optim.SGD(p, lr=0.05), {1: {"alpha": 0.2}})
    (decision,) = store.decisions("no-commit")
    assert decision.status == "rejected" and decision.applied_step == 2
    assert "needs optimizer.commit" in decision.rejected and "SGD has none" in decision.rejected
    assert agent.phase == 1

    seen = []

    def on_decision(d):
        if d.action.get("lr") == 1.0:
            raise RuntimeError("lr 1.0 refused by the user's callback")
        seen.append(d.step)

    agent, opt, store = operator_loop(url, "callback", lambda p: torch.optim.SGD(p, lr=0.05),
                                      {1: {"lr": 1.0}, 3: {"lr": 0.01}}, on_decision=on_decision)
    refused, taken = store.decisions("callback")
    assert refused.rejected == "RuntimeError: lr 1.0 refused by the user's callback"
    assert taken.status == "applied" and taken.applied_step == 4 and seen == [3]


def test_a_phase_one_action_explores_and_never_commits(url):
    """MoXCo: a phase-2 decision commits, a later phase-1 decision returns it to exploring with the
    given step size (``MoXCo.explore``), without calling ``commit``."""
    calls = []

    def factory(params):
        opt = MoXCo(params, torch.optim.SGD, lr=0.05, alpha=0.9, beta=0.5, seed=0)
        commit, explore = opt.commit, opt.explore
        opt.commit = lambda **kw: (calls.append(("commit", kw)), commit(**kw))[1]
        opt.explore = lambda **kw: (calls.append(("explore", kw)), explore(**kw))[1]
        return opt

    agent, opt, store = operator_loop(url, "explore", factory, {2: {"phase": 2, "alpha": 0.1, "beta": 0.1},
                                                                6: {"phase": 1, "lr": 0.02}})
    assert calls == [("commit", {"alpha": 0.1, "beta": 0.1}), ("explore", {"lr": 0.02})]
    assert opt.phase == 1 and agent.phase == 1 and opt.committed_at is None
    assert opt.param_groups[0]["lr"] == 0.02  # and no hypergradient adaptation in Phase 1
    assert [d.status for d in store.decisions("explore")] == ["applied", "applied"]
    steps, phase = store.series("explore", "phase")
    assert (steps.tolist(), phase.tolist()) == ([0, 3, 4, 7, 8], [1.0, 2.0, 2.0, 1.0, 1.0])

    # an optimizer with commit() but no explore(): a phase-1 action is refused, never committed
    agent, opt, store = operator_loop(url, "no-explore", lambda p: _Committing(p, lr=0.05), {1: {"phase": 1}})
    (decision,) = store.decisions("no-explore")
    assert decision.status == "rejected" and "needs optimizer.explore" in decision.rejected and opt.commits == []


def test_apply_decision_never_raises():
    class Broken:
        def commit(self, **kw):
            raise KeyError("state")

    error = apply_decision(Decision(3, {"alpha": 0.2}), Broken(), None)
    assert isinstance(error, KeyError)
    assert apply_decision(Decision(3, {"alpha": 0.2}), Broken(), lambda d: None) is not None  # commit wins


# --- the inbox: boundaries, waits, resume ------------------------------------------------------------


def test_the_inbox_applies_each_decision_at_its_boundary_and_resumes_from_its_state_dict():
    class Opt:
        def __init__(self):
            self.calls = []

        def commit(self, **kw):
            self.calls.append(kw)

    inbox = DecisionInbox(DataParallelGroup(), mode="sync", lag=2, timeout=30.0)
    inbox.expect(10)  # boundary 13
    early = Decision(10, {"alpha": 0.2}, run="r", apply_at=13)
    inbox.receive(early.id, early)
    inbox.answered([10])
    opt = Opt()
    assert inbox.at_boundary(11, opt, None) == [] and inbox.at_boundary(12, opt, None) == []
    (outcome,) = inbox.at_boundary(13, opt, None)
    assert outcome.ident == "r:policy:10" and outcome.rejected is None and opt.calls == [{"alpha": 0.2}]
    inbox.receive(early.id, early)  # redelivered: never applied twice
    assert inbox.at_boundary(14, opt, None) == []

    inbox.expect(20)  # boundary 23
    later = Decision(20, {"alpha": 0.3}, run="r", apply_at=23)
    inbox.receive(later.id, later)
    state = inbox.state_dict()
    resumed = DecisionInbox(DataParallelGroup(), mode="sync", lag=2, timeout=30.0)
    resumed.load_state_dict(state)
    resumed.receive(early.id, early)
    assert resumed.at_boundary(22, opt, None) == []
    start = time.perf_counter()
    (outcome,) = resumed.at_boundary(23, opt, None)  # not waited for: its answer went to the earlier job
    assert time.perf_counter() - start < 30.0 and resumed.stats.waits == 0
    assert outcome.ident == "r:policy:20" and opt.calls == [{"alpha": 0.2}, {"alpha": 0.3}]


def test_a_wait_that_times_out_is_counted_once_and_the_late_decision_is_applied_with_its_lateness():
    class Opt:
        def commit(self, **kw):
            pass

    inbox = DecisionInbox(DataParallelGroup(), mode="sync", lag=0, timeout=0.05)
    inbox.expect(5)
    assert inbox.at_boundary(6, Opt(), None) == []  # nobody answers: the wait times out
    inbox.expect(7)
    assert inbox.at_boundary(8, Opt(), None) == []  # not waited for again: nothing has answered since
    assert (inbox.stats.waits, inbox.stats.timeouts, inbox.stats.skipped) == (1, 1, 1)
    late = Decision(5, {"alpha": 0.2}, run="r", apply_at=6)
    inbox.receive(late.id, late)
    inbox.answered([5])
    (outcome,) = inbox.at_boundary(9, Opt(), None)
    assert outcome.ident == late.id and inbox.stats.late == 1 and inbox.stats.max_lateness == 3
    assert inbox.changed()["late"] == 1 and inbox.changed() is None
    inbox.expect(10)
    inbox.answered([10])  # an answer came: waits resume (and this one is there already)
    assert inbox.at_boundary(11, Opt(), None) == [] and inbox.stats.skipped == 1


def test_the_writer_wakes_at_once_for_a_probe(url, monkeypatch):
    """The 50 ms gathering is cut short by a probe's record, so the policy's answer does not wait
    for it: with a gathering window far longer than the test, probes are still answered."""
    monkeypatch.setattr(writer_module, "GATHER_SECONDS", 60.0)
    agent, opt, after = moxco_loop(url, "prompt", steps=60, decision_timeout=30.0)
    assert agent.inbox.stats.timeouts == 0 and opt.phase == 2
