"""Writing points: ``Store.ingest``, one batch in one transaction under the run's lock.

Per batch: lock the run's row and look its batch id up (a retried batch stores nothing and answers
``duplicate``); read the run's ``latest_points`` (is each series an append after its stored last
step?); insert the points (the dialect's ``insert_points``); maintain ``series_blocks`` (appends
merged into the stored summaries, other series' touched blocks summarised again from the stored
points), ``latest_points`` and ``runs.last_step``; record the acknowledgements; run the run's
decision policy on the batch's goodness points (``moxco.policy.decide``, state kept with the run);
record the batch id; read the pending decisions. The fixed statements are SQL text sent on the
DB-API connection (SQLAlchemy Core costs ~0.1 ms of Python per statement); the writes nothing reads
back ride with the last query (one round trip on PostgreSQL).
"""

from __future__ import annotations

import math
import time
from operator import lt as _lt
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from sqlalchemy import case
from sqlalchemy.dialects import sqlite

from moxco.collector import downsample as ds
from moxco.collector.schema import BLOCK_STEPS, SUMMARY_FIELDS, series_blocks
from moxco.collector.store.base import IngestResult, NotFoundError, StoreError, json_value
from moxco.collector.store.decisions import PENDING_SQL, decision_from_row
from moxco.collector.store.runs import check_writer
from moxco.wire import Columns, Point, WireError, check_batch_id, check_session, point_columns


def as_columns(points: Any) -> Columns:
    """``points`` as ``(metrics, steps, values, wall_times, ranks)``: the columns of
    ``wire.parse_points``/``wire.point_columns`` are taken as they are (already checked), anything
    else is an iterable of ``Point``s or ``(step, metric, value, wall_time[, rank])`` tuples, checked
    by ``wire.point_columns`` (``StoreError`` for a bad name or step)."""
    if (isinstance(points, tuple) and len(points) == 5 and all(isinstance(c, (list, tuple)) for c in points)
            and (not points[0] or isinstance(points[0][0], str))):
        return points
    try:
        return point_columns(points)
    except WireError as exc:
        raise StoreError(str(exc)) from None


class Points:
    """``Store.ingest`` and the write path behind it (a mixin of ``Store``)."""

    def ingest(self, name: str, points: Iterable[Point | Tuple] | Columns, *, batch_id: Optional[str] = None,
               acks: Sequence[Tuple] = (), token_id: Optional[int] = None, session: Optional[str] = None
               ) -> IngestResult:
        """Store one batch of run ``name`` in one transaction under the run's lock: the ``points``
        (``Point``s, or the columns of ``wire.parse_points``; a point already stored under its key
        ``(metric, rank, step)`` is kept, the first write wins), the acknowledgements ``acks``
        (``(decision id, applied step[, rejected reason])``: the first acknowledgement wins), the
        run's decision policy on the batch's run-level ``goodness`` points in step order, and the
        ``batch_id`` (the same id again stores nothing and reports ``duplicate``). Returns what was
        stored and every decision of the run not yet acknowledged. ``token_id``, ``session``: who
        writes (``runs.check_writer``: ``ForbiddenError``, ``BusyError``); a free run is taken by
        ``session``."""
        metrics_, steps, values, walls, ranks = as_columns(points)
        try:
            if batch_id is not None:
                check_batch_id(batch_id)
            if session is not None:
                check_session(session)
        except WireError as exc:
            raise StoreError(str(exc)) from None
        sql = self.sql
        with self._writer.begin() as conn, self._driver_errors(conn):
            raw = conn.connection.driver_connection
            found = sql.lock_run(raw, name, batch_id)
            if found is None:
                raise NotFoundError(f"no run named {name!r}")
            run_id, policy, policy_state, owner, held_by, status, last_ingest, updated, previous = found
            heard = max((t for t in (last_ingest, updated) if t is not None), default=None)
            check_writer(name, owner, held_by, status, heard, token_id, session, self.session_stale_after, time.time())
            policy = json_value(policy)  # SQLite: JSON text, where a NULL policy may be 'null'
            duplicate, stored = previous is not None, int(previous or 0)
            unknown_acks: List[str] = []
            new = []
            tail: List[Tuple[str, List[Tuple]]] = []  # writes nothing reads back: sent with the last query
            if session is not None and held_by != session:
                tail.append(("UPDATE runs SET session = ? WHERE id = ?", [(session, run_id)]))
            if not duplicate:
                if len(metrics_):
                    stored = self._write_columns(conn, run_id, metrics_, steps, values, walls, ranks, tail)
                decides = policy is not None and "goodness" in metrics_
                if acks or decides:  # these read and write through SQLAlchemy: flush first
                    sql.run_statements(raw, tail)
                    tail = []
                for ack in acks:
                    if not self._ack(conn, run_id, *ack):
                        unknown_acks.append(ack[0])
                if decides:
                    new = self._decide(conn, name, run_id, policy, json_value(policy_state), metrics_, steps,
                                       values, ranks)
                if batch_id is not None:
                    tail.append(("INSERT INTO batches (run_id, batch_id, stored, received_at) VALUES (?, ?, ?, ?)",
                                 [(run_id, batch_id, stored, time.time())]))
            pending = [decision_from_row(row, name) for row in sql.run_statements(raw, tail, (PENDING_SQL, (run_id,)))]
        return IngestResult(stored=stored, duplicate=duplicate, pending=pending, new=new, unknown_acks=unknown_acks)

    def _write_columns(self, conn, run_id: int, metrics_: Sequence[str], steps: Sequence[int],
                       values: Sequence[float], walls: Sequence[float], ranks: Sequence[int],
                       tail: List[Tuple[str, List[Tuple]]]) -> int:
        """Store the points and maintain ``latest_points``, ``series_blocks`` and ``runs.last_step``,
        inside the caller's transaction, which holds the run's lock. Returns the number of rows
        newly stored. The ``latest_points`` and ``runs`` writes, which nothing here reads back, are
        appended to ``tail`` as ``(sql, rows)`` for the caller to send together with its own.

        Rows are written sorted by key, so concurrent writers on PostgreSQL lock index entries in
        the same order (no deadlock); a key given twice in one batch keeps its first point (what
        insert-ignore keeps). A series whose points all come after its stored last step (the usual
        append; the run lock makes this exact) cannot conflict: its block summaries are merged into
        the stored ones and its points inserted as they are. Any other series (out of order,
        replayed, overlapping) keeps only its new steps and its touched blocks are summarised again
        from the stored points.
        """
        m, r, s, v, w = _key_order(metrics_, steps, values, walls, ranks)
        db_v = [None if x != x else x for x in v]
        n = len(m)
        # series as [lo, hi) ranges of the sorted rows
        bounds = [0] + [i for i in range(1, n) if m[i] != m[i - 1] or r[i] != r[i - 1]] + [n]
        series = [((m[lo], r[lo]), lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
        raw = conn.connection.driver_connection
        current = {(mm, rr): (st, ver, rew) for mm, rr, st, ver, rew in self.sql.rows(
            raw, "SELECT metric, rank, step, version, rewrites FROM latest_points WHERE run_id = ?", (run_id,))}
        appends = [key not in current or s[lo] > current[key][0] for key, lo, _hi in series]
        stored = self.sql.insert_points(raw, run_id, series, appends, current, m, r, s, v, db_v, w)
        self._update_blocks(conn, run_id, series, appends, s, v, w, tail)
        tail += _latest_statements(run_id, series, current, s, db_v, w)
        last_step = max(s)
        now = time.time()
        tail.append(("UPDATE runs SET last_step = CASE WHEN last_step IS NULL OR last_step < ? THEN ? ELSE last_step "
                     "END, updated_at = ?, last_ingest_at = ? WHERE id = ?", [(last_step, last_step, now, now, run_id)]))
        return stored

    def _update_blocks(self, conn, run_id: int, series, appends, s, v, w, tail: List[Tuple[str, List[Tuple]]]) -> None:
        """``series_blocks``: merge the summaries of appended points into the stored rows (a block
        after the stored last step has no row yet: inserted; the upsert is appended to ``tail``);
        summarise the touched blocks of other series again from the stored points (replaced now)."""
        merge: List[Dict[str, Any]] = []
        replace: List[Dict[str, Any]] = []
        append_ranges = [(key, lo, hi) for (key, lo, hi), ok in zip(series, appends) if ok]
        if append_ranges:
            idx = np.concatenate([np.arange(lo, hi) for _key, lo, hi in append_ranges])
            group = np.repeat(np.arange(len(append_ranges)), [hi - lo for _key, lo, hi in append_ranges])
            steps_a = np.asarray(s, dtype=np.int64)[idx]
            summary = ds.block_summaries(steps_a, np.asarray(v, dtype=np.float64)[idx],
                                         np.asarray(w, dtype=np.float64)[idx], BLOCK_STEPS, groups=group)
            keys = [append_ranges[g][0] for g in summary["group"].tolist()]
            merge = summary_rows(run_id, keys, summary)
        B = BLOCK_STEPS
        for (key, lo, hi), ok in zip(series, appends):
            if ok:
                continue
            touched = sorted({x // B for x in s[lo:hi]})
            runs_of_blocks, start = [], 0
            for k in range(1, len(touched) + 1):
                if k == len(touched) or touched[k] != touched[k - 1] + 1:
                    runs_of_blocks.append((touched[start], touched[k - 1]))
                    start = k
            for b0, b1 in runs_of_blocks:
                cols = self.sql.load_columns(conn, run_id, key[0], key[1], max(b0 * B - 1, -(2**63)), (b1 + 1) * B - 1)
                summary = ds.block_summaries(*cols, B)
                replace += summary_rows(run_id, [key] * summary["block"].size, summary)
        if merge:
            # plain SQL (the same text runs on both databases), so it can ride in the caller's tail
            tail.append((_blocks_merge_sql(), [tuple(row[c] for c in _BLOCK_COLUMNS) for row in merge]))
        if replace:
            conn.execute(self._blocks_replace(), replace)

    def _blocks_replace(self):
        """INSERT … ON CONFLICT DO UPDATE replacing ``series_blocks`` rows, in this store's dialect."""
        cached = _REPLACE.get(self.sql.name)
        if cached is None:
            cached = _REPLACE[self.sql.name] = blocks_statement(self.sql.insert(series_blocks), merge=False)
        return cached


_REPLACE: Dict[str, Any] = {}
_BLOCK_COLUMNS = ("run_id", "metric", "rank", "block", *SUMMARY_FIELDS)
_BLOCKS_MERGE_SQL: Optional[str] = None


def blocks_statement(stmt, *, merge: bool):
    """``stmt`` (a dialect's ``insert(series_blocks)``) made INSERT … ON CONFLICT DO UPDATE:
    ``merge`` combines the stored summary with the new one (count added; first/last/min/max/first
    NaN: whichever point comes first, last, lowest, highest; ties on min/max: the earlier step),
    else the new one replaces it."""
    ex, old = stmt.excluded, series_blocks.c
    if not merge:
        set_ = {f: ex[f] for f in SUMMARY_FIELDS}
    else:
        take = {
            "first": ex.first_step < old.first_step,
            "last": ex.last_step > old.last_step,
            "min": ex.min_step.isnot(None) & (old.min_step.is_(None) | (ex.min_value < old.min_value)
                                              | ((ex.min_value == old.min_value) & (ex.min_step < old.min_step))),
            "max": ex.max_step.isnot(None) & (old.max_step.is_(None) | (ex.max_value > old.max_value)
                                              | ((ex.max_value == old.max_value) & (ex.max_step < old.max_step))),
            "nan": ex.nan_step.isnot(None) & (old.nan_step.is_(None) | (ex.nan_step < old.nan_step)),
        }
        set_ = {"count": old["count"] + ex["count"]}
        for f in SUMMARY_FIELDS[1:]:
            set_[f] = case((take[f.split("_")[0]], ex[f]), else_=old[f])
    return stmt.on_conflict_do_update(index_elements=["run_id", "metric", "rank", "block"], set_=set_)


def _blocks_merge_sql() -> str:
    """The merging upsert of ``blocks_statement`` as SQL text with ``?`` placeholders in
    ``_BLOCK_COLUMNS`` order: SQLite's rendering, which PostgreSQL accepts as well (``ON CONFLICT
    … DO UPDATE SET … excluded.…``)."""
    global _BLOCKS_MERGE_SQL
    if _BLOCKS_MERGE_SQL is None:
        stmt = blocks_statement(sqlite.insert(series_blocks), merge=True)
        _BLOCKS_MERGE_SQL = str(stmt.compile(dialect=sqlite.dialect(), column_keys=list(_BLOCK_COLUMNS)))
    return _BLOCKS_MERGE_SQL


def summary_rows(run_id: int, keys: Sequence[Tuple[str, int]], summary: Mapping[str, np.ndarray]) -> List[Dict[str, Any]]:
    """``series_blocks`` rows from ``downsample.block_summaries`` arrays (NaN values and -1 steps
    of absent min/max/NaN points as NULL)."""
    cols = {f: summary[f].tolist() for f in ("block", *SUMMARY_FIELDS)}
    has_nan = summary["has_nan"].tolist()
    rows = []
    for k, (metric, rank) in enumerate(keys):
        row = {"run_id": run_id, "metric": metric, "rank": rank, "block": cols["block"][k], "count": cols["count"][k]}
        for f in ("first", "last"):
            row[f"{f}_step"] = cols[f"{f}_step"][k]
            value = cols[f"{f}_value"][k]
            row[f"{f}_value"] = None if value != value else value
            row[f"{f}_wall"] = cols[f"{f}_wall"][k]
        for f in ("min", "max"):
            ok = not math.isnan(cols[f"{f}_value"][k])
            row[f"{f}_step"] = cols[f"{f}_step"][k] if ok else None
            row[f"{f}_value"] = cols[f"{f}_value"][k] if ok else None
            row[f"{f}_wall"] = cols[f"{f}_wall"][k] if ok else None
        row["nan_step"] = cols["nan_step"][k] if has_nan[k] else None
        row["nan_wall"] = cols["nan_wall"][k] if has_nan[k] else None
        rows.append(row)
    return rows


def _key_order(metrics_: Sequence[str], steps: Sequence[int], values: Sequence[float], walls: Sequence[float],
               ranks: Sequence[int]) -> Tuple[List[str], List[int], List[int], List[float], List[float]]:
    """The points as columns sorted by ``(metric, rank, step)`` with a repeated key keeping its first
    point (what insert-ignore keeps). An agent's batch is usually in key order already: one C-level
    pass of tuple comparisons checks that, and the columns are taken as they are."""
    keys = list(zip(metrics_, ranks, steps))
    if all(map(_lt, keys, keys[1:])):
        return (list(metrics_), list(map(int, ranks)), list(map(int, steps)), list(map(float, values)),
                list(map(float, walls)))
    order = sorted(range(len(keys)), key=keys.__getitem__)
    uniq = order[:1]
    for i in order[1:]:
        if keys[i] != keys[uniq[-1]]:
            uniq.append(i)
    return ([metrics_[i] for i in uniq], [int(ranks[i]) for i in uniq], [int(steps[i]) for i in uniq],
            [float(values[i]) for i in uniq], [float(walls[i]) for i in uniq])


def _latest_statements(run_id: int, series, current, s, db_v, w) -> List[Tuple[str, List[Tuple]]]:
    """``latest_points`` writes for a batch, as ``(sql, rows)``: the newest point of each series,
    ``version`` +1, ``rewrites`` +1 when the write reaches back to or before the stored last step."""
    inserts, moved, kept = [], [], []
    for key, lo, hi in series:
        i = hi - 1  # newest point of the series in this write
        if key not in current:
            inserts.append((run_id, key[0], key[1], s[i], db_v[i], w[i]))
            continue
        old_step, version, rewrites = current[key]
        counters = (version + 1, rewrites + (1 if s[lo] <= old_step else 0))
        if s[i] > old_step:
            moved.append((s[i], db_v[i], w[i], *counters, run_id, key[0], key[1]))
        else:
            kept.append((*counters, run_id, key[0], key[1]))
    out = [("INSERT INTO latest_points (run_id, metric, rank, step, value, wall_time, version, rewrites) "
            "VALUES (?, ?, ?, ?, ?, ?, 1, 0)", inserts),
           ("UPDATE latest_points SET step = ?, value = ?, wall_time = ?, version = ?, rewrites = ? "
            "WHERE run_id = ? AND metric = ? AND rank = ?", moved),
           ("UPDATE latest_points SET version = ?, rewrites = ? WHERE run_id = ? AND metric = ? AND rank = ?", kept)]
    return [(sql, rows) for sql, rows in out if rows]
