"""``moxco serve``, ``moxco db upgrade``, ``moxco token create|list|revoke``, ``moxco decide``.

Registered into the ``moxco`` parser by ``moxco.cli`` (``register(commands)``); FastAPI, uvicorn
and httpx are imported only when a command runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from typing import Any, Dict, Optional

DEFAULT_STORE = "sqlite:///./moxco.db"


def _store_url(value: Optional[str]) -> str:
    """``--url``, else ``$MOXCO_STORE_URL``, else the embedded agent's default store (``$MOXCO_URL``
    when it names a database, else ``./moxco.db``): ``moxco serve`` with no arguments opens what
    ``attach(model, opt)`` with no arguments wrote."""
    agent_url = os.environ.get("MOXCO_URL", "")
    if agent_url.startswith(("http://", "https://")):
        agent_url = ""
    return value or os.environ.get("MOXCO_STORE_URL") or agent_url or DEFAULT_STORE


def register(commands) -> None:
    serve = commands.add_parser("serve", help="run the collector (HTTP API, /metrics, decisions)",
                                description="Serve the collector's HTTP API (docs/api.md) on a store.")
    serve.add_argument("--url", help="store URL: sqlite:///file.db or postgresql://… (default $MOXCO_STORE_URL, else the agent's "
                       "default store ./moxco.db, which `moxco demo` and attach() write)")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (share the store; use PostgreSQL)")
    serve.add_argument("--no-auth", action="store_true", help="serve without tokens (only on a loopback --host)")
    serve.add_argument("--max-body", type=int, default=16 * 1024 * 1024, help="largest request body in bytes (413 above)")
    serve.add_argument("--metrics-auth", action="store_true", help="require a read token on /metrics")
    serve.add_argument("--rate-limit", type=float, default=0.0, metavar="PER_SECOND",
                       help="requests per second allowed per token, per worker (429 with Retry-After above; "
                            "default 0: no limit)")
    serve.add_argument("--rate-burst", type=float, default=None, metavar="N",
                       help="requests a token may send at once before --rate-limit applies (default 2 × rate, ≥ 1)")
    serve.add_argument("--stale-after", type=float, default=600.0, metavar="SECONDS",
                       help="mark a running run that sent no points for this long 'interrupted' (default 600; 0: never)")
    serve.add_argument("--api-docs", action="store_true",
                       help="serve Swagger UI at /api/v1/docs (it loads its scripts from a CDN; off by default)")
    serve.add_argument("--metrics-per-run", type=int, default=200, metavar="N",
                       help="series per run /metrics exposes beyond the catalogue's (default 200; the rest are "
                            "stored and counted in moxco_run_metrics_left_out)")
    serve.add_argument("--log-level", default="warning")
    serve.set_defaults(func=_serve)

    db = commands.add_parser("db", help="store maintenance")
    db_commands = db.add_subparsers(dest="db_command", metavar="COMMAND")
    db_commands.required = True
    upgrade = db_commands.add_parser("upgrade", help="create or migrate the store's schema to the latest revision")
    upgrade.add_argument("--url", help="store URL (default $MOXCO_STORE_URL, else the agent's default store ./moxco.db)")
    upgrade.set_defaults(func=_db_upgrade)

    token = commands.add_parser("token", help="API tokens (create, list, revoke)")
    token_commands = token.add_subparsers(dest="token_command", metavar="COMMAND")
    token_commands.required = True
    create = token_commands.add_parser("create", help="create a token and print its secret (once)")
    create.add_argument("--url", help="store URL")
    create.add_argument("--name", required=True, help="who or what uses it, e.g. gpt2-trainer")
    create.add_argument("--scope", action="append", required=True, choices=("ingest", "read", "decide", "admin"),
                        help="repeat for several scopes")
    create.set_defaults(func=_token_create)
    listing = token_commands.add_parser("list", help="list tokens (never their secrets)")
    listing.add_argument("--url", help="store URL")
    listing.set_defaults(func=_token_list)
    revoke = token_commands.add_parser("revoke", help="revoke tokens by id or name")
    revoke.add_argument("token", help="token id or name")
    revoke.add_argument("--url", help="store URL")
    revoke.set_defaults(func=_token_revoke)

    decide = commands.add_parser("decide", help="issue an operator decision for a run",
                                 description="Issue an operator phase-switch decision: over HTTP to a collector "
                                             "(--url http://…, --token or $MOXCO_TOKEN) or directly in a store (--store).")
    decide.add_argument("run")
    decide.add_argument("--phase", type=int, choices=(1, 2), required=True)
    decide.add_argument("--alpha", type=float)
    decide.add_argument("--beta", type=float)
    decide.add_argument("--lr", type=float)
    decide.add_argument("--step", type=int, help="step the decision is taken at (default: the run's last step)")
    decide.add_argument("--reason")
    where = decide.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="collector base URL, e.g. http://127.0.0.1:8000")
    where.add_argument("--store", help="store URL, writing directly (no collector)")
    decide.add_argument("--token", default=None, help="API token with the decide scope (default $MOXCO_TOKEN)")
    decide.set_defaults(func=_decide)


def _fail(message: str) -> int:
    print(f"moxco: {message}", file=sys.stderr)
    return 2


def _open(url: Optional[str]):
    from moxco.collector.store import Store

    return Store(_store_url(url))


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
    url = _store_url(args.url)
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
        print("moxco: no API tokens yet: create one with `moxco token create --url … --name NAME --scope ingest "
              "--scope read`", file=sys.stderr)
    store.close()
    os.environ.update(MOXCO_STORE_URL=url, MOXCO_AUTH="0" if args.no_auth else "1",
                      MOXCO_MAX_BODY=str(args.max_body), MOXCO_METRICS_AUTH="1" if args.metrics_auth else "0",
                      MOXCO_RATE_LIMIT=str(args.rate_limit), MOXCO_RATE_BURST="" if args.rate_burst is None else str(args.rate_burst),
                      MOXCO_STALE_AFTER=str(args.stale_after), MOXCO_API_DOCS="1" if args.api_docs else "0",
                      MOXCO_METRICS_PER_RUN=str(args.metrics_per_run))
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

    url = _store_url(args.url)
    try:
        store = _open(url)
    except StoreError as exc:
        return _fail(str(exc))
    with store.engine.connect() as conn:
        version = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
    store.close()
    print(f"store {url.split('@')[-1]} is at revision {version}")
    return 0


def _token_create(args: argparse.Namespace) -> int:
    from moxco.collector.store import StoreError

    try:
        with _open(args.url) as store:
            ident, secret = store.create_token(args.name, args.scope)
    except StoreError as exc:
        return _fail(str(exc))
    print(f"token {ident} ({args.name}; scopes: {' '.join(sorted(set(args.scope)))}); the secret is shown only once:",
          file=sys.stderr)
    print(secret)
    return 0


def _token_list(args: argparse.Namespace) -> int:
    with _open(args.url) as store:
        rows = store.tokens()
    if not rows:
        print("no tokens")
    for row in rows:
        state = "revoked" if row["revoked_at"] else "active"
        print(f"{row['id']:>4}  {row['name']:<30} {' '.join(row['scopes']):<28} {state}")
    return 0


def _token_revoke(args: argparse.Namespace) -> int:
    with _open(args.url) as store:
        count = store.revoke_token(args.token)
    if not count:
        return _fail(f"no active token with id or name {args.token!r}")
    print(f"revoked {count} token(s); collectors stop accepting them within 5 s")
    return 0


def _decide(args: argparse.Namespace) -> int:
    action: Dict[str, Any] = {"phase": args.phase}
    for key in ("alpha", "beta", "lr"):
        if getattr(args, key) is not None:
            action[key] = getattr(args, key)
    if args.store:
        from moxco.collector.store import StoreError
        from moxco.decision import Decision

        try:
            with _open(args.store) as store:
                step = args.step if args.step is not None else (store.run(args.run).last_step or 0)
                decision, created = store.add_decision(args.run, Decision(
                    step, action, source="operator", issued_by="moxco decide", reason=args.reason))
        except (StoreError, ValueError) as exc:
            return _fail(str(exc))
        decision = decision.to_json()
    else:
        import httpx
        from urllib.parse import quote

        token = args.token or os.environ.get("MOXCO_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        body: Dict[str, Any] = {"action": action}
        if args.step is not None:
            body["step"] = args.step
        if args.reason:
            body["reason"] = args.reason
        url = f"{args.url.rstrip('/')}/api/v1/runs/{quote(args.run, safe='')}/decisions"
        try:
            response = httpx.post(url, json=body, headers=headers, timeout=30)
        except httpx.HTTPError as exc:
            return _fail(f"cannot reach the collector at {args.url}: {exc}")
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except Exception:  # noqa: BLE001 - not our error format
                message = response.text[:500]
            return _fail(f"the collector refused the decision ({response.status_code}): {message}")
        decision, created = response.json(), response.status_code == 201
    print(json.dumps(decision, indent=2, sort_keys=True))
    if not created:
        print("moxco: an identical decision already existed at that step; nothing new was stored", file=sys.stderr)
    return 0
