"""The storage layer: the only code that writes SQL (SQLite by default, PostgreSQL at scale).

``open_store(url)`` opens (and migrates) a store. The embedded agent and the collector service
use the same ``Store`` calls: ``open_run`` (an agent's registration: a taken name starts a new,
suffixed run unless the agent resumes), ``put_run`` (registration or update by name, with the run's
decision policy),
``ingest`` (a batch of points with acknowledgements; the run's policy decides on its goodness
points, under the run's lock), ``decisions``/``acknowledge``/``add_decision`` (``moxco.decision.
Decision`` objects), ``set_status``, ``run``/``list_runs``/``delete_run``, the series reads and
exports, tokens. Reads return NumPy arrays.

Guarantees:

* writing the same point twice (a retried batch) stores it once, the first write winning; a batch
  id seen before stores nothing;
* NaN and ±Inf are stored and read back as they are;
* SQLite runs in WAL mode, so readers (``moxco serve``, audits) never block the writer, and writers
  queue instead of failing with "database is locked";
* every write to a run first takes the run's row lock, so several collector processes sharing one
  database see one consistent decision-policy state and one ``latest_points`` row per series.

Modules: ``engine`` (URL, engine, migrations, SQLite concurrency, driver errors), ``sqlite`` and
``postgres`` (each database's point insert, columnar read and codecs), ``runs``, ``points`` (ingest),
``series`` (reads, ``SeriesCache``), ``export`` (whole series and a run's table in bounded windows,
``frame``), ``decisions`` (and the policy step), ``tokens``.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import make_url

from moxco.collector.store.base import (BusyError, ConflictError, ForbiddenError, IngestResult, NotFoundError,
                                        OpenedRun, RunInfo, RunSummary, StoreError, StoreLostError, TooLargeError)
from moxco.collector.store.decisions import Decisions
from moxco.collector.store.export import EXPORT_CHUNK_POINTS, Export
from moxco.collector.store.engine import MIGRATIONS, StoreCore, normalize_url, store_exists, upgrade
from moxco.collector.store.points import Points
from moxco.collector.store.runs import UNSET, Runs
from moxco.collector.store.series import Latest, Series, SeriesCache
from moxco.collector.store.tokens import Tokens, hash_token


class Store(Runs, Points, Series, Export, Decisions, Tokens, StoreCore):
    """A moxco store on one database URL (thread-safe: SQLAlchemy pools connections)."""

    def __init__(self, url: str, *, migrate: bool = True, pool_size: int = 10,
                 series_cache_points: int = 20_000_000, background_checkpoint: bool = False) -> None:
        """``migrate``: run the Alembic migrations on open; ``series_cache_points``: the bound of
        this process's ``SeriesCache``; ``background_checkpoint`` (SQLite files): WAL checkpoints
        in a thread of this store instead of inside a commit."""
        super().__init__(url, migrate=migrate, pool_size=pool_size, background_checkpoint=background_checkpoint)
        self._series_cache = SeriesCache(series_cache_points)


def open_store(url: str, *, create: bool = True) -> Store:
    """Open (migrating if needed) the store at ``url`` (SQLAlchemy URL or file path). ``create``:
    make a new store when there is none; ``create=False`` refuses (``NotFoundError``, naming the
    file or database) instead, for callers that only read or change what is there."""
    if not create and not store_exists(url):
        where = normalize_url(url)
        if where.startswith("sqlite"):
            where = f"{where} (the file {str(Path(make_url(where).database or ':memory:').resolve())!r} does not exist)"
        raise NotFoundError(f"no moxco store at {where.split('@')[-1]}; nothing was created: check the URL, or let "
                            "an agent or `moxco serve` create it")
    return Store(url)


__all__ = ["BusyError", "ConflictError", "EXPORT_CHUNK_POINTS", "ForbiddenError", "IngestResult", "Latest", "MIGRATIONS",
           "NotFoundError", "OpenedRun", "RunInfo", "RunSummary", "Store", "StoreError", "StoreLostError",
           "TooLargeError", "UNSET", "hash_token", "normalize_url", "open_store", "store_exists", "upgrade"]
