"""Sharpness-aware minimisation (Foret et al., ICLR 2021) around any base optimizer: the baseline
both papers compare against (Adam+SAM, and Adam+SAM+CM with an :class:`~moxco.optim.AdamCM` base).

One SAM step takes two gradients. With ``g = ∇f(w)``:

    ε̂(w) = ρ · T_w² g / ‖T_w g‖        (T_w = I; ``adaptive=True``: T_w = diag|w|, ASAM, Kwon et al. 2021)
    w ← w + ε̂(w);  g_SAM = ∇f(w + ε̂);  w ← w − ε̂;  base.step() with g_SAM.

Use either ``step(closure)`` (the gradient at ``w`` is already in ``.grad``; the closure recomputes
loss and gradients and is called once, at the perturbed point) or the two halves
``first_step()`` / ``second_step()`` around your own forward/backward.
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch
from torch import Tensor
from torch.optim import Optimizer

from moxco.optim._common import BaseSpec, build_base, check_lr, check_nonneg, params_with_grad, sync_lr
from moxco.tensors import norm_sq

__all__ = ["SAM", "sam_perturbation"]

_OWN_KEYS = ("rho", "adaptive")


@torch.no_grad()
def sam_perturbation(params: List[Tensor], grads: List[Tensor], *, rho: float, adaptive: bool, eps: float = 1e-12) -> List[Tensor]:
    """``ε̂ = ρ T² g / ‖T g‖`` (new tensors); the norm runs over the whole list."""
    if not params:
        return []
    scaled = [g * p.abs() if adaptive else g for p, g in zip(params, grads)]
    norm = norm_sq(scaled).sqrt()
    out = []
    for p, g in zip(params, grads):
        e = g * p.pow(2) if adaptive else g.clone()
        out.append(e.mul_((rho / (norm + eps)).to(e.dtype)))
    return out


class SAM(Optimizer):
    """SAM around a base optimizer (class, factory or prebuilt instance over the same parameters).

    Args:
        params: parameters or parameter groups.
        base: the base optimizer (``torch.optim.SGD``, ``torch.optim.Adam``, :class:`AdamCM`, …).
        rho: neighbourhood radius ρ (0.05, the papers' default).
        adaptive: ASAM's scale-invariant perturbation.
        lr: the base's step size (optional when ``base`` is an instance).
        **base_kwargs: passed to ``base`` when it is a class.
    """

    def __init__(self, params, base: BaseSpec, rho: float = 0.05, adaptive: bool = False, lr: float | None = None, **base_kwargs: Any):
        check_nonneg(rho, "rho")
        if lr is None:
            if isinstance(base, Optimizer):
                lr = float(base.param_groups[0]["lr"])
            elif "lr" in base_kwargs:
                lr = base_kwargs.pop("lr")
            else:
                raise ValueError("lr is required when base is an optimizer class")
        check_lr(lr)
        defaults = dict(rho=rho, adaptive=bool(adaptive), lr=lr)
        super().__init__(params, defaults)
        self.base: Optimizer = build_base(self.param_groups, base, base_kwargs, _OWN_KEYS)
        if isinstance(base, Optimizer):
            for mine, theirs in zip(self.param_groups, base.param_groups):
                mine["lr"] = float(theirs["lr"])

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move to ``w + ε̂(w)`` using the gradients in ``.grad`` (remembering ``w``)."""
        for group in self.param_groups:
            params = params_with_grad(group)
            perturbation = sam_perturbation(params, [p.grad for p in params], rho=group["rho"], adaptive=group["adaptive"])
            for p, e in zip(params, perturbation):
                self.state[p]["e_w"] = e
                p.add_(e)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Return to ``w`` and let the base step with the gradients taken at ``w + ε̂``."""
        for group in self.param_groups:
            for p in group["params"]:
                e = self.state.get(p, {}).pop("e_w", None)
                if e is not None:
                    p.sub_(e)
        sync_lr(self.param_groups, self.base)
        self.base.step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure=None):
        """Both halves; ``closure`` must recompute the loss and call ``backward`` (it runs once, at
        the perturbed point; the gradient at ``w`` must already be in ``.grad``)."""
        if closure is None:
            raise ValueError("SAM.step needs a closure that recomputes the loss and its gradients")
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            loss = closure()
        self.second_step()
        return loss

    def hyperparameters(self) -> Dict[str, Any]:
        g = self.param_groups[0]
        out = {"optimizer": "SAM", "base": type(self.base).__name__, "lr": float(g["lr"]), "rho": float(g["rho"]),
               "adaptive": bool(g["adaptive"])}
        inner = getattr(self.base, "hyperparameters", None)
        if callable(inner):
            out["base_hyperparameters"] = inner()
        return out

    def state_dict(self) -> Dict[str, Any]:
        sd = super().state_dict()
        sd["base"] = self.base.state_dict()
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        base_sd = state_dict.pop("base", None)
        if base_sd is None:
            raise ValueError("not a SAM state dict (key 'base' missing)")
        super().load_state_dict(state_dict)
        self.base.load_state_dict(base_sd)
