"""The request bodies: one pydantic model each, the source of both their OpenAPI schema and their
validation (``parse``).

Bodies are read by the app itself (``deps.read_json``: streamed with a size check, parsed with
orjson), then validated here, strictly (no string-to-number coercion; unknown fields refused). A
batch's ``points`` are validated by the fast column-wise parser ``moxco.wire.parse_points``, not by
pydantic; an action by ``moxco.decision.validate_action``, through the ``Decision`` type. Their
JSON schemas here describe those checks for clients.
"""

from __future__ import annotations

from typing import Any, ClassVar, Dict, List, Literal, Optional, Type, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema
from typing_extensions import Annotated

from moxco.collector.api.errors import invalid, wire_error
from moxco.collector.schema import RUN_STATUSES
from moxco.collector.store.runs import MAX_TAG, MAX_TAGS
from moxco.decision import MAX_LR
from moxco.wire import (MAX_BATCH_ID, MAX_METRIC_NAME, MAX_RUN_NAME, MAX_SESSION, MAX_STEP, MAX_TEXT, WireError,
                        check_document)


Step = Annotated[int, Field(ge=0, le=MAX_STEP)]
Text = Annotated[str, Field(max_length=MAX_TEXT)]
Session = Annotated[str, Field(min_length=1, max_length=MAX_SESSION,
                               description="the writer session (docs/api.md, One writer per run)")]

POINT_SCHEMA = {
    "type": "array", "minItems": 4, "maxItems": 5,
    "description": "[metric, step, value, wall_time] or [metric, step, value, wall_time, rank]; value: a number, "
                   '"NaN", "Infinity", "-Infinity" or null; rank -1 (run level, the default) or ≥ 0',
    "prefixItems": [{"type": "string", "minLength": 1, "maxLength": MAX_METRIC_NAME},
                    {"type": "integer", "minimum": 0, "maximum": MAX_STEP},
                    {"anyOf": [{"type": "number"}, {"type": "string", "enum": ["NaN", "Infinity", "-Infinity"]},
                               {"type": "null"}]},
                    {"type": "number"},
                    {"type": "integer", "minimum": -1, "maximum": 2**31 - 1}]}
ACTION_SCHEMA = {
    "type": "object", "additionalProperties": False,
    "description": "moxco.decision.validate_action: phase 1 or 2 (default 2), alpha and beta in [0, 1), "
                   "lr in (0, 10] (moxco.decision.MAX_LR)",
    "properties": {"phase": {"type": "integer", "enum": [1, 2]},
                   "alpha": {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
                   "beta": {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
                   "lr": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_LR}}}


class Body(BaseModel):
    """A request body: strict types, no unknown fields. ``what`` names it in error messages."""

    model_config = ConfigDict(strict=True, extra="forbid")
    what: ClassVar[str] = "the body"


class RunBody(Body):
    """``PUT``/``PATCH /runs/{run}``: the registration and the user's labels (fields left out stay
    as stored)."""

    what: ClassVar[str] = "a run"
    config: Optional[Dict[str, Any]] = Field(None, description="merged into the stored config")
    optimizer: Optional[Dict[str, Any]] = Field(None, description="replaces the stored one")
    policy: Optional[Dict[str, Any]] = Field(None, description="moxco.policy.PolicyConfig.to_dict(); "
                                                               "null: no policy decisions")
    status: Optional[Literal[RUN_STATUSES]] = None  # type: ignore[valid-type]
    session: Optional[Session] = None
    policy_state: Optional[Dict[str, Any]] = Field(
        None, description="an agent's checkpointed DecisionPolicy.state_dict(): stored only when it has seen a later "
                          "probe than the stored state")
    tags: Optional[List[Annotated[str, Field(min_length=1, max_length=MAX_TAG)]]] = Field(
        None, max_length=MAX_TAGS, description="the user's labels (replace the stored ones; null: none)")
    note: Optional[Text] = Field(None, description="the user's note on the run (replaces the stored one; null: none)")


class PolicyBody(Body):
    """``PUT /runs/{run}/policy``: set or clear (``null``) the run's decision policy."""

    what: ClassVar[str] = "a policy change"
    policy: Optional[Dict[str, Any]] = Field(..., description="moxco.policy.PolicyConfig.to_dict(); "
                                                              "null: no policy decisions")


class OpenRunBody(Body):
    """``POST /runs``: an agent opens a run for writing (``Store.open_run``)."""

    what: ClassVar[str] = "a run to open"
    name: Annotated[str, Field(min_length=1, max_length=MAX_RUN_NAME)]
    resume: Union[bool, Literal["must"]] = Field(
        False, description="false: a new run (a taken name gets a suffix, name-2, …); true: continue the run of "
                           "that name, or start it; \"must\": continue it, 404 when there is none")
    session: Optional[Session] = Field(None, description="the writer's session id (the prefix of its batch ids)")
    config: Optional[Dict[str, Any]] = Field(None, description="merged into the stored config")
    optimizer: Optional[Dict[str, Any]] = Field(None, description="replaces the stored one")
    policy: Optional[Dict[str, Any]] = Field(None, description="moxco.policy.PolicyConfig.to_dict(); "
                                                               "null: no policy decisions")


class Ack(Body):
    """An acknowledgement: the agent applied the decision at ``applied_step`` (or refused it there:
    ``rejected`` says why)."""

    what: ClassVar[str] = "an acknowledgement"
    decision_id: str
    applied_step: Step
    rejected: Optional[Text] = None


class BatchBody(Body):
    """``POST /runs/{run}/batches``: points, with acknowledgements riding along."""

    what: ClassVar[str] = "a batch"
    batch_id: Annotated[str, Field(min_length=1, max_length=MAX_BATCH_ID)]
    points: Annotated[Any, WithJsonSchema({"type": "array", "items": POINT_SCHEMA})]  # wire.parse_points
    acks: Optional[List[Ack]] = None
    session: Optional[Session] = None


class AckBody(Body):
    """``POST /runs/{run}/decisions/{id}/ack``."""

    what: ClassVar[str] = "an acknowledgement"
    applied_step: Step
    rejected: Optional[Text] = None


class DecisionBody(Body):
    """``POST /runs/{run}/decisions``: an operator decision (``step`` defaults to the run's last step)."""

    what: ClassVar[str] = "an operator decision"
    action: Annotated[Dict[str, Any], WithJsonSchema(ACTION_SCHEMA)]  # validated by the Decision type
    step: Optional[Step] = None
    reason: Optional[Text] = None


M = TypeVar("M", bound=Body)


def _where(loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def check_depth(value: Any, what: str) -> Any:
    """422 when ``value`` breaks ``moxco.wire.check_document`` (nested deeper than 32 levels: it
    could be stored but not written back as JSON by any response; a NUL or lone surrogate in a key
    or string: PostgreSQL refuses it, SQLite would keep it)."""
    try:
        return check_document(value, what)
    except WireError as exc:
        raise wire_error(exc) from None


def parse(model: Type[M], data: Any) -> M:
    """``data`` (parsed JSON) validated as ``model``; 422 ``invalid_body`` naming the first bad field."""
    if not isinstance(data, dict):
        raise invalid(f"{model.what} must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        details = [{"loc": list(e["loc"]), "message": e["msg"]} for e in errors]
        extra = sorted(str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden" and len(e["loc"]) == 1)
        if extra:
            fields = ", ".join(model.model_fields)
            raise invalid(f"unknown fields {extra}; {model.what} has {fields}", details) from None
        first = errors[0]
        raise invalid(f"{_where(first['loc'])}: {first['msg']}", details) from None


def openapi_body(model: Type[Body]) -> Dict[str, Any]:
    """``model`` as an operation's required JSON request body (``$defs`` inlined)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            if set(node) == {"$ref"} and node["$ref"].startswith("#/$defs/"):
                return inline(defs[node["$ref"].rsplit("/", 1)[1]])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}
