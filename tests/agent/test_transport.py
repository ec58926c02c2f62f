"""The agent's HTTP transport against a real collector (``moxco serve`` in a subprocess).

What must hold: points arrive exactly once; a collector killed (SIGKILL) and restarted mid-run
costs the training job nothing (no step waits on the network, nothing is dropped) and loses no
point; the spool replays in order, also from an earlier process; a full spool counts what it
drops; a 4xx batch is logged with the server's message and not retried; decisions taken by the
collector reach ``optimizer.commit`` once, at a step boundary, and are acknowledged.
"""

from __future__ import annotations

import logging
import math
import re
import socket
import threading
import time
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

import moxco.agent
from moxco.catalogue import needing
from moxco.agent.demo import NOISE_STD, make_task
from moxco.agent.transport import HttpSink, Spool
from moxco.wire import Point
from moxco.optim import MoXCo
from moxco.decision import reproducibility
from moxco.policy import PolicyConfig
from tests.servers import CollectorProcess, free_port, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def collector(tmp_path):
    c = CollectorProcess.in_directory(tmp_path).start()
    yield c
    c.stop()


@pytest.fixture(autouse=True)
def private_spool(tmp_path, monkeypatch):
    """Never touch ~/.cache in tests: the default spool root goes under tmp_path."""
    monkeypatch.setenv("MOXCO_SPOOL", str(tmp_path / "spool-root"))
    monkeypatch.delenv("MOXCO_TOKEN", raising=False)


def register(sink: HttpSink, run: str, **config) -> None:
    sink.put_run(run, config=config, policy=None)


def points(metric_steps, value=lambda m, s: float(s)):
    return [Point(step, metric, value(metric, step), 1.7e9 + step) for metric, step in metric_steps]


def stored(store, run, metrics):
    return {m: store.series(run, m) for m in metrics}


# --- the sink alone ----------------------------------------------------------------------------------


def test_points_arrive_exactly_once_with_nonfinite_values(collector, tmp_path):
    sink = HttpSink(collector.url, "once", spool_dir=tmp_path / "spool", batch_points=700)
    register(sink, "once")
    special = {3: math.nan, 4: math.inf, 5: -math.inf}
    metrics = ("loss", "grad_norm_sq", "goodness")
    sent = 0
    for chunk in range(10):  # 10 writes of 300 points: batches of ≥ 700 points, never splitting a write
        batch = points([(m, s) for s in range(chunk * 100, chunk * 100 + 100) for m in metrics],
                       value=lambda m, s: special.get(s, s * 0.5) if m == "loss" else float(s))
        sink.ingest("once", batch)
        sent += len(batch)
    assert sink.flush(60)
    sink.close()

    assert sink.stats.points_sent == sent == 3000
    assert sink.stats.duplicate_batches == 0 and sink.stats.points_dropped == 0 and sink.stats.points_rejected == 0
    assert sink.stats.batches_sent >= 4  # cut at ≥ 700 points, never inside a write: at most 900 each
    store = collector.store()
    for metric, (steps, values) in stored(store, "once", metrics).items():
        np.testing.assert_array_equal(steps, np.arange(1000))
        expected = np.array([special.get(s, s * 0.5) if metric == "loss" else float(s) for s in range(1000)])
        np.testing.assert_array_equal(values, expected)  # NaN == NaN and ±Inf survive the wire
    assert not (tmp_path / "spool").exists()  # all delivered: the spool directory is cleaned up


def test_spool_replays_in_order_also_from_an_earlier_process(collector, tmp_path):
    """An agent that never reached the collector leaves a spool; the next agent with the same run
    name sends it first. Order is visible in the store because the first write of a key wins."""
    spool = tmp_path / "spool"
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    first = HttpSink(dead, "replay", spool_dir=spool, batch_points=50, max_backoff=0.2)
    register(first, "replay", session="first")
    first.ingest("replay", points([("loss", s) for s in range(50)], value=lambda m, s: 1.0))
    first.ingest("replay", points([("loss", s) for s in range(100)], value=lambda m, s: 2.0))
    wait_until(lambda: first.stats.points_spooled >= 50, what="the first batches to be spooled")
    first.set_status("replay", "interrupted")
    first.close(timeout=1)
    assert first.stats.points_sent == 0 and first.stats.points_dropped == 0
    assert list(spool.glob("*.seg")), "close must leave the undelivered data on disk"

    second = HttpSink(collector.url, "replay", spool_dir=spool, batch_points=50)
    assert second.stats.spool_leftover
    register(second, "replay", session="second")
    second.ingest("replay", points([("loss", s) for s in range(150)], value=lambda m, s: 3.0))
    assert second.flush(60)
    second.close()

    steps, values = collector.store().series("replay", "loss")
    np.testing.assert_array_equal(steps, np.arange(150))
    # steps 0-49 first came with 1.0, 50-99 with 2.0 (the first process, in its order), 100-149 with 3.0
    np.testing.assert_array_equal(values, np.repeat([1.0, 2.0, 3.0], 50))
    run = collector.store().run("replay")
    assert run.config["session"] == "second" and run.status == "running"  # the leftover registration went first
    assert not list(spool.glob("*.seg"))


def test_full_spool_drops_counts_and_warns_once(collector, tmp_path, caplog):
    spool = tmp_path / "spool"
    dead = f"http://127.0.0.1:{free_port()}"
    cap = 64 * 1024
    sink = HttpSink(dead, "capped", spool_dir=spool, spool_max_bytes=cap, batch_points=200,
                    max_memory_points=400, max_backoff=0.2)
    register(sink, "capped")
    with caplog.at_level(logging.WARNING, logger="moxco.agent.transport"):
        for chunk in range(40):  # 8000 points ≈ 400 KB of JSON: far more than the cap
            sink.ingest("capped", points([("loss", s) for s in range(chunk * 200, chunk * 200 + 200)]))
        sink.close(timeout=1)
    s = sink.stats
    assert s.points_enqueued == 8000
    assert s.points_dropped > 0 and s.points_spooled > 0
    assert s.points_spooled + s.points_dropped == s.points_enqueued  # every point is accounted for
    # the cap binds point batches; tiny control envelopes (registration, status) always go in
    assert sum(p.stat().st_size for p in spool.glob("*.seg")) <= cap + 4096
    assert len([r for r in caplog.records if "is full" in r.getMessage()]) == 1
    assert any(f"{s.points_dropped} points dropped" in r.getMessage() for r in caplog.records)

    replay = HttpSink(collector.url, "capped", spool_dir=spool)
    assert replay.flush(60)
    replay.close()
    steps, _ = collector.store().series("capped", "loss")
    assert steps.size == s.points_spooled  # exactly what was spooled arrives, nothing more, nothing less
    np.testing.assert_array_equal(steps, np.arange(steps.size))  # the oldest were kept, in order
    assert collector.store().run("capped").config["transport"]["points_dropped"] == s.points_dropped


def test_a_rejected_batch_is_logged_with_the_server_message_and_not_retried(collector, tmp_path, caplog):
    sink = HttpSink(collector.url, "bad", spool_dir=tmp_path / "spool", batch_points=10)
    register(sink, "bad")
    with caplog.at_level(logging.ERROR, logger="moxco.agent.transport"):
        sink.ingest("bad", points([("loss", s) for s in range(10)]))
        assert sink.flush(60)
        sink.ingest("bad", [Point(10, "x" * 500, 1.0, 1.7e9)] + points([("loss", s) for s in range(10, 19)]))
        assert sink.flush(60)  # the refused batch does not block what follows
        sink.ingest("bad", points([("loss", s) for s in range(20, 30)]))
        assert sink.flush(60)
    sink.close()
    assert sink.stats.points_rejected == 10 and sink.stats.failed_requests == 0
    assert sink.stats.batches_sent == 2
    (record,) = [r for r in caplog.records if "refused" in r.getMessage()]
    assert re.search(r"with 4\d\d: .*metric", record.getMessage()) and "not retried" in record.getMessage()
    steps, _ = collector.store().series("bad", "loss")
    np.testing.assert_array_equal(steps, np.r_[0:10, 20:30])


def test_decisions_are_handed_over_once_and_acks_survive_a_restart(collector, tmp_path):
    """Pending decisions are redelivered until acknowledged; the sink hands each id over once,
    and an acknowledgement spooled while the collector was down is not undone by a new agent."""
    spool = tmp_path / "spool"
    received = []
    sink = HttpSink(collector.url, "ops", spool_dir=spool, poll_every=0.05,
                    on_decision=lambda ident, decision: received.append((ident, decision)))
    register(sink, "ops")
    sink.ingest("ops", points([("loss", s) for s in range(5)]))
    assert sink.flush(60)
    collector.post("/api/v1/runs/ops/decisions", {"action": {"phase": 2, "alpha": 0.2}, "step": 3})
    wait_until(lambda: received, what="the operator decision")
    requests = sink.stats.requests
    wait_until(lambda: sink.stats.requests >= requests + 5, what="more polls")  # redelivered every poll
    assert len(received) == 1
    ident, decision = received[0]
    assert decision.action == {"phase": 2, "alpha": 0.2} and decision.step == 3 and decision.source == "operator"

    collector.kill()
    sink.ingest("ops", [], acks=[(ident, 7)])
    sink.close(timeout=1)  # the ack cannot go: it stays in the spool

    collector.start()
    again = []
    resumed = HttpSink(collector.url, "ops", spool_dir=spool, poll_every=0.05,
                       on_decision=lambda i, d: again.append(i))
    assert resumed.flush(60)
    requests = resumed.stats.requests
    wait_until(lambda: resumed.stats.requests >= requests + 3, what="polls after the replay")
    resumed.close()
    assert again == []
    (row,) = collector.store().decisions("ops")
    assert row.applied_step == 7



def test_a_probe_goes_at_once_and_is_answered_after_its_decision(collector, tmp_path):
    """A write holding a goodness point is sent without waiting for ``linger``; once the collector
    has answered it, its decision is handed over first and then the probe's step is answered."""
    events = []
    sink = HttpSink(collector.url, "probes", spool_dir=tmp_path / "spool", linger=600.0, poll_every=600.0,
                    on_decision=lambda ident, decision: events.append(("decision", ident, decision.apply_at)),
                    on_answer=lambda steps: events.append(("answer", steps)))
    sink.put_run("probes", config={}, policy={"threshold": 0.5, "consecutive": 1, "lag": 4})
    sink.ingest("probes", points([("loss", 1), ("loss", 2)]))
    sink.ingest("probes", points([("goodness", 3)], value=lambda m, s: 0.9))
    wait_until(lambda: len(events) >= 2, timeout=30, what="the probe's answer")
    assert events == [("decision", "probes:policy:3", 8), ("answer", [3])]
    sink.close()


def test_a_decision_the_sink_cannot_read_is_acknowledged_as_rejected(collector, tmp_path):
    """A pending decision whose action the decision type refuses (written straight into the
    database, as no API accepts one) is not left pending: the agent's sink acknowledges it as
    rejected, with the reason."""
    import json
    import sqlite3

    sink = HttpSink(collector.url, "garbled", spool_dir=tmp_path / "spool", poll_every=0.05,
                    on_decision=lambda ident, decision: None)
    register(sink, "garbled")
    sink.ingest("garbled", points([("loss", 1)]))
    assert sink.flush(60)
    path = collector.db.removeprefix("sqlite:///")
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO decisions (id, run_id, step, source, issued_by, action, created_at) "
                     "SELECT 'garbled:operator:1', id, 1, 'operator', 'ops', ?, 1 FROM runs WHERE name = 'garbled'",
                     (json.dumps({"phase": 2, "alpha": 5}),))
    wait_until(lambda: collector.store().decisions("garbled")[0].status == "rejected", timeout=60,
               what="the rejection")
    sink.close()
    (decision,) = collector.store().decisions("garbled")
    assert decision.applied_step == 1 and decision.rejected.startswith("malformed decision:") and "alpha" in decision.rejected

def test_spool_segments_rotate_and_a_torn_last_line_is_skipped(tmp_path):
    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=200)
    envelopes = [{"kind": "batch", "id": f"b{i}", "body": {"points": [["loss", i, 1.0, 0.0]]}, "points": 1}
                 for i in range(10)]
    assert spool.append(envelopes) == []
    spool.close()
    segments = sorted(tmp_path.glob("*.seg"))
    assert len(segments) > 1
    with open(segments[-1], "ab") as f:
        f.write(b'{"kind": "batch", "id": "torn"')  # a crash in the middle of a write
    reopened = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=200)
    assert reopened.leftover
    seen = []
    while reopened.peek() is not None:
        seen.append(reopened.peek()["id"])
        reopened.pop()
    assert seen == [f"b{i}" for i in range(10)] and reopened.skipped_lines == 1
    assert not list(tmp_path.glob("*.seg")) and not reopened


def test_token_from_the_environment_and_a_wrong_token_keeps_the_data(tmp_path, monkeypatch, caplog):
    """With auth on, $MOXCO_TOKEN is sent as a bearer token; a refused token (401) is an error in
    the log with the server's message, and the points stay in the spool for an agent with the
    right token, instead of being dropped."""
    collector = CollectorProcess.in_directory(tmp_path, auth=True)
    _, secret = collector.store().create_token("trainer", ["ingest"])
    collector.start()
    try:
        spool = tmp_path / "spool"
        monkeypatch.setenv("MOXCO_TOKEN", "mox_wrong")
        with caplog.at_level(logging.ERROR, logger="moxco.agent.transport"):
            wrong = HttpSink(collector.url, "authed", spool_dir=spool, max_backoff=0.2)
            register(wrong, "authed")
            wrong.ingest("authed", points([("loss", s) for s in range(100)]))
            wait_until(lambda: wrong.stats.points_spooled == 100, what="the refused points to be spooled")
            wrong.close(timeout=1)
        assert wrong.stats.points_sent == 0 and wrong.stats.points_dropped == 0
        assert any("401" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)

        monkeypatch.setenv("MOXCO_TOKEN", secret)
        right = HttpSink(collector.url, "authed", spool_dir=spool)
        right.ingest("authed", points([("loss", s) for s in range(100, 150)]))
        assert right.flush(60)
        right.close()
        np.testing.assert_array_equal(collector.store().series("authed", "loss")[0], np.arange(150))
    finally:
        collector.stop()


# --- the agent over HTTP -----------------------------------------------------------------------------


class SocketSpy:
    """Records which threads touch sockets (connect, send, receive) while ``watching`` is set."""

    def __init__(self, monkeypatch) -> None:
        self.threads = Counter()
        self.watching = False
        for name in ("connect", "connect_ex", "sendall", "send", "recv", "recv_into"):
            original = getattr(socket.socket, name)

            def spy(sock, *args, _original=original, **kwargs):
                if self.watching:
                    self.threads[threading.current_thread().name] += 1
                return _original(sock, *args, **kwargs)

            monkeypatch.setattr(socket.socket, name, spy)


def demo_job(url, run, tmp_path, policy=None, reeval_every=1, sharpness_iters=10, start_step=0, decisions=None,
             decision_timeout=5.0, resume=False, **transport):
    """agent/demo.py's job: MoXCo on a teacher-student regression that reaches the goodness threshold
    (its policy fires at the probe of step 60)."""
    model, inputs, targets = make_task(0)
    opt = MoXCo(model.parameters(), torch.optim.SGD, lr=0.05, alpha=0.9, beta=0.5, seed=0)
    criterion = nn.MSELoss()
    agent = moxco.agent.attach(
        model, opt, url=url, run=run, reeval_every=reeval_every, probe_every=10, criterion=criterion,
        sharpness_iters=sharpness_iters, seed=0, start_step=start_step, resume=resume,
        goodness={"tau": 1.0, "loss_target": NOISE_STD**2, "form": "eos"},
        policy=policy or {"threshold": 0.9, "consecutive": 3, "min_step": 50},
        decisions=decisions, decision_timeout=decision_timeout,
        transport={"spool_dir": tmp_path / "spool", **transport})
    gen = torch.Generator().manual_seed(2)

    def step():
        index = torch.randint(0, inputs.shape[0], (96,), generator=gen)
        criterion(model(inputs[index]), targets[index]).backward()
        opt.step()
        opt.zero_grad()

    return agent, opt, step


def spy_on_writes(sink: HttpSink) -> Counter:
    """Count every (metric, step) the agent hands to the sink (observing, not replacing it)."""
    sent = Counter()
    original = sink.ingest

    def ingest(name, batch, **kwargs):
        batch = list(batch)
        sent.update((p.metric, p.step) for p in batch)
        return original(name, batch, **kwargs)

    sink.ingest = ingest
    return sent


def test_end_to_end_the_collector_decides_and_the_agent_commits_at_a_step_boundary(collector, tmp_path):
    agent, opt, step = demo_job(collector.url, "e2e", tmp_path, linger=0.05)
    assert isinstance(agent.store, HttpSink)  # the policy runs in the collector (checked below)
    commits = []
    original_commit = opt.commit
    opt.commit = lambda **kw: (commits.append((agent.step, kw)), original_commit(**kw))[1]
    # The job trains until the collector's decision has come back and been applied. A step takes
    # a few milliseconds here, so a run bounded in steps could end inside one batching window
    # (the writer's 0.25 s, the sender's linger) with its decision still on the wire: the bound
    # is on time instead, generous, and the steps are paced like a real job's.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        step()
        time.sleep(0.002)
        if commits and agent.store.pending == 0 and agent.step > commits[0][0] + 50:
            break
    agent.close()
    assert agent.errors == {}

    assert len(commits) == 1, "a decision id is applied once, however often it is redelivered"
    applied_at, kwargs = commits[0]
    assert kwargs == {"alpha": 0.1, "beta": 0.1} and opt.phase == 2
    store = collector.store()
    # the run was registered with the agent's policy, and the collector's ingest decided with it
    assert store.run("e2e").policy == {**PolicyConfig().to_dict(), "threshold": 0.9, "consecutive": 3, "min_step": 50}
    (decision,) = store.decisions("e2e")
    assert decision.source == "policy" and decision.goodness >= 0.9
    assert decision.applied_step == applied_at > decision.step  # applied at a later step boundary
    assert opt.hyperparameters()["committed_at"] == decision.applied_step
    phase_steps, phase = store.series("e2e", "phase")
    assert phase[phase_steps < decision.applied_step].max() == 1.0 and phase[-1] == 2.0
    steps, alpha = store.series("e2e", "alpha")
    assert alpha[steps > decision.applied_step].max() == pytest.approx(0.1)
    assert store.run("e2e").status == "finished"
    assert [d.to_json() for d in agent.decisions()] == [decision.to_json()]  # read back over HTTP: the same


def test_agent_decisions_are_the_same_decision_objects_in_embedded_and_http_mode(collector, tmp_path):
    """An embedded job (its own store file, the same store code deciding on ingest) takes and
    applies a decision; then an agent attached to that run in embedded mode and one attached over
    HTTP (a collector serving the file) answer ``decisions()`` with the same ``Decision`` objects:
    same type, every field equal, cause and acknowledgement included."""
    import dataclasses

    from moxco.decision import Decision

    model, inputs, targets = make_task(0)
    opt = MoXCo(model.parameters(), torch.optim.SGD, lr=0.05, alpha=0.9, beta=0.5, seed=0)
    criterion = nn.MSELoss()
    job = moxco.agent.attach(model, opt, url=collector.db, run="modes", reeval_every=1, probe_every=10,
                             criterion=criterion, sharpness_iters=10, seed=0,
                             goodness={"tau": 1.0, "loss_target": NOISE_STD**2, "form": "eos"},
                             policy={"threshold": 0.9, "consecutive": 3, "min_step": 50})
    gen = torch.Generator().manual_seed(2)
    deadline = time.monotonic() + 120
    while opt.phase == 1 and time.monotonic() < deadline:
        index = torch.randint(0, inputs.shape[0], (96,), generator=gen)
        criterion(model(inputs[index]), targets[index]).backward()
        opt.step()
        opt.zero_grad()
    job.close()
    assert opt.phase == 2 and job.errors == {}

    readers = []
    for url in (collector.db, collector.url):
        probe = nn.Linear(2, 1)
        readers.append(moxco.agent.attach(probe, torch.optim.SGD(probe.parameters(), lr=0.1), url=url, run="modes",
                                          resume="must", reeval_every=0, probe_every=0,
                                          transport={"spool_dir": tmp_path / "spool"}
                                          if url.startswith("http") else None))
    try:
        embedded, http = (reader.decisions() for reader in readers)
    finally:
        for reader in readers:
            reader.close()
    assert isinstance(readers[1].store, HttpSink) and not isinstance(readers[0].store, HttpSink)
    (decision,) = embedded
    assert len(http) == 1 and type(http[0]) is type(decision) is Decision
    for field in dataclasses.fields(Decision):
        a, b = getattr(decision, field.name), getattr(http[0], field.name)
        assert a == b or (a != a and b != b), field.name  # NaN (not measured) on both sides
    assert http[0].to_json() == decision.to_json()
    assert decision.run == "modes" and decision.source == decision.issued_by == "policy"
    assert decision.policy["threshold"] == 0.9 and decision.goodness >= 0.9 and decision.status == "applied"
    assert decision.applied_step > decision.step


def test_collector_killed_and_restarted_mid_run_the_job_never_waits_and_nothing_is_lost(collector, tmp_path,
                                                                                       monkeypatch):
    spy = SocketSpy(monkeypatch)
    agent, opt, step = demo_job(collector.url, "chaos", tmp_path, max_backoff=0.5, reeval_every=3, sharpness_iters=1,
                                policy={"threshold": 1.0, "min_step": 10**9})  # no decisions: points only
    sink = agent.store
    sent = spy_on_writes(sink)
    training = threading.current_thread().name

    def steps(n):  # sockets touched while a training step runs are attributed to their thread
        for _ in range(n):
            spy.watching = True
            try:
                step()
            finally:
                spy.watching = False

    steps(60)
    wait_until(lambda: sink.stats.points_sent > 0, what="the first batches")

    collector.kill()
    steps(60)
    wait_until(lambda: sink.stats.failed_requests > 0 and sink.stats.points_spooled > 0,
               what="the sender to notice the collector is gone and spool")
    steps(60)  # still down: the spool grows, the job goes on
    spooled_while_down = sink.stats.points_spooled

    collector.start()  # same port, same store
    steps(60)
    assert spy.threads[training] == 0, f"a training step touched a socket: {spy.threads}"
    agent.close()

    assert agent.errors == {} and agent.step == 240
    assert agent.writer.dropped == 0  # the writer never fell behind: it never waited on the network
    assert sink.stats.points_dropped == 0 and sink.stats.points_rejected == 0
    assert spooled_while_down > 0
    store = collector.store()
    got = Counter()
    for metric in {m for m, _ in sent}:
        steps, _ = store.series("chaos", metric)
        got.update((metric, int(s)) for s in steps)
    assert got == sent  # every point the agent produced is stored, once
    assert max(sent.values()) == 1
    assert not list((tmp_path / "spool").glob("*.seg"))
    assert store.run("chaos").status == "finished"


# --- decisions="sync" over HTTP: applied at the step the configuration fixes ---------------------------


def test_sync_decisions_over_http_three_runs_with_one_seed_are_the_same_run(collector, tmp_path):
    """With ``decisions="sync"`` the job waits, at the probe's ``apply_at``, for the collector's
    answer: three runs of one seed (batching windows from 0.05 to 2 s) apply the decision at the same
    step and store the same series; the default over HTTP stays asynchronous."""
    runs = {}
    for run, linger in (("sync-a", 0.05), ("sync-b", 0.5), ("sync-c", 2.0)):
        agent, opt, step = demo_job(collector.url, run, tmp_path / run, decisions="sync", linger=linger)
        after = []
        for _ in range(75):
            step()
            after.append(torch.cat([p.detach().reshape(-1).clone() for p in opt.param_groups[0]["params"]]))
        agent.close()
        assert agent.errors == {} and opt.phase == 2
        assert agent.inbox.stats.timeouts == 0 and agent.inbox.stats.late == 0
        runs[run] = after
    store = collector.store()
    reference = {m: store.series("sync-a", m) for m in store.metrics("sync-a")}
    for run, after in runs.items():
        (decision,) = store.decisions(run)
        assert (decision.step, decision.apply_at, decision.applied_step) == (60, 63, 63)
        assert store.run(run).config["decisions"]["mode"] == "sync"
        assert store.metrics(run) == sorted(reference)
        for metric, (steps, values) in reference.items():
            got_steps, got_values = store.series(run, metric)
            assert np.array_equal(got_steps, steps), metric
            if metric not in needing("clock"):  # (step time and throughput differ from run to run)
                assert np.array_equal(got_values, values, equal_nan=True), metric
        assert all(torch.equal(a, b) for a, b in zip(after, runs["sync-a"]))

    probe = nn.Linear(2, 1)
    default = moxco.agent.attach(probe, torch.optim.SGD(probe.parameters(), lr=0.1), url=collector.url,
                                 run="default-mode", transport={"spool_dir": tmp_path / "spool-default"})
    default.close()
    assert default.inbox.mode == "async"


def test_sync_decisions_with_the_collector_stopped_during_a_probe_wait_at_most_the_timeout(collector, tmp_path):
    """The collector is killed before the probe whose goodness fires the policy (step 60, due at 63):
    the job waits at that boundary at most ``decision_timeout``, records the timeout, does not wait
    again while the collector is away, and goes on; once it is back the spool is replayed, the
    collector decides, and the decision is applied at the next boundary, late, with the lateness
    stored (``apply_at`` against ``applied_step``, and the run's ``config.decisions``). Nothing is lost."""
    timeout = 1.0
    agent, opt, step = demo_job(collector.url, "outage", tmp_path, decisions="sync", decision_timeout=timeout,
                                max_backoff=0.5, linger=0.05)
    sink = agent.store
    sent = spy_on_writes(sink)
    durations = {}

    def timed_steps(n):
        for _ in range(n):
            at = agent.step
            start = time.perf_counter()
            step()
            durations[at] = time.perf_counter() - start

    timed_steps(55)
    assert sink.flush(30)
    collector.kill()
    timed_steps(20)  # the probes of steps 60 and 70 while the collector is away
    stats = agent.inbox.stats
    assert (stats.timeouts, stats.skipped) == (1, 1)  # (and any short waits for answers that came)
    assert timeout <= stats.max_wait_seconds <= timeout + 2.0
    assert durations[62] < timeout + 5.0  # the step whose post-hook is the boundary 63: one bounded wait
    assert opt.phase == 1

    collector.start()
    deadline = time.monotonic() + 120
    while opt.phase == 1 and time.monotonic() < deadline:
        timed_steps(1)
        time.sleep(0.01)
    applied = agent.step
    timed_steps(10)
    agent.close()
    assert opt.phase == 2 and agent.errors == {}
    assert stats.late == 1 and stats.max_lateness == applied - 63 > 0

    store = collector.store()
    (decision,) = store.decisions("outage")
    assert (decision.step, decision.apply_at, decision.applied_step) == (60, 63, applied)
    assert decision.lateness == applied - 63
    recorded = store.run("outage").config["decisions"]
    assert (recorded["mode"], recorded["timeouts"], recorded["late"]) == ("sync", 1, 1)
    verdict = reproducibility(store.run("outage").config, store.decisions("outage"))
    assert verdict["reproducible"] is False and "timed out" in verdict["reason"]
    # nothing lost: every point the agent produced is stored, once
    assert sink.stats.points_dropped == 0 and sink.stats.points_rejected == 0
    got = Counter()
    for metric in {m for m, _ in sent}:
        steps, _ = store.series("outage", metric)
        got.update((metric, int(s)) for s in steps)
    assert got == sent and max(sent.values()) == 1
