"""Data out: a series (``GET …/series/{metric}?format=csv|parquet``) or a whole run, wide by step
(``GET …/export?format=csv|parquet``), streamed as it is read.

The bytes come from ``moxco.collector.export`` over the store's bounded windows
(``Store.series_chunks``, ``Store.table_chunks``): the response starts before the series is read
to its end, and a worker holds one window (``EXPORT_CHUNK_POINTS`` points) of it at a time. The
generators run in Starlette's thread pool, never on the event loop.
"""

from __future__ import annotations

import re
from typing import Iterator, List, Optional
from urllib.parse import quote

from fastapi import Depends, Query
from fastapi.responses import StreamingResponse
from pydantic import Field
from typing_extensions import Annotated
from starlette.concurrency import run_in_threadpool

from moxco.collector import export
from moxco.collector.api.deps import get_store, run_name, store_call
from moxco.collector.api.errors import ApiError
from moxco.collector.api.routes.base import Route
from moxco.collector.store import Store
from moxco.wire import MAX_METRIC_NAME, MAX_RANK, MAX_STEP, RUN_LEVEL_RANK, WireError, check_metric_name

FORMAT_PATTERN = "^(csv|parquet)$"
MAX_METRICS = 32  # metric parameters per export request (more: leave them out to get every metric)
EXPORT_RESPONSES = {200: {"description": "the points as CSV or Parquet (streamed)",
                          "content": {"text/csv": {"schema": {"type": "string"}},
                                      "application/vnd.apache.parquet": {"schema": {"type": "string",
                                                                                    "format": "binary"}}}}}


def _filename(*parts: str, suffix: str) -> str:
    """``Content-Disposition`` for ``parts`` joined by ``-``: an ASCII fallback and the exact
    UTF-8 name (RFC 6266 / 5987); run and metric names may hold any printable character."""
    name = "-".join(parts) + "." + suffix
    ascii_name = re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("_") or f"export.{suffix}"
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(name, safe='')}"


async def stream(chunks: Iterator[bytes], fmt: str, *parts: str) -> StreamingResponse:
    """A streamed export. The generator's first piece is produced before the answer starts (the
    callers check the run before that), so a missing package is still a clean JSON error rather
    than a cut-off body."""
    try:
        first = await run_in_threadpool(next, chunks, b"")
    except ModuleNotFoundError as exc:
        raise ApiError(501, "not_installed", f"{exc} (on the collector)") from None

    def body() -> Iterator[bytes]:
        if first:
            yield first
        yield from chunks

    return StreamingResponse(body(), media_type=export.MEDIA_TYPES[fmt],
                             headers={"Content-Disposition": _filename(*parts, suffix=fmt),
                                      "Cache-Control": "no-store"})


def series_export(store: Store, run: str, metric: str, fmt: str, rank: int, start: Optional[int],
                  end: Optional[int], start_time: Optional[float], end_time: Optional[float]) -> Iterator[bytes]:
    """A series' bytes in ``fmt``: every stored point in the step (and wall-time) range."""
    chunks = store.series_chunks(run, metric, rank=rank, start=start, end=end)
    if start_time is not None or end_time is not None:
        chunks = _time_window(chunks, start_time, end_time)
    if fmt == "csv":
        return export.csv_series(chunks)
    return export.parquet_series(chunks, {"run": run, "metric": metric, "rank": rank})


def _time_window(chunks, start_time: Optional[float], end_time: Optional[float]):
    for steps, values, walls in chunks:
        keep = (walls >= (-float("inf") if start_time is None else start_time)) & \
               (walls <= (float("inf") if end_time is None else end_time))
        if keep.any():
            yield steps[keep], values[keep], walls[keep]


async def run_export(run: str = Depends(run_name), format: str = Query("csv", pattern=FORMAT_PATTERN),
                     metric: List[Annotated[str, Field(max_length=MAX_METRIC_NAME)]] = Query(
                         [], max_length=MAX_METRICS, description="the metrics to include (default: all)"),
                     rank: int = Query(RUN_LEVEL_RANK, ge=-1, le=MAX_RANK),
                     start_step: Optional[int] = Query(None, ge=0, le=MAX_STEP),
                     end_step: Optional[int] = Query(None, ge=0, le=MAX_STEP),
                     store: Store = Depends(get_store)):
    """The whole run as one table, wide by step: ``step``, ``wall_time`` (the earliest of the
    step's points), one column per metric (``metric``: some; default every metric of the run at
    ``rank``, catalogue order first), as CSV or Parquet."""
    for name in metric:
        try:
            check_metric_name(name)
        except WireError as exc:
            raise ApiError(422, "invalid_parameter", f"metric: {exc}") from None

    metrics = list(dict.fromkeys(metric)) or await store_call(store.export_metrics, run, rank=rank)
    rows = await store_call(store.table_chunks, run, metrics, rank=rank, start=start_step, end=end_step)
    if format == "csv":
        chunks = export.csv_table(metrics, rows)
    else:
        chunks = export.parquet_table(metrics, rows, {"run": run, "rank": rank})
    return await stream(chunks, format, run)


ROUTES = (
    Route(("GET",), "/api/v1/runs/{run}/export", run_export, "read", responses=EXPORT_RESPONSES),
)
