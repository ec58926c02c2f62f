"""Operations: ``/healthz`` (is the store reachable) and ``/metrics`` (the Prometheus exposition)."""

from __future__ import annotations

from fastapi import Depends, Request
from fastapi.responses import Response

from moxco.collector.api.deps import get_store, services, store_call
from moxco.collector.api.errors import RETRY_AFTER_S, json_response
from moxco.collector.api.routes.base import JSON_OBJECT, Route
from moxco.collector.prometheus import CONTENT_TYPE
from moxco.collector.store import Store


async def healthz(store: Store = Depends(get_store)):
    """``{"status": "ok", "store": "ok"}``; 503 when the store cannot be reached."""
    try:
        await store_call(store.ping)
    except Exception as exc:  # noqa: BLE001 - any failure to reach the store
        return json_response({"status": "unavailable", "store": f"error: {type(exc).__name__}"}, 503,
                             {"Retry-After": str(RETRY_AFTER_S)})
    return json_response({"status": "ok", "store": "ok"})


async def metrics(request: Request):
    """The Prometheus text exposition: the running runs' latest values and the collector's health."""
    body = await store_call(services(request).exposition.render)
    return Response(body, media_type=CONTENT_TYPE)


ROUTES = (
    Route(("GET",), "/healthz", healthz, "public", errors=False,
          responses={503: {"description": "the store is unreachable", "content": JSON_OBJECT}}),
    Route(("GET",), "/metrics", metrics, "public", guarded_scope="read",
          responses={200: {"description": "Prometheus text exposition",
                           "content": {"text/plain": {"schema": {"type": "string"}}}}}),
)
