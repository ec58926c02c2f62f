"""The API's own description: the OpenAPI document and its interactive page (Swagger UI)."""

from __future__ import annotations

from fastapi import Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse

from moxco.collector.api.errors import json_response
from moxco.collector.api.routes.base import Route

OPENAPI_PATH = "/api/v1/openapi.json"


async def openapi(request: Request):
    """The OpenAPI document (``app.openapi()``: every route in the schema, every error described)."""
    return json_response(request.app.openapi())


async def docs(request: Request) -> HTMLResponse:
    """Swagger UI on the OpenAPI document."""
    root = request.scope.get("root_path", "").rstrip("/")
    return get_swagger_ui_html(openapi_url=root + OPENAPI_PATH, title=f"{request.app.title} - Swagger UI")


ROUTES = (
    Route(("GET", "HEAD"), OPENAPI_PATH, openapi, "public", in_schema=False),
    Route(("GET", "HEAD"), "/api/v1/docs", docs, "public", in_schema=False),
)
