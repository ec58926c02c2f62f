"""Run identity and exact resume, embedded and over HTTP.

A run name that exists starts a new run (``name-2``, said once) unless the job resumes; a run has a
stable id. A job killed (SIGKILL) right after its checkpoint and resumed from it stores every
series exactly as the same job run straight through: the agent's ``state_dict`` holds everything
the series depend on (the step, ``x_{t−1}``, ``x_0``, the aggregates, ALIGATOR, the sharpness
vector, the random-scaling generator, the policy's progress, the decisions applied), so a decision
taken before the kill is not taken again and the phase is kept.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import moxco.agent
from moxco.agent.groups.free import TIMING
from moxco.collector import open_store
from moxco.collector.store import NotFoundError
from tests.agent import resume_job
from tests.servers import CollectorProcess

REPO = Path(__file__).resolve().parents[2]
STEPS, KILL_AT = 40, 25


@pytest.fixture(autouse=True)
def private_spool(tmp_path, monkeypatch):
    monkeypatch.setenv("MOXCO_SPOOL", str(tmp_path / "spool-root"))
    monkeypatch.delenv("MOXCO_TOKEN", raising=False)


@pytest.fixture(params=["embedded", "http"])
def where(request, tmp_path):
    """``(url the agent writes to, the store file it lands in)``: the file itself, or a collector
    (``moxco serve``) serving it."""
    db = f"sqlite:///{tmp_path / 'runs.db'}"
    if request.param == "embedded":
        yield db, db
        return
    collector = CollectorProcess.in_directory(tmp_path, db).start()
    try:
        yield collector.url, db
    finally:
        collector.stop()


def readme_job(url, seed, **options):
    """The README's example loop (8 steps), with its own seed: returns the agent and the job's own
    step-0 loss."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    opt, criterion = torch.optim.SGD(model.parameters(), lr=0.05), torch.nn.MSELoss()
    agent = moxco.agent.attach(model, opt, url=url, run="mlp-sgd", reeval_every=1, probe_every=10,
                               criterion=criterion, **options)
    first = None
    for _ in range(8):
        x = torch.randn(64, 8)
        loss = criterion(model(x), x.sum(1, keepdim=True).sin())
        first = float(loss.detach()) if first is None else first
        loss.backward()
        opt.step()
        opt.zero_grad()
    agent.close()
    return agent, first


def test_the_readme_example_run_twice_gives_two_runs_and_resume_continues_one(where, caplog):
    """Twice with the same ``run=`` and another seed: two runs, ``mlp-sgd`` and ``mlp-sgd-2``, each
    with its own job's losses and its own id (said once, by the second); ``resume=True`` continues
    ``mlp-sgd`` (same id, steps after its last one); ``resume="must"`` on a name no run has fails
    at attach, saying so."""
    url, db = where
    first, loss_a = readme_job(url, seed=0)
    with caplog.at_level(logging.WARNING, logger="moxco.agent"):
        second, loss_b = readme_job(url, seed=1)
    assert (first.run, second.run) == ("mlp-sgd", "mlp-sgd-2") and second.requested_run == "mlp-sgd"
    assert sum("exists already" in r.getMessage() and "mlp-sgd-2" in r.getMessage() for r in caplog.records) == 1
    store = open_store(db)
    assert store.series("mlp-sgd", "loss")[1][0] == pytest.approx(loss_a, rel=1e-6)
    assert store.series("mlp-sgd-2", "loss")[1][0] == pytest.approx(loss_b, rel=1e-6)
    assert loss_a != pytest.approx(loss_b, rel=1e-3)
    ids = {run: store.run(run).id for run in ("mlp-sgd", "mlp-sgd-2")}
    assert ids == {"mlp-sgd": first.run_id, "mlp-sgd-2": second.run_id} and len(set(ids.values())) == 2

    third, _ = readme_job(url, seed=2, resume=True)
    assert third.run == "mlp-sgd" and third.run_id == ids["mlp-sgd"]
    steps, _ = store.series("mlp-sgd", "loss")
    assert steps.tolist() == list(range(16))  # continued after the last stored step
    assert store.run("mlp-sgd").status == "finished" and store.list_runs()[0] == 2

    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    with pytest.raises(NotFoundError, match="no run named 'nope' to resume"):
        moxco.agent.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), url=url, run="nope", resume="must")
    assert store.list_runs(name="nope")[0] == 0
    again = moxco.agent.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), url=url, run="mlp-sgd-2",
                               resume="must")  # the optimizer of the refused attach is free again
    again.close()
    assert again.run_id == ids["mlp-sgd-2"]


def series_of(store, run):
    return {m: store.series(run, m) for m in store.metrics(run) if m not in TIMING}


def test_a_job_killed_after_its_checkpoint_and_resumed_stores_every_series_as_the_straight_run(where, tmp_path):
    """The job of ``tests/agent/resume_job.py`` run straight through (40 steps), and the same job
    SIGKILLed right after its checkpoint at step 25 and resumed from it (model, optimizer and
    ``agent.state_dict()``; the resumed agent has another seed): every stored series is equal, bit
    for bit; the policy's one decision (at step 10, before the kill) is not taken again; the phase
    stays 2."""
    url, db = where
    model, opt = resume_job.model_and_optimizer()
    straight = resume_job.attach(model, opt, url, "straight", seed=1, spool=tmp_path / "spool-straight")
    resume_job.train(model, opt, straight, 0, STEPS)
    straight.close()
    assert straight.errors == {} and straight.phase == 2

    checkpoint = tmp_path / "checkpoint.pt"
    args = [sys.executable, "-m", "tests.agent.resume_job", url, "resumed", str(KILL_AT), str(checkpoint),
            str(tmp_path / "spool-killed")]
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == -9 and "saved" in done.stdout, done.stderr[-3000:]
    store = open_store(db)
    assert store.run("resumed").status == "running"  # killed: no close()

    saved = torch.load(checkpoint, weights_only=True)  # plain data and tensors
    assert saved["agent"]["run"] == "resumed" and saved["agent"]["step"] == KILL_AT
    model, opt = resume_job.model_and_optimizer()
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    resumed = resume_job.attach(model, opt, url, "resumed", seed=99, spool=tmp_path / "spool-resumed",
                                resume="must")
    resumed.load_state_dict(saved["agent"])
    assert resumed.run_id == saved["agent"]["run_id"] and resumed.step == KILL_AT and resumed.phase == 2
    resume_job.train(model, opt, resumed, KILL_AT, STEPS)
    resumed.close()
    assert resumed.errors == {}

    want, got = series_of(store, "straight"), series_of(store, "resumed")
    assert set(got) == set(want) >= {"loss", "update_norm", "distance", "inst_gap", "avg_gap", "exp_gap", "max_smooth",
                                     "sharpness", "goodness", "goodness_grad_term", "phase", "lr", "alpha"}
    for metric, (steps, values) in want.items():
        np.testing.assert_array_equal(got[metric][0], steps, err_msg=metric)
        np.testing.assert_array_equal(got[metric][1], values, err_msg=metric)
    (taken,) = store.decisions("straight")
    (kept,) = store.decisions("resumed")
    assert kept.step == taken.step == 10 and kept.applied_step == taken.applied_step
    phase_steps, phase = store.series("resumed", "phase")
    assert phase[phase_steps > kept.applied_step].tolist() == [2.0] * int((phase_steps > kept.applied_step).sum())
    assert store.run("resumed").status == "finished"


def test_resume_without_a_checkpoint_continues_from_what_the_store_gives_and_says_what_it_cannot(tmp_path, caplog):
    """A job closed after 12 steps; another attaches with ``resume=True`` and no agent state: its
    steps continue after the stored ones, the phase is the stored one, and the running aggregates
    continue from their stored values (``exp_gap_t = β exp_gap_{t−1} + (1 − β) inst_gap_t`` from
    the last stored ``exp_gap``, ``max_smooth`` never below the stored one); the log says what
    restarts (``x_0``, ALIGATOR, the sharpness vector …)."""
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    model, opt = resume_job.model_and_optimizer()
    first = resume_job.attach(model, opt, url, "again", seed=1)
    resume_job.train(model, opt, first, 0, 12)
    first.close()
    store = open_store(url)
    last_exp_gap = store.series("again", "exp_gap")[1][-1]
    last_max_smooth = store.series("again", "max_smooth")[1][-1]
    with caplog.at_level(logging.WARNING, logger="moxco.agent"):
        second = resume_job.attach(model, opt, url, "again", seed=2, resume=True)
    assert second.step == 12 and second.phase == 2
    assert "x_0" in caplog.text and "ALIGATOR" in caplog.text and "sharpness" in caplog.text
    resume_job.train(model, opt, second, 12, 16)
    second.close()
    assert store.series("again", "loss")[0].tolist() == list(range(16))
    gap_steps, gaps = store.series("again", "inst_gap")
    exp_steps, exp_gap = store.series("again", "exp_gap")
    assert 12 not in gap_steps.tolist()  # no x_{t−1} at the first resumed step: said, not guessed
    first_new = exp_steps.tolist().index(13)
    assert exp_gap[first_new] == pytest.approx(0.99 * last_exp_gap + 0.01 * gaps[gap_steps.tolist().index(13)],
                                               rel=1e-12)
    assert store.series("again", "max_smooth")[1][-1] >= last_max_smooth
    assert len(store.decisions("again")) == 1  # the policy's progress is the store's: no second decision
