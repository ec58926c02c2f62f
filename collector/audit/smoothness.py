"""Smoothness as a proxy for sharpness (audit §4, §4.1, eq. 4-5, fig. 4-5).

The paper proposes ``max_smooth``/``exp_smooth`` as cheap proxies for the sharpness λ_max. One
pair per sharpness probe: the median ``inst_smooth`` since the previous probe against the
sharpness there. Two questions, each with its own test:

* does the smoothness *move with* the sharpness? Spearman's ρ of the pairs, with its 2-standard-
  error interval (``stats.rank_correlation_interval``): it tracks when ρ ≥ 0.5 and the interval
  lies above 0; it does not when the whole interval lies below 0.5 *and* the sharpness moved
  enough (×3) for co-movement to show through the noise of both estimates; otherwise the data do
  not decide (inconclusive). A sharpness constant within ×1.5 (a quadratic) has nothing to
  co-move with: the scale alone is judged there.
* is it *at the sharpness's scale*? The median of smoothness/sharpness within ``[1/2, 2]``
  (holds) or not (holds with degradation K = min(ratio, 1/ratio)).
"""

from __future__ import annotations

import math
from typing import Dict

import numpy as np

from moxco.collector.audit.source import RunData
from moxco.collector.audit.stability import audit_edge_of_stability
from moxco.collector.audit.stats import Z, pearson, rank_correlation, rank_correlation_interval
from moxco.collector.audit.verdicts import (
    DEGRADED, FAILS, HOLDS, INCONCLUSIVE, NOT_MEASURED, Plot, Section, absence_cause, num,
)

#: fewer pairs than this: the comparison is "not measured"
MIN_PAIRS = 3
#: a rank correlation is computed from this many pairs on
MIN_PAIRS_FOR_CORRELATION = 5
#: the smoothness tracks the sharpness when ρ is at least this (and its interval lies above 0) …
MIN_RANK_CORRELATION = 0.5
#: … a sharpness whose max/min over the pairs is below this is constant: only the scale is judged …
CONSTANT_SHARPNESS_RANGE = 1.5
#: … and "does not track" needs the sharpness to have moved at least this much (max/min)
MIN_RANGE_TO_REJECT = 3.0
#: the ratio smoothness/sharpness within [1/FACTOR, FACTOR] counts as "the same scale"
SCALE_FACTOR = 2.0


def smoothness_pairs(run: RunData) -> Dict[str, np.ndarray]:
    """One pair per sharpness probe ``s``: the median ``inst_smooth`` over the steps since the
    previous probe (``(s_prev, s]``) next to ``sharpness`` at ``s``. The EMA ``exp_smooth`` is not
    used for the pairing: without bias correction it is pulled towards 0 by ``1 − β^t`` over the
    first few hundred steps (docs/metrics.md), which would dominate a short run's correlation."""
    sharp_steps, sharp = run.finite("sharpness")
    smooth_steps, smooth = run.finite("inst_smooth")
    out_steps, levels, sharps = [], [], []
    previous = -math.inf
    for step, value in zip(sharp_steps, sharp):
        window = (smooth_steps > previous) & (smooth_steps <= step)
        previous = step
        if window.any():
            out_steps.append(step)
            levels.append(float(np.median(smooth[window])))
            sharps.append(float(value))
    return {"steps": np.asarray(out_steps, dtype=np.int64), "smooth": np.asarray(levels), "sharpness": np.asarray(sharps)}


def _too_few_pairs(run: RunData, pairs: Dict[str, np.ndarray], n: int) -> str:
    absent = absence_cause(run, ["inst_smooth", "sharpness"])
    if absent:
        return absent
    nonpositive = int((pairs["sharpness"] <= 0).sum())
    if nonpositive:
        return (f"{nonpositive} of the {pairs['steps'].size} paired sharpness probes are ≤ 0 (negative sharpness "
                f"values: the power iteration settled on a negative eigenvalue), which leaves {n} usable pair(s); "
                f"the comparison needs {MIN_PAIRS}")
    probes = run.finite("sharpness")[0].size
    every = run.config.get("probe_every")
    cadence = f" (probe_every = {every})" if every is not None else ""
    return (f"only {n} of the {probes} sharpness probes{cadence} have inst_smooth points in the interval before "
            f"them; the comparison needs {MIN_PAIRS}")


def audit_smoothness(run: RunData) -> Section:
    """The smoothness-against-sharpness verdict, with the edge-of-stability sub-verdict
    (``stability.audit_edge_of_stability``) and the share of probes with negative curvature."""
    section = _smoothness_and_sharpness(run)
    audit_edge_of_stability(run, section)
    return section


def _smoothness_and_sharpness(run: RunData) -> Section:
    section = Section("smoothness", "Smoothness and sharpness", "audit §4, §4.1, eq. 4-5, fig. 4-5",
                      conventions={"final_max_smooth": "max_smooth", "final_exp_smooth": "ema",
                                   "median_inst_smooth": "inst_smooth", "final_sharpness": "sharpness",
                                   "median_smooth_over_sharpness": "smoothness_pairs",
                                   "rank_correlation": "smoothness_pairs", "rank_correlation_low": "smoothness_pairs",
                                   "rank_correlation_high": "smoothness_pairs", "sharpness_range": "sharpness",
                                   "nonpositive_sharpness_probes": "sharpness", "K": "smoothness_pairs"})
    smooth_steps, smooth = run.finite("inst_smooth")
    sharp_steps, sharp = run.finite("sharpness")
    section.numbers.update({"final_max_smooth": run.last("max_smooth"), "final_exp_smooth": run.last("exp_smooth"),
                            "median_inst_smooth": float(np.median(smooth)) if smooth.size else math.nan,
                            "smooth_steps": int(smooth.size), "sharpness_probes": int(sharp.size),
                            "final_sharpness": float(sharp[-1]) if sharp.size else math.nan})
    if smooth.size >= 2:
        # bounded? the largest inst_smooth of the second half against the first half's
        half = smooth.size // 2
        section.numbers["max_smooth_second_half_over_first"] = float(smooth[half:].max() / smooth[:half].max())
    pairs = smoothness_pairs(run)
    positive = pairs["sharpness"] > 0
    section.numbers["pairs"] = int(pairs["steps"].size)
    section.numbers["nonpositive_sharpness_probes"] = int((~positive).sum())
    use = {k: v[positive] for k, v in pairs.items()}
    n = int(use["steps"].size)
    if smooth.size or sharp.size:
        section.plots.append(Plot("smoothness", "inst_smooth, max_smooth, exp_smooth and sharpness", "smoothness", {
            "inst_steps": smooth_steps, "inst": smooth,
            "max_steps": run.get("max_smooth")[0], "max": run.get("max_smooth")[1],
            "exp_steps": run.get("exp_smooth")[0], "exp": run.get("exp_smooth")[1],
            "sharp_steps": sharp_steps, "sharp": sharp},
            caption="inst_smooth per measured step (dots), its running max and EMA, and the sharpness λ_max "
                    "at each probe (squares); log scale (non-positive values are not drawn)."))
    if n < MIN_PAIRS:
        section.set(NOT_MEASURED, cause=_too_few_pairs(run, pairs, n))
        return section
    scale = float(np.median(use["smooth"] / use["sharpness"]))
    K = min(scale, 1.0 / scale)
    rho = rank_correlation(use["smooth"], use["sharpness"]) if n >= MIN_PAIRS_FOR_CORRELATION else math.nan
    low, high = rank_correlation_interval(rho, n)
    spread = float(use["sharpness"].max() / use["sharpness"].min())
    section.numbers.update({"median_smooth_over_sharpness": scale, "rank_correlation": rho,
                            "rank_correlation_low": low if not math.isnan(rho) else math.nan,
                            "rank_correlation_high": high if not math.isnan(rho) else math.nan,
                            "pearson_log_correlation": pearson(np.log(use["smooth"]), np.log(use["sharpness"])),
                            "sharpness_range": spread, "K": K})
    in_band = 1.0 / SCALE_FACTOR <= scale <= SCALE_FACTOR
    scale_text = (f"median inst_smooth/sharpness = {num(scale)} "
                  f"{'∈' if in_band else '∉'} [1/{SCALE_FACTOR:g}, {SCALE_FACTOR:g}]")
    if math.isnan(rho):
        corr_text = f"{n} pairs, too few for a rank correlation (≥ {MIN_PAIRS_FOR_CORRELATION})"
    else:
        corr_text = (f"Spearman ρ = {num(rho)} over {n} pairs ({Z:g}-SE interval {num(low, '.2f')} … "
                     f"{num(high, '.2f')})")
    range_text = f"sharpness range ×{num(spread)}"
    if spread < CONSTANT_SHARPNESS_RANGE:
        # nothing to co-move with: only the scale can be judged
        test = f"{range_text} < ×{CONSTANT_SHARPNESS_RANGE:g} (constant: the scale alone is judged), {scale_text}"
        tracks = True
    else:
        tracks = not math.isnan(rho) and rho >= MIN_RANK_CORRELATION and low > 0
        rejects = not math.isnan(rho) and spread >= MIN_RANGE_TO_REJECT and high < MIN_RANK_CORRELATION
        test = f"{corr_text}, {range_text}, {scale_text}"
        if rejects:
            section.set(FAILS, f"{test}: ρ lies below {MIN_RANK_CORRELATION:g} at {Z:g} SE")
            section.reading = ("the smoothness measure does not move with the sharpness here, so it is no proxy for "
                               "it on this run.")
        elif not tracks:
            if math.isnan(rho):
                why = "too few pairs to test co-movement"
            elif spread < MIN_RANGE_TO_REJECT:
                why = (f"the sharpness moved by less than ×{MIN_RANGE_TO_REJECT:g}, too little to tell missing "
                       "co-movement from the noise of the two estimates")
            else:
                why = (f"the interval reaches both below {MIN_RANK_CORRELATION:g} and above it, so the data "
                       "neither show nor exclude co-movement")
            section.set(INCONCLUSIVE, f"{test}: {why}")
            section.reading = ("more probes, or a run whose sharpness moves more, would decide whether the "
                               "smoothness measure tracks the sharpness.")
    if section.verdict not in (FAILS, INCONCLUSIVE) and tracks:
        max_smooth = run.last("max_smooth")
        largest = f"; the largest measured local smoothness is max_smooth = {num(max_smooth)}" \
            if not math.isnan(max_smooth) else ""
        if in_band:
            section.set(HOLDS, test)
            section.reading = f"the smoothness measure tracks the sharpness at its scale (fig. 5){largest}."
        else:
            section.set(DEGRADED, test, K=K)
            section.reading = (f"it moves with the sharpness but at {num(scale)} times its value, a proxy up to the "
                               f"factor 1/K = {num(1 / K)}{largest}.")
    section.plots.append(Plot("smoothness_vs_sharpness", "interval-median inst_smooth vs sharpness", "pairs",
                              {"smooth": use["smooth"], "sharpness": use["sharpness"], "steps": use["steps"]},
                              caption="One point per probe (colour: step); the line is smoothness = sharpness, "
                                      f"the band the factor-{SCALE_FACTOR:g} range counted as the same scale."))
    return section
