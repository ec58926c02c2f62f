"""Fault tests: a real training job with the agent attached over HTTP to a real ``moxco serve``,
and something breaks mid-run. Each test ends with the same count (printed as a FIGURE line):
points the agent produced, points stored (must be equal), points stored twice (must be 0), and
training steps that touched a socket, i.e. waited on moxco (must be 0: a socket spy attributes
every connect/send/recv made while a training step runs to its thread).

The collector SIGKILLed on SQLite is ``tests/agent/test_transport.py``'s test (its figure is
printed there too); here it is killed on PostgreSQL, twice, each time while a batch request is in
flight, with one worker and with two (the supervisor and its workers SIGKILLed together).
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from moxco.collector import open_store
from tests.agent.test_transport import SocketSpy, demo_job, spy_on_writes
from tests.figures import figure
from tests.servers import CollectorProcess, wait_until

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
NO_DECISIONS = {"threshold": 1.0, "min_step": 10**9}


class Job:
    """demo_job's training loop with the socket spy and a count of every point handed to the sink."""

    def __init__(self, url: str, run: str, tmp_path: Path, monkeypatch, policy=None, start_step=0, resume=False,
                 **transport) -> None:
        self.run = run
        self.spy = SocketSpy(monkeypatch)
        transport = {"max_backoff": 0.5, "linger": 0.2, **transport}
        self.agent, self.opt, self._step = demo_job(url, run, tmp_path, reeval_every=3, sharpness_iters=1,
                                                    policy=policy or NO_DECISIONS, start_step=start_step,
                                                    resume=resume, **transport)
        self.sink = self.agent.store
        self.sent = spy_on_writes(self.sink)
        self.training = threading.current_thread().name

    def steps(self, n: int) -> None:
        for _ in range(n):
            self.spy.watching = True
            try:
                self._step()
            finally:
                self.spy.watching = False

    def steps_until(self, predicate, what: str, limit: int = 20000) -> None:
        """Train until ``predicate()`` (the sender works meanwhile); ``limit`` steps turn a hang into a failure."""
        for _ in range(limit):
            if predicate():
                return
            self.steps(1)
            time.sleep(0.002)
        raise AssertionError(f"{what} did not happen within {limit} steps")

    @property
    def waited(self) -> int:
        return self.spy.threads[self.training]

    def account(self, store_url: str, did: str, **extra) -> None:
        """Compare what the agent produced with what the store holds; print the figure; assert."""
        store = open_store(store_url)
        try:
            got = Counter()
            for metric in {m for m, _ in self.sent}:
                steps, _ = store.series(self.run, metric)
                got.update((metric, int(s)) for s in steps)
            status = store.run(self.run).status
        finally:
            store.close()
        produced = sum(self.sent.values())
        stored = sum(1 for key in self.sent if got[key])
        duplicated = sum(c - 1 for c in got.values()) + sum(c - 1 for c in self.sent.values()) + len(set(got) - set(self.sent))
        s = self.sink.stats
        figure(did, points_sent=produced, stored=stored, duplicated=duplicated, steps_waited=self.waited,
               failed_requests=s.failed_requests, points_spooled=s.points_spooled,
               retried_batches_found_stored=s.duplicate_batches, **extra)
        assert self.agent.errors == {}
        assert s.points_dropped == 0 and s.points_rejected == 0
        assert got == self.sent and duplicated == 0
        assert self.waited == 0, f"a training step touched a socket: {self.spy.threads}"
        assert status == "finished"


def kill_mid_batch(job: Job, collector: CollectorProcess) -> None:
    """SIGKILL the collector as soon as the sender starts a batch request."""
    started = threading.Event()
    client = job.sink._client
    original = client.request

    def request(method, path, body=None):
        if path.endswith("/batches"):
            started.set()
        return original(method, path, body)

    client.request = request
    try:
        job.steps_until(started.is_set, "a batch request")
        collector.kill()
    finally:
        client.request = original


@pytest.mark.parametrize("workers", [1, 2])
def test_collector_sigkilled_mid_ingest_on_postgresql_twice(workers, pg_cluster, tmp_path, monkeypatch):
    # workers=2: uvicorn's supervisor and both workers die at once (a container or node crash)
    db = f"{pg_cluster.server}/{pg_cluster.new_database()}"
    collector = CollectorProcess.in_directory(tmp_path, db, "--workers", str(workers)).start()
    try:
        job = Job(collector.url, "kill9", tmp_path, monkeypatch)
        job.steps(30)
        for _ in range(2):
            kill_mid_batch(job, collector)
            failed = job.sink.stats.failed_requests
            job.steps_until(lambda: job.sink.stats.failed_requests > failed and job.sink.stats.points_spooled > 0,
                            "the sender noticing the collector is gone")
            job.steps(30)
            collector.start()
            job.steps(30)
        job.agent.close()
        assert job.sink.stats.points_spooled > 0
        job.account(db, f"collector (PostgreSQL, {workers} worker{'s' if workers > 1 else ''}) SIGKILLed twice "
                    "mid-batch, restarted", kills=2)
    finally:
        collector.stop()


def test_postgresql_restarted_mid_ingest(pg_cluster, tmp_path, monkeypatch):
    name = pg_cluster.new_database()
    db = f"{pg_cluster.server}/{name}"
    collector = CollectorProcess.in_directory(tmp_path, db).start()
    try:
        job = Job(collector.url, "pg-restart", tmp_path, monkeypatch)
        job.steps(40)
        wait_until(lambda: job.sink.stats.points_sent > 0, what="the first batches")
        pg_cluster.stop("fast")  # the collector's pooled connections die with the server
        failed = job.sink.stats.failed_requests
        job.steps_until(lambda: job.sink.stats.failed_requests > failed, "the agent meeting the 503")
        r = httpx.post(f"{collector.url}/api/v1/runs/pg-restart/batches",
                       json={"batch_id": "probe", "points": []}, timeout=30)
        assert r.status_code == 503 and r.headers["Retry-After"].isdigit(), r.text
        assert r.json()["error"]["code"] == "store_unavailable"
        health = httpx.get(f"{collector.url}/healthz", timeout=30)
        assert health.status_code == 503 and health.json()["status"] == "unavailable"
        job.steps(40)
        pg_cluster.start()
        # the pool's connections are all dead: the first request on one must still succeed (retry)
        r = httpx.get(f"{collector.url}/api/v1/runs/pg-restart", timeout=30)
        assert r.status_code == 200, r.text
        job.steps(40)
        job.agent.close()
        saw_503 = job.sink.stats.failed_requests - failed
        assert "a pooled store connection was dead" in collector.log.read_text()  # found, retried on a fresh one
        job.account(db, "PostgreSQL stopped mid-ingest (503 + Retry-After), started again", agent_saw_503=saw_503)
    finally:
        collector.stop()


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode:  # like a missing PostgreSQL: the suite fails and says what it needs, never skips
        pytest.fail(f"cannot mount a 4 MB tmpfs to fill ({r.stderr.strip()}): the disk-full test needs root or "
                    "CAP_SYS_ADMIN (CI runs .ci/run as root)", pytrace=False)


@pytest.mark.parametrize("fault", ["sqlite-disk-full", "postgresql-read-only"])
def test_store_refuses_writes_agent_keeps_spooling_nothing_lost(fault, request, tmp_path, monkeypatch):
    volume = tmp_path / "vol"
    if fault == "sqlite-disk-full":
        _mount_tmpfs(volume, "4m")
        request.addfinalizer(lambda: subprocess.run(["umount", "-l", str(volume)], capture_output=True))
        db = f"sqlite:///{volume / 'runs.db'}"
    else:
        cluster = request.getfixturevalue("pg_cluster")
        name = cluster.new_database()
        db = f"{cluster.server}/{name}"
    collector = CollectorProcess.in_directory(tmp_path, db).start()
    try:
        job = Job(collector.url, "refused", tmp_path, monkeypatch)
        job.steps(30)
        wait_until(lambda: job.sink.stats.points_sent > 0, what="the first batches")
        failed = job.sink.stats.failed_requests
        if fault == "sqlite-disk-full":
            with open(volume / "ballast", "wb", buffering=0) as f:  # fill the volume to its last byte
                try:  # (unbuffered: nothing is left to flush, and fail, at close)
                    while True:
                        f.write(b"\0" * 65536)
                except OSError:
                    pass
            expected = (507, "store_full")
        else:
            cluster.admin(f"ALTER DATABASE {name} SET default_transaction_read_only = on")
            cluster.drop_connections(name)  # new sessions are read-only; the pool's old ones die
            expected = (503, "store_read_only")
        big = {"batch_id": "probe", "points": [["probe", s, 1.0, 1.0] for s in range(100_000)]}
        httpx.put(f"{collector.url}/api/v1/runs/probe", json={}, timeout=30)
        r = httpx.post(f"{collector.url}/api/v1/runs/probe/batches", json=big, timeout=60)
        if fault == "sqlite-disk-full" and r.status_code == 404:  # the probe run could not even be created
            r = httpx.put(f"{collector.url}/api/v1/runs/probe", json={}, timeout=30)
        assert (r.status_code, r.json()["error"]["code"]) == expected, r.text
        assert r.headers["Retry-After"].isdigit() and "nothing was stored" in r.json()["error"]["message"]
        assert httpx.get(f"{collector.url}/api/v1/runs/refused", timeout=30).status_code == 200  # reads still work
        job.steps_until(lambda: job.sink.stats.failed_requests > failed and job.sink.stats.points_spooled > 0,
                        "the agent meeting the refusal and spooling")
        job.steps(40)
        refused = job.sink.stats.failed_requests - failed
        # the operator fixes the store
        if fault == "sqlite-disk-full":
            (volume / "ballast").unlink()
        else:
            cluster.admin(f"ALTER DATABASE {name} SET default_transaction_read_only = off")
            cluster.drop_connections(name)
        job.steps(40)
        job.agent.close()
        what = ("SQLite volume full (507 store_full)" if fault == "sqlite-disk-full"
                else "PostgreSQL read-only (503 store_read_only)")
        job.account(db, f"{what} mid-ingest, then fixed", requests_refused=refused)
    finally:
        collector.stop()


def test_agent_killed_mid_run_acknowledged_points_durable_run_interrupted_and_resumed(tmp_path, monkeypatch):
    """SIGKILL the training process; every point of every batch the collector answered 2xx is
    stored; the collector's sweep marks the silent run ``interrupted``; a new process resumes the
    same run from an earlier checkpoint step: the series continues, the overlapping steps keep
    their first-written values (first write wins), nothing is stored twice."""
    collector = CollectorProcess.in_directory(tmp_path, None, "--stale-after", "1").start()
    spool, acked_log = tmp_path / "spool", tmp_path / "acked.jsonl"
    try:
        process = subprocess.Popen([sys.executable, "-m", "tests.reliability.agent_job", collector.url, "crash",
                                    str(spool), str(acked_log)], cwd=REPO, stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL, text=True)
        killed_at = None
        try:
            for line in process.stdout:
                step = int(line.split()[1])
                if step >= 120 and acked_log.exists() and acked_log.stat().st_size:
                    process.send_signal(signal.SIGKILL)
                    killed_at = step
                    break
        finally:
            process.kill()
            process.wait(30)
        assert killed_at is not None, "the job never got going"
        acked = {tuple(key) for line in acked_log.read_text().splitlines() if line.endswith("]")
                 for key in json.loads(line)}
        store = collector.store()

        def stored_keys():
            out = {}
            for metric in store.metrics("crash"):
                steps, values = store.series("crash", metric)
                out.update({(metric, int(s)): v for s, v in zip(steps.tolist(), values.tolist())})
            return out

        before = stored_keys()
        assert acked <= set(before), "a point the collector acknowledged is missing"
        wait_until(lambda: store.run("crash").status == "interrupted", 30, "the sweep to mark the run interrupted")

        # The job resumes from an earlier checkpoint, so steps overlap what is stored. The sender may
        # trail the training loop by many steps when the machine is busy: the checkpoint is taken
        # before the last stored step, and the resumed job runs past the killed one's last step.
        last_stored = max(step for _, step in before)
        checkpoint = max(0, min(killed_at - 60, last_stored - 10))
        resumed_steps = max(100, killed_at - checkpoint + 40)
        job_dir = tmp_path / "resumed"
        job_dir.mkdir()
        job = Job(collector.url, "crash", job_dir, monkeypatch, spool_dir=spool, start_step=checkpoint, resume=True)
        job.steps(resumed_steps)
        wait_until(lambda: job.sink.stats.points_sent > 0, what="the resumed run's first batch")
        wait_until(lambda: store.run("crash").status == "running", 30, "the resumed run to be running")
        job.agent.close()
        after = stored_keys()
        resumed = set(job.sent)
        overlap = resumed & set(before)
        assert overlap and resumed - set(before)
        assert set(after) >= set(before) | resumed  # nothing lost: old points, resumed points
        assert all(step <= killed_at for _, step in set(after) - set(before) - resumed)  # + the killed job's spool
        same = lambda a, b: a == b or (math.isnan(a) and math.isnan(b))
        assert all(same(after[k], before[k]) for k in before)  # first write wins on the overlap
        assert store.run("crash").status == "finished"
        steps, _ = store.series("crash", "loss")
        assert len(set(steps.tolist())) == steps.size and steps.max() == checkpoint + resumed_steps - 1
        assert job.waited == 0 and job.agent.errors == {} and max(job.sent.values()) == 1
        figure(f"agent SIGKILLed at step {killed_at}; run marked interrupted; resumed from step {checkpoint}",
               points_sent=len(acked), stored=len(acked & set(after)), duplicated=0, steps_waited=job.waited,
               note="sent = points in batches the collector acknowledged before the kill",
               resumed_points=len(resumed), resumed_overlap_ignored=len(overlap))
    finally:
        collector.stop()


def test_decision_sent_while_the_agent_is_offline_is_applied_exactly_once(tmp_path, monkeypatch, hostile):
    collector = CollectorProcess.in_directory(tmp_path).start()
    network = hostile(collector.port)  # the agent reaches the collector only through this link
    try:
        job = Job(network.url, "offline", tmp_path, monkeypatch, poll_every=0.2)
        commits = []
        original_commit = job.opt.commit
        job.opt.commit = lambda **kw: (commits.append((job.agent.step, kw)), original_commit(**kw))[1]
        job.steps(30)
        wait_until(lambda: job.sink.stats.points_sent > 0, what="the first batches")
        network.mode = "close"  # the agent's link is cut
        failed = job.sink.stats.failed_requests
        job.steps_until(lambda: job.sink.stats.failed_requests > failed and job.sink.stats.points_spooled > 0,
                        "the agent noticing it is offline and spooling")
        r = httpx.post(f"{collector.url}/api/v1/runs/offline/decisions",
                       json={"action": {"phase": 2, "alpha": 0.1, "beta": 0.1}, "reason": "operator, agent offline"})
        assert r.status_code == 201, r.text
        ident = r.json()["id"]
        job.steps(40)
        assert commits == []  # offline: it cannot have arrived
        network.mode = "proxy"
        job.steps_until(lambda: commits, "the decision to be applied")
        delivered_before_ack = job.sink.stats.decisions_received
        job.steps_until(lambda: open_store(collector.db).decisions("offline")[0].applied_step is not None,
                        "the acknowledgement")
        job.steps(60)
        job.agent.close()
        (row,) = open_store(collector.db).decisions("offline")
        assert row.id == ident and row.applied_step == commits[0][0]
        assert len(commits) == 1 and commits[0][1] == {"alpha": 0.1, "beta": 0.1} and job.opt.phase == 2
        assert delivered_before_ack == 1
        job.account(collector.db, "operator decision issued while the agent's link was cut; link restored",
                    decisions_applied=len(commits))
    finally:
        network.stop()
        collector.stop()
