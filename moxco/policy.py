"""The MoXCo phase-switch decision policy: one pure state machine for the agent and the collector.

MoXCo (file 000, §3.2 and Algorithm 1 line 8-10) leaves Phase 1 (exploration) for Phase 2
(commit) once the goodness score ``δ_t`` exceeds a threshold ``C`` (0.85 in the paper's
experiments). A single noisy probe should not flip an optimizer, so the policy also asks for

* ``min_step``: no decision before this step (let the run warm up);
* ``consecutive``: the score must be ≥ C on this many consecutive probes;
* ``cooldown``: at least this many steps between two decisions;
* ``max_decisions``: how many times it may fire (1: the phase switch happens once).

The policy holds no clock, no I/O and no randomness: ``observe(step, goodness)`` is a function of
its state and inputs, its state round-trips through ``state_dict``, and observing a step that is
not newer than the last one is ignored (so a replayed or duplicated goodness point, as
at-least-once delivery produces, never counts twice).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Mapping, Optional

from moxco.goodness import Goodness

DEFAULT_ACTION: Dict[str, Any] = {"phase": 2, "alpha": 0.1, "beta": 0.1}


@dataclass(frozen=True)
class PolicyConfig:
    """Parameters of the decision policy (see the module docstring)."""

    threshold: float = 0.85
    min_step: int = 0
    consecutive: int = 3
    cooldown: int = 0
    max_decisions: int = 1
    action: Mapping[str, Any] = field(default_factory=lambda: dict(DEFAULT_ACTION))

    def __post_init__(self) -> None:
        if not (math.isfinite(self.threshold) and 0.0 < self.threshold <= 1.0):
            raise ValueError(f"threshold must be in (0, 1] (goodness lies in [0, 1]), got {self.threshold!r}")
        for name in ("min_step", "cooldown"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        for name in ("consecutive", "max_decisions"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.action, Mapping):
            raise ValueError(f"action must be a mapping such as {DEFAULT_ACTION}, got {self.action!r}")
        phase = self.action.get("phase", 2)
        if phase not in (1, 2):
            raise ValueError(f"action['phase'] must be 1 or 2, got {phase!r}")

    def to_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        out["action"] = dict(self.action)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PolicyConfig":
        unknown = set(data) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(f"unknown policy fields: {sorted(unknown)}")
        return cls(**dict(data))


@dataclass(frozen=True)
class Decision:
    """A phase-switch decision: the step it was taken at, the goodness behind it, the action.

    ``source`` is ``"policy"`` for decisions this state machine takes and ``"operator"`` for ones a
    person issues. Carriers (agent, collector) add the run and an id: ``decision_id``.
    """

    step: int
    action: Mapping[str, Any]
    goodness: float = math.nan
    grad_term: float = math.nan
    sharpness_term: float = math.nan
    loss_term: float = math.nan
    source: str = "policy"

    def to_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        out["action"] = dict(self.action)
        return out


def decision_id(run: str, decision: Decision) -> str:
    """Deterministic id of a decision, so the same decision derived twice is stored once."""
    return f"{run}:{decision.source}:{decision.step}"


class DecisionPolicy:
    """Threshold / min-step / k-consecutive / cooldown state machine over goodness probes."""

    def __init__(self, config: Optional[PolicyConfig] = None) -> None:
        self.config = config if config is not None else PolicyConfig()
        self._streak = 0
        self._last_step: Optional[int] = None
        self._last_decision_step: Optional[int] = None
        self._decisions = 0

    @property
    def decisions_taken(self) -> int:
        return self._decisions

    @property
    def exhausted(self) -> bool:
        """True once ``max_decisions`` have been taken: later probes can never fire."""
        return self._decisions >= self.config.max_decisions

    def observe(self, step: int, goodness: Goodness | float) -> Optional[Decision]:
        """Feed one goodness probe taken at ``step``; return a ``Decision`` when the policy fires.

        A NaN score breaks the streak (a diverged probe is never evidence of a good region).
        """
        if isinstance(goodness, Goodness):
            score, terms = goodness.score, goodness[1:]
        else:
            score, terms = float(goodness), (math.nan, math.nan, math.nan)
        step = int(step)
        if self._last_step is not None and step <= self._last_step:
            return None
        self._last_step = step

        cfg = self.config
        self._streak = self._streak + 1 if (not math.isnan(score) and score >= cfg.threshold) else 0
        if self.exhausted or step < cfg.min_step or self._streak < cfg.consecutive:
            return None
        if self._last_decision_step is not None and step - self._last_decision_step < cfg.cooldown:
            return None
        self._streak = 0
        self._decisions += 1
        self._last_decision_step = step
        return Decision(step, dict(cfg.action), score, *terms)

    def state_dict(self) -> Dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "streak": self._streak,
            "last_step": self._last_step,
            "last_decision_step": self._last_decision_step,
            "decisions": self._decisions,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.config = PolicyConfig.from_dict(state["config"])
        self._streak = int(state["streak"])
        self._last_step = state["last_step"]
        self._last_decision_step = state["last_decision_step"]
        self._decisions = int(state["decisions"])
