"""Hypergradient descent: SGD-HD and Adam-HD (Baydin et al., ICLR 2018), MoXCo's Phase 2 optimizer.

Both adapt the (per parameter group) step size online by gradient descent on it. Write the update
as ``θ_t = θ_{t−1} − η_t s_t`` with ``s_t`` the optimizer's unit-step direction (``g_t`` for SGD,
``m̂_t / (√v̂_t + ε)`` for Adam). Since ``∂f(θ_{t−1})/∂η_{t−1} = −⟨∇f(θ_{t−1}), s_{t−1}⟩``, each step
first sets

    η_t = η_{t−1} + β_hg · ⟨g_t, s_{t−1}⟩          (β_hg = ``hypergrad_lr``; s_0 = 0)

and then takes the base step with ``η_t``. The inner product runs over all parameters of the group
(one scalar step size per group, as ``param_groups[i]["lr"]``) and is accumulated in float64; it is
read back to the host once per group per step (the step size is a Python float, as in torch.optim).
``hypergrad_lr = 0`` gives plain SGD / Adam. Weight decay is L2 (added to the gradient, as in the
paper's code), and the hypergradient sees the decayed gradient. The step size is not clipped (the
paper does not clip it): a too large ``hypergrad_lr`` can drive it negative.

``hypergrad_rule="multiplicative"`` is the paper's multiplicative variant, scale-free and
positive for ``β_hg < 1``:

    η_t = η_{t−1} · (1 + β_hg · ⟨g_t, s_{t−1}⟩ / (‖g_t‖ ‖s_{t−1}‖))

(the cosine of consecutive directions; no change where either norm is 0). Use it where gradient
norms are large or vary a lot (the additive rule's change is ``β_hg ‖g‖ ‖s‖ cos``).

``SGDHD`` also has torch.optim.SGD's momentum / dampening / Nesterov options (Baydin's SGDN-HD is
``momentum > 0, nesterov=True``): the direction ``s_t`` is then the momentum-smoothed one.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from moxco.optim._common import check_betas, check_lr, check_nonneg, params_with_grad, use_foreach
from moxco.tensors import dot, norm_sq

__all__ = ["SGDHD", "AdamHD", "sgdhd", "adamhd", "hypergradient", "hypergradient_update", "HYPERGRAD_RULES"]


HYPERGRAD_RULES = ("additive", "multiplicative")


def hypergradient(grads: List[Tensor], directions: List[Tensor]) -> Tensor:
    """``⟨g_t, s_{t−1}⟩`` over a parameter list (0-dim float64 tensor): minus the derivative of the
    loss at the current point with respect to the previous step size."""
    return dot(grads, directions)


def hypergradient_update(lr: float, grads: List[Tensor], directions: List[Tensor], hypergrad_lr: float,
                         rule: str = "additive") -> float:
    """The new step size from the hypergradient (one host read)."""
    h = hypergradient(grads, directions)
    if rule == "additive":
        return float(lr) + float(hypergrad_lr) * float(h)
    if rule == "multiplicative":
        norms = float(norm_sq(grads).sqrt() * norm_sq(directions).sqrt())
        if not norms > 0.0:
            return float(lr)
        return float(lr) * (1.0 + float(hypergrad_lr) * float(h) / norms)
    raise ValueError(f"hypergrad_rule must be one of {HYPERGRAD_RULES}, got {rule!r}")


def check_rule(rule: object) -> str:
    if rule not in HYPERGRAD_RULES:
        raise ValueError(f"Invalid hypergrad_rule: {rule!r} (must be one of {HYPERGRAD_RULES})")
    return rule  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# SGD-HD kernels
# --------------------------------------------------------------------------------------------


def _single_tensor_sgd_direction(
    params: List[Tensor], grads: List[Tensor], momentum_buffers: List[Optional[Tensor]], *,
    weight_decay: float, momentum: float, dampening: float, nesterov: bool,
) -> List[Tensor]:
    """Return the unit-step directions ``s_t`` (new tensors) and update momentum buffers in place."""
    directions = []
    for i, (p, g) in enumerate(zip(params, grads)):
        d = g.add(p, alpha=weight_decay) if weight_decay != 0 else g.clone()
        if momentum != 0:
            buf = momentum_buffers[i]
            if buf is None:
                buf = d.clone()
                momentum_buffers[i] = buf
            else:
                buf.mul_(momentum).add_(d, alpha=1 - dampening)
            d = d.add(buf, alpha=momentum) if nesterov else buf.clone()
        directions.append(d)
    return directions


def _multi_tensor_sgd_direction(
    params: List[Tensor], grads: List[Tensor], momentum_buffers: List[Optional[Tensor]], *,
    weight_decay: float, momentum: float, dampening: float, nesterov: bool,
) -> List[Tensor]:
    if weight_decay != 0:
        d = list(torch._foreach_add(grads, params, alpha=weight_decay))
    else:
        d = [g.clone() for g in grads]
    if momentum == 0:
        return d
    fresh = {i for i, b in enumerate(momentum_buffers) if b is None}
    old = [i for i in range(len(d)) if i not in fresh]
    for i in fresh:
        momentum_buffers[i] = d[i].clone()
    if old:
        bufs = [momentum_buffers[i] for i in old]
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, [d[i] for i in old], alpha=1 - dampening)
    bufs = [momentum_buffers[i] for i in range(len(d))]
    if nesterov:
        return list(torch._foreach_add(d, bufs, alpha=momentum))
    return [b.clone() for b in bufs]


def sgdhd(
    params: List[Tensor], grads: List[Tensor], momentum_buffers: List[Optional[Tensor]],
    prev_directions: List[Optional[Tensor]], *, lr: float, hypergrad_lr: float, weight_decay: float = 0.0,
    momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False, foreach: bool = False,
    rule: str = "additive",
) -> float:
    """One SGD-HD step on a parameter list. Updates ``params``, ``momentum_buffers`` and
    ``prev_directions`` (``s_t``) in place and returns the new step size ``η_t``."""
    kernel = _multi_tensor_sgd_direction if foreach else _single_tensor_sgd_direction
    if hypergrad_lr != 0 and all(s is not None for s in prev_directions) and params:
        # the hypergradient uses the gradient the step will use (L2 term included)
        g_full = list(torch._foreach_add(grads, params, alpha=weight_decay)) if weight_decay != 0 else list(grads)
        lr = hypergradient_update(lr, g_full, prev_directions, hypergrad_lr, rule)  # type: ignore[arg-type]
    directions = kernel(params, grads, momentum_buffers, weight_decay=weight_decay, momentum=momentum,
                        dampening=dampening, nesterov=nesterov)
    if foreach:
        torch._foreach_add_(params, directions, alpha=-lr)
    else:
        for p, d in zip(params, directions):
            p.add_(d, alpha=-lr)
    for i, d in enumerate(directions):
        if prev_directions[i] is None:
            prev_directions[i] = d
        else:
            prev_directions[i].copy_(d)
    return lr


# --------------------------------------------------------------------------------------------
# Adam-HD kernels
# --------------------------------------------------------------------------------------------


def _single_tensor_adam_direction(
    params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor], *,
    steps: List[int], beta1: float, beta2: float, eps: float, weight_decay: float,
) -> List[Tensor]:
    out = []
    for p, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        bc1 = 1 - beta1 ** step
        bc2_sqrt = math.sqrt(1 - beta2 ** step)
        if weight_decay != 0:
            g = g.add(p, alpha=weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / bc2_sqrt).add_(eps)
        out.append(m.div(denom).div_(bc1))
    return out


def _multi_tensor_adam_direction(
    params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor], *,
    steps: List[int], beta1: float, beta2: float, eps: float, weight_decay: float,
) -> List[Tensor]:
    if len(set(steps)) > 1:  # parameters that joined late: per-tensor bias corrections
        return _single_tensor_adam_direction(params, grads, exp_avgs, exp_avg_sqs, steps=steps, beta1=beta1,
                                             beta2=beta2, eps=eps, weight_decay=weight_decay)
    step = steps[0]
    bc1 = 1 - beta1 ** step
    bc2_sqrt = math.sqrt(1 - beta2 ** step)
    if weight_decay != 0:
        grads = list(torch._foreach_add(grads, params, alpha=weight_decay))
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, eps)
    directions = torch._foreach_div(exp_avgs, denom)
    torch._foreach_div_(directions, bc1)
    return list(directions)


def adamhd(
    params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
    prev_directions: List[Optional[Tensor]], *, steps: List[int], lr: float, hypergrad_lr: float, beta1: float,
    beta2: float, eps: float, weight_decay: float = 0.0, foreach: bool = False, rule: str = "additive",
) -> float:
    """One Adam-HD step (``steps``: each tensor's 1-based step count including this step); returns ``η_t``."""
    if hypergrad_lr != 0 and all(s is not None for s in prev_directions) and params:
        g_full = list(torch._foreach_add(grads, params, alpha=weight_decay)) if weight_decay != 0 else list(grads)
        lr = hypergradient_update(lr, g_full, prev_directions, hypergrad_lr, rule)  # type: ignore[arg-type]
    kernel = _multi_tensor_adam_direction if foreach else _single_tensor_adam_direction
    directions = kernel(params, grads, exp_avgs, exp_avg_sqs, steps=steps, beta1=beta1, beta2=beta2, eps=eps,
                        weight_decay=weight_decay)
    if foreach:
        torch._foreach_add_(params, directions, alpha=-lr)
    else:
        for p, d in zip(params, directions):
            p.add_(d, alpha=-lr)
    for i, d in enumerate(directions):
        if prev_directions[i] is None:
            prev_directions[i] = d
        else:
            prev_directions[i].copy_(d)
    return lr


# --------------------------------------------------------------------------------------------
# Optimizer classes (they only hold state)
# --------------------------------------------------------------------------------------------


class _HypergradientOptimizer(Optimizer):
    """Shared agent-facing API: the current step size per group and its hypergradient rate."""

    def hyperparameters(self) -> Dict[str, Any]:
        g = self.param_groups[0]
        return {
            "optimizer": type(self).__name__,
            "lr": float(g["lr"]),
            "hypergrad_lr": float(g["hypergrad_lr"]),
            "hypergrad_rule": g["hypergrad_rule"],
            "lr_per_group": [float(group["lr"]) for group in self.param_groups],
        }


class SGDHD(_HypergradientOptimizer):
    """SGD whose step size is adapted by hypergradient descent (Baydin et al. 2018, SGD-HD).

    Args:
        params: parameters or parameter groups.
        lr: initial step size ``η_0`` (then adapted; read it back from ``param_groups[i]["lr"]``).
        hypergrad_lr: the hypergradient step ``β_hg`` (MoXCo uses 1e-3; 0 gives torch SGD).
        momentum, dampening, nesterov, weight_decay: as in ``torch.optim.SGD``.
        hypergrad_rule: ``"additive"`` (default) or ``"multiplicative"`` (see the module docstring).
        foreach: force (True) or forbid (False) the ``torch._foreach_*`` path; default: on CUDA.
    """

    def __init__(self, params, lr: float = 1e-3, hypergrad_lr: float = 1e-3, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
                 *, hypergrad_rule: str = "additive", foreach: Optional[bool] = None):
        check_lr(lr)
        check_nonneg(hypergrad_lr, "hypergrad_lr")
        check_nonneg(momentum, "momentum")
        check_nonneg(dampening, "dampening")
        check_nonneg(weight_decay, "weight_decay")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError(f"Nesterov momentum requires a momentum > 0 and zero dampening, got momentum={momentum!r}, dampening={dampening!r}")
        defaults = dict(lr=lr, hypergrad_lr=hypergrad_lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov, hypergrad_rule=check_rule(hypergrad_rule),
                        foreach=foreach)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = params_with_grad(group)
            if not params:
                continue
            grads = [p.grad for p in params]
            states = [self.state[p] for p in params]
            momentum_buffers = [s.get("momentum_buffer") for s in states]
            prev = [s.get("hd_direction") for s in states]
            group["lr"] = sgdhd(
                params, grads, momentum_buffers, prev, lr=group["lr"], hypergrad_lr=group["hypergrad_lr"],
                weight_decay=group["weight_decay"], momentum=group["momentum"], dampening=group["dampening"],
                nesterov=group["nesterov"], foreach=use_foreach(params, group["foreach"]), rule=group["hypergrad_rule"],
            )
            for s, buf, d in zip(states, momentum_buffers, prev):
                if buf is not None:
                    s["momentum_buffer"] = buf
                s["hd_direction"] = d
        return loss


class AdamHD(_HypergradientOptimizer):
    """Adam whose step size is adapted by hypergradient descent (Baydin et al. 2018, Adam-HD).

    Args:
        params: parameters or parameter groups.
        lr: initial step size (then adapted).
        hypergrad_lr: the hypergradient step ``β_hg`` (Baydin et al. use 1e-7…1e-3 for Adam; 0 gives
            torch Adam).
        betas, eps, weight_decay: as in ``torch.optim.Adam`` (L2 weight decay).
        hypergrad_rule: ``"additive"`` (default) or ``"multiplicative"``.
        foreach: force or forbid the multi-tensor path.
    """

    def __init__(self, params, lr: float = 1e-3, hypergrad_lr: float = 1e-7, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, hypergrad_rule: str = "additive", foreach: Optional[bool] = None):
        check_lr(lr)
        check_nonneg(hypergrad_lr, "hypergrad_lr")
        betas = check_betas(betas)
        check_nonneg(eps, "epsilon value")
        check_nonneg(weight_decay, "weight_decay")
        defaults = dict(lr=lr, hypergrad_lr=hypergrad_lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        hypergrad_rule=check_rule(hypergrad_rule), foreach=foreach)
        super().__init__(params, defaults)

    def hyperparameters(self) -> Dict[str, Any]:
        out = super().hyperparameters()
        out["betas"] = tuple(self.param_groups[0]["betas"])
        return out

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = params_with_grad(group)
            if not params:
                continue
            states = [self.state[p] for p in params]
            for p, s in zip(params, states):
                if len(s) == 0:
                    s["step"] = torch.tensor(0.0)
                    s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            for s in states:
                s["step"] += 1
            prev = [s.get("hd_direction") for s in states]
            beta1, beta2 = group["betas"]
            group["lr"] = adamhd(
                params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                prev, steps=[int(s["step"].item()) for s in states], lr=group["lr"], hypergrad_lr=group["hypergrad_lr"], beta1=beta1, beta2=beta2,
                eps=group["eps"], weight_decay=group["weight_decay"], foreach=use_foreach(params, group["foreach"]),
                rule=group["hypergrad_rule"],
            )
            for s, d in zip(states, prev):
                s["hd_direction"] = d
        return loss
