"""Opening a store: the URL, the SQLAlchemy engine, migrations, SQLite's concurrency, driver errors.

* ``normalize_url``: a SQLAlchemy URL or a bare file path (a SQLite file); ``postgresql://`` is
  read as ``postgresql+psycopg://`` (psycopg 3).
* SQLite runs in WAL mode (readers never block the writer) with ``synchronous=NORMAL``; write
  transactions start with ``BEGIN IMMEDIATE`` (a read-modify-write never hits SQLITE_BUSY on a
  stale snapshot) and first queue on a lock of this process and an ``flock`` shared by every
  process on the file (``_QueuedWriter``); WAL checkpoints can run in a thread of their own
  (``_Checkpointer``).
* Statements sent on the DB-API connection (the ingest path) fail with SQLAlchemy's errors, as if
  SQLAlchemy had run them (``StoreCore._driver_errors``), so callers see one kind of error.
* ``StoreCore`` holds the engine, the dialect object (``sqlite.SQLite`` or ``postgres.PostgreSQL``,
  chosen once here) and the run's row lock every write takes first.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import threading
from pathlib import Path
from typing import Any, Dict, Optional

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, event, inspect, make_url, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.exc import ArgumentError

from moxco.collector.schema import runs
from moxco.collector.store.base import NotFoundError, StoreError, StoreLostError, check_owner

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")


def normalize_url(url: str) -> str:
    """Accept a SQLAlchemy URL or a bare file path (taken as a SQLite file). Something that starts
    like a URL but lacks ``://`` (``sqlite:/runs.db``) is refused (``StoreError``), never taken as a
    path (it would make a directory named ``sqlite:``)."""
    if not isinstance(url, str) or not url.strip():
        raise StoreError(f"a store URL is a non-empty string, got {url!r}")
    if "://" not in url:
        if _SCHEME.match(url) and not re.match(r"^[A-Za-z]:[\\/]", url):  # (C:\… is a Windows path)
            scheme = url.split(":", 1)[0]
            raise StoreError(f"not a database URL: {url!r} needs '://' after {scheme + ':'!r} (e.g. "
                             "sqlite:///runs.db for a file in the working directory, sqlite:////abs/path.db, "
                             "postgresql://user@host/db); a plain path is taken as a SQLite file")
        return f"sqlite:///{Path(url).expanduser().resolve()}"
    for prefix in ("postgresql://", "postgres://"):  # the plain libpq form: use psycopg 3
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def store_exists(url: str) -> bool:
    """Whether ``url`` holds a moxco store already (a SQLite file that exists; a database with the
    ``runs`` table), without creating anything. An in-memory SQLite database never does. Errors
    reaching a server (PostgreSQL down, bad credentials) are raised, not read as "no store"."""
    url = normalize_url(url)
    if url.startswith("sqlite"):
        database = make_url(url).database
        if not database or database == ":memory:":
            return False
        path = Path(database)
        if not path.is_file():
            return False
        if path.stat().st_size == 0:
            return False
    engine = create_engine(url)
    try:
        return inspect(engine).has_table("runs")
    finally:
        engine.dispose()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Run the Alembic migrations up to ``revision`` on ``engine``."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


# --- SQLite concurrency ------------------------------------------------------------------------------


def sqlite_pragmas(dbapi_connection, _record) -> None:
    # SQLAlchemy, not the sqlite3 module, opens transactions (see sqlite_begin)
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def sqlite_pragmas_no_autocheckpoint(dbapi_connection, record) -> None:
    sqlite_pragmas(dbapi_connection, record)
    dbapi_connection.execute("PRAGMA wal_autocheckpoint=0")  # _Checkpointer does it


def sqlite_begin(conn) -> None:
    """Open SQLite transactions ourselves: ``BEGIN IMMEDIATE`` for writers (take the write lock
    before reading, so a read-modify-write never hits SQLITE_BUSY on a stale WAL snapshot), plain
    deferred ``BEGIN`` for readers (they never block the writer)."""
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("moxco_write") else "BEGIN")


class _QueuedWriter:
    """``engine.begin()`` for SQLite write transactions, queued first on a lock of this process and
    then on an ``flock`` of ``<database>-moxco-write.lock`` shared by all processes (collector
    workers, an embedded agent). SQLite's own busy handler polls with sleeps of up to 100 ms, which
    turned 8–32 concurrent writers into p99 latencies of seconds; a blocked ``flock`` wakes as soon
    as the holder lets go. ``BEGIN IMMEDIATE`` and ``busy_timeout`` still guard writers that do not
    queue here (other programs). Without a lock file (read-only folder) only the process lock is used."""

    def __init__(self, engine, lock_path: Optional[str], check=None) -> None:
        self._engine = engine
        self._check = check  # called before each write transaction (StoreCore._check_file)
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
            if self._check is not None and self._depth == 0:
                self._check()
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

    def __init__(self, path: str, writer: _QueuedWriter, every: float = 0.25, max_frames: int = 16_000) -> None:
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


# --- the store's core --------------------------------------------------------------------------------


class StoreCore:
    """The engine, the dialect and the run lock; ``Store`` adds runs, series, decisions and tokens."""

    def __init__(self, url: str, *, migrate: bool = True, pool_size: int = 10,
                 background_checkpoint: bool = False) -> None:
        """``background_checkpoint`` (SQLite files): WAL checkpoints run in a thread of this store
        (``_Checkpointer``) instead of inside the commit that crosses SQLite's 1,000-page mark."""
        from moxco.collector.store.postgres import PostgreSQL
        from moxco.collector.store.sqlite import SQLite

        self.url = normalize_url(url)
        is_pg = self.url.startswith("postgresql")
        kwargs: Dict[str, Any] = {}
        if is_pg:
            kwargs.update(pool_size=pool_size, max_overflow=2 * pool_size, pool_pre_ping=False)
            with contextlib.suppress(ImportError):  # no psycopg: create_engine says so below
                PostgreSQL.register_arrays()
        try:
            self.engine = create_engine(self.url, **kwargs)
        except ArgumentError as exc:
            raise StoreError(f"not a database URL: {url!r} ({exc})") from None
        except ModuleNotFoundError as exc:
            raise StoreError(f"the driver for {self.url.split('://', 1)[0]!r} is not installed ({exc.name}); "
                             "PostgreSQL needs `pip install 'moxco[collector]'` (psycopg)") from None
        name = self.engine.dialect.name
        if name not in ("sqlite", "postgresql"):
            raise StoreError(f"unsupported database {name!r}: use SQLite or PostgreSQL")
        writer = self.engine.execution_options(moxco_write=True)
        self._checkpointer: Optional[_Checkpointer] = None
        self._file: Optional[str] = None  # a SQLite store's file, watched by _check_file
        self._identity: Optional[tuple] = None
        if name == "sqlite":
            database = self.engine.url.database
            on_file = bool(database) and database != ":memory:"
            background_checkpoint = background_checkpoint and on_file
            event.listen(self.engine, "connect", sqlite_pragmas_no_autocheckpoint if background_checkpoint
                         else sqlite_pragmas)
            event.listen(self.engine, "begin", sqlite_begin)
            if on_file:
                Path(database).parent.mkdir(parents=True, exist_ok=True)
                self._file = database
            writer = _QueuedWriter(writer, f"{database}-moxco-write.lock" if on_file else None,
                                   self._check_file if on_file else None)
            self.sql = SQLite()
        else:
            background_checkpoint = False
            self.sql = PostgreSQL()
        self._writer = writer
        if migrate:
            upgrade(self.engine)
        self._identity = self._file_identity()
        if background_checkpoint:
            self._checkpointer = _Checkpointer(self.engine.url.database, writer)

    def _file_identity(self) -> Optional[tuple]:
        if self._file is None:
            return None
        try:
            st = os.stat(self._file)
        except FileNotFoundError:
            return None
        return st.st_dev, st.st_ino

    def _check_file(self) -> None:
        """Before each write transaction of a SQLite store: ``StoreLostError`` when its file was
        deleted or replaced (another device or inode at that path) since the store opened it.
        SQLite would go on writing to the deleted file through its open connections, and every
        point written so would be lost without a word. One ``stat`` (about a microsecond)."""
        identity = self._file_identity()
        if self._identity is None:
            self._identity = identity
            return
        if identity == self._identity:
            return
        what = "deleted" if identity is None else "replaced by another file"
        raise StoreLostError(f"the store file {self._file} was {what} while this store had it open: what was "
                             "written to it is gone with it, and this store would write to a file no one can "
                             "read. Open the store again (a new file) to go on")

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self.sql.name

    def ping(self) -> None:
        """Raise (a SQLAlchemy ``OperationalError``) when the database cannot be reached."""
        with self.engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")

    def _lock_run(self, conn, name: str):
        """The run's row (``id``, ``policy``, ``policy_state``, ``last_step``, ``owner``), locked for this
        write transaction (``SELECT … FOR UPDATE`` on PostgreSQL; SQLite serialises writers)."""
        query = select(runs.c.id, runs.c.policy, runs.c.policy_state, runs.c.last_step, runs.c.owner).where(
            runs.c.name == name)
        row = conn.execute(self.sql.for_update(query)).first()
        if row is None:
            raise NotFoundError(f"no run named {name!r}")
        return row

    def _run_id(self, conn, name: str, token_id: Optional[int] = None) -> int:
        """The run's id; with ``token_id`` (a caller limited to the runs it registered), only when
        that token registered it (``ForbiddenError``)."""
        row = conn.execute(select(runs.c.id, runs.c.owner).where(runs.c.name == name)).first()
        if row is None:
            raise NotFoundError(f"no run named {name!r}")
        check_owner(name, row.owner, token_id)
        return row.id

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

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.close()
        self.engine.dispose()
        if isinstance(self._writer, _QueuedWriter):
            self._writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
