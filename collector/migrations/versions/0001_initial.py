"""Initial schema: runs, metric_points, decisions.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("config", sa.JSON, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("last_step", sa.BigInteger, nullable=True),
        sa.UniqueConstraint("name", name="uq_runs_name"),
    )
    op.create_table(
        "metric_points",
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("metric", sa.String(100), primary_key=True),
        sa.Column("rank", sa.Integer, primary_key=True),
        sa.Column("step", sa.BigInteger, primary_key=True),
        sa.Column("value", sa.Float, nullable=True),
        sa.Column("wall_time", sa.Float, nullable=False),
    )
    op.create_table(
        "decisions",
        sa.Column("id", sa.String(300), primary_key=True),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("step", sa.BigInteger, nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("action", sa.JSON, nullable=False),
        sa.Column("goodness", sa.Float, nullable=True),
        sa.Column("grad_term", sa.Float, nullable=True),
        sa.Column("sharpness_term", sa.Float, nullable=True),
        sa.Column("loss_term", sa.Float, nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("applied_step", sa.BigInteger, nullable=True),
        sa.Column("applied_at", sa.Float, nullable=True),
    )
    op.create_index("ix_decisions_run_step", "decisions", ["run_id", "step"])


def downgrade() -> None:
    op.drop_index("ix_decisions_run_step", table_name="decisions")
    op.drop_table("decisions")
    op.drop_table("metric_points")
    op.drop_table("runs")
