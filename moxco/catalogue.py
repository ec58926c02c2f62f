"""The metric catalogue: one entry per metric moxco stores, and everything derived from it.

A metric's name is the public contract (storage, the query API, Prometheus, dashboards). Its entry
says which group computes it and on what cadence, what it needs (a gradient, the step's loss, a
replay, a Hessian-vector product, a reference point), what it means, its formula and paper, and the
panel it is drawn in. Everything else is derived from here, never written twice:

* the agent's lists (which metrics a step with an unknown gradient or a missing loss leaves out);
* the goodness terms and the optimizer-state metrics;
* Prometheus HELP text (``help_text``);
* the built-in run page's sections (``to_json``, served by the collector) and the Grafana panels;
* the metrics tables of README and docs/metrics.md (``markdown_table``; ``python -m
  moxco.catalogue --write`` writes them, a test checks they are current).

Adding a metric: one ``Metric(...)`` entry here and its formula where its group computes it.
Metrics not in the catalogue (a user's ``agent.log({...})`` series) are stored and served like the
others, under the ``user`` group.

Pure data: imports nothing but the standard library, so the collector and ``moxco --help`` can
read it without torch.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

# --- groups ----------------------------------------------------------------------------------------

# group → (what it is, what a run needs for the group to produce points: the run page says it
# under an empty panel)
GROUPS: Dict[str, Tuple[str, str]] = {
    "free": ("every step, at no extra pass: dot products over the parameters, the step's loss, learning rate, "
             "time and throughput", ""),
    "reeval": ("one extra forward+backward at x_{t−1} on the step's batch, every reeval_every steps",
               "needs reeval_every > 0"),
    "reference": ("the same replay at a reference point x*, and the convexity ratio on the probe cadence",
                  "needs a reference point: attach(..., reference=state_dict or checkpoint path)"),
    "probe": ("on the probe cadence: Hessian-vector products on the probe batch",
              "needs probe_every > 0"),
    "goodness": ("the MoXCo goodness score and its terms, on the probe cadence",
                 "needs probe_every > 0 and a sharpness target (the optimizer's lr, or goodness={'sharpness_target': …})"),
    "optimizer": ("the moxco.optim optimizers' own state, on the probe cadence",
                  "needs a moxco.optim optimizer (MoXCo, HypergradientSGD, …)"),
    "user": ("series the user logs with agent.log({...})", "needs agent.log({...})"),
}

# what a metric can need from the step (Metric.needs)
NEEDS = ("gradient", "loss", "replay", "hvp", "reference", "clock")


@dataclass(frozen=True)
class Metric:
    """One stored metric.

    ``needs``: ``gradient`` (g_t: left out on a step whose raw gradient cannot be recovered),
    ``loss`` (the step's loss: left out when the agent cannot find it), ``replay`` (an extra
    forward+backward), ``hvp`` (Hessian-vector products), ``reference`` (a reference point x*),
    ``clock`` (the wall clock: two runs of one seed differ in it).
    ``panel``: the id of the ``Panel`` it is drawn in (``""``: not drawn). ``label``, ``color``,
    ``dash``: how it is drawn there. ``stored_at``: when the step it is stored at is not the step it
    describes, which step that is. ``requires``: what a run needs for it to have points, where that is
    more than its group's requirement (e.g. an Adam-family optimizer).
    """

    name: str
    group: str
    meaning: str
    formula: str = ""
    paper: str = ""
    needs: Tuple[str, ...] = ()
    unit: str = ""
    panel: str = ""
    label: str = ""
    color: str = ""
    dash: Tuple[int, ...] = ()
    stored_at: str = ""
    reading: str = ""
    requires: str = ""  # what a run needs for it, where more than its group needs

    def __post_init__(self) -> None:
        if self.group not in GROUPS:
            raise ValueError(f"{self.name}: unknown group {self.group!r}")
        unknown = set(self.needs) - set(NEEDS)
        if unknown:
            raise ValueError(f"{self.name}: unknown needs {sorted(unknown)}")


@dataclass(frozen=True)
class Panel:
    """A chart on the run page and in Grafana's live dashboard: the metrics whose ``panel`` is ``id``.

    ``log``: symmetric log axis. ``stepped``: the values change in steps (phase, optimizer state).
    ``value_range``: fixed y range. ``threshold``: draw the run's goodness threshold C. ``refs``:
    fixed reference lines ``(value, label, color)``. ``wide``: the full width of the page.
    ``grafana_unit``: Grafana's unit id."""

    id: str
    section: str
    title: str
    help: str
    log: bool = False
    stepped: bool = False
    value_range: Optional[Tuple[float, float]] = None
    threshold: bool = False
    refs: Tuple[Tuple[float, str, str], ...] = ()
    wide: bool = False
    phase: bool = False
    grafana_unit: str = "short"


SECTIONS: Tuple[Tuple[str, str], ...] = (
    ("training", "Training"),
    ("moxco", "MoXCo: sharpness, goodness, phase"),
    ("audit", "Audit: convexity and smoothness along the path"),
)

RED, GREEN = "#dc2626", "#16a34a"

PANELS: Tuple[Panel, ...] = (
    Panel("loss", "training", "Loss", "Minibatch loss f(x_t, z_t)."),
    Panel("step_time", "training", "Step time", "Wall time from one optimizer step to the next: forward, backward, "
          "the update, data loading and the agent's own work.", grafana_unit="s"),
    Panel("throughput", "training", "Throughput", "Samples (and tokens, when the batch has token ids) per second "
          "of step time.", grafana_unit="none"),
    Panel("grad_norm_sq", "training", "Squared gradient norm",
          "‖g_t‖², the raw minibatch value (biased up by gradient noise; goodness uses the ALIGATOR estimate).",
          log=True),
    Panel("update", "training", "Update norm and distance",
          "‖x_{t+1} − x_t‖ and how far the run has travelled, ‖x_t − x_0‖.", log=True),
    Panel("sharpness", "moxco", "Sharpness vs λ_target (EOS)",
          "Top Hessian eigenvalue λ̂ (the algebraic λ_max) against the target k·λ_EOS, λ_EOS = 2(1+α)/(η(1+2β)) "
          "(dashed); λ_min, the most negative eigenvalue, where a probe has it (below 0: negative curvature).",
          wide=True),
    Panel("sharpness_precond", "moxco", "Preconditioned sharpness vs adaptive EOS",
          "Adam-family runs: λ_max(P⁻¹H), P = diag(√v̂ + ε) from the optimizer's second moments, against the "
          "adaptive edge of stability 2(1+β₁)/((1−β₁)η) (dashed; 38/η for β₁ = 0.9), where Adam equilibrates "
          "(Cohen et al. 2022).", log=True),
    Panel("hessian_trace", "moxco", "Hessian trace",
          "tr(∇²f), Hutchinson's estimate (opt-in): the sum of all curvatures, the mean curvature times the "
          "parameter count.", log=True),
    Panel("goodness", "moxco", "Goodness vs threshold C",
          "MoXCo goodness score in [0, 1]; the policy decides when it stays at or above C (dashed) for "
          "`consecutive` probes.", value_range=(0.0, 1.0), threshold=True, grafana_unit="none"),
    Panel("goodness_terms", "moxco", "Goodness terms",
          "The three bracketed terms of eq. 6; goodness = exp(−τ · their sum).", log=True),
    Panel("phase", "moxco", "Phase", "1 explore, 2 commit (after a decision is applied).", stepped=True,
          phase=True, value_range=(1.0, 2.0), grafana_unit="none"),
    Panel("optimizer", "moxco", "Optimizer state",
          "The moxco.optim optimizer's lr, α and β (they change when a decision is applied).", log=True,
          stepped=True),
    Panel("gap", "audit", "Convexity gap",
          "inst_gap = f(x_t) − f(x_{t−1}) − ⟨g_t, x_t − x_{t−1}⟩ (≤ 0 when convex along the step), its running "
          "mean and EMA.", log=True),
    Panel("smoothness", "audit", "Smoothness",
          "inst_smooth = ‖g_t − ∇f(x_{t−1})‖ / ‖x_t − x_{t−1}‖, its running max and EMA.", log=True),
    Panel("reference", "audit", "Against the reference x*",
          "inst_gap_ref = f(x_t) − f(x*) − ⟨g_t, x_t − x*⟩ (≤ 0 when f is convex between x_t and x*) and "
          "inst_smooth_ref = ‖g_t − ∇f(x*)‖ / ‖x_t − x*‖, on the step's batch.", log=True),
    Panel("update_corr", "audit", "Update correlation and progress",
          "update_corr = ⟨g_{t+1}, x_{t+1} − x_t⟩ (the descent lemma predicts < 0), update_corr_rs = "
          "⟨g_{t+1}, Δ_t⟩, and loss_diff.", log=True),
    Panel("update_cos", "audit", "Update cosine",
          "update_cos = ⟨g_{t+1}, x_{t+1} − x_t⟩ / (‖g_{t+1}‖ ‖x_{t+1} − x_t‖): update_corr without its scale, "
          "in [−1, 1]; < 0 when the step went downhill of the next gradient.", value_range=(-1.0, 1.0),
          refs=((0.0, "0", "#6b7280"),)),
    Panel("convexity_ratio", "audit", "Convexity ratio",
          "Σ⟨∇F(x_t), x_t − x*⟩ / Σ(F(x_t) − F(x*)): > 1 convex-like, (0, 1] convex analysis applies with a "
          "1/K slow-down, ≤ 0 strongly non-convex. Needs a reference x*.",
          refs=((1.0, "1", GREEN), (0.0, "0", RED)), grafana_unit="none"),
)

METRICS: Tuple[Metric, ...] = (
    # --- free: every step ---
    Metric("loss", "free", "minibatch loss", "f(x_t, z_t)", needs=("loss",), panel="loss", label="loss"),
    Metric("grad_norm_sq", "free", "squared norm of the raw minibatch gradient", "‖g_t‖²", "MoXCo eq. 6",
           needs=("gradient",), panel="grad_norm_sq", label="‖g‖²",
           reading="raw minibatch value: biased up by the gradient noise (see GradNormSqEstimator)"),
    Metric("update_norm", "free", "length of the step taken", "‖x_{t+1} − x_t‖", panel="update",
           label="update ‖Δx‖"),
    Metric("distance", "free", "how far the run has travelled from its start", "‖x_t − x_0‖", "Adam+CM fig. 8",
           panel="update", label="distance ‖x − x₀‖"),
    Metric("update_corr", "free", "correlation of the next gradient with the step", "⟨g_{t+1}, x_{t+1} − x_t⟩",
           "audit eq. 9", needs=("gradient",), panel="update_corr", label="update_corr", stored_at="step t+1",
           reading="the descent lemma predicts < 0 on average"),
    Metric("update_corr_rs", "free", "the same with the unscaled update", "⟨g_{t+1}, Δ_t⟩", "audit eq. 13",
           needs=("gradient",), panel="update_corr", label="update_corr_rs", dash=(4, 3), stored_at="step t+1",
           reading="with random scaling, an unbiased estimate of F(x_{t+1}) − F(x_t) (eq. 12); equals "
                   "update_corr without it"),
    Metric("update_cos", "free", "cosine of the next gradient with the step",
           "⟨g_{t+1}, x_{t+1} − x_t⟩ / (‖g_{t+1}‖ ‖x_{t+1} − x_t‖)", "audit eq. 9, normalised", needs=("gradient",),
           panel="update_cos", label="update_cos", stored_at="step t+1",
           reading="update_corr without the gradient's and the step's scale: comparable across runs, phases and "
                   "learning rates; NaN when the gradient or the step is zero"),
    # --- reeval: a replay at x_{t-1} on z_t ---
    Metric("loss_diff", "reeval", "progress on the same batch", "f(x_t, z_t) − f(x_{t−1}, z_t)", "audit eq. 13",
           needs=("loss", "replay"), panel="update_corr", label="loss_diff"),
    Metric("inst_gap", "reeval", "instantaneous convexity gap",
           "f(x_t,z_t) − f(x_{t−1},z_t) − ⟨g_t, x_t − x_{t−1}⟩", "audit eq. 2",
           needs=("loss", "gradient", "replay"), panel="gap", label="inst_gap",
           reading="≤ 0 when f is convex along the step; −½dᵀAd on a quadratic"),
    Metric("inst_smooth", "reeval", "instantaneous smoothness", "‖g_t − ∇f(x_{t−1},z_t)‖ / ‖x_t − x_{t−1}‖",
           "audit eq. 4", needs=("loss", "gradient", "replay"), panel="smoothness", label="inst_smooth",
           reading="≤ L when f is L-smooth"),
    Metric("avg_gap", "reeval", "running mean of inst_gap (reset per epoch if epochs exist)", "mean of inst_gap",
           "audit eq. 3", needs=("loss", "gradient", "replay"), panel="gap", label="avg_gap",
           reading="a mostly convex path keeps it ≤ 0"),
    Metric("exp_gap", "reeval", "EMA (β = 0.99) of inst_gap", "e_t = β e_{t−1} + (1 − β) inst_gap_t",
           "audit eq. 3", needs=("loss", "gradient", "replay"), panel="gap", label="exp_gap"),
    Metric("max_smooth", "reeval", "running max of inst_smooth", "max of inst_smooth", "audit eq. 5",
           needs=("loss", "gradient", "replay"), panel="smoothness", label="max_smooth",
           reading="the global smoothness level"),
    Metric("exp_smooth", "reeval", "EMA (β = 0.99) of inst_smooth", "e_t = β e_{t−1} + (1 − β) inst_smooth_t",
           "audit eq. 5", needs=("loss", "gradient", "replay"), panel="smoothness", label="exp_smooth",
           reading="the local smoothness level"),
    # --- reference: the same at x* ---
    Metric("inst_gap_ref", "reference", "convexity gap against the reference x*",
           "f(x_t,z_t) − f(x*,z_t) − ⟨g_t, x_t − x*⟩", "audit eq. 2",
           needs=("loss", "gradient", "replay", "reference"), panel="reference", label="inst_gap_ref"),
    Metric("inst_smooth_ref", "reference", "smoothness against the reference x*",
           "‖g_t − ∇f(x*,z_t)‖ / ‖x_t − x*‖", "audit eq. 4", needs=("loss", "gradient", "replay", "reference"),
           panel="reference", label="inst_smooth_ref", dash=(4, 3)),
    Metric("convexity_ratio", "reference", "convexity ratio of the trajectory against x*",
           "Σ_t ⟨∇F(x_t), x_t − x*⟩ / Σ_t (F(x_t) − F(x*))", "audit eq. 6",
           needs=("loss", "gradient", "replay", "reference"), panel="convexity_ratio", label="convexity_ratio",
           reading="> 1 convex-like; (0, 1] convex analysis applies with a 1/K slow-down; ≤ 0 strongly non-convex"),
    # --- probe ---
    Metric("sharpness", "probe", "top (algebraic largest) eigenvalue of the Hessian, tracked warm",
           "λ_max(∇²f)", "MoXCo A.2.1", needs=("loss", "hvp"), panel="sharpness", label="λ̂ sharpness",
           reading="compare with the edge of stability, sharpness_target (2/η for GD); for Adam-family runs "
                   "sharpness_precond is the one to compare"),
    Metric("sharpness_min", "probe", "most negative eigenvalue of the Hessian, when a probe has it at no extra HVP",
           "λ_min(∇²f)", "Lanczos (Paige 1976)", needs=("loss", "hvp"), panel="sharpness", label="λ_min",
           color="#7c3aed", dash=(2, 3),
           reading="< 0: negative curvature (a saddle direction); only from probes that run Lanczos "
                   "(the cold start, or sharpness_iters ≥ 2), when converged"),
    Metric("sharpness_target", "probe", "λ_target of the goodness score: the user's, else k·λ_EOS",
           "k · 2(1+α)/(η(1+2β))", "MoXCo Theorem 2", panel="sharpness", label="λ_target", color=RED,
           dash=(8, 5)),
    Metric("sharpness_precond", "probe", "top eigenvalue of the Adam-preconditioned Hessian, tracked warm",
           "λ_max(P⁻¹∇²f), P = diag(√v̂ + ε)", "Cohen et al. 2022", needs=("loss", "hvp"),
           panel="sharpness_precond", label="λ_max(P⁻¹H)",
           reading="Adam-family runs rise to and hover at sharpness_precond_target (the adaptive edge of stability)",
           requires="needs an Adam-family optimizer (Adam, AdamW, or MoXCo over one) and probe_every > 0"),
    Metric("sharpness_precond_target", "probe", "the adaptive edge of stability of Adam with β₁ and step size η",
           "2(1+β₁)/((1−β₁)η)", "Cohen et al. 2022", panel="sharpness_precond", label="2(1+β₁)/((1−β₁)η)",
           color=RED, dash=(8, 5), reading="38/η for β₁ = 0.9",
           requires="needs an Adam-family optimizer (Adam, AdamW, or MoXCo over one) and probe_every > 0"),
    Metric("hessian_trace", "probe", "trace of the Hessian, Hutchinson's estimate (opt-in)",
           "tr(∇²f) ≈ (1/s) Σ zᵢᵀ∇²f zᵢ, zᵢ Rademacher", "Hutchinson 1990", needs=("loss", "hvp"),
           panel="hessian_trace", label="tr(∇²f)",
           reading="the sum of all curvatures: mean curvature × parameter count; costs s HVPs per probe",
           requires="opt-in (s HVPs per probe) and probe_every > 0"),
    # --- goodness ---
    Metric("goodness", "goodness", "MoXCo goodness score on ALIGATOR-denoised estimates",
           "exp(−τ [ĝ² + |λ̂/λ_target − 1| + |f̂ − f_target|])", "MoXCo eq. 6", needs=("loss", "hvp"), panel="goodness",
           label="goodness", reading="near 1: stationary, at the target sharpness, near the target loss"),
    Metric("goodness_grad_term", "goodness", "the gradient term of the goodness score", "ĝ²", "MoXCo eq. 6",
           needs=("loss", "replay"), panel="goodness_terms", label="gradient ĝ²"),
    Metric("goodness_sharpness_term", "goodness", "the sharpness term of the goodness score",
           "|λ̂/λ_target − 1| (or (λ̂ − 1/η̃)_+ in the hinge form)", "MoXCo eq. 6", needs=("loss", "hvp"),
           panel="goodness_terms", label="sharpness |λ̂/λ_target − 1|"),
    Metric("goodness_loss_term", "goodness", "the loss term of the goodness score", "|f̂ − f_target|",
           "MoXCo eq. 6", needs=("loss",), panel="goodness_terms", label="loss |f̂ − f_target|"),
    Metric("phase", "goodness", "MoXCo phase: 1 explores, 2 commits", "1 or 2", "MoXCo Alg. 1", panel="phase",
           label="phase"),
    # --- optimizer state ---
    Metric("lr", "free", "the optimizer's step size", "η", panel="optimizer", label="lr",
           reading="the first parameter group's lr used by the step (a schedule's value at that step)"),
    Metric("alpha", "optimizer", "MoXCo inertia α", "α", "MoXCo eq. 1", panel="optimizer", label="α"),
    Metric("beta", "optimizer", "MoXCo gradient extrapolation β", "β", "MoXCo eq. 1", panel="optimizer",
           label="β"),
    Metric("buffer_variance", "optimizer", "variance of the critical-momenta buffer", "", "Adam+CM"),
    Metric("buffer_cosine", "optimizer", "mean cosine agreement of the critical-momenta buffer", "", "Adam+CM"),
    # --- free: what the loop tells ---
    Metric("step_time", "free", "wall time of the training step", "t(step t) − t(step t−1)", unit="s",
           needs=("clock",), panel="step_time", label="step_time",
           reading="from one optimizer step to the next: the step's forward and backward, the update before them, "
                   "the data loading, and the agent's own work"),
    Metric("samples_per_second", "free", "training throughput in samples", "batch size / step_time", unit="1/s",
           needs=("clock",), panel="throughput", label="samples/s",
           reading="the step's samples (the leading dimension of its inputs, over every rank and micro-batch) "
                   "over step_time"),
    Metric("tokens_per_second", "free", "training throughput in tokens", "tokens / step_time", unit="1/s",
           needs=("clock",), panel="throughput", label="tokens/s", dash=(4, 3),
           reading="when the batch has token ids (input_ids, or an integer batch × sequence tensor): their count, "
                   "padding included, over step_time"),
)

_BY_NAME: Dict[str, Metric] = {m.name: m for m in METRICS}
_PANELS: Dict[str, Panel] = {p.id: p for p in PANELS}


def _check() -> None:
    """The catalogue is consistent: unique names, every panel a metric names exists and draws
    something, every section a panel names exists."""
    if len(_BY_NAME) != len(METRICS):
        raise ValueError("duplicate metric names in the catalogue")
    sections = {s for s, _ in SECTIONS}
    for panel in PANELS:
        if panel.section not in sections:
            raise ValueError(f"panel {panel.id!r}: unknown section {panel.section!r}")
    for metric in METRICS:
        if metric.panel and metric.panel not in _PANELS:
            raise ValueError(f"{metric.name}: unknown panel {metric.panel!r}")
    empty = [p.id for p in PANELS if not any(m.panel == p.id for m in METRICS)]
    if empty:
        raise ValueError(f"panels with no metric: {empty}")


_check()


# --- queries -----------------------------------------------------------------------------------------


def metric(name: str) -> Optional[Metric]:
    """The catalogue entry of ``name``, or None (a user's own series)."""
    return _BY_NAME.get(name)


def names(group: Optional[str] = None) -> Tuple[str, ...]:
    """Metric names in catalogue order, all or of one group."""
    return tuple(m.name for m in METRICS if group is None or m.group == group)


def needing(need: str) -> Tuple[str, ...]:
    """Names of the metrics that need ``need`` (one of ``NEEDS``): e.g. ``needing("gradient")`` is what
    a step whose raw gradient cannot be recovered leaves out."""
    if need not in NEEDS:
        raise ValueError(f"need must be one of {NEEDS}, got {need!r}")
    return tuple(m.name for m in METRICS if need in m.needs)


ALL = names()
GOODNESS_TERMS = ("goodness_grad_term", "goodness_sharpness_term", "goodness_loss_term")
assert all(_BY_NAME[t].group == "goodness" for t in GOODNESS_TERMS)


def panel_metrics(panel_id: str) -> Tuple[Metric, ...]:
    """The metrics drawn in one panel, in catalogue order."""
    return tuple(m for m in METRICS if m.panel == panel_id)


def help_text(name: str) -> str:
    """One line for Prometheus' HELP: the meaning and formula of a catalogue metric, or a user series."""
    entry = metric(name)
    if entry is None:
        return f"Latest value of the run-level series {name!r} (logged by the user)."
    formula = f": {entry.formula}" if entry.formula and entry.formula != entry.meaning else ""
    where = f" ({entry.paper})" if entry.paper else ""
    return f"Latest value of {name}, {entry.meaning}{formula}{where}."


def requirement(name: str) -> str:
    """What a run needs for ``name`` to have points (empty when every run has it)."""
    entry = metric(name)
    if entry is not None and entry.requires:
        return entry.requires
    return GROUPS["user" if entry is None else entry.group][1]


def to_json() -> Dict[str, Any]:
    """The catalogue as the collector serves it (``GET /api/v1/catalogue``): the run page's sections
    and panels, each with its series, and every metric's entry."""
    sections = []
    for section_id, title in SECTIONS:
        panels = []
        for panel in PANELS:
            if panel.section != section_id:
                continue
            requirements = sorted({requirement(m.name) for m in panel_metrics(panel.id) if requirement(m.name)})
            panels.append({
                "id": panel.id, "title": panel.title, "help": panel.help, "log": panel.log,
                "stepped": panel.stepped, "range": list(panel.value_range) if panel.value_range else None,
                "threshold": panel.threshold, "wide": panel.wide, "phase": panel.phase,
                "refs": [{"value": v, "label": label, "color": color} for v, label, color in panel.refs],
                "requires": requirements,
                "series": [{"metric": m.name, "label": m.label or m.name, "color": m.color or None,
                            "dash": list(m.dash) or None} for m in panel_metrics(panel.id)],
            })
        sections.append({"id": section_id, "title": title, "panels": panels})
    metrics = [{"name": m.name, "group": m.group, "meaning": m.meaning, "formula": m.formula, "paper": m.paper,
                "needs": list(m.needs), "unit": m.unit, "panel": m.panel or None, "stored_at": m.stored_at or None,
                "requires": requirement(m.name) or None} for m in METRICS]
    groups = [{"id": g, "what": what, "requires": req or None} for g, (what, req) in GROUPS.items()]
    return {"sections": sections, "metrics": metrics, "groups": groups}


# --- the docs' tables -------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _code(text: str) -> str:
    return f"`{_cell(text)}`" if text else ""


def markdown_table(kind: str = "full") -> str:
    """The metrics table of docs/metrics.md (``kind="full"``: every metric with group, formula, paper
    and reading) or README (``"short"``: name, formula, paper)."""
    if kind == "short":
        lines = ["| name | what it is | formula | paper |", "| --- | --- | --- | --- |"]
        for m in METRICS:
            lines.append(f"| `{m.name}` | {_cell(m.meaning)} | {_code(m.formula)} | {_cell(m.paper)} |")
        return "\n".join(lines)
    if kind != "full":
        raise ValueError(f"kind must be 'full' or 'short', got {kind!r}")
    lines = ["| name | group | formula | paper | needs | how to read it |", "| --- | --- | --- | --- | --- | --- |"]
    for m in METRICS:
        reading = m.reading or m.meaning
        if m.stored_at:
            reading += f" (stored at {m.stored_at})"
        lines.append(f"| `{m.name}` | {m.group} | {_code(m.formula)} | {_cell(m.paper)} | {', '.join(m.needs)} "
                     f"| {_cell(reading)} |")
    return "\n".join(lines)


REPO_ROOT = Path(__file__).resolve().parent.parent
# file → (begin marker, end marker, table kind)
DOC_TABLES = {
    "README.md": ("<!-- catalogue:short:begin -->", "<!-- catalogue:short:end -->", "short"),
    "docs/metrics.md": ("<!-- catalogue:full:begin -->", "<!-- catalogue:full:end -->", "full"),
}


def render_doc(text: str, begin: str, end: str, kind: str) -> str:
    """``text`` with the block between the markers replaced by the current table."""
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise ValueError(f"markers {begin} … {end} not found")
    return pattern.sub(lambda _m: f"{begin}\n{markdown_table(kind)}\n{end}", text, count=1)


def stale_docs(root: Path = REPO_ROOT) -> List[str]:
    """The docs whose tables differ from the catalogue (a checkout only)."""
    out = []
    for rel, (begin, end, kind) in DOC_TABLES.items():
        path = root / rel
        text = path.read_text("utf-8")
        if render_doc(text, begin, end, kind) != text:
            out.append(rel)
    return out


def write_docs(root: Path = REPO_ROOT) -> List[str]:
    """Rewrite the docs' tables from the catalogue; returns the files that changed."""
    changed = []
    for rel, (begin, end, kind) in DOC_TABLES.items():
        path = root / rel
        text = path.read_text("utf-8")
        new = render_doc(text, begin, end, kind)
        if new != text:
            path.write_text(new, "utf-8")
            changed.append(rel)
    return changed


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moxco.catalogue",
                                     description="Print the metric catalogue, or write the docs' tables from it.")
    parser.add_argument("--write", action="store_true", help="rewrite the tables of README.md and docs/metrics.md")
    parser.add_argument("--check", action="store_true", help="exit 1 when a doc's table differs from the catalogue")
    parser.add_argument("--json", action="store_true", help="print the catalogue as the collector serves it")
    args = parser.parse_args(argv)
    if args.write:
        for rel in write_docs():
            print(f"written: {rel}")
        return 0
    if args.check:
        stale = stale_docs()
        for rel in stale:
            print(f"stale: {rel} (run `python -m moxco.catalogue --write`)")
        return 1 if stale else 0
    if args.json:
        print(json.dumps(to_json(), indent=2, ensure_ascii=False))
        return 0
    print(markdown_table("full"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
