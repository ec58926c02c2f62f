"""What the store's modules share: its errors, the records it returns, and value codecs."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from moxco.decision import Decision


class StoreError(ValueError):
    """Bad input to the store (unknown run, bad name, bad status): the message says what."""


class NotFoundError(StoreError):
    """No such run or decision."""


class ConflictError(StoreError):
    """The request contradicts what is stored (e.g. two different operator actions at one step)."""


class BusyError(ConflictError):
    """Another live writer session holds the run (docs/api.md, One writer per run)."""


class ForbiddenError(StoreError):
    """The calling token may not write this run: a token limited to the runs it registered (an
    ``ingest`` token) met a run registered by another token, or by none."""


def check_owner(name: str, owner: Optional[int], token_id: Optional[int]) -> None:
    """``ForbiddenError`` unless ``token_id`` is None (an unrestricted caller) or registered run
    ``name`` (its ``owner``)."""
    if token_id is not None and owner != token_id:
        raise ForbiddenError(f"run {name!r} was registered by another token: this token writes only to the runs "
                             "it registered (an admin token writes to any)")


class TooLargeError(StoreError):
    """A document over its size limit (a run's config or optimizer: ``moxco.wire.MAX_CONFIG_BYTES``)."""


class StoreLostError(RuntimeError):
    """The store's SQLite file was deleted or replaced while the store had it open: what was
    written to it since it was opened is gone with it, and later writes would go to a file no one
    can read. The message names the file; open the store again to go on in a fresh file."""


@dataclass(frozen=True)
class RunInfo:
    """One run as stored: its registration (config, optimizer, policy), status, timestamps (server
    clock), last step, the user's ``tags`` and ``note``; ``metrics`` (names, any rank) and
    ``phase`` (the latest run-level ``phase`` point) when read with ``Store.run``. ``id``: the run's
    stable id (a UUID string), which never changes and is never reused, where the name may be reused
    by a resumed run."""

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
    id: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    note: Optional[str] = None

    def summary(self) -> "RunSummary":
        """The run as the run list shows it (no config, optimizer or metric list)."""
        optimizer = self.optimizer if isinstance(self.optimizer, Mapping) else {}
        return RunSummary(self.name, self.status, self.created_at, self.updated_at, self.last_step,
                          self.last_ingest_at, self.policy,
                          {k: optimizer[k] for k in SUMMARY_HYPERPARAMETERS if optimizer.get(k) is not None},
                          list(self.tags), self.note)

    def to_json(self) -> Dict[str, Any]:
        """The run as the API returns it (``metrics`` and ``phase`` only when they were read)."""
        out = {"name": self.name, "id": self.id, "status": self.status, "config": self.config, "optimizer": self.optimizer,
               "policy": self.policy, "created_at": self.created_at, "updated_at": self.updated_at,
               "last_step": self.last_step, "last_ingest_at": self.last_ingest_at, "tags": list(self.tags),
               "note": self.note}
        if self.metrics is not None:
            out["metrics"] = self.metrics
            out["phase"] = self.phase
        return out


    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "RunInfo":
        """A run from the API's JSON (``to_json``)."""
        return cls(data["name"], data["status"], dict(data.get("config") or {}), data.get("created_at"),
                   data.get("updated_at"), data.get("last_step"), data.get("optimizer"), data.get("policy"),
                   data.get("last_ingest_at"), data.get("metrics"), data.get("phase"), data.get("id"),
                   list(data.get("tags") or []), data.get("note"))


@dataclass(frozen=True)
class OpenedRun:
    """What ``Store.open_run`` did: the ``run`` opened for writing, whether it was ``created`` (else
    resumed), and the name that was ``requested`` (``run.name`` differs when that name was taken and
    a new run was asked for). A resumed run comes with what its series say for an agent that
    continues it without a checkpoint: ``latest`` (the newest ``(step, value)`` of each run-level
    series) and ``counts`` (points per run-level series)."""

    run: RunInfo
    created: bool
    requested: str
    latest: Optional[Dict[str, Tuple[int, float]]] = None
    counts: Optional[Dict[str, int]] = None

    @property
    def renamed(self) -> bool:
        return self.run.name != self.requested

    def to_json(self) -> Dict[str, Any]:
        from moxco.wire import encode_value

        # the run's summary (what a writer is answered: no config), its id and phase, what was done
        out = {**self.run.summary().to_json(), "id": self.run.id, "phase": self.run.phase, "created": self.created,
               "resumed": not self.created, "requested": self.requested}
        if self.latest is not None:
            out["latest"] = {m: [s, encode_value(v)] for m, (s, v) in self.latest.items()}
            out["counts"] = dict(self.counts or {})
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "OpenedRun":
        from moxco.wire import decode_value

        latest = data.get("latest")
        return cls(RunInfo.from_json(data), bool(data["created"]), data.get("requested") or data["name"],
                   None if latest is None else {m: (int(s), decode_value(v)) for m, (s, v) in latest.items()},
                   None if latest is None else {m: int(n) for m, n in (data.get("counts") or {}).items()})


@dataclass(frozen=True)
class RunSummary:
    """One run as the run list answers it: no config or metric list (their size is the user's),
    only what a list shows: name, status, timestamps, last step, the policy (a ``PolicyConfig``
    dict: small and validated) and a few hyper-parameters read from the optimizer
    (``SUMMARY_HYPERPARAMETERS``: its class and step size, inertia, extrapolation)."""

    name: str
    status: str
    created_at: float
    updated_at: float
    last_step: Optional[int]
    last_ingest_at: Optional[float]
    policy: Optional[Dict[str, Any]]
    hyperparameters: Dict[str, Any]
    tags: List[str] = field(default_factory=list)
    note: Optional[str] = None

    def to_json(self) -> Dict[str, Any]:
        return {"name": self.name, "status": self.status, "created_at": self.created_at,
                "updated_at": self.updated_at, "last_step": self.last_step, "last_ingest_at": self.last_ingest_at,
                "policy": self.policy, "hyperparameters": self.hyperparameters, "tags": list(self.tags),
                "note": self.note}


SUMMARY_HYPERPARAMETERS = ("class", "lr", "alpha", "beta")


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
                   row["uid"], list(json_value(row["tags"]) or []), row["note"])
