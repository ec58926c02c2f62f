"""Reading whole series out of the store in bounded pieces: the exports' source, and ``frame``.

A long series is read in windows of whole ``BLOCK_STEPS``-step blocks, planned from the block
summaries (``series_blocks``: the point count of every block, ~1,000 rows for 1 M points), so a
window holds at most ``EXPORT_CHUNK_POINTS`` points (or one block, 1,024 steps, when a single block
is larger than that for a wide table). Each window is one range read on its own connection: an
export of any length holds one window in memory, never the series. Points are append-only and the
first write of a step wins, so windows read one after the other give every point once.
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from sqlalchemy import select

from moxco import catalogue
from moxco.collector.schema import BLOCK_STEPS, RUN_LEVEL_RANK, latest_points, series_blocks

EXPORT_CHUNK_POINTS = 32_768  # points read per window (all the table's metrics together)

Columns = Tuple[np.ndarray, np.ndarray, np.ndarray]
Table = Tuple[np.ndarray, np.ndarray, Dict[str, np.ndarray], Dict[str, np.ndarray]]  # one window of a run's table


class Export:
    """Bounded reads of whole series and of a run as one table (a mixin of ``Store``)."""

    def export_metrics(self, name: str, *, rank: int = RUN_LEVEL_RANK) -> List[str]:
        """The metrics run ``name`` has at ``rank``: the catalogue's in catalogue order, then the
        user's own series by name (the column order of a run's table)."""
        lp = latest_points.c
        with self.engine.connect() as conn:
            run_id = self._run_id(conn, name)
            have = set(conn.execute(select(lp.metric).where(lp.run_id == run_id, lp.rank == rank)).scalars())
        known = [m for m in catalogue.ALL if m in have]
        return known + sorted(have - set(known))

    def _windows(self, run_id: int, metrics: Sequence[str], rank: int, start: Optional[int], end: Optional[int],
                 chunk_points: int) -> List[Tuple[int, int]]:
        """Step ranges ``[lo, hi]`` of consecutive stored blocks holding at most ``chunk_points``
        points of ``metrics`` together (at least one block each), within ``[start, end]``."""
        sb = series_blocks.c
        query = select(sb.block, sb["count"]).where(sb.run_id == run_id, sb.metric.in_(list(metrics)), sb.rank == rank)
        if start is not None:
            query = query.where(sb.block >= int(start) // BLOCK_STEPS)
        if end is not None:
            query = query.where(sb.block <= int(end) // BLOCK_STEPS)
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(sb.block)).all()
        counts: Dict[int, int] = {}
        for block, count in rows:
            counts[block] = counts.get(block, 0) + int(count)
        windows: List[Tuple[int, int]] = []
        first = last = None
        held = 0
        for block in sorted(counts):
            if first is not None and (held + counts[block] > chunk_points or block != last + 1):
                windows.append((first, last))
                first, held = None, 0
            if first is None:
                first = block
            last, held = block, held + counts[block]
        if first is not None:
            windows.append((first, last))
        out = []
        for b0, b1 in windows:
            lo, hi = b0 * BLOCK_STEPS, (b1 + 1) * BLOCK_STEPS - 1
            out.append((lo if start is None else max(lo, int(start)), hi if end is None else min(hi, int(end))))
        return out

    def series_chunks(self, name: str, metric: str, *, rank: int = RUN_LEVEL_RANK, start: Optional[int] = None,
                      end: Optional[int] = None, chunk_points: int = EXPORT_CHUNK_POINTS) -> Iterator[Columns]:
        """The points of one series within steps ``[start, end]`` as ``(steps, values, wall_times)``
        arrays of at most ``chunk_points`` points each (non-empty, in step order; NaN and ±Inf as
        stored). ``NotFoundError`` at once (not when iterated) when there is no such run."""
        with self.engine.connect() as conn:
            run_id = self._run_id(conn, name)
        return self._series_windows(run_id, metric, rank, start, end, chunk_points)

    def _series_windows(self, run_id: int, metric: str, rank: int, start: Optional[int], end: Optional[int],
                        chunk_points: int) -> Iterator[Columns]:
        for lo, hi in self._windows(run_id, [metric], rank, start, end, chunk_points):
            with self.engine.connect() as conn:
                cols = self.sql.load_columns(conn, run_id, metric, rank, lo - 1, hi)
            if cols[0].size:
                yield cols

    def table_chunks(self, name: str, metrics: Optional[Sequence[str]] = None, *, rank: int = RUN_LEVEL_RANK,
                     start: Optional[int] = None, end: Optional[int] = None,
                     chunk_points: int = EXPORT_CHUNK_POINTS) -> Iterator[Table]:
        """Run ``name`` as one table, wide by step, in windows: ``(steps, wall_times, values,
        present)`` with ``values[metric]`` (NaN where the metric has no point at that step) and
        ``present[metric]`` (whether it has one, so a stored NaN is told from a missing point).
        ``wall_times`` is the earliest wall time of the step's points. ``metrics`` defaults to every
        metric of the run at ``rank`` (``export_metrics``). ``NotFoundError`` at once (not when
        iterated) when there is no such run."""
        metrics = list(self.export_metrics(name, rank=rank) if metrics is None else metrics)
        with self.engine.connect() as conn:
            run_id = self._run_id(conn, name)
        return self._table_windows(run_id, metrics, rank, start, end, chunk_points)

    def _table_windows(self, run_id: int, metrics: List[str], rank: int, start: Optional[int], end: Optional[int],
                       chunk_points: int) -> Iterator[Table]:
        if not metrics:
            return
        for lo, hi in self._windows(run_id, metrics, rank, start, end, chunk_points):
            with self.engine.connect() as conn:
                read = {m: self.sql.load_columns(conn, run_id, m, rank, lo - 1, hi) for m in metrics}
            steps = np.unique(np.concatenate([c[0] for c in read.values()]))
            if not steps.size:
                continue
            walls = np.full(steps.size, np.inf)
            values: Dict[str, np.ndarray] = {}
            present: Dict[str, np.ndarray] = {}
            for m, (st, va, wa) in read.items():
                idx = np.searchsorted(steps, st)
                column = np.full(steps.size, np.nan)
                column[idx] = va
                mask = np.zeros(steps.size, dtype=bool)
                mask[idx] = True
                walls[idx] = np.minimum(walls[idx], wa)
                values[m], present[m] = column, mask
            yield steps, walls, values, present

    def frame(self, name: str, metrics: Optional[Sequence[str]] = None, *, rank: int = RUN_LEVEL_RANK,
              start: Optional[int] = None, end: Optional[int] = None):
        """Run ``name`` as a pandas DataFrame wide by step: index ``step``, a ``wall_time`` column
        (the earliest of the step's points) and one float column per metric (``metrics``, default
        every metric of the run at ``rank``; NaN where a metric has no point at that step, and for
        a stored NaN). Needs pandas: ``pip install 'moxco[export]'``."""
        try:
            import pandas as pd
        except ModuleNotFoundError:
            raise ModuleNotFoundError("Store.frame needs pandas: pip install 'moxco[export]'", name="pandas") from None
        metrics = list(self.export_metrics(name, rank=rank) if metrics is None else metrics)
        parts = [pd.DataFrame({"wall_time": walls, **values}, index=pd.Index(steps, name="step"))
                 for steps, walls, values, _present in self.table_chunks(name, metrics, rank=rank, start=start, end=end)]
        if not parts:
            return pd.DataFrame({"wall_time": np.empty(0), **{m: np.empty(0) for m in metrics}},
                                index=pd.Index(np.empty(0, np.int64), name="step"))
        return pd.concat(parts)
