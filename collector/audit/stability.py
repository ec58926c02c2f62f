"""The edge of stability: the sharpness against the stability limit of the step size (Cohen et al.).

Two pairs, each a measured sharpness and its edge at the same probes:

* **plain**: ``sharpness`` = λ_max(∇²f) against λ_EOS = 2(1+α)/(η(1+2β)) (``2/η`` for gradient
  descent, heavy-ball momentum as α; MoXCo Theorem 2): the run's ``sharpness_target`` divided by the
  goodness multiplier ``k``, which is that edge unless the user set goodness's own λ_target;
* **preconditioned** (Adam-family runs): ``sharpness_precond`` = λ_max(P⁻¹∇²f), P = diag(√v̂ + ε)
  from the optimizer's second moments, against ``sharpness_precond_target`` =
  2(1+β₁)/((1−β₁)η), the adaptive edge of stability (Cohen et al. 2022, "Adaptive gradient methods
  at the edge of stability"): 38/η for β₁ = 0.9.

The yardstick is the preconditioned pair for an Adam-family optimizer (Adam, AdamW, MoXCo over
one): Adam's steps are preconditioned, so its plain λ_max sits far below 2/η at its own edge and
says nothing about stability. Any other optimizer is measured by the plain pair.

The sub-verdict **edge of stability** of the smoothness section (audit fig. 5 is gradient descent
there) tests the yardstick over the probes in the second half of the run's steps: the median of
``ratio = sharpness / edge`` with its 2-standard-error interval (``stats.median_interval``):

* **holds**: the interval lies within ``[1/EOS_BAND, EOS_BAND]``: the run is at the edge;
* **fails**: it lies entirely below (the step size does not limit the sharpness: not at the edge)
  or entirely above that band;
* **inconclusive**: it reaches across a boundary of the band, or fewer than ``MIN_PROBES`` probes;
* **not measured**: no probe of the yardstick in the second half (the cause named).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional

import numpy as np

from moxco.collector.audit.descent import aligned
from moxco.collector.audit.source import RunData
from moxco.collector.audit.stats import Z, median_interval
from moxco.collector.audit.verdicts import (
    FAILS, HOLDS, INCONCLUSIVE, NOT_MEASURED, Plot, Section, absence_cause, num, sub_verdict,
)

#: a median ratio within [1/EOS_BAND, EOS_BAND] of the edge is "at the edge of stability" (gradient
#: descent hovers at 1.0-1.1 × 2/η, Adam's preconditioned sharpness at 0.9-1.0 × its edge)
EOS_BAND = 1.25
#: fewer probes in the second half than this: inconclusive
MIN_PROBES = 5
#: the optimizers whose second moments the agent preconditions with (lower-case class names)
ADAM_NAMES = ("adam", "adamw")

PLAIN = {"metric": "sharpness", "target": "sharpness_target", "label": "λ_max", "edge": "λ_EOS = 2(1+α)/(η(1+2β))",
         "name": "plain"}
PRECOND = {"metric": "sharpness_precond", "target": "sharpness_precond_target", "label": "λ_max(P⁻¹H)",
           "edge": "2(1+β₁)/((1−β₁)η)", "name": "precond"}


def adam_family(run: RunData) -> bool:
    """Whether the run's optimizer is Adam-family: the agent measured the preconditioned pair (or
    recorded that it would), or the optimizer's class is Adam or AdamW."""
    curvature = run.config.get("curvature")
    return (run.finite(PRECOND["metric"])[0].size > 0
            or (isinstance(curvature, Mapping) and curvature.get("sharpness_precond") is True)
            or (run.optimizer_name or "").lower() in ADAM_NAMES)


def _goodness(run: RunData) -> Mapping[str, Any]:
    goodness = run.config.get("goodness")
    return goodness if isinstance(goodness, Mapping) else {}


def plain_edge_cause(run: RunData) -> str:
    """Why the stored ``sharpness_target`` is not the plain edge of stability ("" when it is)."""
    g = _goodness(run)
    if g.get("sharpness_target") is not None and g.get("sharpness", "plain") == "plain":
        return (f"the stored sharpness_target is goodness's λ_target set by the user ({num(g['sharpness_target'])}), "
                "not an edge of stability")
    return ""


def second_half_start(run: RunData, steps: np.ndarray) -> float:
    """The middle of the run's steps (the loss's, else the probes'): the second half starts there."""
    loss_steps = run.get("loss")[0]
    span = loss_steps if loss_steps.size else steps
    return float(span.min() + (span.max() - span.min()) / 2) if span.size else math.nan


def pair(run: RunData, spec: Dict[str, str]) -> Optional[Dict[str, np.ndarray]]:
    """The pair's probes with a finite sharpness and a positive edge: steps, sharpness, edge and their
    ratio; None when the run has none. The plain edge is ``sharpness_target / k``."""
    steps, (values, targets) = aligned(run, spec["metric"], spec["target"])
    if spec is PLAIN:
        if plain_edge_cause(run):
            return None
        k = _goodness(run).get("k", 1.0)
        targets = targets / float(k if isinstance(k, (int, float)) and k > 0 else 1.0)
    keep = targets > 0
    if not keep.any():
        return None
    steps, values, targets = steps[keep], values[keep], targets[keep]
    return {"steps": steps, "sharpness": values, "edge": targets, "ratio": values / targets}


def pair_numbers(data: Dict[str, np.ndarray], start: float, prefix: str) -> Dict[str, Any]:
    """The ratio statistics of one pair over the probes at or after ``start``: how many, the median
    with its 2-SE interval, the quartiles, the share above the edge, and the last values."""
    late = data["ratio"][data["steps"] >= start]
    low, high = median_interval(late)
    quartiles = np.quantile(late, [0.25, 0.75]) if late.size else (math.nan, math.nan)
    return {f"{prefix}_probes": int(data["steps"].size), f"{prefix}_second_half_probes": int(late.size),
            f"{prefix}_median_ratio": float(np.median(late)) if late.size else math.nan,
            f"{prefix}_median_ratio_low": low, f"{prefix}_median_ratio_high": high,
            f"{prefix}_ratio_q25": float(quartiles[0]), f"{prefix}_ratio_q75": float(quartiles[1]),
            f"{prefix}_fraction_above_edge": float((late > 1).mean()) if late.size else math.nan,
            f"{prefix}_final_sharpness": float(data["sharpness"][-1]), f"{prefix}_final_edge": float(data["edge"][-1])}


def _verdict(numbers: Dict[str, Any], spec: Dict[str, str], start: float, lead: str, note: str,
             paper: str) -> Dict[str, Any]:
    p = spec["name"]
    n, median = numbers[f"{p}_second_half_probes"], numbers[f"{p}_median_ratio"]
    low, high = numbers[f"{p}_median_ratio_low"], numbers[f"{p}_median_ratio_high"]
    band = f"[{num(1 / EOS_BAND, '.2g')}, {num(EOS_BAND, 'g')}]"
    line = (f"{lead}median {spec['label']} / ({spec['edge']}) = {num(median)} over the {n} probes of the second half "
            f"(from step {num(start, '.0f')}; {Z:g}-SE interval {num(low)} … {num(high)}; quartiles "
            f"{num(numbers[f'{p}_ratio_q25'])} … {num(numbers[f'{p}_ratio_q75'])})")
    if n < MIN_PROBES:
        verdict, outcome = INCONCLUSIVE, f"fewer than {MIN_PROBES} probes"
    elif 1 / EOS_BAND <= low and high <= EOS_BAND:
        verdict, outcome = HOLDS, f"within {band}, at the edge of stability"
    elif high < 1 / EOS_BAND:
        verdict, outcome = FAILS, (f"below {band} at {Z:g} SE, so the step size does not limit the sharpness (not at "
                                   "the edge of stability)")
    elif low > EOS_BAND:
        verdict, outcome = FAILS, f"above {band} at {Z:g} SE (beyond the edge of stability)"
    else:
        verdict, outcome = INCONCLUSIVE, f"the interval reaches across a boundary of {band}"
    return sub_verdict(verdict, f"{line}: {outcome}{note}", paper=paper, **numbers)


def _precond_absent(run: RunData) -> str:
    curvature = run.config.get("curvature")
    if isinstance(curvature, Mapping) and curvature.get("sharpness_precond") is False and not run.errors:
        return ("the agent did not measure sharpness_precond (attach(..., sharpness_precond=False), or an optimizer "
                "it did not recognise as Adam-family)")
    return absence_cause(run, [PRECOND["metric"], PRECOND["target"]])


def audit_edge_of_stability(run: RunData, section: Section) -> None:
    """Add the edge-of-stability sub-verdict, its numbers and its plot to the smoothness ``section``
    (nothing when the run has no sharpness of either kind); and the share of probes with negative
    curvature (``sharpness_min < 0``) where the run has λ_min."""
    _negative_curvature(run, section)
    adam = adam_family(run)
    plain, precond = pair(run, PLAIN), pair(run, PRECOND)
    if not (run.finite(PLAIN["metric"])[0].size or run.finite(PRECOND["metric"])[0].size):
        return
    steps = np.concatenate([d["steps"] for d in (plain, precond) if d is not None] or [np.zeros(0, np.int64)])
    start = second_half_start(run, steps)
    numbers: Dict[str, Any] = {"yardstick": "precond" if adam else "plain", "second_half_from_step": start,
                               "band_low": 1 / EOS_BAND, "band_high": EOS_BAND}
    for data, spec in ((plain, PLAIN), (precond, PRECOND)):
        if data is not None:
            numbers.update(pair_numbers(data, start, spec["name"]))
    panels: List[Dict[str, Any]] = []
    described = []
    for data, spec, text in ((plain, PLAIN, "the plain λ_max against λ_EOS (2/η for gradient descent)"),
                             (precond, PRECOND, "Adam's preconditioned λ_max(P⁻¹H) against 2(1+β₁)/((1−β₁)η), the "
                                                "yardstick of an Adam-family run")):
        if data is not None:
            panels.append({"steps": data["steps"], "sharpness": data["sharpness"], "edge": data["edge"],
                           "label": spec["label"], "edge_label": spec["edge"]})
            described.append(("below, " if described else "") + text)
    if panels:
        section.plots.append(Plot(
            "edge_of_stability", "sharpness against its edge of stability", "eos", {"panels": panels},
            caption=(f"The sharpness at each probe (squares) and its edge of stability (dashed): "
                     f"{'; '.join(described)}. Log scale: non-positive values are not drawn; the second half starts "
                     f"at step {num(start, '.0f')}.")))
    optimizer = run.optimizer_name or "this optimizer"
    if adam:
        plain_median = numbers.get("plain_median_ratio", math.nan)
        plain_note = ""
        if plain is not None and not math.isnan(plain_median):
            plain_note = (f"; the plain λ_max / λ_EOS (median {num(plain_median)}) is not the yardstick for an "
                          "Adam-family optimizer")
        if precond is None:
            cause = (f"the optimizer is {optimizer}, Adam-family: its edge of stability is λ_max(P⁻¹H) against "
                     f"2(1+β₁)/((1−β₁)η), and {_precond_absent(run)}{plain_note}")
            verdict = sub_verdict(NOT_MEASURED, cause=cause, paper="Cohen et al. 2022", **numbers)
        else:
            lead = f"{optimizer} is Adam-family, so the yardstick is the preconditioned pair: "
            verdict = _verdict(numbers, PRECOND, start, lead, plain_note, "Cohen et al. 2022")
        section.reading = (f"{section.reading} For an Adam-family optimizer the edge of stability is "
                           "λ_max(P⁻¹H) at 2(1+β₁)/((1−β₁)η) (38/η for β₁ = 0.9), not λ_max at 2/η: Adam's "
                           "steps are preconditioned.").strip()
    elif plain is None:
        cause = (plain_edge_cause(run) or absence_cause(run, [PLAIN["metric"], PLAIN["target"]])
                 or "no probe has both a finite sharpness and a positive sharpness_target")
        verdict = sub_verdict(NOT_MEASURED, cause=cause, paper="Cohen et al. 2021", **numbers)
    else:
        verdict = _verdict(numbers, PLAIN, start, "", "", "Cohen et al. 2021")
    section.extra_verdicts["edge_of_stability"] = verdict
    section.conventions.update({key: "edge_of_stability" for key in numbers if key != "yardstick"})


def _negative_curvature(run: RunData, section: Section) -> None:
    _, low = run.finite("sharpness_min")
    if not low.size:
        return
    negative = int((low < 0).sum())
    section.numbers.update({"sharpness_min_probes": int(low.size), "negative_curvature_probes": negative,
                            "fraction_negative_curvature": negative / low.size})
    section.conventions["fraction_negative_curvature"] = "sharpness"
    section.reading = (f"{section.reading} λ_min < 0 (negative curvature) at {negative} of the {low.size} probes "
                       "that measured it.").strip()
