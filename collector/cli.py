"""``moxco serve``, ``moxco db upgrade``, ``moxco token create|list|revoke``, ``moxco decide``,
``moxco export``.

Registered into the ``moxco`` parser by ``moxco.cli`` (``register(commands)``); FastAPI, uvicorn
and httpx are imported only when a command runs. Every command names a store ``--store`` and a
collector ``--url`` (``moxco.cli.add_store_option``/``add_url_option``); only ``serve``,
``db upgrade`` and ``token create`` may create a store, the others refuse one that is not there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from typing import Any, Dict

from moxco.cli import (DEFAULT_STORE, STORE_ENV, add_store_option, add_token_option, add_url_option, api_token,
                       collector_url, store_url)

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def register(commands) -> None:
    serve = commands.add_parser("serve", help="run the collector (HTTP API, pages, /metrics, decisions)",
                                description="Serve the collector's HTTP API (docs/api.md), the run pages and "
                                            "/metrics on a store, creating the store when there is none.")
    add_store_option(serve, "the store to serve (created when missing)")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    serve.add_argument("--workers", type=int, default=1,
                       help="uvicorn worker processes sharing the store; use PostgreSQL to scale ingest (default: 1)")
    serve.add_argument("--no-auth", action="store_true", help="serve without tokens (only on a loopback --host)")
    serve.add_argument("--max-body", type=int, default=16 * 1024 * 1024, metavar="BYTES",
                       help="largest request body in bytes, 413 above (default: 16777216, 16 MiB)")
    serve.add_argument("--metrics-auth", action="store_true", help="require a read token on /metrics")
    serve.add_argument("--rate-limit", type=float, default=0.0, metavar="PER_SECOND",
                       help="requests per second allowed per token, per worker, 429 with Retry-After above "
                            "(default: 0, no limit)")
    serve.add_argument("--rate-burst", type=float, default=None, metavar="N",
                       help="requests a token may send at once before --rate-limit applies (default: 2 × rate, ≥ 1)")
    serve.add_argument("--stale-after", type=float, default=600.0, metavar="SECONDS",
                       help="mark a running run that sent no points for this long 'interrupted' (default: 600; 0: never)")
    serve.add_argument("--api-docs", action="store_true",
                       help="serve Swagger UI at /api/v1/docs (it loads its scripts from a CDN; off by default)")
    serve.add_argument("--metrics-per-run", type=int, default=200, metavar="N",
                       help="series per run /metrics exposes beyond the catalogue's (default: 200; the rest are "
                            "stored and counted in moxco_run_metrics_left_out)")
    serve.add_argument("--log-level", default="warning", choices=LOG_LEVELS,
                       help="the server log's level (default: warning)")
    serve.set_defaults(func=_serve)

    db = commands.add_parser("db", help="store maintenance", description="Store maintenance.")
    db_commands = db.add_subparsers(dest="db_command", metavar="COMMAND")
    db_commands.required = True
    upgrade = db_commands.add_parser("upgrade", help="create or migrate the store's schema to the latest revision",
                                     description="Create the store's schema, or migrate it to the latest revision.")
    add_store_option(upgrade, "the store to create or migrate")
    upgrade.set_defaults(func=_db_upgrade)

    token = commands.add_parser("token", help="API tokens (create, list, revoke)",
                                description="API tokens, managed directly in the store.")
    token_commands = token.add_subparsers(dest="token_command", metavar="COMMAND")
    token_commands.required = True
    create = token_commands.add_parser("create", help="create a token and print its secret (once)",
                                       description="Create an API token and print its secret (shown only once).")
    add_store_option(create, "the store the collector serves (created when missing)")
    create.add_argument("--name", required=True, help="who or what uses it, e.g. gpt2-trainer (required)")
    create.add_argument("--scope", action="append", required=True, choices=("ingest", "read", "decide", "admin"),
                        help="what the token may do; repeat for several scopes (required)")
    create.set_defaults(func=_token_create)
    listing = token_commands.add_parser("list", help="list tokens (never their secrets)",
                                        description="List the store's tokens (never their secrets).")
    add_store_option(listing, "the store to read (never created)")
    listing.set_defaults(func=_token_list)
    revoke = token_commands.add_parser("revoke", help="revoke tokens by id or name",
                                       description="Revoke tokens by id or name.")
    revoke.add_argument("token", help="token id or name")
    add_store_option(revoke, "the store holding the token (never created)")
    revoke.set_defaults(func=_token_revoke)

    decide = commands.add_parser("decide", help="issue an operator decision for a run",
                                 description="Issue an operator phase-switch decision: over HTTP to a collector "
                                             "(--url) or directly in a store (--store).")
    decide.add_argument("run", help="the run's name")
    decide.add_argument("--phase", type=int, choices=(1, 2), required=True,
                        help="the phase to switch to: 1 explore, 2 commit (required)")
    decide.add_argument("--alpha", type=float, help="the inertia α to set, in [0, 1) (default: unchanged)")
    decide.add_argument("--beta", type=float, help="the gradient extrapolation β to set, in [0, 1) (default: unchanged)")
    decide.add_argument("--lr", type=float, help="the step size to set, > 0 (default: unchanged)")
    decide.add_argument("--step", type=int, help="step the decision is taken at (default: the run's last step)")
    decide.add_argument("--reason", help="why, kept with the decision (default: none)")
    where = decide.add_mutually_exclusive_group()
    add_url_option(where, "the collector to send the decision to")
    add_store_option(where, "the store to write the decision to, without a collector (never created)")
    add_token_option(decide, "decide")
    decide.set_defaults(func=_decide)

    exporter = commands.add_parser(
        "export", help="write a run's points as CSV or Parquet",
        description="Write a run (every metric, one column each, one row per step) or one metric "
                    "(--metric: step, value, wall_time) as CSV or Parquet, read from a store (--store) or a "
                    "collector (--url), streamed: memory stays bounded whatever the run's length. NaN and "
                    "±Inf are kept (CSV: NaN, Infinity, -Infinity).")
    exporter.add_argument("run", help="the run's name")
    exporter.add_argument("--format", choices=("csv", "parquet"), default="csv", help="file format (default: csv)")
    exporter.add_argument("--metric", help="export only this metric, as step,value,wall_time (default: the whole "
                                           "run, wide by step)")
    exporter.add_argument("--rank", type=int, default=-1, help="the rank to export (default: -1, run level)")
    exporter.add_argument("--output", "-o", metavar="FILE",
                          help="where to write (default: RUN.FORMAT or RUN-METRIC.FORMAT in the working directory; "
                               "- for standard output)")
    source = exporter.add_mutually_exclusive_group()
    add_url_option(source, "the collector to read from")
    add_store_option(source, "the store to read from (never created)")
    add_token_option(exporter, "read")
    exporter.set_defaults(func=_export)


def _fail(message: str) -> int:
    print(f"moxco: {message}", file=sys.stderr)
    return 2


def _open(url: str, *, create: bool):
    """The store at ``url``; without ``create``, a missing one is a ``NotFoundError`` (a
    ``StoreError``) naming it, and nothing is created."""
    from moxco.collector.store import open_store

    return open_store(url, create=create)


def _serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from moxco.collector.auth import check_no_auth_bind
    except ModuleNotFoundError as exc:
        return _fail(f"{exc.name} is missing: install the collector with `pip install 'moxco[collector]'`")
    if args.no_auth:
        try:
            check_no_auth_bind(args.host)
        except ValueError as exc:
            return _fail(str(exc))
    if args.workers < 1:
        return _fail("--workers must be at least 1")
    if (args.rate_limit < 0 or (args.rate_burst is not None and args.rate_burst < 1) or args.stale_after < 0
            or args.metrics_per_run < 0):
        return _fail("--rate-limit, --stale-after and --metrics-per-run must be ≥ 0 and --rate-burst ≥ 1")
    try:
        url = store_url(args.store)
    except ValueError as exc:
        return _fail(str(exc))
    from moxco.collector.store import Store, StoreError, normalize_url

    url = normalize_url(url)
    if args.workers > 1 and url.startswith("sqlite"):
        print("moxco: several workers on SQLite serialise on its write lock; use PostgreSQL to scale ingest",
              file=sys.stderr)
    try:
        store = Store(url)  # migrations run once here, before any worker starts
    except StoreError as exc:
        return _fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - e.g. PostgreSQL unreachable: say so plainly
        return _fail(f"cannot open the store {url!r}: {type(exc).__name__}: {exc}")
    if not args.no_auth and not store.tokens():
        print("moxco: no API tokens yet: create one with `moxco token create --store … --name NAME --scope ingest "
              "--scope read`", file=sys.stderr)
    store.close()
    os.environ.update(MOXCO_AUTH="0" if args.no_auth else "1",
                      MOXCO_MAX_BODY=str(args.max_body), MOXCO_METRICS_AUTH="1" if args.metrics_auth else "0",
                      MOXCO_RATE_LIMIT=str(args.rate_limit), MOXCO_RATE_BURST="" if args.rate_burst is None else str(args.rate_burst),
                      MOXCO_STALE_AFTER=str(args.stale_after), MOXCO_API_DOCS="1" if args.api_docs else "0",
                      MOXCO_METRICS_PER_RUN=str(args.metrics_per_run))
    os.environ[STORE_ENV] = url
    multiproc_dir = None
    if args.workers > 1:  # prometheus_client sums the workers' counters from files in this folder
        multiproc_dir = tempfile.mkdtemp(prefix="moxco-prometheus-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = multiproc_dir
    print(f"moxco collector on http://{args.host}:{args.port} (store {url.split('@')[-1]}, "
          f"{args.workers} worker(s), auth {'off' if args.no_auth else 'on'})", file=sys.stderr)
    try:
        uvicorn.run("moxco.collector.api:app_from_env", factory=True, host=args.host, port=args.port,
                    workers=args.workers, log_level=args.log_level, access_log=False,
                    # a worker imports torch (moxco's math) on start: several seconds on a busy
                    # machine, longer than uvicorn's 5 s default before it kills a "hung" worker
                    timeout_worker_healthcheck=60)
    finally:
        if multiproc_dir:
            shutil.rmtree(multiproc_dir, ignore_errors=True)
    return 0


def _db_upgrade(args: argparse.Namespace) -> int:
    from moxco.collector.store import StoreError

    try:
        url = store_url(args.store)
        store = _open(url, create=True)
    except (StoreError, ValueError) as exc:
        return _fail(str(exc))
    with store.engine.connect() as conn:
        version = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
    store.close()
    print(f"store {url.split('@')[-1]} is at revision {version}")
    return 0


def _token_create(args: argparse.Namespace) -> int:
    from moxco.collector.store import StoreError

    try:
        with _open(store_url(args.store), create=True) as store:
            ident, secret = store.create_token(args.name, args.scope)
    except (StoreError, ValueError) as exc:
        return _fail(str(exc))
    print(f"token {ident} ({args.name}; scopes: {' '.join(sorted(set(args.scope)))}); the secret is shown only once:",
          file=sys.stderr)
    print(secret)
    return 0


def _token_list(args: argparse.Namespace) -> int:
    from moxco.collector.store import StoreError

    try:
        with _open(store_url(args.store), create=False) as store:
            rows = store.tokens()
    except (StoreError, ValueError) as exc:
        return _fail(str(exc))
    if not rows:
        print("no tokens")
    for row in rows:
        state = "revoked" if row["revoked_at"] else "active"
        print(f"{row['id']:>4}  {row['name']:<30} {' '.join(row['scopes']):<28} {state}")
    return 0


def _token_revoke(args: argparse.Namespace) -> int:
    from moxco.collector.store import StoreError

    try:
        with _open(store_url(args.store), create=False) as store:
            count = store.revoke_token(args.token)
    except (StoreError, ValueError) as exc:
        return _fail(str(exc))
    if not count:
        return _fail(f"no active token with id or name {args.token!r}")
    print(f"revoked {count} token(s); collectors stop accepting them within 5 s")
    return 0


def _where(args: argparse.Namespace):
    """``("url", collector)`` or ``("store", store URL)``: ``--url``, ``--store``, else ``$MOXCO_URL``
    when it is a collector, else the default store."""
    if args.store is None:
        url = collector_url(args.url)
        if url is not None:
            return "url", url
    return "store", store_url(args.store)


def _http_error(response) -> str:
    try:
        return response.json()["error"]["message"]
    except Exception:  # noqa: BLE001 - not our error format
        return response.text[:500]


def _decide(args: argparse.Namespace) -> int:
    action: Dict[str, Any] = {"phase": args.phase}
    for key in ("alpha", "beta", "lr"):
        if getattr(args, key) is not None:
            action[key] = getattr(args, key)
    try:
        kind, target = _where(args)
    except ValueError as exc:
        return _fail(str(exc))
    if kind == "store":
        from moxco.collector.store import StoreError
        from moxco.decision import Decision

        try:
            with _open(target, create=False) as store:
                step = args.step if args.step is not None else (store.run(args.run).last_step or 0)
                decision, created = store.add_decision(args.run, Decision(
                    step, action, source="operator", issued_by="moxco decide", reason=args.reason))
        except (StoreError, ValueError) as exc:
            return _fail(str(exc))
        decision = decision.to_json()
    else:
        import httpx
        from urllib.parse import quote

        token = api_token(args.token)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        body: Dict[str, Any] = {"action": action}
        if args.step is not None:
            body["step"] = args.step
        if args.reason:
            body["reason"] = args.reason
        try:
            response = httpx.post(f"{target}/api/v1/runs/{quote(args.run, safe='')}/decisions", json=body,
                                  headers=headers, timeout=30)
        except httpx.HTTPError as exc:
            return _fail(f"cannot reach the collector at {target}: {exc}")
        if response.status_code >= 400:
            return _fail(f"the collector refused the decision ({response.status_code}): {_http_error(response)}")
        decision, created = response.json(), response.status_code == 201
    print(json.dumps(decision, indent=2, sort_keys=True))
    if not created:
        print("moxco: an identical decision already existed at that step; nothing new was stored", file=sys.stderr)
    return 0


def _export(args: argparse.Namespace) -> int:
    from moxco.collector.store import StoreError

    try:
        kind, target = _where(args)
    except ValueError as exc:
        return _fail(str(exc))
    name = f"{args.run}-{args.metric}" if args.metric else args.run
    output = args.output or f"{name.replace('/', '_')}.{args.format}"
    try:
        if kind == "store":
            chunks, close = _export_from_store(args, target)
        else:
            chunks, close = _export_from_collector(args, target)
    except (StoreError, ValueError, ModuleNotFoundError, RuntimeError) as exc:
        return _fail(str(exc))
    written = 0
    try:
        out = sys.stdout.buffer if output == "-" else open(output + ".partial", "wb")
        try:
            for chunk in chunks:
                out.write(chunk)
                written += len(chunk)
        finally:
            if out is not sys.stdout.buffer:
                out.close()
    except (StoreError, RuntimeError, OSError, ModuleNotFoundError) as exc:
        if output != "-" and os.path.exists(output + ".partial"):
            os.unlink(output + ".partial")
        return _fail(f"export of {name!r} failed after {written} bytes (nothing was written to {output}): {exc}")
    finally:
        close()
    if output != "-":
        os.replace(output + ".partial", output)
        print(f"{output}: {written} bytes ({args.format})", file=sys.stderr)
    return 0


def _export_from_store(args: argparse.Namespace, url: str):
    from moxco.collector import export

    store = _open(url, create=False)
    try:
        if args.metric:
            rows = store.series_chunks(args.run, args.metric, rank=args.rank)
            chunks = export.csv_series(rows) if args.format == "csv" else \
                export.parquet_series(rows, {"run": args.run, "metric": args.metric, "rank": args.rank})
        else:
            metrics = store.export_metrics(args.run, rank=args.rank)
            rows = store.table_chunks(args.run, metrics, rank=args.rank)
            chunks = export.csv_table(metrics, rows) if args.format == "csv" else \
                export.parquet_table(metrics, rows, {"run": args.run, "rank": args.rank})
    except BaseException:
        store.close()
        raise
    return chunks, store.close


def _export_from_collector(args: argparse.Namespace, url: str):
    import httpx
    from urllib.parse import quote

    token = api_token(args.token)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    run = quote(args.run, safe="")
    if args.metric:
        path = f"/api/v1/runs/{run}/series/{quote(args.metric, safe='')}"
        params: Dict[str, Any] = {"format": args.format, "rank": args.rank}
    else:
        path, params = f"/api/v1/runs/{run}/export", {"format": args.format, "rank": args.rank}
    client = httpx.Client(timeout=httpx.Timeout(30.0, read=300.0))
    try:
        response = client.send(client.build_request("GET", url + path, params=params, headers=headers), stream=True)
    except httpx.HTTPError as exc:
        client.close()
        raise RuntimeError(f"cannot reach the collector at {url}: {exc}") from None
    if response.status_code >= 400:
        response.read()
        client.close()
        raise RuntimeError(f"the collector refused the export ({response.status_code}): {_http_error(response)}")

    def close() -> None:
        response.close()
        client.close()

    def chunks():
        try:
            yield from response.iter_bytes()
        except httpx.HTTPError as exc:
            raise RuntimeError(f"the connection to {url} broke: {exc}") from None

    return chunks(), close


__all__ = ["DEFAULT_STORE", "register"]
