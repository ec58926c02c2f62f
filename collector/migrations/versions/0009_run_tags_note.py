"""Runs carry the user's own labels: ``runs.tags`` (a JSON list of strings) and ``runs.note`` (text).

Both are set through ``PATCH /api/v1/runs/{run}`` (or ``Store.put_run(tags=…, note=…)``) and shown
and searched in the runs list. Existing runs get no tags and no note (NULL: read as ``[]`` and
``None``).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-10
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("tags", sa.JSON, nullable=True))
        batch.add_column(sa.Column("note", sa.String(1000), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("note")
        batch.drop_column("tags")
