"""The MoXCo goodness score and the edge-of-stability bound it is normalised by.

* ``goodness``: MoXCo eq. 6 (full paper, file 000) in its ``"relative"`` form

      G(θ) = exp(−τ [ ‖∇f‖² + |λ_max/λ_target − 1| + |f − f_target| ])

  and the short paper's (file 001, §5.2) ``"eos"`` hinge form

      G(θ) = exp(−τ [ ‖∇f‖² + (λ_max − 1/η̃)_+ + |f − f_target| ]).

* ``eos_sharpness``: MoXCo Theorem 2, the largest curvature inertial momentum with step size η,
  inertia α and gradient-extrapolation β is stable on: ``2(1+α) / (η(1+2β))`` (``2/η`` for GD).
* ``adaptive_eos_sharpness``: the adaptive edge of stability of Adam-family optimizers (Cohen et al.
  2022): the *preconditioned* sharpness ``λ_max(P⁻¹H)`` Adam with ``β₁`` and step size η is stable
  below, ``2(1+β₁) / ((1−β₁)η)`` (``38/η`` for ``β₁ = 0.9``).

In the ``"eos"`` form ``sharpness_target`` *is* the bound ``1/η̃``; pass ``eos_sharpness(...)`` so
that "stable fixed point of GD with step η̃" (Theorem 1 (b)) means exactly ``λ_max ≤ 1/η̃`` and
the hinge vanishes there: this is the form for which Theorem 1 (``G ≥ exp(−τε)`` at a stable
local minimum with ``|f − f_target| ≤ ε``) holds as stated. The relative form additionally asks
the sharpness to *equal* the target, so its middle term is zero only at ``λ_max = λ_target``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

GOODNESS_FORMS = ("relative", "eos")


class Goodness(NamedTuple):
    """A goodness score with its three bracketed terms (all ≥ 0; NaN propagates)."""

    score: float
    grad_term: float
    sharpness_term: float
    loss_term: float


def eos_sharpness(lr: float, alpha: float = 0.0, beta: float = 0.0) -> float:
    """Edge-of-stability sharpness of inertial momentum, MoXCo Theorem 2: ``2(1+α) / (lr(1+2β))``.

    For ``f = ½xᵀAx + bᵀx`` and an eigenpair ``(q, a)`` of ``A``, ``qᵀx_t`` diverges under
    ``u = θ + α(θ − θ_prev)``, ``v = θ + β(θ − θ_prev)``, ``θ_next = u − lr ∇f(v)`` when ``a``
    exceeds this value. ``alpha = beta = 0`` gives plain gradient descent's ``2/lr``.
    """
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite positive number, got {lr!r}")
    if not (math.isfinite(alpha) and 0.0 <= alpha < 1.0):
        raise ValueError(f"alpha must be in [0, 1), got {alpha!r}")
    if not (math.isfinite(beta) and beta >= 0.0):
        raise ValueError(f"beta must be finite and ≥ 0, got {beta!r}")
    return 2.0 * (1.0 + alpha) / (lr * (1.0 + 2.0 * beta))


def adaptive_eos_sharpness(lr: float, beta1: float = 0.9) -> float:
    """Adaptive edge of stability, Cohen et al. 2022 ("Adaptive gradient methods at the edge of
    stability"): ``2(1+β₁) / ((1−β₁)·lr)``.

    Adam's update with a frozen preconditioner ``P = diag(√v̂ + ε)`` is heavy-ball momentum with an
    exponential moving average, ``m ← β₁m + (1−β₁)g``, ``θ ← θ − lr·P⁻¹m``, on the preconditioned
    Hessian ``P⁻¹H``; on ``f = ½ a x²`` in an eigendirection of ``P⁻¹H`` it diverges when ``a`` exceeds
    this value. ``β₁ = 0.9`` gives ``38/lr``; ``β₁ = 0`` (RMSProp) gives ``2/lr``. Compare it with
    ``λ_max(P⁻¹H)`` (``Sharpness(..., preconditioner=optimizer)``), not with the plain ``λ_max(H)``.
    """
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite positive number, got {lr!r}")
    if not (isinstance(beta1, (int, float)) and math.isfinite(beta1) and 0.0 <= beta1 < 1.0):
        raise ValueError(f"beta1 must be in [0, 1), got {beta1!r}")
    return 2.0 * (1.0 + beta1) / ((1.0 - beta1) * lr)


def goodness(
    grad_norm_sq: float,
    sharpness: float,
    loss: float,
    *,
    tau: float,
    sharpness_target: float,
    loss_target: float = 0.0,
    form: str = "relative",
) -> Goodness:
    """MoXCo goodness score (eq. 6, or the short paper's hinge form) and its three terms.

    ``grad_term = ‖∇f‖²``; ``loss_term = |f − f_target|``; ``sharpness_term`` is
    ``|λ/λ_target − 1|`` (``form="relative"``) or ``max(λ − λ_bound, 0)`` (``form="eos"``, with
    ``sharpness_target`` the bound ``1/η̃``). ``score = exp(−τ (sum of terms))`` lies in [0, 1].

    Inputs may be NaN or ±Inf (a diverging run): an infinite loss or gradient gives score 0, a NaN
    input gives a NaN score (never "good").
    """
    if form not in GOODNESS_FORMS:
        raise ValueError(f"form must be one of {GOODNESS_FORMS}, got {form!r}")
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a finite positive number, got {tau!r}")
    if not (math.isfinite(sharpness_target) and sharpness_target > 0):
        raise ValueError(f"sharpness_target must be a finite positive number, got {sharpness_target!r}")
    if not math.isfinite(loss_target):
        raise ValueError(f"loss_target must be finite, got {loss_target!r}")
    grad_norm_sq, sharpness, loss = float(grad_norm_sq), float(sharpness), float(loss)
    if grad_norm_sq < 0:
        raise ValueError(f"grad_norm_sq must be ≥ 0, got {grad_norm_sq!r}")

    grad_term = grad_norm_sq
    if form == "relative":
        sharpness_term = abs(sharpness / sharpness_target - 1.0)
    else:
        sharpness_term = max(sharpness - sharpness_target, 0.0) if not math.isnan(sharpness) else math.nan
    loss_term = abs(loss - loss_target)
    total = grad_term + sharpness_term + loss_term
    score = math.exp(-tau * total) if not math.isnan(total) else math.nan
    return Goodness(score, grad_term, sharpness_term, loss_term)
