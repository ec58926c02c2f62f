"""The storage layer: the only module that writes SQL (SQLite by default, PostgreSQL at scale).

``open_store(url)`` opens (and migrates) a store. The agent's embedded mode writes through it from
a background thread; the collector service serves from it. Reads return NumPy arrays.

Guarantees:

* writing the same point twice (a retried batch) stores it once: ``(run, metric, rank, step)``
  is the primary key and inserts skip conflicts;
* NaN and ±Inf are stored and read back as they are (NaN as SQL NULL, since SQLite has no NaN);
* SQLite runs in WAL mode, so readers (``moxco serve``, audits) never block the writer.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from alembic import command
from alembic.config import Config
from sqlalchemy import case, create_engine, event, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.exc import ArgumentError

from moxco.collector import schema
from moxco.collector.schema import RUN_LEVEL_RANK, RUN_STATUSES, decisions, metric_points, runs
from moxco.policy import Decision, decision_id

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
INSERT_CHUNK = 5000  # rows per INSERT statement: under SQLite's bound-parameter limit


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
    return url


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


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


class Store:
    """A moxco store on one database URL (thread-safe: SQLAlchemy pools connections)."""

    def __init__(self, url: str, *, migrate: bool = True) -> None:
        self.url = normalize_url(url)
        try:
            self.engine = create_engine(self.url, future=True)
        except ArgumentError as exc:
            raise StoreError(f"not a database URL: {url!r} ({exc})") from None
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
            database = self.engine.url.database
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
        if migrate:
            upgrade(self.engine)

    # --- runs ------------------------------------------------------------------------------------

    def _run_id(self, conn, name: str) -> int:
        run_id = conn.execute(select(runs.c.id).where(runs.c.name == name)).scalar()
        if run_id is None:
            raise StoreError(f"no run named {name!r}")
        return run_id

    def create_run(self, name: str, config: Optional[Mapping[str, Any]] = None, *, status: str = "running",
                   exist_ok: bool = True) -> RunInfo:
        """Register a run (or, with ``exist_ok``, mark an existing one running again and merge config)."""
        _validate_name(name)
        if status not in RUN_STATUSES:
            raise StoreError(f"status must be one of {RUN_STATUSES}, got {status!r}")
        now = time.time()
        with self.engine.begin() as conn:
            row = conn.execute(select(runs).where(runs.c.name == name)).mappings().first()
            if row is None:
                conn.execute(runs.insert().values(name=name, status=status, config=dict(config or {}),
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
        with self.engine.begin() as conn:
            run_id = self._run_id(conn, name)
            conn.execute(update(runs).where(runs.c.id == run_id).values(status=status, updated_at=time.time()))

    def run(self, name: str) -> RunInfo:
        with self.engine.connect() as conn:
            row = conn.execute(select(runs).where(runs.c.name == name)).mappings().first()
        if row is None:
            raise StoreError(f"no run named {name!r}")
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
        rows = []
        last_step = None
        for point in points:
            p = point if isinstance(point, Point) else Point(*point)
            if not isinstance(p.metric, str) or not p.metric or len(p.metric) > schema.MAX_METRIC_LENGTH:
                raise StoreError(f"metric name must be a non-empty string of at most {schema.MAX_METRIC_LENGTH} characters, got {p.metric!r}")
            step = int(p.step)
            rows.append({"metric": p.metric, "rank": int(p.rank), "step": step,
                         "value": _to_db(p.value), "wall_time": float(p.wall_time)})
            last_step = step if last_step is None else max(last_step, step)
        if not rows:
            return 0
        with self.engine.begin() as conn:
            run_id = self._run_id(conn, name)
            for row in rows:
                row["run_id"] = run_id
            insert = self._insert_ignore(metric_points)
            for start in range(0, len(rows), INSERT_CHUNK):
                conn.execute(insert, rows[start : start + INSERT_CHUNK])
            newer = case((runs.c.last_step.is_(None), last_step), (runs.c.last_step < last_step, last_step),
                         else_=runs.c.last_step)
            conn.execute(update(runs).where(runs.c.id == run_id).values(last_step=newer, updated_at=time.time()))
        return len(rows)

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
        query = select(metric_points.c.step, metric_points.c.value)
        with self.engine.connect() as conn:
            run_id = self._run_id(conn, name)
            query = query.where(metric_points.c.run_id == run_id, metric_points.c.metric == metric,
                                metric_points.c.rank == rank)
            if start is not None:
                query = query.where(metric_points.c.step >= int(start))
            if end is not None:
                query = query.where(metric_points.c.step <= int(end))
            rows = conn.execute(query.order_by(metric_points.c.step)).all()
        steps = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        values = np.fromiter((_from_db(r[1]) for r in rows), dtype=np.float64, count=len(rows))
        return steps, values

    def metrics(self, name: str) -> List[str]:
        """Names of the metrics stored for run ``name``."""
        with self.engine.connect() as conn:
            run_id = self._run_id(conn, name)
            query = select(metric_points.c.metric).where(metric_points.c.run_id == run_id).distinct()
            return sorted(conn.execute(query).scalars())

    def latest(self, name: str, *, rank: int = RUN_LEVEL_RANK) -> Dict[str, Tuple[int, float]]:
        """``{metric: (step, value)}`` of the newest point of every metric of run ``name``."""
        with self.engine.connect() as conn:
            run_id = self._run_id(conn, name)
            newest = (
                select(metric_points.c.metric, func.max(metric_points.c.step).label("step"))
                .where(metric_points.c.run_id == run_id, metric_points.c.rank == rank)
                .group_by(metric_points.c.metric).subquery()
            )
            query = select(metric_points.c.metric, metric_points.c.step, metric_points.c.value).join(
                newest, (metric_points.c.metric == newest.c.metric) & (metric_points.c.step == newest.c.step)
            ).where(metric_points.c.run_id == run_id, metric_points.c.rank == rank)
            return {m: (int(s), _from_db(v)) for m, s, v in conn.execute(query)}

    # --- decisions -------------------------------------------------------------------------------

    def add_decision(self, name: str, decision: Decision) -> str:
        """Store a decision (idempotent: the same decision stored twice is one row). Returns its id."""
        ident = decision_id(name, decision)
        row = {
            "id": ident, "step": int(decision.step), "source": decision.source, "action": dict(decision.action),
            "goodness": _to_db(decision.goodness), "grad_term": _to_db(decision.grad_term),
            "sharpness_term": _to_db(decision.sharpness_term), "loss_term": _to_db(decision.loss_term),
            "created_at": time.time(), "applied_step": None, "applied_at": None,
        }
        with self.engine.begin() as conn:
            row["run_id"] = self._run_id(conn, name)
            conn.execute(self._insert_ignore(decisions), [row])
        return ident

    def acknowledge_decision(self, ident: str, applied_step: int) -> None:
        """Record the step a decision was applied at (the first acknowledgement wins)."""
        with self.engine.begin() as conn:
            result = conn.execute(
                update(decisions).where(decisions.c.id == ident, decisions.c.applied_step.is_(None))
                .values(applied_step=int(applied_step), applied_at=time.time())
            )
            if result.rowcount == 0 and conn.execute(select(decisions.c.id).where(decisions.c.id == ident)).first() is None:
                raise StoreError(f"no decision with id {ident!r}")

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
        self.engine.dispose()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _run_info(row: Mapping[str, Any]) -> RunInfo:
    return RunInfo(row["name"], row["status"], dict(row["config"]), row["created_at"], row["updated_at"], row["last_step"])


def open_store(url: str) -> Store:
    """Open (creating and migrating if needed) the store at ``url`` (SQLAlchemy URL or file path)."""
    return Store(url)
