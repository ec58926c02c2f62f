"""A row of the route table: what the app serves at a path, and the scope it needs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple, Type

SCOPES = ("public", "ingest", "read", "decide", "admin")


@dataclass(frozen=True)
class Route:
    """One route: ``methods`` on ``path`` answered by ``endpoint``, needing a token with ``scope``
    (``public``: none). ``body``: the request body's model (its OpenAPI schema and its validation);
    ``responses``: statuses besides 200 and the errors; ``errors``: whether the error statuses are
    documented; ``guarded_scope``: the scope the route needs when the app is asked to guard it
    (``/metrics`` with ``metrics_auth``); ``in_schema``: listed in the OpenAPI document."""

    methods: Tuple[str, ...]
    path: str
    endpoint: Callable[..., Any]
    scope: str
    body: Optional[Type[Any]] = None
    responses: Dict[int, Dict[str, Any]] = field(default_factory=dict)
    errors: bool = True
    guarded_scope: Optional[str] = None
    in_schema: bool = True

    def __post_init__(self) -> None:
        if self.scope not in SCOPES or (self.guarded_scope is not None and self.guarded_scope not in SCOPES):
            raise ValueError(f"{self.path}: scope must be one of {SCOPES}, got {self.scope!r}")


JSON_OBJECT = {"application/json": {"schema": {"type": "object"}}}
