"""moxco: the math of training diagnostics, one place for every formula.

* ``moxco.metrics``: the audit metrics (``inst_gap``, ``inst_smooth``, ``loss_diff``,
  ``update_corr``, ``update_corr_rs``) and their running aggregates, ``ConvexityRatio``;
* ``moxco.hessian``: ``top_eigenvalue`` and the warm-started ``Sharpness`` tracker (MoXCo A.2.1);
* ``moxco.aligator``: the ALIGATOR denoiser and the gradient-norm estimator (MoXCo A.2.2);
* ``moxco.goodness``: the goodness score (MoXCo eq. 6) and ``eos_sharpness`` (Theorem 2);
* ``moxco.policy``: the phase-switch decision policy;
* ``moxco.landscapes``: the papers' test functions; ``moxco.optim``: the papers' optimizers.

Everything here depends on torch and numpy only; ``moxco.agent`` and ``moxco.collector`` build on it.
"""

import importlib
from typing import Any

# The torch-free parts are imported here (``moxco.goodness`` is also a function name: importing
# it eagerly binds the function, not the submodule). The rest is resolved on first use (PEP 562),
# so the collector, which needs only the policy, and ``moxco --help`` do not import torch.
from moxco.goodness import Goodness, eos_sharpness, goodness
from moxco.decision import Decision
from moxco.policy import DecisionPolicy, PolicyConfig

_EXPORTS = {
    "Aligator": "aligator", "GradNormSqEstimator": "aligator",
    "Sharpness": "hessian", "hvp": "hessian", "power_iteration": "hessian", "top_eigenvalue": "hessian",
    "ConvexityRatio": "metrics", "ExponentialAverage": "metrics", "GapSmoothAggregates": "metrics",
    "RunningMax": "metrics", "RunningMean": "metrics", "grad_norm_sq": "metrics", "inst_gap": "metrics",
    "inst_smooth": "metrics", "loss_diff": "metrics", "update_corr": "metrics", "update_corr_rs": "metrics",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'moxco' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"moxco.{module}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


__version__ = "0.1.0"

__all__ = [
    "Aligator", "ConvexityRatio", "Decision", "DecisionPolicy", "ExponentialAverage", "GapSmoothAggregates",
    "Goodness", "GradNormSqEstimator", "PolicyConfig", "RunningMax", "RunningMean", "Sharpness", "eos_sharpness",
    "goodness", "grad_norm_sq", "hvp", "inst_gap", "inst_smooth", "loss_diff", "power_iteration", "top_eigenvalue",
    "update_corr", "update_corr_rs",
]
