"""Metric names: the public contract of DESIGN §3 (storage, APIs and dashboards use exactly these)."""

from __future__ import annotations

# Free every step: dot products over parameters, no extra passes.
FREE_METRICS = ("loss", "grad_norm_sq", "update_norm", "distance", "update_corr", "update_corr_rs")
# One extra pass at x_{t-1} on the same batch z_t.
REEVAL_METRICS = ("loss_diff", "inst_gap", "inst_smooth", "avg_gap", "exp_gap", "max_smooth", "exp_smooth")
# The same formulas with x* in place of x_{t-1} (when a reference is given).
REFERENCE_METRICS = ("inst_gap_ref", "inst_smooth_ref", "convexity_ratio")
# Probe cadence.
PROBE_METRICS = ("sharpness", "goodness", "phase")
# The three bracketed terms of the goodness score (MoXCo eq. 6), stored beside it.
GOODNESS_TERM_METRICS = ("goodness_grad_term", "goodness_sharpness_term", "goodness_loss_term")
# λ_target of the goodness score (the user's, else k·λ_EOS from the optimizer), stored at every
# probe so dashboards and alerts can draw sharpness against it.
SHARPNESS_TARGET_METRICS = ("sharpness_target",)
# The moxco.optim optimizers' own state, recorded on the probe cadence.
OPTIMIZER_METRICS = ("lr", "alpha", "beta", "buffer_variance", "buffer_cosine")

ALL_METRICS = (FREE_METRICS + REEVAL_METRICS + REFERENCE_METRICS + PROBE_METRICS + GOODNESS_TERM_METRICS
               + SHARPNESS_TARGET_METRICS + OPTIMIZER_METRICS)
