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


# Precision and cost. fp32/fp64 tensors are reduced in their own dtype with torch's cascade
# (pairwise) summation: relative error ~1e-8 even at 4·10⁷ elements, where BLAS ``vdot`` is off
# by 7e-4 and ``vector_norm`` by 6e-3 (float32 accumulators). Upcasting whole tensors to float64
# first would be exact but costs ~7x more time and three parameter-sized temporaries per tensor
# (bench/agent_overhead.py measured it as the agent's main cost). Differences ``x − y`` are taken
# in the working dtype: exact for nearby iterates (Sterbenz), else rounded once (2^-24 relative).
# bf16/fp16 tensors are widened to float32 (exact) one tensor at a time. Per-tensor results are
# accumulated across tensors in float64.
_NATIVE = (torch.float32, torch.float64)


def _operands(*ts: Tensor) -> Sequence[Tensor]:
    """The tensors in one dtype wide enough for the reduction (float32 at least)."""
    dtype = ts[0].dtype
    if dtype in _NATIVE and all(t.dtype == dtype for t in ts):
        return ts  # the common case, without per-call promotion work
    for t in ts[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    if dtype not in _NATIVE:
        dtype = torch.float32 if not dtype.is_complex else dtype
    return [t if t.dtype == dtype else t.to(dtype) for t in ts]


def _accumulate(parts: List[Tensor]) -> Tensor:
    if all(p.dtype == parts[0].dtype for p in parts):
        return torch.stack(parts).to(ACCUMULATE_DTYPE).sum()
    return torch.stack([p.to(ACCUMULATE_DTYPE) for p in parts]).sum()


@torch.no_grad()
def dot(xs: TensorList, ys: TensorList) -> Tensor:
    """``⟨x, y⟩ = Σ_i Σ_j x_ij y_ij`` over two parameter lists (float64 result)."""
    _check_pair(xs, ys)
    if not xs:
        return _zero(xs)
    parts = []
    for x, y in zip(xs, ys):
        x, y = _operands(x, y)
        parts.append(torch.mul(x, y).sum())  # one tensor-sized temporary at a time
    return _accumulate(parts)


@torch.no_grad()
def norms_sq(xs: TensorList) -> Tensor:
    """``[‖x_1‖², ‖x_2‖², …]``: the squared norm of every tensor of the list (float64, shape (n,))."""
    if not xs:
        return torch.zeros(0, dtype=ACCUMULATE_DTYPE)
    parts = [_operands(x)[0].square().sum() for x in xs]
    if all(p.dtype == parts[0].dtype for p in parts):
        return torch.stack(parts).to(ACCUMULATE_DTYPE)
    return torch.stack([p.to(ACCUMULATE_DTYPE) for p in parts])


def norm_sq(xs: TensorList) -> Tensor:
    """``‖x‖² = Σ_i ‖x_i‖²`` over a parameter list (float64, additive across shards)."""
    if not xs:
        return _zero(xs)
    return norms_sq(xs).sum()


@torch.no_grad()
def dot_diff(gs: TensorList, xs: TensorList, ys: TensorList) -> Tensor:
    """``⟨g, x − y⟩`` computed tensor by tensor: exact where ``⟨g,x⟩ − ⟨g,y⟩`` would cancel, and
    never more than one tensor-sized temporary alive."""
    _check_pair(gs, xs)
    _check_pair(xs, ys)
    if not gs:
        return _zero(gs)
    parts = []
    for g, x, y in zip(gs, xs, ys):
        g, x, y = _operands(g, x, y)
        parts.append(torch.sub(x, y).mul_(g).sum())
    return _accumulate(parts)


@torch.no_grad()
def dot_diff_and_dist_sq(gs: TensorList, xs: TensorList, ys: TensorList) -> Tensor:
    """``[⟨g, x − y⟩, ‖x − y‖²]`` (float64, shape (2,), additive across shards) from one pass over
    ``x − y``: where both are needed, the difference is formed once."""
    _check_pair(gs, xs)
    _check_pair(xs, ys)
    if not gs:
        return torch.zeros(2, dtype=ACCUMULATE_DTYPE)
    dots, squares = [], []
    for g, x, y in zip(gs, xs, ys):
        g, x, y = _operands(g, x, y)
        d = torch.sub(x, y)
        dots.append(torch.mul(d, g).sum())
        squares.append(d.square_().sum())
    return torch.stack([_accumulate(dots), _accumulate(squares)])


@torch.no_grad()
def dist_sq(xs: TensorList, ys: TensorList) -> Tensor:
    """``‖x − y‖²`` computed tensor by tensor (float64, additive across shards)."""
    _check_pair(xs, ys)
    if not xs:
        return _zero(xs)
    parts = []
    for x, y in zip(xs, ys):
        x, y = _operands(x, y)
        parts.append(torch.sub(x, y).square_().sum())
    return _accumulate(parts)


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
