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

from moxco import native

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


# Precision and cost. fp32/fp64 tensors are reduced in their own dtype, per tensor or piece, and
# accumulated across them in float64. Sums of products that may cancel (⟨g, x − y⟩) use torch's
# cascade (pairwise) summation: relative error ~1e-8 even at 4·10⁷ elements, where one BLAS
# ``vdot`` is off by 7e-4 and ``vector_norm`` by 6e-3 (float32 accumulators). Squared norms,
# whose terms never cancel, are BLAS dots over DOT_CHUNK-element pieces: ~1e-7 relative (1e-6 at
# worst), with no temporary (see ``_sq_sum``). Upcasting whole tensors to float64 first would be
# exact but costs ~7x more time and parameter-sized temporaries (bench/agent_overhead.py measured
# it as the agent's main cost). Differences ``x − y`` are taken in the working dtype: exact for
# nearby iterates (Sterbenz), else rounded once (2^-24 relative). bf16/fp16 tensors are widened
# to float32 (exact) one tensor at a time. On the CPU, ``step_sums``, ``dot_diff``, ``norms_sq`` and
# ``dist_sq`` first try ``moxco.native``'s fused kernels: one pass, float64 accumulators (~1e-12).
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


# Squared norms of contiguous float32/float64 vectors are BLAS dots, which read the vector once and
# write nothing (``x.square().sum()`` writes a tensor-sized temporary first: on the CPU a fresh
# allocation whose pages fault in on every call). One dot's float32 accumulators lose precision
# with length (1e-6 relative at 2.6·10⁵ elements, 7e-6 at 10⁶), so on the CPU the vector is cut
# into DOT_CHUNK-element pieces whose dots are summed in float64: 1e-7 at 4·10⁶ elements, the
# cascade sum's precision, at 0.6× its time. Accelerators take one dot (a tree reduction).
DOT_CHUNK = 1 << 16


def _sq_sum(flat: Tensor) -> Tensor:
    """``‖v‖²`` of a contiguous 1-D float32/float64 tensor (see ``DOT_CHUNK``): in its dtype, or
    in float64 when summed from pieces."""
    n = flat.numel()
    if flat.device.type != "cpu" or n <= DOT_CHUNK:
        return torch.dot(flat, flat)
    pieces = [flat[i:i + DOT_CHUNK] for i in range(0, n, DOT_CHUNK)]
    return torch.stack([torch.dot(v, v) for v in pieces]).to(ACCUMULATE_DTYPE).sum()


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
    fused = native.norms_sq(xs)
    if fused is not None:
        return fused
    if _one_native_dtype(xs) and all(x.is_contiguous() for x in xs):  # the common case, in few dispatches
        return torch.stack([_sq_sum(x.view(-1)) for x in xs]).to(ACCUMULATE_DTYPE)
    parts = []
    for x in xs:
        x = _operands(x)[0]
        parts.append(_sq_sum(x.view(-1)) if x.dtype in _NATIVE and x.is_contiguous() else x.square().sum())
    return torch.stack([p.to(ACCUMULATE_DTYPE) for p in parts])


def norm_sq(xs: TensorList) -> Tensor:
    """``‖x‖² = Σ_i ‖x_i‖²`` over a parameter list (float64, additive across shards)."""
    if not xs:
        return _zero(xs)
    return norms_sq(xs).sum()


@torch.no_grad()
def power_sums(vs: TensorList, hs: TensorList, shift: float = 0.0) -> Tensor:
    """``[⟨v, h⟩, ‖h‖², ‖h − σv‖²]`` (float64, shape (3,), additive across shards): the sums of a
    power step ``h = Mv`` on ``M − σI`` (its Rayleigh quotient, residual and next norm), in one pass
    where the fused kernel reads the tensors (``native.power_sums``)."""
    _check_pair(vs, hs)
    shift = float(shift)
    if not vs:
        return torch.zeros(3, dtype=ACCUMULATE_DTYPE)
    fused = native.power_sums(vs, hs, shift)
    if fused is not None:
        return fused
    h_sq = norm_sq(hs)
    w_sq = norm_sq(add_scaled(hs, vs, -shift)) if shift else h_sq
    return torch.stack([dot(vs, hs), h_sq, w_sq])


@torch.no_grad()
def dot_diff(gs: TensorList, xs: TensorList, ys: TensorList) -> Tensor:
    """``⟨g, x − y⟩`` computed tensor by tensor: exact where ``⟨g,x⟩ − ⟨g,y⟩`` would cancel, and
    never more than one tensor-sized temporary alive."""
    _check_pair(gs, xs)
    _check_pair(xs, ys)
    if not gs:
        return _zero(gs)
    fused = native.step_sums(gs, xs, ys, None, advance=False)
    if fused is not None:
        return fused[1]
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
            columns[1].append(_sq_sum(a))
        if o is not None:
            columns[-1].append(_sq_sum(torch.sub(x[i:j], o.reshape(-1)[i:j], out=a)))


@torch.no_grad()
def step_sums(gs: TensorList, xs: TensorList, prev: TensorList | None, origin: TensorList | None, *,
              advance: bool = False, grad_norm_sq: bool = False) -> Tensor:
    """The parameter-space sums of one training step, from one pass over the parameter list
    (float64, additive across shards): ``‖g‖²`` when ``grad_norm_sq``; then ``⟨g, x − p⟩`` and
    ``‖x − p‖²`` when ``prev`` (``p``) is given; then ``‖x − o‖²`` when ``origin`` (``o``) is given;
    shape (0,) to (4,).

    The agent's every-step metrics, with the precision of ``dot_diff`` and ``dist_sq`` (see the
    note on precision above), one ``x − p`` for both products, and one stack for all partial sums.
    On the CPU they are one fused pass (``moxco.native``: every array read once, ``prev`` written
    once if at all, float64 accumulators) where the kernels are available.

    ``advance``: afterwards ``prev`` holds ``xs``, bit for bit (the agent's ``x_{t−1}`` becomes
    ``x_t``). Without the kernels, when ``prev`` and ``origin`` are ``FlatCopy`` buffers the
    differences are then formed in ``prev``'s own memory (``_advancing_step_sums``): a few
    whole-buffer calls, no temporaries; except on the CPU with a tensor above ``CHUNKED_ABOVE``,
    walked in chunks, then copied.
    """
    _check_pair(gs, xs)
    for ts in (prev, origin):
        if ts is not None:
            _check_pair(xs, ts)
    fused = _fused_step_sums(gs, xs, prev, origin, advance, grad_norm_sq)
    if fused is not None:
        return fused
    sums = _eager_step_sums(gs, xs, prev, origin, advance)
    if grad_norm_sq:
        sums = torch.cat([norm_sq(gs).reshape(1).to(sums.device), sums])
    return sums


def _fused_step_sums(gs: TensorList, xs: TensorList, prev: TensorList | None, origin: TensorList | None,
                     advance: bool, grad_norm_sq: bool) -> Tensor | None:
    """``step_sums`` from ``native.step_sums`` (``[‖g‖², ⟨g, x − p⟩, ‖x − p‖², ‖x − o‖²]``: what is
    asked for is a slice of it), or ``None``. Without ``prev`` the origin takes its place."""
    if not xs or (prev is None and origin is None and not grad_norm_sq):
        return None
    if prev is None and origin is None:
        norms = native.norms_sq(gs)
        return None if norms is None else norms.sum().reshape(1)
    if prev is None:  # the first step: ‖x − o‖² is the "‖x − p‖²" of the origin
        sums = native.step_sums(gs, xs, origin, None, advance=False)
        return None if sums is None else (sums[[0, 2]] if grad_norm_sq else sums[2:3])
    sums = native.step_sums(gs, xs, prev, origin, advance=advance)
    if sums is None:
        return None
    return sums[0 if grad_norm_sq else 1:4 if origin is not None else 3]


def _eager_step_sums(gs: TensorList, xs: TensorList, prev: TensorList | None, origin: TensorList | None,
                     advance: bool) -> Tensor:
    if not advance or prev is None:
        return _step_sums(gs, xs, prev, origin)
    try:
        if _advances_in_place(gs, xs, prev, origin):
            return _advancing_step_sums(gs, xs, prev, origin)
        return _step_sums(gs, xs, prev, origin)
    finally:
        copy_(prev, xs)  # whatever happened above, prev ends as x, bit for bit


def _step_sums(gs: TensorList, xs: TensorList, prev: TensorList | None, origin: TensorList | None) -> Tensor:
    lists = [gs, xs] + [ts for ts in (prev, origin) if ts is not None]
    n_columns = (2 if prev is not None else 0) + (1 if origin is not None else 0)
    if n_columns == 0 or not xs:
        return torch.zeros(n_columns, dtype=ACCUMULATE_DTYPE, device=xs[0].device if len(xs) else "cpu")
    columns: List[List[Tensor]] = [[] for _ in range(n_columns)]
    scratch: List[Tensor] = []  # CHUNK-sized, made on the first large tensor
    one_dtype = _one_native_dtype(*lists)  # the common case: no per-tensor dtype handling
    for i, x in enumerate(xs):
        p = prev[i] if prev is not None else None
        o = origin[i] if origin is not None else None
        if one_dtype and _chunked(x):
            _step_sums_chunked(gs[i], x, p, o, columns, scratch)
            continue
        if p is not None:
            g, a, p = (gs[i], x, p) if one_dtype else _operands(gs[i], x, p)
            d = torch.sub(a, p)
            columns[0].append(torch.mul(d, g).sum())
            columns[1].append(_sq_sum(d.reshape(-1)))
        if o is not None:
            a, o = (x, o) if one_dtype else _operands(x, o)
            columns[-1].append(_sq_sum(torch.sub(a, o).reshape(-1)))
    if one_dtype:
        return torch.stack([torch.stack(column).to(ACCUMULATE_DTYPE) for column in columns]).sum(1)
    return torch.stack([_accumulate(column) for column in columns])


def _advances_in_place(gs: TensorList, xs: TensorList, prev: TensorList, origin: TensorList | None) -> bool:
    if not isinstance(prev, FlatCopy) or not (origin is None or isinstance(origin, FlatCopy)):
        return False
    shapes = [x.shape for x in xs]
    if shapes != prev.shapes or [g.shape for g in gs] != shapes or (origin is not None and origin.shapes != shapes):
        _check_pair(gs, xs)  # raises with the first mismatch
        _check_pair(xs, prev)
        _check_pair(xs, origin if origin is not None else xs)
    kinds = {(t.dtype, t.device) for ts in (gs, xs) for t in ts}
    if kinds != {(prev.flat.dtype, prev.flat.device)}:
        return False
    # whole-buffer passes stream from memory: on the CPU, a tensor above CHUNKED_ABOVE is walked
    # faster in cache-sized chunks (bench/agent_overhead.py, the step_sums table), and the chunked
    # walk plus one copy beats them from 4·10⁶ elements on
    return not (prev.flat.device.type == "cpu" and any(_chunked(x) for x in xs))


def _advancing_step_sums(gs: TensorList, xs: TensorList, prev: "FlatCopy", origin: "FlatCopy | None") -> Tensor:
    """``step_sums(..., advance=True)`` in ``prev``'s buffer ``b`` (views ``p_i``), each pass one
    call whatever the number of tensors: ``p_i ← p_i − x_i`` (= −(x − p)); ``‖b‖²``;
    ``p_i ← p_i · g_i``; ``−Σ b`` (the cascade sum: ⟨g, x − p⟩); for the origin ``p_i ← x_i``,
    ``b ← b − o``, ``‖b‖²``; and last (in ``step_sums``) ``p_i ← x_i``. The padding between
    views is zero in both buffers and stays zero, so whole-buffer reductions may include it."""
    views, flat, xs = list(prev), prev.flat, list(xs)
    torch._foreach_sub_(views, xs)
    sums = [None, _sq_sum(flat).to(ACCUMULATE_DTYPE)]
    torch._foreach_mul_(views, list(gs))
    sums[0] = flat.sum().to(ACCUMULATE_DTYPE).neg()
    if origin is not None:
        torch._foreach_copy_(views, xs)
        flat.sub_(origin.flat)
        sums.append(_sq_sum(flat).to(ACCUMULATE_DTYPE))
    return torch.stack(sums)  # (the caller, step_sums, then copies x into prev)


@torch.no_grad()
def dist_sq(xs: TensorList, ys: TensorList, *, overwrite_ys: bool = False, x_scale: Tensor | None = None) -> Tensor:
    """``‖x − y‖²``, or ``‖s·x − y‖²`` with ``x_scale = s`` (a 0-dim tensor, not read on the host),
    computed tensor by tensor (float64, additive across shards).

    ``overwrite_ys``: the ``ys`` are temporaries of the caller (a replay's gradient), so ``y − s·x``
    is formed in their memory instead of a new tensor of each one's size (the values of ``ys`` are
    then garbage). When every ``y`` can be written (``_dist_sq_in_place``) that is one elementwise
    pass and one cascade sum per tensor. Tensors that cannot be written in place
    (non-contiguous, such as the expanded gradient of a summed parameter, or requiring grad) still
    get a temporary.
    """
    _check_pair(xs, ys)
    if not xs:
        return _zero(xs)
    if x_scale is None or x_scale.device.type == "cpu":  # (reading a CPU scale synchronises nothing)
        fused = native.dist_sq(xs, ys, 1.0 if x_scale is None else float(x_scale))
        if fused is not None:
            return fused
    if (overwrite_ys and _one_native_dtype(xs, ys) and all(_writable(y) for y in ys)
            and all(x.layout == torch.strided for x in xs)  # not a sparse .grad (nn.Embedding(sparse=True))
            and len({t.device for ts in (xs, ys) for t in ts}) == 1):
        return _dist_sq_in_place(list(xs), list(ys), x_scale)
    parts = []
    for x, y in zip(xs, ys):
        x, y_op = _operands(x, y)
        scale = None if x_scale is None else x_scale.to(device=x.device, dtype=x.dtype)
        if overwrite_ys and _writable(y_op):
            diff = y_op.sub_(x) if scale is None else y_op.addcmul_(x, scale, value=-1)
        else:
            diff = torch.sub(x if scale is None else x * scale, y_op)
        parts.append(_sq_sum(diff.reshape(-1)) if diff.dtype in _NATIVE else diff.square_().sum())
    return _accumulate(parts)


def _dist_sq_in_place(xs: List[Tensor], ys: List[Tensor], x_scale: Tensor | None) -> Tensor:
    """``dist_sq`` in the ``ys``' own memory: ``y ← (y − s·x)²``, then one sum per tensor.

    Without a scale the squared difference is one elementwise pass (ATen's unreduced ``mse_loss``
    written into ``y``); with one, ``y ← y − s·x`` then ``y ← y²``. Then the cascade sum of the
    squares, not a BLAS dot of the difference: on the MLP of ``bench/agent_overhead.py``, right
    after a replay's backward, this takes 0.65× the time of a subtraction followed by chunked dots
    (``_sq_sum``), with a relative error of 1e-7 where the dots' float32 accumulators are off by
    5e-6 on a real gradient difference.
    """
    if x_scale is None:
        for x, y in zip(xs, ys):
            torch.ops.aten.mse_loss.out(y, x, 0, out=y)  # reduction 0: none, elementwise (y − x)²
    else:
        scale = x_scale.to(device=ys[0].device, dtype=ys[0].dtype)
        for x, y in zip(xs, ys):
            y.addcmul_(x, scale, value=-1)
        torch._foreach_pow_(ys, 2)
    return torch.stack([y.sum() for y in ys]).sum(dtype=ACCUMULATE_DTYPE)


def _writable(t: Tensor) -> bool:
    """Whether a caller's temporary can take a result in place (not an expanded view, not a leaf
    that requires grad)."""
    return t.is_contiguous() and not t.requires_grad


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


FLAT_ALIGN = 16  # elements: each view starts on a 64-byte boundary (float32), for vectorised kernels


class FlatCopy(list):
    """A detached copy of a parameter list in one zero-padded contiguous buffer ``flat``; the list
    holds views of it shaped like the originals, so every function here takes it as a list.

    One buffer turns a pass over all the parameters into one call whatever their number (a
    language model has hundreds of tensors, and each call costs microseconds of dispatch), and
    lets ``step_sums(..., advance=True)`` use the copy itself as the scratch for ``x − p``. The
    padding between views is zero and stays zero: whole-buffer reductions may include it.
    """

    flat: Tensor
    shapes: List[torch.Size]
    numels: List[int]
    addresses: tuple

    def __init__(self, xs: Iterable[Tensor]) -> None:
        xs = [x.detach() for x in as_list(xs)]
        if not FlatCopy.fits(xs):
            raise ValueError("FlatCopy needs a non-empty list of float32 or float64 tensors on one device")
        offsets, end = [], 0
        for x in xs:
            offsets.append(end)
            end += -(-x.numel() // FLAT_ALIGN) * FLAT_ALIGN
        self.flat = torch.zeros(end, dtype=xs[0].dtype, device=xs[0].device)
        self.shapes = [x.shape for x in xs]
        self.numels = [x.numel() for x in xs]
        super().__init__(self.flat[o:o + x.numel()].view(x.shape) for o, x in zip(offsets, xs))
        torch._foreach_copy_(list(self), xs)
        # the views' addresses, for moxco.native's kernels: fixed for the copy's life
        self.addresses = tuple(v.data_ptr() for v in self)

    @staticmethod
    def fits(xs: TensorList) -> bool:
        """Whether ``xs`` can share one buffer: non-empty, one float32/float64 dtype, one device."""
        return (len(xs) > 0 and xs[0].dtype in _NATIVE
                and all(x.dtype == xs[0].dtype and x.device == xs[0].device for x in xs))


def copy_params(xs: Iterable[Tensor]) -> List[Tensor]:
    """A detached copy of a parameter list: a ``FlatCopy`` where the tensors can share one buffer,
    else one copy per tensor (``clone``). Either way one extra parameter copy of memory."""
    xs = as_list(xs)
    return FlatCopy(xs) if FlatCopy.fits(xs) else clone(xs)


def copy_(dst: TensorList, src: TensorList) -> None:
    """In-place ``dst ← src`` without autograd tracking (bit-for-bit)."""
    _check_pair(dst, src)
    if not dst:
        return
    with torch.no_grad():
        torch._foreach_copy_(list(dst), list(src))


def random_like(xs: TensorList, generator: torch.Generator | None = None) -> List[Tensor]:
    """Standard normal tensors shaped like ``xs`` (e.g. a power-iteration start). With a
    ``generator``, drawn on the generator's device and moved to each tensor's: a CPU generator
    serves parameters on an accelerator (PyTorch refuses a generator of another device), and one
    seed gives the same vector whatever the parameters' device."""
    if generator is None:
        return [torch.randn(x.shape, dtype=x.dtype, device=x.device) for x in xs]
    return [torch.randn(x.shape, dtype=x.dtype, device=generator.device, generator=generator).to(x.device)
            for x in xs]


def normalized(xs: TensorList, eps: float = 0.0) -> List[Tensor]:
    """``x / ‖x‖`` over the whole list (raises on a zero vector unless ``eps`` > 0)."""
    n = norm(xs)
    if eps == 0.0 and float(n) == 0.0:
        raise ValueError("cannot normalise a zero vector")
    return scale(xs, 1.0 / (n + eps))
