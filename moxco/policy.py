"""The MoXCo phase-switch decision policy: one pure state machine for the agent and the collector.

MoXCo (§3.2 and Algorithm 1, lines 8-10) leaves Phase 1 (exploration) for Phase 2
(commit) once the goodness score ``δ_t`` exceeds a threshold ``C`` (0.85 in the paper's
experiments). A single noisy probe should not flip an optimizer, so the policy also asks for

* ``min_step``: no decision before this step (let the run warm up);
* ``consecutive``: the score must be ≥ C on this many consecutive probes;
* ``cooldown``: at least this many steps between two decisions;
* ``max_decisions``: how many times it may fire (1: the phase switch happens once);
* ``lag``: the step a decision is applied at, fixed by the configuration alone: a decision fired by
  the probe of step ``s`` carries ``apply_at = s + 1 + lag``, the boundary after the update of step
  ``s + lag`` (``lag = 0``: the boundary right after the probe's own step). The agent applies it
  exactly there (it waits for the policy's answer at that boundary when it must, in the
  ``decisions="sync"`` mode), so one seed gives one run, whatever the threads or the network do.

The policy holds no clock, no I/O and no randomness: ``observe(step, goodness)`` is a function of
its state and inputs, its state round-trips through ``state_dict``, and observing a step that is
not newer than the last one is ignored (so a replayed or duplicated goodness point, as
at-least-once delivery produces, never counts twice).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from moxco.decision import DEFAULT_ACTION, Decision, DecisionError, validate_action
from moxco.goodness import Goodness

# steps between a probe and the boundary its decision is applied at: the agent's writer has this
# many whole steps to score the probe and run the policy before the training thread would wait for it
DEFAULT_LAG = 2


@dataclass(frozen=True)
class PolicyConfig:
    """Parameters of the decision policy (see the module docstring)."""

    threshold: float = 0.85
    min_step: int = 0
    consecutive: int = 3
    cooldown: int = 0
    max_decisions: int = 1
    lag: int = DEFAULT_LAG
    action: Mapping[str, Any] = field(default_factory=lambda: dict(DEFAULT_ACTION))

    def __post_init__(self) -> None:
        threshold = self.threshold
        if (isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold)
                or not 0.0 < threshold <= 1.0):
            raise ValueError(f"threshold must be a number in (0, 1] (goodness lies in [0, 1]), got {threshold!r}")
        object.__setattr__(self, "threshold", float(threshold))
        for name, least in (("min_step", 0), ("cooldown", 0), ("consecutive", 1), ("max_decisions", 1), ("lag", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                kind = "a non-negative" if least == 0 else "a positive"
                raise ValueError(f"{name} must be {kind} integer, got {value!r}")
        try:
            object.__setattr__(self, "action", validate_action(self.action))
        except DecisionError as exc:
            raise ValueError(f"policy action: {exc}") from None

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


def apply_at(step: int, lag: int) -> int:
    """The step boundary a decision fired by the probe of ``step`` is applied at: ``step + 1 + lag``
    (the agent's ``applied_step``: the boundary before step ``step + 1 + lag``)."""
    return int(step) + 1 + int(lag)


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
        return Decision(step, dict(cfg.action), score, *terms, source="policy", issued_by="policy",
                        policy=cfg.to_dict(), apply_at=apply_at(step, cfg.lag))

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


def decide(config: Mapping[str, Any], state: Optional[Mapping[str, Any]],
           probes: Mapping[int, Goodness | float]) -> Tuple[Dict[str, Any], List[Decision]]:
    """Run a policy over a batch of goodness probes: the one implementation the collector (under the
    run's row lock, state kept with the run) and the embedded agent call.

    ``config``: ``PolicyConfig.to_dict()``; ``state``: the policy's ``state_dict()`` so far (None:
    fresh); ``probes``: ``{step: goodness}``, observed in step order. Returns the new state and the
    decisions taken (without a run; the caller sets it)."""
    policy = DecisionPolicy(PolicyConfig.from_dict(config))
    if state is not None:
        policy.load_state_dict({**state, "config": dict(config)})
    made = [d for d in (policy.observe(step, probes[step]) for step in sorted(probes)) if d is not None]
    return policy.state_dict(), made


def probe_steps(points: Iterable[Any]) -> List[int]:
    """The steps of the run-level ``goodness`` points among ``points`` (``moxco.wire.Point``s or
    ``(step, metric, value, wall_time[, rank])`` tuples): the probes a store's policy decides on
    when it ingests them."""
    from moxco.wire import RUN_LEVEL_RANK

    steps = []
    for point in points:
        if isinstance(point, tuple) and not hasattr(point, "metric"):
            step, metric, rank = point[0], point[1], point[4] if len(point) > 4 else RUN_LEVEL_RANK
        else:
            step, metric, rank = point.step, point.metric, point.rank
        if metric == "goodness" and rank == RUN_LEVEL_RANK:
            steps.append(int(step))
    return steps


def goodness_probes(metrics: Iterable[str], steps: Iterable[int], values: Iterable[float],
                    ranks: Iterable[int]) -> Dict[int, Goodness]:
    """The goodness probes in a batch of points (``wire.parse_points`` columns): ``{step: Goodness}``
    from the run-level ``goodness`` points, with their three terms where the batch has them."""
    from moxco.catalogue import GOODNESS_TERMS
    from moxco.wire import RUN_LEVEL_RANK

    columns = list(zip(metrics, steps, values, ranks))
    probes: Dict[int, List[float]] = {}
    for metric, step, value, rank in columns:
        if metric == "goodness" and rank == RUN_LEVEL_RANK:
            probes[int(step)] = [float(value), math.nan, math.nan, math.nan]
    for metric, step, value, rank in columns:
        if metric in GOODNESS_TERMS and rank == RUN_LEVEL_RANK and int(step) in probes:
            probes[int(step)][1 + GOODNESS_TERMS.index(metric)] = float(value)
    return {step: Goodness(*terms) for step, terms in probes.items()}
