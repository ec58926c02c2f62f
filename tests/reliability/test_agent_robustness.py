"""The agent in a hostile network: a collector that answers after 10 s, answers garbage (an
HTML page, a JSON array, a truncated body), or closes and resets connections; then a long outage
with a capped spool. The training job must never see an exception or wait on a socket, every
point must end up stored once when the collector is reachable again, and memory must stay bounded
while it is not.

The hostile server (``conftest.HostileServer``) is the agent's environment, not a fake collector:
in ``proxy`` and ``slow`` modes every request reaches the real ``moxco serve``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.figures import figure
from tests.reliability.test_faults import Job
from tests.servers import CollectorProcess, wait_until

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def test_the_agent_survives_a_slow_garbage_and_rude_collector(tmp_path, monkeypatch, hostile):
    collector = CollectorProcess.in_directory(tmp_path).start()
    network = hostile(collector.port, delay=10.0)
    try:
        # a 2 s request timeout (default 10 s) so the 10 s answers time out without a long test
        job = Job(network.url, "hostile", tmp_path, monkeypatch, timeout=2.0, poll_every=0.2)
        job.steps(30)
        wait_until(lambda: job.sink.stats.points_sent > 0, what="the first batches")
        met = {}
        for mode in ("slow", "garbage", "garbage_json", "truncated", "close", "reset"):
            network.mode = mode
            failed = job.sink.stats.failed_requests
            job.steps_until(lambda: job.sink.stats.failed_requests >= failed + 2, f"the agent meeting {mode!r}")
            met[mode] = job.sink.stats.failed_requests - failed
            job.steps(20)
        network.mode = "proxy"
        job.steps(40)
        job.agent.close()
        network.join()  # the held (slow) requests reach the collector late: stored once all the same
        assert job.sink.stats.points_spooled > 0
        job.account(collector.db, "collector answering in 10 s, HTML 200, JSON-array 200, truncated 200, "
                    "closed and reset connections; then normal",
                    hostile_requests=sum(v for k, v in network.requests.items() if k != "proxy"))
    finally:
        network.stop()
        collector.stop()


def test_memory_stays_bounded_through_a_long_outage_with_a_capped_spool(tmp_path):
    points, cap = 1_500_000, 16 << 20
    out = subprocess.run([sys.executable, "-m", "tests.reliability.spool_memory_job", str(tmp_path / "spool"),
                          str(points), str(cap)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    growth = r["rss_end"] - r["rss_warm"]
    figure("collector unreachable for 1.5 M points (50,000 steps × 30 metrics), spool capped at 16 MiB",
           points_sent=r["enqueued"], spooled=r["spooled"], dropped_and_counted=r["dropped"],
           spool_bytes=r["spool_bytes"], in_memory_points=r["in_memory"],
           rss_growth_MiB=round(growth / 2**20, 1), full_warnings=r["full_warnings"])
    # after close every point is on disk or dropped-and-counted; before it, at most max_memory_points in memory
    assert r["enqueued"] == points and r["spooled"] + r["dropped"] == points
    assert r["dropped"] > 0 and r["spool_bytes"] <= cap
    assert r["in_memory"] <= 50_000  # max_memory_points
    assert r["full_warnings"] == 1  # one clear warning, not one per batch
    assert growth < 64 << 20, f"RSS grew by {growth / 2**20:.1f} MiB after warm-up"
