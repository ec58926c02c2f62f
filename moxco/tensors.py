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


# Large tensors on the CPU are walked in chunks through two reused scratch buffers of CHUNK
# elements: a whole-tensor temporary there is a fresh allocation the size of the tensor, whose
# pages fault in on every call (measured 6x slower at 1.6·10⁷ elements, the same below ~10⁶).
# Accelerators keep whole-tensor kernels: their caching allocators reuse temporaries, and every
# chunk would be one more kernel launch.
CHUNK = 1 << 18
CHUNKED_ABOVE = 1 << 20


def _chunked(x: Tensor) -> bool:
    return x.device.type == "cpu" and x.numel() > CHUNKED_ABOVE


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
    parts, scratch = [], None
    for x in xs:
        x = _operands(x)[0]
        if not _chunked(x):
            parts.append(x.square().sum())
            continue
        if scratch is None or scratch.dtype != x.dtype:
            scratch = torch.empty(CHUNK, dtype=x.dtype)
        flat, n = x.reshape(-1), x.numel()
        chunks = [torch.mul(flat[i:i + CHUNK], flat[i:i + CHUNK], out=scratch[: min(n, i + CHUNK) - i]).sum()
                  for i in range(0, n, CHUNK)]
        parts.append(torch.stack(chunks).to(ACCUMULATE_DTYPE).sum())
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


def _one_native_dtype(*lists: TensorList) -> bool:
    dtype = lists[0][0].dtype
    return dtype in _NATIVE and all(t.dtype == dtype for ts in lists for t in ts)


def _step_sums_chunked(g: Tensor, x: Tensor, p: Tensor | None, o: Tensor | None, columns: List[List[Tensor]],
                       scratch: List[Tensor]) -> None:
    if not scratch:
        scratch.extend(torch.empty(CHUNK, dtype=x.dtype) for _ in range(2))
    g, x = g.reshape(-1), x.reshape(-1)
    n = x.numel()
    for i in range(0, n, CHUNK):
        j = min(n, i + CHUNK)
        a, b = scratch[0][: j - i], scratch[1][: j - i]
        if p is not None:
            torch.sub(x[i:j], p.reshape(-1)[i:j], out=a)
            columns[0].append(torch.mul(a, g[i:j], out=b).sum())
            columns[1].append(a.square_().sum())
        if o is not None:
            columns[-1].append(torch.sub(x[i:j], o.reshape(-1)[i:j], out=a).square_().sum())


@torch.no_grad()
def step_sums(gs: TensorList, xs: TensorList, prev: TensorList | None, origin: TensorList | None) -> Tensor:
    """The parameter-space sums of one training step, from one pass over the parameter list
    (float64, additive across shards): ``[⟨g, x − p⟩, ‖x − p‖²]`` when ``prev`` (``p``) is given,
    then ``‖x − o‖²`` when ``origin`` (``o``) is given; shape (0,), (1,), (2,) or (3,).

    The agent's every-step metrics, with the precision of ``dot_diff`` and ``dist_sq`` (cascade
    sums per tensor or chunk, accumulated in float64), one ``x − p`` for both products, and one
    stack for all partial sums.
    """
    lists = [gs, xs] + [ts for ts in (prev, origin) if ts is not None]
    for ts in lists[2:]:
        _check_pair(xs, ts)
    _check_pair(gs, xs)
    n_columns = (2 if prev is not None else 0) + (1 if origin is not None else 0)
    if n_columns == 0 or not xs:
        return torch.zeros(n_columns, dtype=ACCUMULATE_DTYPE, device=xs[0].device if len(xs) else "cpu")
    columns: List[List[Tensor]] = [[] for _ in range(n_columns)]
    scratch: List[Tensor] = []  # CHUNK-sized, made on the first large tensor
    native = _one_native_dtype(*lists)  # the common case: no per-tensor dtype handling
    for i, x in enumerate(xs):
        p = prev[i] if prev is not None else None
        o = origin[i] if origin is not None else None
        if native and _chunked(x):
            _step_sums_chunked(gs[i], x, p, o, columns, scratch)
            continue
        if p is not None:
            g, a, p = (gs[i], x, p) if native else _operands(gs[i], x, p)
            d = torch.sub(a, p)
            columns[0].append(torch.mul(d, g).sum())
            columns[1].append(d.square_().sum())
        if o is not None:
            a, o = (x, o) if native else _operands(x, o)
            columns[-1].append(torch.sub(a, o).square_().sum())
    if native:
        return torch.stack([torch.stack(column) for column in columns]).to(ACCUMULATE_DTYPE).sum(1)
    return torch.stack([_accumulate(column) for column in columns])


@torch.no_grad()
def dist_sq(xs: TensorList, ys: TensorList, *, overwrite_ys: bool = False) -> Tensor:
    """``‖x − y‖²`` computed tensor by tensor (float64, additive across shards).

    ``overwrite_ys``: the ``ys`` are temporaries of the caller (a replay's gradient), so ``y − x``
    is formed in their memory instead of a new tensor of each one's size (the values of ``ys``
    are then garbage). Tensors that cannot be written in place (non-contiguous, such as the
    expanded gradient of a summed parameter, or requiring grad) still get a temporary.
    """
    _check_pair(xs, ys)
    if not xs:
        return _zero(xs)
    parts = []
    for x, y in zip(xs, ys):
        x, y_op = _operands(x, y)
        if overwrite_ys and y_op.is_contiguous() and not y_op.requires_grad:
            parts.append(y_op.sub_(x).square_().sum())
        else:
            parts.append(torch.sub(x, y_op).square_().sum())
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
