"""``GET /api/v1/catalogue``: the metric catalogue (``moxco.catalogue.to_json()``), for the run page
and any client: every metric's meaning, formula and paper, and the page's sections and panels."""

from __future__ import annotations

from typing import Dict, Tuple

import orjson
from fastapi.responses import Response

from moxco import catalogue as _catalogue
from moxco.collector.api.routes.base import JSON_OBJECT, Route

_CACHE: Dict[Tuple[int, ...], bytes] = {}


async def catalogue():
    """The metric catalogue as JSON (no token needed: it holds no data). Rendered once per
    catalogue (its metric, panel and section tuples), so an entry added at run time is served."""
    key = (id(_catalogue.METRICS), id(_catalogue.PANELS), id(_catalogue.SECTIONS), id(_catalogue.GROUPS))
    body = _CACHE.get(key)
    if body is None:
        _CACHE.clear()
        body = _CACHE[key] = orjson.dumps(_catalogue.to_json())
    return Response(body, media_type="application/json")


ROUTES = (
    Route(("GET",), "/api/v1/catalogue", catalogue, "public",
          responses={200: {"description": "sections, panels, metrics and groups", "content": JSON_OBJECT}}),
)
