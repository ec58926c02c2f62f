"""Convexity along the path (audit §3.1, eq. 2-3) and global convexity (audit §3.2, eq. 6-7).

No metric formula is re-derived here: the series are the agent's (``moxco.metrics``); the
convexity-ratio reading is ``moxco.metrics.interpret_convexity_ratio``. What this module adds is
the float-error tolerance of ``inst_gap``, built from the stored ``loss`` and ``loss_diff`` only
through the identities ``f(x_{t−1}, z_t) = loss − loss_diff`` and ``⟨g_t, x_t − x_{t−1}⟩ =
loss_diff − inst_gap`` (audit eq. 2 and 13 rearranged).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from moxco.collector.audit.source import AuditError, RunData
from moxco.collector.audit.verdicts import (
    DEGRADED, FAILS, HOLDS, NOT_MEASURED, Plot, Section, absence_cause, num,
)
from moxco.metrics import interpret_convexity_ratio

#: machine epsilon of the dtype the model computed its loss in; the run's ``config["dtype"]``
#: selects it (the examples and integrations store it), float32 when unknown.
DTYPE_EPS = {
    "float64": float(np.finfo(np.float64).eps), "double": float(np.finfo(np.float64).eps),
    "float32": float(np.finfo(np.float32).eps), "float": float(np.finfo(np.float32).eps),
    "tf32": 2.0**-10, "bfloat16": 2.0**-7, "float16": 2.0**-10, "half": 2.0**-10,
}
DEFAULT_DTYPE = "float32"
#: inst_gap tolerance = TOLERANCE_FACTOR · ε · (|f(x_t,z_t)| + |f(x_{t−1},z_t)| + |⟨g_t, x_t − x_{t−1}⟩|)
TOLERANCE_FACTOR = 16.0


def run_dtype(run: RunData, override: Optional[str] = None) -> str:
    """The dtype the run computed its loss in: ``override``, else ``config["dtype"]``, else float32."""
    dtype = str(override or run.config.get("dtype") or DEFAULT_DTYPE).replace("torch.", "")
    if dtype not in DTYPE_EPS:
        raise AuditError(f"unknown dtype {dtype!r}; one of {sorted(DTYPE_EPS)}")
    return dtype


def _lookup(steps: np.ndarray, values: np.ndarray, at: np.ndarray) -> np.ndarray:
    out = np.full(at.shape, np.nan)
    if steps.size == 0:
        return out
    index = np.clip(np.searchsorted(steps, at), 0, steps.size - 1)
    hit = steps[index] == at
    out[hit] = values[index[hit]]
    return out


def gap_tolerance(run: RunData, steps: np.ndarray, gaps: np.ndarray, *, dtype: Optional[str] = None,
                  factor: float = TOLERANCE_FACTOR) -> np.ndarray:
    """Per-step float-error scale of ``inst_gap``: ``factor · ε · (|f(x_t)| + |f(x_{t−1})| + |⟨g_t, d_t⟩|)``.

    ``inst_gap`` is the difference of three computed quantities; each carries a rounding error of
    order ε times its own magnitude (the losses are reductions computed in the model's dtype, the
    inner product is accumulated in float64 from gradients in that dtype). Where ``loss`` or
    ``loss_diff`` is missing at a step, the terms that need it count as 0 and ``|inst_gap|`` is
    used for the inner product.
    """
    eps = DTYPE_EPS[run_dtype(run, dtype)]
    loss_steps, losses = run.get("loss")
    diff_steps, diffs = run.get("loss_diff")
    loss_at = _lookup(loss_steps, losses, steps)
    diff_at = _lookup(diff_steps, diffs, steps)
    loss_prev = loss_at - diff_at
    inner = np.where(np.isfinite(diff_at), diff_at - gaps, np.abs(gaps))
    scale = np.nan_to_num(np.abs(loss_at)) + np.nan_to_num(np.abs(loss_prev)) + np.nan_to_num(np.abs(inner))
    return factor * eps * scale


def audit_path_convexity(run: RunData, *, dtype: Optional[str] = None, factor: float = TOLERANCE_FACTOR) -> Section:
    """Audit §3.1: convexity of ``f(·, z_t)`` along each step implies ``inst_gap_t ≤ 0``; a gap above
    its float-error tolerance at any measured step falsifies it (a deterministic test)."""
    section = Section("path_convexity", "Convexity along the path", "audit §3.1, eq. 2-3, fig. 1-2",
                      conventions={"max_inst_gap": "inst_gap", "mean_inst_gap": "inst_gap",
                                   "median_inst_gap": "inst_gap", "nonconvex_steps": "inst_gap",
                                   "final_avg_gap": "avg_gap", "final_exp_gap": "ema", "measured_steps": "epochs"})
    steps, gaps = run.finite("inst_gap")
    if steps.size == 0:
        section.set(NOT_MEASURED, cause=absence_cause(run, ["inst_gap"]))
        return section
    tol = gap_tolerance(run, steps, gaps, dtype=dtype, factor=factor)
    nonconvex = gaps > tol
    n, n_pos = int(steps.size), int(nonconvex.sum())
    avg_gap, exp_gap = run.last("avg_gap"), run.last("exp_gap")
    section.numbers = {
        "measured_steps": n, "nonconvex_steps": n_pos, "fraction_nonconvex": n_pos / n,
        "max_inst_gap": float(gaps.max()), "mean_inst_gap": float(gaps.mean()),
        "median_inst_gap": float(np.median(gaps)), "final_avg_gap": avg_gap, "final_exp_gap": exp_gap,
        "convex_on_average": bool(avg_gap <= 0) if not math.isnan(avg_gap) else None,
        "dtype": run_dtype(run, dtype), "tolerance_factor": factor, "median_tolerance": float(np.median(tol)),
        "first_nonconvex_step": int(steps[nonconvex][0]) if n_pos else None,
    }
    if n_pos == 0:
        section.set(HOLDS, f"inst_gap ≤ its float-error tolerance at all {n} measured steps (max {num(gaps.max())})")
        section.reading = ("the loss is convex along every measured step, as convexity requires (fig. 1).")
    else:
        section.set(FAILS, f"inst_gap > its float-error tolerance at {n_pos} of {n} measured steps "
                           f"({num(100 * n_pos / n)} %, first at step {section.numbers['first_nonconvex_step']}, "
                           f"max {num(gaps.max())})")
        if math.isnan(avg_gap):
            average = "avg_gap is not stored, so whether it is convex on average is not known"
        elif avg_gap <= 0:
            average = (f"it is convex on average (final avg_gap = {num(avg_gap)} ≤ 0: the averaged identity that "
                       "stochastic analyses sum still holds, the paper's 'mostly convex' path)")
        else:
            average = f"it is not even convex on average (final avg_gap = {num(avg_gap)} > 0)"
        section.reading = f"any positive gap falsifies convexity along the path; {average}."
    avg_steps, avg_values = run.get("avg_gap")
    exp_steps, exp_values = run.get("exp_gap")
    section.plots.append(Plot("path_convexity", "inst_gap, avg_gap, exp_gap (w.r.t. x_{t-1})", "gaps", {
        "inst_steps": steps, "inst": gaps, "tolerance": tol, "avg_steps": avg_steps, "avg": avg_values,
        "exp_steps": exp_steps, "exp": exp_values},
        caption="Dots: inst_gap per measured step (red above the float-error tolerance, the grey band); "
                "lines: the running mean avg_gap and EMA exp_gap (β = 0.99). Symmetric log scale."))
    return section


def audit_global_convexity(run: RunData) -> Section:
    """Audit §3.2: the last (running) ``convexity_ratio``; > 1 holds (eq. 7), (0, 1] holds with the
    degradation K = ratio, ≤ 0 fails. A quotient of two sums, no sampling test."""
    section = Section("global_convexity", "Global convexity (convexity ratio)", "audit §3.2, eq. 6-7, fig. 3",
                      conventions={"convexity_ratio": "convexity_ratio", "K": "convexity_ratio",
                                   "fraction_inst_gap_ref_positive": "inst_gap", "mean_inst_gap_ref": "inst_gap",
                                   "median_inst_smooth_ref": "inst_smooth"})
    steps, ratios = run.get("convexity_ratio")
    finite = ~np.isnan(ratios)  # ±Inf (Σ(F(x_t) − F(x*)) = 0 with a non-zero numerator) is a reading
    ref_steps, ref_gaps = run.finite("inst_gap_ref")
    if ref_steps.size:
        section.numbers.update({"inst_gap_ref_steps": int(ref_steps.size),
                                "fraction_inst_gap_ref_positive": float((ref_gaps > 0).mean()),
                                "mean_inst_gap_ref": float(ref_gaps.mean())})
    smooth_steps, smooth_ref = run.finite("inst_smooth_ref")
    if smooth_steps.size:
        section.numbers["median_inst_smooth_ref"] = float(np.median(smooth_ref))
    if not finite.any():
        if steps.size:
            cause = (f"the convexity ratio is 0/0 at all {steps.size} probes (Σ (F(x_t) − F(x*)) = 0 and the "
                     "numerator too)")
        else:
            cause = absence_cause(run, ["convexity_ratio"])
        section.set(NOT_MEASURED, cause=cause)
        return section
    r_steps, r = steps[finite], ratios[finite]
    ratio = float(r[-1])
    probes = int(steps.size)
    section.numbers.update({"convexity_ratio": ratio, "probes": probes, "final_step": int(r_steps[-1]),
                            "min_running_ratio": float(r.min()), "max_running_ratio": float(r.max()),
                            "reading": interpret_convexity_ratio(ratio)})
    test = f"convexity_ratio = {num(ratio)} over {probes} probes"
    if ratio > 1.0:
        section.set(HOLDS, f"{test} > 1")
        section.reading = ("Σ F(x_t) − F(x*) ≤ Σ ⟨∇F(x_t), x_t − x*⟩ (eq. 7), the inequality convex analyses bound, "
                           f"holds along this run ({interpret_convexity_ratio(ratio)}).")
    elif ratio > 0.0:
        section.set(DEGRADED, f"{test} ∈ (0, 1]", K=ratio)
        section.numbers["K"] = ratio
        section.numbers["K_sqrt_T"] = ratio * math.sqrt(probes)
        section.reading = (f"eq. 7 holds with the factor 1/K = {num(1 / ratio)} ({interpret_convexity_ratio(ratio)}); "
                           "the convex convergence bound O(1/√T) becomes O(1/(K√T)), still vanishing while "
                           f"K ≥ Ω(1/√T) (here K√T = {num(ratio * math.sqrt(probes))} with T = {probes} probes).")
    else:
        section.set(FAILS, f"{test} ≤ 0")
        section.reading = ("the iterates' gradients point away from x* on balance, so no convexity-based bound "
                           "applies (strongly non-convex, as the paper reports for GPT-2 and ImageNet).")
    section.plots.append(Plot("global_convexity", "convexity_ratio (running, w.r.t. x*)", "ratio",
                              {"steps": r_steps, "ratio": r},
                              caption="The running ratio Σ⟨∇F(x_t), x_t − x*⟩ / Σ(F(x_t) − F(x*)) at each probe. "
                                      "Green: > 1 (convex-like); amber: (0, 1] (convex analysis with a 1/K "
                                      "degradation); red: ≤ 0 (strongly non-convex)."))
    return section
