"""Queries: a run's latest values and one series (ranges, downsampling, pages, exports)."""

from __future__ import annotations

from typing import Optional

import numpy as np
from fastapi import Depends, Query, Request
from starlette.convertors import Convertor, register_url_convertor

from moxco.collector import downsample as ds
from moxco.collector.api.deps import get_store, run_name, store_call
from moxco.collector.api.errors import ApiError, json_response, wire_error
from moxco.collector.api.routes.base import Route
from moxco.collector.api.routes.exports import EXPORT_RESPONSES, series_export, stream
from moxco.collector.store import Store
from moxco.wire import MAX_RANK, MAX_STEP, RUN_LEVEL_RANK, WireError, check_metric_name, json_float, json_floats

MAX_SERIES_POINTS = 100_000


class MetricNameConvertor(Convertor):
    """``{metric:metric_name}``: the rest of the path, "/" included (``val/loss``, as Lightning
    names what it logs), every character kept so that ``check_metric_name`` judges the whole name
    (Starlette's ``path`` convertor, ``.*``, stops before a trailing newline: ``loss%0A`` would read
    ``loss``)."""

    regex = "(?s:.+)"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("metric_name", MetricNameConvertor())


async def latest(run: str = Depends(run_name), rank: int = Query(RUN_LEVEL_RANK, ge=-1, le=MAX_RANK),
                 store: Store = Depends(get_store)):
    """The newest point of every metric of the run (at ``rank``; -1: run level)."""
    rows = await store_call(store.latest_points, run, rank=rank)
    return json_response({"run": run, "rank": rank, "metrics": {
        m: {"step": s, "value": json_float(v), "wall_time": w} for m, (s, v, w) in sorted(rows.items())}})


async def series(request: Request, metric: str, run: str = Depends(run_name),
                 start_step: Optional[int] = Query(None, ge=0, le=MAX_STEP),
                 end_step: Optional[int] = Query(None, ge=0, le=MAX_STEP),
                 start_time: Optional[float] = None, end_time: Optional[float] = None,
                 rank: int = Query(RUN_LEVEL_RANK, ge=-1, le=MAX_RANK),
                 max_points: int = Query(2000, ge=1, le=MAX_SERIES_POINTS),
                 method: str = Query("minmax", pattern="^(minmax|lttb|none)$"),
                 paged: bool = Query(False, description="with method=none: answer the range's first max_points "
                                                        "points and next_start_step instead of a 422"),
                 format: str = Query("json", pattern="^(json|csv|parquet)$",
                                     description="json, or every stored point of the range as csv or parquet"),
                 store: Store = Depends(get_store)):
    """One series within a step or time range, downsampled to at most ``max_points`` (``minmax``
    from the block summaries when no time range is given); ``method=none`` with ``paged=true``
    pages through it (``next_start_step``); ``format=csv|parquet`` streams every point of the
    range (``routes.exports``)."""
    try:
        check_metric_name(metric)  # the name rule of ingest: the same answer on both stores
    except WireError as exc:
        raise wire_error(exc) from None
    if format != "json":
        given = sorted({"method", "max_points", "paged"} & set(request.query_params))
        if given:
            raise ApiError(422, "invalid_parameter", f"{', '.join(given)}: format={format} exports every stored point "
                           "of the range (no downsampling, no pages); leave them out")
        await store_call(store.series_chunks, run, metric, rank=rank, start=start_step, end=end_step)  # 404 first
        chunks = series_export(store, run, metric, format, rank, start_step, end_step, start_time, end_time)
        return await stream(chunks, format, run, metric)
    if paged and method != "none":
        raise ApiError(422, "invalid_parameter", "paged: pages are of the stored points: use it with method=none")

    def work():
        if method == "minmax" and start_time is None and end_time is None:
            # from the block summaries (Store.series_minmax): ~1,000 rows for 1 M points
            got = store.series_minmax(run, metric, rank=rank, start=start_step, end=end_step, max_points=max_points)
            if got is not None:
                total, steps, values, walls = got
                return {"run": run, "metric": metric, "rank": rank, "total": total, "downsampled": True,
                        "method": method, "steps": steps.tolist(), "values": json_floats(values),
                        "wall_times": walls.tolist()}
        steps, values, walls = store.series_columns(run, metric, rank=rank)
        lo, hi = 0, steps.size
        if start_step is not None:
            lo = int(np.searchsorted(steps, start_step, side="left"))
        if end_step is not None:
            hi = int(np.searchsorted(steps, end_step, side="right"))
        steps, values, walls = steps[lo:hi], values[lo:hi], walls[lo:hi]
        if start_time is not None or end_time is not None:
            keep = np.ones(steps.size, dtype=bool)
            if start_time is not None:
                keep &= walls >= start_time
            if end_time is not None:
                keep &= walls <= end_time
            steps, values, walls = steps[keep], values[keep], walls[keep]
        total = int(steps.size)
        if method == "none" and paged:
            more = total > max_points
            next_start = int(steps[max_points]) if more else None
            steps, values, walls = steps[:max_points], values[:max_points], walls[:max_points]
            return {"run": run, "metric": metric, "rank": rank, "total": total, "downsampled": False,
                    "method": "none", "steps": steps.tolist(), "values": json_floats(values),
                    "wall_times": walls.tolist(), "next_start_step": next_start}
        if method == "none" and total > max_points:
            raise ApiError(422, "too_many_points", f"the range holds {total} points, more than max_points="
                           f"{max_points}; page through it (paged=true, then start_step=next_start_step), narrow "
                           f"the range, raise max_points (≤ {MAX_SERIES_POINTS}), export it (format=csv or "
                           "parquet) or use method=minmax or lttb")
        index = ds.downsample(steps, values, max_points, method)
        downsampled = index.size < total
        if downsampled:
            steps, values, walls = steps[index], values[index], walls[index]
        return {"run": run, "metric": metric, "rank": rank, "total": total, "downsampled": downsampled,
                "method": method if downsampled else "none", "steps": steps.tolist(),
                "values": json_floats(values), "wall_times": walls.tolist()}

    return json_response(await store_call(work))


ROUTES = (
    Route(("GET",), "/api/v1/runs/{run}/latest", latest, "read"),
    Route(("GET",), "/api/v1/runs/{run}/series/{metric:metric_name}", series, "read",
          responses={200: {"description": "the series as JSON, or CSV or Parquet with format",
                           "content": {"application/json": {"schema": {"type": "object"}},
                                       **EXPORT_RESPONSES[200]["content"]}}}),
)
