"""The tables of the moxco store (SQLAlchemy Core), shared by SQLite and PostgreSQL.

* ``runs``: one row per training run: unique name, a stable ``uid`` (a UUID string: the run's id
  outside the store, never reused), status, config (JSON), timestamps (server
  clock), last step, ``last_ingest_at``; ``optimizer`` (JSON), ``policy``
  (``PolicyConfig.to_dict()``; NULL: no policy decisions for the run) and ``policy_state``
  (``DecisionPolicy.state_dict()``, updated under the run's row lock so several collector workers
  share one policy); ``owner``: the id of the token that registered it (NULL: registered without
  a token, by an admin token, embedded or by the CLI), the only ``ingest`` token that may write
  to it; ``session``: the writer session that holds it (docs/api.md, One writer per run); the
  user's ``tags`` (JSON list of strings) and ``note``.
* ``metric_points``: the series, one row per point, columns ``(run_id, metric, rank, step, value,
  wall_time)``. ``value`` NULL means NaN (±Inf are stored as they are); ``rank`` is -1 for
  run-level values and the torch.distributed rank for per-rank ones. On SQLite it is a
  ``WITHOUT ROWID`` table keyed by ``(run_id, metric, rank, step)``: a point written twice is stored
  once, and the key is the index every range scan uses. On PostgreSQL it is a read-only view over
  ``point_chunks`` with the same columns.
* ``point_chunks`` (PostgreSQL only): the points of one write, one series and one block of
  ``BLOCK_STEPS`` steps as arrays (``steps`` sorted and unique, ``vals`` with NaN as NaN,
  ``walls``); ``seq`` is the series' ``latest_points.version`` after that write. A series' chunks
  are disjoint (the store skips steps already stored: first write wins).
* ``latest_points``: the newest point of every ``(run, metric, rank)`` series, maintained on every
  write; it answers "latest values", the Prometheus scrape and "which metrics does this run have",
  and its ``version`` / ``rewrites`` counters let readers cache a series and fetch only what was
  appended since.
* ``series_blocks``: per series, one summary per block of ``BLOCK_STEPS`` steps (block
  ``step // BLOCK_STEPS``): point count, first/last point, the first point holding the minimum and
  the first holding the maximum (NaN skipped; NULL when the block has only NaN), the first NaN;
  maintained in the ingest transaction, so a long series is downsampled (``minmax``) from its
  summaries.
* ``decisions``: phase-switch decisions (``moxco.decision.Decision``): step, action, cause
  (``source``, ``issued_by``, the goodness and its three terms, the policy's configuration,
  ``reason``), ``apply_at``, and the acknowledgement (``applied_step``, ``applied_at``,
  ``rejected``).
* ``batches``: ingested batch ids per run, so a retried batch is a no-op.
* ``tokens``: API tokens (SHA-256 of the secret, never the secret), scopes, revocation.

``metric_points`` (SQLite), ``point_chunks`` and ``series_blocks`` have no foreign key to ``runs``:
they are written only under the run's row lock, and runs are never deleted. Schema changes go
through Alembic migrations in ``migrations/versions`` (``Store`` upgrades on open); this module
mirrors the latest revision for queries.
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

from moxco.wire import MAX_BATCH_ID, MAX_METRIC_NAME, MAX_RUN_NAME, MAX_SESSION, RUN_LEVEL_RANK  # noqa: F401 (re-exported)

RUN_STATUSES = ("running", "finished", "interrupted", "failed")
MAX_NAME_LENGTH = MAX_RUN_NAME
MAX_METRIC_LENGTH = MAX_METRIC_NAME
MAX_BATCH_ID_LENGTH = MAX_BATCH_ID
TOKEN_SCOPES = ("ingest", "read", "decide", "admin")
BLOCK_STEPS = 1024  # steps per series_blocks row: changing it needs a migration that rebuilds them

metadata = MetaData()

runs = Table(
    "runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(MAX_NAME_LENGTH), nullable=False),
    Column("uid", String(36), nullable=True),  # set by the store on every insert (migration 0008)
    Column("status", String(16), nullable=False),
    Column("config", JSON, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("last_step", BigInteger, nullable=True),
    Column("optimizer", JSON, nullable=True),
    Column("policy", JSON, nullable=True),
    Column("policy_state", JSON, nullable=True),
    Column("last_ingest_at", Float, nullable=True),
    Column("owner", Integer, nullable=True),  # tokens.id of the registering token; NULL: none
    Column("session", String(MAX_SESSION), nullable=True),  # the writer session holding the run
    Column("tags", JSON, nullable=True),  # the user's labels: a list of strings (NULL: none)
    Column("note", String(1000), nullable=True),  # the user's note on the run
    UniqueConstraint("name", name="uq_runs_name"),
    Index("uq_runs_uid", "uid", unique=True),
)

metric_points = Table(
    "metric_points",
    metadata,
    Column("run_id", Integer, primary_key=True),
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
    Column("issued_by", String(MAX_NAME_LENGTH), nullable=True),  # NULL: the source (policy)
    Column("policy", JSON, nullable=True),  # the PolicyConfig that fired a policy decision
    Column("apply_at", BigInteger, nullable=True),
    Column("rejected", String(1000), nullable=True),  # the agent refused it: why
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

point_chunks = Table(  # PostgreSQL only; SQLite keeps metric_points as a table
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
