"""The API's own description: the OpenAPI document and its interactive page (Swagger UI).

Swagger UI is a page of scripts from a CDN (jsDelivr); a collector serves nothing from outside
unless asked, so the page is off by default (404 saying how to turn it on) and on with
``moxco serve --api-docs``, with a Content-Security-Policy that allows those scripts and its own
inline start-up script (by hash) and nothing else. The OpenAPI document is always served.
"""

from __future__ import annotations

import base64
import hashlib
import re

from fastapi import Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse

from moxco.collector.api.errors import ApiError, json_response
from moxco.collector.api.routes.base import Route

OPENAPI_PATH = "/api/v1/openapi.json"
CDN = "https://cdn.jsdelivr.net"


async def openapi(request: Request):
    """The OpenAPI document (``app.openapi()``: every route in the schema, every error described)."""
    return json_response(request.app.openapi())


async def docs(request: Request) -> HTMLResponse:
    """Swagger UI on the OpenAPI document, when the collector was started with ``--api-docs``."""
    if not getattr(request.app.state, "api_docs", False):
        raise ApiError(404, "not_found", "the interactive API docs are off: they load Swagger UI from a CDN. Start "
                       f"the collector with `moxco serve --api-docs` to serve them; the OpenAPI document is at "
                       f"{OPENAPI_PATH}")
    root = request.scope.get("root_path", "").rstrip("/")
    page = get_swagger_ui_html(openapi_url=root + OPENAPI_PATH, title=f"{request.app.title} - Swagger UI",
                               swagger_favicon_url=root + "/static/favicon.svg")
    inline = re.findall(rb"<script>(.*?)</script>", page.body, re.S)
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(script).digest()).decode()}'" for script in inline)
    page.headers["Content-Security-Policy"] = (
        f"default-src 'none'; script-src {CDN} {hashes}; style-src {CDN} 'unsafe-inline'; img-src 'self' data:; "
        "font-src data:; connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
        "form-action 'none'")
    page.headers["X-Content-Type-Options"] = "nosniff"
    page.headers["Referrer-Policy"] = "no-referrer"
    return page


ROUTES = (
    Route(("GET", "HEAD"), OPENAPI_PATH, openapi, "public", in_schema=False),
    Route(("GET", "HEAD"), "/api/v1/docs", docs, "public", in_schema=False),
)
