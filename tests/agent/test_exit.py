"""Nothing is lost at exit: a job that forgets ``close()`` stores every point and its run is marked
``interrupted``; what could not be delivered (a wrong token) is said the same way in the agent's
errors, its stats and the log, and ``moxco spool push`` sends it later."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import moxco.agent
from moxco.cli import main as moxco_main
from moxco.collector import open_store
from tests.servers import CollectorProcess

REPO = Path(__file__).resolve().parents[2]

FORGETFUL_JOB = textwrap.dedent("""
    import sys, torch, moxco.agent
    url = sys.argv[1]
    for steps in (20, 150):  # two jobs that never call agent.close()
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
        opt, criterion = torch.optim.SGD(model.parameters(), lr=0.05), torch.nn.MSELoss()
        agent = moxco.agent.attach(model, opt, url=url, run=f"forgot-{steps}", reeval_every=1, probe_every=10,
                                   criterion=criterion)
        for _ in range(steps):
            x = torch.randn(64, 8)
            criterion(model(x), x.sum(1, keepdim=True).sin()).backward()
            opt.step(); opt.zero_grad()
    print("trained", flush=True)
""")


@pytest.fixture(autouse=True)
def private_spool(tmp_path, monkeypatch):
    monkeypatch.setenv("MOXCO_SPOOL", str(tmp_path / "spool-root"))
    monkeypatch.delenv("MOXCO_TOKEN", raising=False)


def test_jobs_that_forget_close_store_every_point_and_their_runs_are_interrupted(tmp_path):
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    done = subprocess.run([sys.executable, "-c", FORGETFUL_JOB, url], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "MOXCO_SPOOL": str(tmp_path)})
    assert done.returncode == 0 and "trained" in done.stdout, done.stderr[-3000:]
    assert done.stderr.count("was not closed") == 2 and "interrupted" in done.stderr
    store = open_store(url)
    for steps in (20, 150):
        run = f"forgot-{steps}"
        assert store.run(run).status == "interrupted"
        assert store.series(run, "loss")[0].tolist() == list(range(steps))
        assert store.series(run, "update_norm")[0].tolist() == list(range(steps))  # the last one too
        assert store.series(run, "inst_gap")[0].size == steps - 1


def test_a_wrong_token_is_said_alike_in_errors_stats_and_log_and_the_spool_is_pushed_later(tmp_path, caplog, capsys):
    """The collector refuses the token: ``agent.errors["store"]`` says so and how to send the data,
    ``close()`` leaves everything in the spool and says how many points in ``errors["spool"]``, the
    stats (``points_left``) and the log, the same number; ``moxco spool push DIR --token RIGHT``
    then stores the whole run."""
    collector = CollectorProcess.in_directory(tmp_path, auth=True)
    _, secret = collector.store().create_token("trainer", ["ingest"])
    collector.start()
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        opt, criterion = torch.optim.SGD(model.parameters(), lr=0.1), nn.MSELoss()
        with caplog.at_level(logging.WARNING, logger="moxco.agent"):
            agent = moxco.agent.attach(model, opt, url=collector.url, token="mox_wrong", run="tokened",
                                       criterion=criterion, reeval_every=1, probe_every=5,
                                       transport={"max_backoff": 0.2, "close_timeout": 5})
            losses = []
            for step in range(10):
                x = torch.randn(16, 4)
                loss = criterion(model(x), x.sum(1, keepdim=True))
                losses.append(float(loss.detach()))
                loss.backward()
                opt.step()
                opt.zero_grad()
            agent.close()
        sink = agent.store
        assert "refused the token (401" in agent.errors["store"]
        left = sink.stats.points_left
        assert left == sink.stats.points_enqueued > 0 and sink.stats.points_sent == 0
        assert agent.errors["spool"].startswith(f"RuntimeError: {left} points left in the spool")
        assert f"{left} points left in the spool" in caplog.text
        assert f"moxco spool push {sink.spool_dir} --url {collector.url}" in caplog.text

        assert moxco_main(["spool", "push", str(sink.spool_dir), "--url", collector.url, "--token", secret]) == 0
        assert f"{left} points sent" in capsys.readouterr().out
        store = collector.store()
        assert store.run("tokened").status == "finished"
        np.testing.assert_allclose(store.series("tokened", "loss")[1], losses, rtol=1e-6)
        assert sum(store.series("tokened", m)[0].size for m in store.metrics("tokened")) == left
    finally:
        collector.stop()
