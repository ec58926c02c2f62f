"""The collector's FastAPI application: docs/api.md, implemented.

``create_app(store_url, auth=True, max_body=16 MiB)`` builds the app on one store (SQLite or
PostgreSQL); ``app_from_env()`` builds it from ``MOXCO_*`` environment variables for uvicorn's
worker processes (``moxco serve --workers N``). Workers hold no state that matters for
correctness: runs, batch ids, decision-policy state and decisions live in the database (the
policy state under the run's row lock), so any worker can take any request.

Design choices for the hot path (ingest):

* request bodies are read by us, not by pydantic: streamed with a running size check (413 as soon
  as the limit is crossed, before the rest is read), parsed with orjson, and the ``points`` array
  validated column-wise (``zip(*points)`` and type sets), so a 1,000-point batch costs a few
  C-level passes, not 1,000 model instances;
* one transaction per batch, points written with one multi-row statement (``unnest`` arrays on
  PostgreSQL, ``executemany`` on SQLite) with insert-ignore on the point key;
* every database call runs in the thread pool, so the event loop keeps accepting requests.

Errors are ``{"error": {"status", "code", "message", "details"}}``: 4xx for any bad input, 503 with
``Retry-After`` when the store cannot be reached, and a 500 only for a bug (logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import orjson
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from sqlalchemy import exc as sa_exc
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from moxco.collector import downsample as ds
from moxco.collector.auth import ANONYMOUS, AuthError, Principal, RateLimiter, TokenBucket, TokenVerifier
from moxco.collector.prometheus import CONTENT_TYPE, Exposition
from moxco.collector.schema import MAX_BATCH_ID_LENGTH, MAX_METRIC_LENGTH, RUN_LEVEL_RANK, RUN_STATUSES
from moxco.collector.storage import ConflictError, NotFoundError, Store, StoreError

log = logging.getLogger("moxco.collector")

DEFAULT_MAX_BODY = 16 * 1024 * 1024
MAX_SERIES_POINTS = 100_000
RETRY_AFTER_S = 2
DEFAULT_STALE_AFTER_S = 600.0  # a running run silent this long is marked interrupted (docs/reliability.md)
INT64_MAX = 2**63 - 1
MAX_SMALL_BODY = 1024 * 1024  # run registration, decisions, acknowledgements: 413 above (batches: max_body)
MAX_JSON_DEPTH = 32  # nesting of config/optimizer/policy/action objects (orjson writes at most 255)
_NONFINITE_IN = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_NUMBER = (int, float)


class ApiError(Exception):
    """An error answered as ``{"error": {...}}`` with ``status``."""

    def __init__(self, status: int, code: str, message: str, details: Optional[List[Any]] = None,
                 headers: Optional[Dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.details = details or []
        self.headers = headers or {}


def json_response(payload: Any, status: int = 200, headers: Optional[Dict[str, str]] = None) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json", headers=headers)


def error_response(err: ApiError) -> Response:
    return json_response({"error": {"status": err.status, "code": err.code, "message": err.message,
                                    "details": err.details}}, err.status, err.headers)


def json_float(value: Optional[float]) -> Any:
    """A float for a JSON response: non-finite values as ``"NaN"``/``"Infinity"``/``"-Infinity"``."""
    if value is None:
        return None
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def json_floats(values: np.ndarray) -> List[Any]:
    """``values.tolist()`` with the non-finite entries replaced by their strings (vectorised find)."""
    out = values.tolist()
    for i in np.flatnonzero(~np.isfinite(values)).tolist():
        out[i] = json_float(out[i])
    return out


def _decision_json(d: Dict[str, Any]) -> Dict[str, Any]:
    return {**d, **{k: json_float(d[k]) for k in ("goodness", "grad_term", "sharpness_term", "loss_term")}}


def validate_run_name(name: str) -> str:
    """docs/api.md: 1–200 characters, any Unicode except control characters and ``/``."""
    if not 1 <= len(name) <= 200:
        raise ApiError(422, "invalid_run_name", f"a run name has 1 to 200 characters, this one has {len(name)}")
    if "/" in name or any(ord(ch) < 32 or 127 <= ord(ch) < 160 for ch in name):
        raise ApiError(422, "invalid_run_name", "a run name may not contain '/' or control characters")
    if name in (".", ".."):  # URL clients normalise these path segments away: such a run could not be addressed
        raise ApiError(422, "invalid_run_name", "a run name may not be '.' or '..'")
    return name


def _bad(message: str, details: Optional[List[Any]] = None) -> ApiError:
    return ApiError(422, "invalid_body", message, details)


def _first_bad(column: Sequence[Any], ok) -> int:
    for i, item in enumerate(column):
        if not ok(item):
            return i
    return -1


def parse_points(points: Any) -> Tuple[Sequence[str], Sequence[int], List[float], Sequence[float], Sequence[int]]:
    """Validate the ``points`` array column-wise; returns ``(metrics, steps, values, wall_times, ranks)``.

    A point is ``[metric, step, value, wall_time]`` or ``[… , rank]``. The fast path checks each
    column's set of element types and its min/max with C-level builtins; only when something is
    wrong does a Python loop find the first offending point for the error message.
    """
    if not isinstance(points, list):
        raise _bad("`points` must be an array of [metric, step, value, wall_time(, rank)] arrays")
    if not points:
        return (), (), [], (), ()
    if set(map(type, points)) != {list}:
        i = _first_bad(points, lambda p: type(p) is list)
        raise _bad(f"points[{i}] is not an array", [{"index": i}])
    lengths = set(map(len, points))
    if not lengths <= {4, 5}:
        i = _first_bad(points, lambda p: len(p) in (4, 5))
        raise _bad(f"points[{i}] has {len(points[i])} elements; a point is [metric, step, value, wall_time] "
                   "or [metric, step, value, wall_time, rank]", [{"index": i}])
    if lengths == {4}:
        metrics, steps, values, walls = zip(*points)
        ranks: Sequence[int] = (RUN_LEVEL_RANK,) * len(points)
    elif lengths == {5}:
        metrics, steps, values, walls, ranks = zip(*points)
    else:
        metrics, steps, values, walls, ranks = zip(*(p if len(p) == 5 else p + [RUN_LEVEL_RANK] for p in points))

    def fail(column: str, i: int, why: str):
        raise _bad(f"points[{i}]: {column} {why}", [{"index": i, "field": column}])

    if set(map(type, metrics)) != {str}:
        fail("metric", _first_bad(metrics, lambda m: type(m) is str), "must be a string")
    if min(map(len, metrics)) < 1 or max(map(len, metrics)) > MAX_METRIC_LENGTH:
        fail("metric", _first_bad(metrics, lambda m: 1 <= len(m) <= MAX_METRIC_LENGTH),
             f"must have 1 to {MAX_METRIC_LENGTH} characters")
    if set(map(type, steps)) != {int}:
        fail("step", _first_bad(steps, lambda s: type(s) is int), "must be an integer")
    if min(steps) < 0 or max(steps) > INT64_MAX:
        fail("step", _first_bad(steps, lambda s: 0 <= s <= INT64_MAX), "must be between 0 and 2**63-1")
    if set(map(type, ranks)) != {int}:
        fail("rank", _first_bad(ranks, lambda r: type(r) is int), "must be an integer")
    if min(ranks) < -1 or max(ranks) > 2**31 - 1:
        fail("rank", _first_bad(ranks, lambda r: -1 <= r <= 2**31 - 1), "must be -1 (run level) or a rank ≥ 0")
    wall_types = set(map(type, walls))
    if not wall_types <= {int, float}:
        fail("wall_time", _first_bad(walls, lambda w: type(w) in _NUMBER), "must be a number (seconds since the epoch)")
    try:
        wall_array = np.array(walls, dtype=np.float64)
    except OverflowError:
        wall_array = np.array([math.inf])
    if not np.isfinite(wall_array).all():
        fail("wall_time", _first_bad(walls, lambda w: -1e18 < w < 1e18), "must be finite")
    value_types = set(map(type, values))
    if value_types <= {float, int}:
        out_values = list(values)
    else:
        out_values = []
        for i, v in enumerate(values):
            t = type(v)
            if t is float or t is int:
                out_values.append(v)
            elif v is None:
                out_values.append(math.nan)
            elif t is str and v in _NONFINITE_IN:
                out_values.append(_NONFINITE_IN[v])
            else:
                fail("value", i, 'must be a number, "NaN", "Infinity", "-Infinity" or null')
    if int in value_types:
        try:
            out_values = [float(v) for v in out_values]
        except OverflowError:
            fail("value", _first_bad(values, lambda v: type(v) is not int or abs(v) < 1e308), "is too large for a float64")
    return metrics, steps, out_values, walls, ranks


def _parse_acks(acks: Any) -> List[Tuple[str, int]]:
    if acks is None:
        return []
    if not isinstance(acks, list):
        raise _bad("`acks` must be an array of {\"decision_id\": …, \"applied_step\": …} objects")
    out = []
    for i, ack in enumerate(acks):
        if not isinstance(ack, dict) or type(ack.get("decision_id")) is not str or type(ack.get("applied_step")) is not int \
                or not 0 <= ack["applied_step"] <= INT64_MAX:
            raise _bad(f"acks[{i}] must be {{\"decision_id\": string, \"applied_step\": integer ≥ 0}}", [{"index": i}])
        out.append((ack["decision_id"], ack["applied_step"]))
    return out


def _check_depth(value: Any, what: str, limit: int = MAX_JSON_DEPTH) -> Any:
    """422 when ``value`` nests arrays/objects deeper than ``limit`` (iterative: no recursion to
    exhaust). Deeper documents could be stored but not written back as JSON by any response."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > limit:
                    raise _bad(f"{what} nests objects/arrays deeper than {limit} levels")
                stack.append((child, depth + 1))
    return value


def _object(body: Any, what: str = "the body") -> Dict[str, Any]:
    if not isinstance(body, dict):
        raise _bad(f"{what} must be a JSON object")
    return body


def _validate_action(action: Any) -> Dict[str, Any]:
    if not isinstance(action, dict) or not action:
        raise _bad('`action` must be an object such as {"phase": 2, "alpha": 0.1, "beta": 0.1, "lr": 0.01}')
    _check_depth(action, "`action`")
    if action.get("phase", 2) not in (1, 2) or type(action.get("phase", 2)) is not int:
        raise _bad("action.phase must be 1 or 2")
    for key in ("alpha", "beta", "lr"):
        if key in action and (type(action[key]) not in _NUMBER or not math.isfinite(action[key])):
            raise _bad(f"action.{key} must be a finite number")
    return action


def create_app(store_url: Optional[str] = None, *, auth: bool = True, max_body: int = DEFAULT_MAX_BODY,
               metrics_auth: bool = False, store: Optional[Store] = None, migrate: bool = True,
               rate_limiter: Optional[RateLimiter] = None, metrics_cache_s: float = 1.0,
               token_cache_s: float = 5.0, stale_after: float = DEFAULT_STALE_AFTER_S,
               freeze_gc: bool = False) -> FastAPI:
    """The collector app on ``store_url`` (or an open ``store``).

    ``auth=False`` serves everything without tokens: only for loopback binds (the CLI enforces
    it). ``max_body`` bounds request bodies (413). ``metrics_auth`` requires a ``read`` token on
    ``/metrics``. ``rate_limiter`` is the per-token hook (``auth.TokenBucket``: 429 with
    ``Retry-After``). ``migrate`` runs the Alembic migrations on open (the CLI runs them once before
    starting several workers instead). ``stale_after`` (seconds, 0: never): while the app runs, a
    background sweep marks ``running`` runs that sent no points for that long ``interrupted``,
    and an interrupted run that sends points again ``running`` (``Store.sweep_stale_runs``).
    ``freeze_gc``: on start-up, move everything allocated so far (the imported libraries) out of
    the garbage collector's sight (``_freeze_heap``); for server processes (``app_from_env``).
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

    app = FastAPI(title="moxco collector", version="1", openapi_url="/api/v1/openapi.json",
                  docs_url="/api/v1/docs", redoc_url=None, lifespan=lifespan,
                  description="Training-diagnostics collector: ingest, queries, decisions (docs/api.md).")
    app.state.store = store
    max_body_ = max_body
    verifier = TokenVerifier(store, cache_s=token_cache_s)
    exposition = Exposition(store, cache_s=metrics_cache_s)
    health = exposition.health
    app.state.exposition = exposition

    # --- plumbing ---------------------------------------------------------------------------------

    async def principal_for(request: Request, scope: str) -> Principal:
        if not auth:
            return ANONYMOUS
        header = request.headers.get("authorization")
        principal = await run_in_threadpool(verifier.authenticate, header)
        verifier.authorize(principal, scope)
        if rate_limiter is not None:
            wait = rate_limiter(principal, scope)
            if wait is not None:
                raise ApiError(429, "rate_limited", f"too many requests for token {principal.name!r}",
                               headers={"Retry-After": str(max(1, math.ceil(wait)))})
        return principal

    async def read_json(request: Request, limit: Optional[int] = MAX_SMALL_BODY) -> Any:
        """The request body parsed as JSON; 413 as soon as it exceeds ``max_body`` (checked on the
        declared length first, then on the bytes actually received), 400 when it is not JSON.
        Bodies other than batches (``limit=None``) are held to ``MAX_SMALL_BODY`` as well."""
        max_body = min(limit, max_body_) if limit is not None else max_body_
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body:
            raise ApiError(413, "body_too_large", f"the body is {int(declared)} bytes; the limit is {max_body}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body:
                raise ApiError(413, "body_too_large", f"the body exceeds the limit of {max_body} bytes")
            chunks.append(chunk)
        body = b"".join(chunks)
        if not body:
            raise ApiError(400, "malformed_json", "the body is empty; expected a JSON object")
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, "malformed_json", f"the body is not valid JSON: {exc}. Non-finite values are "
                           'written as the strings "NaN", "Infinity", "-Infinity"') from None

    async def store_call(fn, *args, **kwargs):
        """``fn`` in the thread pool. A pooled connection found dead (the database restarted) fails
        that call with ``connection_invalidated`` and SQLAlchemy drops the pool's older connections;
        the call is then made once more on a fresh connection. Every store call is one transaction
        and idempotent (batch ids, first acknowledgement wins, insert-ignore), so this is safe."""
        try:
            return await run_in_threadpool(fn, *args, **kwargs)
        except sa_exc.DBAPIError as exc:
            if not exc.connection_invalidated:
                raise
            log.warning("a pooled store connection was dead (%s); retrying on a fresh one", type(exc.orig).__name__)
            return await run_in_threadpool(fn, *args, **kwargs)

    class Measure:
        """Request duration, status and error counters for every HTTP request, and any exception
        the handlers let through answered in the JSON error format. A plain ASGI middleware:
        Starlette's ``BaseHTTPMiddleware`` (``@app.middleware``) runs the app in a task of its
        own and re-streams its response, ~6 % of a worker's time at full ingest load."""

        def __init__(self, inner) -> None:
            self.inner = inner

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
                response = error_response(_to_api_error(exc))
                status = response.status_code
                await response(scope, receive, send)
            path = getattr(scope.get("route"), "path", "unmatched")
            health.requests.labels(scope["method"], path, str(status)).observe(time.perf_counter() - start)
            if status >= 400:
                health.errors.labels(_error_kind(status)).inc()

    app.add_middleware(Measure)

    def _to_api_error(exc: Exception) -> ApiError:
        if isinstance(exc, ApiError):
            return exc
        if isinstance(exc, AuthError):
            return ApiError(exc.status, "unauthorized" if exc.status == 401 else "forbidden", exc.message,
                            headers={"WWW-Authenticate": "Bearer"} if exc.status == 401 else None)
        if isinstance(exc, NotFoundError):
            return ApiError(404, "not_found", str(exc))
        if isinstance(exc, ConflictError):
            return ApiError(409, "conflict", str(exc))
        if isinstance(exc, (StoreError, ValueError)):
            return ApiError(422, "invalid_value", str(exc))
        refusal = _store_refusal(exc)
        if refusal is not None:
            log.warning("store refuses writes: %s", exc)
            return refusal
        if isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError,
                            sa_exc.DisconnectionError)):
            log.warning("store unavailable: %s", exc)
            return ApiError(503, "store_unavailable", f"the store is unavailable: {type(exc).__name__}; retry later",
                            headers={"Retry-After": str(RETRY_AFTER_S)})
        if isinstance(exc, sa_exc.DataError):
            return ApiError(422, "invalid_value", f"the store refused a value: {exc.orig}")
        log.exception("internal error")
        return ApiError(500, "internal", f"internal error ({type(exc).__name__}); see the collector's log")

    for exc_type in (ApiError, AuthError, StoreError, ValueError, sa_exc.SQLAlchemyError):
        app.add_exception_handler(exc_type, lambda request, exc: error_response(_to_api_error(exc)))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        details = [{"loc": list(e.get("loc", ())), "message": e.get("msg", "")} for e in exc.errors()]
        first = details[0] if details else {"loc": [], "message": "invalid request"}
        where = ".".join(str(p) for p in first["loc"])
        return error_response(ApiError(422, "invalid_parameter", f"{where}: {first['message']}", details))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(ApiError(exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None)))

    # --- health and metrics -----------------------------------------------------------------------

    @app.get("/healthz", tags=["ops"])
    async def healthz():
        try:
            await store_call(store.ping)
        except Exception as exc:  # noqa: BLE001 - any failure to reach the store
            return json_response({"status": "unavailable", "store": f"error: {type(exc).__name__}"}, 503,
                                 {"Retry-After": str(RETRY_AFTER_S)})
        return json_response({"status": "ok", "store": "ok"})

    @app.get("/metrics", tags=["ops"])
    async def metrics(request: Request):
        if metrics_auth:
            await principal_for(request, "read")
        body = await store_call(exposition.render)
        return Response(body, media_type=CONTENT_TYPE)

    # --- runs -------------------------------------------------------------------------------------

    def _run_fields(body: Dict[str, Any], *, partial: bool) -> Dict[str, Any]:
        allowed = {"config", "optimizer", "policy", "status"}
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise _bad(f"unknown fields {unknown}; a run has {sorted(allowed)}")
        fields: Dict[str, Any] = {}
        _check_depth(body, "the run")
        if "config" in body and body["config"] is not None:
            fields["config"] = _object(body["config"], "`config`")
        if "optimizer" in body:
            if body["optimizer"] is not None:
                _object(body["optimizer"], "`optimizer`")
            fields["optimizer"] = body["optimizer"]
        if "policy" in body:
            if body["policy"] is not None:
                _object(body["policy"], "`policy`")
            fields["policy"] = body["policy"]
        if "status" in body:
            if body["status"] not in RUN_STATUSES:
                raise _bad(f"`status` must be one of {list(RUN_STATUSES)}")
            fields["status"] = body["status"]
        return fields

    def _run_json(run: Dict[str, Any]) -> Dict[str, Any]:
        return run

    run_body = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "properties": {"config": {"type": "object"}, "optimizer": {"type": "object"},
                                         "policy": {"type": "object", "nullable": True},
                                         "status": {"type": "string", "enum": list(RUN_STATUSES)}}}}}}}

    @app.put("/api/v1/runs/{run}", tags=["ingest"], openapi_extra=run_body)
    async def put_run(run: str, request: Request):
        validate_run_name(run)
        await principal_for(request, "ingest")
        fields = _run_fields(_object(await read_json(request)), partial=False)
        return json_response(_run_json(await store_call(store.put_run, run, create=True, **fields)))

    @app.patch("/api/v1/runs/{run}", tags=["ingest"], openapi_extra=run_body)
    async def patch_run(run: str, request: Request):
        validate_run_name(run)
        await principal_for(request, "ingest")
        fields = _run_fields(_object(await read_json(request)), partial=True)
        return json_response(_run_json(await store_call(store.put_run, run, create=False, **fields)))

    @app.get("/api/v1/runs", tags=["read"])
    async def list_runs(request: Request, name: Optional[str] = Query(None, max_length=400),
                        status: Optional[str] = Query(None, pattern="^(" + "|".join(RUN_STATUSES) + ")$"),
                        since: Optional[float] = None, until: Optional[float] = None,
                        limit: int = Query(100, ge=1, le=10_000), offset: int = Query(0, ge=0, le=INT64_MAX)):
        await principal_for(request, "read")
        total, page = await store_call(store.list_runs, name=name, status=status, since=since, until=until,
                                       limit=limit, offset=offset)
        return json_response({"runs": page, "total": total, "limit": limit, "offset": offset})

    @app.get("/api/v1/runs/{run}", tags=["read"])
    async def get_run(run: str, request: Request):
        validate_run_name(run)
        await principal_for(request, "read")
        return json_response(_run_json(await store_call(store.run_detail, run)))

    # --- ingest -----------------------------------------------------------------------------------

    batch_body = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "required": ["batch_id", "points"],
        "properties": {"batch_id": {"type": "string", "minLength": 1, "maxLength": MAX_BATCH_ID_LENGTH},
                       "points": {"type": "array", "items": {"type": "array", "minItems": 4, "maxItems": 5}},
                       "acks": {"type": "array", "items": {"type": "object"}}}}}}}}

    @app.post("/api/v1/runs/{run}/batches", tags=["ingest"], openapi_extra=batch_body)
    async def ingest(run: str, request: Request):
        validate_run_name(run)
        await principal_for(request, "ingest")
        try:
            body = _object(await read_json(request, limit=None))
            batch_id = body.get("batch_id")
            if type(batch_id) is not str or not 1 <= len(batch_id) <= MAX_BATCH_ID_LENGTH:
                raise _bad(f"`batch_id` must be a string of 1 to {MAX_BATCH_ID_LENGTH} characters")
            unknown = sorted(set(body) - {"batch_id", "points", "acks"})
            if unknown:
                raise _bad(f"unknown fields {unknown}; a batch has batch_id, points, acks")
            columns = parse_points(body.get("points", []))
            acks = _parse_acks(body.get("acks"))
            result = await store_call(store.ingest, run, batch_id, *columns, acks=acks)
        except Exception:
            health.batches.labels("rejected").inc()
            raise
        if result.duplicate:
            health.batches.labels("duplicate").inc()
        else:
            health.batches.labels("stored").inc()
            health.points.inc(result.stored)
        return json_response({"batch_id": batch_id, "stored": result.stored, "duplicate": result.duplicate,
                              "decisions": [_decision_json(d) for d in result.pending],
                              "unknown_acks": result.unknown_acks})

    # --- decisions --------------------------------------------------------------------------------

    @app.get("/api/v1/runs/{run}/decisions/pending", tags=["ingest"])
    async def pending(run: str, request: Request):
        validate_run_name(run)
        await principal_for(request, "ingest")
        rows = await store_call(store.run_decisions, run, pending_only=True)
        return json_response({"decisions": [_decision_json(d) for d in rows]})

    @app.post("/api/v1/runs/{run}/decisions/{decision_id}/ack", tags=["ingest"], openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["applied_step"], "properties": {"applied_step": {"type": "integer"}}}}}}})
    async def ack(run: str, decision_id: str, request: Request):
        validate_run_name(run)
        await principal_for(request, "ingest")
        body = _object(await read_json(request))
        step = body.get("applied_step")
        if type(step) is not int or not 0 <= step <= INT64_MAX:
            raise _bad("`applied_step` must be an integer ≥ 0")
        return json_response(_decision_json(await store_call(store.ack, run, decision_id, step)))

    @app.post("/api/v1/runs/{run}/decisions", tags=["decide"], openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["action"],
            "properties": {"action": {"type": "object"}, "step": {"type": "integer"}, "reason": {"type": "string"}}}}}}})
    async def operator_decision(run: str, request: Request):
        validate_run_name(run)
        principal = await principal_for(request, "decide")
        body = _object(await read_json(request))
        unknown = sorted(set(body) - {"action", "step", "reason"})
        if unknown:
            raise _bad(f"unknown fields {unknown}; an operator decision has action, step, reason")
        action = _validate_action(body.get("action"))
        step = body.get("step")
        if step is not None and (type(step) is not int or not 0 <= step <= INT64_MAX):
            raise _bad("`step` must be an integer ≥ 0")
        reason = body.get("reason")
        if reason is not None and (type(reason) is not str or len(reason) > 1000):
            raise _bad("`reason` must be a string of at most 1000 characters")
        if reason is None and principal.token_id is not None:
            reason = f"issued with token {principal.name!r}"
        decision, created = await store_call(store.operator_decision, run, action, step=step, reason=reason)
        return json_response(_decision_json(decision), 201 if created else 200)

    @app.get("/api/v1/runs/{run}/decisions", tags=["read"])
    async def all_decisions(run: str, request: Request):
        validate_run_name(run)
        await principal_for(request, "read")
        rows = await store_call(store.run_decisions, run)
        return json_response({"decisions": [_decision_json(d) for d in rows]})

    # --- queries ----------------------------------------------------------------------------------

    @app.get("/api/v1/runs/{run}/latest", tags=["read"])
    async def latest(run: str, request: Request, rank: int = Query(RUN_LEVEL_RANK, ge=-1, le=2**31 - 1)):
        validate_run_name(run)
        await principal_for(request, "read")
        rows = await store_call(store.latest_points, run, rank=rank)
        return json_response({"run": run, "rank": rank, "metrics": {
            m: {"step": s, "value": json_float(v), "wall_time": w} for m, (s, v, w) in sorted(rows.items())}})

    @app.get("/api/v1/runs/{run}/series/{metric}", tags=["read"])
    async def series(run: str, metric: str, request: Request,
                     start_step: Optional[int] = Query(None, ge=0, le=INT64_MAX),
                     end_step: Optional[int] = Query(None, ge=0, le=INT64_MAX),
                     start_time: Optional[float] = None, end_time: Optional[float] = None,
                     rank: int = Query(RUN_LEVEL_RANK, ge=-1, le=2**31 - 1),
                     max_points: int = Query(2000, ge=1, le=MAX_SERIES_POINTS),
                     method: str = Query("minmax", pattern="^(minmax|lttb|none)$")):
        validate_run_name(run)
        await principal_for(request, "read")

        def work():
            if method == "minmax" and start_time is None and end_time is None:
                # from the block summaries (storage.series_minmax): ~1,000 rows for 1 M points
                got = store.series_minmax(run, metric, rank=rank, start=start_step, end=end_step,
                                          max_points=max_points)
                if got is not None:
                    total, steps, values, walls = got
                    return {"run": run, "metric": metric, "rank": rank, "total": total, "downsampled": True,
                            "method": method, "steps": steps.tolist(), "values": json_floats(values),
                            "wall_times": walls.tolist()}
            steps, values, walls = store.series_columns(run, metric, rank=rank)
            lo, hi = 0, steps.size
            if start_step is not None:
                lo = int(np.searchsorted(steps, start_step, side="left"))
            if end_step is not None:
                hi = int(np.searchsorted(steps, end_step, side="right"))
            steps, values, walls = steps[lo:hi], values[lo:hi], walls[lo:hi]
            if start_time is not None or end_time is not None:
                keep = np.ones(steps.size, dtype=bool)
                if start_time is not None:
                    keep &= walls >= start_time
                if end_time is not None:
                    keep &= walls <= end_time
                steps, values, walls = steps[keep], values[keep], walls[keep]
            total = int(steps.size)
            if method == "none" and total > max_points:
                raise ApiError(422, "too_many_points", f"the range holds {total} points, more than max_points="
                               f"{max_points}; narrow the range, raise max_points (≤ {MAX_SERIES_POINTS}) or "
                               "use method=minmax or lttb")
            index = ds.downsample(steps, values, max_points, method)
            downsampled = index.size < total
            if downsampled:
                steps, values, walls = steps[index], values[index], walls[index]
            return {"run": run, "metric": metric, "rank": rank, "total": total, "downsampled": downsampled,
                    "method": method if downsampled else "none", "steps": steps.tolist(),
                    "values": json_floats(values), "wall_times": walls.tolist()}

        return json_response(await store_call(work))

    # --- built-in pages: /, /runs/{run}, /static/… (collector/pages.py) ------------------------------
    from moxco.collector.pages import mount_pages

    mount_pages(app)
    _document_errors(app)
    return app


# --- failure modes of the store -----------------------------------------------------------------------


def _store_refusal(exc: Exception) -> Optional[ApiError]:
    """A store that answers but refuses writes: read-only (SQLite file or folder not writable,
    PostgreSQL ``default_transaction_read_only``/hot standby: SQLSTATE 25006) → 503
    ``store_read_only``; out of space (SQLite ``SQLITE_FULL``, PostgreSQL 53100) → 507
    ``store_full``. Both carry ``Retry-After``: nothing was stored, the same request can be sent
    again once an operator has fixed the store (the agent keeps it in its spool meanwhile)."""
    if not isinstance(exc, sa_exc.DBAPIError):
        return None
    orig = exc.orig
    sqlstate = getattr(orig, "sqlstate", None)
    text = str(orig).lower()
    headers = {"Retry-After": str(RETRY_AFTER_S)}
    if sqlstate == "25006" or "readonly database" in text or "read-only file system" in text:
        return ApiError(503, "store_read_only", "the store is read-only and refuses writes (nothing was stored); "
                        "retry later. Operator: make the database writable again", headers=headers)
    if sqlstate in ("53100", "53000") or "database or disk is full" in text or "no space left" in text:
        return ApiError(507, "store_full", "the store's disk is full (nothing was stored); retry later. "
                        "Operator: free space or grow the volume", headers=headers)
    return None


def _freeze_heap() -> None:
    """``gc.collect()`` then ``gc.freeze()``: the ~10^6 objects of the imported stack (FastAPI,
    pydantic, SQLAlchemy, NumPy, moxco) go to the permanent generation. Without it every full
    (generation-2) collection walked all of them: 70–80 ms during which the worker answered nothing,
    triggered every few seconds by the containers a batch's JSON allocates, which was the periodic
    ~100 ms p99 stall that bench/load.py saw even at 5 batches/s (docs/benchmarks-collector.md).
    Frozen objects are never collected; they are the modules and their data, which live as long as
    the process anyway."""
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


_ERROR_SCHEMA = {
    "type": "object", "required": ["error"], "additionalProperties": False,
    "properties": {"error": {"type": "object", "required": ["status", "code", "message", "details"],
                             "properties": {"status": {"type": "integer"}, "code": {"type": "string"},
                                            "message": {"type": "string"}, "details": {"type": "array"}}}}}
_ERROR_STATUSES = {400: "malformed JSON", 401: "missing or unknown token", 403: "the token lacks the scope",
                   404: "unknown run or decision", 409: "conflict", 413: "body too large",
                   422: "invalid parameters or body", 429: "rate limited (see Retry-After)",
                   503: "store unavailable or read-only (see Retry-After)", 507: "store disk full (see Retry-After)"}


def _document_errors(app: FastAPI) -> None:
    """Describe every error answer in the OpenAPI document (the ``Error`` schema above, instead of
    FastAPI's default validation-error schema), the 201 of an operator decision, and the run-name
    rule on ``{run}`` path parameters, so clients and schema checkers (schemathesis) see what the
    app really answers."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> Dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
        components["Error"] = _ERROR_SCHEMA
        error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
        for path, operations in schema.get("paths", {}).items():
            for method, operation in operations.items():
                responses = operation.setdefault("responses", {})
                if path == "/metrics":
                    responses["200"] = {"description": "Prometheus text exposition", "content": {
                        "text/plain": {"schema": {"type": "string"}}}}
                if path == "/healthz":
                    responses["503"] = {"description": "the store is unreachable", "content": {
                        "application/json": {"schema": {"type": "object"}}}}
                    continue
                for status, what in _ERROR_STATUSES.items():
                    responses[str(status)] = {"description": what, "content": error}
                if path.endswith("/decisions") and method == "post":
                    responses["201"] = {"description": "decision created", "content": {
                        "application/json": {"schema": {"type": "object"}}}}
                for parameter in operation.get("parameters", []):
                    if parameter.get("in") == "path" and parameter.get("name") == "run":
                        parameter["schema"] = {"type": "string", "minLength": 1, "maxLength": 200,
                                               "pattern": "^[^/\\u0000-\\u001f\\u007f-\\u009f]+$",
                                               "title": "Run"}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi


def _error_kind(status: int) -> str:
    return {400: "malformed", 401: "unauthorized", 403: "forbidden", 404: "not_found", 409: "conflict",
            413: "too_large", 422: "invalid", 429: "rate_limited", 503: "store_unavailable"}.get(
        status, "server" if status >= 500 else "client")


def app_from_env() -> FastAPI:
    """The app for a uvicorn worker process, configured by ``moxco serve`` through the environment:
    ``MOXCO_STORE_URL``, ``MOXCO_AUTH`` (``0`` off), ``MOXCO_MAX_BODY``, ``MOXCO_METRICS_AUTH``,
    ``MOXCO_RATE_LIMIT``/``MOXCO_RATE_BURST`` (per-token requests/s, burst), ``MOXCO_STALE_AFTER``.
    Migrations already ran in the parent process. SQLite WAL checkpoints run in a thread of the
    worker (``Store(background_checkpoint=True)``) and the imported stack is frozen out of the
    garbage collector's full passes (``_freeze_heap``): both used to stall requests."""
    url = os.environ.get("MOXCO_STORE_URL")
    if not url:
        raise RuntimeError("MOXCO_STORE_URL is not set (start the collector with `moxco serve`)")
    rate = float(os.environ.get("MOXCO_RATE_LIMIT") or 0)
    burst = os.environ.get("MOXCO_RATE_BURST")
    # checkpoints off the request path (storage._Checkpointer); PostgreSQL ignores the flag
    store = Store(url, migrate=False, background_checkpoint=True)
    return create_app(store=store, auth=os.environ.get("MOXCO_AUTH", "1") != "0",
                      max_body=int(os.environ.get("MOXCO_MAX_BODY", DEFAULT_MAX_BODY)),
                      metrics_auth=os.environ.get("MOXCO_METRICS_AUTH", "0") == "1",
                      rate_limiter=TokenBucket(rate, float(burst) if burst else None) if rate > 0 else None,
                      stale_after=float(os.environ.get("MOXCO_STALE_AFTER", DEFAULT_STALE_AFTER_S)),
                      freeze_gc=True)


__all__ = ["ApiError", "DEFAULT_MAX_BODY", "app_from_env", "create_app", "parse_points"]
