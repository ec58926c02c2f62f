"""Verdicts, sections and the words around them.

Six verdicts (docs/audit.md, "Verdict rules"): **holds**, **holds with degradation K**, **fails**,
**inconclusive** (the evidence does not reach the stated significance), **not measured** (the
metrics are absent: the line names why) and **not applicable** (the assumption does not concern
this run: no random scaling, not a MoXCo optimizer). A verdict line states the test and its numbers;
no NaN ever reaches a sentence (``num`` writes an undefined number as "undefined").

``absence_cause`` finds why a section's metrics are absent, in this order: the agent's stored
error for the metric's group, the option that was off, too few steps, values that are all
non-finite; the catalogue (``moxco.catalogue``) says which group computes each metric.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from moxco import catalogue
from moxco.collector.audit.source import RunData

HOLDS, DEGRADED, FAILS = "holds", "holds with degradation", "fails"
INCONCLUSIVE, NOT_MEASURED, NOT_APPLICABLE = "inconclusive", "not measured", "not applicable"
VERDICTS = (HOLDS, DEGRADED, FAILS, INCONCLUSIVE, NOT_MEASURED, NOT_APPLICABLE)


def num(value: Any, spec: str = ".3g") -> str:
    """A number for a sentence: ``format(value, spec)``, ∞ for infinities, "undefined" for NaN."""
    if value is None:
        return "undefined"
    value = float(value)
    if math.isnan(value):
        return "undefined"
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    return format(value, spec)


@dataclass
class Plot:
    """A figure to draw: ``kind`` names a function of ``report``; ``data`` is what it draws."""

    key: str
    title: str
    kind: str
    data: Dict[str, Any]
    caption: str = ""


@dataclass
class Section:
    """One assumption's audit. ``test``: the test and its numbers, one clause (the verdict line
    is the verdict followed by it); ``cause``: why a not-measured or not-applicable section is so;
    ``reading``: what it means for the run; ``conventions``: for each number, the id of the
    convention it follows (``conventions.CONVENTIONS``)."""

    key: str
    title: str
    paper: str
    verdict: str = NOT_MEASURED
    K: Optional[float] = None
    test: str = ""
    cause: str = ""
    reading: str = ""
    numbers: Dict[str, Any] = field(default_factory=dict)
    plots: List[Plot] = field(default_factory=list)
    extra_verdicts: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    conventions: Dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")

    def set(self, verdict: str, test: str = "", *, K: Optional[float] = None, cause: str = "") -> None:
        if verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
        self.verdict, self.test, self.K, self.cause = verdict, test, K, cause

    @property
    def verdict_line(self) -> str:
        return verdict_line(self.verdict, self.test, K=self.K, cause=self.cause)

    def to_json(self) -> Dict[str, Any]:
        return {"title": self.title, "paper": self.paper, "verdict": self.verdict, "K": json_number(self.K),
                "verdict_line": self.verdict_line, "test": self.test, "cause": self.cause, "reading": self.reading,
                "numbers": {k: json_value(v) for k, v in self.numbers.items()},
                "conventions": dict(self.conventions),
                "extra_verdicts": {k: {kk: json_value(vv) for kk, vv in v.items()} for k, v in self.extra_verdicts.items()},
                "plots": [p.key for p in self.plots]}


def verdict_line(verdict: str, test: str = "", *, K: Optional[float] = None, cause: str = "") -> str:
    """``VERDICT: test`` (``holds with degradation K = 0.25 (bounds 4x looser): test``;
    ``not measured: cause``)."""
    if verdict == DEGRADED:
        head = f"holds with degradation K = {num(K)} (bounds {num(1.0 / K)}x looser)"
    else:
        head = verdict
    detail = cause if verdict in (NOT_MEASURED, NOT_APPLICABLE) else test
    return f"{head}: {detail}" if detail else head


def sub_verdict(verdict: str, test: str = "", *, cause: str = "", paper: str = "", **numbers: Any) -> Dict[str, Any]:
    """A sub-verdict (``Section.extra_verdicts``): its numbers, verdict, test and line, and the
    equation or paper it tests (``paper``, shown beside its heading)."""
    return {**numbers, "verdict": verdict, "test": test, "cause": cause, "paper": paper,
            "verdict_line": verdict_line(verdict, test, cause=cause)}


#: the keys of a sub-verdict that are not numbers
SUB_VERDICT_KEYS = ("verdict", "verdict_line", "test", "cause", "paper")


def json_number(value: Any) -> Any:
    if value is None:
        return None
    value = float(value)
    if math.isnan(value):
        return None
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def json_value(value: Any) -> Any:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return json_number(value)
    if isinstance(value, Mapping):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [json_value(v) for v in value]
    return value


# --- why a metric is absent ----------------------------------------------------------------------

#: error keys of the agent that stop every metric of a step (capture of the loss and gradient, the
#: copy of x_{t−1}, the writer thread, the store)
GENERAL_ERRORS = ("capture", "copy", "writer", "store")
#: error keys beyond a metric's catalogue group that stop it
EXTRA_ERRORS = {"sharpness": ("sharpness",), "goodness": ("sharpness", "probe"),
                "sharpness_precond": ("sharpness_precond",), "sharpness_precond_target": ("sharpness_precond",),
                "goodness_grad_term": ("probe",), "goodness_sharpness_term": ("sharpness", "probe"),
                "goodness_loss_term": ("probe",), "convexity_ratio": ("probe",)}
#: the option that turns each group on, and what to do when it is off
OPTIONS = {
    "reeval": ("reeval_every", "the re-evaluation at x_{t−1} was off: attach(..., reeval_every=N) with N > 0"),
    "probe": ("probe_every", "probes were off: attach(..., probe_every=N) with N > 0"),
    "goodness": ("probe_every", "probes were off: attach(..., probe_every=N) with N > 0"),
    "reference": ("reference", "no reference x* was given: attach(..., reference=x_star) (and probe_every > 0), "
                               "or moxco audit --checkpoints DIR --reference FINAL.pt --data ..."),
}
#: how many steps a metric needs before its first point (update_corr and the replays pair two steps)
MIN_STEPS = {"update_corr": 2, "update_corr_rs": 2, "loss_diff": 2, "inst_gap": 2, "inst_smooth": 2,
             "avg_gap": 2, "exp_gap": 2, "max_smooth": 2, "exp_smooth": 2}


def _errors_for(run: RunData, metric: str) -> List[str]:
    entry = catalogue.metric(metric)
    keys = list(GENERAL_ERRORS) + ([entry.group] if entry is not None else []) + list(EXTRA_ERRORS.get(metric, ()))
    errors = run.errors
    seen, out = set(), []
    for key in keys:
        if key in errors and key not in seen:
            seen.add(key)
            out.append(f"the agent disabled its {key} metrics after an error: {errors[key]}")
    return out


def _option_off(run: RunData, metric: str) -> Optional[str]:
    entry = catalogue.metric(metric)
    if entry is None or entry.group not in OPTIONS:
        return None
    key, advice = OPTIONS[entry.group]
    if key == "reference":  # not recorded is no reference
        if not run.config.get(key):
            return advice
        probe = run.config.get("probe_every")
        if metric == "convexity_ratio" and isinstance(probe, (int, float)) and probe <= 0:
            return "convexity_ratio is computed on the probe cadence and probes were off (probe_every = 0)"
        return None
    if key not in run.config:
        return None
    value = run.config[key]
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
        return f"{key} = {value:g}: {advice}"
    return None


def absence_cause(run: RunData, metrics: Sequence[str]) -> str:
    """Why ``metrics`` have no finite point in ``run``: one sentence per absent metric's cause
    (the same cause is said once), or "" when every metric has a finite point."""
    causes: List[str] = []
    for metric in metrics:
        steps, values = run.get(metric)
        if np.isfinite(values).any():
            continue
        found = _errors_for(run, metric)
        if not found:
            off = _option_off(run, metric)
            if off:
                found = [off]
        if not found and steps.size:
            found = [f"none of the {steps.size} stored {metric} values is a finite number"]
        if not found:
            loss_steps = run.get("loss")[0].size
            need = MIN_STEPS.get(metric, 1)
            if loss_steps < need:
                found = [f"the run has {loss_steps} step(s)" + (f"; {metric} needs at least {need}" if need > 1 else "")]
            else:
                entry = catalogue.metric(metric)
                option = OPTIONS.get(entry.group if entry else "", (None,))[0]
                setting = (f" although {option} = {run.config[option]!r}" if option and option in run.config else "")
                found = [f"no {metric} point is stored{setting}, and the run recorded no agent error"]
        for cause in found:
            if cause not in causes:
                causes.append(cause)
    return "; ".join(causes)
