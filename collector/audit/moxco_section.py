"""MoXCo: goodness, phase and decisions (MoXCo eq. 6, Algorithm 1).

The claim under test is MoXCo's: the run reaches a region its goodness score rates as a stable
minimum, goodness ≥ C on the policy's ``consecutive`` probes in a row (C and ``consecutive`` from
the run's policy). It concerns MoXCo runs: for another optimizer the goodness is shown, and the
verdict is "not applicable". Decisions are listed with who took them (``Decision.describe``): a
policy decision is evidence of the criterion, an operator's is not.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import numpy as np

from moxco.catalogue import GOODNESS_TERMS
from moxco.collector.audit.source import RunData
from moxco.collector.audit.verdicts import (
    FAILS, HOLDS, INCONCLUSIVE, NOT_APPLICABLE, NOT_MEASURED, Plot, Section, absence_cause, num,
)
from moxco.decision import Decision, reproducibility
from moxco.policy import PolicyConfig


def run_policy(run: RunData) -> PolicyConfig:
    """The run's policy (``RunData.policy_config``) as a ``PolicyConfig``; the defaults when the run
    has none or it does not parse."""
    stored = {k: int(v) if isinstance(v, float) and v.is_integer() and k != "threshold" else v
              for k, v in (run.policy_config or {}).items()}
    try:
        return PolicyConfig.from_dict(stored)
    except (TypeError, ValueError, KeyError):
        known = {k: stored[k] for k in ("threshold", "min_step", "consecutive", "cooldown", "max_decisions")
                 if k in stored}
        try:
            return PolicyConfig(**known)
        except (TypeError, ValueError):
            return PolicyConfig()


def is_moxco(name: Optional[str]) -> Optional[bool]:
    """Whether the optimizer's class name is MoXCo's (None: the run does not say)."""
    return None if not name else "moxco" in name.lower()


def decision_line(decision: Decision) -> str:
    """``Decision.describe()`` and what became of it: applied at a step, refused, or pending."""
    if decision.status == "applied":
        fate = f"applied at step {decision.applied_step}"
    elif decision.status == "rejected":
        fate = f"refused by the agent at step {decision.applied_step}: {decision.rejected}"
    else:
        fate = "not acknowledged by the agent"
    return f"{decision.describe()}; {fate}"


def _decision_json(d: Decision) -> Dict[str, Any]:
    return {"step": d.step, "source": d.source, "issued_by": d.issued_by, "reason": d.reason,
            "goodness": d.goodness, "action": dict(d.action), "applied_step": d.applied_step,
            "rejected": d.rejected, "status": d.status, "line": decision_line(d)}


def audit_moxco(run: RunData) -> Section:
    section = Section("moxco", "MoXCo goodness, phase and decisions", "MoXCo eq. 6, Algorithm 1, Theorem 1-2",
                      conventions={"max_goodness": "goodness", "final_goodness": "goodness",
                                   "mean_terms": "goodness", "probes_above_threshold": "goodness"})
    steps, score = run.finite("goodness")
    policy = run_policy(run)
    decisions: List[Decision] = list(run.decisions)
    by_policy = [d for d in decisions if d.source == "policy"]
    by_operator = [d for d in decisions if d.source != "policy"]
    optimizer = run.optimizer_name
    moxco = is_moxco(optimizer)
    section.numbers.update({"optimizer": optimizer, "threshold": policy.threshold, "consecutive": policy.consecutive,
                            "min_step": policy.min_step, "decisions": [_decision_json(d) for d in decisions],
                            "decision_timing": reproducibility(run.config, decisions)})
    phase_steps, phases = run.finite("phase")
    section.numbers["final_phase"] = int(phases[-1]) if phases.size else None
    not_moxco = f"the optimizer is {optimizer}, not MoXCo, so no phase switch applies"
    if steps.size == 0:
        if moxco is False:
            section.set(NOT_APPLICABLE, cause=not_moxco)
        else:
            section.set(NOT_MEASURED, cause=absence_cause(run, ["goodness"]))
        _describe_decisions(section, by_policy, by_operator)
        return section
    above = score >= policy.threshold
    longest = current = 0
    for flag in above:
        current = current + 1 if flag else 0
        longest = max(longest, current)
    terms = {}
    for name in GOODNESS_TERMS:
        _, values = run.finite(name)
        terms[name] = float(values.mean()) if values.size else math.nan
    known_terms = {k: v for k, v in terms.items() if not math.isnan(v)}
    dominant = max(known_terms, key=known_terms.get) if known_terms else None
    step_of_max = int(steps[int(np.argmax(score))])
    section.numbers.update({"probes": int(steps.size), "max_goodness": float(score.max()), "step_of_max": step_of_max,
                            "final_goodness": float(score[-1]), "probes_above_threshold": int(above.sum()),
                            "longest_run_above_threshold": longest, "mean_terms": terms, "dominant_term": dominant})
    criterion = f"goodness ≥ C = {num(policy.threshold, 'g')} on {policy.consecutive} consecutive probes"
    observed = (f"longest run at or above C: {longest} of {steps.size} probes; max {num(score.max())} at step "
                f"{step_of_max}")
    if moxco is False:
        section.set(NOT_APPLICABLE, cause=f"{not_moxco}; its goodness is shown for reference ({observed})")
    elif longest >= policy.consecutive or by_policy:
        fired = f"; {by_policy[0].describe()}" if by_policy else ""
        section.set(HOLDS, f"{criterion}: {observed}{fired}")
        section.reading = "the run reached what MoXCo scores as a stable basin."
    elif steps.size < policy.consecutive:
        section.set(INCONCLUSIVE, f"{criterion}: only {steps.size} probe(s) were taken, fewer than the criterion needs "
                                  f"({observed})")
    else:
        section.set(FAILS, f"{criterion} never held: {observed}")
        section.reading = (f"goodness stayed below the commit criterion; the largest mean term, the one keeping it low, "
                           f"is {(dominant or 'unknown').replace('goodness_', '')}.")
    _describe_decisions(section, by_policy, by_operator)
    section.plots.append(Plot("moxco", "goodness, its three terms, phase and decisions", "moxco", {
        "steps": steps, "goodness": score, "threshold": policy.threshold,
        "terms": {name: run.get(name) for name in GOODNESS_TERMS},
        "phase_steps": phase_steps, "phase": phases,
        "decisions": [(d.step, d.source) for d in decisions]},
        caption="Top: goodness G = exp(−τ[terms]) with the threshold C (dashed) and decisions (vertical lines: "
                "solid for the policy's, dotted for an operator's); bottom: the three bracketed terms (log scale) "
                "and the phase."))
    return section


def _describe_decisions(section: Section, by_policy: List[Decision], by_operator: List[Decision]) -> None:
    lines = [decision_line(d) for d in by_policy + by_operator]
    if not lines:
        text = "No decision is stored for this run."
    else:
        text = "Decisions: " + "; ".join(lines) + "."
        if by_operator:
            text += " An operator's decision is not evidence of the goodness criterion."
    section.reading = f"{section.reading} {text}".strip()
    timing = section.numbers.get("decision_timing")
    if timing is not None:  # whether a rerun with the same seed applies them at the same steps
        verdict = "reproducible" if timing["reproducible"] else "not reproducible"
        section.reading += f" Decision timing is {verdict} with the same seed: {timing['reason']}."
