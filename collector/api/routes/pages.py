"""The collector's own pages: a runs list at ``/``, a live run page at ``/runs/{run}`` and a
page comparing runs at ``/compare?run=…&run=…``.

The pages are static HTML, CSS and JavaScript under ``collector/static/`` (no build step; the
charts are uPlot, vendored in ``static/vendor/``). They hold no data of their own: the browser reads
everything through the query API (docs/api.md: ``/api/v1/runs``, ``/runs/{run}``, ``/series``,
``/latest``, ``/decisions``, ``/export``, ``/catalogue``) with the same token any other client uses, so the pages
show exactly what the API serves and need no auth of their own. When auth is on, the page asks
once for a token with the ``read`` scope and keeps it in the tab's ``sessionStorage``.

The HTML is the same for every run (the script reads the run name from the URL), so the server
never puts a run name into markup; every value reaches the page as JSON and is written with
``textContent``. A Content-Security-Policy allowing only same-origin scripts is the second line of
defence. The static files are mounted at ``STATIC_PATH`` by ``app.create_app``.
"""

from __future__ import annotations

from pathlib import Path

from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from moxco.collector.api.routes.base import Route

STATIC_DIR = Path(__file__).resolve().parents[2] / "static"
STATIC_PATH = "/static"

# Same-origin scripts only (no inline script, no eval); uPlot sizes its elements through
# element.style, which CSP does not restrict, and the pages' own styles are in style.css.
HEADERS = {
    "Content-Security-Policy": ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                                "img-src 'self' data:; connect-src 'self'; object-src 'none'; "
                                "base-uri 'none'; frame-ancestors 'none'; form-action 'self'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # the HTML is tiny and must follow upgrades of the scripts it loads
    "Cache-Control": "no-cache",
}


class StaticWithHeaders(StaticFiles):
    """The pages' static files with the pages' security headers (their HTML is reachable under
    ``STATIC_PATH`` too, and every HTML page carries the Content-Security-Policy)."""

    async def get_response(self, path, scope):
        response = await super().get_response(path, scope)
        for key, value in HEADERS.items():
            if key != "Cache-Control":
                response.headers.setdefault(key, value)
        return response


def _page(name: str) -> FileResponse:
    return FileResponse(STATIC_DIR / name, media_type="text/html; charset=utf-8", headers=HEADERS)


async def runs_page() -> FileResponse:
    """The runs list."""
    return _page("index.html")


async def runs_redirect() -> RedirectResponse:
    return RedirectResponse("./", status_code=307)


async def run_page_by_query() -> FileResponse:
    """``/runs/?name=…``: the run page for names a path cannot carry (``.`` and ``..``)."""
    return _page("run.html")


async def compare_page() -> FileResponse:
    """Runs overlaid panel by panel; the script reads the runs from the URL (``?run=a&run=b``)."""
    return _page("compare.html")


async def run_page(run: str) -> FileResponse:
    """One run's page; the script reads the name from the URL and asks the API for the rest
    (a run that does not exist is reported by the page, from the API's 404)."""
    return _page("run.html")


ROUTES = (
    Route(("GET", "HEAD"), "/", runs_page, "public", in_schema=False),
    Route(("GET",), "/runs", runs_redirect, "public", in_schema=False),
    Route(("GET", "HEAD"), "/runs/", run_page_by_query, "public", in_schema=False),
    Route(("GET", "HEAD"), "/runs/{run}", run_page, "public", in_schema=False),
    Route(("GET", "HEAD"), "/compare", compare_page, "public", in_schema=False),
)
