"""What the store's modules share: its errors, the records it returns, and value codecs."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

from moxco.decision import Decision


class StoreError(ValueError):
    """Bad input to the store (unknown run, bad name, bad status): the message says what."""


class NotFoundError(StoreError):
    """No such run or decision."""


class ConflictError(StoreError):
    """The request contradicts what is stored (e.g. two different operator actions at one step)."""


@dataclass(frozen=True)
class RunInfo:
    """One run as stored: its registration (config, optimizer, policy), status, timestamps (server
    clock), last step, the user's ``tags`` and ``note``; ``metrics`` (names, any rank) and
    ``phase`` (the latest run-level ``phase`` point) when read with ``Store.run``."""

    name: str
    status: str
    config: Dict[str, Any]
    created_at: float
    updated_at: float
    last_step: Optional[int]
    optimizer: Optional[Dict[str, Any]] = None
    policy: Optional[Dict[str, Any]] = None
    last_ingest_at: Optional[float] = None
    metrics: Optional[List[str]] = None
    phase: Optional[int] = None
    tags: List[str] = field(default_factory=list)
    note: Optional[str] = None

    def to_json(self) -> Dict[str, Any]:
        """The run as the API returns it (``metrics`` and ``phase`` only when they were read)."""
        out = {"name": self.name, "status": self.status, "config": self.config, "optimizer": self.optimizer,
               "policy": self.policy, "created_at": self.created_at, "updated_at": self.updated_at,
               "last_step": self.last_step, "last_ingest_at": self.last_ingest_at, "tags": list(self.tags),
               "note": self.note}
        if self.metrics is not None:
            out["metrics"] = self.metrics
            out["phase"] = self.phase
        return out


@dataclass
class IngestResult:
    """What one ``Store.ingest`` did: points newly ``stored`` (for a ``duplicate`` batch id, what the
    first copy stored), every decision of the run still ``pending`` (not acknowledged), the
    decisions the run's policy took on this batch (``new``), and acknowledged ids the run has no
    decision for (``unknown_acks``: ignored, so the batch's points are not lost)."""

    stored: int
    duplicate: bool
    pending: List[Decision] = field(default_factory=list)
    new: List[Decision] = field(default_factory=list)
    unknown_acks: List[str] = field(default_factory=list)


def to_db(value: float) -> Optional[float]:
    """A float for a nullable SQL column: NaN as NULL (SQLite has no NaN)."""
    value = float(value)
    return None if math.isnan(value) else value


def from_db(value: Optional[float]) -> float:
    return math.nan if value is None else float(value)


def json_value(value: Any) -> Any:
    """A JSON column read through the driver: SQLite gives its text, psycopg may have parsed it."""
    if isinstance(value, (str, bytes)):
        return json.loads(value)  # the stdlib: a bare `pip install moxco` (embedded agent) has no orjson
    return value


def run_info(row: Mapping[str, Any], *, metrics: Optional[List[str]] = None, phase: Optional[int] = None) -> RunInfo:
    """A ``runs`` row as a ``RunInfo``."""
    return RunInfo(row["name"], row["status"], dict(row["config"]), row["created_at"], row["updated_at"],
                   row["last_step"], row["optimizer"], row["policy"], row["last_ingest_at"], metrics, phase,
                   list(json_value(row["tags"]) or []), row["note"])
