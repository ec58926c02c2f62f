"""A long collector outage, measured from outside (``test_agent_robustness`` runs it as a process).

``python -m tests.reliability.spool_memory_job SPOOL_DIR POINTS CAP_BYTES`` writes POINTS points
(30 metrics a step, like a run with every metric group on) to an ``HttpSink`` whose collector
never answers (nothing listens on its port), and prints one JSON line: the process's RSS after
the first 5 % of the points and at the end, the points held in memory then, the sink's counters
after ``close`` (which spools what was still in memory), and the bytes on disk.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
from pathlib import Path

from moxco.agent.transport import HttpSink
from moxco.wire import Point

METRICS = [f"m{i:02d}" for i in range(30)]


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    spool, total, cap = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    warnings = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("moxco.agent.transport").addHandler(handler)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: connection refused from now on
    sink = HttpSink(f"http://127.0.0.1:{port}", "outage", spool_dir=spool, spool_max_bytes=cap,
                    max_memory_points=50_000, max_backoff=2.0)
    sink.put_run("outage", policy=None)
    warm, written, step = None, 0, 0
    while written < total:
        sink.ingest("outage", [Point(step, m, 0.5 * step, 1.7e9 + step) for m in METRICS])
        written += len(METRICS)
        step += 1
        if warm is None and written >= total // 20:
            warm = rss_bytes()
    end = rss_bytes()
    stats = sink.stats
    on_disk = sum(p.stat().st_size for p in Path(spool).glob("*.seg"))
    in_memory = sink._memory_points
    sink.close(timeout=0.5)
    print(json.dumps({"rss_warm": warm, "rss_end": end, "enqueued": stats.points_enqueued,
                      "spooled": stats.points_spooled, "dropped": stats.points_dropped,
                      "in_memory": in_memory, "spool_bytes": on_disk,
                      "full_warnings": sum("is full" in w for w in warnings)}))


if __name__ == "__main__":
    main()
