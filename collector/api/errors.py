"""Errors of the collector's API: one JSON shape, one mapping from exceptions to statuses.

Every error is ``{"error": {"status", "code", "message", "details"}}``: 4xx for any bad input
(names and values the wire refuses, actions the decision type refuses, bodies that do not match
their schema), 503 with ``Retry-After`` when the store cannot be reached or is read-only, 507 when
its disk is full, and a 500 only for a bug (logged with its traceback).
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException

from starlette.requests import ClientDisconnect

from moxco.collector.auth import AuthError
from moxco.collector.store import (BusyError, ConflictError, ForbiddenError, NotFoundError, StoreError, StoreLostError,
                                   TooLargeError)
from moxco.decision import DecisionError
from moxco.wire import WireError

log = logging.getLogger("moxco.collector")

RETRY_AFTER_S = 2


class ApiError(Exception):
    """An error answered as ``{"error": {...}}`` with ``status``."""

    def __init__(self, status: int, code: str, message: str, details: Optional[List[Any]] = None,
                 headers: Optional[Dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.details = details or []
        self.headers = headers or {}


def invalid(message: str, details: Optional[List[Any]] = None) -> ApiError:
    """422 ``invalid_body``: the body (or a value in it) is refused."""
    return ApiError(422, "invalid_body", message, details)


def json_response(payload: Any, status: int = 200, headers: Optional[Dict[str, str]] = None) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json", headers=headers)


def error_response(err: ApiError) -> Response:
    return json_response({"error": {"status": err.status, "code": err.code, "message": err.message,
                                    "details": err.details}}, err.status, err.headers)


def wire_error(exc: WireError) -> ApiError:
    """A name or point the wire format refuses: 422, naming the field (and the point's index); a
    document over its size limit: 413."""
    if exc.too_large:
        return ApiError(413, "too_large", str(exc), [{"field": exc.field}] if exc.field else None)
    if exc.field == "run":
        return ApiError(422, "invalid_run_name", str(exc))
    detail = {"field": exc.field} if exc.field else {}
    if exc.index is not None:
        detail["index"] = exc.index
    return invalid(str(exc), [detail] if detail else None)


def store_refusal(exc: Exception) -> Optional[ApiError]:
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


def to_api_error(exc: Exception) -> ApiError:
    """Any exception a route lets through, as the error it answers."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, AuthError):
        return ApiError(exc.status, "unauthorized" if exc.status == 401 else "forbidden", exc.message,
                        headers={"WWW-Authenticate": "Bearer"} if exc.status == 401 else None)
    if isinstance(exc, ClientDisconnect):
        # the client went away mid-request (a trainer killed during an upload): nothing to answer
        return ApiError(499, "client_disconnected", "the client closed the connection before its request was read")
    if isinstance(exc, NotFoundError):
        return ApiError(404, "not_found", str(exc))
    if isinstance(exc, BusyError):
        return ApiError(409, "run_busy", str(exc))
    if isinstance(exc, ConflictError):
        return ApiError(409, "conflict", str(exc))
    if isinstance(exc, ForbiddenError):
        return ApiError(403, "forbidden", str(exc))
    if isinstance(exc, TooLargeError):
        return ApiError(413, "too_large", str(exc))
    if isinstance(exc, StoreLostError):
        log.error("%s", exc)
        return ApiError(503, "store_lost", f"{exc}. Operator: restart the collector",
                        headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, WireError):
        return wire_error(exc)
    if isinstance(exc, DecisionError):
        return ApiError(422, "invalid_decision", str(exc))
    if isinstance(exc, (StoreError, ValueError)):
        return ApiError(422, "invalid_value", str(exc))
    refusal = store_refusal(exc)
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
    log.exception("internal error", exc_info=exc)
    return ApiError(500, "internal", f"internal error ({type(exc).__name__}); see the collector's log")


def error_kind(status: int) -> str:
    """The ``kind`` label of ``moxco_collector_errors_total`` for an error status."""
    return {400: "malformed", 401: "unauthorized", 403: "forbidden", 404: "not_found", 409: "conflict",
            413: "too_large", 415: "unsupported_media_type", 422: "invalid", 429: "rate_limited",
            499: "client_disconnected", 503: "store_unavailable"}.get(status, "server" if status >= 500 else "client")


def install(app: FastAPI) -> None:
    """Answer every exception in the JSON error shape: ours, FastAPI's parameter validation (422
    ``invalid_parameter``), Starlette's HTTP errors (404 unknown path, 405 wrong method)."""
    for exc_type in (ApiError, AuthError, StoreError, StoreLostError, ValueError, ClientDisconnect,
                     sa_exc.SQLAlchemyError):
        app.add_exception_handler(exc_type, lambda request, exc: error_response(to_api_error(exc)))

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


ERROR_SCHEMA = {
    "type": "object", "required": ["error"], "additionalProperties": False,
    "properties": {"error": {"type": "object", "required": ["status", "code", "message", "details"],
                             "properties": {"status": {"type": "integer"}, "code": {"type": "string"},
                                            "message": {"type": "string"}, "details": {"type": "array"}}}}}
ERROR_STATUSES = {400: "malformed JSON", 401: "missing or unknown token",
                  403: "the token lacks the scope, or may not write this run; a non-loopback Host or Origin without auth",
                  404: "unknown run or decision", 409: "conflict (another live writer session: run_busy)",
                  413: "body, config or optimizer too large", 415: "the body is not application/json",
                  422: "invalid parameters or body", 429: "rate limited (see Retry-After)",
                  503: "store unavailable or read-only (see Retry-After)", 507: "store disk full (see Retry-After)"}
