"""The descent lemma (audit §4.2-4.3, eq. 8-13, fig. 6-8).

Every smooth non-convex analysis the paper knows needs ``⟨∇F(x_{t+1}), x_{t+1} − x_t⟩`` negative
on average (eq. 8-11); ``update_corr`` is its unbiased estimate (eq. 9). The verdict is a sign test
at 2 standard errors (``stats.sign_test``; the error from successive differences, so the decay of a
full-batch run is not taken for noise): holds when the mean is significantly negative, fails when
significantly positive, inconclusive otherwise. The same test on the second half of the run
says whether the sign changed after the first steep phase.

With random scaling (``s_t ~ Exp(1)``, §4.3) eq. 12 makes ``update_corr_rs_t`` and ``loss_diff_t``
two unbiased estimates of the same progress, so the sub-verdict *random-scaling identity* is a
paired test of their mean difference: fails beyond 2 standard errors; holds within them when the
test could have seen a bias as large as the mean progress itself (2 SE < |mean loss_diff|);
inconclusive when it could not.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Dict

import numpy as np

from moxco.collector.audit.source import RunData
from moxco.collector.audit.stats import Z, sign_test
from moxco.collector.audit.verdicts import (
    FAILS, HOLDS, INCONCLUSIVE, NOT_APPLICABLE, NOT_MEASURED, Plot, Section, absence_cause, num, sub_verdict,
)


def aligned(run: RunData, *metrics: str):
    """The steps at which every one of ``metrics`` has a finite value, and the values there."""
    pairs = [run.finite(m) for m in metrics]
    common = pairs[0][0]
    for steps, _ in pairs[1:]:
        common = np.intersect1d(common, steps)
    return common, [values[np.searchsorted(steps, common)] for steps, values in pairs]


#: the random-scaling identity's sub-verdict, under the equation it tests
_identity = partial(sub_verdict, paper="eq. 12")


def _random_scaling_identity(run: RunData, section: Section) -> Dict[str, Any]:
    random_scaling = bool(run.config.get("random_scaling", False))
    common, (rs, ld, uc) = aligned(run, "update_corr_rs", "loss_diff", "update_corr")
    numbers: Dict[str, Any] = {"random_scaling": random_scaling, "common_steps": int(common.size)}
    if common.size:
        numbers.update({"sum_update_corr_rs": float(rs.sum()), "sum_loss_diff": float(ld.sum()),
                        "sum_update_corr": float(uc.sum())})
        section.plots.append(Plot("descent_cumsum", "cumulative sums: update_corr, update_corr_rs, loss_diff", "cumsum",
                                  {"steps": common, "update_corr": np.cumsum(uc), "update_corr_rs": np.cumsum(rs),
                                   "loss_diff": np.cumsum(ld)},
                                  caption=f"Cumulative sums over the {common.size} steps where all three are measured "
                                          "(fig. 8; symmetric log scale). With random scaling the sum of "
                                          "update_corr_rs should follow the sum of loss_diff (eq. 12)."))
    if not random_scaling:
        return _identity(NOT_APPLICABLE, cause="the run did not use random scaling, so eq. 12 is not expected to "
                                                 "hold (attach(..., random_scaling=True) to test it)", **numbers)
    if common.size < 2:
        cause = absence_cause(run, ["loss_diff", "update_corr_rs"]) or \
            f"only {common.size} step(s) have update_corr_rs, loss_diff and update_corr"
        return _identity(NOT_MEASURED, cause=cause, **numbers)
    test = sign_test(rs - ld)
    progress = float(np.mean(ld))
    numbers.update({"mean_difference": test.mean, "difference_standard_error": test.se, "difference_z": test.z,
                    "mean_loss_diff": progress})
    line = (f"mean update_corr_rs − loss_diff = {num(test.mean, '+.3g')} ± {num(test.se, '.2g')} (SE) over "
            f"{test.n} steps, {num(abs(test.z))} SE from 0; mean loss_diff = {num(progress, '+.3g')}")
    if math.isnan(test.se):
        return _identity(INCONCLUSIVE, f"{line}: too few steps for a standard error", **numbers)
    if test.sign != 0:
        return _identity(FAILS, f"{line}: the difference is beyond {Z:g} SE", **numbers)
    if Z * test.se < abs(progress):
        return _identity(HOLDS, f"{line}: within {Z:g} SE, and {Z:g} SE < |mean loss_diff|", **numbers)
    return _identity(INCONCLUSIVE, f"{line}: within {Z:g} SE, but {Z:g} SE ≥ |mean loss_diff|, so a bias as large "
                                     "as the progress itself would go unseen", **numbers)


def audit_descent(run: RunData) -> Section:
    section = Section("descent_lemma", "Descent lemma (update correlation)", "audit §4.2-4.3, eq. 8-13, fig. 6-8",
                      conventions={"mean_update_corr": "update_corr", "standard_error": "sign_test",
                                   "mean_over_standard_error": "sign_test", "median_update_corr": "update_corr",
                                   "mean_update_corr_second_half": "update_corr",
                                   "sum_update_corr_rs": "random_scaling", "mean_difference": "random_scaling"})
    steps, corr = run.finite("update_corr")
    if steps.size == 0:
        section.set(NOT_MEASURED, cause=absence_cause(run, ["update_corr"]))
        section.extra_verdicts["random_scaling_identity"] = _random_scaling_identity(run, section)
        return section
    test = sign_test(corr)
    half = corr[corr.size // 2:]
    late = sign_test(half)
    section.numbers.update({
        "steps": int(steps.size), "mean_update_corr": test.mean, "standard_error": test.se,
        "mean_over_standard_error": test.z, "standard_error_iid": test.se_iid, "fraction_negative": float((corr < 0).mean()),
        "median_update_corr": float(np.median(corr)), "sum_update_corr": float(corr.sum()),
        "final_running_mean": float(corr.mean()),
        "second_half_from_step": int(steps[corr.size // 2]), "mean_update_corr_second_half": late.mean,
        "second_half_standard_error": late.se, "second_half_z": late.z,
        "fraction_of_steps_running_mean_positive": float((np.cumsum(corr) > 0).mean()),
    })
    line = (f"{test.describe('update_corr')}; negative at {num(100 * (corr < 0).mean())} % of steps, median "
            f"{num(np.median(corr), '+.2g')}")
    late_text = (f"over the second half (from step {section.numbers['second_half_from_step']}): "
                 f"{late.describe('update_corr')}")
    if test.sign < 0:
        section.set(HOLDS, f"{line}: significantly negative at {Z:g} SE")
        section.reading = ("the gradient at the new point opposes the step on average, the decrease the descent lemma "
                           f"(eq. 8) credits for progress; {late_text}.")
    elif test.sign > 0:
        section.set(FAILS, f"{line}: significantly positive at {Z:g} SE")
        section.reading = ("on average the new gradient points along the step, so the smooth non-convex analysis "
                           "(eq. 8-11) predicts no decrease, yet the optimizer may still make progress (the paper "
                           f"finds this in almost every deep-learning run); {late_text}.")
    else:
        reason = "too few steps for a standard error" if math.isnan(test.se) else f"not significant at {Z:g} SE"
        section.set(INCONCLUSIVE, f"{line}: {reason}")
        section.reading = ("the data do not say on which side of 0 the mean update correlation lies, so they neither "
                           f"support nor contradict the descent lemma's premise; {late_text}.")
    section.extra_verdicts["random_scaling_identity"] = _random_scaling_identity(run, section)
    section.plots.insert(0, Plot("update_corr", "update_corr per step and its running mean", "corr",
                                 {"steps": steps, "corr": corr},
                                 caption="update_corr = ⟨∇f(x_{t+1}, z_{t+1}), x_{t+1} − x_t⟩ (faint) and its running "
                                         "mean (thick), as in fig. 6-7; symmetric log scale."))
    return section
