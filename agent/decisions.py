"""Decisions on the training thread: received from the policy, applied at a step boundary.

A decision comes from the writer thread (the embedded store's policy) or the HTTP sink's sender
thread (the collector's policy) and waits in ``DecisionInbox`` until the next optimizer step
post-hook, where it is applied: ``optimizer.commit(**action)`` (the ``moxco.optim`` optimizers),
else the user's ``on_decision(decision)`` callback. Delivery is at-least-once; application is
idempotent by decision id. Under DDP rank 0's policy decides, and the decision is broadcast at
probe steps (``share``) so that every rank applies it at the same boundary.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, List, Optional, Tuple

from moxco.agent.distributed import DataParallelGroup
from moxco.decision import Decision

log = logging.getLogger("moxco.agent")

Pending = Tuple[str, Decision]


class DecisionInbox:
    """Decisions waiting for a step boundary (see the module docstring)."""

    def __init__(self, group: DataParallelGroup) -> None:
        self.group = group
        self._incoming: List[Pending] = []  # from the writer or sender thread (rank 0)
        self._not_before: dict = {}  # decision id → the step boundary it waits for (a resumed run's replay)
        self._applied: set[str] = set()  # decision ids applied
        self._shared: Optional[Pending] = None  # under DDP: what every rank applies at the next boundary
        self._lock = threading.Lock()

    def receive(self, ident: str, decision: Decision, not_before: Optional[int] = None) -> None:
        """Queue a decision for the next step boundary, or the first at or after step ``not_before``
        (a redelivered or applied id is ignored)."""
        with self._lock:
            if ident not in self._applied and all(ident != queued for queued, _ in self._incoming):
                self._incoming.append((ident, decision))
                if not_before is not None:
                    self._not_before[ident] = int(not_before)

    def _take_incoming(self, step: Optional[int] = None) -> Optional[Pending]:
        with self._lock:
            for i, (ident, _) in enumerate(self._incoming):
                if step is None or step >= self._not_before.get(ident, step):
                    self._not_before.pop(ident, None)
                    return self._incoming.pop(i)
            return None

    def share(self) -> None:
        """Under DDP, at a probe step: rank 0's next decision, for every rank's next boundary."""
        self._shared = self.group.broadcast(self._take_incoming())

    def take(self, step: Optional[int] = None) -> Optional[Pending]:
        """The decision to apply at the boundary before ``step``, if any (never one applied before)."""
        if self.group.active:
            pending, self._shared = self._shared, None
        else:
            pending = self._take_incoming(step)
        if pending is None or pending[0] in self._applied:
            return None
        return pending

    def mark_applied(self, ident: str) -> None:
        self._applied.add(ident)

    def applied(self) -> List[str]:
        """The ids applied so far (an agent's checkpoint keeps them)."""
        return sorted(self._applied)

    def load_applied(self, idents) -> None:
        self._applied.update(idents)


def apply_decision(ident: str, decision: Decision, optimizer: Any,
                   on_decision: Optional[Callable[[Decision], Any]], run: str) -> bool:
    """Apply ``decision``: ``optimizer.commit(**action)`` without the phase, else ``on_decision``;
    False (and a warning) when there is neither, so it is recorded but not applied."""
    commit = getattr(optimizer, "commit", None)
    if callable(commit):
        commit(**{k: v for k, v in dict(decision.action).items() if k != "phase"})
    elif on_decision is not None:
        on_decision(decision)
    else:
        log.warning("moxco: decision %s for run %r has no optimizer.commit and no on_decision callback; "
                    "it is recorded but not applied", ident, run)
        return False
    return True
