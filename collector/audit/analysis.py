"""The audit's numbers and verdicts: one function per assumption, pure NumPy over stored series.

Each ``audit_*`` function takes a ``RunData`` (the stored series of one run) and returns a
``Section``: a verdict (``holds``, ``holds with degradation K``, ``fails``, ``not measured``), the
numbers behind it, and what to plot. The rules are stated in ``docs/audit.md`` with the audit
paper's reasoning (file 003); the constants they use are defined here, once.

No metric formula is re-derived here: the series are the agent's (``moxco.metrics``); the
convexity-ratio reading is ``moxco.metrics.interpret_convexity_ratio``. What this module adds is
statistics over the stored points (fractions, means, standard errors, rank correlation) and the
float-error tolerance of ``inst_gap``, built from the stored ``loss`` and ``loss_diff`` only
through the identities ``f(x_{t−1}, z_t) = loss − loss_diff`` and
``⟨g_t, x_t − x_{t−1}⟩ = loss_diff − inst_gap`` (audit eq. 2 and 13 rearranged).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from moxco.decision import reproducibility
from moxco.metrics import interpret_convexity_ratio
from moxco.policy import PolicyConfig

# --- the constants of the verdict rules (docs/audit.md, "Verdict rules") ---------------------------

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
#: smoothness tracks sharpness when the rank correlation of the pairs is at least this …
MIN_RANK_CORRELATION = 0.5
#: … computed only from this many (probe) pairs on; with fewer the verdict rests on the ratio alone
MIN_PAIRS_FOR_CORRELATION = 5
#: … and only when the sharpness moved: max/min over the pairs at least this (a constant sharpness,
#: e.g. on a quadratic, has no co-movement to correlate with; the ratio alone decides there)
MIN_SHARPNESS_RANGE = 1.5
#: fewer pairs than this: the smoothness/sharpness comparison is "not measured"
MIN_PAIRS = 3
#: the ratio smoothness/sharpness within [1/FACTOR, FACTOR] counts as "the same scale"
SCALE_FACTOR = 2.0
#: the random-scaling identity (audit eq. 12) is rejected when the mean paired difference
#: update_corr_rs − loss_diff is more than this many standard errors from 0
RS_Z = 2.0

HOLDS, DEGRADED, FAILS, NOT_MEASURED = "holds", "holds with degradation", "fails", "not measured"
VERDICTS = (HOLDS, DEGRADED, FAILS, NOT_MEASURED)


class AuditError(ValueError):
    """Bad input to an audit (unknown run, no store, bad checkpoint data): the message says what."""


# --- data ------------------------------------------------------------------------------------------


@dataclass
class RunData:
    """What the audit reads of one run: its series (``metric -> (steps, values)``), config and
    decisions. ``from_store`` reads a ``moxco.collector.store.Store``; tests build it directly."""

    name: str
    series: Dict[str, Tuple[np.ndarray, np.ndarray]]
    config: Dict[str, Any] = field(default_factory=dict)
    status: str = "unknown"
    decisions: List[Dict[str, Any]] = field(default_factory=list)
    source: str = ""

    @classmethod
    def from_store(cls, store, name: str) -> "RunData":
        info = store.run(name)
        series = {metric: store.series(name, metric) for metric in store.metrics(name)}
        return cls(name=name, series=series, config=dict(info.config), status=info.status,
                   decisions=[d.to_json() for d in store.decisions(name)], source=str(getattr(store, "url", "")))

    def get(self, metric: str) -> Tuple[np.ndarray, np.ndarray]:
        steps, values = self.series.get(metric, (np.zeros(0, np.int64), np.zeros(0)))
        return np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=np.float64)

    def finite(self, metric: str) -> Tuple[np.ndarray, np.ndarray]:
        steps, values = self.get(metric)
        keep = np.isfinite(values)
        return steps[keep], values[keep]

    def has(self, metric: str) -> bool:
        return self.get(metric)[0].size > 0

    def last(self, metric: str) -> float:
        """The newest finite value (NaN when there is none)."""
        _, values = self.finite(metric)
        return float(values[-1]) if values.size else math.nan

    def dtype(self, override: Optional[str] = None) -> str:
        dtype = override or self.config.get("dtype") or DEFAULT_DTYPE
        dtype = str(dtype).replace("torch.", "")
        if dtype not in DTYPE_EPS:
            raise AuditError(f"unknown dtype {dtype!r}; one of {sorted(DTYPE_EPS)}")
        return dtype


# --- results ---------------------------------------------------------------------------------------


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
    key: str
    title: str
    paper: str
    verdict: str
    K: Optional[float] = None
    reading: str = ""
    enable: str = ""
    numbers: Dict[str, Any] = field(default_factory=dict)
    plots: List[Plot] = field(default_factory=list)
    extra_verdicts: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")

    @property
    def verdict_line(self) -> str:
        return verdict_line(self.verdict, self.K, self.enable)

    def to_json(self) -> Dict[str, Any]:
        return {"title": self.title, "paper": self.paper, "verdict": self.verdict, "K": _json_number(self.K),
                "verdict_line": self.verdict_line, "reading": self.reading,
                "numbers": {k: _json_value(v) for k, v in self.numbers.items()},
                "extra_verdicts": {k: {kk: _json_value(vv) for kk, vv in v.items()} for k, v in self.extra_verdicts.items()},
                "plots": [p.key for p in self.plots]}


def verdict_line(verdict: str, K: Optional[float], enable: str = "") -> str:
    if verdict == DEGRADED:
        return f"holds with degradation K = {K:.3g} (bounds {1.0 / K:.3g}x looser)"
    if verdict == NOT_MEASURED and enable:
        return f"not measured ({enable})"
    return verdict


def _json_number(value: Any) -> Any:
    if value is None:
        return None
    value = float(value)
    if math.isnan(value):
        return None
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def _json_value(value: Any) -> Any:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return _json_number(value)
    if isinstance(value, Mapping):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_json_value(v) for v in value]
    return value


# --- statistics --------------------------------------------------------------------------------


def mean_and_standard_error(values: np.ndarray) -> Tuple[float, float]:
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return math.nan, math.nan
    mean = float(values.mean())
    se = float(values.std(ddof=1) / math.sqrt(values.size)) if values.size > 1 else math.nan
    return mean, se


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(values.size, dtype=np.float64)
    sorted_values = values[order]
    i = 0
    while i < values.size:
        j = i
        while j + 1 < values.size and sorted_values[j + 1] == sorted_values[i]:
            j += 1
        ranks[order[i : j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return ranks


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's ρ: the Pearson correlation of the ranks (NaN when either side is constant)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size < 2:
        return math.nan
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denominator) if denominator > 0 else math.nan


def aligned(run: RunData, *metrics: str) -> Tuple[np.ndarray, List[np.ndarray]]:
    """The steps at which every one of ``metrics`` has a finite value, and the values there."""
    pairs = [run.finite(m) for m in metrics]
    common = pairs[0][0]
    for steps, _ in pairs[1:]:
        common = np.intersect1d(common, steps)
    return common, [values[np.searchsorted(steps, common)] for steps, values in pairs]


# --- 1. convexity along the path (audit §3.1, eq. 2-3, fig. 2) -----------------------------------


def gap_tolerance(run: RunData, steps: np.ndarray, gaps: np.ndarray, *, dtype: Optional[str] = None,
                  factor: float = TOLERANCE_FACTOR) -> np.ndarray:
    """Per-step float-error scale of ``inst_gap``: ``factor · ε · (|f(x_t)| + |f(x_{t−1})| + |⟨g_t, d_t⟩|)``.

    ``inst_gap`` is the difference of three computed quantities; each carries a rounding error of
    order ε times its own magnitude (the losses are reductions computed in the model's dtype, the
    inner product is accumulated in float64 from gradients in that dtype). Where ``loss`` or
    ``loss_diff`` is missing at a step, the terms that need it count as 0 and ``|inst_gap|`` is
    used for the inner product.
    """
    eps = DTYPE_EPS[run.dtype(dtype)]
    loss_steps, losses = run.get("loss")
    diff_steps, diffs = run.get("loss_diff")
    loss_at = _lookup(loss_steps, losses, steps)
    diff_at = _lookup(diff_steps, diffs, steps)
    loss_prev = loss_at - diff_at
    inner = np.where(np.isfinite(diff_at), diff_at - gaps, np.abs(gaps))
    scale = np.nan_to_num(np.abs(loss_at)) + np.nan_to_num(np.abs(loss_prev)) + np.nan_to_num(np.abs(inner))
    return factor * eps * scale


def _lookup(steps: np.ndarray, values: np.ndarray, at: np.ndarray) -> np.ndarray:
    out = np.full(at.shape, np.nan)
    if steps.size == 0:
        return out
    index = np.clip(np.searchsorted(steps, at), 0, steps.size - 1)
    hit = steps[index] == at
    out[hit] = values[index[hit]]
    return out


def audit_path_convexity(run: RunData, *, dtype: Optional[str] = None, factor: float = TOLERANCE_FACTOR) -> Section:
    section = Section("path_convexity", "Convexity along the path", "audit §3.1, eq. 2-3, fig. 1-2", NOT_MEASURED,
                      enable="the re-evaluation at x_{t-1}: attach(..., reeval_every=N) with N > 0")
    steps, gaps = run.finite("inst_gap")
    if steps.size == 0:
        section.reading = "no inst_gap points are stored for this run."
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
        "dtype": run.dtype(dtype), "tolerance_factor": factor, "median_tolerance": float(np.median(tol)),
        "first_nonconvex_step": int(steps[nonconvex][0]) if n_pos else None,
    }
    if n_pos == 0:
        section.verdict = HOLDS
        section.reading = (f"inst_gap ≤ its float-error tolerance at all {n} measured steps: the loss is convex "
                           "along every measured step, as convexity requires (fig. 1).")
    else:
        section.verdict = FAILS
        average = ("convex on average (final avg_gap = {:.3g} ≤ 0: the averaged identity that stochastic analyses "
                   "sum still holds, the paper's 'mostly convex' path)".format(avg_gap) if avg_gap <= 0 else
                   "not even on average (final avg_gap = {:.3g} > 0)".format(avg_gap)) if not math.isnan(avg_gap) else \
            "avg_gap not stored"
        section.reading = (f"inst_gap > tolerance at {n_pos} of {n} measured steps ({100 * n_pos / n:.3g} %, first at "
                           f"step {section.numbers['first_nonconvex_step']}, max {gaps.max():.3g}): any positive gap "
                           f"falsifies convexity along the path; {average}.")
    avg_steps, avg_values = run.get("avg_gap")
    exp_steps, exp_values = run.get("exp_gap")
    section.plots.append(Plot("path_convexity", "inst_gap, avg_gap, exp_gap (w.r.t. x_{t-1})", "gaps", {
        "inst_steps": steps, "inst": gaps, "tolerance": tol, "avg_steps": avg_steps, "avg": avg_values,
        "exp_steps": exp_steps, "exp": exp_values},
        caption="Dots: inst_gap per measured step (red above the float-error tolerance, the grey band); "
                "lines: the running mean avg_gap and EMA exp_gap (β = 0.99). Symmetric log scale."))
    return section


# --- 2. global convexity (audit §3.2, eq. 6-7, fig. 3) --------------------------------------------


def audit_global_convexity(run: RunData) -> Section:
    section = Section("global_convexity", "Global convexity (convexity ratio)", "audit §3.2, eq. 6-7, fig. 3",
                      NOT_MEASURED, enable="a reference x*: attach(..., reference=x_star) and probe_every > 0, "
                      "or moxco audit --checkpoints DIR --reference FINAL.pt --data ...")
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
        section.reading = ("no convexity_ratio points are stored for this run." if steps.size == 0 else
                           "the convexity ratio is undefined at every probe (Σ (F(x_t) − F(x*)) = 0 and the "
                           "numerator too).")
        return section
    r_steps, r = steps[finite], ratios[finite]
    ratio = float(r[-1])
    probes = int(steps.size)
    section.numbers.update({"convexity_ratio": ratio, "probes": probes, "final_step": int(r_steps[-1]),
                            "min_running_ratio": float(r.min()), "max_running_ratio": float(r.max()),
                            "reading": interpret_convexity_ratio(ratio)})
    if ratio > 1.0:
        section.verdict = HOLDS
        section.reading = (f"convexity_ratio = {ratio:.3g} > 1 over {probes} probes: Σ F(x_t) − F(x*) ≤ Σ ⟨∇F(x_t), "
                           "x_t − x*⟩ (eq. 7), the inequality convex analyses bound, holds along this run "
                           f"({interpret_convexity_ratio(ratio)}).")
    elif ratio > 0.0:
        section.verdict, section.K = DEGRADED, ratio
        section.numbers["K"] = ratio
        section.numbers["K_sqrt_T"] = ratio * math.sqrt(probes)
        section.reading = (f"convexity_ratio = {ratio:.3g} ∈ (0, 1]: eq. 7 holds with the factor 1/K = {1 / ratio:.3g} "
                           f"({interpret_convexity_ratio(ratio)}); the convex convergence bound O(1/√T) becomes "
                           f"O(1/(K√T)), still vanishing while K ≥ Ω(1/√T) (here K√T = {ratio * math.sqrt(probes):.3g} "
                           f"with T = {probes} probes).")
    else:
        section.verdict = FAILS
        section.reading = (f"convexity_ratio = {ratio:.3g} ≤ 0: the iterates' gradients point away from x* on "
                           "balance, so no convexity-based bound applies (strongly non-convex, as the paper "
                           "reports for GPT-2 and ImageNet).")
    section.plots.append(Plot("global_convexity", "convexity_ratio (running, w.r.t. x*)", "ratio",
                              {"steps": r_steps, "ratio": r},
                              caption="The running ratio Σ⟨∇F(x_t), x_t − x*⟩ / Σ(F(x_t) − F(x*)) at each probe. "
                                      "Green: > 1 (convex-like); amber: (0, 1] (convex analysis with a 1/K "
                                      "degradation); red: ≤ 0 (strongly non-convex)."))
    return section


# --- 3. smoothness and sharpness (audit §4, §4.1, fig. 4-5) ---------------------------------------


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


def audit_smoothness(run: RunData) -> Section:
    section = Section("smoothness", "Smoothness and sharpness", "audit §4, §4.1, eq. 4-5, fig. 4-5", NOT_MEASURED,
                      enable="both the re-evaluation (reeval_every > 0: inst_smooth, max_smooth, exp_smooth) and "
                             f"probes (probe_every > 0: sharpness), at least {MIN_PAIRS} probes")
    smooth_steps, smooth = run.finite("inst_smooth")
    sharp_steps, sharp = run.finite("sharpness")
    section.numbers.update({"final_max_smooth": run.last("max_smooth"), "final_exp_smooth": run.last("exp_smooth"),
                            "median_inst_smooth": float(np.median(smooth)) if smooth.size else math.nan,
                            "smooth_steps": int(smooth.size), "sharpness_probes": int(sharp.size),
                            "final_sharpness": float(sharp[-1]) if sharp.size else math.nan})
    if smooth.size:
        half = smooth.size // 2
        if half:
            # bounded? the largest inst_smooth of the second half against the first half's
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
        section.reading = (f"{n} probe(s) with both a positive sharpness and inst_smooth in the interval before it; "
                           f"the comparison needs at least {MIN_PAIRS}.")
        return section
    ratios = use["smooth"] / use["sharpness"]
    scale = float(np.median(ratios))
    rho = rank_correlation(use["smooth"], use["sharpness"]) if n >= MIN_PAIRS_FOR_CORRELATION else math.nan
    K = min(scale, 1.0 / scale)
    section.numbers.update({"median_smooth_over_sharpness": scale, "rank_correlation": rho,
                            "pearson_log_correlation": _pearson(np.log(use["smooth"]), np.log(use["sharpness"])),
                            "K": K})
    sharpness_range = float(use["sharpness"].max() / use["sharpness"].min())
    section.numbers["sharpness_range"] = sharpness_range
    judged = n >= MIN_PAIRS_FOR_CORRELATION and sharpness_range >= MIN_SHARPNESS_RANGE
    tracks = not judged or (not math.isnan(rho) and rho >= MIN_RANK_CORRELATION)
    if math.isnan(rho):
        corr_text = (f"{n} probes (correlation not computed below {MIN_PAIRS_FOR_CORRELATION}; the ratio decides)")
    elif not judged:
        corr_text = (f"rank correlation ρ = {rho:.3g} over {n} probes, not judged: the sharpness moved by a factor "
                     f"{sharpness_range:.3g} < {MIN_SHARPNESS_RANGE:g}, so the ratio decides")
    else:
        corr_text = f"rank correlation ρ = {rho:.3g} over {n} probes (sharpness range ×{sharpness_range:.3g})"
    if not tracks:
        section.verdict = FAILS
        section.reading = (f"{corr_text} < {MIN_RANK_CORRELATION}: the smoothness measure does not track the "
                           f"sharpness here (median ratio {scale:.3g}), so it is no proxy for it on this run.")
    elif 1.0 / SCALE_FACTOR <= scale <= SCALE_FACTOR:
        section.verdict = HOLDS
        section.reading = (f"{corr_text}, median inst_smooth/sharpness = {scale:.3g} ∈ [1/{SCALE_FACTOR:g}, "
                           f"{SCALE_FACTOR:g}]: the smoothness measure tracks the sharpness at its scale (fig. 5); "
                           f"the largest measured local smoothness is max_smooth = {run.last('max_smooth'):.3g}.")
    else:
        section.verdict, section.K = DEGRADED, K
        section.reading = (f"{corr_text}: it moves with the sharpness but at {scale:.3g} times its value, a proxy "
                           f"up to the factor 1/K = {1 / K:.3g}; max_smooth = {run.last('max_smooth'):.3g}.")
    section.plots.append(Plot("smoothness_vs_sharpness", "interval-median inst_smooth vs sharpness", "pairs",
                              {"smooth": use["smooth"], "sharpness": use["sharpness"], "steps": use["steps"]},
                              caption="One point per probe (colour: step); the line is smoothness = sharpness, "
                                      f"the band the factor-{SCALE_FACTOR:g} range counted as the same scale."))
    return section


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


# --- 4. the descent-lemma analysis (audit §4.2-4.3, eq. 8-13, fig. 6-8) --------------------------


def audit_descent(run: RunData) -> Section:
    section = Section("descent_lemma", "Descent lemma (update correlation)", "audit §4.2-4.3, eq. 8-13, fig. 6-8",
                      NOT_MEASURED, enable="recorded at every step after the first by the agent's free metrics")
    steps, corr = run.finite("update_corr")
    if steps.size == 0:
        section.reading = "no update_corr points are stored for this run."
        return section
    mean, se = mean_and_standard_error(corr)
    z = mean / se if se and not math.isnan(se) and se > 0 else math.nan
    section.numbers.update({"steps": int(steps.size), "mean_update_corr": mean, "standard_error": se,
                            "mean_over_standard_error": z, "fraction_negative": float((corr < 0).mean()),
                            "median_update_corr": float(np.median(corr)), "sum_update_corr": float(corr.sum())})
    significance = ("" if math.isnan(z) else
                    f" ({abs(z):.3g} standard errors from 0{'' if abs(z) >= RS_Z else '; the sign is not significant at 2 SE'})")
    if mean < 0:
        section.verdict = HOLDS
        section.reading = (f"mean update_corr = {mean:.3g} < 0{significance}, negative at {100 * (corr < 0).mean():.3g} % "
                           "of steps: the gradient at the new point opposes the step on average, the decrease the "
                           "descent lemma (eq. 8) credits for progress.")
    else:
        section.verdict = FAILS
        section.reading = (f"mean update_corr = {mean:.3g} ≥ 0{significance}: on average the new gradient points along "
                           "the step, so the smooth non-convex analysis (eq. 8-11) predicts no decrease, yet the "
                           "optimizer may still make progress (the paper finds this in almost every deep-learning run).")
    # eq. 12-13: with random scaling, update_corr_rs is an unbiased estimate of the progress loss_diff
    random_scaling = bool(run.config.get("random_scaling", False))
    common, (rs, ld, uc) = aligned(run, "update_corr_rs", "loss_diff", "update_corr")
    rs_numbers: Dict[str, Any] = {"random_scaling": random_scaling, "common_steps": int(common.size)}
    if common.size:
        diff_mean, diff_se = mean_and_standard_error(rs - ld)
        rs_numbers.update({"sum_update_corr_rs": float(rs.sum()), "sum_loss_diff": float(ld.sum()),
                           "sum_update_corr": float(uc.sum()), "mean_difference": diff_mean,
                           "difference_standard_error": diff_se})
        section.plots.append(Plot("descent_cumsum", "cumulative sums: update_corr, update_corr_rs, loss_diff", "cumsum",
                                  {"steps": common, "update_corr": np.cumsum(uc), "update_corr_rs": np.cumsum(rs),
                                   "loss_diff": np.cumsum(ld)},
                                  caption=f"Cumulative sums over the {common.size} steps where all three are measured "
                                          "(fig. 8; symmetric log scale). With random scaling the sum of "
                                          "update_corr_rs should follow the sum of loss_diff (eq. 12)."))
    if not random_scaling:
        rs_numbers.update({"verdict": NOT_MEASURED, "verdict_line": verdict_line(
            NOT_MEASURED, None, "applies to runs with random scaling: attach(..., random_scaling=True)")})
    elif common.size < 2:
        rs_numbers.update({"verdict": NOT_MEASURED, "verdict_line": verdict_line(
            NOT_MEASURED, None, "needs loss_diff: reeval_every > 0")})
    else:
        zd = rs_numbers["mean_difference"] / rs_numbers["difference_standard_error"] \
            if rs_numbers["difference_standard_error"] > 0 else math.inf
        rs_numbers["difference_z"] = zd
        rs_numbers["verdict"] = HOLDS if abs(zd) <= RS_Z else FAILS
        rs_numbers["verdict_line"] = rs_numbers["verdict"]
    section.extra_verdicts["random_scaling_identity"] = rs_numbers
    section.plots.insert(0, Plot("update_corr", "update_corr per step and its running mean", "corr",
                                 {"steps": steps, "corr": corr},
                                 caption="update_corr = ⟨∇f(x_{t+1}, z_{t+1}), x_{t+1} − x_t⟩ (faint) and its running "
                                         "mean (thick), as in fig. 6-7; symmetric log scale."))
    return section


# --- 5. MoXCo: goodness, terms, phase, decisions (MoXCo eq. 6, Algorithm 1) -----------------------


def _policy(run: RunData) -> PolicyConfig:
    stored = run.config.get("policy") or {}
    known = {k: stored[k] for k in ("threshold", "min_step", "consecutive", "cooldown", "max_decisions") if k in stored}
    try:
        return PolicyConfig(**known)
    except (TypeError, ValueError):
        return PolicyConfig()


def audit_moxco(run: RunData) -> Section:
    section = Section("moxco", "MoXCo goodness, phase and decisions", "MoXCo eq. 6, Algorithm 1, Theorem 1-2",
                      NOT_MEASURED, enable="probes (probe_every > 0) and a sharpness target (the optimizer's lr or "
                                           "goodness={'sharpness_target': ...})")
    steps, score = run.finite("goodness")
    policy = _policy(run)
    decisions = run.decisions
    section.numbers["threshold"] = policy.threshold
    section.numbers["consecutive"] = policy.consecutive
    section.numbers["decisions"] = [{"step": d.get("step"), "goodness": d.get("goodness"), "source": d.get("source"),
                                     "applied_step": d.get("applied_step"), "action": d.get("action")} for d in decisions]
    phase_steps, phases = run.finite("phase")
    section.numbers["final_phase"] = int(phases[-1]) if phases.size else None
    timing = section.numbers["decision_timing"] = reproducibility(run.config, decisions)
    if steps.size == 0:
        section.reading = "no goodness points are stored for this run." + _timing_sentence(timing)
        return section
    above = score >= policy.threshold
    longest = current = 0
    for flag in above:
        current = current + 1 if flag else 0
        longest = max(longest, current)
    terms = {}
    for name in ("goodness_grad_term", "goodness_sharpness_term", "goodness_loss_term"):
        _, values = run.finite(name)
        terms[name] = float(values.mean()) if values.size else math.nan
    known_terms = {k: v for k, v in terms.items() if not math.isnan(v)}
    dominant = max(known_terms, key=known_terms.get) if known_terms else None
    section.numbers.update({"probes": int(steps.size), "max_goodness": float(score.max()),
                            "step_of_max": int(steps[int(np.argmax(score))]), "final_goodness": float(score[-1]),
                            "probes_above_threshold": int(above.sum()), "longest_run_above_threshold": longest,
                            "mean_terms": terms, "dominant_term": dominant})
    met = bool(decisions) or longest >= policy.consecutive
    first = decisions[0] if decisions else None
    if met:
        section.verdict = HOLDS
        where = (f"the policy decided at step {first['step']} (goodness {first['goodness']:.3g}"
                 + (f", applied at step {first['applied_step']})" if first.get("applied_step") is not None else ", not acknowledged)")
                 if first else f"goodness ≥ C on {longest} consecutive probes (no decision stored)")
        section.reading = (f"the run reached what MoXCo scores as a stable basin: goodness ≥ C = {policy.threshold:g} on "
                           f"{policy.consecutive} consecutive probes; {where}.")
    else:
        section.verdict = FAILS
        section.reading = (f"goodness stayed below the commit criterion (max {score.max():.3g} at step "
                           f"{section.numbers['step_of_max']}, C = {policy.threshold:g} on {policy.consecutive} "
                           f"consecutive probes); the largest mean term, the one keeping it low, is "
                           f"{(dominant or 'unknown').replace('goodness_', '')}.")
    section.plots.append(Plot("moxco", "goodness, its three terms, phase and decisions", "moxco", {
        "steps": steps, "goodness": score, "threshold": policy.threshold,
        "terms": {name: run.get(name) for name in ("goodness_grad_term", "goodness_sharpness_term", "goodness_loss_term")},
        "phase_steps": phase_steps, "phase": phases, "decisions": [d.get("step") for d in decisions]},
        caption="Top: goodness G = exp(−τ[terms]) with the threshold C (dashed) and decisions (vertical lines); "
                "bottom: the three bracketed terms (log scale) and the phase."))
    section.reading += _timing_sentence(timing)
    return section


def _timing_sentence(timing: Dict[str, Any]) -> str:
    """One sentence: whether a rerun with the same seed applies the decisions at the same steps
    (``moxco.decision.reproducibility``)."""
    verdict = "reproducible" if timing["reproducible"] else "not reproducible"
    return f" Decision timing is {verdict} with the same seed: {timing['reason']}."


# --- the whole audit ------------------------------------------------------------------------------

SECTIONS = ("path_convexity", "global_convexity", "smoothness", "descent_lemma", "moxco")


@dataclass
class RunAudit:
    run: RunData
    sections: List[Section]
    overview: Dict[str, Any]
    plots: List[Plot]

    def section(self, key: str) -> Section:
        for s in self.sections:
            if s.key == key:
                return s
        raise KeyError(key)

    def to_json(self) -> Dict[str, Any]:
        return {"run": self.run.name, "status": self.run.status, "source": self.run.source,
                "config": _json_value(self.run.config), "overview": _json_value(self.overview),
                "sections": {s.key: s.to_json() for s in self.sections},
                "verdicts": {s.key: s.verdict_line for s in self.sections},
                "plots": [p.key for p in self.all_plots()]}

    def all_plots(self) -> List[Plot]:
        return list(self.plots) + [p for s in self.sections for p in s.plots]


def audit(run: RunData, *, dtype: Optional[str] = None, tolerance_factor: float = TOLERANCE_FACTOR) -> RunAudit:
    """Every section of the audit of one run."""
    loss_steps, losses = run.get("loss")
    overview = {"steps": int(loss_steps.size), "first_step": int(loss_steps[0]) if loss_steps.size else None,
                "last_step": int(loss_steps[-1]) if loss_steps.size else None,
                "first_loss": float(losses[0]) if losses.size else math.nan,
                "last_loss": float(losses[-1]) if losses.size else math.nan,
                "metrics": sorted(run.series)}
    plots = []
    if loss_steps.size:
        plots.append(Plot("loss", "training loss f(x_t, z_t)", "loss", {"steps": loss_steps, "loss": losses},
                          caption="The minibatch loss at every step."))
    sections = [audit_path_convexity(run, dtype=dtype, factor=tolerance_factor), audit_global_convexity(run),
                audit_smoothness(run), audit_descent(run), audit_moxco(run)]
    return RunAudit(run, sections, overview, plots)
