"""Runs: open for writing (``POST``, with run identity), register (``PUT``), update (``PATCH``),
change the policy (``PUT …/policy``), tag and annotate (``PATCH``: tags, note), list and read,
delete.

An ``ingest`` token writes only to the runs it registered (``deps.limited_to_own_runs``; the store
checks it under the run's lock), and is answered a run's summary, not its config: reading a
config takes ``read``. Setting the policy of a run one did not register is the ``decide`` route's.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

from fastapi import Depends, Query, Request
from pydantic import Field
from typing_extensions import Annotated

from moxco.collector.api.deps import get_store, limited_to_own_runs, principal, read_json, run_name, store_call
from moxco.collector.api.errors import ApiError, json_response
from moxco.collector.api.routes.base import JSON_OBJECT, Route
from moxco.collector.api.schemas import OpenRunBody, PolicyBody, RunBody, check_depth, parse
from moxco.collector.auth import Principal
from moxco.collector.schema import RUN_STATUSES
from moxco.collector.store import Store, StoreError
from moxco.collector.store.runs import MAX_TAG, config_filter
from moxco.wire import MAX_PATTERN, MAX_STEP

MAX_PAGE = 1000  # runs per page of the run list


CONFIG_FILTER_HELP = ("KEY=VALUE: runs whose config holds VALUE at the dotted path KEY (e.g. optimizer=SGD, "
                      "hyperparameters.lr=0.1, policy.threshold=0.85); VALUE is read as JSON when it is a number, "
                      "true or false, else as text")
MAX_FILTERS, MAX_CONFIG_FILTER = 16, 100  # tag and config filters per query; characters per config filter


def _fields(body: RunBody) -> Dict[str, Any]:
    """The ``put_run`` keywords of a body: fields left out stay as stored (``optimizer``/``policy``/
    ``tags``/``note`` null clear them; ``config``/``status`` null change nothing)."""
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
    for key in ("tags", "note"):
        if key in given:
            fields[key] = getattr(body, key)
    return fields


async def _put(request: Request, run: str, store: Store, caller: Principal, create: bool):
    body = parse(RunBody, check_depth(await read_json(request), "the run"))
    info = await store_call(store.put_run, run, create=create, token_id=limited_to_own_runs(caller),
                            session=body.session, **_fields(body))
    return json_response(info.summary().to_json())


async def put_run(request: Request, run: str = Depends(run_name), store: Store = Depends(get_store),
                  caller: Principal = Depends(principal)):
    """Register a run, or update one this token registered (idempotent: the config is merged into
    the stored one). Answers the run's summary."""
    return await _put(request, run, store, caller, create=True)


async def patch_run(request: Request, run: str = Depends(run_name), store: Store = Depends(get_store),
                    caller: Principal = Depends(principal)):
    """Update a registered run (404 when there is none), e.g. ``{"status": "finished"}``."""
    return await _put(request, run, store, caller, create=False)


async def put_policy(request: Request, run: str = Depends(run_name), store: Store = Depends(get_store)):
    """Set (or clear: ``null``) the decision policy of any run: an operator's act (``decide``)."""
    body = parse(PolicyBody, check_depth(await read_json(request), "the policy"))
    info = await store_call(store.put_run, run, create=False, policy=body.policy)
    return json_response(info.summary().to_json())


async def open_run(request: Request, store: Store = Depends(get_store), caller: Principal = Depends(principal)):
    """Open a run for writing (an agent's registration): a new run (a taken name gets a suffix), or
    with ``resume`` the run of that name continues. 201 with the run when it was created, 200 when
    resumed; the answer is the run's summary with the name the run has (``name``), its ``id``,
    and ``requested``. An ``ingest`` token resumes only a run it registered."""
    body = parse(OpenRunBody, check_depth(await read_json(request), "the run"))
    fields = {key: getattr(body, key) for key in ("config", "optimizer", "policy") if key in body.model_fields_set}
    opened = await store_call(store.open_run, await run_name(body.name), resume=body.resume, session=body.session,
                              token_id=limited_to_own_runs(caller), **fields)
    return json_response(opened.to_json(), status=201 if opened.created else 200)


async def list_runs(name: Optional[str] = Query(None, max_length=MAX_PATTERN),
                    status: Optional[str] = Query(None, pattern="^(" + "|".join(RUN_STATUSES) + ")$"),
                    since: Optional[float] = None, until: Optional[float] = None,
                    limit: int = Query(100, ge=1, le=MAX_PAGE), offset: int = Query(0, ge=0, le=MAX_STEP),
                    tag: List[Annotated[str, Field(max_length=MAX_TAG)]] = Query(
                        [], max_length=MAX_FILTERS, description="runs with every one of these tags"),
                    config: List[Annotated[str, Field(max_length=MAX_CONFIG_FILTER)]] = Query(
                        [], max_length=MAX_FILTERS, description=CONFIG_FILTER_HELP),
                    store: Store = Depends(get_store)):
    """Runs newest first, filtered by a name glob, status, activity window, tags and config values:
    summaries (name, status, timestamps, last step, policy, key hyper-parameters, tags, note), never
    configs."""
    filters = [config_filter_param(text) for text in config]
    total, page = await store_call(store.list_runs, name=name, status=status, since=since, until=until,
                                   limit=limit, offset=offset, tags=tag, config=filters)
    return json_response({"runs": [r.to_json() for r in page], "total": total, "limit": limit, "offset": offset})


async def get_run(run: str = Depends(run_name), store: Store = Depends(get_store)):
    """One run: config, optimizer, policy, status, last step, phase, metric names."""
    return json_response((await store_call(store.run, run)).to_json())


async def delete_run(run: str = Depends(run_name), store: Store = Depends(get_store)):
    """Delete a run and everything stored for it (points, summaries, decisions); answers what was
    deleted. Irreversible: an ``admin`` token only."""
    deleted = await store_call(store.delete_run, run)
    return json_response({"run": run, "deleted": deleted})




def config_filter_param(text: str) -> Tuple[str, Any]:
    """``KEY=VALUE`` of the ``config`` parameter as ``(key, value)``: a number, ``true``/``false``,
    else the text; 422 when there is no ``=``."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ApiError(422, "invalid_parameter", f"config: expected KEY=VALUE (e.g. hyperparameters.lr=0.1), got {text!r}")
    value: Any = raw
    if raw in ("true", "false"):
        value = raw == "true"
    else:
        try:
            number = float(raw)
        except ValueError:
            number = None
        if number is not None and math.isfinite(number):
            value = int(raw) if raw.lstrip("+-").isdigit() else number
    try:
        config_filter(key, value)
    except StoreError as exc:
        raise ApiError(422, "invalid_parameter", f"config: {exc}") from None
    return key, value


ROUTES = (
    Route(("POST",), "/api/v1/runs", open_run, "ingest", body=OpenRunBody, responses={201: {"description": "run created", "content": JSON_OBJECT}}),
    Route(("PUT",), "/api/v1/runs/{run}", put_run, "ingest", body=RunBody),
    Route(("PATCH",), "/api/v1/runs/{run}", patch_run, "ingest", body=RunBody),
    Route(("PUT",), "/api/v1/runs/{run}/policy", put_policy, "decide", body=PolicyBody),
    Route(("DELETE",), "/api/v1/runs/{run}", delete_run, "admin"),
    Route(("GET",), "/api/v1/runs", list_runs, "read"),
    Route(("GET",), "/api/v1/runs/{run}", get_run, "read"),
)
