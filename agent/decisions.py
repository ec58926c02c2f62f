"""Decisions on the training thread: received from the policy, applied at a step boundary that the
run's configuration fixes.

A decision comes from the writer thread (the embedded store's policy) or the HTTP sink's sender
thread (the collector's policy) and waits in ``DecisionInbox`` until the optimizer step post-hook
of the boundary it is due at: its ``apply_at`` (a policy decision fired by the probe of step ``s``:
``s + 1 + lag``, ``moxco.policy.apply_at``), or the first boundary after it arrives when nothing
fixes one (an operator's). There ``apply_decision`` applies it: a phase-2 action through
``optimizer.commit(**action)``, a phase-1 action through ``optimizer.explore(**action)`` (the
``moxco.optim.MoXCo`` optimizer has both), else the user's ``on_decision(decision)``.

Modes (``attach(decisions=...)``):

* ``"sync"`` (the default in embedded mode): at the boundary a probe's decision would be due at,
  the training thread waits for the policy's answer to that probe (the writer scores a probe as
  soon as it arrives; the sink reports when the store has run the policy on it: ``answered``), at
  most ``decision_timeout`` seconds. A decision is so applied exactly at ``apply_at`` whatever the
  threads or the network do: one seed, one run. A wait that times out is counted, training goes on,
  and the decision, if one comes, is applied at the next boundary with its lateness counted (and
  stored: the acknowledgement's ``applied_step`` against ``apply_at``). After a timeout the agent
  does not wait again until an answer comes: a collector that is down costs one timeout, not one
  per probe.
* ``"async"`` (the default over HTTP): the training thread never waits; a decision is applied at
  ``apply_at`` when it has arrived by then, else at the first boundary after it arrives (late).

Delivery is at-least-once; application is idempotent by decision id. A decision that cannot be
applied (``commit`` raises, nothing can apply its phase) is rejected: acknowledged with the reason,
reported, and the next ones are applied as usual. Under DDP rank 0's policy decides: at each
boundary a probe's decision can be due at (fixed by the configuration, so every rank knows them)
rank 0 waits as above and broadcasts the decisions due, and every rank applies them there.

Everything a resumed job needs (decisions received and not yet applied, the ids applied, the
probes awaiting their boundary, the counts) is ``DecisionInbox.state_dict()``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

from moxco.agent.distributed import DataParallelGroup
from moxco.agent.failures import error_summary
from moxco.decision import Decision, DecisionError
from moxco.policy import DEFAULT_LAG, apply_at

log = logging.getLogger("moxco.agent")

Pending = Tuple[str, Decision]
MODES = ("sync", "async")
DEFAULT_TIMEOUT = 5.0  # seconds the training thread waits, at most, for the answer to one probe


@dataclass
class DecisionStats:
    """What the decision path did (``agent.inbox.stats``; stored with the run as ``config["decisions"]``).

    ``waits``: boundaries where the answer to a probe had not come yet, so the training thread
    waited (``waited_seconds`` in all, ``max_wait_seconds`` the longest); ``timeouts``: the waits
    that ended without it; ``skipped``: boundaries not waited at because an earlier wait timed
    out and no answer has come since; ``late``: decisions applied after their ``apply_at``
    (``max_lateness`` steps at most); ``rejected``: decisions refused."""

    mode: str = "sync"
    lag: int = DEFAULT_LAG
    timeout: float = DEFAULT_TIMEOUT
    waits: int = 0
    waited_seconds: float = 0.0
    max_wait_seconds: float = 0.0
    timeouts: int = 0
    skipped: int = 0
    late: int = 0
    max_lateness: int = 0
    rejected: int = 0

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Outcome:
    """One decision met at a boundary: applied (``rejected`` None) or refused, and why."""

    ident: str
    decision: Decision
    rejected: Optional[str] = None
    error: Optional[BaseException] = None


class DecisionInbox:
    """Decisions waiting for their step boundary, and the waits for the policy's answers (see the
    module docstring). ``receive`` and ``answered`` are called from the writer or sender thread,
    everything else from the training thread."""

    def __init__(self, group: DataParallelGroup, *, mode: str = "sync", lag: int = DEFAULT_LAG,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        if mode not in MODES:
            raise ValueError(f"decisions must be one of {MODES}, got {mode!r}")
        self.group = group
        self.mode, self.lag, self.timeout = mode, int(lag), float(timeout)
        self.stats = DecisionStats(mode, self.lag, self.timeout)
        self._incoming: List[Pending] = []  # received (rank 0), not yet due
        self._applied: set[str] = set()  # decision ids applied or rejected
        self._expected: Dict[int, int] = {}  # probe step → the boundary its decision is due at
        self._answered: set[int] = set()  # expected probes the store has run the policy on
        self._degraded = False  # a wait timed out and no answer has come since: do not wait
        self._reported = -1  # the stats' version last stored with the run
        self._version = 0
        self._cond = threading.Condition()

    # --- the writer's and the sink's side --------------------------------------------------------

    def receive(self, ident: str, decision: Decision) -> None:
        """Queue a decision for its boundary (a redelivered or applied id is ignored)."""
        with self._cond:
            if ident not in self._applied and all(ident != queued for queued, _ in self._incoming):
                self._incoming.append((ident, decision))

    def answered(self, steps: Iterable[int]) -> None:
        """The store has run the policy on the probes of ``steps`` (or cannot now): their decisions,
        if any, were handed to ``receive`` first."""
        with self._cond:
            for step in steps:
                if int(step) in self._expected:
                    self._answered.add(int(step))
            self._degraded = False
            self._cond.notify_all()

    # --- the training thread's side ----------------------------------------------------------------

    def expect(self, step: int) -> None:
        """A probe ran at ``step``: its decision, if any, is due at the boundary ``apply_at(step,
        lag)``. Called on every rank, before the step's record goes to the writer."""
        with self._cond:
            self._expected[int(step)] = apply_at(step, self.lag)

    def at_boundary(self, step: int, optimizer: Any, on_decision: Optional[Callable[[Decision], Any]]) -> List[Outcome]:
        """At the boundary before ``step`` (the optimizer step post-hook): wait for the answers due
        here (``sync``), then apply the decisions due (``apply_decision``), in step order. Returns
        what became of each; the caller acknowledges them."""
        with self._cond:
            probes = [s for s, boundary in self._expected.items() if boundary <= step]
        if probes and self.mode == "sync" and self.group.is_writer:
            self._wait(probes)
        # under DDP decisions are shared only at the boundaries every rank knows from the configuration
        share = bool(probes) or not self.group.active
        with self._cond:
            for s in probes:
                self._expected.pop(s, None)
                self._answered.discard(s)
            due = self._take_due(step) if share and self.group.is_writer else []
        if not share:
            return []
        if self.group.active:
            due = self.group.broadcast(due)
        outcomes = []
        for ident, decision in due:
            if ident in self._applied:
                continue
            self._applied.add(ident)
            error = apply_decision(decision, optimizer, on_decision)
            outcome = Outcome(ident, decision, None if error is None else rejection_text(error), error)
            self._count(step, outcome)
            outcomes.append(outcome)
        return outcomes

    def _wait(self, probes: List[int]) -> None:
        with self._cond:
            if all(s in self._answered for s in probes):
                return
            if self._degraded:
                self.stats.skipped += 1
                self._version += 1
                return
            start = time.perf_counter()
            ok = self._cond.wait_for(lambda: all(s in self._answered for s in probes), timeout=self.timeout)
            spent = time.perf_counter() - start
            self.stats.waits += 1
            self.stats.waited_seconds += spent
            self.stats.max_wait_seconds = max(self.stats.max_wait_seconds, spent)
            if not ok:
                self.stats.timeouts += 1
                self._version += 1
                self._degraded = True
        if not ok:
            log.warning("moxco: no answer from the decision policy for the probe of step %d within %.3g s "
                        "(decision_timeout); training goes on, a decision that comes later is applied late and "
                        "counted, and the agent does not wait again until an answer comes", max(probes), self.timeout)

    def _take_due(self, step: int) -> List[Pending]:
        """The received decisions due at the boundary before ``step`` (call with the lock held)."""
        due = [(i, d) for i, d in self._incoming if d.apply_at is None or d.apply_at <= step]
        if due:
            self._incoming = [(i, d) for i, d in self._incoming if not (d.apply_at is None or d.apply_at <= step)]
        return sorted(due, key=lambda pending: (pending[1].step, pending[0]))

    def _count(self, step: int, outcome: Outcome) -> None:
        due = outcome.decision.apply_at
        if outcome.rejected is not None:
            self.stats.rejected += 1
            self._version += 1
        if due is not None and step > due:
            self.stats.late += 1
            self.stats.max_lateness = max(self.stats.max_lateness, step - due)
            self._version += 1

    def changed(self) -> Optional[Dict[str, Any]]:
        """The stats, when something worth storing changed since the last call (a timeout, a skipped
        wait, a late or rejected decision); else None."""
        if self._version == self._reported:
            return None
        self._reported = self._version
        return self.stats.to_dict()

    # --- resume --------------------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        """Plain data: the decisions received and not yet applied, the ids applied (or rejected),
        the probes awaiting their boundary, and the stats."""
        with self._cond:
            return {"incoming": [[ident, decision.to_json()] for ident, decision in self._incoming],
                    "applied": sorted(self._applied), "expected": {str(s): b for s, b in self._expected.items()},
                    "stats": self.stats.to_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()``. The probes awaiting their boundary keep it (every rank shares
        decisions there under DDP) but are not waited for: their answers went to the earlier job."""
        with self._cond:
            self._incoming = [(str(ident), Decision.from_json(data)) for ident, data in state.get("incoming", [])]
            self._applied = set(state.get("applied", []))
            self._expected = {int(s): int(b) for s, b in dict(state.get("expected", {})).items()}
            self._answered = set(self._expected)
            known = {f.name for f in fields(DecisionStats)}
            counts = {k: v for k, v in dict(state.get("stats", {})).items() if k in known}
            self.stats = DecisionStats(**{**counts, "mode": self.mode, "lag": self.lag, "timeout": self.timeout})


def apply_decision(decision: Decision, optimizer: Any, on_decision: Optional[Callable[[Decision], Any]]
                   ) -> Optional[BaseException]:
    """Apply ``decision``: its action without the phase to ``optimizer.commit`` (phase 2) or
    ``optimizer.explore`` (phase 1), else ``on_decision(decision)``. Returns None when applied,
    else the exception that says why it could not be (never raises): the decision is rejected."""
    method_name = "commit" if decision.phase == 2 else "explore"
    method = getattr(optimizer, method_name, None)
    try:
        if callable(method):
            method(**{k: v for k, v in dict(decision.action).items() if k != "phase"})
        elif on_decision is not None:
            on_decision(decision)
        else:
            raise DecisionError(f"a phase-{decision.phase} action needs optimizer.{method_name}(...) "
                                f"({type(optimizer).__name__} has none) or an on_decision callback")
    except Exception as exc:  # noqa: BLE001 - whatever the optimizer or callback raises rejects this decision only
        return exc
    return None


def rejection_text(exc: BaseException) -> str:
    """Why a decision was refused, as the acknowledgement carries it: ``"Type: first line"``, no
    control characters, at most 300 characters."""
    text = error_summary(exc)
    return "".join(ch if ch.isprintable() else " " for ch in text)


__all__ = ["DEFAULT_TIMEOUT", "MODES", "DecisionInbox", "DecisionStats", "Outcome", "apply_decision", "rejection_text"]
