"""The collector's HTTP API (docs/api.md), in the FastAPI full-stack template's shape:

* ``routes/``: one module per resource (runs, batches, decisions, series, ops, catalogue, pages),
  each a tuple of ``Route`` rows; ``routes.ROUTES`` is the one route → scope table;
* ``deps.py``: the store, the authenticated principal (the route's scope checked) and the run name
  as ``Depends``, body reading, store calls off the event loop;
* ``schemas.py``: one pydantic model per request body (its OpenAPI schema and its validation);
* ``errors.py``: ``ApiError``, the error JSON, the mapping from exceptions;
* ``app.py``: ``create_app`` (assembles routes, middleware, static files) and ``app_from_env``.
"""

from moxco.collector.api.app import DEFAULT_MAX_BODY, app_from_env, create_app
from moxco.collector.api.errors import ApiError
from moxco.collector.api.routes import ROUTES, SCOPES, Route

__all__ = ["ApiError", "DEFAULT_MAX_BODY", "ROUTES", "Route", "SCOPES", "app_from_env", "create_app"]
