"""Memory-augmented optimizers: Adam+CM, Adam+CG, SGD+CM, SGD+CG (the Adam+CM paper, "Promoting Exploration in Memory-Augmented Adam using Critical Momenta").

Each keeps a *priority buffer* of capacity ``C`` per parameter group. The priority of a new entry
is the L2 norm of the group's current gradient ``‖g_t‖``; every step the new entry replaces the
lowest-priority one when the buffer is full and ``‖g_t‖`` exceeds it (or fills an empty slot), and
then all priorities are multiplied by the decay ``λ`` (Algorithm 1). The buffer is aggregated
*before* the new entry goes in:

    aggr(x_t, buffer) = x_t + (1/C) Σ_{b ∈ buffer} b                          (eq. 6)

* Adam+CM (eq. 4-7): the entries are momenta.
      m_t = β₁ m_{t−1} + (1−β₁) g_t;  m_t^M = aggr(m_t, 𝐦_c);  v_t^M = β₂ v_{t−1}^M + (1−β₂) (m_t^M)²
      θ_{t+1} = θ_t − α m̂_t^M / (√v̂_t^M + ε)        (hats: bias corrections 1−β₁ᵗ, 1−β₂ᵗ)
* Adam+CG (eq. 3): the entries are gradients, and Adam runs on ``aggr(g_t, 𝐠_c)``.
* SGD+CM (eq. 4 and 8): ``m_t = μ m_{t−1} + (1−dampening) g_t``, ``θ_{t+1} = θ_t − α aggr(m_t, 𝐦_c)``
  (``dampening = μ`` is eq. 4's EMA; the default 0 is the heavy-ball form of §3.2's analysis).
* SGD+CG (eq. 10): ``θ_{t+1} = θ_t − η aggr(g_t, 𝐠_c)`` (optionally with torch-style momentum on
  the aggregate, as in McRae et al.).

Notes. Eq. 6 divides by the capacity ``C`` even while the buffer is filling (the empty slots
count as zeros); Adam uses ``√v̂ + ε`` as in ``torch.optim.Adam`` (the paper's eq. 2/7 print
``√(v̂ + ε)``). Weight decay is L2 (added to the gradient before everything else).

Buffer statistics (Adam+CM fig. 8), for the agent: ``buffer_variance`` is the mean over
coordinates of the variance across the filled buffer entries, ``(1/(n d)) Σ_i ‖b_i − b̄‖²``, and
``buffer_cosine`` the mean cosine similarity between the highest-norm entry and the other entries
(NaN with fewer than 2 entries). Both come from the ``C × C`` Gram matrix of the entries.

State per parameter: ``step``, moments, ``buffer`` (``C × shape``: slot ``i`` of every parameter of a
group together is one buffer entry) and ``buffer_priority`` (``C``; the group's priorities, ``-inf``
for empty slots, replicated in each parameter's state so that ``state_dict`` stays per-parameter).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from moxco.optim._common import check_betas, check_lr, check_nonneg, check_unit_interval, params_with_grad, use_foreach
from moxco.tensors import norm_sq

__all__ = ["AdamCM", "AdamCG", "SGDCM", "SGDCG", "priority_insert_", "buffer_mean", "buffer_statistics",
           "adam_critical", "sgd_critical"]


# --------------------------------------------------------------------------------------------
# the priority buffer (pure functions over per-parameter buffers)
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def priority_insert_(buffers: List[Tensor], priorities: List[Tensor], items: List[Tensor], key: Tensor, decay: float) -> None:
    """Offer ``items`` (one tensor per parameter) to the buffer with priority ``key``, then decay.

    Empty slots have priority ``-inf``, so "fill an empty slot, else replace the smallest priority
    if ``key`` exceeds it" is one branch-free ``argmin`` (no host synchronisation). All tensors in
    ``priorities`` hold the same values (the group's priorities) and are all updated.
    """
    if not buffers:
        return
    prio = priorities[0]
    slot = torch.argmin(prio).reshape(1)
    key = key.to(dtype=prio.dtype, device=prio.device).reshape(1)
    replace = key > prio.index_select(0, slot)
    for buf, item in zip(buffers, items):
        old = buf.index_select(0, slot)
        buf.index_copy_(0, slot, torch.where(replace.reshape((1,) * buf.dim()), item.unsqueeze(0).to(buf.dtype), old))
    new_prio = prio.index_copy(0, slot, torch.where(replace, key, prio.index_select(0, slot)))
    new_prio.mul_(decay)
    for pr in priorities:
        pr.copy_(new_prio)


@torch.no_grad()
def _stacked_priority_insert_(buffers: List[Tensor], priorities: List[Tensor], items: List[Tensor], grads: List[Tensor],
                              decay: float) -> None:
    """``priority_insert_`` for many same-shaped tensors with one buffer each, vectorised: the
    same result as calling it once per tensor (keys: each tensor's own gradient norm)."""
    prio = torch.stack(priorities)                                              # (n, C)
    keys = torch.stack([n.to(prio.dtype) for n in torch._foreach_norm(grads, 2)])  # (n,)
    rows = torch.arange(prio.shape[0], device=prio.device)
    slot = torch.argmin(prio, dim=1)
    replace = keys > prio[rows, slot]
    stacked = torch.stack(buffers)                                              # (n, C, ...)
    new_items = torch.stack(items).to(stacked.dtype)
    mask = replace.reshape((-1,) + (1,) * (new_items.dim() - 1))
    stacked[rows, slot] = torch.where(mask, new_items, stacked[rows, slot])
    prio[rows, slot] = torch.where(replace, keys, prio[rows, slot])
    prio.mul_(decay)
    torch._foreach_copy_(buffers, list(stacked.unbind(0)))
    torch._foreach_copy_(priorities, list(prio.unbind(0)))


def buffer_mean(buffers: List[Tensor], capacity: int) -> List[Tensor]:
    """``(1/C) Σ_b b`` per parameter (eq. 6; empty slots are zeros)."""
    if len(buffers) > 1 and len({(b.shape, b.dtype, b.device) for b in buffers}) == 1:
        return list(torch.stack(buffers).sum(dim=1).div_(capacity).unbind(0))  # many small tensors: one kernel
    return [buf.sum(dim=0).div_(capacity) for buf in buffers]


@torch.no_grad()
def buffer_statistics(buffers: List[Tensor], priority: Tensor) -> Dict[str, float]:
    """Size, per-coordinate variance and mean cosine agreement of one group's buffer (fig. 8)."""
    filled = priority > -math.inf
    n = int(filled.sum())
    numel = sum(b[0].numel() for b in buffers)
    out = {"buffer_size": n, "buffer_variance": math.nan, "buffer_cosine": math.nan, "numel": numel}
    if n == 0 or numel == 0:
        return out
    capacity = priority.numel()
    gram = torch.zeros(capacity, capacity, dtype=torch.float64, device=priority.device)
    for buf in buffers:
        flat = buf.reshape(capacity, -1).to(torch.float64)
        gram += flat @ flat.T
    idx = filled.nonzero().flatten()
    g = gram.index_select(0, idx).index_select(1, idx)
    sq_norms = g.diagonal()
    total_var = float(sq_norms.sum() / n - g.sum() / (n * n))
    out["buffer_variance"] = max(total_var, 0.0) / numel
    if n >= 2:
        k = int(torch.argmax(sq_norms))
        others = [j for j in range(n) if j != k]
        denom = torch.sqrt(sq_norms[k] * sq_norms[others])
        cos = g[k, others] / denom
        cos = cos[torch.isfinite(cos)]
        if cos.numel():
            out["buffer_cosine"] = float(cos.mean())
    return out


def _group_key(grads: List[Tensor]) -> Tensor:
    return norm_sq(grads).sqrt()


BUFFER_SCOPES = ("group", "tensor")


def _insert(buffers: List[Tensor], priorities: List[Tensor], items: List[Tensor], grads: List[Tensor],
            decay: float, scope: str) -> None:
    """``scope="group"``: one buffer per group keyed by the group's ‖g‖ (entries are whole-group
    snapshots); ``scope="tensor"``: one buffer per parameter tensor keyed by its own ‖g_p‖ (McRae et
    al.'s un-synced variant)."""
    if scope == "group":
        priority_insert_(buffers, priorities, items, _group_key(grads), decay)
    elif scope == "tensor":
        if len(buffers) > 1 and len({(b.shape, b.dtype, b.device) for b in buffers}) == 1:
            _stacked_priority_insert_(buffers, priorities, items, grads, decay)
        else:
            for buf, prio, item, g in zip(buffers, priorities, items, grads):
                priority_insert_([buf], [prio], [item], _group_key([g]), decay)
    else:
        raise ValueError(f"buffer_scope must be one of {BUFFER_SCOPES}, got {scope!r}")


def _ensure_buffer_state(optimizer: Optimizer, params: List[Tensor], capacity: int) -> None:
    for p in params:
        state = optimizer.state[p]
        if "buffer" not in state:
            state["buffer"] = torch.zeros((capacity, *p.shape), dtype=p.dtype, device=p.device)
            state["buffer_priority"] = torch.full((capacity,), -math.inf, dtype=p.dtype, device=p.device)


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


def adam_critical(
    params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
    buffers: List[Tensor], priorities: List[Tensor], *, kind: str, steps: List[int], lr: float, beta1: float,
    beta2: float, eps: float, weight_decay: float, capacity: int, decay: float, scope: str = "group",
    foreach: bool = False,
) -> None:
    """One Adam+CM (``kind="momenta"``) or Adam+CG (``kind="gradients"``) step, in place."""
    if not params:
        return
    if kind not in ("momenta", "gradients"):
        raise ValueError(f"kind must be 'momenta' or 'gradients', got {kind!r}")
    if weight_decay != 0:
        grads = list(torch._foreach_add(grads, params, alpha=weight_decay)) if foreach else [g.add(p, alpha=weight_decay) for g, p in zip(grads, params)]
    means = buffer_mean(buffers, capacity)
    if len(set(steps)) > 1:
        foreach = False
    if foreach:
        if kind == "momenta":
            torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
            aggregate = torch._foreach_add(exp_avgs, means)
            numerator = aggregate
            inserted = exp_avgs
        else:
            aggregate = torch._foreach_add(grads, means)
            torch._foreach_lerp_(exp_avgs, aggregate, 1 - beta1)
            numerator = exp_avgs
            inserted = grads
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, aggregate, aggregate, value=1 - beta2)
        _insert(buffers, priorities, list(inserted), grads, decay, scope)
        step = steps[0]
        bc1 = 1 - beta1 ** step
        bc2_sqrt = math.sqrt(1 - beta2 ** step)
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, numerator, denom, value=-lr / bc1)
        return
    numerators = []
    inserted = []
    for g, m, v, mean in zip(grads, exp_avgs, exp_avg_sqs, means):
        if kind == "momenta":
            m.lerp_(g, 1 - beta1)
            aggregate = m + mean
            numerators.append(aggregate)
            inserted.append(m)
        else:
            aggregate = g + mean
            m.lerp_(aggregate, 1 - beta1)
            numerators.append(m)
            inserted.append(g)
        v.mul_(beta2).addcmul_(aggregate, aggregate, value=1 - beta2)
    _insert(buffers, priorities, inserted, grads, decay, scope)
    for p, num, v, step in zip(params, numerators, exp_avg_sqs, steps):
        bc1 = 1 - beta1 ** step
        bc2_sqrt = math.sqrt(1 - beta2 ** step)
        denom = (v.sqrt() / bc2_sqrt).add_(eps)
        p.addcdiv_(num, denom, value=-lr / bc1)


def sgd_critical(
    params: List[Tensor], grads: List[Tensor], momentum_buffers: List[Optional[Tensor]], buffers: List[Tensor],
    priorities: List[Tensor], *, kind: str, lr: float, momentum: float, dampening: float, weight_decay: float,
    capacity: int, decay: float, scope: str = "group", foreach: bool = False,
) -> None:
    """One SGD+CM (``kind="momenta"``, eq. 4 + 8) or SGD+CG (``kind="gradients"``, eq. 10) step.

    ``momentum_buffers`` entries that are None are created (zeros) and written back into the list.
    """
    if not params:
        return
    if kind not in ("momenta", "gradients"):
        raise ValueError(f"kind must be 'momenta' or 'gradients', got {kind!r}")
    if weight_decay != 0:
        grads = [g.add(p, alpha=weight_decay) for g, p in zip(grads, params)]
    means = buffer_mean(buffers, capacity)
    if kind == "momenta":
        if momentum == 0:
            raise ValueError("SGD+CM needs momentum > 0 (the buffer stores momenta)")
        for i, b in enumerate(momentum_buffers):
            if b is None:  # m_0 = 0
                momentum_buffers[i] = torch.zeros_like(params[i], memory_format=torch.preserve_format)
        bufs: List[Tensor] = [b for b in momentum_buffers if b is not None]
        if foreach:
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, grads, alpha=1 - dampening)
            direction = torch._foreach_add(bufs, means)
        else:
            direction = []
            for b, g, mean in zip(bufs, grads, means):
                b.mul_(momentum).add_(g, alpha=1 - dampening)
                direction.append(b + mean)
        _insert(buffers, priorities, bufs, grads, decay, scope)
    else:
        direction = torch._foreach_add(grads, means) if foreach else [g + mean for g, mean in zip(grads, means)]
        _insert(buffers, priorities, list(grads), grads, decay, scope)
        if momentum != 0:
            # torch.optim.SGD's momentum on the aggregate: the first step starts the buffer at it
            for i, b in enumerate(momentum_buffers):
                if b is None:
                    momentum_buffers[i] = direction[i].clone()
                else:
                    b.mul_(momentum).add_(direction[i], alpha=1 - dampening)
            direction = [b for b in momentum_buffers if b is not None]
    if foreach:
        torch._foreach_add_(params, list(direction), alpha=-lr)
    else:
        for p, d in zip(params, direction):
            p.add_(d, alpha=-lr)


# --------------------------------------------------------------------------------------------
# Optimizer classes
# --------------------------------------------------------------------------------------------


def _check_buffer_args(buffer_capacity: Any, buffer_decay: Any, buffer_scope: Any = "group") -> None:
    if buffer_scope not in BUFFER_SCOPES:
        raise ValueError(f"Invalid buffer_scope: {buffer_scope!r} (must be one of {BUFFER_SCOPES})")
    if not (isinstance(buffer_capacity, int) and not isinstance(buffer_capacity, bool) and buffer_capacity >= 1):
        raise ValueError(f"Invalid buffer_capacity: {buffer_capacity!r} (must be an integer ≥ 1)")
    if not (isinstance(buffer_decay, (int, float)) and math.isfinite(buffer_decay) and 0.0 < buffer_decay <= 1.0):
        raise ValueError(f"Invalid buffer_decay: {buffer_decay!r} (must be in (0, 1])")


def _combine(parts: List[Dict[str, Any]], size: int) -> Dict[str, Any]:
    """Coordinate-weighted means of buffer statistics (NaN parts skipped)."""
    def mean(key: str) -> float:
        num = sum(q[key] * q["numel"] for q in parts if math.isfinite(q[key]))
        den = sum(q["numel"] for q in parts if math.isfinite(q[key]))
        return num / den if den else math.nan

    return {"buffer_size": int(size), "buffer_variance": mean("buffer_variance"), "buffer_cosine": mean("buffer_cosine"),
            "numel": sum(q["numel"] for q in parts)}


class _CriticalOptimizer(Optimizer):
    """Shared buffer bookkeeping and the agent-facing statistics."""

    kind: str = "momenta"

    def buffer_stats(self) -> Dict[str, Any]:
        """``buffer_size`` (group 0), ``buffer_variance`` and ``buffer_cosine`` over all groups
        (coordinate-weighted), plus ``groups``: the same per group. Costs one ``C × C`` Gram matrix
        of the buffer entries (``C²`` dot products over the parameters) and a host sync."""
        per_group = []
        for group in self.param_groups:
            params = [p for p in group["params"] if "buffer" in self.state.get(p, {})]
            if not params:
                per_group.append({"buffer_size": 0, "buffer_variance": math.nan, "buffer_cosine": math.nan, "numel": 0})
                continue
            if group["buffer_scope"] == "group":
                per_group.append(buffer_statistics([self.state[p]["buffer"] for p in params], self.state[params[0]]["buffer_priority"]))
            else:  # one buffer per tensor: coordinate-weighted means of the per-tensor statistics
                parts = [buffer_statistics([self.state[p]["buffer"]], self.state[p]["buffer_priority"]) for p in params]
                per_group.append(_combine(parts, size=min(q["buffer_size"] for q in parts)))
        out = _combine(per_group, size=per_group[0]["buffer_size"] if per_group else 0)
        out.pop("numel")
        out["groups"] = per_group
        return out

    def hyperparameters(self) -> Dict[str, Any]:
        g = self.param_groups[0]
        out: Dict[str, Any] = {
            "optimizer": type(self).__name__,
            "lr": float(g["lr"]),
            "buffer_kind": self.kind,
            "buffer_capacity": int(g["buffer_capacity"]),
            "buffer_decay": float(g["buffer_decay"]),
            "buffer_scope": g["buffer_scope"],
        }
        if "betas" in g:
            out["betas"] = tuple(g["betas"])
        if "momentum" in g:
            out["momentum"] = float(g["momentum"])
        stats = self.buffer_stats()
        out.update({k: stats[k] for k in ("buffer_size", "buffer_variance", "buffer_cosine")})
        return out


class _AdamCritical(_CriticalOptimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 buffer_capacity: int = 5, buffer_decay: float = 0.7, *, buffer_scope: str = "group",
                 foreach: Optional[bool] = None):
        check_lr(lr)
        betas = check_betas(betas)
        check_nonneg(eps, "epsilon value")
        check_nonneg(weight_decay, "weight_decay")
        _check_buffer_args(buffer_capacity, buffer_decay, buffer_scope)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, buffer_capacity=buffer_capacity,
                        buffer_decay=buffer_decay, buffer_scope=buffer_scope, foreach=foreach)
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
            capacity = group["buffer_capacity"]
            _ensure_buffer_state(self, params, capacity)
            states = [self.state[p] for p in params]
            for p, s in zip(params, states):
                if "step" not in s:
                    s["step"] = torch.tensor(0.0)
                    s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                s["step"] += 1
            beta1, beta2 = group["betas"]
            adam_critical(
                params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                [s["buffer"] for s in states], [s["buffer_priority"] for s in states], kind=self.kind,
                steps=[int(s["step"].item()) for s in states], lr=group["lr"], beta1=beta1, beta2=beta2,
                eps=group["eps"], weight_decay=group["weight_decay"], capacity=capacity, decay=group["buffer_decay"],
                scope=group["buffer_scope"], foreach=use_foreach(params, group["foreach"]),
            )
        return loss


class AdamCM(_AdamCritical):
    """Adam with critical momenta (Adam+CM eq. 4-7, Algorithm 1).

    Args:
        params: parameters or parameter groups.
        lr: step size α. betas, eps, weight_decay: as in ``torch.optim.Adam`` (L2 weight decay).
        buffer_capacity: ``C`` (paper default 5; 20 in the toy experiments).
        buffer_decay: ``λ`` (paper default 0.7; 0.99 in the toy experiments).
        buffer_scope: ``"group"`` (default: one buffer per group keyed by the group's ‖g‖) or
            ``"tensor"`` (one buffer per parameter tensor keyed by its own gradient norm).
        foreach: force or forbid the multi-tensor path.
    """

    kind = "momenta"


class AdamCG(_AdamCritical):
    """Adam with critical gradients (McRae et al. 2022; Adam+CM paper eq. 3). Same arguments as
    :class:`AdamCM`."""

    kind = "gradients"


class _SGDCritical(_CriticalOptimizer):
    _default_momentum = 0.0

    def __init__(self, params, lr: float = 1e-2, momentum: Optional[float] = None, dampening: float = 0.0,
                 weight_decay: float = 0.0, buffer_capacity: int = 5, buffer_decay: float = 0.7, *,
                 buffer_scope: str = "group", foreach: Optional[bool] = None):
        check_lr(lr)
        momentum = self._default_momentum if momentum is None else momentum
        check_unit_interval(momentum, "momentum")
        check_unit_interval(dampening, "dampening", closed_right=True)
        check_nonneg(weight_decay, "weight_decay")
        _check_buffer_args(buffer_capacity, buffer_decay, buffer_scope)
        if self.kind == "momenta" and momentum == 0:
            raise ValueError(f"Invalid momentum: {momentum!r} (SGD+CM stores momenta: momentum must be > 0)")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        buffer_capacity=buffer_capacity, buffer_decay=buffer_decay, buffer_scope=buffer_scope,
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
            capacity = group["buffer_capacity"]
            _ensure_buffer_state(self, params, capacity)
            states = [self.state[p] for p in params]
            momentum_buffers = [s.get("momentum_buffer") for s in states]
            sgd_critical(
                params, [p.grad for p in params], momentum_buffers, [s["buffer"] for s in states],
                [s["buffer_priority"] for s in states], kind=self.kind, lr=group["lr"], momentum=group["momentum"],
                dampening=group["dampening"], weight_decay=group["weight_decay"], capacity=capacity,
                decay=group["buffer_decay"], scope=group["buffer_scope"], foreach=use_foreach(params, group["foreach"]),
            )
            for s, b in zip(states, momentum_buffers):
                if b is not None:
                    s["momentum_buffer"] = b
        return loss


class SGDCM(_SGDCritical):
    """SGD with critical momenta (Adam+CM paper §5.3: eq. 4 momenta, eq. 8 update).

    ``m_t = μ m_{t−1} + (1 − dampening) g_t`` (``m_0 = 0``), ``θ ← θ − lr · aggr(m_t, 𝐦_c)``.
    Default ``momentum = 0.9``, ``dampening = 0``; ``dampening = momentum`` gives eq. 4's EMA.
    """

    kind = "momenta"
    _default_momentum = 0.9


class SGDCG(_SGDCritical):
    """SGD with critical gradients (eq. 10): ``θ ← θ − lr · aggr(g_t, 𝐠_c)``; with ``momentum > 0``
    torch-style momentum runs on the aggregate (McRae et al.'s SGD_C)."""

    kind = "gradients"
