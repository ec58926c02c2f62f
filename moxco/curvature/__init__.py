"""Curvature of the loss: which operator (``operators``) and which solver (``solvers``), and the warm
tracker of the sharpness (``tracker``), as hessian-eigenthings 1.0 separates them.

* operators: ``AutogradHessian`` (double backward), ``FiniteDifferenceHessian`` (central difference of
  two gradients, no double backward), ``Preconditioned`` (``P^{-1/2} H P^{-1/2}``, with
  ``adam_preconditioner``: ``P = diag(√v̂ + ε)`` of an Adam-family optimizer);
* solvers: ``lanczos`` (algebraic ``λ_max`` and ``λ_min``), ``power`` (power iteration on ``H − σI``),
  ``hutchinson`` (the trace);
* ``Sharpness``: ``λ_max`` tracked warm at about one product per probe (MoXCo A.2.1), the algebraic top
  of the spectrum even where negative curvature dominates;
* conveniences on a ``loss_fn``: ``hvp``, ``fd_hvp``, ``top_eigenvalue``, ``extreme_eigenvalues``,
  ``power_iteration``, ``hessian_trace``.

Vectors are lists of tensors shaped like the parameters (FSDP shards included); see ``operators``.
"""

from moxco.curvature.operators import (
    AutogradHessian, FiniteDifferenceHessian, Preconditioned, adam_preconditioner, fd_epsilon, fd_hvp, hvp,
)
from moxco.curvature.solvers import (
    EigenResult, TraceResult, extreme_eigenvalues, hessian_trace, hutchinson, lanczos, power, power_iteration,
    top_eigenvalue,
)
from moxco.curvature.tracker import Sharpness

__all__ = [
    "AutogradHessian", "EigenResult", "FiniteDifferenceHessian", "Preconditioned", "Sharpness", "TraceResult",
    "adam_preconditioner", "extreme_eigenvalues", "fd_epsilon", "fd_hvp", "hessian_trace", "hutchinson", "hvp",
    "lanczos", "power", "power_iteration", "top_eigenvalue",
]
