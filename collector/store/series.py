"""Reading series: whole series as NumPy arrays (cached), ranges, latest values, block summaries.

Reads never block the writer (SQLite WAL; PostgreSQL MVCC). ``latest_points`` (one row per
series, maintained by ingest) answers "latest values", the Prometheus scrape and "which metrics";
its ``version``/``rewrites`` counters validate ``SeriesCache``. ``series_blocks`` (one summary per
block of ``BLOCK_STEPS`` steps) answers ``minmax`` downsampling without reading the points.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from sqlalchemy import and_, case, false, func, or_, select

from moxco.collector import downsample as ds
from moxco.collector.schema import BLOCK_STEPS, RUN_LEVEL_RANK, SUMMARY_FIELDS, decisions, latest_points, runs, series_blocks
from moxco.collector.store.base import NotFoundError, from_db

_FIRST, _LAST = -(2**63), 2**63 - 1


class Latest(NamedTuple):
    """The newest point of a series (``Store.latest``): unpacks as ``step, value``."""

    step: int
    value: float


class SeriesCache:
    """Per-process cache of whole series as NumPy arrays, so a 1 M-point series is not re-read
    from the database on every dashboard refresh.

    Validity comes from the series' ``latest_points`` row (one primary-key lookup): same
    ``version``: nothing was written; same ``rewrites`` but a newer ``version``: only points after
    the cached last step were added (append-only training series), so only those are read; a new
    ``rewrites``: some write touched steps at or before the stored last step, so the series is
    read again in full. Entries are evicted least-recently-used beyond ``max_points`` in total.
    """

    def __init__(self, max_points: int) -> None:
        self.max_points = int(max_points)
        self._entries: "OrderedDict[Tuple[int, float, str, int], Tuple[int, int, np.ndarray, np.ndarray, np.ndarray]]" = OrderedDict()
        self._points = 0
        self._lock = threading.Lock()

    def get(self, sql, conn, run_id: int, metric: str, rank: int, created_at: float = 0.0):
        """``(steps, values, wall_times)`` of a series; ``sql`` is the store's dialect object.
        ``created_at`` (the run's) tells a deleted run's entries from those of a run registered
        later under the same id (SQLite may reuse the id of the newest row once it is deleted)."""
        lp = latest_points.c
        head = conn.execute(select(lp.version, lp.rewrites).where(
            lp.run_id == run_id, lp.metric == metric, lp.rank == rank)).first()
        empty = (np.empty(0, np.int64), np.empty(0), np.empty(0))
        if head is None:
            return empty
        key = (run_id, created_at, metric, rank)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
        if entry is not None and entry[0] == head.version and entry[1] == head.rewrites:
            return entry[2:]
        if entry is not None and entry[1] == head.rewrites and entry[2].size:
            more = sql.load_columns(conn, run_id, metric, rank, int(entry[2][-1]), _LAST)
            columns = tuple(np.concatenate([old, new]) for old, new in zip(entry[2:], more))
        else:
            columns = sql.load_columns(conn, run_id, metric, rank, _FIRST, _LAST)
        for column in columns:
            column.flags.writeable = False
        self._put(key, (head.version, head.rewrites, *columns))
        return columns

    def _put(self, key, entry) -> None:
        size = entry[2].size
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._points -= old[2].size
            if size > self.max_points:
                return
            self._entries[key] = entry
            self._points += size
            while self._points > self.max_points:
                _, evicted = self._entries.popitem(last=False)
                self._points -= evicted[2].size


class Series:
    """Series reads (a mixin of ``Store``)."""

    _series_cache: SeriesCache

    def series(self, name: str, metric: str, *, rank: int = RUN_LEVEL_RANK, start: Optional[int] = None,
               end: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of one metric, ordered by step, optionally within ``[start, end]``."""
        with self.engine.connect() as conn:
            run_id = self._run_id(conn, name)
            steps, values, _walls = self.sql.load_columns(conn, run_id, metric, rank,
                                                          _FIRST if start is None else int(start) - 1,
                                                          _LAST if end is None else int(end))
        return steps, values

    def metrics(self, name: str) -> List[str]:
        """Names of the metrics stored for run ``name`` (any rank)."""
        with self.engine.connect() as conn:
            run_id = self._run_id(conn, name)
            query = select(latest_points.c.metric).where(latest_points.c.run_id == run_id).distinct()
            return sorted(conn.execute(query).scalars())

    def latest(self, name: str, *, rank: int = RUN_LEVEL_RANK) -> Dict[str, "Latest"]:
        """``{metric: Latest(step, value)}``: the newest point of every metric of run ``name``, a
        named pair (``step, value = store.latest(run)["loss"]``; NaN and ±Inf as floats)."""
        return {m: Latest(s, v) for m, (s, v, _w) in sorted(self.latest_points(name, rank=rank).items())}

    def latest_points(self, name: str, *, rank: int = RUN_LEVEL_RANK) -> Dict[str, Tuple[int, float, float]]:
        """``{metric: (step, value, wall_time)}`` of the newest point of every metric of run ``name``."""
        lp = latest_points.c
        with self.engine.connect() as conn:
            run_id = self._run_id(conn, name)
            rows = conn.execute(select(lp.metric, lp.step, lp.value, lp.wall_time)
                                .where(lp.run_id == run_id, lp.rank == rank))
            return {m: (int(s), from_db(v), float(w)) for m, s, v, w in rows}

    def running_latest(self, *, metric_limit: Optional[int] = None, always: Sequence[str] = ()
                       ) -> List[Dict[str, Any]]:
        """Everything the Prometheus exposition needs: per *running* run its name, last step, last
        ingest time, decision count, ``{metric: value}`` of its run-level series and how many of
        them were ``left_out``. With ``metric_limit``, a run gives every series named in
        ``always`` (the catalogue) and, of the others, the first ``metric_limit`` by name; the
        database ranks and counts them, and sends only those."""
        lp, r = latest_points.c, runs.c
        with self.engine.connect() as conn:
            run_rows = conn.execute(select(r.id, r.name, r.last_step, r.last_ingest_at)
                                    .where(r.status == "running").order_by(r.id)).all()
            out = {row.id: {"name": row.name, "last_step": row.last_step, "last_ingest_at": row.last_ingest_at,
                            "decisions": 0, "metrics": {}, "left_out": 0} for row in run_rows}
            if not out:
                return []
            running = select(r.id).where(r.status == "running")
            mine = and_(lp.rank == RUN_LEVEL_RANK, lp.run_id.in_(running))
            if metric_limit is None:
                query = select(lp.run_id, lp.metric, lp.value).where(mine)
            else:
                known = lp.metric.in_(list(always)) if always else false()
                ranked = select(lp.run_id, lp.metric, lp.value, case((known, 1), else_=0).label("known"),
                                func.row_number().over(partition_by=(lp.run_id, known), order_by=lp.metric)
                                .label("n")).where(mine).subquery()
                query = select(ranked.c.run_id, ranked.c.metric, ranked.c.value).where(
                    or_(ranked.c.known == 1, ranked.c.n <= int(metric_limit)))
                for run_id, count in conn.execute(select(lp.run_id, func.count()).where(mine, ~known)
                                                  .group_by(lp.run_id)):
                    if run_id in out:
                        out[run_id]["left_out"] = max(0, int(count) - int(metric_limit))
            for run_id, metric, value in conn.execute(query):
                if run_id in out:
                    out[run_id]["metrics"][metric] = from_db(value)
            for run_id, count in conn.execute(
                    select(decisions.c.run_id, func.count()).where(decisions.c.run_id.in_(running))
                    .group_by(decisions.c.run_id)):
                if run_id in out:
                    out[run_id]["decisions"] = int(count)
        return list(out.values())

    def series_columns(self, name: str, metric: str, *, rank: int = RUN_LEVEL_RANK
                       ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(steps, values, wall_times)`` of a whole series as read-only NumPy arrays, from a
        per-process cache that reloads only what was appended since (see ``SeriesCache``)."""
        with self.engine.connect() as conn:
            row = conn.execute(select(runs.c.id, runs.c.created_at).where(runs.c.name == name)).first()
            if row is None:
                raise NotFoundError(f"no run named {name!r}")
            return self._series_cache.get(self.sql, conn, row.id, metric, rank, row.created_at)

    def block_summaries(self, name: str, metric: str, *, rank: int = RUN_LEVEL_RANK) -> Dict[str, np.ndarray]:
        """The stored ``series_blocks`` of one series, as ``downsample.block_summaries`` returns them."""
        with self.engine.connect() as conn:
            return self._blocks(conn, self._run_id(conn, name), metric, rank, None, None)

    def _blocks(self, conn, run_id: int, metric: str, rank: int, first_block: Optional[int],
                last_block: Optional[int]) -> Dict[str, np.ndarray]:
        sb = series_blocks.c
        query = select(sb.block, *[sb[f] for f in SUMMARY_FIELDS]).where(
            sb.run_id == run_id, sb.metric == metric, sb.rank == rank)
        if first_block is not None:
            query = query.where(sb.block >= first_block)
        if last_block is not None:
            query = query.where(sb.block <= last_block)
        rows = conn.execute(query.order_by(sb.block)).all()
        cols = list(zip(*rows)) if rows else [()] * (1 + len(SUMMARY_FIELDS))
        out: Dict[str, np.ndarray] = {"block": np.array(cols[0], dtype=np.int64)}
        for f, col in zip(SUMMARY_FIELDS, cols[1:]):
            if f.endswith("_step") or f == "count":
                out[f] = np.array([-1 if x is None else x for x in col], dtype=np.int64)
            else:
                out[f] = np.array([math.nan if x is None else x for x in col], dtype=np.float64)
        out["has_nan"] = np.array([x is not None for x in cols[1 + SUMMARY_FIELDS.index("nan_step")]], dtype=bool)
        return out

    def series_minmax(self, name: str, metric: str, *, rank: int = RUN_LEVEL_RANK, start: Optional[int] = None,
                      end: Optional[int] = None, max_points: int = 2000
                      ) -> Optional[Tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """``minmax`` downsampling of a series (optionally within steps ``[start, end]``) from its block
        summaries (``downsample.minmax_summaries``): ``(total points in range, steps, values,
        wall_times)``, reading ~1,000 summary rows for a 1 M-point series instead of its points. The
        blocks cut by ``start``/``end`` are summarised from their points. ``None`` when summaries
        do not apply: no such series, the range holds at most ``max_points`` points (the answer is
        every point), or it spans fewer blocks than ``max_points`` asks buckets (then the caller
        downsamples the points: ``series_columns``)."""
        B = BLOCK_STEPS
        with self.engine.connect() as conn:
            conn = self.sql.snapshot(conn)  # summaries and cut blocks from one snapshot
            run_id = self._run_id(conn, name)
            lo_block = None if start is None else int(start) // B
            hi_block = None if end is None else int(end) // B
            if lo_block is not None and hi_block is not None and hi_block - lo_block < 2:
                return None
            units = self._blocks(conn, run_id, metric, rank, lo_block, hi_block)
            if units["block"].size < 2:
                return None
            for k, cut in ((0, start is not None and units["first_step"][0] < start),
                           (-1, end is not None and units["last_step"][-1] > end)):
                if not cut:
                    continue
                b = int(units["block"][k])
                lo = max(b * B, int(start) if start is not None else b * B)
                hi = min((b + 1) * B - 1, int(end) if end is not None else (b + 1) * B - 1)
                part = ds.block_summaries(*self.sql.load_columns(conn, run_id, metric, rank, lo - 1, hi), B)
                if part["block"].size:
                    for f in (*SUMMARY_FIELDS, "has_nan"):
                        units[f][k] = part[f][0]
                else:
                    units["count"][k] = 0
        keep = units["count"] > 0
        units = {f: col[keep] for f, col in units.items()}
        total = int(units["count"].sum())
        per_bucket = 5 if units["has_nan"].any() else 4
        if total <= max_points or units["block"].size < max_points // per_bucket:
            return None
        got = ds.minmax_summaries(units, max_points)
        return None if got is None else (total, *got)
