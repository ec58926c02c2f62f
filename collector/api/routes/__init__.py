"""The route table: every route the app serves, with the scope it needs, one module per resource.

``create_app`` builds the app from ``ROUTES`` alone (the scope of each row becomes the route's
authorization dependency and its OpenAPI tag), so a route cannot be served without a row, and a
test can iterate the table (every route of the app has a row and every row a route).
"""

from __future__ import annotations

from moxco.collector.api.routes import batches, catalogue, decisions, docs, exports, ops, pages, runs, series
from moxco.collector.api.routes.base import SCOPES, Route

ROUTES = (*ops.ROUTES, *docs.ROUTES, *catalogue.ROUTES, *runs.ROUTES, *batches.ROUTES, *decisions.ROUTES, *series.ROUTES,
          *exports.ROUTES, *pages.ROUTES)

__all__ = ["ROUTES", "Route", "SCOPES"]
