"""``POST /api/v1/runs/{run}/batches``: the ingest path.

The body is streamed with a size check (413 past ``max_body``), parsed with orjson, its envelope
validated by ``schemas.BatchBody`` and its points column-wise by ``moxco.wire.parse_points`` (no
per-point objects; a bad point is a 422 naming its index and field), and stored in one
transaction (``Store.ingest``), committed before the answer: an acknowledged batch is durable.
The answer carries every decision of the run not yet acknowledged.
"""

from __future__ import annotations

from fastapi import Depends, Request
from starlette.requests import ClientDisconnect

from moxco.collector.api.deps import get_store, limited_to_own_runs, principal, read_json, run_name, services, store_call
from moxco.collector.api.errors import json_response
from moxco.collector.api.routes.base import Route
from moxco.collector.api.schemas import BatchBody, parse
from moxco.collector.auth import Principal
from moxco.collector.store import Store
from moxco.wire import check_batch_id, parse_points


async def ingest(request: Request, run: str = Depends(run_name), store: Store = Depends(get_store),
                 caller: Principal = Depends(principal)):
    """Store a batch of points (a retried ``batch_id`` stores nothing: ``duplicate``) with the
    acknowledgements riding in it; answer the run's pending decisions. Only the token that
    registered the run (or an admin) may; a batch with a ``session`` is refused (409) while
    another live session holds the run."""
    health = services(request).exposition.health
    try:
        body = parse(BatchBody, await read_json(request, limit=None))
        check_batch_id(body.batch_id)
        columns = parse_points(body.points)
        acks = [(a.decision_id, a.applied_step, a.rejected) for a in body.acks or ()]
        result = await store_call(store.ingest, run, columns, batch_id=body.batch_id, acks=acks,
                                  token_id=limited_to_own_runs(caller), session=body.session)
    except ClientDisconnect:
        raise  # the sender went away: not a batch the collector refused (errors_total{kind="client_disconnected"})
    except Exception:
        health.batches.labels("rejected").inc()
        raise
    if result.duplicate:
        health.batches.labels("duplicate").inc()
    else:
        health.batches.labels("stored").inc()
        health.points.inc(result.stored)
    return json_response({"batch_id": body.batch_id, "stored": result.stored, "duplicate": result.duplicate,
                          "decisions": [d.to_json() for d in result.pending],
                          "unknown_acks": result.unknown_acks})


ROUTES = (
    Route(("POST",), "/api/v1/runs/{run}/batches", ingest, "ingest", body=BatchBody),
)
