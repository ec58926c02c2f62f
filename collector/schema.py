"""The tables of the moxco store (SQLAlchemy Core), shared by SQLite and PostgreSQL.

* ``runs``: one row per training run: unique name, status, config (JSON), timestamps, last step.
* ``metric_points``: the series, one row per point. Primary key ``(run_id, metric, rank, step)``:
  a point written twice (a retried batch) is stored once, and the key is the index every range
  scan uses (``WHERE run_id = ? AND metric = ? AND step BETWEEN ? AND ?``), so appends stay cheap.
  ``value`` NULL means NaN (SQLite cannot store NaN; ±Inf are stored as they are). ``rank`` is
  -1 for run-level values and the torch.distributed rank for per-rank ones. On PostgreSQL since
  0005 it is a view over ``point_chunks`` with these same columns (read-only).
* ``point_chunks`` (0005, PostgreSQL only): the points of one write, one series and one block of
  ``BLOCK_STEPS`` steps as arrays (``steps`` sorted and unique, ``vals`` with NaN as NaN,
  ``walls``); ``seq`` is the series' ``latest_points.version`` after that write. A series' chunks
  are disjoint (the store skips steps already stored: first write wins). One row per series and
  batch instead of one per point: a tenth of the index work and of the size.
* ``decisions``: phase-switch decisions with their goodness terms, action, and acknowledgement.
* ``latest_points`` (revision 0002): the newest point of every ``(run, metric, rank)`` series,
  maintained on every write. It answers "latest values", the Prometheus scrape and "which metrics
  does this run have" without scanning ``metric_points``, and its ``version`` / ``rewrites``
  counters let readers cache a series and fetch only what was appended since.
* ``batches`` (0002): ingested batch ids per run, so a retried batch is a no-op.
* ``tokens`` (0002): API tokens (SHA-256 of the secret, never the secret), scopes, revocation.
* ``series_blocks`` (0003): per series, one summary per block of ``BLOCK_STEPS`` steps (block
  ``step // BLOCK_STEPS``): point count, first/last point, the first point holding the minimum and
  the first holding the maximum (NaN skipped; NULL when the block has only NaN), the first NaN.
  Maintained in the ingest transaction (merged for appends, recomputed from the points for the
  touched blocks otherwise), so a 1 M-point series is downsampled (``minmax``) from ~1,000 rows.
  No foreign key (like ``metric_points`` on PostgreSQL since 0003 and on SQLite since 0004: the
  per-row check cost ~40 % of a PostgreSQL ingest; points and summaries are only written under the
  run's row lock, and runs are never deleted). On SQLite ``metric_points`` is ``WITHOUT ROWID``
  (0004): one B-tree keyed by the primary key instead of a table plus its key index.
* ``runs`` gains (0002) ``optimizer``, ``policy`` (``PolicyConfig.to_dict()``, NULL: the collector
  takes no decisions for the run), ``policy_state`` (``DecisionPolicy.state_dict()``, updated under
  the run's row lock so several collector workers share one policy) and ``last_ingest_at``.

Schema changes go through Alembic migrations in ``migrations/versions`` (``Store`` upgrades on
open); this module mirrors the latest revision for queries.
"""

from __future__ import annotations

from sqlalchemy import (
    ARRAY,
    JSON,
    BigInteger,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    UniqueConstraint,
)

RUN_LEVEL_RANK = -1
RUN_STATUSES = ("running", "finished", "interrupted", "failed")
MAX_NAME_LENGTH = 200
MAX_METRIC_LENGTH = 100
MAX_BATCH_ID_LENGTH = 200
TOKEN_SCOPES = ("ingest", "read", "decide", "admin")
BLOCK_STEPS = 1024  # steps per series_blocks row: changing it needs a migration that rebuilds them

metadata = MetaData()

runs = Table(
    "runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(MAX_NAME_LENGTH), nullable=False),
    Column("status", String(16), nullable=False),
    Column("config", JSON, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("last_step", BigInteger, nullable=True),
    Column("optimizer", JSON, nullable=True),
    Column("policy", JSON, nullable=True),
    Column("policy_state", JSON, nullable=True),
    Column("last_ingest_at", Float, nullable=True),
    UniqueConstraint("name", name="uq_runs_name"),
)

metric_points = Table(
    "metric_points",
    metadata,
    Column("run_id", Integer, primary_key=True),  # no foreign key since 0003 (PostgreSQL) / 0004 (SQLite)
    Column("metric", String(MAX_METRIC_LENGTH), primary_key=True),
    Column("rank", Integer, primary_key=True),
    Column("step", BigInteger, primary_key=True),
    Column("value", Float, nullable=True),
    Column("wall_time", Float, nullable=False),
)

decisions = Table(
    "decisions",
    metadata,
    Column("id", String(300), primary_key=True),
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("step", BigInteger, nullable=False),
    Column("source", String(16), nullable=False),
    Column("action", JSON, nullable=False),
    Column("goodness", Float, nullable=True),
    Column("grad_term", Float, nullable=True),
    Column("sharpness_term", Float, nullable=True),
    Column("loss_term", Float, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("applied_step", BigInteger, nullable=True),
    Column("applied_at", Float, nullable=True),
    Column("reason", String(1000), nullable=True),
    Index("ix_decisions_run_step", "run_id", "step"),
)

latest_points = Table(
    "latest_points",
    metadata,
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
    Column("metric", String(MAX_METRIC_LENGTH), primary_key=True),
    Column("rank", Integer, primary_key=True),
    Column("step", BigInteger, nullable=False),
    Column("value", Float, nullable=True),
    Column("wall_time", Float, nullable=False),
    Column("version", BigInteger, nullable=False),  # +1 on every write touching the series
    Column("rewrites", BigInteger, nullable=False),  # +1 on every write not strictly after `step`
)

batches = Table(
    "batches",
    metadata,
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
    Column("batch_id", String(MAX_BATCH_ID_LENGTH), primary_key=True),
    Column("stored", Integer, nullable=False),
    Column("received_at", Float, nullable=False),
)

tokens = Table(
    "tokens",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(MAX_NAME_LENGTH), nullable=False),
    Column("hash", String(64), nullable=False),
    Column("scopes", String(200), nullable=False),  # space-separated
    Column("created_at", Float, nullable=False),
    Column("revoked_at", Float, nullable=True),
    UniqueConstraint("hash", name="uq_tokens_hash"),
)

series_blocks = Table(
    "series_blocks",
    metadata,
    Column("run_id", Integer, primary_key=True),
    Column("metric", String(MAX_METRIC_LENGTH), primary_key=True),
    Column("rank", Integer, primary_key=True),
    Column("block", BigInteger, primary_key=True),  # step // BLOCK_STEPS (floor)
    Column("count", Integer, nullable=False),
    Column("first_step", BigInteger, nullable=False),
    Column("first_value", Float, nullable=True),  # NULL: NaN
    Column("first_wall", Float, nullable=False),
    Column("last_step", BigInteger, nullable=False),
    Column("last_value", Float, nullable=True),
    Column("last_wall", Float, nullable=False),
    Column("min_step", BigInteger, nullable=True),  # NULL: the block holds only NaN
    Column("min_value", Float, nullable=True),
    Column("min_wall", Float, nullable=True),
    Column("max_step", BigInteger, nullable=True),
    Column("max_value", Float, nullable=True),
    Column("max_wall", Float, nullable=True),
    Column("nan_step", BigInteger, nullable=True),  # first NaN of the block; NULL: none
    Column("nan_wall", Float, nullable=True),
)

point_chunks = Table(  # PostgreSQL only (revision 0005); SQLite keeps metric_points as a table
    "point_chunks",
    metadata,
    Column("run_id", Integer, primary_key=True),
    Column("metric", String(MAX_METRIC_LENGTH), primary_key=True),
    Column("rank", Integer, primary_key=True),
    Column("block", BigInteger, primary_key=True),  # step // BLOCK_STEPS (floor), as series_blocks
    Column("seq", BigInteger, primary_key=True),  # latest_points.version after the write; 0: migrated
    Column("n", Integer, nullable=False),
    Column("first_step", BigInteger, nullable=False),
    Column("last_step", BigInteger, nullable=False),
    Column("steps", ARRAY(BigInteger), nullable=False),
    Column("vals", ARRAY(Float), nullable=False),
    Column("walls", ARRAY(Float), nullable=False),
)

SUMMARY_FIELDS = tuple(c.name for c in series_blocks.columns)[4:]
