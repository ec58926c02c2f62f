"""``create_app``: the collector's FastAPI app, assembled from the route table; ``app_from_env`` for
uvicorn's worker processes.

Workers hold no state that matters for correctness: runs, batch ids, decision-policy state and
decisions live in the database (the policy state under the run's row lock), so any worker can take
any request. Every database call runs in the thread pool, so the event loop keeps accepting
requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any, Dict, Optional

from fastapi import Depends, FastAPI
from starlette.concurrency import run_in_threadpool

from moxco.collector.api.deps import Services, authorize, known_query
from moxco.collector.api.errors import (ERROR_SCHEMA, ERROR_STATUSES, ApiError, error_kind, error_response, install,
                                        to_api_error)
from moxco.collector.api.routes import ROUTES
from moxco.collector.api.routes.pages import STATIC_DIR, STATIC_PATH, StaticWithHeaders
from moxco.collector.api.schemas import openapi_body
from moxco.collector.auth import RateLimiter, TokenBucket, TokenVerifier, not_local
from moxco.collector.prometheus import DEFAULT_METRICS_PER_RUN, Exposition, HealthMetrics, method_label
from moxco.collector.store import Store
from moxco.wire import MAX_RUN_NAME

log = logging.getLogger("moxco.collector")

DEFAULT_MAX_BODY = 16 * 1024 * 1024
DEFAULT_STALE_AFTER_S = 600.0  # a running run silent this long is marked interrupted (docs/reliability.md)
RUN_NAME_SCHEMA = {"type": "string", "minLength": 1, "maxLength": MAX_RUN_NAME,
                   "pattern": "^[^/\\u0000-\\u001f\\u007f-\\u009f]+$", "title": "Run"}


def create_app(store_url: Optional[str] = None, *, auth: bool = True, max_body: int = DEFAULT_MAX_BODY,
               metrics_auth: bool = False, store: Optional[Store] = None, migrate: bool = True,
               rate_limiter: Optional[RateLimiter] = None, metrics_cache_s: float = 1.0,
               token_cache_s: float = 5.0, stale_after: float = DEFAULT_STALE_AFTER_S,
               freeze_gc: bool = False, api_docs: bool = False,
               metrics_per_run: int = DEFAULT_METRICS_PER_RUN) -> FastAPI:
    """The collector app on ``store_url`` (or an open ``store``): the routes of ``routes.ROUTES``,
    each behind its scope, the pages' static files, the error handlers, the measuring middleware.

    ``auth=False`` serves everything without tokens: only for loopback binds (the CLI enforces
    it), and only to requests whose ``Host`` (and ``Origin``, when sent) name a loopback address
    (``LocalOnly``: 403 otherwise, against DNS rebinding). ``max_body`` bounds batch bodies (413). ``metrics_auth`` requires a ``read`` token on
    ``/metrics``. ``rate_limiter`` is the per-token hook (``auth.TokenBucket``: 429 with
    ``Retry-After``). ``migrate`` runs the Alembic migrations on open (the CLI runs them once before
    starting several workers instead). ``stale_after`` (seconds, 0: never): while the app runs, a
    background sweep marks ``running`` runs that sent no points for that long ``interrupted``,
    and an interrupted run that sends points again ``running`` (``Store.sweep_stale_runs``).
    ``freeze_gc``: on start-up, move everything allocated so far (the imported libraries) out of
    the garbage collector's sight (``_freeze_heap``); for server processes (``app_from_env``).
    ``api_docs``: serve Swagger UI at ``/api/v1/docs`` (it loads its scripts from a CDN; off by
    default). ``metrics_per_run``: series per run ``/metrics`` exposes beyond the catalogue's.
    A writer session silent for ``stale_after`` seconds (600 when 0) no longer holds its run.
    """
    if store is None:
        if store_url is None:
            raise ValueError("create_app needs a store URL or a store")
        store = Store(store_url, migrate=migrate)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        if freeze_gc:
            _freeze_heap()
        sweeper = asyncio.create_task(_sweep_forever(store, stale_after)) if stale_after > 0 else None
        try:
            yield
        finally:
            if sweeper is not None:
                sweeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sweeper

    # the OpenAPI document and its page are rows of the route table too (routes/docs.py)
    app = FastAPI(title="moxco collector", version="1", openapi_url=None, docs_url=None, redoc_url=None,
                  lifespan=lifespan,
                  description="Training-diagnostics collector: ingest, queries, decisions (docs/api.md).")
    exposition = Exposition(store, cache_s=metrics_cache_s, metrics_per_run=metrics_per_run)
    store.session_stale_after = stale_after if stale_after > 0 else DEFAULT_STALE_AFTER_S
    app.state.store = store
    app.state.api_docs = api_docs
    app.state.exposition = exposition
    app.state.services = Services(store=store, verifier=TokenVerifier(store, cache_s=token_cache_s),
                                  exposition=exposition, auth=auth, max_body=max_body, rate_limiter=rate_limiter)
    if not auth:
        app.add_middleware(LocalOnly)
    app.add_middleware(Measure, health=exposition.health)
    install(app)
    for route in ROUTES:
        scope = route.guarded_scope if (route.guarded_scope and metrics_auth) else route.scope
        dependencies = [] if scope == "public" else [Depends(authorize(scope))]
        if route.path.startswith("/api/"):
            dependencies.append(Depends(known_query(route.path, route.endpoint)))
        app.add_api_route(route.path, route.endpoint, methods=list(route.methods), tags=[scope],
                          dependencies=dependencies,
                          openapi_extra=openapi_body(route.body) if route.body is not None else None,
                          responses=dict(route.responses), include_in_schema=route.in_schema)
    app.mount(STATIC_PATH, StaticWithHeaders(directory=STATIC_DIR), name="static")
    _document(app)
    return app


class Measure:
    """Request duration, status and error counters for every HTTP request, and any exception the
    handlers let through answered in the JSON error format. A plain ASGI middleware: Starlette's
    ``BaseHTTPMiddleware`` (``@app.middleware``) runs the app in a task of its own and re-streams
    its response, ~6 % of a worker's time at full ingest load."""

    def __init__(self, inner, health: HealthMetrics) -> None:
        self.inner, self.health = inner, health

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.inner(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        started = False

        async def send_and_note(message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        try:
            await self.inner(scope, receive, send_and_note)
        except Exception as exc:  # noqa: BLE001 - turned into the JSON error format
            if started:
                raise
            response = error_response(to_api_error(exc))
            status = response.status_code
            await response(scope, receive, send)
        path = getattr(scope.get("route"), "path", "unmatched")
        self.health.requests.labels(method_label(scope["method"]), path, str(status)).observe(time.perf_counter() - start)
        if status >= 400:
            self.health.errors.labels(error_kind(status)).inc()


class LocalOnly:
    """Without auth: answer only requests addressed to this machine. A web page the user visits can
    send requests to ``127.0.0.1`` (a form post, or a name of its own that it rebinds to
    ``127.0.0.1``: DNS rebinding) but cannot make the browser send a loopback ``Host`` for its
    own name or a loopback ``Origin`` for its own page: 403 for any other ``Host`` or ``Origin``."""

    def __init__(self, inner) -> None:
        self.inner = inner

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]
                       if k.lower() in (b"host", b"origin")}
            why = not_local(headers.get("host"), headers.get("origin"))
            if why is not None:
                await error_response(ApiError(403, "forbidden", why))(scope, receive, send)
                return
        await self.inner(scope, receive, send)


def _document(app: FastAPI) -> None:
    """Describe every error answer in the OpenAPI document (the ``Error`` schema, instead of
    FastAPI's default validation-error schema) and the run-name rule on ``{run}`` path parameters,
    so clients and schema checkers (schemathesis) see what the app really answers."""
    from fastapi.openapi.utils import get_openapi

    quiet = {(method, route.path) for route in ROUTES if not route.errors for method in route.methods}

    def openapi() -> Dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
        components["Error"] = ERROR_SCHEMA
        error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
        for path, operations in schema.get("paths", {}).items():
            for method, operation in operations.items():
                responses = operation.setdefault("responses", {})
                if (method.upper(), path) not in quiet:
                    for status, what in ERROR_STATUSES.items():
                        responses[str(status)] = {"description": what, "content": error}
                for parameter in operation.get("parameters", []):
                    if parameter.get("in") == "path" and parameter.get("name") == "run":
                        parameter["schema"] = dict(RUN_NAME_SCHEMA)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi


def _freeze_heap() -> None:
    """``gc.collect()`` then ``gc.freeze()``: the ~10^6 objects of the imported stack (FastAPI,
    pydantic, SQLAlchemy, NumPy, moxco) go to the permanent generation. Without it every full
    (generation-2) collection walked all of them: 70–80 ms during which the worker answered nothing,
    triggered every few seconds by the containers a batch's JSON allocates (a periodic ~100 ms p99
    stall under load, docs/benchmarks-collector.md). Frozen objects are never collected; they are
    the modules and their data, which live as long as the process anyway."""
    import gc

    gc.collect()
    gc.freeze()


async def _sweep_forever(store: Store, stale_after: float) -> None:
    """Every ``min(30 s, stale_after / 4)``: mark silent running runs interrupted (and revive those
    that sent data again). Each worker runs one; the UPDATEs are idempotent."""
    every = min(30.0, max(0.2, stale_after / 4))
    while True:
        await asyncio.sleep(every)
        try:
            changed = await run_in_threadpool(store.sweep_stale_runs, stale_after)
        except Exception as exc:  # noqa: BLE001 - a store that is down now is tried again next time
            log.debug("stale-run sweep failed: %s", exc)
            continue
        for name in changed.get("interrupted", []):
            log.warning("run %r sent nothing for %.0f s: marked interrupted", name, stale_after)


def app_from_env() -> FastAPI:
    """The app for a uvicorn worker process, configured by ``moxco serve`` through the environment:
    ``MOXCO_STORE_URL``, ``MOXCO_AUTH`` (``0`` off), ``MOXCO_MAX_BODY``, ``MOXCO_METRICS_AUTH``,
    ``MOXCO_RATE_LIMIT``/``MOXCO_RATE_BURST`` (per-token requests/s, burst), ``MOXCO_STALE_AFTER``,
    ``MOXCO_API_DOCS`` (``1``: Swagger UI), ``MOXCO_METRICS_PER_RUN``.
    Migrations already ran in the parent process. SQLite WAL checkpoints run in a thread of the
    worker (``Store(background_checkpoint=True)``) and the imported stack is frozen out of the
    garbage collector's full passes (``_freeze_heap``): both used to stall requests."""
    url = os.environ.get("MOXCO_STORE_URL")
    if not url:
        raise RuntimeError("MOXCO_STORE_URL is not set (start the collector with `moxco serve`)")
    rate = float(os.environ.get("MOXCO_RATE_LIMIT") or 0)
    burst = os.environ.get("MOXCO_RATE_BURST")
    store = Store(url, migrate=False, background_checkpoint=True)  # PostgreSQL ignores the flag
    return create_app(store=store, auth=os.environ.get("MOXCO_AUTH", "1") != "0",
                      max_body=int(os.environ.get("MOXCO_MAX_BODY", DEFAULT_MAX_BODY)),
                      metrics_auth=os.environ.get("MOXCO_METRICS_AUTH", "0") == "1",
                      rate_limiter=TokenBucket(rate, float(burst) if burst else None) if rate > 0 else None,
                      stale_after=float(os.environ.get("MOXCO_STALE_AFTER", DEFAULT_STALE_AFTER_S)),
                      api_docs=os.environ.get("MOXCO_API_DOCS", "0") == "1",
                      metrics_per_run=int(os.environ.get("MOXCO_METRICS_PER_RUN", DEFAULT_METRICS_PER_RUN)),
                      freeze_gc=True)
