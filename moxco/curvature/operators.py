"""Curvature operators: which matrix a solver works on, as a matrix-free product ``v ↦ M v``.

* ``AutogradHessian``: ``H v = ∇_θ ⟨∇_θ f(θ), v⟩`` by double backward (Pearlmutter 1994; PyHessian,
  MoXCo Algorithm 2), never forming ``H``.
* ``FiniteDifferenceHessian``: the central difference of two ordinary gradients,
  ``H v ≈ (∇f(θ + εv) − ∇f(θ − εv)) / 2ε`` for a unit ``v`` (longer directions are scaled to a unit
  step), for where double backward is impossible (FSDP's reduce-scatter, fused kernels without a
  second derivative). Error ``O(ε²)`` from the third derivative plus ``O(u/ε)`` rounding (``u`` the
  unit roundoff); ``ε = u^{1/3}`` balances them (6.1e-6 in float64, 4.9e-3 in float32, as
  hessian-eigenthings 1.0 chooses).
* ``Preconditioned``: ``P^{-1/2} H P^{-1/2}`` for a positive diagonal ``P``; its eigenvalues are those
  of ``P⁻¹H``. With ``P = diag(√v̂ + ε)`` of an Adam-family optimizer (``adam_preconditioner``) its top
  eigenvalue is the *preconditioned sharpness* that Adam drives to ``2(1+β₁)/((1−β₁)η)`` (Cohen et al.
  2022, "Adaptive gradient methods at the edge of stability").

An operator is called with a direction ``vs`` (a list of tensors shaped like the parameters) and
returns ``(loss, M v)``: the loss (a detached scalar, to tell a diverged model) and the product.
Vectors are lists of tensors, never one concatenated vector, so the same code runs on FSDP shards;
``reduce`` (an ``all_reduce`` of float64 partial sums) is what the solvers use for inner products
across shards, and ``hv_mean`` averages each product over data-parallel ranks (replicated parameters,
each rank holding part of the batch: the global batch's ``H v`` is the ranks' mean).
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

from moxco import tensors
from moxco.tensors import ACCUMULATE_DTYPE, TensorList

LossFn = Callable[[], Tensor]
GradFn = Callable[[], tuple]
Reduce = Optional[Callable[[Tensor], Optional[Tensor]]]
HvMean = Optional[Callable[[List[Tensor]], List[Tensor]]]

__all__ = [
    "AutogradHessian", "FiniteDifferenceHessian", "Preconditioned", "adam_preconditioner", "fd_epsilon", "hvp",
    "fd_hvp",
]


def reduced(partials: List[Tensor], reduce: Reduce) -> List[float]:
    """Float64 partial sums (scalars, or 1-D tensors of several) completed across ranks by ``reduce``
    (one collective), as Python floats in order."""
    stacked = torch.cat([p.to(ACCUMULATE_DTYPE).reshape(-1) for p in partials])
    if reduce is not None:
        out = reduce(stacked)
        stacked = stacked if out is None else out
    return stacked.tolist()


def check_params(params, differentiable: bool = True) -> List[Tensor]:
    params = tensors.as_list(params)
    if not params:
        raise ValueError("params is empty: need at least one tensor to differentiate by")
    for i, p in enumerate(params):
        if differentiable and not p.requires_grad:
            raise ValueError(f"params[{i}] (shape {tuple(p.shape)}) does not require grad")
        if not p.is_floating_point():
            raise ValueError(f"params[{i}] has non-floating dtype {p.dtype}")
    return params


def check_vector(vs, params: List[Tensor], name: str) -> List[Tensor]:
    """Validate a direction shaped like ``params`` and return it detached, in their dtype/device."""
    if isinstance(vs, Tensor) or not isinstance(vs, Sequence):
        raise TypeError(f"{name} must be a list of tensors shaped like params, got {type(vs).__name__}")
    vs = list(vs)
    if len(vs) != len(params):
        raise ValueError(f"{name} has {len(vs)} tensors but params has {len(params)}")
    out = []
    for i, (v, p) in enumerate(zip(vs, params)):
        if not isinstance(v, Tensor):
            raise TypeError(f"{name}[{i}] is a {type(v).__name__}, not a tensor")
        if v.shape != p.shape:
            raise ValueError(f"{name}[{i}] has shape {tuple(v.shape)} but params[{i}] has shape {tuple(p.shape)}")
        out.append(v.detach().to(dtype=p.dtype, device=p.device))
    return out


def _scalar_loss(loss) -> Tensor:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        got = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn must return a scalar tensor, got {got}")
    loss = loss.reshape(())
    if not loss.requires_grad:
        raise ValueError("loss_fn returned a loss that does not depend on params (no grad_fn)")
    return loss


def _gradient_graph(loss_fn: LossFn, params: List[Tensor]):
    """``(loss, g)`` with ``g = ∇f`` still attached to its graph (``create_graph=True``)."""
    with torch.enable_grad():
        loss = _scalar_loss(loss_fn())
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    return loss.detach(), grads


def _hessian_times(grads, params: List[Tensor], vs: List[Tensor], retain_graph: bool) -> List[Tensor]:
    """``H v = Σ_i J_{g_i}ᵀ v_i = ∇⟨g, v⟩`` (H is symmetric) as one vector-Jacobian product.

    Gradient blocks that are ``None`` (parameter unused) or constant (no graph) have zero Hessian
    rows, hence (by symmetry) contribute nothing.
    """
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    if not live:
        return [torch.zeros_like(p).detach() for p in params]
    with torch.enable_grad():
        hv = torch.autograd.grad(
            [grads[i] for i in live],
            params,
            grad_outputs=[vs[i].to(grads[i].dtype) for i in live],
            retain_graph=retain_graph,
            allow_unused=True,
        )
    return [torch.zeros_like(p).detach() if h is None else _dense(h.detach()) for h, p in zip(hv, params)]


ONCE_DIFFERENTIABLE = (
    "the loss is not twice differentiable: its gradient passes through a backward marked "
    "@once_differentiable (a fused kernel without a double backward), and a Hessian-vector product by "
    "double backward would silently leave that part of the curvature out; use finite differences "
    "(FiniteDifferenceHessian)")


def check_twice_differentiable(grads) -> None:
    """Raise ``RuntimeError`` when the gradient graph holds a node that only raises when it is
    differentiated (a ``@once_differentiable`` backward's ``Error`` node). Autograd prunes such a node
    when no differentiated tensor lies behind it, which is always the case (its inputs were computed
    without a graph): ``torch.autograd.grad`` through it then returns the other paths' sum, not an
    error, and the product is wrong without a sign. One walk over the gradient's graph."""
    seen, stack = set(), [g.grad_fn for g in grads if g is not None and g.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ in ("Error", "DelayedError"):
            raise RuntimeError(ONCE_DIFFERENTIABLE)
        stack.extend(fn for fn, _ in node.next_functions)


def _dense(t: Tensor) -> Tensor:
    """Products are dense vectors like the directions (a sparse embedding's gradient is sparse)."""
    return t.to_dense() if t.layout != torch.strided else t


class AutogradHessian:
    """``v ↦ (f(θ), ∇²f(θ) v)`` by double backward.

    ``loss_fn()`` takes no arguments and returns the scalar loss computed from ``params``. Each call
    evaluates it once (forward, backward with ``create_graph=True``, and the backward through that
    graph: about 2-3 gradient evaluations), so a ``loss_fn`` that draws a new minibatch per call gives
    stochastic HVPs ``∇²f̂(θ) v`` (MoXCo A.2.1 trick 1). ``reuse_graph=True`` evaluates ``loss_fn`` once
    and keeps its gradient graph for every product until ``close()`` (PyHessian's trick: each further
    product is only the double backward), for a deterministic ``loss_fn`` only; ``graph`` starts
    from the gradient graph another such operator kept (its ``graph``: the same loss at the same
    parameters), so that several solvers on one Hessian build it once. Uses
    ``torch.autograd.grad`` only: the parameters' ``.grad`` are never touched, and nothing returned
    carries a graph. ``hv_mean``: see the module docstring. Use it as a context manager, or call
    ``close()``, to free a kept graph. A loss whose gradient passes through a ``@once_differentiable``
    backward raises ``RuntimeError`` at the first product (``check_twice_differentiable``) instead of
    giving a product without that part of the curvature.
    """

    def __init__(self, loss_fn: LossFn, params, *, reuse_graph: bool = False, hv_mean: HvMean = None,
                 reduce: Reduce = None, graph: Optional[tuple] = None) -> None:
        self.params = check_params(params)
        self.loss_fn = loss_fn
        self.reuse_graph = bool(reuse_graph) or graph is not None
        self.hv_mean = hv_mean
        self.reduce = reduce
        self.hvps = 0
        self._graph = graph  # (loss, grads) kept by reuse_graph
        self._checked = graph is not None  # the gradient graph was walked for once-differentiable nodes

    @property
    def graph(self) -> Optional[tuple]:
        """The gradient graph ``(loss, ∇f)`` kept by ``reuse_graph`` (None before the first product
        or after ``close()``)."""
        return self._graph

    def _gradient(self):
        loss, grads = _gradient_graph(self.loss_fn, self.params)
        if not self._checked:  # the graph's shape is the model's: walked at the first product
            check_twice_differentiable(grads)
            self._checked = True
        return loss, grads

    def __call__(self, vs: TensorList) -> tuple[Tensor, List[Tensor]]:
        if self.reuse_graph:
            if self._graph is None:
                self._graph = self._gradient()
            loss, grads = self._graph
            hv = _hessian_times(grads, self.params, list(vs), retain_graph=True)
        else:
            loss, grads = self._gradient()
            hv = _hessian_times(grads, self.params, list(vs), retain_graph=False)
            del grads
        self.hvps += 1
        if self.hv_mean is not None:  # data-parallel: the HVP of the global batch is the ranks' mean
            hv = self.hv_mean(hv)
        return loss, hv

    def close(self) -> None:
        """Free the gradient graph kept by ``reuse_graph``."""
        self._graph = None

    def __enter__(self) -> "AutogradHessian":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def fd_epsilon(dtype: torch.dtype) -> float:
    """The central-difference step for unit directions: ``u^{1/3}`` with ``u`` the unit roundoff of
    ``dtype`` (6.1e-6 float64, 4.9e-3 float32, 0.2 bfloat16), which balances the ``O(ε²)`` truncation
    error against the ``O(u/ε)`` rounding error of the gradient difference."""
    return float(torch.finfo(dtype).eps) ** (1.0 / 3.0)


def _autograd_gradient(loss_fn: LossFn, params: List[Tensor]) -> tuple[Tensor, List[Tensor]]:
    with torch.enable_grad():
        loss = _scalar_loss(loss_fn())
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss.detach(), [torch.zeros_like(p) if g is None else _dense(g.detach()) for g, p in zip(grads, params)]


class FiniteDifferenceHessian:
    """``v ↦ (f(θ+hv), ‖v‖ (∇f(θ + εu) − ∇f(θ − εu)) / 2ε)`` with ``u = v/‖v‖``, ``h = ε/‖v‖``:
    Hessian-vector products from two ordinary gradients, no double backward (hessian-eigenthings
    1.0's ``method="finite_difference"``).

    ``ε``: ``eps``, else ``fd_epsilon`` of the parameters' dtype: the step along the *unit* direction
    ``u``, so a direction of any length (``Preconditioned``'s ``P^{-1/2}v``, Hutchinson's ±1 vectors)
    has the error of a unit one; ``‖v‖`` is one more reduced partial sum (``reduce``). The parameters
    are moved in place to ``θ ± εu`` and restored bit for bit from a copy (one extra parameter copy
    during the call); their ``.grad`` is not touched (``torch.autograd.grad``). ``loss_fn`` must be
    deterministic between the two evaluations (same batch, no dropout): the difference of two
    different minibatch gradients is not a curvature. ``grad_fn``, if given, replaces ``loss_fn`` as
    the way to get ``(loss, ∇f)`` at the current parameters (e.g. a replay through FSDP, whose
    gradients come back sharded); ``params`` then need not require grad (FSDP's local shards do
    not), they are only moved. Error: ``O(ε²‖∇³f‖)`` truncation plus rounding ``O(u‖θ‖‖H‖/ε)``
    relative to ``‖v‖``; the tests bound it against the autograd product (1e-8 relative in float64,
    2e-3 in float32 on small MLPs).
    """

    def __init__(self, loss_fn: Optional[LossFn], params, *, eps: Optional[float] = None,
                 grad_fn: Optional[GradFn] = None, hv_mean: HvMean = None, reduce: Reduce = None) -> None:
        if loss_fn is None and grad_fn is None:
            raise ValueError("FiniteDifferenceHessian needs loss_fn or grad_fn")
        # with a grad_fn nothing differentiates by these tensors: they are only moved (FSDP's local
        # shards, which do not require grad, are the point of grad_fn)
        self.params = check_params(params, differentiable=grad_fn is None)
        if eps is None:
            eps = fd_epsilon(self.params[0].dtype)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
            raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
        self.eps = float(eps)
        self.loss_fn = loss_fn
        self.grad_fn = grad_fn
        self.hv_mean = hv_mean
        self.reduce = reduce
        self.hvps = 0

    def _gradient(self) -> tuple[Tensor, List[Tensor]]:
        if self.grad_fn is not None:
            loss, grads = self.grad_fn()
            return loss.detach().reshape(()), [_dense(g.detach()) for g in grads]
        return _autograd_gradient(self.loss_fn, self.params)

    def __call__(self, vs: TensorList) -> tuple[Tensor, List[Tensor]]:
        vs = list(vs)
        # ε is the step along the unit direction v/‖v‖, whatever ‖v‖ (Preconditioned passes P^{-1/2}v,
        # Hutchinson ±1 vectors): θ ± (ε/‖v‖)v, and the difference divided by 2ε/‖v‖
        (norm_sq,) = reduced([tensors.norm_sq(vs)], self.reduce)
        if not (math.isfinite(norm_sq) and norm_sq > 0.0):  # H·0 = 0; a non-finite direction gives NaN
            self.hvps += 1
            fill = 0.0 if norm_sq == 0.0 else math.nan
            return (torch.tensor(fill, dtype=torch.float64, device=vs[0].device),
                    [torch.full_like(v, fill) for v in vs])
        step = self.eps / math.sqrt(norm_sq)
        saved = [p.detach().clone() for p in self.params]
        try:
            with torch.no_grad():
                torch._foreach_add_([p.data for p in self.params], vs, alpha=step)
            loss, plus = self._gradient()
            with torch.no_grad():
                torch._foreach_copy_([p.data for p in self.params], saved)
                torch._foreach_add_([p.data for p in self.params], vs, alpha=-step)
            _, minus = self._gradient()
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.data for p in self.params], saved)
        hv = list(torch._foreach_sub(plus, minus))
        torch._foreach_mul_(hv, 0.5 / step)
        self.hvps += 1
        if self.hv_mean is not None:
            hv = self.hv_mean(hv)
        return loss, hv

    def close(self) -> None:
        pass

    def __enter__(self) -> "FiniteDifferenceHessian":
        return self

    def __exit__(self, *exc) -> None:
        pass


class Preconditioned:
    """``v ↦ P^{-1/2} M P^{-1/2} v`` for a positive diagonal ``P`` (a list of tensors shaped like the
    parameters) and an inner operator ``M`` (autograd or finite-difference Hessian).

    ``P^{-1/2} H P^{-1/2}`` is symmetric and similar to ``P⁻¹H`` (same eigenvalues), so the symmetric
    solvers apply. Cost: the inner product plus two elementwise products.
    """

    def __init__(self, inner, p_diag: TensorList) -> None:
        self.inner = inner
        self.params = inner.params
        self.reduce = inner.reduce
        p_diag = check_vector(p_diag, self.params, "preconditioner")
        for i, d in enumerate(p_diag):
            if not bool(torch.isfinite(d).all()) or not bool((d > 0).all()):
                raise ValueError(f"preconditioner[{i}] must be finite and > 0")
        self.inv_sqrt = list(torch._foreach_rsqrt(p_diag))

    @property
    def hvps(self) -> int:
        return self.inner.hvps

    def __call__(self, vs: TensorList) -> tuple[Tensor, List[Tensor]]:
        loss, hv = self.inner(list(torch._foreach_mul(list(vs), self.inv_sqrt)))
        return loss, list(torch._foreach_mul(hv, self.inv_sqrt))

    def close(self) -> None:
        self.inner.close()

    def __enter__(self) -> "Preconditioned":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _base_optimizer(optimizer):
    """The optimizer that holds the second moments: a wrapper's ``base`` (moxco.optim.MoXCo), else itself."""
    seen = 0
    while not any("exp_avg_sq" in s for s in optimizer.state.values()) and hasattr(optimizer, "base") and seen < 4:
        optimizer = optimizer.base
        seen += 1
    return optimizer


def adam_preconditioner(optimizer, params) -> List[Tensor]:
    """``P = √v̂ + ε`` per parameter, the denominator of an Adam-family step, from the optimizer's own
    state: ``v̂ = exp_avg_sq / (1 − β₂^t)`` (``max_exp_avg_sq`` with ``amsgrad``), ``β₂``, ``ε`` and ``t``
    of the parameter's group, exactly as ``torch.optim.Adam``/``AdamW`` (and moxco.optim's Adam
    variants) divide by it. A wrapper (moxco.optim.MoXCo) is read through its ``base``.

    Raises ``ValueError`` when a parameter has no second moment yet (before the first step) or the
    optimizer is not Adam-like (no ``exp_avg_sq``, no ``betas``/``eps``).
    """
    params = tensors.as_list(params)
    opt = _base_optimizer(optimizer)
    group_of = {}
    for group in opt.param_groups:
        for p in group["params"]:
            group_of[id(p)] = group
    out = []
    for i, p in enumerate(params):
        group = group_of.get(id(p))
        if group is None:
            raise ValueError(f"params[{i}] (shape {tuple(p.shape)}) is not in the optimizer's param_groups")
        if "betas" not in group or "eps" not in group:
            raise ValueError(f"{type(opt).__name__} is not an Adam-family optimizer (its groups have no betas/eps)")
        state = opt.state.get(p, {})
        v = state.get("max_exp_avg_sq") if group.get("amsgrad") else state.get("exp_avg_sq")
        if v is None or "step" not in state:
            raise ValueError(f"params[{i}] has no second-moment estimate yet (the optimizer has not stepped)")
        step = float(state["step"])
        if step < 1:
            raise ValueError(f"params[{i}] has no second-moment estimate yet (step {step:g})")
        beta2, eps = float(group["betas"][1]), float(group["eps"])
        bias_correction2_sqrt = math.sqrt(1.0 - beta2 ** step)
        with torch.no_grad():
            out.append((v.detach().sqrt() / bias_correction2_sqrt).add_(eps).to(p.dtype))
    return out


def hvp(loss_fn: LossFn, params, vs: TensorList) -> tuple[Tensor, List[Tensor]]:
    """Hessian-vector product by double backward: ``(f(θ), H v)`` with ``H v = ∇_θ ⟨∇_θ f(θ), v⟩``.

    ``loss_fn()`` takes no arguments and returns the scalar loss computed from ``params``; it is
    called once, so a ``loss_fn`` that draws a new minibatch per call gives a stochastic HVP
    ``∇²f̂(θ) v``. Costs one forward, one backward with ``create_graph=True`` and one backward
    through that graph (about 2-3 gradient evaluations). Uses ``torch.autograd.grad`` only: the
    parameters' ``.grad`` are not touched, and no graph outlives the call (the returned loss and
    ``H v`` are detached). ``vs`` is a list of tensors shaped like ``params``.
    """
    op = AutogradHessian(loss_fn, params)
    return op(check_vector(vs, op.params, "vs"))


def fd_hvp(loss_fn: LossFn, params, vs: TensorList, *, eps: Optional[float] = None) -> tuple[Tensor, List[Tensor]]:
    """``(f(θ + εv), (∇f(θ + εv) − ∇f(θ − εv)) / 2ε)``: ``FiniteDifferenceHessian`` for one direction.

    ``ε`` (``fd_epsilon(dtype)`` by default) is the step along the unit direction ``v/‖v‖``: the
    product is ``‖v‖ (∇f(θ + εv/‖v‖) − ∇f(θ − εv/‖v‖)) / 2ε``, accurate for any length of ``vs``."""
    op = FiniteDifferenceHessian(loss_fn, params, eps=eps)
    return op(check_vector(vs, op.params, "vs"))
