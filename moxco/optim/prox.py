"""Proximal operators for MoXCo's ``θ_{t+1} = Prox_g(u_t − η Δ_t)`` (MoXCo eq. 3-4).

A prox operator here is a small picklable object called as ``prox(tensors, step=t, lr=η)``: it
replaces each tensor in ``tensors`` by ``argmin_x ½‖x − y‖² + η·g(x)`` in place. ``step`` is the
1-based count of optimizer steps taken (for homotopy schedules), ``lr`` the step size η the
proximal step is scaled by.

* :class:`Identity` — ``g = 0``: MoXCo is then a plain inertial wrapper.
* :class:`L1` — ``g(x) = w‖x‖₁``: soft-thresholding by ``η·w``.
* :class:`ProxQuant` — binarisation by ProxQuant (Bai, Wang & Liberty 2019) as used in MoXCo §4(iv):
  the W-shaped regulariser ``g(x) = λ_t Σ_i min(|x_i − s|, |x_i + s|)`` with the homotopy schedule
  ``λ_t = λ₀ · t``; its prox soft-thresholds each coordinate's distance to the nearest of ``±s``.
  After training, :meth:`ProxQuant.project_` (or :meth:`MoXCo.finalize_prox`) applies the hard
  sign quantisation ``x ← s · sign(x)`` (``sign(0) = +1``), so every weight is exactly ``±s``.

The scale ``s`` is a fixed number or ``"mean_abs"``: per tensor, ``s = mean|x|`` recomputed at
every call (the usual per-layer scale of binarised networks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Sequence, Union

import torch
from torch import Tensor

ScaleSpec = Union[float, str]

__all__ = ["Identity", "L1", "ProxQuant", "hard_quantize_", "binary_scale", "prox_to_spec", "prox_from_spec"]


def binary_scale(x: Tensor, scale: ScaleSpec) -> Tensor:
    """The quantisation level ``s`` for tensor ``x``: a 0-dim tensor (``mean|x|`` or the constant)."""
    if isinstance(scale, str):
        if scale != "mean_abs":
            raise ValueError(f"scale must be a positive number or 'mean_abs', got {scale!r}")
        return x.detach().abs().mean()
    return torch.as_tensor(float(scale), dtype=x.dtype, device=x.device)


def _check_scale(scale: ScaleSpec) -> ScaleSpec:
    if isinstance(scale, str):
        if scale != "mean_abs":
            raise ValueError(f"scale must be a positive number or 'mean_abs', got {scale!r}")
        return scale
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive number or 'mean_abs', got {scale!r}")
    return float(scale)


@torch.no_grad()
def hard_quantize_(tensors: Sequence[Tensor], scale: ScaleSpec = "mean_abs") -> List[Tensor]:
    """In place ``x ← s · sign(x)`` with ``sign(0) = +1``; returns the scales used (0-dim tensors)."""
    scale = _check_scale(scale)
    used = []
    for x in tensors:
        s = binary_scale(x, scale)
        positive = x >= 0
        x.copy_(torch.where(positive, s, -s).to(x.dtype).expand_as(x))
        used.append(s)
    return used


@dataclass(frozen=True)
class Identity:
    """``Prox_0 = id``: leaves the tensors untouched."""

    def __call__(self, tensors: Sequence[Tensor], *, step: int, lr: float) -> None:  # noqa: ARG002
        return None


@dataclass(frozen=True)
class L1:
    """Prox of ``weight·‖x‖₁``: soft-thresholding ``x ← sign(x)·max(|x| − η·weight, 0)``."""

    weight: float

    def __post_init__(self) -> None:
        if not (isinstance(self.weight, (int, float)) and math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"L1 weight must be a finite number ≥ 0, got {self.weight!r}")

    @torch.no_grad()
    def __call__(self, tensors: Sequence[Tensor], *, step: int, lr: float) -> None:  # noqa: ARG002
        threshold = float(lr) * float(self.weight)
        if threshold == 0.0 or not tensors:
            return
        for x in tensors:
            x.copy_(torch.sign(x) * torch.clamp(x.abs() - threshold, min=0.0))


@dataclass(frozen=True)
class ProxQuant:
    """ProxQuant binarisation with homotopy ``λ_t = λ₀ · t`` (MoXCo §4(iv); ``λ₀ = 1e-5`` there).

    Each call moves every coordinate toward the nearer of ``±s`` by ``η·λ_t`` without crossing it
    (the prox of ``λ_t Σ min(|x − s|, |x + s|)``): as ``t`` grows the threshold exceeds any residual
    and the weights sit exactly on ``±s``. :meth:`project_` finishes with the hard quantisation.
    """

    lambda0: float = 1e-5
    scale: ScaleSpec = 1.0

    def __post_init__(self) -> None:
        if not (isinstance(self.lambda0, (int, float)) and math.isfinite(self.lambda0) and self.lambda0 >= 0):
            raise ValueError(f"ProxQuant lambda0 must be a finite number ≥ 0, got {self.lambda0!r}")
        _check_scale(self.scale)

    def strength(self, step: int) -> float:
        """``λ_t = λ₀ · t``."""
        return float(self.lambda0) * float(step)

    @torch.no_grad()
    def __call__(self, tensors: Sequence[Tensor], *, step: int, lr: float) -> None:
        threshold = float(lr) * self.strength(step)
        if threshold <= 0.0:
            return
        for x in tensors:
            s = binary_scale(x, self.scale)
            target = torch.where(x >= 0, s, -s).to(x.dtype)
            residual = x - target
            shrunk = torch.sign(residual) * torch.clamp(residual.abs() - threshold, min=0.0)
            x.copy_(target + shrunk)

    def project_(self, tensors: Sequence[Tensor]) -> List[Tensor]:
        """The final hard sign quantisation: every entry becomes exactly ``±s``."""
        return hard_quantize_(tensors, self.scale)

    # MoXCo.finalize_prox() looks for this name on any prox operator
    finalize_ = project_


PROX_OPERATORS = {"Identity": Identity, "L1": L1, "ProxQuant": ProxQuant}


def prox_to_spec(prox: object) -> object:
    """A plain ``{"prox": name, **fields}`` dict for the operators of this module (so optimizer
    state dicts load with ``torch.load(weights_only=True)``); any other object is returned as is."""
    for name, cls in PROX_OPERATORS.items():
        if type(prox) is cls:
            return {"prox": name, **{f: getattr(prox, f) for f in cls.__dataclass_fields__}}
    return prox


def prox_from_spec(spec: object) -> object:
    """Inverse of :func:`prox_to_spec`."""
    if isinstance(spec, dict) and spec.get("prox") in PROX_OPERATORS:
        fields = {k: v for k, v in spec.items() if k != "prox"}
        return PROX_OPERATORS[spec["prox"]](**fields)
    return spec
