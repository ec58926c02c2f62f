"""The phase-switch decision: one type, one JSON form, one validation.

A decision tells a run's optimizer to change phase (MoXCo Algorithm 1: leave exploration for the
commit phase) and, with it, its inertia ``alpha``, extrapolation ``beta`` or step size ``lr``. It is
taken by the decision policy (``moxco.policy``) when the goodness score stays above the threshold,
or issued by an operator through the API or ``moxco decide``. The API, the store, the agent (both
modes) and the CLI all use this type:

* ``validate_action`` is the only check of an action: known keys only (``phase``, ``alpha``,
  ``beta``, ``lr``), ``phase`` 1 or 2, ``alpha`` and ``beta`` in [0, 1), ``lr`` in (0, ``MAX_LR``]
  (10). ``phase`` defaults to 2. A ``Decision`` cannot be built with an invalid action.
* Why ``lr`` ≤ 10: a decision changes the step size of someone's training from outside it, so
  the bound is on what any run could want, not on what a float holds. Step sizes of SGD with
  momentum, Adam(W) and MoXCo are below 1 in practice; the largest in common use, LARS-style
  layer-wise scaled base rates for very large batches, are of order 1–10. Past 10 a gradient
  step overshoots any loss whose curvature exceeds 2/10 = 0.2 (gradient descent is stable only
  for ``lr·λ_max < 2``), i.e. any network. ``lr = 1e308`` is finite and would turn every
  parameter into ±Inf at the next step.
* Every decision records its cause: ``source`` (``policy`` or ``operator``) and ``issued_by``
  (``policy``, or the operator token's name), with the goodness and its three terms that fired a
  policy decision and the policy's configuration at that moment (``policy``), or the operator's
  ``reason``.
* ``apply_at``: the step boundary the decision must be applied at, when the run's configuration
  fixes it (a policy decision: its probe's step + 1 + the policy's ``lag``); ``None`` (an
  operator's): the next boundary after it arrives. ``lateness`` is ``applied_step − apply_at``.
* ``reproducibility(config, decisions)``: whether a run's decisions were applied where its
  configuration alone puts them (the agent's ``decisions`` mode, stored in the run's config), so
  that a rerun with the same seed applies them at the same steps.
* The agent acknowledges each decision once: ``applied_step`` is the step it was applied at, or,
  when the agent refused it, ``rejected`` says why (``applied_step`` is then the step it was
  refused at). ``status`` is ``pending``, ``applied`` or ``rejected``.
* ``to_json``/``from_json`` are the one JSON form (NaN goodness as ``null``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from types import SimpleNamespace
from typing import Any, Dict, Mapping, Optional

ACTION_KEYS = ("phase", "alpha", "beta", "lr")
SOURCES = ("policy", "operator")
DEFAULT_ACTION: Dict[str, Any] = {"phase": 2, "alpha": 0.1, "beta": 0.1}
STATUSES = ("pending", "applied", "rejected")
MAX_LR = 10.0  # the largest step size a decision may set (see the module docstring)


class DecisionError(ValueError):
    """An invalid action or decision; the message names the bad value."""


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_action(action: Any) -> Dict[str, Any]:
    """The action as a plain dict with ``phase`` filled in (default 2); ``DecisionError`` for anything
    else than known keys with valid values: ``phase`` 1 or 2, ``alpha``, ``beta`` in [0, 1), ``lr``
    in (0, ``MAX_LR``]."""
    if not isinstance(action, Mapping):
        raise DecisionError(f'an action is an object such as {{"phase": 2, "alpha": 0.1, "beta": 0.1, "lr": 0.01}}, '
                            f"got {type(action).__name__}")
    unknown = sorted(str(k) for k in action if k not in ACTION_KEYS)
    if unknown:
        raise DecisionError(f"unknown action keys {unknown}; an action has {list(ACTION_KEYS)}")
    out: Dict[str, Any] = {}
    phase = action.get("phase", 2)
    if type(phase) is not int or phase not in (1, 2):
        raise DecisionError(f"action.phase must be 1 or 2, got {phase!r}")
    out["phase"] = phase
    for key in ("alpha", "beta"):
        if key in action:
            value = action[key]
            if not _number(value) or not math.isfinite(value) or not 0.0 <= value < 1.0:
                raise DecisionError(f"action.{key} must be a number in [0, 1), got {value!r}")
            out[key] = float(value)
    if "lr" in action:
        value = action["lr"]
        if not _number(value) or not math.isfinite(value) or not 0 < value <= MAX_LR:
            raise DecisionError(f"action.lr must be a number in (0, {MAX_LR:g}], got {value!r}")
        out["lr"] = float(value)
    return out


def _float_or_nan(value: Any) -> float:
    if value is None:
        return math.nan
    if isinstance(value, str):
        from moxco.wire import decode_value

        return decode_value(value)
    return float(value)


def _json_number(value: float) -> Any:
    """NaN (not measured) as ``null``; ±Inf as the wire's strings."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


@dataclass(frozen=True)
class Decision:
    """A phase-switch decision (see the module docstring). ``step``: the step it was taken at (the
    probe whose goodness fired it, or the operator's step)."""

    step: int
    action: Mapping[str, Any] = field(default_factory=lambda: dict(DEFAULT_ACTION))
    goodness: float = math.nan
    grad_term: float = math.nan
    sharpness_term: float = math.nan
    loss_term: float = math.nan
    source: str = "policy"
    issued_by: str = "policy"
    reason: Optional[str] = None
    policy: Optional[Mapping[str, Any]] = None
    run: Optional[str] = None
    apply_at: Optional[int] = None
    created_at: Optional[float] = None
    applied_step: Optional[int] = None
    applied_at: Optional[float] = None
    rejected: Optional[str] = None

    def __post_init__(self) -> None:
        if isinstance(self.step, bool) or not isinstance(self.step, int) or self.step < 0:
            raise DecisionError(f"a decision's step is an integer ≥ 0, got {self.step!r}")
        if self.source not in SOURCES:
            raise DecisionError(f"source must be one of {SOURCES}, got {self.source!r}")
        if self.apply_at is not None and (not isinstance(self.apply_at, int) or self.apply_at < self.step):
            raise DecisionError(f"apply_at must be a step ≥ the decision's step {self.step}, got {self.apply_at!r}")
        object.__setattr__(self, "action", validate_action(self.action))

    @property
    def id(self) -> str:
        """Deterministic id, so the same decision derived twice (at-least-once delivery, several
        collector workers) is stored once: ``<run>:<source>:<step>``."""
        return decision_id(self.run or "", self.source, self.step)

    @property
    def status(self) -> str:
        if self.applied_step is None:
            return "pending"
        return "rejected" if self.rejected is not None else "applied"

    @property
    def lateness(self) -> Optional[int]:
        """Steps between the boundary the decision was due at and the one it was applied (or refused)
        at: ``applied_step − apply_at``; None while pending or when nothing fixed ``apply_at``."""
        if self.applied_step is None or self.apply_at is None:
            return None
        return int(self.applied_step) - int(self.apply_at)

    @property
    def phase(self) -> int:
        return int(self.action["phase"])

    def terms(self) -> tuple:
        """``(goodness, grad_term, sharpness_term, loss_term)``."""
        return self.goodness, self.grad_term, self.sharpness_term, self.loss_term

    def with_run(self, run: str) -> "Decision":
        return replace(self, run=run)

    def acknowledged(self, step: int, at: float, rejected: Optional[str] = None) -> "Decision":
        """This decision once the agent applied it at ``step`` (or refused it: ``rejected``)."""
        return replace(self, applied_step=int(step), applied_at=float(at), rejected=rejected)

    def describe(self) -> str:
        """One line for a person: who decided what, at which step, and why."""
        action = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.action.items())
        if self.source == "policy":
            score = "not measured" if math.isnan(self.goodness) else f"{self.goodness:.3f}"
            threshold = (self.policy or {}).get("threshold")
            why = f"goodness {score}" + (f" ≥ C = {threshold:g}" if isinstance(threshold, (int, float)) else "")
            who = "the policy"
        else:
            who = f"operator {self.issued_by!r}"
            why = self.reason or "no reason given"
        return f"{who} decided {action} at step {self.step} ({why})"

    def to_json(self) -> Dict[str, Any]:
        """The one JSON form (API responses, the agent's ``decisions()``, the CLI)."""
        out = asdict(self)
        out["action"] = dict(self.action)
        out["policy"] = dict(self.policy) if self.policy is not None else None
        for key in ("goodness", "grad_term", "sharpness_term", "loss_term"):
            out[key] = _json_number(out[key])
        out["id"] = self.id
        out["status"] = self.status
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Decision":
        """Inverse of ``to_json`` (``id`` and ``status`` are derived, so ignored); ``DecisionError``
        (a ``ValueError``) for a malformed decision."""
        if not isinstance(data, Mapping):
            raise DecisionError(f"a decision is an object, got {type(data).__name__}")
        try:
            return cls(
                step=data["step"], action=data.get("action") or {},
                goodness=_float_or_nan(data.get("goodness")), grad_term=_float_or_nan(data.get("grad_term")),
                sharpness_term=_float_or_nan(data.get("sharpness_term")),
                loss_term=_float_or_nan(data.get("loss_term")), source=data.get("source", "policy"),
                issued_by=data.get("issued_by") or data.get("source", "policy"), reason=data.get("reason"),
                policy=data.get("policy"), run=data.get("run"), apply_at=data.get("apply_at"),
                created_at=data.get("created_at"), applied_step=data.get("applied_step"),
                applied_at=data.get("applied_at"), rejected=data.get("rejected"))
        except KeyError as exc:
            raise DecisionError(f"a decision needs {exc.args[0]!r}") from None
        except TypeError as exc:
            raise DecisionError(f"malformed decision: {exc}") from None


def decision_id(run: str, source: str, step: int) -> str:
    """``<run>:<source>:<step>``: the id a decision of ``run`` taken by ``source`` at ``step`` has."""
    return f"{run}:{source}:{int(step)}"


MODES = ("sync", "async")


def reproducibility(config: Optional[Mapping[str, Any]], decisions: Any) -> Dict[str, Any]:
    """Whether a run's decisions were applied at the steps its configuration fixes, so that a rerun
    with the same seed applies them at the same steps and gives the same run.

    ``config``: the run's stored config, whose ``decisions`` entry the agent writes (``mode``:
    ``sync``, the agent waits at ``apply_at`` for the policy's answer, or ``async``, it applies a
    decision at the first boundary after it arrives; ``timeouts``: waits that ended without an
    answer); ``decisions``: the run's ``Decision`` objects. Returns ``{"mode", "reproducible",
    "reason", "late"}`` with ``late`` the ``(step, apply_at, applied_step)`` of decisions applied
    after their ``apply_at``. Reproducible: no decision was applied, or every one was a policy
    decision applied exactly at its ``apply_at`` in the ``sync`` mode."""
    recorded = (config or {}).get("decisions")
    recorded = recorded if isinstance(recorded, Mapping) else {}
    mode = recorded.get("mode") if recorded.get("mode") in MODES else None
    # Decision objects or their JSON form (what an audit may hold)
    done = [SimpleNamespace(**{k: (d.get(k) if isinstance(d, Mapping) else getattr(d, k))
                               for k in ("step", "source", "apply_at", "applied_step")}) for d in decisions]
    done = [d for d in done if d.applied_step is not None]
    late = [(d.step, d.apply_at, d.applied_step) for d in done if d.apply_at is not None and d.applied_step > d.apply_at]
    out: Dict[str, Any] = {"mode": mode, "reproducible": True, "late": late}
    operators = [d for d in done if d.source != "policy"]
    unfixed = [d for d in done if d.source == "policy" and d.apply_at is None]
    if not done:
        out["reason"] = "no decision was applied, so none depends on timing"
    elif operators:
        out["reproducible"] = False
        out["reason"] = (f"{len(operators)} operator decision(s) were applied when they arrived (step "
                         f"{operators[0].applied_step}); a rerun does not repeat them")
    elif mode != "sync":
        out["reproducible"] = False
        how = "asynchronous" if mode == "async" else "not recorded (an agent older than the sync mode)"
        out["reason"] = (f"the agent's decision mode is {how}: a decision is applied at the first step boundary "
                         f"after its answer arrives, which depends on thread and network timing")
    elif unfixed:
        out["reproducible"] = False
        out["reason"] = f"the decision at step {unfixed[0].step} has no fixed step to be applied at (apply_at)"
    elif late:
        out["reproducible"] = False
        step, due, applied = late[0]
        out["reason"] = (f"the decision at step {step} was applied at step {applied}, {applied - due} step(s) after "
                         f"its apply_at {due}: the agent's wait for the policy's answer timed out "
                         f"({int(recorded.get('timeouts') or 0)} timed-out wait(s))")
    else:
        out["reason"] = "every decision was applied exactly at the step its configuration fixes (apply_at)"
    return out


__all__ = ["ACTION_KEYS", "DEFAULT_ACTION", "MAX_LR", "MODES", "Decision", "DecisionError", "decision_id", "reproducibility",
           "validate_action"]
