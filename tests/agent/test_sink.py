"""The embedded sink: the agent's ``Sink`` on a ``Store`` in the process, the same calls as over HTTP."""

from __future__ import annotations

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
