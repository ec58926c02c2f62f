"""Load: N simulated agents against one collector — held throughput, the knee, memory over a soak.

    .venv/bin/python bench/load.py [--quick] [--soak-seconds 600] [--agents 1 2 4 8 16 32]
                                   [--backends postgresql sqlite] [--out FILE] [--write-docs]

For each backend (PostgreSQL: ``moxco serve --workers 2``; SQLite: ``--workers 1``) and each number
of agents N (stepped up: 1, 2, 4, 8, 16, 32), N agent processes (loopback only; at most
``MAX_AGENTS``, each bounded to its step's seconds) register a run each and send batches of 1,000
points (5 metrics × 200 steps, batch ids, keep-alive HTTP) on a schedule of ``--rate`` batches/s
each, each agent at its own random phase (an agent that falls behind sends the due batches back to
back: the offered load is N × rate × 1,000 points/s). Latency is counted from each batch's
scheduled time (``ingest.paced_batches``), so a stalled answer delays, and shows in, the batches
behind it. Per N: points/s stored, p50/p99 latency per batch, errors (failed or never sent). Reported: the highest points/s held with p99 <
50 ms (DESIGN §6), and the knee: the first N whose p99 reaches 50 ms or whose points/s falls below
95 % of the offered load.

Soak (``--soak-seconds``, default 600; ``--quick``: 60 s steps of 3 s): ``--soak-agents`` agents at
``--soak-rate`` plus one dashboard reader (every second: a 2,000-point minmax series of a run,
its latest values, ``/metrics``) against a fresh collector; the RSS of all collector processes
(uvicorn parent and workers, via psutil) sampled every 2 s. Bound: after warm-up (the first 20 %
of the soak, at least 30 s) the RSS may not grow more than ``--rss-bound-mib`` (default 64 MiB);
the report says held/exceeded with the figures.

PostgreSQL is a private cluster started here (Debian ``postgresql``, fsync on, default
``synchronous_commit``), as in bench/ingest.py. The agents share the machine's cores with the
collector and the database: on a small machine the figures are a lower bound for the server.
"""

from __future__ import annotations

import argparse
import http.client
import multiprocessing as mp
import os
import platform
import random
import signal
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchkit import ROOT, add_write_docs, write_section  # noqa: E402  (same folder)
from ingest import paced_batches, serve, start_postgres  # noqa: E402  (same folder)

DOC = ROOT / "docs" / "benchmarks-collector.md"
HEADING = "## Load (bench/load.py)"

REPO = Path(__file__).resolve().parents[1]
BATCH = 1000
MAX_AGENTS = 64
P99_TARGET_MS = 50.0
METRICS = ["loss", "grad_norm_sq", "update_norm", "inst_gap", "inst_smooth"]


def agent(port: int, run: str, seconds: float, rate: float, sync, out) -> None:
    """One simulated agent: register ``run``, then batches on a schedule of ``rate``/s for
    ``seconds`` (``ingest.paced_batches``: latency from each batch's scheduled time)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Content-Type": "application/json"}
    conn.request("PUT", f"/api/v1/runs/{run}", body=b"{}", headers=headers)
    conn.getresponse().read()
    per_metric = BATCH // len(METRICS)
    ready, go = sync
    ready.put(1)
    start_at = go.get()
    # agents are not in lock step: each starts at its own phase within the first interval
    phase = random.Random(run).uniform(0.0, 1.0 / rate)
    r = paced_batches(conn, port, run, METRICS, per_metric, rate, start_at, seconds, phase)
    out.put((r["sent"], r["latencies"], max(r["elapsed"], seconds), r["failed"] + r["missed"]))


def drive(port: int, tag: str, agents: int, seconds: float, rate: float) -> dict:
    if not 1 <= agents <= MAX_AGENTS:
        raise SystemExit(f"agents must be 1..{MAX_AGENTS}")
    ctx = mp.get_context("spawn")
    out, ready, go = ctx.Queue(), ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=agent, args=(port, f"{tag}-{a}", seconds, rate, (ready, go), out), daemon=True)
             for a in range(agents)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=300)
    start_at = time.time() + 0.3
    for _ in procs:
        go.put(start_at)
    results = [out.get(timeout=seconds + 300) for _ in procs]
    for p in procs:
        p.join(30)
        if p.is_alive():
            p.kill()
    points = sum(r[0] for r in results)
    elapsed = max(seconds, max(r[2] for r in results))  # the window, or longer when answers ran late
    lat = np.concatenate([r[1] for r in results]) * 1000
    offered = agents * rate * BATCH
    return {"agents": agents, "offered": offered, "points_s": points / elapsed,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "batches": int(lat.size), "errors": int(sum(r[3] for r in results))}


def collector_rss(proc) -> int:
    import psutil

    try:
        root = psutil.Process(proc.pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def reader(port: int, run: str, stop: threading.Event, counts: dict) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    while not stop.wait(1.0):
        for path in (f"/api/v1/runs/{run}/series/loss?max_points=2000", f"/api/v1/runs/{run}/latest", "/metrics"):
            try:
                conn.request("GET", path)
                response = conn.getresponse()
                response.read()
                counts[response.status] = counts.get(response.status, 0) + 1
            except (OSError, http.client.HTTPException):
                counts["error"] = counts.get("error", 0) + 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)


def soak(port: int, proc, backend: str, seconds: float, agents: int, rate: float, bound_mib: float) -> dict:
    samples: list = []
    stop = threading.Event()
    counts: dict = {}

    def sample():
        t0 = time.time()
        while not stop.wait(2.0):
            samples.append((time.time() - t0, collector_rss(proc)))

    tag = f"soak-{backend}-{time.time_ns()}"
    sampler = threading.Thread(target=sample, daemon=True)
    read = threading.Thread(target=reader, args=(port, f"{tag}-0", stop, counts), daemon=True)
    sampler.start()
    read.start()
    try:
        load = drive(port, tag, agents, seconds, rate)
    finally:
        stop.set()
        sampler.join(5)
        read.join(65)
    warm = max(30.0, 0.2 * seconds)
    after = [rss for t, rss in samples if t >= warm] or [samples[-1][1]]
    base = after[0]
    growth = (max(after) - base) / 2**20
    return {"backend": backend, "seconds": seconds, "agents": agents, "rate": rate, **load,
            "rss_start_mib": samples[0][1] / 2**20 if samples else 0.0, "rss_warm_mib": base / 2**20,
            "rss_max_mib": max(rss for _t, rss in samples) / 2**20, "rss_end_mib": samples[-1][1] / 2**20,
            "growth_mib": growth, "bound_mib": bound_mib, "held": growth <= bound_mib, "reads": counts}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--rate", type=float, default=5.0, help="batches of 1,000 points per second per agent")
    parser.add_argument("--step-seconds", type=float, default=10.0)
    parser.add_argument("--soak-seconds", type=float, default=600.0)
    parser.add_argument("--soak-agents", type=int, default=4)
    parser.add_argument("--soak-rate", type=float, default=2.0)
    parser.add_argument("--soak-backends", nargs="*", default=["postgresql"])
    parser.add_argument("--rss-bound-mib", type=float, default=64.0)
    parser.add_argument("--backends", nargs="+", default=["postgresql", "sqlite"])
    parser.add_argument("--quick", action="store_true", help="3 s steps, 60 s soak")
    parser.add_argument("--out", default=None, help="write the Load section into this Markdown file")
    add_write_docs(parser, DOC, "the Load section")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop servers and PostgreSQL on the way out
    if args.quick:
        args.step_seconds, args.soak_seconds = 3.0, min(args.soak_seconds, 60.0)
    workers = {"postgresql": 2, "sqlite": 1}
    tmp = Path(tempfile.mkdtemp(prefix="moxco-load-"))
    pg_root = Path(tempfile.mkdtemp(prefix="moxco-load-pg-"))
    pg_url, pg_stop = start_postgres(pg_root)
    steps, soaks = [], []
    load_before = os.getloadavg()
    try:
        for backend in args.backends:
            url = pg_url if backend == "postgresql" else f"sqlite:///{tmp / 'moxco.db'}"
            port, proc = serve(url, workers[backend], tmp)
            try:
                for n in args.agents:
                    row = {"backend": backend, "workers": workers[backend], "load1": os.getloadavg()[0],
                           **drive(port, f"{backend}-{n}-{time.time_ns()}", n, args.step_seconds, args.rate),
                           "rss_mib": collector_rss(proc) / 2**20}
                    steps.append(row)
                    print(row, flush=True)
            finally:
                proc.terminate()
                proc.wait(30)
        for backend in args.soak_backends if args.soak_seconds > 0 else ():
            url = pg_url if backend == "postgresql" else f"sqlite:///{tmp / 'soak.db'}"
            port, proc = serve(url, workers[backend], tmp)
            try:
                soaks.append(soak(port, proc, backend, args.soak_seconds, args.soak_agents, args.soak_rate,
                                  args.rss_bound_mib))
                print(soaks[-1], flush=True)
            finally:
                proc.terminate()
                proc.wait(30)
    finally:
        subprocess.run(pg_stop, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(pg_root, ignore_errors=True)
    text = report(args, steps, soaks, load_before)
    print(text)
    for path in [Path(args.out)] * bool(args.out) + [DOC] * args.write_docs:
        write_section(path, text, HEADING)
    return 0


def summarise(rows: list) -> dict:
    held = [r for r in rows if r["p99_ms"] < P99_TARGET_MS and not r["errors"]]
    knee = next((r for r in rows if r["p99_ms"] >= P99_TARGET_MS or r["points_s"] < 0.95 * r["offered"]), None)
    return {"held": max(held, key=lambda r: r["points_s"]) if held else None, "knee": knee}


def report(args, steps: list, soaks: list, load_before) -> str:
    lines = [HEADING, "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores shared by the agents, the collector and "
             f"PostgreSQL; load average before the run {load_before[0]:.1f}. Agents: separate processes, one run "
             f"each, batches of {BATCH} points on a schedule of {args.rate:g} batches/s per agent ({args.rate * BATCH:,.0f} "
             f"points/s offered per agent; latency from each batch's scheduled time), {args.step_seconds:g} s per step. Collector: PostgreSQL with 2 workers, "
             "SQLite with 1. Regenerate with `.venv/bin/python bench/load.py --write-docs`.",
             "", "| backend | agents | offered points/s | stored points/s | p50 ms | p99 ms | errors | collector RSS MiB | load1 |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in steps:
        lines.append(f"| {r['backend']} ({r['workers']} w) | {r['agents']} | {r['offered']:,.0f} | {r['points_s']:,.0f} | "
                     f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} | {r['rss_mib']:.0f} | {r['load1']:.1f} |")
    lines.append("")
    for backend in dict.fromkeys(r["backend"] for r in steps):
        s = summarise([r for r in steps if r["backend"] == backend])
        held = (f"{s['held']['points_s']:,.0f} points/s held with p99 {s['held']['p99_ms']:.1f} ms "
                f"({s['held']['agents']} agents)") if s["held"] else "no step held p99 < 50 ms"
        knee = (f"knee at {s['knee']['agents']} agents (p99 {s['knee']['p99_ms']:.0f} ms, "
                f"{s['knee']['points_s']:,.0f} of {s['knee']['offered']:,.0f} points/s offered)") if s["knee"] \
            else "no knee up to the largest step"
        lines.append(f"* **{backend}**: {held}; {knee}.")
    for s in soaks:
        lines += ["", f"Soak ({s['backend']}, {s['seconds']:g} s, {s['agents']} agents × {s['rate'] * BATCH:,.0f} "
                  f"points/s + a dashboard reader every second): {s['points_s']:,.0f} points/s stored, p99 "
                  f"{s['p99_ms']:.1f} ms, {s['errors']} errors; reads {s['reads']}. Collector RSS (all processes): "
                  f"{s['rss_start_mib']:.0f} MiB at start, {s['rss_warm_mib']:.0f} MiB after warm-up, max "
                  f"{s['rss_max_mib']:.0f}, end {s['rss_end_mib']:.0f}: growth after warm-up {s['growth_mib']:.1f} MiB, "
                  f"bound {s['bound_mib']:g} MiB: **{'held' if s['held'] else 'EXCEEDED'}**."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
