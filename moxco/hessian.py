"""Sharpness ``λ_max(∇²f)``: Hessian-vector products and (warm-started) power iteration.

Implements the ``sharpness`` metric of DESIGN §3, i.e. MoXCo Algorithm 2 and its two tricks
(file 000, appendix A.2.1 "Eigenvalue Estimation"), which follow PyHessian/HessianFlow
(Yao et al. 2018, 2020):

* ``hvp``: ``H v = ∇_θ ⟨∇_θ f(θ), v⟩`` by double backward, never forming ``H``.
* ``power_iteration`` / ``top_eigenvalue``: ``v ← H v / ‖H v‖`` with the Rayleigh quotient
  ``λ = vᵀ H v`` of the unit iterate as the estimate (Algorithm 2, lines 2-6).
* ``Sharpness``: the tracker with both A.2.1 tricks: the HVPs may use a fresh random minibatch
  each (stochastic HVP, "trick 1"), and each probe runs only a few iterations (1 in the paper)
  warm-started from the previous probe's eigenvector ("trick 2").

Vectors are lists of tensors shaped like the parameters, never one concatenated vector, so the
same code runs on FSDP shards: the two reductions per iteration (``vᵀHv`` and ``‖Hv‖²``) are
partial sums that a ``reduce`` callable (e.g. an ``all_reduce``) sums across ranks, one
collective per HVP, as in ``moxco.metrics``. Under data parallelism (replicated parameters, the
batch split across ranks) ``hv_mean`` averages each local ``H v`` across ranks first.

Power iteration converges to the eigenvalue of largest *magnitude*. Near a minimum that is the
top eigenvalue; where a negative eigenvalue dominates (e.g. at a saddle early in training) it
returns that negative value, and ``shift=λ_negative`` gives the top one (see ``power_iteration``).
"""

from __future__ import annotations

import math
from typing import Callable, List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from moxco import tensors
from moxco.tensors import ACCUMULATE_DTYPE, TensorList

LossFn = Callable[[], Tensor]
Reduce = Optional[Callable[[Tensor], Optional[Tensor]]]
HvMean = Optional[Callable[[List[Tensor]], List[Tensor]]]

__all__ = ["EigenResult", "Sharpness", "hvp", "power_iteration", "top_eigenvalue"]


class EigenResult(NamedTuple):
    """What ``power_iteration`` found.

    ``eigenvalue``: the Rayleigh quotient ``vᵀHv`` of ``eigenvector`` (a unit vector, list of tensors
    shaped like the parameters); NaN when the loss or an HVP was not finite.
    ``hvps``: Hessian-vector products used (each one forward + backward + double backward).
    ``converged``: the relative change of the Rayleigh quotient reached ``tol``.
    ``residual``: ``‖Hv − λv‖`` of the last HVP; for a symmetric ``H`` some eigenvalue lies within
    ``residual`` of ``eigenvalue`` (free: computed from ``‖Hv‖² − λ²``).
    """

    eigenvalue: float
    eigenvector: List[Tensor]
    hvps: int
    converged: bool
    residual: float


# --- Hessian-vector products ------------------------------------------------------------------------


def _check_params(params) -> List[Tensor]:
    params = tensors.as_list(params)
    if not params:
        raise ValueError("params is empty: need at least one tensor to differentiate by")
    for i, p in enumerate(params):
        if not p.requires_grad:
            raise ValueError(f"params[{i}] (shape {tuple(p.shape)}) does not require grad")
        if not p.is_floating_point():
            raise ValueError(f"params[{i}] has non-floating dtype {p.dtype}")
    return params


def _check_vector(vs, params: List[Tensor], name: str) -> List[Tensor]:
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


def _gradient_graph(loss_fn: LossFn, params: List[Tensor]):
    """``(loss, g)`` with ``g = ∇f`` still attached to its graph (``create_graph=True``)."""
    with torch.enable_grad():
        loss = loss_fn()
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            got = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"loss_fn must return a scalar tensor, got {got}")
        loss = loss.reshape(())
        if not loss.requires_grad:
            raise ValueError("loss_fn returned a loss that does not depend on params (no grad_fn)")
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    return loss.detach(), grads


def _hessian_times(grads, params: List[Tensor], vs: List[Tensor], retain_graph: bool) -> List[Tensor]:
    """``H v = Σ_i J_{g_i}ᵀ v_i = ∇⟨g, v⟩`` (H is symmetric) as one vector-Jacobian product.

    Gradient blocks that are ``None`` (parameter unused) or constant (no graph) have zero Hessian
    rows, hence (by symmetry) contribute nothing.
    """
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    if not live:
        return [torch.zeros_like(p, memory_format=torch.preserve_format).detach() for p in params]
    with torch.enable_grad():
        hv = torch.autograd.grad(
            [grads[i] for i in live],
            params,
            grad_outputs=[vs[i].to(grads[i].dtype) for i in live],
            retain_graph=retain_graph,
            allow_unused=True,
        )
    return [torch.zeros_like(p).detach() if h is None else h.detach() for h, p in zip(hv, params)]


def hvp(loss_fn: LossFn, params, vs: TensorList) -> tuple[Tensor, List[Tensor]]:
    """Hessian-vector product by double backward: ``(f(θ), H v)`` with ``H v = ∇_θ ⟨∇_θ f(θ), v⟩``.

    ``loss_fn()`` takes no arguments and returns the scalar loss computed from ``params``; it is
    called once, so a ``loss_fn`` that draws a new minibatch per call gives a stochastic HVP
    ``∇²f̂(θ) v``. Costs one forward, one backward with ``create_graph=True`` and one backward
    through that graph (about 2-3 gradient evaluations). Uses ``torch.autograd.grad`` only: the
    parameters' ``.grad`` are not touched, and no graph outlives the call (the returned loss and
    ``H v`` are detached). ``vs`` is a list of tensors shaped like ``params``.
    """
    params = _check_params(params)
    vs = _check_vector(vs, params, "vs")
    loss, grads = _gradient_graph(loss_fn, params)
    return loss, _hessian_times(grads, params, vs, retain_graph=False)


# --- power iteration -------------------------------------------------------------------------------


def _reduced(partials: list[Tensor], reduce: Reduce) -> Tensor:
    stacked = torch.stack([p.to(ACCUMULATE_DTYPE) for p in partials])
    if reduce is None:
        return stacked
    out = reduce(stacked)
    return stacked if out is None else out


def _check_iters(iters, name: str) -> int:
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"{name} must be an integer ≥ 1, got {iters!r}")
    return iters


def _check_tol(tol) -> Optional[float]:
    if tol is None:
        return None
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
        raise ValueError(f"tol must be a finite number ≥ 0 or None, got {tol!r}")
    return float(tol)


def _start_vector(v0, params: List[Tensor], generator, reduce: Reduce) -> List[Tensor]:
    if v0 is None:
        v = tensors.random_like([p.detach() for p in params], generator=generator)
    else:
        v = _check_vector(v0, params, "v0")
    (n_sq,) = _reduced([tensors.norm_sq(v)], reduce).tolist()
    if not math.isfinite(n_sq):
        raise ValueError(f"v0 has non-finite entries (squared norm {n_sq!r})")
    if n_sq == 0.0:
        raise ValueError("v0 is the zero vector: power iteration needs a non-zero start")
    return tensors.scale(v, 1.0 / math.sqrt(n_sq))


def _power(
    loss_fn: LossFn,
    params: List[Tensor],
    v: List[Tensor],
    *,
    iters: int,
    tol: Optional[float],
    shift: float,
    reuse_graph: bool,
    reduce: Reduce,
    hv_mean: HvMean = None,
) -> tuple[EigenResult, Optional[List[Tensor]]]:
    """Power iteration from the unit vector ``v``; also returns the next iterate
    ``(H − σI)v/‖(H − σI)v‖`` (the warm start for a following call), or ``None`` after a NaN."""
    loss, grads = _gradient_graph(loss_fn, params) if reuse_graph else (None, None)
    fixed_loss_ok = reuse_graph and bool(torch.isfinite(loss))
    prev = None
    lam, residual, converged, hvps = math.nan, math.nan, False, 0
    nxt: Optional[List[Tensor]] = None
    try:
        for k in range(iters):
            if reuse_graph:
                loss_ok = fixed_loss_ok
                hv = _hessian_times(grads, params, v, retain_graph=True)
            else:
                loss, grads_k = _gradient_graph(loss_fn, params)
                loss_ok = bool(torch.isfinite(loss))
                hv = _hessian_times(grads_k, params, v, retain_graph=False)
                del grads_k
            hvps += 1
            if hv_mean is not None:  # data-parallel: the HVP of the global batch is the ranks' mean
                hv = hv_mean(hv)
            if shift:  # iterate on (H − σI); its squared norm joins the same collective
                w = tensors.add_scaled(hv, v, -shift)
                partials = [tensors.dot(v, hv), tensors.norm_sq(hv), tensors.norm_sq(w)]
                lam, hv_sq, w_sq = _reduced(partials, reduce).tolist()
            else:
                w = hv
                lam, hv_sq = _reduced([tensors.dot(v, hv), tensors.norm_sq(hv)], reduce).tolist()
                w_sq = hv_sq
            if not (loss_ok and math.isfinite(lam) and math.isfinite(hv_sq)):
                return EigenResult(math.nan, v, hvps, False, math.nan), None
            residual = math.sqrt(max(hv_sq - lam * lam, 0.0))  # ‖Hv − λv‖² = ‖Hv‖² − λ² for a unit v
            if w_sq == 0.0:  # (H − σI)v = 0: v is an exact eigenvector (e.g. H = 0)
                return EigenResult(lam, v, hvps, True, residual), v
            nxt = tensors.scale(w, 1.0 / math.sqrt(w_sq))
            if prev is not None and tol is not None and abs(lam - prev) <= tol * abs(lam):
                converged = True
                break
            prev = lam
            if k < iters - 1:
                v = nxt
    finally:
        del grads  # frees the retained graph of reuse_graph=True
    return EigenResult(lam, v, hvps, converged, residual), nxt


def power_iteration(
    loss_fn: LossFn,
    params,
    *,
    iters: int = 100,
    tol: float | None = 1e-4,
    v0: TensorList | None = None,
    generator: torch.Generator | None = None,
    shift: float = 0.0,
    reuse_graph: bool = False,
    reduce: Reduce = None,
    hv_mean: HvMean = None,
) -> EigenResult:
    """Dominant eigenpair of ``H = ∇²f(θ)`` by power iteration on Hessian-vector products.

    From a unit ``v₀`` (``v0`` normalised, else standard normal drawn with ``generator``) iterate

        λ_k = v_kᵀ H v_k,        v_{k+1} = (H − σI) v_k / ‖(H − σI) v_k‖        (σ = ``shift``)

    (MoXCo Algorithm 2) for at most ``iters`` HVPs, stopping once ``|λ_k − λ_{k−1}| ≤ tol·|λ_k|``
    (``tol=None``: run all ``iters``). Returns ``λ_k`` and ``v_k``: the eigenvalue is the Rayleigh
    quotient of the returned unit vector, so it is exact when ``v_k`` is an eigenvector, and its
    error is second order in the eigenvector's. One HVP per iteration gives both the estimate and
    the next iterate.

    The iteration converges to the eigenvalue of ``H − σI`` of largest **magnitude**, at rate
    ``|λ₂ − σ| / |λ₁ − σ|`` per step. With ``σ = 0`` that is ``λ_max`` when ``λ_max ≥ |λ_min|``
    (near minima); when a negative eigenvalue dominates, the result is that negative value
    (``λ_min``). To get ``λ_max`` then, run again with ``shift=λ_min``: ``H − λ_min I ⪰ 0`` and its
    dominant eigenvalue is ``λ_max − λ_min``; the returned value is still ``vᵀHv`` (unshifted). If
    ``λ_max = −λ_min`` exactly, the unshifted iteration does not converge (``converged=False``).

    ``loss_fn`` may draw a new minibatch per call (stochastic HVPs, MoXCo A.2.1 trick 1); the
    estimate is then noisy and the relative-change test may never pass, so pass ``tol=None``.
    ``reuse_graph=True`` evaluates ``loss_fn`` once and reuses its gradient graph for every HVP of
    the call (PyHessian's trick: each HVP is then only the double backward) at the cost of keeping
    that graph in memory until the function returns; only for a deterministic ``loss_fn``.
    ``reduce`` sums the float64 partial sums ``[vᵀHv, ‖Hv‖²]`` across ranks (sharded parameters).
    ``hv_mean`` averages each HVP over data-parallel ranks (replicated parameters, each rank
    holding part of the batch): ``H v`` of the global batch is the mean of the ranks' ``H_r v``.

    A non-finite loss or HVP (a diverged model) stops the iteration and returns NaN.
    """
    params = _check_params(params)
    iters = _check_iters(iters, "iters")
    tol = _check_tol(tol)
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not math.isfinite(shift):
        raise ValueError(f"shift must be a finite number, got {shift!r}")
    v = _start_vector(v0, params, generator, reduce)
    result, _ = _power(
        loss_fn, params, v, iters=iters, tol=tol, shift=float(shift), reuse_graph=reuse_graph, reduce=reduce,
        hv_mean=hv_mean,
    )
    return result


def top_eigenvalue(
    loss_fn: LossFn,
    params,
    *,
    iters: int = 100,
    tol: float | None = 1e-4,
    v0: TensorList | None = None,
    generator: torch.Generator | None = None,
    shift: float = 0.0,
    reuse_graph: bool = False,
    reduce: Reduce = None,
    hv_mean: HvMean = None,
) -> tuple[float, List[Tensor]]:
    """``(λ, v)`` with ``λ = vᵀ∇²f(θ)v`` for the unit ``v`` power iteration converged to.

    ``power_iteration`` with the same arguments, keeping only the eigenvalue and eigenvector (use
    ``power_iteration`` for the HVP count, the convergence flag and the residual). The eigenvalue is
    that of largest magnitude: negative if a negative curvature dominates; ``shift`` then recovers
    the top one (see ``power_iteration``). Pass the returned ``v`` as ``v0`` of a later call to warm
    start it.
    """
    result = power_iteration(
        loss_fn,
        params,
        iters=iters,
        tol=tol,
        v0=v0,
        generator=generator,
        shift=shift,
        reuse_graph=reuse_graph,
        reduce=reduce,
        hv_mean=hv_mean,
    )
    return result.eigenvalue, result.eigenvector


# --- the tracker -------------------------------------------------------------------------------------


class Sharpness:
    """Tracks ``λ_max(∇²f(θ_t))`` along training (MoXCo A.2.1 with warm start).

    Each call runs ``iters_per_call`` power iterations (1 is the paper's choice) on the current
    ``loss_fn``, starting from the vector the previous call ended on, and returns the Rayleigh
    quotient ``vᵀ∇²f(θ_t)v`` of the warm-started vector (advanced by the call's iterations). While
    the Hessian drifts slowly the vector stays aligned with its top eigenvector, so a probe costs
    ``iters_per_call`` HVPs instead of the tens a cold start needs. With ``tol`` a call stops
    early once the relative change of the Rayleigh quotient between two of its iterations is ≤ tol.

    A call that has no vector to start from (the first, after ``reset()``, after a NaN) starts from
    a random one drawn with ``generator`` and runs up to ``cold_iters`` iterations (default:
    ``iters_per_call``; e.g. ``cold_iters=100, tol=1e-3`` converges the first probe properly).

    ``loss_fn`` may draw a new minibatch per call (stochastic HVPs). A non-finite loss or HVP
    (diverged training) returns NaN and drops the vector, so the next finite probe restarts cold
    instead of staying poisoned. ``state_dict()``/``load_state_dict()`` resume the vector and
    counters. ``reuse_graph``, ``reduce`` and ``hv_mean`` are passed to ``power_iteration``.

    Attributes: ``eigenvalue`` (latest estimate, NaN before the first call), ``eigenvector`` (the
    warm start of the next call, a unit vector list or ``None``), ``hvps`` (total HVPs spent),
    ``calls``, ``last`` (the last call's ``EigenResult``).
    """

    def __init__(
        self,
        params,
        iters_per_call: int = 1,
        tol: float | None = None,
        generator: torch.Generator | None = None,
        *,
        cold_iters: int | None = None,
        reuse_graph: bool = False,
        reduce: Reduce = None,
        hv_mean: HvMean = None,
    ) -> None:
        self.params = _check_params(params)
        self.iters_per_call = _check_iters(iters_per_call, "iters_per_call")
        self.cold_iters = self.iters_per_call if cold_iters is None else _check_iters(cold_iters, "cold_iters")
        self.tol = _check_tol(tol)
        self.generator = generator
        self.reuse_graph = bool(reuse_graph)
        self.reduce = reduce
        self.hv_mean = hv_mean
        self.hvps = 0
        self.calls = 0
        self.last: Optional[EigenResult] = None  # the last probe's figures (eigenvector not kept)
        self.reset()

    def reset(self) -> None:
        """Forget the vector and the estimate (the counters ``hvps``/``calls`` keep counting cost)."""
        self._vector: Optional[List[Tensor]] = None
        self.eigenvalue = math.nan

    @property
    def eigenvector(self) -> Optional[List[Tensor]]:
        """The unit vector the next call starts from: ``Hv/‖Hv‖`` of the last HVP (one power step
        ahead of the vector whose Rayleigh quotient is ``eigenvalue``), or ``None``."""
        return self._vector

    def __call__(self, loss_fn: LossFn) -> float:
        """Run one probe on ``loss_fn`` and return the current sharpness estimate (NaN if diverged)."""
        cold = self._vector is None
        v = _start_vector(None, self.params, self.generator, self.reduce) if cold else self._vector
        result, nxt = _power(
            loss_fn,
            self.params,
            v,
            iters=self.cold_iters if cold else self.iters_per_call,
            tol=self.tol,
            shift=0.0,
            reuse_graph=self.reuse_graph,
            reduce=self.reduce,
            hv_mean=self.hv_mean,
        )
        self.calls += 1
        self.hvps += result.hvps
        # the Rayleigh vector is one power step behind ``nxt``: not kept, so the tracker holds one
        # parameter-sized vector between calls (DESIGN §6 memory budget)
        self.last = result._replace(eigenvector=None)
        self.eigenvalue = result.eigenvalue
        self._vector = nxt
        return self.eigenvalue

    step = __call__

    def state_dict(self) -> dict:
        """The vector (CPU copies), the last estimate and the counters; ``torch.save``-able."""
        return {
            "eigenvector": None if self._vector is None else [t.detach().cpu().clone() for t in self._vector],
            "eigenvalue": float(self.eigenvalue),
            "hvps": int(self.hvps),
            "calls": int(self.calls),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()`` output (vector moved to the parameters' dtype and device)."""
        missing = {"eigenvector", "eigenvalue", "hvps", "calls"} - set(state)
        if missing:
            raise KeyError(f"Sharpness state is missing {sorted(missing)}")
        vector = state["eigenvector"]
        self._vector = None if vector is None else _check_vector(vector, self.params, "state['eigenvector']")
        self.eigenvalue = float(state["eigenvalue"])
        self.hvps = int(state["hvps"])
        self.calls = int(state["calls"])
        self.last = None

    def __repr__(self) -> str:
        return (
            f"Sharpness(eigenvalue={self.eigenvalue:.6g}, iters_per_call={self.iters_per_call}, "
            f"tol={self.tol}, calls={self.calls}, hvps={self.hvps})"
        )
