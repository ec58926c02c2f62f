"""What routes depend on: the store, the authenticated principal (the route's scope checked), the
run name in the path, the request body, and store calls off the event loop.

``create_app`` puts a ``Services`` on ``app.state.services``; the dependencies read it from the
request. Every route of ``routes.ROUTES`` that is not ``public`` gets ``authorize(scope)`` as a
route dependency, so the scope is checked before the route runs, from the one table.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Optional

import orjson
from fastapi import Request
from sqlalchemy import exc as sa_exc
from starlette.concurrency import run_in_threadpool

from moxco.collector.api.errors import ApiError, wire_error
from moxco.collector.auth import ANONYMOUS, Principal, RateLimiter, TokenVerifier
from moxco.collector.prometheus import Exposition
from moxco.collector.store import Store
from moxco.wire import WireError, check_run_name

log = logging.getLogger("moxco.collector")

MAX_SMALL_BODY = 1024 * 1024  # run registration, decisions, acknowledgements: 413 above (batches: max_body)


@dataclass
class Services:
    """What the app's routes share: the store and its caches, auth, limits."""

    store: Store
    verifier: TokenVerifier
    exposition: Exposition
    auth: bool
    max_body: int
    rate_limiter: Optional[RateLimiter] = None


def services(request: Request) -> Services:
    return request.app.state.services


# Dependencies are ``async def``: FastAPI runs a plain ``def`` dependency in the thread pool, a
# thread hop per request for what is an attribute read.


async def get_store(request: Request) -> Store:
    """The app's store (``Depends(get_store)``)."""
    return request.app.state.services.store


def authorize(scope: str):
    """The route dependency that authenticates the request's bearer token and checks ``scope``
    (401 without a valid token, 403 without the scope, 429 over the token's rate limit); the
    principal is kept on ``request.state`` for ``principal``."""

    async def authorized(request: Request) -> Principal:
        s = services(request)
        if not s.auth:
            request.state.principal = ANONYMOUS
            return ANONYMOUS
        found = await run_in_threadpool(s.verifier.authenticate, request.headers.get("authorization"))
        s.verifier.authorize(found, scope)
        if s.rate_limiter is not None:
            wait = s.rate_limiter(found, scope)
            if wait is not None:
                raise ApiError(429, "rate_limited", f"too many requests for token {found.name!r}",
                               headers={"Retry-After": str(max(1, math.ceil(wait)))})
        request.state.principal = found
        return found

    authorized.scope = scope  # type: ignore[attr-defined]
    return authorized


def known_query(path: str, endpoint) -> Any:
    """The route dependency refusing query parameters the route does not take (422
    ``invalid_parameter`` naming them and the ones it takes): a misspelt or unsupported parameter
    (``?fromat=csv``) is an error, never silently ignored."""
    from fastapi.dependencies.utils import get_dependant

    allowed, todo = set(), [get_dependant(path=path, call=endpoint)]
    while todo:  # the endpoint's query parameters and those of its dependencies
        dependant = todo.pop()
        allowed |= {p.alias for p in dependant.query_params}
        todo.extend(dependant.dependencies)

    async def only_known(request: Request) -> None:
        unknown = sorted(set(request.query_params.keys()) - allowed)
        if unknown:
            takes = ", ".join(sorted(allowed)) or "none"
            raise ApiError(422, "invalid_parameter", f"unknown query parameter{'s' if len(unknown) > 1 else ''} "
                           f"{', '.join(map(repr, unknown))}; this route takes: {takes}",
                           [{"loc": ["query", name], "message": "unknown parameter"} for name in unknown])

    return only_known


async def principal(request: Request) -> Principal:
    """Who is calling (``Depends(principal)``), as the route's ``authorize`` found it."""
    return getattr(request.state, "principal", ANONYMOUS)


def limited_to_own_runs(caller: Principal) -> Optional[int]:
    """The store's ``token_id`` for ``caller``: its token's id when it writes only to the runs it
    registered (every token without ``admin``), None when it may write to any run (``admin``, or
    no auth)."""
    return None if caller.allows("admin") else caller.token_id


async def run_name(run: str) -> str:
    """The ``{run}`` path parameter, checked by ``moxco.wire.check_run_name`` (422 ``invalid_run_name``;
    the OpenAPI document describes the rule: ``app.RUN_NAME_SCHEMA``)."""
    try:
        return check_run_name(run)
    except WireError as exc:
        raise wire_error(exc) from None


async def read_json(request: Request, limit: Optional[int] = MAX_SMALL_BODY) -> Any:
    """The request body parsed as JSON; 413 as soon as it exceeds the limit (checked on the
    declared length first, then on the bytes actually received), 400 when it is not JSON. Batches
    (``limit=None``) are held to the app's ``max_body``, every other body to ``MAX_SMALL_BODY`` too.
    Only ``Content-Type: application/json`` is read (415 otherwise): a browser sends a cross-site
    ``application/json`` request only after a CORS preflight, which the collector never answers
    with permission, while ``text/plain`` or form posts need none."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise ApiError(415, "unsupported_media_type", "the body must be JSON sent with `Content-Type: "
                       f"application/json`, got {media or 'no Content-Type'!r}")
    max_body = services(request).max_body
    if limit is not None:
        max_body = min(limit, max_body)
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
