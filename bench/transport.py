"""Throughput of the agent's HTTP transport (``agent.transport.HttpSink``) to a local collector.

Starts ``moxco serve`` on a temporary SQLite store (no auth, loopback), then writes ``--points``
points through one ``HttpSink`` the way the agent's writer does (``ingest`` calls of
``--chunk`` points: 12 metrics per step, steps in order), as fast as the caller can, and waits for
``flush``. Reports:

* sustained points/s: points over the time from the first write to the last batch acknowledged;
* the caller's cost: ``ingest`` latency per call (p50/p99/max) and per point. This is what
  the writer thread pays; the training thread never calls the sink;
* the sink's counters (batches, duplicates, spooled/dropped: all 0 on a healthy collector).

Run: ``.venv/bin/python bench/transport.py [--points 1000000] [--chunk 2000] [--batch-points 5000]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from moxco.agent.transport import HttpSink
from moxco.wire import Point

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.servers import CollectorProcess  # noqa: E402  (the repository's server helpers; no pytest needed)

METRICS = ("loss", "grad_norm_sq", "distance", "update_corr", "update_corr_rs", "update_norm", "loss_diff",
           "inst_gap", "inst_smooth", "avg_gap", "exp_gap", "max_smooth")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument("--chunk", type=int, default=2000, help="points per ingest call (the writer's flush)")
    parser.add_argument("--batch-points", type=int, default=5000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        server = CollectorProcess(f"sqlite:///{tmp}/bench.db", "--log-level", "warning", auth=False,
                                  log=Path(tmp) / "collector.log", timeout=60).start()
        try:
            sink = HttpSink(server.url, "bench", spool_dir=Path(tmp) / "spool", batch_points=args.batch_points,
                            max_memory_points=max(200_000, 4 * args.batch_points))
            sink.put_run("bench", policy=None)
            sink.flush(30)
            steps = args.points // len(METRICS)
            wall = 1.7e9
            calls = []
            started = time.perf_counter()
            chunk_steps = max(1, args.chunk // len(METRICS))
            for first in range(0, steps, chunk_steps):
                batch = [Point(s, m, 0.5 * s, wall + s) for s in range(first, min(steps, first + chunk_steps))
                         for m in METRICS]
                t = time.perf_counter()
                sink.ingest("bench", batch)
                calls.append(time.perf_counter() - t)
            enqueued = time.perf_counter() - started
            ok = sink.flush(600)
            delivered = time.perf_counter() - started
            sink.close()
        finally:
            server.stop()
            if server.output().strip():  # warnings and errors of the collector
                print(server.output(), file=sys.stderr, end="")

    n = sink.stats.points_sent
    lat = np.array(calls) * 1e3
    print(f"HttpSink → moxco serve (SQLite, loopback): {n} points in {delivered:.2f} s "
          f"= {n / delivered:,.0f} points/s sustained ({'all delivered' if ok else 'NOT all delivered'})")
    print(f"  enqueue side: {len(calls)} ingest calls of ~{args.chunk} points in {enqueued:.2f} s; "
          f"per call p50 {np.percentile(lat, 50):.2f} ms, p99 {np.percentile(lat, 99):.2f} ms, max {lat.max():.2f} ms "
          f"({1e6 * enqueued / max(n, 1):.2f} µs/point)")
    print(f"  stats: {asdict(sink.stats)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
