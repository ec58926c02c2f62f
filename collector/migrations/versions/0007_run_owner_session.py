"""Runs know who may write them, and actions are bounded: ``runs.owner``, ``runs.session``, ``lr`` ≤ 10.

* ``owner``: the id of the token that registered the run; an ``ingest`` token writes only to the
  runs it registered. Runs that exist already have none (NULL): only ``admin`` tokens (or a
  collector without auth) write to them, until an admin registers them to a token
  (``UPDATE runs SET owner = <token id>``).
* ``session``: the writer session that holds the run (docs/api.md, One writer per run).

``moxco.decision.validate_action`` now bounds ``lr`` to (0, 10]: pending decisions it refuses are
marked rejected at their own step (as migration 0006 did for other invalid actions), and a run
policy whose action it refuses is cleared (the run takes no policy decisions; the reason is kept
in the run's ``config.errors.policy``).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-10
"""

import json
import time

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def _json(value):
    return json.loads(value) if isinstance(value, (str, bytes)) else value


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("owner", sa.Integer, nullable=True))
        batch.add_column(sa.Column("session", sa.String(100), nullable=True))

    from moxco.decision import DecisionError, validate_action
    from moxco.policy import PolicyConfig

    conn = op.get_bind()
    pending = conn.execute(sa.text("SELECT id, step, action FROM decisions WHERE applied_step IS NULL")).fetchall()
    for ident, step, action in pending:
        try:
            validate_action(_json(action))
        except DecisionError as exc:
            conn.execute(sa.text("UPDATE decisions SET applied_step = :step, applied_at = :now, rejected = :why "
                                 "WHERE id = :id"),
                         {"step": step, "now": time.time(), "id": ident,
                          "why": f"refused when the store was upgraded: {exc}"[:1000]})
    for ident, policy, config in conn.execute(sa.text("SELECT id, policy, config FROM runs "
                                                      "WHERE policy IS NOT NULL")).fetchall():
        policy = _json(policy)
        if policy is None:
            continue
        try:
            PolicyConfig.from_dict(policy)
        except (TypeError, ValueError) as exc:
            config = dict(_json(config) or {})
            config["errors"] = {**dict(config.get("errors") or {}),
                                "policy": f"policy cleared when the store was upgraded: {exc}"[:1000]}
            conn.execute(sa.text("UPDATE runs SET policy = NULL, config = :config WHERE id = :id"),
                         {"config": json.dumps(config), "id": ident})


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("session")
        batch.drop_column("owner")
