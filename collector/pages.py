"""The collector's own pages: a runs list at ``/`` and a live run page at ``/runs/{run}``.

The pages are static HTML, CSS and JavaScript under ``collector/static/`` (no build step; the
charts are uPlot, vendored in ``static/vendor/``). They hold no data of their own: the browser reads
everything through the query API (docs/api.md: ``/api/v1/runs``, ``/runs/{run}``, ``/series``,
``/latest``, ``/decisions``) with the same token any other client uses, so the pages show exactly
what the API serves and need no auth of their own. When auth is on, the page asks once for a
token with the ``read`` scope and keeps it in the tab's ``sessionStorage``.

``mount_pages(app)`` adds the routes to the collector app (``create_app`` calls it). The HTML is
the same for every run (the script reads the run name from the URL), so the server never puts a
run name into markup; every value reaches the page as JSON and is written with ``textContent``.
A Content-Security-Policy allowing only same-origin scripts is the second line of defence.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_PATH = "/static"

# Same-origin scripts only (no inline script, no eval); uPlot sizes its elements through
# element.style, which CSP does not restrict, and the pages' own styles are in style.css.
_HEADERS = {
    "Content-Security-Policy": ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                                "img-src 'self' data:; connect-src 'self'; object-src 'none'; "
                                "base-uri 'none'; frame-ancestors 'none'; form-action 'self'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # the HTML is tiny and must follow upgrades of the scripts it loads
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


def _page(name: str) -> FileResponse:
    return FileResponse(STATIC_DIR / name, media_type="text/html; charset=utf-8", headers=_HEADERS)


@router.api_route("/", methods=["GET", "HEAD"])
async def runs_page() -> FileResponse:
    """The runs list."""
    return _page("index.html")


@router.get("/runs")
async def runs_redirect() -> RedirectResponse:
    return RedirectResponse("./", status_code=307)


@router.api_route("/runs/", methods=["GET", "HEAD"])
async def run_page_by_query() -> FileResponse:
    """``/runs/?name=…``: the run page for names a path cannot carry (``.`` and ``..``)."""
    return _page("run.html")


@router.api_route("/runs/{run}", methods=["GET", "HEAD"])
async def run_page(run: str) -> FileResponse:
    """One run's page; the script reads the name from the URL and asks the API for the rest
    (a run that does not exist is reported by the page, from the API's 404)."""
    return _page("run.html")


def mount_pages(app: FastAPI) -> None:
    """Serve the pages (``/``, ``/runs/{run}``) and their static files (``/static/…``) from ``app``."""
    app.include_router(router)
    app.mount(STATIC_PATH, StaticFiles(directory=STATIC_DIR), name="static")


__all__ = ["STATIC_DIR", "mount_pages", "router"]
