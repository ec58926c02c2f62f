"""Collector ingest throughput and latency vs an MLflow tracking server, and the 1 M-point query.

    .venv/bin/python bench/ingest.py [--seconds 8] [--clients 1 8 32] [--open-factor 10]
                                     [--out FILE] [--write-docs]

Clients are separate processes, one run each, sending batches of 1,000 points (5 metrics × 200
steps). For each number of concurrent clients:

* closed loop (moxco and MLflow, each on SQLite and on PostgreSQL): every client sends its
  next batch as soon as the previous one is answered, for ``--seconds``: the most points/s each
  server takes, with p50/p99 latency per batch (at saturation, so mostly queueing);
* open loop (moxco, both stores), what the collector's budget asks: the clients together offer
  ``--open-factor`` (10) × the points/s MLflow took with the same number of clients on the same
  backend kind, each client sending on a fixed schedule (``paced_batches``) and
  latency counted from each batch's scheduled time (coordinated omission not hidden). Reported:
  points/s achieved and p50/p99 at that load.

On each backend MLflow runs first (the open loop needs its rate). moxco: ``moxco serve`` with
``--workers`` (default 2, like the MLflow server), bodies JSON over keep-alive HTTP. MLflow:
``mlflow server`` with a SQLite file or a PostgreSQL database of its own (same cluster, through
psycopg 3) as backend store, ``MlflowClient.log_batch`` of 1,000 ``Metric``s. Then a 1 M-point
series is written and ``GET …/series/loss?max_points=2000`` timed (first request of each of the
fresh workers: cold; later ones: warm). ``minmax`` is served from the block summaries
(``series_blocks``), so cold and warm read the same ~1,000 rows. PostgreSQL is a private cluster
started here (Debian ``postgresql``, fsync on), like the tests do.
"""

from __future__ import annotations

import argparse
import glob
import http.client
import json
import multiprocessing as mp
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchkit import add_write_docs, write_section

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks-collector.md"
HEADING = "# Collector benchmarks (bench/ingest.py)"
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


def batch_body(run: str, i: int, metrics, per_metric: int, now: float) -> bytes:
    """The JSON body of batch ``i`` of ``run``: ``per_metric`` steps of every metric at wall time ``now``."""
    points = [[m, i * per_metric + k, 0.5 + k * 1e-3, now] for m in metrics for k in range(per_metric)]
    return json.dumps({"batch_id": f"{run}-{i}", "points": points}).encode()


def send_body(conn: http.client.HTTPConnection, port: int, run: str, body: bytes) -> tuple:
    """POST a batch body: ``(ok, conn)``; a broken connection is replaced, so the caller always
    gets a usable one back."""
    try:
        conn.request("POST", f"/api/v1/runs/{run}/batches", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        return response.status == 200, conn
    except (OSError, http.client.HTTPException):
        conn.close()
        return False, http.client.HTTPConnection("127.0.0.1", port, timeout=60)


def post_batch(conn: http.client.HTTPConnection, port: int, run: str, i: int, metrics, per_metric: int,
               now: float) -> tuple:
    """POST batch ``i`` of ``run`` (``per_metric`` steps of every metric): ``(ok, seconds, points,
    conn)``, the seconds counted from the request's send (closed loop)."""
    body = batch_body(run, i, metrics, per_metric, now)
    t0 = time.perf_counter()
    ok, conn = send_body(conn, port, run, body)
    return ok, time.perf_counter() - t0, per_metric * len(metrics), conn


def paced_batches(conn: http.client.HTTPConnection, port: int, run: str, metrics, per_metric: int, rate: float,
                  start_at: float, seconds: float, phase: float = 0.0, grace: float = 10.0,
                  linger: float = 1.0, bodies=None) -> dict:
    """Open loop: batch ``k`` is due at ``start_at + phase + k / rate`` (``time.time()``) for
    ``seconds``, whatever the answers to earlier batches do. A client that is behind sends the due
    batches back to back; each latency is counted from the batch's *due* time, not from when it
    could be sent, so waiting for a slow answer shows in the figures (no coordinated omission).
    Batches still unsent ``grace`` seconds after the window are counted as ``missed``; the call
    returns ``linger`` seconds after the window at the earliest. Returns
    ``{"sent", "latencies", "failed", "missed", "elapsed", "conn"}`` (points stored, seconds per batch,
    refused batches, unsent batches, seconds from ``start_at`` to the last answer). ``bodies``:
    batch ``k``'s body is ``bodies[k]`` while there is one (built before the window, see
    ``prebuilt_bodies``), else it is built here."""
    interval = 1.0 / rate
    end = start_at + seconds
    latencies, sent, failed, missed, k = [], 0, 0, 0, 0
    while True:
        due = start_at + phase + k * interval
        if due >= end:
            break
        if time.time() > end + grace:
            missed = int((end - due) // interval) + 1
            break
        if bodies is not None and k < len(bodies):
            body = bodies[k]
        else:
            body = batch_body(run, k, metrics, per_metric, due)  # built while waiting for the due time
        now = time.time()
        if now < due:
            time.sleep(due - now)
        ok, conn = send_body(conn, port, run, body)
        latencies.append(time.time() - due)
        if ok:
            sent += per_metric * len(metrics)
        else:
            failed += 1
        k += 1
    elapsed = time.time() - start_at
    # stay until every client's window is over: a client process exiting (freeing ~100 MB) while
    # others send their last batches put 100+ ms into their latencies
    time.sleep(max(0.0, end + linger - time.time()))
    return {"sent": sent, "latencies": latencies, "failed": failed, "missed": missed, "elapsed": elapsed,
            "conn": conn}


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
    elapsed = time.time() - start_at
    time.sleep(max(0.0, end + 1.0 - time.time()))  # exit after every client's window (paced_batches)
    out.put((sent, latencies, elapsed, failed))


def prebuilt_bodies(run: str, metrics, per_metric: int, rate: float, seconds: float) -> list:
    """Every body an open-loop client sends in its window, built before the window opens: the
    clients share the 2 cores with the servers, and building a 1,000-point body (~1 ms of JSON)
    at send time put the load generator's own CPU into the servers' latencies (a real agent
    builds its batches on another machine). Wall times: the build time plus the schedule."""
    now = time.time()
    return [batch_body(run, k, metrics, per_metric, now + k / rate) for k in range(int(seconds * rate) + 2)]


def moxco_open_client(port: int, run: str, rate: float, seconds: float, start_at: float, out) -> None:
    """One open-loop client: ``rate`` batches/s on a schedule (``paced_batches``), its own run,
    starting at its own phase within the first interval (clients are not in lock step)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("PUT", f"/api/v1/runs/{run}", body=b"{}", headers={"Content-Type": "application/json"})
    conn.getresponse().read()
    metrics = ["loss", "grad_norm_sq", "update_norm", "inst_gap", "inst_smooth"]
    bodies = prebuilt_bodies(run, metrics, BATCH // len(metrics), rate, seconds)
    start_at = wait_start(start_at)
    phase = random.Random(run).uniform(0.0, 1.0 / rate)
    r = paced_batches(conn, port, run, metrics, BATCH // len(metrics), rate, start_at, seconds, phase, bodies=bodies)
    out.put((r["sent"], r["latencies"], r["elapsed"], r["failed"] + r["missed"]))


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
    elapsed = time.time() - start_at
    time.sleep(max(0.0, end + 1.0 - time.time()))  # as moxco_client
    out.put((sent, latencies, elapsed, failed))


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
    proc = subprocess.Popen([sys.executable, "-m", "moxco.cli", "serve", "--store", url, "--port", str(port),
                             "--workers", str(workers), "--no-auth"], stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    wait_http(f"http://127.0.0.1:{port}/healthz")
    return port, proc


def query_1m(url: str, port: int) -> dict:
    import httpx

    from moxco.collector.store import Store

    store = Store(url)
    store.put_run("big")
    n = 1_000_000
    steps = list(range(n))
    values = np.sin(np.arange(n) / 1000.0).tolist()
    for k in range(0, n, 50_000):
        store.ingest("big", (["loss"] * 50_000, steps[k:k + 50_000], values[k:k + 50_000], [1.0] * 50_000,
                             [-1] * 50_000), batch_id=f"b{k}")
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
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgresql", "mlflow"])
    parser.add_argument("--open-factor", type=float, default=10.0,
                        help="open-loop offered load: this many times MLflow's points/s at the same client count")
    parser.add_argument("--open-rate", type=float, default=None,
                        help="open-loop offered points/s (all clients) instead of a multiple of MLflow's")
    parser.add_argument("--out", default=None, help="also write the report into this markdown file")
    add_write_docs(parser, DOC, "the report (its section; the others stay)")
    args = parser.parse_args()
    args.load_before = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="moxco-bench-"))
    rows, open_rows, queries = [], [], {}
    pg_root = Path(tempfile.mkdtemp(prefix="moxco-bench-pg-"))  # its own folder: the postgres user must reach it
    pg_url, pg_stop = start_postgres(pg_root)
    try:
        mlflow = {}  # (backend, clients) -> MLflow's points/s on the same backend kind (DESIGN §6)
        for backend, url in (("sqlite", f"sqlite:///{tmp / 'moxco.db'}"), ("postgresql", pg_url)):
            if backend not in args.backends:
                continue
            # MLflow first: the open-loop runs offer a multiple of its measured rate
            if "mlflow" in args.backends:
                got = run_mlflow(args, tmp, backend, mlflow_store_uri(backend, tmp, pg_url))
                rows += got
                mlflow.update({(backend, r["clients"]): r["points_s"] for r in got})
            port, proc = serve(url, args.workers, tmp)
            try:
                for clients in args.clients:
                    tag = f"{backend}-{clients}-{time.time_ns()}"
                    load1 = os.getloadavg()[0]
                    r = load(moxco_client, lambda c: (port, f"{tag}-{c}"), clients, args.seconds)
                    rows.append({"server": f"moxco ({backend})", "load1": load1, **r})
                    print(rows[-1], flush=True)
                for clients in args.clients:
                    offered = args.open_rate or (args.open_factor * mlflow[backend, clients]
                                                 if (backend, clients) in mlflow else None)
                    if not offered:
                        continue
                    rate = offered / clients / BATCH  # batches/s per client
                    tag = f"open-{backend}-{clients}-{time.time_ns()}"
                    load1 = os.getloadavg()[0]
                    r = load(moxco_open_client, lambda c: (port, f"{tag}-{c}", rate), clients, args.seconds)
                    open_rows.append({"server": f"moxco ({backend})", "offered": offered, "load1": load1, **r})
                    print(open_rows[-1], flush=True)
                queries[backend] = query_1m(url, port)
                print(backend, queries[backend], flush=True)
            finally:
                proc.terminate()
                proc.wait(30)
    finally:
        subprocess.run(pg_stop, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(pg_root, ignore_errors=True)
    write_report(args, rows, open_rows, queries)
    return 0


def mlflow_store_uri(backend: str, tmp: Path, pg_url: str) -> str:
    """MLflow's backend store of the same kind as moxco's: a SQLite file, or a database of its own
    in the same PostgreSQL cluster (through psycopg 3, which the collector uses too)."""
    if backend == "sqlite":
        return f"sqlite:///{tmp / 'mlflow.db'}"
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE DATABASE mlflow")
    return pg_url.replace("postgresql://", "postgresql+psycopg://").rsplit("/", 1)[0] + "/mlflow"


def run_mlflow(args, tmp: Path, backend: str, uri: str) -> list:
    """The MLflow server (backend store ``uri``, ``--workers``) under the closed-loop clients: its rows."""
    rows = []
    mport = free_port()
    mlog = open(tmp / f"mlflow-{backend}.log", "w")
    mlflow = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
                               "--port", str(mport), "--workers", str(args.workers), "--backend-store-uri", uri,
                               "--default-artifact-root", str(tmp / "artifacts")],
                              stdout=mlog, stderr=subprocess.STDOUT, cwd=tmp)
    try:
        wait_http(f"http://127.0.0.1:{mport}/health", timeout=180)
        for clients in args.clients:
            load1 = os.getloadavg()[0]
            r = load(mlflow_client, lambda c: (f"http://127.0.0.1:{mport}", f"m{clients}-{c}"), clients, args.seconds)
            rows.append({"server": f"MLflow ({backend})", "load1": load1, **r})
            print(rows[-1], flush=True)
    finally:
        mlflow.terminate()
        mlflow.wait(30)
    return rows


def write_report(args, rows, open_rows, queries) -> None:
    # the reference of each moxco row: MLflow with the same client count on the same backend kind
    mlflow = {(r["server"].split("(")[1], r["clients"]): r for r in rows if r["server"].startswith("MLflow")}
    lines = [HEADING, "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
             f"load average {args.load_before:.1f} before the run (each row gives the 1-minute load average "
             "when it started: other work on the machine, and this benchmark's own client processes). "
             f"Batches of {BATCH} points, {args.seconds:g} s per cell, each client a separate process with "
             f"its own run; servers with {args.workers} workers. Regenerate with `.venv/bin/python bench/ingest.py --write-docs`.",
             "",
             "### Closed loop: the most each server takes",
             "",
             "Each client sends its next batch as soon as the previous one is answered, so the servers run "
             "saturated and the latency columns are mostly queueing (8 and 32 clients on 2 cores). "
             "Points/s counts stored points only; failed batches (refused or errors) are counted apart.",
             "", "| server | clients | points/s | p50 ms/batch | p99 ms/batch | failed batches | × MLflow points/s | load1 |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        ref = mlflow.get((r["server"].split("(")[1], r["clients"]))
        ratio = f"{r['points_s'] / ref['points_s']:.1f}" if ref and not r["server"].startswith("MLflow") else ""
        lines.append(f"| {r['server']} | {r['clients']} | {r['points_s']:,.0f} | {r['p50_ms']:.1f} | "
                     f"{r['p99_ms']:.1f} | {r.get('failed', 0)} of {r['batches']} | {ratio} | {r.get('load1', 0):.1f} |")
    if open_rows:
        lines += ["", f"### Open loop at {args.open_factor:g} × MLflow's points/s" if not args.open_rate
                  else f"### Open loop at {args.open_rate:,.0f} points/s", "",
                  "The clients send on a schedule (each its share of the offered points/s, at its own phase), "
                  "whatever the answers do; a client that falls behind sends the due batches back to back. "
                  "Latency is counted from each batch's *scheduled* time, so time spent waiting for an earlier "
                  "answer is in it (no coordinated omission). Budget: the offered rate achieved "
                  "(≥ 95 %) with p99 < 50 ms.", "",
                  "| server | clients | offered points/s | achieved points/s | p50 ms | p99 ms | failed or unsent batches "
                  "| budget | load1 |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
        for r in open_rows:
            met = r["points_s"] >= 0.95 * r["offered"] and r["p99_ms"] < 50 and not r["failed"]
            lines.append(f"| {r['server']} | {r['clients']} | {r['offered']:,.0f} | {r['points_s']:,.0f} | "
                         f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['failed']} ({r['batches']} sent) | "
                         f"{'met' if met else '**missed**'} | {r['load1']:.1f} |")
    lines += ["", "1 M-point series, `GET /api/v1/runs/big/series/loss?max_points=2000` (minmax), end to end over HTTP:",
              "", "| store | first requests (cold workers) ms | later requests ms |",
              "| --- | ---: | ---: |"]
    for backend, q in queries.items():
        lines.append(f"| {backend} | {q['cold_ms']:.0f} | {q['warm_ms']:.1f} |")
    text = "\n".join(lines) + "\n"
    # its section only: the sections after it (the reading of the figures, bench/load.py's) stay
    for path in [Path(args.out)] * bool(args.out) + [DOC] * args.write_docs:
        write_section(path, text, HEADING)
    print(text.rstrip("\n"))


if __name__ == "__main__":
    sys.exit(main())
