"""SQLite: how points are inserted and read, and how the ingest path talks to the driver.

Points live in ``metric_points`` (``WITHOUT ROWID``, primary key ``(run_id, metric, rank, step)``):
an insert-ignore keeps the first write of a key, a range read is one ordered scan of the key.
NaN is stored as NULL (SQLite has no NaN). Writers are serialised (``engine._QueuedWriter`` and
``BEGIN IMMEDIATE``), so "lock the run" needs no SQL of its own and reads inside a write
transaction are current.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
from sqlalchemy import and_, exists, func, literal, select
from sqlalchemy.dialects import sqlite

SQLITE_INSERT_ROWS = 250  # rows per multi-row INSERT: 1,500 parameters, far under SQLite's limit

# the run's row and the batch-id check in one statement (writers are serialised: the read is current)
_LOCK_RUN = ("SELECT id, policy, policy_state, owner, session, status, last_ingest_at, updated_at, "
             "(SELECT stored FROM batches WHERE run_id = runs.id AND batch_id = ?) FROM runs WHERE name = ?")


class SQLite:
    """The SQLite side of the store (one object per ``Store``, chosen in ``engine.StoreCore``)."""

    name = "sqlite"

    def for_update(self, query):
        """``query`` as a row-locking read: SQLite serialises writers, so it is the query itself."""
        return query

    def insert(self, table):
        """The dialect's ``INSERT`` construct (``on_conflict_do_nothing``/``on_conflict_do_update``)."""
        return sqlite.insert(table)

    def json_array_has(self, column, item: str):
        """A condition: the JSON array in ``column`` holds the string ``item``."""
        each = func.json_each(column).table_valued("value")
        return exists(select(literal(1)).select_from(each).where(each.c.value == item))

    def json_path_equals(self, column, keys: Sequence[str], value: Any):
        """A condition: the JSON document in ``column`` holds ``value`` at ``keys`` (same JSON type:
        a number equals a number, a string a string, a bool a bool)."""
        path = "$" + "".join(f'."{k}"' for k in keys)
        kind, got = func.json_type(column, path), func.json_extract(column, path)
        if isinstance(value, bool):
            return kind == ("true" if value else "false")
        if isinstance(value, (int, float)):
            return and_(kind.in_(("integer", "real")), got == value)
        return and_(kind == "text", got == value)

    def delete_points(self, conn, run_id: int) -> None:
        """Delete every point of run ``run_id`` (inside the caller's write transaction)."""
        conn.exec_driver_sql("DELETE FROM metric_points WHERE run_id = ?", (run_id,))

    def snapshot(self, conn):
        """``conn`` reading one consistent snapshot across statements: a SQLite read transaction is."""
        return conn

    def rows(self, raw, sql: str, params: Sequence[Any]) -> List[Tuple]:
        """Rows of ``sql`` (``?`` placeholders) run on the DB-API connection ``raw``."""
        return raw.execute(sql, params).fetchall()

    def run_statements(self, raw, statements: Sequence[Tuple[str, Sequence[Tuple]]],
                       query: Optional[Tuple[str, Tuple]] = None) -> List[Tuple]:
        """Run ``(sql, rows)`` statements (one execution per row), then the optional ``query``,
        whose rows are returned."""
        for sql, rows in statements:
            raw.executemany(sql, rows)
        return raw.execute(*query).fetchall() if query else []

    def lock_run(self, raw, name: str, batch_id: Optional[str]) -> Optional[Tuple]:
        """``(run id, policy, policy state, owner, session, status, last ingest, updated, what batch
        ``batch_id`` stored or None)`` for the ingest transaction, or None when there is no such run."""
        found = raw.execute(_LOCK_RUN, (batch_id, name)).fetchall()
        return found[0] if found else None

    def insert_points(self, raw, run_id: int, series, appends, current, m, r, s, v, db_v, w) -> int:
        """Insert-ignore the key-sorted points with multi-row ``INSERT … VALUES (…), (…)`` statements
        of equal size (the sqlite3 module keeps them prepared): half the time of ``executemany``,
        which steps one single-row statement per point. Returns the rows newly stored."""
        before = raw.total_changes
        n = len(m)
        chunks = -(-n // SQLITE_INSERT_ROWS)
        size = -(-n // chunks)
        for lo in range(0, n, size):
            hi = min(n, lo + size)
            params: List[Any] = []
            for row in zip([run_id] * (hi - lo), m[lo:hi], r[lo:hi], s[lo:hi], db_v[lo:hi], w[lo:hi]):
                params.extend(row)
            raw.execute("INSERT OR IGNORE INTO metric_points (run_id, metric, rank, step, value, wall_time) VALUES "
                        + ",".join(["(?,?,?,?,?,?)"] * (hi - lo)), params)
        return raw.total_changes - before

    def load_columns(self, conn, run_id: int, metric: str, rank: int, after: int,
                     until: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(steps, values, wall_times)`` with ``after < step <= until``, ordered by step, through
        the C-level cursor (NULL comes back as NaN)."""
        cursor = conn.connection.driver_connection.execute(
            "SELECT step, value, wall_time FROM metric_points WHERE run_id = ? AND metric = ? AND rank = ? "
            "AND step > ? AND step <= ? ORDER BY step", (run_id, metric, rank, after, until))
        rows = cursor.fetchall()
        if not rows:
            return np.empty(0, np.int64), np.empty(0), np.empty(0)
        steps, values, walls = zip(*rows)
        return (np.array(steps, dtype=np.int64), np.array(values, dtype=np.float64),
                np.array(walls, dtype=np.float64))
