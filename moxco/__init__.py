"""moxco: the math of training diagnostics, one place for every formula (DESIGN §3).

* ``moxco.metrics``: the audit metrics (``inst_gap``, ``inst_smooth``, ``loss_diff``,
  ``update_corr``, ``update_corr_rs``) and their running aggregates, ``ConvexityRatio``;
* ``moxco.hessian``: ``top_eigenvalue`` and the warm-started ``Sharpness`` tracker (MoXCo A.2.1);
* ``moxco.aligator``: the ALIGATOR denoiser and the gradient-norm estimator (MoXCo A.2.2);
* ``moxco.goodness``: the goodness score (MoXCo eq. 6) and ``eos_sharpness`` (Theorem 2);
* ``moxco.policy``: the phase-switch decision policy;
* ``moxco.landscapes``: the papers' test functions; ``moxco.optim``: the papers' optimizers.

Everything here depends on torch and numpy only; ``moxco.agent`` and ``moxco.collector`` build on it.
"""

from moxco.aligator import Aligator, GradNormSqEstimator
from moxco.goodness import Goodness, eos_sharpness, goodness
from moxco.hessian import Sharpness, hvp, power_iteration, top_eigenvalue
from moxco.metrics import (
    ConvexityRatio,
    ExponentialAverage,
    GapSmoothAggregates,
    RunningMax,
    RunningMean,
    grad_norm_sq,
    inst_gap,
    inst_smooth,
    loss_diff,
    update_corr,
    update_corr_rs,
)
from moxco.policy import Decision, DecisionPolicy, PolicyConfig

__version__ = "0.1.0"

__all__ = [
    "Aligator", "ConvexityRatio", "Decision", "DecisionPolicy", "ExponentialAverage", "GapSmoothAggregates",
    "Goodness", "GradNormSqEstimator", "PolicyConfig", "RunningMax", "RunningMean", "Sharpness", "eos_sharpness",
    "goodness", "grad_norm_sq", "hvp", "inst_gap", "inst_smooth", "loss_diff", "power_iteration", "top_eigenvalue",
    "update_corr", "update_corr_rs",
]
