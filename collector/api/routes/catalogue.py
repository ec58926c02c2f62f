"""``GET /api/v1/catalogue``: the metric catalogue (``moxco.catalogue.to_json()``), for the run page
and any client: every metric's meaning, formula and paper, and the page's sections and panels."""

from __future__ import annotations

from typing import Optional

import orjson
from fastapi.responses import Response

from moxco import catalogue as _catalogue
from moxco.collector.api.routes.base import JSON_OBJECT, Route

_BODY: Optional[bytes] = None  # the catalogue is fixed for the life of the process


async def catalogue():
    """The metric catalogue as JSON (no token needed: it holds no data)."""
    global _BODY
    if _BODY is None:
        _BODY = orjson.dumps(_catalogue.to_json())
    return Response(_BODY, media_type="application/json")


ROUTES = (
    Route(("GET",), "/api/v1/catalogue", catalogue, "public",
          responses={200: {"description": "sections, panels, metrics and groups", "content": JSON_OBJECT}}),
)
