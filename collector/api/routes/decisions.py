"""Decisions: the agent's poll and acknowledgement, operator decisions, the run's decision list.

Every decision is answered in its one JSON form, ``moxco.decision.Decision.to_json``.
"""

from __future__ import annotations

from fastapi import Depends, Request

from moxco.collector.api.deps import get_store, limited_to_own_runs, principal, read_json, run_name, store_call
from moxco.collector.api.errors import json_response
from moxco.collector.api.routes.base import JSON_OBJECT, Route
from moxco.collector.api.schemas import AckBody, DecisionBody, check_depth, parse
from moxco.collector.auth import Principal
from moxco.collector.store import Store
from moxco.decision import Decision


async def pending(run: str = Depends(run_name), store: Store = Depends(get_store),
                  caller: Principal = Depends(principal)):
    """The run's decisions not yet acknowledged (the agent polls this while it sends nothing);
    only for the token that registered the run (or an admin)."""
    rows = await store_call(store.decisions, run, pending_only=True, token_id=limited_to_own_runs(caller))
    return json_response({"decisions": [d.to_json() for d in rows]})


async def acknowledge(request: Request, decision_id: str, run: str = Depends(run_name),
                      store: Store = Depends(get_store), caller: Principal = Depends(principal)):
    """Record that the agent applied (or refused: ``rejected``) a decision; the first wins. Only
    the token that registered the run (or an admin) may."""
    body = parse(AckBody, await read_json(request))
    decision = await store_call(store.acknowledge, run, decision_id, body.applied_step, rejected=body.rejected,
                                token_id=limited_to_own_runs(caller))
    return json_response(decision.to_json())


async def operator_decision(request: Request, run: str = Depends(run_name), store: Store = Depends(get_store),
                            caller: Principal = Depends(principal)):
    """An operator decision at ``step`` (default: the run's last step): 201 when created, 200 when
    the same action is already there, 409 when another one is."""
    body = parse(DecisionBody, check_depth(await read_json(request), "the decision"))

    def work():
        step = body.step if body.step is not None else (store.run(run).last_step or 0)
        decision = Decision(step, body.action, source="operator", issued_by=caller.name, reason=body.reason)
        return store.add_decision(run, decision)

    decision, created = await store_call(work)
    return json_response(decision.to_json(), 201 if created else 200)


async def all_decisions(run: str = Depends(run_name), store: Store = Depends(get_store)):
    """Every decision of the run, with its cause and acknowledgement."""
    rows = await store_call(store.decisions, run)
    return json_response({"decisions": [d.to_json() for d in rows]})


ROUTES = (
    Route(("GET",), "/api/v1/runs/{run}/decisions/pending", pending, "ingest"),
    Route(("POST",), "/api/v1/runs/{run}/decisions/{decision_id}/ack", acknowledge, "ingest", body=AckBody),
    Route(("POST",), "/api/v1/runs/{run}/decisions", operator_decision, "decide", body=DecisionBody,
          responses={201: {"description": "decision created", "content": JSON_OBJECT}}),
    Route(("GET",), "/api/v1/runs/{run}/decisions", all_decisions, "read"),
)
