"""Collector tables: batch ids, tokens, latest points; run optimizer/policy/policy state.

* ``batches (run_id, batch_id)``: a retried batch is recognised and stored once.
* ``tokens``: hashed API tokens with scopes.
* ``latest_points (run_id, metric, rank)``: newest point per series with version counters,
  back-filled here from ``metric_points`` (so stores written before 0002 answer "latest" too).
* ``runs.optimizer``, ``runs.policy``, ``runs.policy_state``, ``runs.last_ingest_at``;
  ``decisions.reason`` (operator decisions).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("optimizer", sa.JSON, nullable=True))
        batch.add_column(sa.Column("policy", sa.JSON, nullable=True))
        batch.add_column(sa.Column("policy_state", sa.JSON, nullable=True))
        batch.add_column(sa.Column("last_ingest_at", sa.Float, nullable=True))
    with op.batch_alter_table("decisions") as batch:
        batch.add_column(sa.Column("reason", sa.String(1000), nullable=True))
    op.create_table(
        "latest_points",
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("metric", sa.String(100), primary_key=True),
        sa.Column("rank", sa.Integer, primary_key=True),
        sa.Column("step", sa.BigInteger, nullable=False),
        sa.Column("value", sa.Float, nullable=True),
        sa.Column("wall_time", sa.Float, nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("rewrites", sa.BigInteger, nullable=False),
    )
    op.execute(
        "INSERT INTO latest_points (run_id, metric, rank, step, value, wall_time, version, rewrites) "
        "SELECT p.run_id, p.metric, p.rank, p.step, p.value, p.wall_time, 1, 0 FROM metric_points p "
        "JOIN (SELECT run_id, metric, rank, MAX(step) AS step FROM metric_points "
        "GROUP BY run_id, metric, rank) m "
        "ON p.run_id = m.run_id AND p.metric = m.metric AND p.rank = m.rank AND p.step = m.step"
    )
    op.create_table(
        "batches",
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("batch_id", sa.String(200), primary_key=True),
        sa.Column("stored", sa.Integer, nullable=False),
        sa.Column("received_at", sa.Float, nullable=False),
    )
    op.create_table(
        "tokens",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("scopes", sa.String(200), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("revoked_at", sa.Float, nullable=True),
        sa.UniqueConstraint("hash", name="uq_tokens_hash"),
    )


def downgrade() -> None:
    op.drop_table("tokens")
    op.drop_table("batches")
    op.drop_table("latest_points")
    with op.batch_alter_table("decisions") as batch:
        batch.drop_column("reason")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("last_ingest_at")
        batch.drop_column("policy_state")
        batch.drop_column("policy")
        batch.drop_column("optimizer")
