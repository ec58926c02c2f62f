"""Runs: open for writing (``POST``, with run identity), register (``PUT``), update (``PATCH``), list and read."""

from __future__ import annotations

from typing import Any, Dict, Optional

from fastapi import Depends, Query, Request

from moxco.collector.api.deps import get_store, read_json, run_name, store_call
from moxco.collector.api.errors import json_response
from moxco.collector.api.routes.base import JSON_OBJECT, Route
from moxco.collector.api.schemas import OpenRunBody, RunBody, check_depth, parse
from moxco.collector.schema import RUN_STATUSES
from moxco.collector.store import Store
from moxco.wire import MAX_STEP


def _fields(body: RunBody) -> Dict[str, Any]:
    """The ``put_run`` keywords of a body: fields left out stay as stored (``optimizer``/``policy``
    null clear them; ``config``/``status`` null change nothing)."""
    given = body.model_fields_set
    fields: Dict[str, Any] = {}
    if body.config is not None:
        fields["config"] = body.config
    for key in ("optimizer", "policy"):
        if key in given:
            fields[key] = getattr(body, key)
    if body.status is not None:
        fields["status"] = body.status
    if body.policy_state is not None:
        fields["policy_state"] = body.policy_state
    return fields


async def _put(request: Request, run: str, store: Store, create: bool):
    body = parse(RunBody, check_depth(await read_json(request), "the run"))
    info = await store_call(store.put_run, run, create=create, **_fields(body))
    return json_response(info.to_json())


async def put_run(request: Request, run: str = Depends(run_name), store: Store = Depends(get_store)):
    """Register a run, or update it (idempotent: the config is merged into the stored one)."""
    return await _put(request, run, store, create=True)


async def patch_run(request: Request, run: str = Depends(run_name), store: Store = Depends(get_store)):
    """Update a registered run (404 when there is none), e.g. ``{"status": "finished"}``."""
    return await _put(request, run, store, create=False)


async def open_run(request: Request, store: Store = Depends(get_store)):
    """Open a run for writing (an agent's registration): a new run (a taken name gets a suffix), or
    with ``resume`` the run of that name continues. 201 with the run when it was created, 200 when
    resumed; the answer says the name the run has (``name``), its ``id``, and ``requested``."""
    body = parse(OpenRunBody, check_depth(await read_json(request), "the run"))
    fields = {key: getattr(body, key) for key in ("config", "optimizer", "policy") if key in body.model_fields_set}
    opened = await store_call(store.open_run, await run_name(body.name), resume=body.resume, session=body.session,
                              **fields)
    return json_response(opened.to_json(), status=201 if opened.created else 200)


async def list_runs(name: Optional[str] = Query(None, max_length=400),
                    status: Optional[str] = Query(None, pattern="^(" + "|".join(RUN_STATUSES) + ")$"),
                    since: Optional[float] = None, until: Optional[float] = None,
                    limit: int = Query(100, ge=1, le=10_000), offset: int = Query(0, ge=0, le=MAX_STEP),
                    store: Store = Depends(get_store)):
    """Runs newest first, filtered by a name glob, status, and activity window."""
    total, page = await store_call(store.list_runs, name=name, status=status, since=since, until=until,
                                   limit=limit, offset=offset)
    return json_response({"runs": [r.to_json() for r in page], "total": total, "limit": limit, "offset": offset})


async def get_run(run: str = Depends(run_name), store: Store = Depends(get_store)):
    """One run: config, optimizer, policy, status, last step, phase, metric names."""
    return json_response((await store_call(store.run, run)).to_json())


ROUTES = (
    Route(("POST",), "/api/v1/runs", open_run, "ingest", body=OpenRunBody, responses={201: {"description": "run created", "content": JSON_OBJECT}}),
    Route(("PUT",), "/api/v1/runs/{run}", put_run, "ingest", body=RunBody),
    Route(("PATCH",), "/api/v1/runs/{run}", patch_run, "ingest", body=RunBody),
    Route(("GET",), "/api/v1/runs", list_runs, "read"),
    Route(("GET",), "/api/v1/runs/{run}", get_run, "read"),
)
