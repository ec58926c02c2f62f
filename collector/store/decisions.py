"""Decisions: stored as ``moxco.decision.Decision``, acknowledged once, taken by the run's policy.

A decision's id is ``<run>:<source>:<step>`` (``Decision.id``), so the same decision derived twice
(at-least-once delivery, several collector workers) is one row. Its cause is stored with it:
``source``, ``issued_by``, the goodness and its three terms and the policy's configuration that
fired a policy decision, an operator's ``reason``. The first acknowledgement wins: ``applied_step``
(and ``rejected``, the agent's reason, when it refused the decision).

The policy runs here, in the ingest transaction that holds the run's row lock: the run's
``PolicyConfig`` and ``DecisionPolicy`` state are read, ``moxco.policy.decide`` observes the batch's
goodness probes (``moxco.policy.goodness_probes``), and the new state and decisions are stored
together, so any number of collector workers, or an embedded agent, behave as one policy.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Any, List, Mapping, Optional, Sequence, Tuple

from sqlalchemy import select, update

from moxco.collector.schema import decisions as decisions_table
from moxco.collector.schema import runs
from moxco.collector.store.base import ConflictError, NotFoundError, StoreError, check_owner, json_value, to_db
from moxco.decision import Decision, DecisionError
from moxco.policy import decide, goodness_probes
from moxco.wire import WireError, check_text

FIELDS = ("id", "step", "source", "issued_by", "action", "goodness", "grad_term", "sharpness_term", "loss_term",
          "reason", "policy", "apply_at", "created_at", "applied_step", "applied_at", "rejected")
PENDING_SQL = (f"SELECT {', '.join(FIELDS)} FROM decisions WHERE run_id = ? AND applied_step IS NULL "
               "ORDER BY step, id")


def decision_from_row(row: Sequence[Any], run: str) -> Decision:
    """A ``decisions`` row (``FIELDS``, in order, read by SQLAlchemy or the driver) as a ``Decision``
    of ``run``. NULL goodness terms are NaN (not measured)."""
    (_ident, step, source, issued_by, action, goodness, grad, sharp, loss, reason, policy, apply_at, created,
     applied_step, applied_at, rejected) = row
    fields = dict(step=int(step), action=json_value(action), goodness=_nan(goodness), grad_term=_nan(grad),
                  sharpness_term=_nan(sharp), loss_term=_nan(loss), source=source, issued_by=issued_by or source,
                  reason=reason, policy=json_value(policy), run=run, apply_at=apply_at, created_at=created,
                  applied_step=applied_step, applied_at=applied_at, rejected=rejected)
    try:
        return Decision(**fields)
    except DecisionError:
        # stored before actions were validated (migration 0006 marked these rejected): read back as stored
        out = object.__new__(Decision)
        for key, value in fields.items():
            object.__setattr__(out, key, value)
        return out


def _nan(value: Optional[float]) -> float:
    return math.nan if value is None else float(value)


def _row(decision: Decision, run_id: int, run: str) -> dict:
    return {"id": decision.with_run(run).id, "run_id": run_id, "step": decision.step, "source": decision.source,
            "issued_by": decision.issued_by, "action": dict(decision.action), "goodness": to_db(decision.goodness),
            "grad_term": to_db(decision.grad_term), "sharpness_term": to_db(decision.sharpness_term),
            "loss_term": to_db(decision.loss_term), "reason": decision.reason,
            "policy": dict(decision.policy) if decision.policy is not None else None, "apply_at": decision.apply_at,
            "created_at": decision.created_at if decision.created_at is not None else time.time(),
            "applied_step": None, "applied_at": None, "rejected": None}


class Decisions:
    """Decision reads, acknowledgements, operator decisions and the policy step (a mixin of ``Store``)."""

    def decisions(self, name: str, *, pending_only: bool = False, token_id: Optional[int] = None) -> List[Decision]:
        """The decisions of run ``name`` ordered by step (only those not yet acknowledged with
        ``pending_only``). ``token_id``: only for the token that registered the run (the agent's
        poll; ``runs.check_writer``)."""
        with self.engine.connect() as conn:
            return self._decisions(conn, self._run_id(conn, name, token_id), name, pending_only=pending_only)

    def acknowledge(self, name: str, ident: str, applied_step: int, *, rejected: Optional[str] = None,
                    token_id: Optional[int] = None) -> Decision:
        """Record that the agent applied decision ``ident`` of run ``name`` at ``applied_step`` (or
        refused it there: ``rejected`` says why). The first acknowledgement wins; returns the
        decision as stored. ``NotFoundError`` when the run has no such decision; ``token_id``: only
        the token that registered the run may (``runs.check_writer``)."""
        if rejected is not None:
            try:
                check_text(rejected, "rejected")
            except WireError as exc:
                raise StoreError(str(exc)) from None
        with self._writer.begin() as conn:
            row = self._lock_run(conn, name)
            check_owner(name, row.owner, token_id)
            run_id = row.id
            if not self._ack(conn, run_id, ident, applied_step, rejected):
                raise NotFoundError(f"run {name!r} has no decision {ident!r}")
            return self._decisions(conn, run_id, name, ident=ident)[0]

    def add_decision(self, name: str, decision: Decision) -> Tuple[Decision, bool]:
        """Store ``decision`` for run ``name`` (an operator's, or one taken elsewhere). Returns
        ``(the decision as stored, created)``: the same step and action again is the same decision
        (``created`` False); a different action at a step that already has a decision of that
        source is a ``ConflictError``."""
        if decision.run is not None and decision.run != name:
            raise StoreError(f"the decision is for run {decision.run!r}, not {name!r}")
        try:
            for text, what in ((decision.reason, "reason"), (decision.issued_by, "issued_by")):
                if text is not None:
                    check_text(text, what)
        except WireError as exc:
            raise StoreError(str(exc)) from None
        with self._writer.begin() as conn:
            run_id = self._lock_run(conn, name).id
            ident = decision.with_run(name).id
            existing = self._decisions(conn, run_id, name, ident=ident)
            if existing:
                if dict(existing[0].action) != dict(decision.action):
                    raise ConflictError(f"run {name!r} already has a{'n' if decision.source == 'operator' else ''} "
                                        f"{decision.source} decision at step {decision.step} with action "
                                        f"{dict(existing[0].action)}")
                return existing[0], False
            conn.execute(self.sql.insert(decisions_table).on_conflict_do_nothing(), [_row(decision, run_id, name)])
            return self._decisions(conn, run_id, name, ident=ident)[0], True

    # --- inside a write transaction that holds the run's lock -----------------------------------------

    def _decisions(self, conn, run_id: int, name: str, *, pending_only: bool = False,
                   ident: Optional[str] = None) -> List[Decision]:
        d = decisions_table.c
        query = select(*(d[f] for f in FIELDS)).where(d.run_id == run_id)
        if pending_only:
            query = query.where(d.applied_step.is_(None))
        if ident is not None:
            query = query.where(d.id == ident)
        return [decision_from_row(tuple(row), name) for row in conn.execute(query.order_by(d.step, d.id))]

    def _ack(self, conn, run_id: int, ident: str, applied_step: int, rejected: Optional[str] = None) -> bool:
        """Record an acknowledgement (the first one wins); False when the run has no such decision.
        An id with characters no decision id has, or a rejection text the wire refuses, is not
        looked up (False: an ingest reports it in ``unknown_acks`` instead of failing the batch)."""
        try:
            check_text(ident, "decision_id")
            if rejected is not None:
                check_text(rejected, "rejected")
        except WireError:
            return False
        d = decisions_table.c
        result = conn.execute(update(decisions_table).where(d.id == ident, d.run_id == run_id, d.applied_step.is_(None))
                              .values(applied_step=int(applied_step), applied_at=time.time(), rejected=rejected))
        if result.rowcount:
            return True
        return conn.execute(select(d.id).where(d.id == ident, d.run_id == run_id)).first() is not None

    def _decide(self, conn, name: str, run_id: int, policy: Mapping[str, Any], state: Optional[Mapping[str, Any]],
                metrics_, steps, values, ranks) -> List[Decision]:
        """Feed the batch's goodness probes to the run's policy (state loaded from and saved to
        ``runs.policy_state``) and store what it decides; returns the new decisions."""
        probes = goodness_probes(metrics_, steps, values, ranks)
        if not probes:
            return []
        state, made = decide(policy, state, probes)
        now = time.time()
        made = [replace(d, run=name, created_at=now) for d in made]
        if made:
            conn.execute(self.sql.insert(decisions_table).on_conflict_do_nothing(),
                         [_row(d, run_id, name) for d in made])
        conn.execute(update(runs).where(runs.c.id == run_id).values(policy_state=state))
        return made
