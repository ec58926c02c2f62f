"""Block summaries of every series (``series_blocks``); no per-row foreign-key check on points.

* ``series_blocks (run_id, metric, rank, block)``: per block of ``BLOCK_STEPS`` (1,024) steps of a
  series, its count, first/last point, first minimum and maximum (NaN skipped), first NaN, so
  ``minmax`` downsampling of a 1 M-point series reads ~1,000 rows. Back-filled here from
  ``metric_points``, one series at a time.
* PostgreSQL: ``metric_points`` loses its foreign key to ``runs``: the per-row RI trigger took
  ~40 % of an ingest transaction's server time, and every point is written under the run's row
  lock (the run exists) and runs are never deleted. SQLite keeps it (its check is an in-process
  index probe; dropping it would copy the whole table).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

import math

import numpy as np
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

BLOCK_STEPS = 1024
FIELDS = ("count", "first_step", "first_value", "first_wall", "last_step", "last_value", "last_wall",
          "min_step", "min_value", "min_wall", "max_step", "max_value", "max_wall", "nan_step", "nan_wall")


def upgrade() -> None:
    table = op.create_table(
        "series_blocks",
        sa.Column("run_id", sa.Integer, primary_key=True),
        sa.Column("metric", sa.String(100), primary_key=True),
        sa.Column("rank", sa.Integer, primary_key=True),
        sa.Column("block", sa.BigInteger, primary_key=True),
        sa.Column("count", sa.Integer, nullable=False),
        sa.Column("first_step", sa.BigInteger, nullable=False),
        sa.Column("first_value", sa.Float, nullable=True),
        sa.Column("first_wall", sa.Float, nullable=False),
        sa.Column("last_step", sa.BigInteger, nullable=False),
        sa.Column("last_value", sa.Float, nullable=True),
        sa.Column("last_wall", sa.Float, nullable=False),
        sa.Column("min_step", sa.BigInteger, nullable=True),
        sa.Column("min_value", sa.Float, nullable=True),
        sa.Column("min_wall", sa.Float, nullable=True),
        sa.Column("max_step", sa.BigInteger, nullable=True),
        sa.Column("max_value", sa.Float, nullable=True),
        sa.Column("max_wall", sa.Float, nullable=True),
        sa.Column("nan_step", sa.BigInteger, nullable=True),
        sa.Column("nan_wall", sa.Float, nullable=True),
    )
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        for fk in sa.inspect(bind).get_foreign_keys("metric_points"):
            if fk.get("name"):
                op.drop_constraint(fk["name"], "metric_points", type_="foreignkey")
    _backfill(bind, table)


def _backfill(bind, table) -> None:
    from moxco.collector.downsample import block_summaries

    keys = bind.execute(sa.text("SELECT DISTINCT run_id, metric, rank FROM metric_points")).all()
    for run_id, metric, rank in keys:
        rows = bind.execute(sa.text("SELECT step, value, wall_time FROM metric_points WHERE run_id = :r AND "
                                    "metric = :m AND rank = :k ORDER BY step"),
                            {"r": run_id, "m": metric, "k": rank}).all()
        steps = np.array([row[0] for row in rows], dtype=np.int64)
        values = np.array([math.nan if row[1] is None else row[1] for row in rows], dtype=np.float64)
        walls = np.array([row[2] for row in rows], dtype=np.float64)
        summary = block_summaries(steps, values, walls, BLOCK_STEPS)
        out = []
        for k in range(summary["block"].size):
            row = {"run_id": run_id, "metric": metric, "rank": rank, "block": int(summary["block"][k])}
            for f in FIELDS:
                x = summary[f][k].item()
                if f.startswith(("min_", "max_")) and math.isnan(summary[f"{f[:3]}_value"][k]):
                    x = None
                elif f.startswith("nan_") and not summary["has_nan"][k]:
                    x = None
                elif isinstance(x, float) and math.isnan(x):
                    x = None
                row[f] = x
            out.append(row)
        if out:
            op.bulk_insert(table, out)


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        op.create_foreign_key("metric_points_run_id_fkey", "metric_points", "runs", ["run_id"], ["id"],
                              ondelete="CASCADE")
    op.drop_table("series_blocks")
