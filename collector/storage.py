"""The storage layer: the only module that writes SQL (SQLite by default, PostgreSQL at scale).

``open_store(url)`` opens (and migrates) a store. The agent's embedded mode writes through it from
a background thread; the collector service serves from it. Reads return NumPy arrays.

Guarantees:

* writing the same point twice (a retried batch) stores it once, the first write winning: on
  SQLite ``(run, metric, rank, step)`` is the primary key and inserts skip conflicts; on
  PostgreSQL points are chunks (``point_chunks``: arrays per write, series and block) and a write
  that reaches back skips the steps its series already has;
* NaN and ±Inf are stored and read back as they are (NaN as SQL NULL, since SQLite has no NaN);
* SQLite runs in WAL mode, so readers (``moxco serve``, audits) never block the writer; write
  transactions start with ``BEGIN IMMEDIATE`` so two writers queue on the lock instead of failing
  with "database is locked" on a stale snapshot;
* every write to a run first takes the run's row lock (``SELECT … FOR UPDATE`` on PostgreSQL; SQLite
  serialises writers), so several collector processes sharing one database see one consistent
  decision-policy state and one ``latest_points`` row per series.

The collector adds: batch ingestion with batch ids (``ingest``), the ``latest_points`` summary
(latest values, Prometheus), cached columnar series reads (``series_columns``), decisions with
acknowledgements, operator decisions, and hashed API tokens.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
from operator import lt as _lt
import math
import os
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from alembic import command
from alembic.config import Config
from sqlalchemy import case, create_engine, event, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy import exc as sa_exc
from sqlalchemy.exc import ArgumentError

from moxco.collector import schema
from moxco.collector.schema import (
    RUN_LEVEL_RANK,
    RUN_STATUSES,
    TOKEN_SCOPES,
    decisions,
    latest_points,
    runs,
    series_blocks,
    tokens,
)
from moxco.collector import downsample as ds
from moxco.collector.schema import BLOCK_STEPS, SUMMARY_FIELDS
from moxco.goodness import Goodness
from moxco.catalogue import GOODNESS_TERMS
from moxco.decision import Decision, decision_id
from moxco.policy import DecisionPolicy, PolicyConfig

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_UNSET: Any = object()


class StoreError(ValueError):
    """Bad input to the store (unknown run, bad name, bad status): the message says what."""


@dataclass(frozen=True)
class RunInfo:
    name: str
    status: str
    config: Dict[str, Any]
    created_at: float
    updated_at: float
    last_step: Optional[int]


@dataclass(frozen=True)
class Point:
    """One metric point: ``(step, metric, value, wall_time, rank)``; rank -1 is run-level."""

    step: int
    metric: str
    value: float
    wall_time: float
    rank: int = RUN_LEVEL_RANK


def normalize_url(url: str) -> str:
    """Accept a SQLAlchemy URL or a bare file path (taken as a SQLite file)."""
    if "://" not in url:
        return f"sqlite:///{Path(url).expanduser().resolve()}"
    for prefix in ("postgresql://", "postgres://"):  # the plain libpq form: use psycopg 3
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # SQLAlchemy, not the sqlite3 module, opens transactions (see _sqlite_begin)
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def _sqlite_pragmas_no_autocheckpoint(dbapi_connection, record) -> None:
    _sqlite_pragmas(dbapi_connection, record)
    dbapi_connection.execute("PRAGMA wal_autocheckpoint=0")  # _Checkpointer does it


class _Checkpointer:
    """WAL checkpoints of a SQLite store, in a thread of their own.

    By default SQLite checkpoints inside the commit that grows the WAL past 1,000 pages: with
    1,000-point batches that was every ~25th batch, each 5–9 ms longer (copying ~4 MB into the
    database file and syncing it), in the request's time. Here the store's connections turn
    auto-checkpointing off and this thread runs ``PRAGMA wal_checkpoint(PASSIVE)`` every
    ``every`` seconds; it neither waits for nor blocks readers and writers (the sqlite3 module
    releases the GIL while SQLite works), and the next writer after a complete checkpoint starts the
    WAL over. Under sustained writes a passive checkpoint may never catch the WAL's end (frames
    are appended while it copies), so the WAL could grow without bound: past ``max_frames`` pages the
    thread checkpoints once more holding the store's write queue (``_QueuedWriter``), which
    completes it; writers wait for that one, rarely."""

    def __init__(self, path: str, writer: "_QueuedWriter", every: float = 0.25, max_frames: int = 16_000) -> None:
        self._path, self._writer, self.every, self.max_frames = path, writer, every, max_frames
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="moxco-wal-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import sqlite3

        con = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        try:
            con.execute("PRAGMA busy_timeout=10000")
            while not self._stop.wait(self.every):
                try:
                    _busy, frames, done = con.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    if frames > self.max_frames and done < frames:
                        with self._writer.exclusive():
                            con.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error:  # a busy or vanished file: try again next time
                    continue
        finally:
            con.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


def _sqlite_begin(conn) -> None:
    """Open SQLite transactions ourselves: ``BEGIN IMMEDIATE`` for writers (take the write lock
    before reading, so a read-modify-write never hits SQLITE_BUSY on a stale WAL snapshot), plain
    deferred ``BEGIN`` for readers (they never block the writer)."""
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("moxco_write") else "BEGIN")


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Run the Alembic migrations up to ``revision`` on ``engine``."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def _validate_name(name: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise StoreError(f"run name must be a non-empty string, got {name!r}")
    if len(name) > schema.MAX_NAME_LENGTH:
        raise StoreError(f"run name is {len(name)} characters long; the limit is {schema.MAX_NAME_LENGTH}")
    return name


def _to_db(value: float) -> Optional[float]:
    value = float(value)
    return None if math.isnan(value) else value


def _from_db(value: Optional[float]) -> float:
    return math.nan if value is None else float(value)


class _QueuedWriter:
    """``engine.begin()`` for SQLite write transactions, queued first on a lock of this process and
    then on an ``flock`` of ``<database>-moxco-write.lock`` shared by all processes (collector
    workers, an embedded agent). SQLite's own busy handler polls with sleeps of up to 100 ms, which
    turned 8–32 concurrent writers into p99 latencies of seconds; a blocked ``flock`` wakes as soon
    as the holder lets go. ``BEGIN IMMEDIATE`` and ``busy_timeout`` still guard writers that do not
    queue here (other programs). Without a lock file (read-only folder) only the process lock is used."""

    def __init__(self, engine, lock_path: Optional[str]) -> None:
        self._engine = engine
        self._lock = threading.RLock()
        self._depth = 0
        self._fd: Optional[int] = None
        if lock_path is not None:
            try:
                self._fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            except OSError:
                self._fd = None

    @contextlib.contextmanager
    def begin(self):
        with self._lock:
            self._depth += 1
            try:
                if self._fd is not None and self._depth == 1:
                    fcntl.flock(self._fd, fcntl.LOCK_EX)
                try:
                    with self._engine.begin() as conn:
                        yield conn
                finally:
                    if self._fd is not None and self._depth == 1:
                        fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                self._depth -= 1

    @contextlib.contextmanager
    def exclusive(self):
        """Hold the write queue (this process's lock and the ``flock``) without a transaction."""
        with self._lock:
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                if self._fd is not None:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Store:
    """A moxco store on one database URL (thread-safe: SQLAlchemy pools connections)."""

    def __init__(self, url: str, *, migrate: bool = True, pool_size: int = 10,
                 series_cache_points: int = 20_000_000, background_checkpoint: bool = False) -> None:
        """``background_checkpoint`` (SQLite files): WAL checkpoints run in a thread of this store
        (``_Checkpointer``) instead of inside the commit that crosses SQLite's 1,000-page mark."""
        self.url = normalize_url(url)
        kwargs: Dict[str, Any] = {}
        if self.url.startswith("postgresql"):
            kwargs.update(pool_size=pool_size, max_overflow=2 * pool_size, pool_pre_ping=False)
            with contextlib.suppress(ImportError):  # no psycopg: create_engine says so below
                _register_pg_arrays()
        try:
            self.engine = create_engine(self.url, **kwargs)
        except ArgumentError as exc:
            raise StoreError(f"not a database URL: {url!r} ({exc})") from None
        except ModuleNotFoundError as exc:
            raise StoreError(f"the driver for {self.engine_url_scheme(self.url)!r} is not installed ({exc.name}); "
                             "PostgreSQL needs `pip install 'moxco[collector]'` (psycopg)") from None
        if self.engine.dialect.name not in ("sqlite", "postgresql"):
            raise StoreError(f"unsupported database {self.engine.dialect.name!r}: use SQLite or PostgreSQL")
        database = self.engine.url.database if self.engine.dialect.name == "sqlite" else None
        on_file = bool(database) and database != ":memory:"
        background_checkpoint = background_checkpoint and on_file
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas_no_autocheckpoint if background_checkpoint
                         else _sqlite_pragmas)
            event.listen(self.engine, "begin", _sqlite_begin)
            if on_file:
                Path(database).parent.mkdir(parents=True, exist_ok=True)
        self._writer = self.engine.execution_options(moxco_write=True)
        if self.dialect == "sqlite":
            self._writer = _QueuedWriter(self._writer, f"{database}-moxco-write.lock" if on_file else None)
        self._series_cache = SeriesCache(series_cache_points)
        self._upserts: Dict[bool, Any] = {}
        if migrate:
            upgrade(self.engine)
        self._checkpointer = _Checkpointer(database, self._writer) if background_checkpoint else None

    @staticmethod
    def engine_url_scheme(url: str) -> str:
        return url.split("://", 1)[0]

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def ping(self) -> None:
        """Raise (a SQLAlchemy ``OperationalError``) when the database cannot be reached."""
        with self.engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")

    def _lock_run(self, conn, name: str):
        """The run's row (``id``, ``policy``, ``policy_state``), locked for this write transaction."""
        query = select(runs.c.id, runs.c.policy, runs.c.policy_state).where(runs.c.name == name)
        if self.dialect == "postgresql":
            query = query.with_for_update()
        row = conn.execute(query).first()
        if row is None:
            raise NotFoundError(f"no run named {name!r}")
        return row

    # --- runs ------------------------------------------------------------------------------------

    def _run_id(self, conn, name: str) -> int:
        run_id = conn.execute(select(runs.c.id).where(runs.c.name == name)).scalar()
        if run_id is None:
            raise NotFoundError(f"no run named {name!r}")
        return run_id

    def create_run(self, name: str, config: Optional[Mapping[str, Any]] = None, *, status: str = "running",
                   exist_ok: bool = True) -> RunInfo:
        """Register a run (or, with ``exist_ok``, mark an existing one running again and merge config)."""
        _validate_name(name)
        if status not in RUN_STATUSES:
            raise StoreError(f"status must be one of {RUN_STATUSES}, got {status!r}")
        now = time.time()
        with self._writer.begin() as conn:
            row = conn.execute(select(runs).where(runs.c.name == name)).mappings().first()
            if row is None:
                conn.execute(self._insert_ignore(runs).values(name=name, status=status, config=dict(config or {}),
                                                              created_at=now, updated_at=now, last_step=None))
            elif not exist_ok:
                raise StoreError(f"a run named {name!r} already exists")
            else:
                merged = {**row["config"], **dict(config or {})}
                conn.execute(update(runs).where(runs.c.id == row["id"]).values(status=status, config=merged, updated_at=now))
        return self.run(name)

    def set_status(self, name: str, status: str) -> None:
        if status not in RUN_STATUSES:
            raise StoreError(f"status must be one of {RUN_STATUSES}, got {status!r}")
        with self._writer.begin() as conn:
            run_id = self._lock_run(conn, name).id
            conn.execute(update(runs).where(runs.c.id == run_id).values(status=status, updated_at=time.time()))

    def sweep_stale_runs(self, stale_after: float, *, now: Optional[float] = None) -> Dict[str, List[str]]:
        """Mark ``running`` runs that stored no point and were not updated (registered again,
        status changed) for ``stale_after`` seconds (server clock: ``last_ingest_at``,
        ``updated_at``; never the agents' wall times) ``interrupted``, and
        ``interrupted`` runs that stored points since they were marked (``last_ingest_at`` at or
        after ``updated_at``, within ``stale_after``) ``running`` again. Returns the names per new
        status. Idempotent; the conditions are re-checked in the UPDATEs, so concurrent ingests and
        several collector workers sweeping at once are safe."""
        now = time.time() if now is None else float(now)
        cutoff = now - float(stale_after)
        r = runs.c
        last_heard = case((r.last_ingest_at > r.updated_at, r.last_ingest_at), else_=r.updated_at)
        silent = (r.status == "running") & (last_heard < cutoff)
        revived = (r.status == "interrupted") & (r.last_ingest_at >= cutoff) & (r.last_ingest_at >= r.updated_at)
        out: Dict[str, List[str]] = {"interrupted": [], "running": []}
        with self._writer.begin() as conn:
            for status, where in (("interrupted", silent), ("running", revived)):
                ids = [row.id for row in conn.execute(select(r.id).where(where))]
                if not ids:
                    continue
                conn.execute(update(runs).where(r.id.in_(ids), where).values(status=status, updated_at=now))
                out[status] = sorted(conn.execute(select(r.name).where(r.id.in_(ids), r.status == status)).scalars())
        return out

    def run(self, name: str) -> RunInfo:
        with self.engine.connect() as conn:
            row = conn.execute(select(runs).where(runs.c.name == name)).mappings().first()
        if row is None:
            raise NotFoundError(f"no run named {name!r}")
        return _run_info(row)

    def runs(self, *, status: Optional[str] = None) -> List[RunInfo]:
        """All runs, newest first (optionally only those with ``status``)."""
        query = select(runs).order_by(runs.c.created_at.desc(), runs.c.id.desc())
        if status is not None:
            query = query.where(runs.c.status == status)
        with self.engine.connect() as conn:
            return [_run_info(row) for row in conn.execute(query).mappings()]

    # --- points ----------------------------------------------------------------------------------

    def write_points(self, name: str, points: Iterable[Point | Tuple]) -> int:
        """Store points of run ``name``; duplicates of stored points are skipped. Returns rows given."""
        metrics_, steps, values, walls, ranks = [], [], [], [], []
        for point in points:
            p = point if isinstance(point, Point) else Point(*point)
            if not isinstance(p.metric, str) or not p.metric or len(p.metric) > schema.MAX_METRIC_LENGTH:
                raise StoreError(f"metric name must be a non-empty string of at most {schema.MAX_METRIC_LENGTH} characters, got {p.metric!r}")
            metrics_.append(p.metric)
            steps.append(int(p.step))
            values.append(float(p.value))
            walls.append(float(p.wall_time))
            ranks.append(int(p.rank))
        if not metrics_:
            return 0
        with self._writer.begin() as conn, self._driver_errors(conn):
            run_id = self._lock_run(conn, name).id
            self._write_columns(conn, run_id, metrics_, steps, values, walls, ranks)
        return len(metrics_)

    @contextlib.contextmanager
    def _driver_errors(self, conn):
        """Errors of statements sent on the DB-API connection (the ingest path) turned into
        SQLAlchemy's, as if SQLAlchemy had run them: a lost connection is invalidated (the pool
        drops it) and flagged ``connection_invalidated``, so callers see one kind of error (the
        collector's 503/507 mapping and dead-connection retry rely on it)."""
        try:
            yield
        except Exception as exc:
            dialect = self.engine.dialect
            base = dialect.loaded_dbapi.Error
            if not isinstance(exc, base):
                raise
            invalidated = bool(dialect.is_disconnect(exc, conn.connection.dbapi_connection, None))
            if invalidated:
                conn.invalidate(exc)
            raise sa_exc.DBAPIError.instance(None, None, exc, base, connection_invalidated=invalidated,
                                             dialect=dialect) from exc

    def _write_columns(self, conn, run_id: int, metrics_: Sequence[str], steps: Sequence[int],
                       values: Sequence[float], walls: Sequence[float], ranks: Sequence[int],
                       tail: Optional[List[Tuple[str, List[Tuple]]]] = None) -> int:
        """Store the points and maintain ``latest_points``, ``series_blocks`` and ``runs.last_step``,
        inside the caller's transaction, which holds the run's lock. Returns the number of rows
        newly stored. With ``tail`` (a list), the ``latest_points`` and ``runs`` writes, which
        nothing here reads back, are appended to it as ``(sql, rows)`` for the caller to send
        together with its own (``_run_statements``: one round trip on PostgreSQL).

        Rows are written sorted by key, so concurrent writers on PostgreSQL lock index entries in
        the same order (no deadlock); a key given twice in one batch keeps its first point (what
        insert-ignore keeps). NaN is stored as NULL on SQLite (it has no NaN). A series whose
        points all come after its stored last step (the usual append; the run lock makes this
        exact) cannot conflict: its block summaries are merged into the stored ones, and on
        PostgreSQL its chunks are inserted as they are (``_pg_insert_chunks``). Any other series
        (out of order, replayed, overlapping) keeps only its new steps (insert-ignore on SQLite, a
        look-up of the stored steps on PostgreSQL) and its touched blocks are summarised again
        from the stored points.
        """
        m, r, s, v, w = _key_order(metrics_, steps, values, walls, ranks)
        db_v = [None if x != x else x for x in v]
        n = len(m)
        # series as [lo, hi) ranges of the sorted rows
        bounds = [0] + [i for i in range(1, n) if m[i] != m[i - 1] or r[i] != r[i - 1]] + [n]
        series = [((m[lo], r[lo]), lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
        raw = conn.connection.driver_connection
        current = {(mm, rr): (st, ver, rew) for mm, rr, st, ver, rew in _raw_rows(
            raw, self.dialect, "SELECT metric, rank, step, version, rewrites FROM latest_points WHERE run_id = ?",
            (run_id,))}
        appends = [key not in current or s[lo] > current[key][0] for key, lo, _hi in series]

        if self.dialect == "postgresql":
            stored = _pg_insert_chunks(raw, run_id, series, appends, current, s, v, w)
        else:
            before = raw.total_changes
            _sqlite_insert_points(raw, run_id, m, r, s, db_v, w)
            stored = raw.total_changes - before

        own_tail = tail is None
        tail = [] if own_tail else tail
        self._update_blocks(conn, run_id, series, appends, s, v, w, tail)
        tail += _latest_statements(run_id, series, current, s, db_v, w)
        last_step = max(s)
        now = time.time()
        tail.append(("UPDATE runs SET last_step = CASE WHEN last_step IS NULL OR last_step < ? THEN ? ELSE last_step "
                     "END, updated_at = ?, last_ingest_at = ? WHERE id = ?", [(last_step, last_step, now, now, run_id)]))
        if own_tail:
            _run_statements(raw, self.dialect, tail)
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
            merge = _summary_rows(run_id, keys, summary)
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
                cols = self._load_columns(conn, run_id, key[0], key[1], after=max(b0 * B - 1, -(2**63)),
                                          until=(b1 + 1) * B - 1)
                summary = ds.block_summaries(*cols, B)
                replace += _summary_rows(run_id, [key] * summary["block"].size, summary)
        if merge:
            # plain SQL (the same text runs on both databases), so it can ride in the caller's tail
            tail.append((self._blocks_merge_sql(), [tuple(row[c] for c in _BLOCK_COLUMNS) for row in merge]))
        if replace:
            conn.execute(self._blocks_upsert(merge=False), replace)

    def _blocks_merge_sql(self) -> str:
        """The merging upsert of ``_blocks_upsert`` as SQL text with ``?`` placeholders in
        ``_BLOCK_COLUMNS`` order: SQLite's rendering, which PostgreSQL accepts as well (``ON
        CONFLICT … DO UPDATE SET … excluded.…``)."""
        global _BLOCKS_MERGE_SQL
        if _BLOCKS_MERGE_SQL is None:
            stmt = _blocks_statement(sqlite.insert(series_blocks), merge=True)
            _BLOCKS_MERGE_SQL = str(stmt.compile(dialect=sqlite.dialect(), column_keys=list(_BLOCK_COLUMNS)))
        return _BLOCKS_MERGE_SQL

    def _blocks_upsert(self, *, merge: bool):
        """INSERT … ON CONFLICT DO UPDATE for ``series_blocks`` (``_blocks_statement``), cached."""
        cached = self._upserts.get(merge)
        if cached is None:
            stmt = postgresql.insert(series_blocks) if self.dialect == "postgresql" else sqlite.insert(series_blocks)
            cached = self._upserts[merge] = _blocks_statement(stmt, merge=merge)
        return cached

    def _insert_ignore(self, table):
        dialect = self.engine.dialect.name
        if dialect == "sqlite":
            return sqlite.insert(table).on_conflict_do_nothing()
        if dialect == "postgresql":
            return postgresql.insert(table).on_conflict_do_nothing()
        raise StoreError(f"unsupported database {dialect!r}: use SQLite or PostgreSQL")

    def series(self, name: str, metric: str, *, rank: int = RUN_LEVEL_RANK, start: Optional[int] = None,
               end: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of one metric, ordered by step, optionally within ``[start, end]``."""
        with self.engine.connect() as conn:
            run_id = self._run_id(conn, name)
            steps, values, _walls = self._load_columns(conn, run_id, metric, rank,
                                                       after=None if start is None else int(start) - 1, until=end)
        return steps, values

    def metrics(self, name: str) -> List[str]:
        """Names of the metrics stored for run ``name`` (any rank)."""
        with self.engine.connect() as conn:
            run_id = self._run_id(conn, name)
            query = select(latest_points.c.metric).where(latest_points.c.run_id == run_id).distinct()
            return sorted(conn.execute(query).scalars())

    def latest(self, name: str, *, rank: int = RUN_LEVEL_RANK) -> Dict[str, Tuple[int, float]]:
        """``{metric: (step, value)}`` of the newest point of every metric of run ``name``."""
        return {m: (s, v) for m, (s, v, _w) in self.latest_points(name, rank=rank).items()}

    def latest_points(self, name: str, *, rank: int = RUN_LEVEL_RANK) -> Dict[str, Tuple[int, float, float]]:
        """``{metric: (step, value, wall_time)}`` of the newest point of every metric of run ``name``."""
        lp = latest_points.c
        with self.engine.connect() as conn:
            run_id = self._run_id(conn, name)
            rows = conn.execute(select(lp.metric, lp.step, lp.value, lp.wall_time)
                                .where(lp.run_id == run_id, lp.rank == rank))
            return {m: (int(s), _from_db(v), float(w)) for m, s, v, w in rows}

    def running_latest(self) -> List[Dict[str, Any]]:
        """Everything the Prometheus exposition needs, in three queries: per *running* run its name,
        last step, last ingest time, decision count and ``{metric: value}`` of its run-level series."""
        lp, r = latest_points.c, runs.c
        with self.engine.connect() as conn:
            run_rows = conn.execute(select(r.id, r.name, r.last_step, r.last_ingest_at)
                                    .where(r.status == "running").order_by(r.id)).all()
            out = {row.id: {"name": row.name, "last_step": row.last_step, "last_ingest_at": row.last_ingest_at,
                            "decisions": 0, "metrics": {}} for row in run_rows}
            if not out:
                return []
            running = select(r.id).where(r.status == "running")
            for run_id, metric, value in conn.execute(
                    select(lp.run_id, lp.metric, lp.value).where(lp.rank == RUN_LEVEL_RANK, lp.run_id.in_(running))):
                if run_id in out:
                    out[run_id]["metrics"][metric] = _from_db(value)
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
            run_id = self._run_id(conn, name)
            return self._series_cache.get(self, conn, run_id, metric, rank)

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
            if self.dialect == "postgresql":  # summaries and cut blocks from one snapshot
                conn = conn.execution_options(isolation_level="REPEATABLE READ")
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
                part = ds.block_summaries(*self._load_columns(conn, run_id, metric, rank, after=lo - 1, until=hi), B)
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

    def _load_columns(self, conn, run_id: int, metric: str, rank: int, after: Optional[int],
                      until: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Read ``(steps, values, wall_times)`` with ``after < step <= until``, ordered by step, as
        fast as the driver allows: PostgreSQL streams a binary COPY parsed by NumPy (no Python
        object per row), SQLite goes through the C-level cursor."""
        after = -(2**63) if after is None else int(after)
        until = 2**63 - 1 if until is None else int(until)
        if self.dialect == "postgresql":
            # the chunks of the blocks in range, unnested on the server; rows come in chunk order
            # (sorted for a series written in order), so they are sorted here only when they must be
            sql = ("COPY (SELECT u.step, u.value, u.wall_time FROM point_chunks c CROSS JOIN LATERAL "
                   "unnest(c.steps, c.vals, c.walls) AS u(step, value, wall_time) WHERE c.run_id = {} AND "
                   "c.metric = {} AND c.rank = {} AND c.block >= {} AND c.block <= {} AND u.step > {} AND "
                   "u.step <= {}) TO STDOUT (FORMAT BINARY)")
            from psycopg import sql as pgsql

            statement = pgsql.SQL(sql).format(*map(pgsql.Literal, (run_id, metric, rank, (after + 1) // BLOCK_STEPS,
                                                                  until // BLOCK_STEPS, after, until)))
            with conn.connection.driver_connection.cursor() as cur:
                with cur.copy(statement) as copy:
                    data = b"".join(bytes(chunk) for chunk in copy)
            rows = _parse_copy_binary(data)
            steps = rows["step"].astype(np.int64)
            order = slice(None) if np.all(steps[1:] > steps[:-1]) else np.argsort(steps, kind="stable")
            return steps[order], rows["value"].astype(np.float64)[order], rows["wall_time"].astype(np.float64)[order]
        cursor = conn.connection.driver_connection.execute(
            "SELECT step, value, wall_time FROM metric_points WHERE run_id = ? AND metric = ? AND rank = ? "
            "AND step > ? AND step <= ? ORDER BY step", (run_id, metric, rank, after, until))
        rows = cursor.fetchall()
        if not rows:
            return np.empty(0, np.int64), np.empty(0), np.empty(0)
        steps, values, walls = zip(*rows)
        return (np.array(steps, dtype=np.int64), np.array(values, dtype=np.float64),
                np.array(walls, dtype=np.float64))

    # --- runs as the collector sees them ---------------------------------------------------------

    def put_run(self, name: str, *, create: bool = True, config: Optional[Mapping[str, Any]] = None,
                optimizer: Any = _UNSET, policy: Any = _UNSET, status: Optional[str] = None) -> Dict[str, Any]:
        """Register (``create``) or update a run; returns ``run_detail``.

        ``config`` is merged into the stored config; ``optimizer`` and ``policy`` replace the
        stored ones when given (``policy=None`` stops collector decisions). A changed policy keeps
        the policy's progress (streak, decisions already taken count against ``max_decisions``), so
        an agent re-registering after a restart never makes the policy fire again.
        ``status`` defaults to ``running`` for a new run and to unchanged for an existing one.
        """
        _validate_name(name)
        if status is not None and status not in RUN_STATUSES:
            raise StoreError(f"status must be one of {RUN_STATUSES}, got {status!r}")
        if policy is not _UNSET and policy is not None:
            policy = PolicyConfig.from_dict(policy).to_dict()  # ValueError on bad fields
        now = time.time()
        with self._writer.begin() as conn:
            query = select(runs).where(runs.c.name == name)
            if self.dialect == "postgresql":
                query = query.with_for_update()
            row = conn.execute(query).mappings().first()
            if row is None:
                if not create:
                    raise NotFoundError(f"no run named {name!r}")
                conn.execute(self._insert_ignore(runs).values(
                    name=name, status=status or "running", config=dict(config or {}), created_at=now,
                    updated_at=now, last_step=None, optimizer=None if optimizer is _UNSET else optimizer,
                    policy=None if policy is _UNSET else policy, policy_state=None))
                row = conn.execute(query).mappings().first()
                if row["created_at"] == now:
                    return self.run_detail(name, conn=conn)
            values: Dict[str, Any] = {"updated_at": now}
            if config:
                values["config"] = {**row["config"], **dict(config)}
            if optimizer is not _UNSET:
                values["optimizer"] = optimizer
            if policy is not _UNSET:
                values["policy"] = policy
                state = row["policy_state"]
                if policy is not None and state is not None and state.get("config") != policy:
                    values["policy_state"] = {**state, "config": policy}
            if status is not None:
                values["status"] = status
            conn.execute(update(runs).where(runs.c.id == row["id"]).values(**values))
            return self.run_detail(name, conn=conn)

    def run_detail(self, name: str, *, conn=None, with_metrics: bool = True) -> Dict[str, Any]:
        """One run as the API returns it: config, optimizer, policy, status, last step, phase, metrics."""
        if conn is None:
            with self.engine.connect() as c:
                return self.run_detail(name, conn=c, with_metrics=with_metrics)
        row = conn.execute(select(runs).where(runs.c.name == name)).mappings().first()
        if row is None:
            raise NotFoundError(f"no run named {name!r}")
        out = _run_dict(row)
        if with_metrics:
            lp = latest_points.c
            names = conn.execute(select(lp.metric).where(lp.run_id == row["id"]).distinct()).scalars()
            out["metrics"] = sorted(names)
            phase = conn.execute(select(lp.value).where(lp.run_id == row["id"], lp.metric == "phase",
                                                        lp.rank == RUN_LEVEL_RANK)).scalar()
            out["phase"] = None if phase is None else int(phase)
        return out

    def list_runs(self, *, name: Optional[str] = None, status: Optional[str] = None, since: Optional[float] = None,
                  until: Optional[float] = None, limit: int = 100, offset: int = 0) -> Tuple[int, List[Dict[str, Any]]]:
        """Runs newest first, filtered by a case-sensitive glob on the name (``*``, ``?``, ``[…]``),
        status, and activity window (``since``: updated at or after; ``until``: created at or
        before). Returns ``(total matching, page)``."""
        import fnmatch

        query = select(runs).order_by(runs.c.created_at.desc(), runs.c.id.desc())
        if status is not None:
            query = query.where(runs.c.status == status)
        if since is not None:
            query = query.where(runs.c.updated_at >= since)
        if until is not None:
            query = query.where(runs.c.created_at <= until)
        if name is not None and not any(ch in name for ch in "*?["):
            query = query.where(runs.c.name == name)
        with self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        if name is not None:
            rows = [row for row in rows if fnmatch.fnmatchcase(row["name"], name)]
        return len(rows), [_run_dict(row) for row in rows[offset : offset + limit]]

    # --- batches ---------------------------------------------------------------------------------

    def ingest(self, name: str, batch_id: Optional[str], metrics_: Sequence[str], steps: Sequence[int],
               values: Sequence[float], walls: Sequence[float], ranks: Sequence[int],
               acks: Sequence[Tuple[str, int]] = ()) -> "IngestResult":
        """Store one batch in one transaction under the run's lock: the batch id (a retried batch
        stores nothing and reports ``duplicate``), the points, the acknowledgements, then the run's
        decision policy on the batch's run-level ``goodness`` points in step order. Returns what was
        stored and every decision of the run not yet acknowledged."""
        dialect = self.dialect
        with self._writer.begin() as conn, self._driver_errors(conn):
            raw = conn.connection.driver_connection
            # the run's row lock and the batch-id check in one round trip
            if dialect == "sqlite":
                found = raw.execute(_LOCK_RUN_SQL[dialect], (batch_id, name)).fetchall()
            else:
                with raw.cursor() as cur:
                    found = cur.execute(_LOCK_RUN_SQL[dialect], (name,)).fetchall()
            if not found:
                raise NotFoundError(f"no run named {name!r}")
            run_id, policy, policy_state, previous = found[0]
            if dialect == "postgresql" and batch_id is not None:
                got = _raw_rows(raw, dialect, "SELECT stored FROM batches WHERE run_id = ? AND batch_id = ?",
                                (run_id, batch_id))
                previous = got[0][0] if got else None
            run = _LockedRun(run_id, _json(policy), _json(policy_state))
            duplicate, stored = previous is not None, int(previous or 0)
            unknown_acks: List[str] = []
            new_decisions: List[str] = []
            tail: List[Tuple[str, List[Tuple]]] = []  # writes nothing reads back: sent with the last query
            if not duplicate:
                if len(metrics_):
                    stored = self._write_columns(conn, run.id, metrics_, steps, values, walls, ranks, tail)
                if acks or run.policy is not None:  # these read and write through SQLAlchemy: flush first
                    _run_statements(raw, dialect, tail)
                    tail = []
                for ident, applied_step in acks:
                    if not self._ack(conn, run.id, ident, applied_step):
                        unknown_acks.append(ident)
                if run.policy is not None:
                    new_decisions = self._run_policy(conn, name, run, metrics_, steps, values, ranks)
                if batch_id is not None:
                    tail.append(("INSERT INTO batches (run_id, batch_id, stored, received_at) VALUES (?, ?, ?, ?)",
                                 [(run.id, batch_id, stored, time.time())]))
            pending = [_decision_row(row, name) for row in _run_statements(raw, dialect, tail, (
                f"SELECT {_DECISION_COLUMNS} FROM decisions WHERE run_id = ? AND applied_step IS NULL "
                "ORDER BY step, id", (run.id,)))]
        return IngestResult(stored=stored, duplicate=duplicate, pending=pending, new_decisions=new_decisions,
                            unknown_acks=unknown_acks)

    def _run_policy(self, conn, name: str, run, metrics_, steps, values, ranks) -> List[str]:
        """Feed the batch's goodness points to the run's ``DecisionPolicy`` (state loaded from and
        saved to ``runs.policy_state`` under the row lock) and store what it decides."""
        probes: Dict[int, List[float]] = {}
        for i, metric in enumerate(metrics_):
            if metric == "goodness" and ranks[i] == RUN_LEVEL_RANK:
                probes[int(steps[i])] = [float(values[i]), math.nan, math.nan, math.nan]
        for i, metric in enumerate(metrics_):
            if metric in GOODNESS_TERMS and ranks[i] == RUN_LEVEL_RANK and int(steps[i]) in probes:
                probes[int(steps[i])][1 + GOODNESS_TERMS.index(metric)] = float(values[i])
        if not probes:
            return []
        policy = DecisionPolicy(PolicyConfig.from_dict(run.policy))
        if run.policy_state is not None:
            policy.load_state_dict({**run.policy_state, "config": run.policy})
        made = []
        for step in sorted(probes):
            decision = policy.observe(step, Goodness(*probes[step]))
            if decision is not None:
                made.append(self._store_decision(conn, run.id, name, decision))
        conn.execute(update(runs).where(runs.c.id == run.id).values(policy_state=policy.state_dict()))
        return made

    def _store_decision(self, conn, run_id: int, name: str, decision: Decision, reason: Optional[str] = None) -> str:
        ident = decision_id(name, decision.source, decision.step)
        conn.execute(self._insert_ignore(decisions), [{
            "id": ident, "run_id": run_id, "step": int(decision.step), "source": decision.source,
            "action": dict(decision.action), "goodness": _to_db(decision.goodness),
            "grad_term": _to_db(decision.grad_term), "sharpness_term": _to_db(decision.sharpness_term),
            "loss_term": _to_db(decision.loss_term), "created_at": time.time(), "applied_step": None,
            "applied_at": None, "reason": reason}])
        return ident

    def _ack(self, conn, run_id: int, ident: str, applied_step: int) -> bool:
        """Record an acknowledgement (the first one wins); False when the run has no such decision."""
        result = conn.execute(update(decisions).where(decisions.c.id == ident, decisions.c.run_id == run_id,
                                                      decisions.c.applied_step.is_(None))
                              .values(applied_step=int(applied_step), applied_at=time.time()))
        if result.rowcount:
            return True
        return conn.execute(select(decisions.c.id).where(decisions.c.id == ident,
                                                         decisions.c.run_id == run_id)).first() is not None

    def _decisions(self, conn, run_id: int, name: str, *, pending_only: bool = False,
                   ident: Optional[str] = None) -> List[Dict[str, Any]]:
        query = select(*(decisions.c[f] for f in _DECISION_FIELDS)).where(decisions.c.run_id == run_id)
        if pending_only:
            query = query.where(decisions.c.applied_step.is_(None))
        if ident is not None:
            query = query.where(decisions.c.id == ident)
        return [_decision_row(tuple(row), name) for row in conn.execute(query.order_by(decisions.c.step, decisions.c.id))]

    def run_decisions(self, name: str, *, pending_only: bool = False) -> List[Dict[str, Any]]:
        """Decisions of a run as the API returns them (goodness fields ``None`` when not measured)."""
        with self.engine.connect() as conn:
            return self._decisions(conn, self._run_id(conn, name), name, pending_only=pending_only)

    def ack(self, name: str, ident: str, applied_step: int) -> Dict[str, Any]:
        """Acknowledge decision ``ident`` of run ``name`` (first acknowledgement wins); returns it."""
        with self._writer.begin() as conn:
            run = self._lock_run(conn, name)
            if not self._ack(conn, run.id, ident, applied_step):
                raise NotFoundError(f"run {name!r} has no decision {ident!r}")
            return self._decisions(conn, run.id, name, ident=ident)[0]

    def operator_decision(self, name: str, action: Mapping[str, Any], *, step: Optional[int] = None,
                          reason: Optional[str] = None) -> Tuple[Dict[str, Any], bool]:
        """Store an operator decision at ``step`` (default: the run's last step, 0 before any point).
        Returns ``(decision, created)``; the same step and action again is the same decision
        (``created`` False); a different action at a step that already has one is a ``ConflictError``."""
        with self._writer.begin() as conn:
            run = self._lock_run(conn, name)
            if step is None:
                step = conn.execute(select(runs.c.last_step).where(runs.c.id == run.id)).scalar() or 0
            decision = Decision(int(step), dict(action), source="operator")
            ident = decision_id(name, decision.source, decision.step)
            existing = self._decisions(conn, run.id, name, ident=ident)
            if existing:
                if existing[0]["action"] != dict(action):
                    raise ConflictError(f"run {name!r} already has an operator decision at step {step} with "
                                        f"action {existing[0]['action']}")
                return existing[0], False
            self._store_decision(conn, run.id, name, decision, reason)
            return self._decisions(conn, run.id, name, ident=ident)[0], True

    # --- tokens ----------------------------------------------------------------------------------

    def create_token(self, name: str, scopes: Sequence[str]) -> Tuple[int, str]:
        """Create an API token; returns ``(id, secret)``. Only the SHA-256 of the secret is stored."""
        scopes = sorted(set(scopes))
        bad = [s for s in scopes if s not in TOKEN_SCOPES]
        if bad or not scopes:
            raise StoreError(f"token scopes must be some of {TOKEN_SCOPES}, got {list(scopes)}")
        _validate_name(name)
        secret = "mox_" + secrets.token_urlsafe(32)  # 256 random bits
        with self._writer.begin() as conn:
            result = conn.execute(tokens.insert().values(name=name, hash=hash_token(secret), scopes=" ".join(scopes),
                                                         created_at=time.time(), revoked_at=None))
            return int(result.inserted_primary_key[0]), secret

    def token_by_hash(self, digest: str) -> Optional[Dict[str, Any]]:
        """The live (not revoked) token whose secret hashes to ``digest``, or None."""
        with self.engine.connect() as conn:
            row = conn.execute(select(tokens).where(tokens.c.hash == digest, tokens.c.revoked_at.is_(None))).mappings().first()
        return None if row is None else _token_dict(row)

    def tokens(self) -> List[Dict[str, Any]]:
        with self.engine.connect() as conn:
            return [_token_dict(row) for row in conn.execute(select(tokens).order_by(tokens.c.id)).mappings()]

    def revoke_token(self, ident: str | int) -> int:
        """Revoke tokens by id or name; returns how many were revoked."""
        with self._writer.begin() as conn:
            where = tokens.c.id == int(ident) if str(ident).isdigit() else tokens.c.name == str(ident)
            result = conn.execute(update(tokens).where(where, tokens.c.revoked_at.is_(None)).values(revoked_at=time.time()))
            return int(result.rowcount)

    # --- decisions -------------------------------------------------------------------------------

    def add_decision(self, name: str, decision: Decision) -> str:
        """Store a decision (idempotent: the same decision stored twice is one row). Returns its id."""
        ident = decision_id(name, decision.source, decision.step)
        row = {
            "id": ident, "step": int(decision.step), "source": decision.source, "action": dict(decision.action),
            "goodness": _to_db(decision.goodness), "grad_term": _to_db(decision.grad_term),
            "sharpness_term": _to_db(decision.sharpness_term), "loss_term": _to_db(decision.loss_term),
            "created_at": time.time(), "applied_step": None, "applied_at": None,
        }
        with self._writer.begin() as conn:
            row["run_id"] = self._lock_run(conn, name).id
            conn.execute(self._insert_ignore(decisions), [row])
        return ident

    def acknowledge_decision(self, ident: str, applied_step: int) -> None:
        """Record the step a decision was applied at (the first acknowledgement wins)."""
        with self._writer.begin() as conn:
            result = conn.execute(
                update(decisions).where(decisions.c.id == ident, decisions.c.applied_step.is_(None))
                .values(applied_step=int(applied_step), applied_at=time.time())
            )
            if result.rowcount == 0 and conn.execute(select(decisions.c.id).where(decisions.c.id == ident)).first() is None:
                raise NotFoundError(f"no decision with id {ident!r}")

    def decisions(self, name: str) -> List[Dict[str, Any]]:
        """Decisions of run ``name`` ordered by step, as dicts (goodness terms NaN when unknown)."""
        with self.engine.connect() as conn:
            run_id = self._run_id(conn, name)
            rows = conn.execute(select(decisions).where(decisions.c.run_id == run_id)
                                .order_by(decisions.c.step, decisions.c.id)).mappings().all()
        out = []
        for row in rows:
            item = dict(row)
            item.pop("run_id")
            for key in ("goodness", "grad_term", "sharpness_term", "loss_term"):
                item[key] = _from_db(item[key])
            out.append(item)
        return out

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.close()
        self.engine.dispose()
        if isinstance(self._writer, _QueuedWriter):
            self._writer.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class NotFoundError(StoreError):
    """No such run or decision."""


class ConflictError(StoreError):
    """The request contradicts what is stored (e.g. two different operator actions at one step)."""


@dataclass
class IngestResult:
    stored: int
    duplicate: bool
    pending: List[Dict[str, Any]]
    new_decisions: List[str] = field(default_factory=list)
    unknown_acks: List[str] = field(default_factory=list)


def hash_token(secret: str) -> str:
    """SHA-256 hex digest of a token secret (what the ``tokens`` table stores)."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


_COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
_COPY_ROW = np.dtype([("n", ">i2"), ("l1", ">i4"), ("step", ">i8"), ("l2", ">i4"), ("value", ">f8"),
                      ("l3", ">i4"), ("wall_time", ">f8")])


def _parse_copy_binary(data: bytes) -> np.ndarray:
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


# --- the ingest hot path, on the driver connection ------------------------------------------------
# SQLAlchemy Core costs ~0.1 ms of Python per statement (building, cache-key, result set-up); the
# ingest transaction runs ~10 of them per batch, so its fixed statements are written as SQL text
# and sent through the DB-API connection inside the same transaction.

_PG_SQL: Dict[str, str] = {}


def _pg_sql(sql: str) -> str:
    """``sql`` with SQLite's ``?`` placeholders as psycopg's ``%s`` (cached: the text is constant)."""
    out = _PG_SQL.get(sql)
    if out is None:
        out = _PG_SQL[sql] = sql.replace("%", "%%").replace("?", "%s")
    return out


def _raw_rows(raw, dialect: str, sql: str, params: Sequence[Any]) -> List[Tuple]:
    """Rows of ``sql`` (``?`` placeholders) run on the DB-API connection ``raw``."""
    if dialect == "postgresql":
        with raw.cursor() as cur:
            cur.execute(_pg_sql(sql), params)
            return cur.fetchall() if cur.description else []
    return raw.execute(sql, params).fetchall()


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


# SQLite: the batch-id check rides along with the run's row (writers are serialised, so the read
# is current). PostgreSQL: a separate statement after the lock, because a statement that waited for
# a row lock still reads with the snapshot it took before waiting: a concurrent copy of the same
# batch, committed meanwhile, would not be seen and its id inserted twice.
_LOCK_RUN_SQL = {
    "sqlite": "SELECT id, policy, policy_state, (SELECT stored FROM batches WHERE run_id = runs.id AND "
              "batch_id = ?) FROM runs WHERE name = ?",
    "postgresql": "SELECT id, policy, policy_state, NULL FROM runs WHERE name = %s FOR UPDATE",
}
_DECISION_FIELDS = ("id", "step", "source", "action", "goodness", "grad_term", "sharpness_term", "loss_term",
                    "created_at", "applied_step", "applied_at", "reason")
_DECISION_COLUMNS = ", ".join(_DECISION_FIELDS)


@dataclass(frozen=True)
class _LockedRun:
    id: int
    policy: Optional[Dict[str, Any]]
    policy_state: Optional[Dict[str, Any]]


def _json(value: Any) -> Any:
    """A JSON column read through the driver: SQLite gives its text, psycopg may have parsed it."""
    if isinstance(value, (str, bytes)):
        return json.loads(value)  # the stdlib: a bare `pip install moxco` (embedded agent) has no orjson
    return value


def _decision_row(row: Sequence[Any], name: str) -> Dict[str, Any]:
    """A ``decisions`` row (``_DECISION_FIELDS``, in order) as the API returns it."""
    (ident, step, source, action, goodness, grad, sharp, loss, created, applied_step, applied_at, reason) = row
    return {"id": ident, "run": name, "step": step, "source": source, "action": _json(action), "goodness": goodness,
            "grad_term": grad, "sharpness_term": sharp, "loss_term": loss, "created_at": created,
            "applied_step": applied_step, "applied_at": applied_at, "reason": reason}


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


def _run_statements(raw, dialect: str, statements: Sequence[Tuple[str, Sequence[Tuple]]],
                    query: Optional[Tuple[str, Tuple]] = None) -> List[Tuple]:
    """Run ``(sql, rows)`` statements (``?`` placeholders; one execution per row) and then the
    optional ``query``, whose rows are returned. On PostgreSQL they go in one pipeline: one round
    trip to the server instead of one per statement."""
    if dialect != "postgresql":
        for sql, rows in statements:
            raw.executemany(sql, rows)
        return raw.execute(*query).fetchall() if query else []
    with raw.cursor() as cur, raw.cursor() as reader:
        with raw.pipeline():
            for sql, rows in statements:
                if len(rows) == 1:
                    cur.execute(_pg_sql(sql), rows[0])
                else:
                    cur.executemany(_pg_sql(sql), rows)
            if query:
                reader.execute(_pg_sql(query[0]), query[1])
        return reader.fetchall() if query else []


def _blocks_statement(stmt, *, merge: bool):
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


_BLOCK_COLUMNS = ("run_id", "metric", "rank", "block", *SUMMARY_FIELDS)
_BLOCKS_MERGE_SQL: Optional[str] = None

SQLITE_INSERT_ROWS = 250  # rows per multi-row INSERT: 1,500 parameters, far under SQLite's limit


def _sqlite_insert_points(raw, run_id: int, m, r, s, db_v, w) -> None:
    """Insert-ignore the sorted points with multi-row ``INSERT … VALUES (…), (…)`` statements of
    equal size (the sqlite3 module keeps them prepared): half the time of ``executemany``, which
    steps one single-row statement per point."""
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


class _PgBinaryArray(bytes):
    """A one-dimensional PostgreSQL array without NULLs in binary wire format, built by NumPy."""


_PG_ARRAY_TYPES: Dict[str, Tuple[int, str, Any]] = {}  # name -> (element oid, NumPy dtype, bytes subclass)


def _pg_array(kind: str, values: Sequence[Any]) -> bytes:
    """``values`` as a binary ``int8[]``/``float8[]`` parameter: a header and ``(length, value)``
    pairs in network byte order, written by NumPy in one pass (psycopg's own array dumper loops
    over the list in Python: ~2 ms for a 1,000-point batch's arrays)."""
    elem_oid, dtype, cls = _PG_ARRAY_TYPES[kind]
    data = np.asarray(values, dtype=dtype)
    rows = np.empty(data.size, dtype=[("length", ">i4"), ("value", dtype)])
    rows["length"] = np.dtype(dtype).itemsize
    rows["value"] = data
    header = np.array([1, 0, elem_oid, data.size, 1], dtype=">i4").tobytes()
    return cls(header + rows.tobytes())


def _register_pg_arrays() -> None:
    """Teach psycopg to send ``_pg_array``'s bytes as typed arrays. Connections copy the global
    adapters (SQLAlchemy's dialect copies them once, in ``create_engine``), so this runs before a
    PostgreSQL store's engine is created."""
    if _PG_ARRAY_TYPES:
        return
    from psycopg import adapters
    from psycopg.adapt import Dumper
    from psycopg.pq import Format

    for kind, elem_oid, array_oid, dtype in (("int8", 20, 1016, ">i8"), ("float8", 701, 1022, ">f8")):
        cls = type(f"_PgArray_{kind}", (_PgBinaryArray,), {})
        dumper = type(f"_PgArrayDumper_{kind}", (Dumper,), {"format": Format.BINARY, "oid": array_oid,
                                                            "dump": lambda self, obj: obj})
        adapters.register_dumper(cls, dumper)
        _PG_ARRAY_TYPES[kind] = (elem_oid, dtype, cls)


def _pg_insert_chunks(raw, run_id: int, series, appends: Sequence[bool], current, s, v, w) -> int:
    """Store the sorted points as ``point_chunks`` rows: per series, one row per block of
    ``BLOCK_STEPS`` steps its points fall in, arrays built by NumPy (``_pg_array``), ``seq`` the
    series' ``latest_points.version`` after this write (``_latest_statements``). A series that
    does not continue after its stored last step first drops the steps it already has (first write
    wins, so a series' chunks stay disjoint). An appended series whose points start past the block
    of its stored last step has closed that block: its chunks are merged into one (``_PG_COMPACT``),
    so a long series is about one row per block whatever the batch size (a slow job sends one step
    per series and batch). Returns the points stored."""
    steps = np.asarray(s, dtype=np.int64)
    values = np.asarray(v, dtype=np.float64)
    walls = np.asarray(w, dtype=np.float64)
    rows, closed = [], []
    stored = 0
    for (key, lo, hi), append in zip(series, appends):
        st, va, wa = steps[lo:hi], values[lo:hi], walls[lo:hi]
        if not append:
            have = np.array([row[0] for row in _raw_rows(
                raw, "postgresql", "SELECT u.step FROM point_chunks c CROSS JOIN LATERAL unnest(c.steps) AS u(step) "
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
                         _pg_array("int8", st[a:b]), _pg_array("float8", va[a:b]), _pg_array("float8", wa[a:b])))
        stored += st.size
    if rows:
        with raw.cursor() as cur:
            cur.executemany("INSERT INTO point_chunks (run_id, metric, rank, block, seq, n, first_step, last_step, "
                            "steps, vals, walls) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %b, %b, %b)", rows)
    if closed:
        with raw.cursor() as cur:
            cur.executemany(_PG_COMPACT, closed)
    return stored


# Merge the chunks of one closed block of a series into one row, on the server, when it has more
# than one: the chunks are disjoint, so the merged arrays sorted by step hold every point once.
# Its seq (the series' version after this write) is above every merged chunk's.
_PG_BLOCK_CHUNKS = ("FROM point_chunks WHERE run_id = %(run)s AND metric = %(metric)s AND rank = %(rank)s "
                    "AND block = %(block)s")
_PG_COMPACT = (
    f"WITH gone AS (DELETE {_PG_BLOCK_CHUNKS} AND (SELECT count(*) {_PG_BLOCK_CHUNKS}) > 1 "
    "RETURNING steps, vals, walls) "
    "INSERT INTO point_chunks (run_id, metric, rank, block, seq, n, first_step, last_step, steps, vals, walls) "
    "SELECT %(run)s, %(metric)s, %(rank)s, %(block)s, %(seq)s, count(*), min(u.step), max(u.step), "
    "array_agg(u.step ORDER BY u.step), array_agg(u.value ORDER BY u.step), array_agg(u.wall_time ORDER BY u.step) "
    "FROM gone CROSS JOIN LATERAL unnest(gone.steps, gone.vals, gone.walls) AS u(step, value, wall_time) "
    "HAVING count(*) > 0")


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
        self._entries: "OrderedDict[Tuple[int, str, int], Tuple[int, int, np.ndarray, np.ndarray, np.ndarray]]" = OrderedDict()
        self._points = 0
        self._lock = threading.Lock()

    def get(self, store: "Store", conn, run_id: int, metric: str, rank: int):
        lp = latest_points.c
        head = conn.execute(select(lp.version, lp.rewrites).where(
            lp.run_id == run_id, lp.metric == metric, lp.rank == rank)).first()
        empty = (np.empty(0, np.int64), np.empty(0), np.empty(0))
        if head is None:
            return empty
        key = (run_id, metric, rank)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
        if entry is not None and entry[0] == head.version and entry[1] == head.rewrites:
            return entry[2:]
        if entry is not None and entry[1] == head.rewrites and entry[2].size:
            more = store._load_columns(conn, run_id, metric, rank, after=int(entry[2][-1]))
            columns = tuple(np.concatenate([old, new]) for old, new in zip(entry[2:], more))
        else:
            columns = store._load_columns(conn, run_id, metric, rank, after=None)
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


def _summary_rows(run_id: int, keys: Sequence[Tuple[str, int]], summary: Mapping[str, np.ndarray]) -> List[Dict[str, Any]]:
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


def _run_dict(row: Mapping[str, Any]) -> Dict[str, Any]:
    return {"name": row["name"], "status": row["status"], "config": dict(row["config"]),
            "optimizer": row["optimizer"], "policy": row["policy"], "created_at": row["created_at"],
            "updated_at": row["updated_at"], "last_step": row["last_step"], "last_ingest_at": row["last_ingest_at"]}


def _token_dict(row: Mapping[str, Any]) -> Dict[str, Any]:
    return {"id": row["id"], "name": row["name"], "hash": row["hash"], "scopes": row["scopes"].split(),
            "created_at": row["created_at"], "revoked_at": row["revoked_at"]}


def _run_info(row: Mapping[str, Any]) -> RunInfo:
    return RunInfo(row["name"], row["status"], dict(row["config"]), row["created_at"], row["updated_at"], row["last_step"])


def open_store(url: str) -> Store:
    """Open (creating and migrating if needed) the store at ``url`` (SQLAlchemy URL or file path)."""
    return Store(url)
