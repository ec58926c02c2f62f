"""Reductions and arithmetic over flat parameter lists.

Every formula in moxco takes parameters, gradients and updates as *lists of tensors*
(``Sequence[Tensor]``), never as one concatenated vector: that is what an optimizer's
``param_groups`` hold, what an FSDP rank owns (its shards), and what ``torch._foreach_*``
kernels consume. The reductions here return 0-dim float64 tensors on the lists' device and
never call ``.item()``: the caller decides when to synchronise, and under torch.distributed it
can ``all_reduce`` the partial sums of its shards before reading them (dot products and
squared norms add up across shards; norms do not, so we always reduce squares).

Python loops here run over tensors (a few hundred), never over elements. The reductions are
measurements, never part of an autograd graph: they run under ``torch.no_grad()``.
"""

from __future__ import annotations

from typing import Iterable, List, Sequence

import torch
from torch import Tensor

TensorList = Sequence[Tensor]

ACCUMULATE_DTYPE = torch.float64


def as_list(tensors: Iterable[Tensor]) -> List[Tensor]:
    """Materialise an iterable of tensors (e.g. ``model.parameters()``) as a list."""
    out = list(tensors)
    for t in out:
        if not isinstance(t, Tensor):
            raise TypeError(f"expected a sequence of tensors, got an element of type {type(t).__name__}")
    return out


def _check_pair(xs: TensorList, ys: TensorList) -> None:
    if len(xs) != len(ys):
        raise ValueError(f"tensor lists differ in length: {len(xs)} vs {len(ys)}")
    for i, (x, y) in enumerate(zip(xs, ys)):
        if x.shape != y.shape:
            raise ValueError(f"tensor {i} differs in shape: {tuple(x.shape)} vs {tuple(y.shape)}")


def _zero(xs: TensorList) -> Tensor:
    device = xs[0].device if len(xs) else torch.device("cpu")
    return torch.zeros((), dtype=ACCUMULATE_DTYPE, device=device)


@torch.no_grad()
def dot(xs: TensorList, ys: TensorList) -> Tensor:
    """``⟨x, y⟩ = Σ_i Σ_j x_ij y_ij`` over two parameter lists, accumulated in float64."""
    _check_pair(xs, ys)
    if not xs:
        return _zero(xs)
    # vdot over flattened views: one kernel per tensor, no concatenated copy; low-precision
    # tensors are upcast per tensor so bf16 parameters do not lose the sum.
    parts = [
        torch.vdot(x.reshape(-1).to(ACCUMULATE_DTYPE), y.reshape(-1).to(ACCUMULATE_DTYPE))
        if x.dtype != ACCUMULATE_DTYPE
        else torch.vdot(x.reshape(-1), y.reshape(-1))
        for x, y in zip(xs, ys)
    ]
    return torch.stack(parts).sum()


@torch.no_grad()
def norms_sq(xs: TensorList) -> Tensor:
    """``[‖x_1‖², ‖x_2‖², …]``: the squared norm of every tensor of the list (float64, shape (n,))."""
    if not xs:
        return torch.zeros(0, dtype=ACCUMULATE_DTYPE)
    # One fused kernel for the common fp32/fp64 case; low-precision tensors (bf16, fp16) are
    # reduced with a float64 accumulator (foreach kernels accumulate them in their own dtype).
    wide = [i for i, x in enumerate(xs) if x.dtype in (torch.float32, torch.float64)]
    norms: List[Tensor] = [None] * len(xs)  # type: ignore[list-item]
    if wide:
        for i, n in zip(wide, torch._foreach_norm([xs[i] for i in wide], 2)):
            norms[i] = n.to(ACCUMULATE_DTYPE)
    for i, x in enumerate(xs):
        if norms[i] is None:
            norms[i] = torch.linalg.vector_norm(x, dtype=ACCUMULATE_DTYPE)
    return torch.stack(norms).pow(2)


def norm_sq(xs: TensorList) -> Tensor:
    """``‖x‖² = Σ_i ‖x_i‖²`` over a parameter list (float64, additive across shards)."""
    if not xs:
        return _zero(xs)
    return norms_sq(xs).sum()


@torch.no_grad()
def dot_diff(gs: TensorList, xs: TensorList, ys: TensorList) -> Tensor:
    """``⟨g, x − y⟩`` computed tensor by tensor: exact where ``⟨g,x⟩ − ⟨g,y⟩`` would cancel, and
    never more than one parameter-sized temporary alive."""
    _check_pair(gs, xs)
    _check_pair(xs, ys)
    if not gs:
        return _zero(gs)
    parts = [
        torch.vdot(g.reshape(-1).to(ACCUMULATE_DTYPE), (x.to(ACCUMULATE_DTYPE) - y.to(ACCUMULATE_DTYPE)).reshape(-1))
        for g, x, y in zip(gs, xs, ys)
    ]
    return torch.stack(parts).sum()


@torch.no_grad()
def dist_sq(xs: TensorList, ys: TensorList) -> Tensor:
    """``‖x − y‖²`` computed tensor by tensor (float64, additive across shards)."""
    _check_pair(xs, ys)
    if not xs:
        return _zero(xs)
    parts = [(x.to(ACCUMULATE_DTYPE) - y.to(ACCUMULATE_DTYPE)).pow(2).sum() for x, y in zip(xs, ys)]
    return torch.stack(parts).sum()


def norm(xs: TensorList) -> Tensor:
    """``‖x‖`` over a parameter list (do not sum these across shards: reduce ``norm_sq``)."""
    return norm_sq(xs).sqrt()


def sub(xs: TensorList, ys: TensorList) -> List[Tensor]:
    """Elementwise ``x − y`` for two parameter lists (new tensors)."""
    _check_pair(xs, ys)
    if not xs:
        return []
    return list(torch._foreach_sub(list(xs), list(ys)))


def add_scaled(xs: TensorList, ys: TensorList, alpha: float) -> List[Tensor]:
    """Elementwise ``x + α y`` (new tensors)."""
    _check_pair(xs, ys)
    if not xs:
        return []
    return list(torch._foreach_add(list(xs), list(ys), alpha=alpha))


def scale(xs: TensorList, factor: float | Tensor) -> List[Tensor]:
    """Elementwise ``c · x`` (new tensors)."""
    if not xs:
        return []
    if isinstance(factor, Tensor):
        return [x * factor.to(x.dtype) for x in xs]
    return list(torch._foreach_mul(list(xs), factor))


def clone(xs: Iterable[Tensor]) -> List[Tensor]:
    """Detached copies of a parameter list (one extra parameter copy of memory)."""
    xs = as_list(xs)
    return [x.detach().clone() for x in xs]


def copy_(dst: TensorList, src: TensorList) -> None:
    """In-place ``dst ← src`` without autograd tracking (bit-for-bit)."""
    _check_pair(dst, src)
    if not dst:
        return
    with torch.no_grad():
        torch._foreach_copy_(list(dst), list(src))


def random_like(xs: TensorList, generator: torch.Generator | None = None) -> List[Tensor]:
    """Standard normal tensors shaped like ``xs`` (e.g. a power-iteration start)."""
    return [torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator) for x in xs]


def normalized(xs: TensorList, eps: float = 0.0) -> List[Tensor]:
    """``x / ‖x‖`` over the whole list (raises on a zero vector unless ``eps`` > 0)."""
    n = norm(xs)
    if eps == 0.0 and float(n) == 0.0:
        raise ValueError("cannot normalise a zero vector")
    return scale(xs, 1.0 / (n + eps))
