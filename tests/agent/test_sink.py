"""The embedded sink: the agent's ``Sink`` on a ``Store`` in the process, the same calls as over HTTP."""

from __future__ import annotations

import os
import time
from pathlib import Path

from moxco.agent.sink import EmbeddedSink
from moxco.collector import open_store
from moxco.decision import Decision
from moxco.policy import PolicyConfig
from moxco.wire import Point


def test_the_embedded_sink_hands_each_pending_decision_over_once_and_acks_ride_in_ingest(tmp_path):
    """The run registered with its policy, the store's ingest decides; an operator's decision
    written into the store reaches the agent too; each id is handed over once however often it
    is pending; acknowledgements (applied or refused) ride in the next ingest."""
    store = open_store(f"sqlite:///{tmp_path / 'runs.db'}")
    received = []
    sink = EmbeddedSink(store, on_decision=lambda ident, decision: received.append((ident, decision)))
    sink.put_run("r", config={"lr": 0.1}, policy=PolicyConfig(threshold=0.5, consecutive=1).to_dict(),
                 status="running")
    sink.ingest("r", [Point(1, "loss", 1.0, 0.0)])
    store.add_decision("r", Decision(1, {"alpha": 0.2}, source="operator", issued_by="ops"))
    sink.ingest("r", [Point(2, "goodness", 0.9, 0.0)])  # the policy fires at step 2
    sink.ingest("r", [Point(3, "loss", 1.0, 0.0)])  # both still pending: not handed over again
    assert [ident for ident, _ in received] == ["r:operator:1", "r:policy:2"]
    assert all(type(d) is Decision and d.id == ident for ident, d in received)
    result = sink.ingest("r", [], acks=[("r:operator:1", 3), ("r:policy:2", 3, "phase 2 already")])
    assert result.pending == [] and result.unknown_acks == []
    assert [(d.status, d.applied_step) for d in sink.decisions("r")] == [("applied", 3), ("rejected", 3)]
    sink.close()
    assert len(received) == 2


def _train(agent, model, opt, steps, criterion):
    import torch

    torch.manual_seed(0)
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    for _ in range(steps):
        opt.zero_grad()
        loss = criterion(model(x), y)
        loss.backward()
        opt.step()


def test_a_store_file_deleted_mid_run_is_noticed_said_once_and_the_run_goes_on(tmp_path, caplog):
    """The store file is deleted at step 50 of 200: the next write notices (``StoreLostError``: the
    file's inode is gone), the agent records it (``errors["store"]`` says the points before were
    lost), warns once, and the run goes on in a new file with every step from there on."""
    import logging

    import torch

    from moxco.agent import attach

    path = tmp_path / "runs.db"
    torch.manual_seed(0)
    mse = torch.nn.MSELoss()
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    agent = attach(model, opt, url=f"sqlite:///{path}", run="lost", reeval_every=0, probe_every=0,
                   criterion=mse)
    with caplog.at_level(logging.WARNING, logger="moxco"):
        _train(agent, model, opt, 50, mse)
        time.sleep(1.0)  # the writer's batches of those steps are in the file
        for suffix in ("", "-wal", "-shm"):
            if Path(f"{path}{suffix}").exists():
                os.unlink(f"{path}{suffix}")
        _train(agent, model, opt, 150, mse)
        agent.close()
    assert "store" in agent.errors and "deleted" in agent.errors["store"] and "lost" in agent.errors["store"]
    warnings = [r for r in caplog.records if "deleted" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    with open_store(f"sqlite:///{path}") as store:
        steps, _ = store.series("lost", "loss")
        run = store.run("lost")
    assert steps.size >= 140 and int(steps[-1]) == 199  # the steps after the loss are all there
    assert "deleted" in run.config["errors"]["store"] and run.status == "finished"
