"""``Sharpness``: the algebraic top Hessian eigenvalue ``λ_max(∇²f(θ_t))`` tracked warm along training.

MoXCo A.2.1's economy (one Hessian-vector product per probe, warm started from the previous probe's
vector; the HVPs may use a fresh minibatch each) with an answer that is the top of the spectrum, not
its largest magnitude:

* a probe with no vector to start from (the first, after ``reset()`` or a NaN) runs Lanczos
  (``moxco.curvature.solvers.lanczos``) for up to ``cold_iters`` products: ``λ_max``, ``λ_min`` and the
  Ritz vector of ``λ_max``;
* a tracked probe with ``iters_per_call ≥ 2`` runs that many Lanczos steps from the kept vector;
* a tracked probe with ``iters_per_call = 1`` (the paper's choice) spends its one product on the kept
  unit vector ``v``: the estimate is the Rayleigh quotient ``vᵀHv`` (never above ``λ_max``), and the
  next vector is ``(H − σI)v / ‖(H − σI)v‖``, a power step on ``H − σI`` with the shift
  ``σ = min(0, λ̂_min)``. Power iteration converges to the eigenvalue of ``H − σI`` of largest
  magnitude; with ``σ ≤ λ_min`` the shifted matrix is positive semi-definite and that eigenvalue is
  ``λ_max − σ``, so the vector follows the top eigenvector even where negative curvature dominates
  (where an unshifted iteration, ``σ = 0``, converges to ``λ_min`` instead). ``λ̂_min`` is the last
  Lanczos estimate of ``λ_min`` minus its residual, lowered further whenever a Rayleigh quotient falls
  below it (every Rayleigh quotient is ``≥ λ_min``). Near a minimum ``λ_min ≈ 0`` and this is the
  paper's unshifted iteration. The product also gives the residual ``r = ‖Hv − ρv‖`` of the estimate
  ``ρ`` for free: the error of ``ρ`` below ``λ_max`` is about ``r²/gap`` (measured ≈ ``(r/ρ)²·ρ`` on
  MLPs), so with ``refine=τ`` a probe whose ``r > τ|ρ|`` (the vector no longer fits: the parameters or
  the batch moved too far since the last probe) continues from ``v`` as Lanczos, its first product
  reused, until the estimate moves by ``≤ refine_tol`` (1e-3: about the accuracy the gate itself lets
  through, ``τ² = 0.25 %`` for ``τ = 0.05``), at most ``cold_iters`` products.

The operator is the autograd Hessian (``hvp="autograd"``), or the central finite difference of two
gradients (``hvp="finite_difference"``, no double backward: FSDP), optionally preconditioned:
``preconditioner=`` an Adam-family optimizer (or a callable returning ``P``) tracks
``λ_max(P^{-1/2} H P^{-1/2}) = λ_max(P⁻¹H)`` with ``P = diag(√v̂ + ε)`` read at each probe.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Union

import torch
from torch import Tensor

from moxco.curvature.operators import (
    AutogradHessian, FiniteDifferenceHessian, HvMean, LossFn, Preconditioned, Reduce, adam_preconditioner,
    check_params, check_vector,
)
from moxco.curvature.solvers import EigenResult, check_iters, check_tol, lanczos, power, start_vector

__all__ = ["Sharpness"]

HVP_METHODS = ("autograd", "finite_difference")
DEFAULT_MAX_BASIS = 10  # Lanczos vectors held during a probe (thick restarts beyond)


class _KeptProduct:
    """An operator that keeps its last ``(loss, M v)`` (a one-product probe continued by Lanczos)."""

    def __init__(self, op) -> None:
        self.op, self.params, self.reduce, self.product = op, op.params, op.reduce, None

    def __call__(self, vs):
        self.product = self.op(vs)
        return self.product


class Sharpness:
    """Tracks ``λ_max(∇²f(θ_t))`` (or ``λ_max(P⁻¹∇²f)``) along training with warm-started probes.

    ``Sharpness(params, iters_per_call=1, tol=None, generator=None, *, cold_iters=None, cold_tol=None,
    refine=None, refine_tol=1e-3, reuse_graph=False, reduce=None, hv_mean=None, hvp="autograd",
    fd_eps=None, preconditioner=None, max_basis=None)``; each call ``sharpness(loss_fn)`` runs one probe
    on the current parameters and returns the estimate of the algebraic top eigenvalue (NaN if the
    loss or a product is not finite).

    * ``iters_per_call``: products per tracked probe (1: the shifted power step of the module
      docstring; ≥ 2: Lanczos from the kept vector, which also gives ``λ_min``'s estimate).
    * ``cold_iters``: the most products of a cold probe (Lanczos from a random vector drawn with
      ``generator``; default ``max(iters_per_call, 20)``). ``tol``: a probe stops early once its estimate
      moves by ``≤ tol`` relative between two products; ``cold_tol`` (default ``tol``) is that test for
      the cold probes only, after at least the products of a warm probe (Lanczos from a random vector
      passes ``1e-6`` in 7-18 products on small MLPs, within 1e-6 of ``λ_max``).
    * ``refine``: with ``iters_per_call = 1``, the relative residual above which a probe continues as
      Lanczos until its estimate moves by ``≤ refine_tol`` (module docstring; ``None``: never, exactly
      one product a probe). Ignored (``None``) with ``iters_per_call ≥ 2``.
    * ``loss_fn`` may draw a new minibatch per call (stochastic HVPs) with the autograd operator;
      ``reuse_graph=True`` evaluates it once per probe (deterministic ``loss_fn`` only).
    * ``hvp="finite_difference"``: ``(∇f(θ+εv) − ∇f(θ−εv)) / 2ε``, ``ε = fd_eps`` or ``fd_epsilon(dtype)``.
    * ``preconditioner``: an Adam-family optimizer over ``params`` (``adam_preconditioner``), or a
      callable returning ``P`` (a list of positive tensors), read at every probe.
    * ``reduce``: sums float64 partial sums across ranks (sharded parameters); ``hv_mean``: averages
      each product over data-parallel ranks.
    * ``max_basis``: Lanczos basis vectors held during a probe (default ``min(max(cold_iters,
      iters_per_call), 10)``, thick restarts beyond); between probes the tracker holds one
      parameter-sized vector.

    Attributes: ``eigenvalue`` (latest ``λ_max`` estimate, NaN before the first call),
    ``eigenvalue_min`` (the last probe's ``λ_min`` estimate when it came free with the probe's products,
    i.e. a Lanczos probe whose smallest Ritz pair has a residual ``≤ 1e-3·|θ_min|``: an eigenvalue lies
    within the residual of the Ritz value, so the report is within 1e-3 relative; NaN otherwise),
    ``shift`` (``σ`` of the next one-product probe), ``eigenvector``, ``hvps`` (total products),
    ``calls``, ``refined`` (the last probe continued past its one product), ``last`` (the last probe's
    ``EigenResult``, without its vector; ``residual`` is its estimate's).
    """

    MIN_RESIDUAL = 1e-3  # λ_min is reported when its Ritz residual is ≤ this × |θ_min| (its relative error bound)

    def __init__(
        self,
        params,
        iters_per_call: int = 1,
        tol: float | None = None,
        generator: torch.Generator | None = None,
        *,
        cold_iters: int | None = None,
        cold_tol: float | None = None,
        refine: float | None = None,
        refine_tol: float = 1e-3,
        reuse_graph: bool = False,
        reduce: Reduce = None,
        hv_mean: HvMean = None,
        hvp: str = "autograd",
        fd_eps: float | None = None,
        preconditioner: Union[torch.optim.Optimizer, Callable[[], List[Tensor]], None] = None,
        max_basis: int | None = None,
    ) -> None:
        self.params = check_params(params)
        self.iters_per_call = check_iters(iters_per_call, "iters_per_call")
        self.cold_iters = (max(self.iters_per_call, 20) if cold_iters is None
                           else check_iters(cold_iters, "cold_iters"))
        self.tol = check_tol(tol)
        self.cold_tol = self.tol if cold_tol is None else check_tol(cold_tol)
        self.refine = check_tol(refine) if self.iters_per_call == 1 else None  # Lanczos probes need none
        self.refine_tol = check_tol(refine_tol)
        self.refined = False
        self.generator = generator
        self.reuse_graph = bool(reuse_graph)
        self.reduce = reduce
        self.hv_mean = hv_mean
        if hvp not in HVP_METHODS:
            raise ValueError(f"hvp must be one of {HVP_METHODS}, got {hvp!r}")
        if hvp == "finite_difference" and reuse_graph:
            raise ValueError("reuse_graph applies to hvp='autograd' only (finite differences keep no graph)")
        self.hvp = hvp
        self.fd_eps = fd_eps
        if preconditioner is not None and not (callable(preconditioner) or hasattr(preconditioner, "state")):
            raise TypeError("preconditioner must be an Adam-family optimizer or a callable returning P")
        self.preconditioner = preconditioner
        self.max_basis = (min(max(self.cold_iters, self.iters_per_call), DEFAULT_MAX_BASIS) if max_basis is None
                          else check_iters(max_basis, "max_basis"))
        self.hvps = 0
        self.calls = 0
        self.last: Optional[EigenResult] = None
        self.reset()

    def reset(self) -> None:
        """Forget the vector, the shift and the estimates (``hvps``/``calls`` keep counting cost)."""
        self._vector: Optional[List[Tensor]] = None
        self.eigenvalue = math.nan
        self.eigenvalue_min = math.nan
        self.shift = 0.0

    @property
    def eigenvector(self) -> Optional[List[Tensor]]:
        """The unit vector the next call starts from (``None`` before a probe or after a NaN)."""
        return self._vector

    def operator(self, loss_fn: LossFn):
        """The curvature operator a probe on ``loss_fn`` uses (built per probe: ``P`` is read now)."""
        if self.hvp == "autograd":
            op = AutogradHessian(loss_fn, self.params, reuse_graph=self.reuse_graph, hv_mean=self.hv_mean,
                                 reduce=self.reduce)
        else:
            op = FiniteDifferenceHessian(loss_fn, self.params, eps=self.fd_eps, hv_mean=self.hv_mean,
                                         reduce=self.reduce)
        if self.preconditioner is None:
            return op
        if hasattr(self.preconditioner, "state") and hasattr(self.preconditioner, "param_groups"):
            p_diag = adam_preconditioner(self.preconditioner, self.params)
        else:
            p_diag = self.preconditioner()
        return Preconditioned(op, p_diag)

    def __call__(self, loss_fn: LossFn) -> float:
        """Run one probe on ``loss_fn`` and return the current ``λ_max`` estimate (NaN if diverged)."""
        cold = self._vector is None
        iters = self.cold_iters if cold else self.iters_per_call
        self.refined = False
        with self.operator(loss_fn) as op:
            v = start_vector(None, self.params, self.generator, self.reduce) if cold else self._vector
            if iters == 1:
                kept = _KeptProduct(op)
                result, nxt = power(kept, iters=1, v0=v, shift=self.shift, unit_start=True)
                if (not cold and self.refine is not None and math.isfinite(result.eigenvalue)
                        and result.residual > self.refine * abs(result.eigenvalue)):
                    # the kept vector no longer fits this Hessian: continue from it as Lanczos (its
                    # product reused) until the estimate settles to refine_tol
                    result = lanczos(op, iters=max(self.cold_iters, 2), tol=self.refine_tol, v0=v,
                                     max_basis=self.max_basis, unit_start=True, first=kept.product)
                    nxt = result.eigenvector
                    self.refined = True
            else:
                # a cold probe is at least a warm one: its iters_per_call products (when tol does not
                # cut those short), then up to cold_iters until cold_tol
                floor = self.iters_per_call if cold and self.tol is None else 1
                result = lanczos(op, iters=iters, tol=self.cold_tol if cold else self.tol, v0=v,
                                 max_basis=self.max_basis, unit_start=True, min_iters=floor)
                nxt = result.eigenvector
        self.calls += 1
        self.hvps += result.hvps
        self.last = result._replace(eigenvector=None)
        self.eigenvalue = result.eigenvalue
        self.eigenvalue_min = math.nan
        if not math.isfinite(result.eigenvalue):
            self._vector = None  # the next finite probe restarts cold instead of staying poisoned
            return self.eigenvalue
        if math.isfinite(result.eigenvalue_min):
            if result.residual_min <= self.MIN_RESIDUAL * abs(result.eigenvalue_min):
                self.eigenvalue_min = result.eigenvalue_min
            # σ ≤ λ_min keeps the one-product power step on the top eigenvector (residual: margin)
            self.shift = min(0.0, result.eigenvalue_min - result.residual_min)
        else:  # a Rayleigh quotient is ≥ λ_min: one below σ means σ is not below λ_min
            self.shift = min(self.shift, result.eigenvalue)
        self._vector = nxt
        return self.eigenvalue

    step = __call__

    def state_dict(self) -> dict:
        """The vector (CPU copies), the estimates, the shift and the counters; ``torch.save``-able."""
        return {
            "eigenvector": None if self._vector is None else [t.detach().cpu().clone() for t in self._vector],
            "eigenvalue": float(self.eigenvalue),
            "eigenvalue_min": float(self.eigenvalue_min),
            "shift": float(self.shift),
            "hvps": int(self.hvps),
            "calls": int(self.calls),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()`` output (vector moved to the parameters' dtype and device). States
        saved without ``shift``/``eigenvalue_min`` resume with ``σ = 0`` and no ``λ_min``."""
        missing = {"eigenvector", "eigenvalue", "hvps", "calls"} - set(state)
        if missing:
            raise KeyError(f"Sharpness state is missing {sorted(missing)}")
        vector = state["eigenvector"]
        self._vector = None if vector is None else check_vector(vector, self.params, "state['eigenvector']")
        self.eigenvalue = float(state["eigenvalue"])
        self.eigenvalue_min = float(state.get("eigenvalue_min", math.nan))
        shift = float(state.get("shift", 0.0))
        if not (math.isfinite(shift) and shift <= 0.0):
            raise ValueError(f"state['shift'] must be a finite number ≤ 0, got {shift!r}")
        self.shift = shift
        self.hvps = int(state["hvps"])
        self.calls = int(state["calls"])
        self.last = None

    def __repr__(self) -> str:
        return (
            f"Sharpness(eigenvalue={self.eigenvalue:.6g}, eigenvalue_min={self.eigenvalue_min:.6g}, "
            f"iters_per_call={self.iters_per_call}, tol={self.tol}, hvp={self.hvp!r}, "
            f"preconditioned={self.preconditioner is not None}, calls={self.calls}, hvps={self.hvps})"
        )
