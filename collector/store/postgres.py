"""PostgreSQL: points as chunks of arrays, binary parameters and reads, one round trip per batch.

Points live in ``point_chunks``: per write, one row per series and block of ``BLOCK_STEPS`` steps,
the steps, values (NaN kept as NaN) and wall times as ``int8[]``/``float8[]``. A series' chunks are
disjoint: a write that reaches back first drops the steps its series already has (first write
wins). Parameters and reads use PostgreSQL's binary formats, built and parsed by NumPy (no Python
object per point). The run's row is locked with ``SELECT … FOR UPDATE``; the ingest path's
statements go to the server in one pipeline.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from sqlalchemy import and_, case, cast, exists, func, literal, select
from sqlalchemy.dialects import postgresql
from sqlalchemy.types import JSON, Float, Text

from moxco.collector.schema import BLOCK_STEPS
from moxco.collector.store.base import StoreError

# After the row lock, the batch id is looked up in a statement of its own: a statement that waited
# for a row lock still reads with the snapshot it took before waiting, so a concurrent copy of the
# same batch committed meanwhile would not be seen and its id inserted twice.
_LOCK_RUN = ("SELECT id, policy, policy_state, owner, session, status, last_ingest_at, updated_at FROM runs "
             "WHERE name = %s FOR UPDATE")
_BATCH = "SELECT stored FROM batches WHERE run_id = %s AND batch_id = %s"

# Merge the chunks of one closed block of a series into one row, on the server, when it has more
# than one: the chunks are disjoint, so the merged arrays sorted by step hold every point once.
# Its seq (the series' version after this write) is above every merged chunk's.
_BLOCK_CHUNKS = ("FROM point_chunks WHERE run_id = %(run)s AND metric = %(metric)s AND rank = %(rank)s "
                 "AND block = %(block)s")
_COMPACT = (
    f"WITH gone AS (DELETE {_BLOCK_CHUNKS} AND (SELECT count(*) {_BLOCK_CHUNKS}) > 1 "
    "RETURNING steps, vals, walls) "
    "INSERT INTO point_chunks (run_id, metric, rank, block, seq, n, first_step, last_step, steps, vals, walls) "
    "SELECT %(run)s, %(metric)s, %(rank)s, %(block)s, %(seq)s, count(*), min(u.step), max(u.step), "
    "array_agg(u.step ORDER BY u.step), array_agg(u.value ORDER BY u.step), array_agg(u.wall_time ORDER BY u.step) "
    "FROM gone CROSS JOIN LATERAL unnest(gone.steps, gone.vals, gone.walls) AS u(step, value, wall_time) "
    "HAVING count(*) > 0")

_SQL: Dict[str, str] = {}


def pg_sql(sql: str) -> str:
    """``sql`` with SQLite's ``?`` placeholders as psycopg's ``%s`` (cached: the text is constant)."""
    out = _SQL.get(sql)
    if out is None:
        out = _SQL[sql] = sql.replace("%", "%%").replace("?", "%s")
    return out


class _BinaryArray(bytes):
    """A one-dimensional PostgreSQL array without NULLs in binary wire format, built by NumPy."""


_ARRAY_TYPES: Dict[str, Tuple[int, str, Any]] = {}  # name -> (element oid, NumPy dtype, bytes subclass)


def _array(kind: str, values: Sequence[Any]) -> bytes:
    """``values`` as a binary ``int8[]``/``float8[]`` parameter: a header and ``(length, value)``
    pairs in network byte order, written by NumPy in one pass (psycopg's own array dumper loops
    over the list in Python: ~2 ms for a 1,000-point batch's arrays)."""
    elem_oid, dtype, cls = _ARRAY_TYPES[kind]
    data = np.asarray(values, dtype=dtype)
    rows = np.empty(data.size, dtype=[("length", ">i4"), ("value", dtype)])
    rows["length"] = np.dtype(dtype).itemsize
    rows["value"] = data
    header = np.array([1, 0, elem_oid, data.size, 1], dtype=">i4").tobytes()
    return cls(header + rows.tobytes())


_COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
_COPY_ROW = np.dtype([("n", ">i2"), ("l1", ">i4"), ("step", ">i8"), ("l2", ">i4"), ("value", ">f8"),
                      ("l3", ">i4"), ("wall_time", ">f8")])


def parse_copy_binary(data: bytes) -> np.ndarray:
    """Rows of a PostgreSQL binary COPY of ``(bigint, float8, float8)`` with no NULLs, as a NumPy
    record array: every row has the same 38-byte layout, so NumPy reads them without a loop."""
    if not data.startswith(_COPY_SIGNATURE):
        raise StoreError("unexpected COPY output from PostgreSQL")
    ext = int.from_bytes(data[15:19], "big")
    start = 19 + ext
    body = len(data) - start - 2  # trailer: int16 -1
    if body % _COPY_ROW.itemsize:
        raise StoreError("unexpected COPY row layout from PostgreSQL")
    rows = np.frombuffer(data, dtype=_COPY_ROW, offset=start, count=body // _COPY_ROW.itemsize)
    if rows.size and not (np.all(rows["n"] == 3) and np.all(rows["l2"] == 8)):
        raise StoreError("unexpected COPY row layout from PostgreSQL")
    return rows


class PostgreSQL:
    """The PostgreSQL side of the store (one object per ``Store``, chosen in ``engine.StoreCore``)."""

    name = "postgresql"

    @staticmethod
    def register_arrays() -> None:
        """Teach psycopg to send ``_array``'s bytes as typed arrays. Connections copy the global
        adapters (SQLAlchemy's dialect copies them once, in ``create_engine``), so this runs before
        a PostgreSQL store's engine is created."""
        if _ARRAY_TYPES:
            return
        from psycopg import adapters
        from psycopg.adapt import Dumper
        from psycopg.pq import Format

        for kind, elem_oid, array_oid, dtype in (("int8", 20, 1016, ">i8"), ("float8", 701, 1022, ">f8")):
            cls = type(f"_PgArray_{kind}", (_BinaryArray,), {})
            dumper = type(f"_PgArrayDumper_{kind}", (Dumper,), {"format": Format.BINARY, "oid": array_oid,
                                                                "dump": lambda self, obj: obj})
            adapters.register_dumper(cls, dumper)
            _ARRAY_TYPES[kind] = (elem_oid, dtype, cls)

    def for_update(self, query):
        """``query`` locking the rows it reads until the transaction ends."""
        return query.with_for_update()

    def insert(self, table):
        """The dialect's ``INSERT`` construct (``on_conflict_do_nothing``/``on_conflict_do_update``)."""
        return postgresql.insert(table)

    def json_array_has(self, column, item: str):
        """A condition: the JSON array in ``column`` holds the string ``item``."""
        each = func.json_array_elements_text(column).table_valued("value")
        return exists(select(literal(1)).select_from(each).where(each.c.value == item))

    def json_path_equals(self, column, keys: Sequence[str], value: Any):
        """A condition: the JSON document in ``column`` holds ``value`` at ``keys`` (same JSON type:
        a number equals a number, a string a string, a bool a bool). The cast to a number happens
        only where the value is a JSON number (a CASE: PostgreSQL may evaluate AND's terms in any
        order)."""
        path = cast(postgresql.array(list(keys)), postgresql.ARRAY(Text))
        node = column.op("#>", return_type=JSON)(path)
        text = column.op("#>>", return_type=Text)(path)
        kind = func.json_typeof(node)
        if isinstance(value, bool):
            return and_(kind == "boolean", text == ("true" if value else "false"))
        if isinstance(value, (int, float)):
            return case((kind == "number", cast(text, Float)), else_=None) == float(value)
        return and_(kind == "string", text == value)

    def delete_points(self, conn, run_id: int) -> None:
        """Delete every point of run ``run_id`` (inside the caller's write transaction)."""
        conn.exec_driver_sql("DELETE FROM point_chunks WHERE run_id = %s", (run_id,))

    def snapshot(self, conn):
        """``conn`` reading one snapshot across statements (``REPEATABLE READ``)."""
        return conn.execution_options(isolation_level="REPEATABLE READ")

    def rows(self, raw, sql: str, params: Sequence[Any]) -> List[Tuple]:
        """Rows of ``sql`` (``?`` placeholders) run on the DB-API connection ``raw``."""
        with raw.cursor() as cur:
            cur.execute(pg_sql(sql), params)
            return cur.fetchall() if cur.description else []

    def run_statements(self, raw, statements: Sequence[Tuple[str, Sequence[Tuple]]],
                       query: Optional[Tuple[str, Tuple]] = None) -> List[Tuple]:
        """Run ``(sql, rows)`` statements (``?`` placeholders; one execution per row), then the
        optional ``query``, whose rows are returned: all in one pipeline, one round trip to the
        server instead of one per statement."""
        with raw.cursor() as cur, raw.cursor() as reader:
            with raw.pipeline():
                for sql, rows in statements:
                    if len(rows) == 1:
                        cur.execute(pg_sql(sql), rows[0])
                    else:
                        cur.executemany(pg_sql(sql), rows)
                if query:
                    reader.execute(pg_sql(query[0]), query[1])
            return reader.fetchall() if query else []

    def lock_run(self, raw, name: str, batch_id: Optional[str]) -> Optional[Tuple]:
        """``(run id, policy, policy state, owner, session, status, last ingest, updated, what batch
        ``batch_id`` stored or None)`` for the ingest transaction, the run's row locked; None when
        there is no such run."""
        with raw.cursor() as cur:
            found = cur.execute(_LOCK_RUN, (name,)).fetchall()
            if not found:
                return None
            previous = None
            if batch_id is not None:
                got = cur.execute(_BATCH, (found[0][0], batch_id)).fetchall()
                previous = got[0][0] if got else None
        return (*found[0], previous)

    def insert_points(self, raw, run_id: int, series, appends, current, m, r, s, v, db_v, w) -> int:
        """Store the key-sorted points as ``point_chunks`` rows: per series, one row per block of
        ``BLOCK_STEPS`` steps its points fall in, arrays built by NumPy (``_array``), ``seq`` the
        series' ``latest_points.version`` after this write. A series that does not continue after
        its stored last step first drops the steps it already has (first write wins, so a series'
        chunks stay disjoint). An appended series whose points start past the block of its stored
        last step has closed that block: its chunks are merged into one (``_COMPACT``), so a long
        series is about one row per block whatever the batch size (a slow job sends one step per
        series and batch). Returns the points stored."""
        steps = np.asarray(s, dtype=np.int64)
        values = np.asarray(v, dtype=np.float64)
        walls = np.asarray(w, dtype=np.float64)
        rows, closed = [], []
        stored = 0
        for (key, lo, hi), append in zip(series, appends):
            st, va, wa = steps[lo:hi], values[lo:hi], walls[lo:hi]
            if not append:
                have = np.array([row[0] for row in self.rows(
                    raw, "SELECT u.step FROM point_chunks c CROSS JOIN LATERAL unnest(c.steps) AS u(step) "
                    "WHERE c.run_id = ? AND c.metric = ? AND c.rank = ? AND c.block >= ? AND c.block <= ? "
                    "AND u.step >= ? AND u.step <= ?",
                    (run_id, key[0], key[1], int(st[0]) // BLOCK_STEPS, int(st[-1]) // BLOCK_STEPS, int(st[0]),
                     int(st[-1])))], dtype=np.int64)
                if have.size:
                    new = ~np.isin(st, have)
                    st, va, wa = st[new], va[new], wa[new]
            if not st.size:
                continue
            seq = current[key][1] + 1 if key in current else 1
            blocks = st // BLOCK_STEPS
            if append and key in current and blocks[0] > current[key][0] // BLOCK_STEPS:
                closed.append({"run": run_id, "metric": key[0], "rank": key[1],
                               "block": current[key][0] // BLOCK_STEPS, "seq": seq})
            cuts = [0, *(np.flatnonzero(blocks[1:] != blocks[:-1]) + 1).tolist(), st.size]
            for a, b in zip(cuts[:-1], cuts[1:]):
                rows.append((run_id, key[0], key[1], int(blocks[a]), seq, b - a, int(st[a]), int(st[b - 1]),
                             _array("int8", st[a:b]), _array("float8", va[a:b]), _array("float8", wa[a:b])))
            stored += st.size
        if rows:
            with raw.cursor() as cur:
                cur.executemany("INSERT INTO point_chunks (run_id, metric, rank, block, seq, n, first_step, "
                                "last_step, steps, vals, walls) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %b, %b, %b)",
                                rows)
        if closed:
            with raw.cursor() as cur:
                cur.executemany(_COMPACT, closed)
        return stored

    def load_columns(self, conn, run_id: int, metric: str, rank: int, after: int,
                     until: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(steps, values, wall_times)`` with ``after < step <= until``, ordered by step: the
        chunks of the blocks in range, unnested on the server into a binary COPY that NumPy
        parses. Rows come in chunk order (sorted for a series written in order), so they are
        sorted here only when they must be."""
        from psycopg import sql as pgsql

        sql = ("COPY (SELECT u.step, u.value, u.wall_time FROM point_chunks c CROSS JOIN LATERAL "
               "unnest(c.steps, c.vals, c.walls) AS u(step, value, wall_time) WHERE c.run_id = {} AND "
               "c.metric = {} AND c.rank = {} AND c.block >= {} AND c.block <= {} AND u.step > {} AND "
               "u.step <= {}) TO STDOUT (FORMAT BINARY)")
        statement = pgsql.SQL(sql).format(*map(pgsql.Literal, (run_id, metric, rank, (after + 1) // BLOCK_STEPS,
                                                              until // BLOCK_STEPS, after, until)))
        with conn.connection.driver_connection.cursor() as cur:
            with cur.copy(statement) as copy:
                data = b"".join(bytes(chunk) for chunk in copy)
        rows = parse_copy_binary(data)
        steps = rows["step"].astype(np.int64)
        order = slice(None) if np.all(steps[1:] > steps[:-1]) else np.argsort(steps, kind="stable")
        return steps[order], rows["value"].astype(np.float64)[order], rows["wall_time"].astype(np.float64)[order]
