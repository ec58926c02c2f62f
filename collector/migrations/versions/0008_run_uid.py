"""Runs get a stable id besides their name: ``runs.uid``, a UUID string, unique.

A run's name is what people type; its ``uid`` never changes and never repeats, so a resumed run
(the same name, registered again) and a new run that took a suffixed name (``name-2``) are told
apart by it. Existing runs get a fresh UUID each. The column is added in place and made unique by
an index (on SQLite, a constraint would rebuild ``runs``, whose drop would cascade to the tables
that reference it); the store always sets it.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-08
"""

import uuid

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("uid", sa.String(36), nullable=True))
    conn = op.get_bind()
    for (run_id,) in conn.execute(sa.text("SELECT id FROM runs WHERE uid IS NULL")).fetchall():
        conn.execute(sa.text("UPDATE runs SET uid = :uid WHERE id = :id"), {"uid": str(uuid.uuid4()), "id": run_id})
    op.create_index("uq_runs_uid", "runs", ["uid"], unique=True)


def downgrade() -> None:
    op.drop_index("uq_runs_uid", table_name="runs")
    op.drop_column("runs", "uid")  # in place (SQLite ≥ 3.35), for the same reason
