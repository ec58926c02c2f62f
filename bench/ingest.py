"""Collector ingest throughput and latency vs an MLflow tracking server, and the 1 M-point query.

    .venv/bin/python bench/ingest.py [--seconds 6] [--clients 1 8 32] [--out docs/benchmarks-collector.md]

For each backend (moxco on SQLite, moxco on PostgreSQL, MLflow on SQLite) and each number of
concurrent clients (separate processes, one run each), every client sends batches of 1,000 points
back to back for ``--seconds`` and records each request's latency. Reported: sustained points/s
(all clients), p50/p99 latency per batch, and moxco/MLflow ratios. moxco: ``moxco serve`` with
``--workers`` (default 2, like the MLflow server) and bodies pre-serialised JSON over keep-alive
HTTP. MLflow: ``mlflow server`` with a SQLite backend, ``MlflowClient.log_batch`` of 1,000
``Metric``s. Then a 1 M-point series is written and ``GET …/series/loss?max_points=2000`` timed
(first request of each of the fresh workers: cold; later ones: warm). ``minmax`` is served from
the block summaries (``series_blocks``), so cold and warm read the same ~1,000 rows.
PostgreSQL is a private cluster started here (Debian ``postgresql``), like the tests do.
"""

from __future__ import annotations

import argparse
import glob
import http.client
import json
import multiprocessing as mp
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BATCH = 1000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 90) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not come up")


def start_postgres(root: Path) -> tuple:
    bindir = Path(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))[-1]).parent
    port = free_port()
    run_as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if run_as:
        shutil.chown(root, "postgres")
    subprocess.run(run_as + [str(bindir / "initdb"), "-D", str(root / "data"), "-A", "trust", "-U", "moxco",
                             "--no-sync"], check=True, capture_output=True)
    options = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={root} -c max_connections=200"
    subprocess.run(run_as + [str(bindir / "pg_ctl"), "-D", str(root / "data"), "-o", options, "-l",
                             str(root / "log"), "-w", "start"], check=True, capture_output=True)
    stop = run_as + [str(bindir / "pg_ctl"), "-D", str(root / "data"), "-m", "fast", "stop"]
    return f"postgresql://moxco@127.0.0.1:{port}/postgres", stop


def wait_start(sync) -> float:
    """Report ready, then wait until the parent gives the common start time (every client has
    imported its libraries and connected before the measured window opens)."""
    ready, go = sync
    ready.put(1)
    return go.get()


def post_batch(conn: http.client.HTTPConnection, port: int, run: str, i: int, metrics, per_metric: int,
               now: float) -> tuple:
    """POST batch ``i`` of ``run`` (``per_metric`` steps of every metric): ``(ok, seconds, points,
    conn)``; a broken connection is replaced, so the caller always gets a usable one back."""
    points = [[m, i * per_metric + k, 0.5 + k * 1e-3, now] for m in metrics for k in range(per_metric)]
    body = json.dumps({"batch_id": f"{run}-{i}", "points": points}).encode()
    t0 = time.perf_counter()
    try:
        conn.request("POST", f"/api/v1/runs/{run}/batches", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        ok = response.status == 200
    except (OSError, http.client.HTTPException):
        conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        ok = False
    return ok, time.perf_counter() - t0, len(points), conn


def moxco_client(port: int, run: str, seconds: float, start_at: float, out) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("PUT", f"/api/v1/runs/{run}", body=b"{}", headers={"Content-Type": "application/json"})
    conn.getresponse().read()
    metrics = ["loss", "grad_norm_sq", "update_norm", "inst_gap", "inst_smooth"]
    per_metric = BATCH // len(metrics)
    start_at = wait_start(start_at)
    latencies, sent, i, failed = [], 0, 0, 0
    end = start_at + seconds
    while time.time() < end:
        ok, elapsed, n, conn = post_batch(conn, port, run, i, metrics, per_metric, time.time())
        latencies.append(elapsed)
        if ok:
            sent += n
        else:
            failed += 1
        i += 1
    out.put((sent, latencies, time.time() - start_at, failed))


def mlflow_client(uri: str, run: str, seconds: float, start_at: float, out) -> None:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(experiment_id="0", run_name=run).info.run_id
    metrics = ["loss", "grad_norm_sq", "update_norm", "inst_gap", "inst_smooth"]
    per_metric = BATCH // len(metrics)
    # warm-up outside the window: the first call imports and connects lazily
    client.log_batch(run_id, metrics=[Metric("warmup", 0.0, int(time.time() * 1000), 0)])
    start_at = wait_start(start_at)
    latencies, sent, i, failed = [], 0, 0, 0
    end = start_at + seconds
    while time.time() < end or not latencies:  # at least one batch, however slow
        now = int(time.time() * 1000)
        batch = [Metric(m, 0.5 + k * 1e-3, now, 1 + i * per_metric + k) for m in metrics for k in range(per_metric)]
        t0 = time.perf_counter()
        try:
            client.log_batch(run_id, metrics=batch)
            sent += len(batch)
        except Exception:  # MLflow refuses batches under load (e.g. its SQLAlchemy pool runs dry): counted
            failed += 1
        latencies.append(time.perf_counter() - t0)
        i += 1
    out.put((sent, latencies, time.time() - start_at, failed))


def load(target, args_of, clients: int, seconds: float) -> dict:
    ctx = mp.get_context("spawn")
    out, ready, go = ctx.Queue(), ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args_of(c), seconds, (ready, go), out)) for c in range(clients)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=600)
    start_at = time.time() + 0.2
    for _ in procs:
        go.put(start_at)
    results = [out.get(timeout=seconds + 300) for _ in procs]
    for p in procs:
        p.join()
    points = sum(r[0] for r in results)
    elapsed = max(r[2] for r in results)  # the last batch of each client ends after the window
    lat = np.concatenate([r[1] for r in results]) * 1000
    return {"clients": clients, "points_s": points / elapsed, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "batches": int(lat.size),
            "failed": int(sum(r[3] for r in results))}


def serve(url: str, workers: int, tmp: Path):
    port = free_port()
    log = open(tmp / f"serve-{port}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "moxco.cli", "serve", "--url", url, "--port", str(port),
                             "--workers", str(workers), "--no-auth"], stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    wait_http(f"http://127.0.0.1:{port}/healthz")
    return port, proc


def query_1m(url: str, port: int) -> dict:
    import httpx

    from moxco.collector.storage import Store

    store = Store(url)
    store.put_run("big")
    n = 1_000_000
    steps = list(range(n))
    values = np.sin(np.arange(n) / 1000.0).tolist()
    for k in range(0, n, 50_000):
        store.ingest("big", f"b{k}", ["loss"] * 50_000, steps[k:k + 50_000], values[k:k + 50_000],
                     [1.0] * 50_000, [-1] * 50_000)
    store.close()
    times = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
        for _ in range(12):  # 2 workers: the first two may each be cold
            t0 = time.perf_counter()
            r = c.get("/api/v1/runs/big/series/loss", params={"max_points": 2000})
            times.append((time.perf_counter() - t0) * 1000)
            assert r.status_code == 200 and r.json()["total"] == n
    return {"cold_ms": max(times[:2]), "warm_ms": float(np.median(times[2:]))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgresql", "mlflow"])
    parser.add_argument("--out", default=str(REPO / "docs" / "benchmarks-collector.md"))
    args = parser.parse_args()
    args.load_before = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="moxco-bench-"))
    rows, queries = [], {}
    pg_root = Path(tempfile.mkdtemp(prefix="moxco-bench-pg-"))  # its own folder: the postgres user must reach it
    pg_url, pg_stop = start_postgres(pg_root)
    try:
        for backend, url in (("sqlite", f"sqlite:///{tmp / 'moxco.db'}"), ("postgresql", pg_url)):
            if backend not in args.backends:
                continue
            port, proc = serve(url, args.workers, tmp)
            try:
                for clients in args.clients:
                    tag = f"{backend}-{clients}-{time.time_ns()}"
                    r = load(moxco_client, lambda c: (port, f"{tag}-{c}"), clients, args.seconds)
                    rows.append({"server": f"moxco ({backend})", **r})
                    print(rows[-1], flush=True)
                queries[backend] = query_1m(url, port)
                print(backend, queries[backend], flush=True)
            finally:
                proc.terminate()
                proc.wait(30)
        mport = free_port()
        mlog = open(tmp / "mlflow.log", "w")
        mlflow = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
                                   "--port", str(mport), "--workers", str(args.workers), "--backend-store-uri",
                                   f"sqlite:///{tmp / 'mlflow.db'}", "--default-artifact-root", str(tmp / "artifacts")],
                                  stdout=mlog, stderr=subprocess.STDOUT, cwd=tmp)
        try:
            wait_http(f"http://127.0.0.1:{mport}/health", timeout=180)
            for clients in args.clients if "mlflow" in args.backends else ():
                r = load(mlflow_client, lambda c: (f"http://127.0.0.1:{mport}", f"m{clients}-{c}"), clients, args.seconds)
                rows.append({"server": "MLflow (sqlite)", **r})
                print(rows[-1], flush=True)
        finally:
            mlflow.terminate()
            mlflow.wait(30)
    finally:
        subprocess.run(pg_stop, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(pg_root, ignore_errors=True)
    write_report(args, rows, queries)
    return 0


def write_report(args, rows, queries) -> None:
    mlflow = {r["clients"]: r for r in rows if r["server"].startswith("MLflow")}
    lines = ["# Collector benchmarks (bench/ingest.py)", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
             f"load average {args.load_before:.1f} before the run (other work on the machine). "
             f"Batches of {BATCH} points, {args.seconds:g} s per cell, each client a separate process with "
             f"its own run; servers with {args.workers} workers. Regenerate with `.venv/bin/python bench/ingest.py`.",
             "Points/s counts stored points only; failed batches (refused or errors) are counted apart.",
             "", "| server | clients | points/s | p50 ms/batch | p99 ms/batch | failed batches | × MLflow points/s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        ref = mlflow.get(r["clients"])
        ratio = f"{r['points_s'] / ref['points_s']:.1f}" if ref and not r["server"].startswith("MLflow") else ""
        lines.append(f"| {r['server']} | {r['clients']} | {r['points_s']:,.0f} | {r['p50_ms']:.1f} | "
                     f"{r['p99_ms']:.1f} | {r.get('failed', 0)} of {r['batches']} | {ratio} |")
    lines += ["", "1 M-point series, `GET /api/v1/runs/big/series/loss?max_points=2000` (minmax), end to end over HTTP:",
              "", "| store | first requests (cold workers) ms | later requests ms |",
              "| --- | ---: | ---: |"]
    for backend, q in queries.items():
        lines.append(f"| {backend} | {q['cold_ms']:.0f} | {q['warm_ms']:.1f} |")
    out = Path(args.out)
    keep = ""  # sections written by other scripts (bench/load.py's "## Load") survive a rerun
    if out.exists():
        previous = out.read_text()
        at = previous.find("\n## ")
        keep = previous[at:] if at >= 0 else ""
    out.write_text("\n".join(lines) + "\n" + keep)
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
