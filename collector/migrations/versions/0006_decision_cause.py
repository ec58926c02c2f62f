"""Decisions keep their cause and the agent's refusal: ``issued_by``, ``policy``, ``apply_at``, ``rejected``.

* ``issued_by``: who took the decision (``policy``, or the operator token's name); filled with
  ``source`` for existing rows.
* ``policy``: the ``PolicyConfig`` (JSON) in force when a policy decision fired.
* ``apply_at``: the step the decision must be applied at, when fixed (NULL: the next boundary).
* ``rejected``: why the agent refused the decision (NULL: applied, or still pending).

Decisions whose action ``moxco.decision.validate_action`` refuses (unknown keys, α or β outside
[0, 1), lr not finite and > 0: accepted before actions were validated) and that no agent has
acknowledged yet are marked rejected at their own step, so no agent is ever handed them.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

import json
import time

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("decisions") as batch:
        batch.add_column(sa.Column("issued_by", sa.String(200), nullable=True))
        batch.add_column(sa.Column("policy", sa.JSON, nullable=True))
        batch.add_column(sa.Column("apply_at", sa.BigInteger, nullable=True))
        batch.add_column(sa.Column("rejected", sa.String(1000), nullable=True))
    op.execute("UPDATE decisions SET issued_by = source")

    from moxco.decision import DecisionError, validate_action

    conn = op.get_bind()
    pending = conn.execute(sa.text("SELECT id, step, action FROM decisions WHERE applied_step IS NULL")).fetchall()
    for ident, step, action in pending:
        try:
            validate_action(json.loads(action) if isinstance(action, (str, bytes)) else action)
        except DecisionError as exc:
            conn.execute(sa.text("UPDATE decisions SET applied_step = :step, applied_at = :now, rejected = :why "
                                 "WHERE id = :id"),
                         {"step": step, "now": time.time(), "id": ident,
                          "why": f"refused when the store was upgraded: {exc}"[:1000]})


def downgrade() -> None:
    with op.batch_alter_table("decisions") as batch:
        batch.drop_column("rejected")
        batch.drop_column("apply_at")
        batch.drop_column("policy")
        batch.drop_column("issued_by")
