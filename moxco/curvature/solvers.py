"""Solvers over any curvature operator (``moxco.curvature.operators``): extreme eigenvalues and the trace.

* ``lanczos``: symmetric Lanczos with full reorthogonalisation (Paige 1976; Golub & Van Loan §10.1)
  from a given or random unit vector. ``m`` products span the Krylov space ``K_m(M, v)``; the
  tridiagonal projection ``T_m`` gives Ritz values whose largest is the **algebraic** ``λ_max`` (never
  above it, converging from below) and whose smallest is ``λ_min``'s (never below it), both from the
  same products. The Ritz vector of ``λ_max`` is the warm start of a later call.
* ``power``: power iteration on ``M − σI`` (MoXCo Algorithm 2; ``σ`` = ``shift``), one product per
  iteration. It converges to the eigenvalue of ``M − σI`` of largest *magnitude*: that is ``λ_max``
  only when ``λ_max − σ > |λ_min − σ|``, e.g. for any ``σ ≤ λ_min``.
* ``hutchinson``: ``tr(M) ≈ (1/s) Σ zᵢᵀ M zᵢ`` over Rademacher vectors ``zᵢ`` (Hutchinson 1990), with
  its standard error.

Every reduction is a float64 partial sum over the vector's tensors that the operator's ``reduce``
(an ``all_reduce`` across shards) completes: one or two collectives per product. A non-finite loss
or product (a diverged model) stops a solver, which then returns NaN.
"""

from __future__ import annotations

import math
from typing import List, NamedTuple, Optional

import torch
from torch import Tensor

from moxco import tensors
from moxco.curvature.operators import AutogradHessian, Reduce, check_params, check_vector, reduced
from moxco.tensors import ACCUMULATE_DTYPE

__all__ = ["EigenResult", "TraceResult", "lanczos", "power", "hutchinson", "start_vector"]


class EigenResult(NamedTuple):
    """What a solver found.

    ``eigenvalue``: the estimate of the top eigenvalue (``power``: the Rayleigh quotient ``vᵀMv`` of
    ``eigenvector``; ``lanczos``: the largest Ritz value, which is the Rayleigh quotient of its Ritz
    vector ``eigenvector``); NaN when the loss or a product was not finite. ``eigenvector``: a unit
    vector, list of tensors shaped like the parameters (``None`` where not kept).
    ``hvps``: operator products used. ``converged``: the stopping test passed.
    ``residual``: ``‖Mv − λv‖`` for the returned pair: some eigenvalue lies within it (free).
    ``eigenvalue_min``, ``residual_min``: the smallest Ritz value and its residual (``lanczos`` with at
    least two products; NaN otherwise).
    """

    eigenvalue: float
    eigenvector: Optional[List[Tensor]]
    hvps: int
    converged: bool
    residual: float
    eigenvalue_min: float = math.nan
    residual_min: float = math.nan


class TraceResult(NamedTuple):
    """``estimate`` of ``tr(M)``, its standard error ``stderr`` (sample std / √s; NaN for s = 1), and the
    products used."""

    estimate: float
    stderr: float
    hvps: int


def check_iters(iters, name: str) -> int:
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"{name} must be an integer ≥ 1, got {iters!r}")
    return iters


def check_tol(tol) -> Optional[float]:
    if tol is None:
        return None
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
        raise ValueError(f"tol must be a finite number ≥ 0 or None, got {tol!r}")
    return float(tol)


def start_vector(v0, params: List[Tensor], generator, reduce: Reduce) -> List[Tensor]:
    """``v0`` (validated) or a standard normal vector drawn with ``generator``, normalised to unit length."""
    if v0 is None:
        v = tensors.random_like([p.detach() for p in params], generator=generator)
    else:
        v = check_vector(v0, params, "v0")
    (n_sq,) = reduced([tensors.norm_sq(v)], reduce)
    if not math.isfinite(n_sq):
        raise ValueError(f"v0 has non-finite entries (squared norm {n_sq!r})")
    if n_sq == 0.0:
        raise ValueError("v0 is the zero vector: an eigensolver needs a non-zero start")
    return tensors.scale(v, 1.0 / math.sqrt(n_sq))


def _combination(coefficients, vectors: List[List[Tensor]]) -> List[Tensor]:
    """``Σ_i c_i V_i`` over lists of tensors (no autograd)."""
    out = tensors.scale(vectors[0], float(coefficients[0]))
    for c, v in zip(coefficients[1:], vectors[1:]):
        torch._foreach_add_(out, v, alpha=float(c))
    return out


def lanczos(op, *, iters: int, tol: Optional[float] = None, v0=None, generator: Optional[torch.Generator] = None,
            max_basis: Optional[int] = None, keep_vector: bool = True, unit_start: bool = False,
            min_iters: int = 1, first=None) -> EigenResult:
    """Extreme eigenvalues of the symmetric operator ``op`` by Lanczos with full reorthogonalisation.

    From the unit ``q₁`` (``v0`` normalised, else standard normal from ``generator``), each product
    ``w = M q_k`` is orthogonalised against the whole basis by classical Gram-Schmidt, twice ("twice is
    enough"); the coefficients ``Qᵀ M q_k`` are column ``k`` of the projected matrix ``T = QᵀMQ``
    (tridiagonal in exact arithmetic: ``α_k`` on the diagonal, ``β`` beside it), and
    ``q_{k+1} = w / ‖w‖``. The largest eigenvalue ``θ`` of ``T`` with eigenvector ``s`` is the estimate of
    ``λ_max`` and ``y = Qs`` its Ritz vector, with residual ``‖My − θy‖ = ‖w‖ |s_k|``; the smallest gives
    ``λ_min``'s estimate the same way (``which="LA"`` and ``"SA"`` of hessian-eigenthings, from one run).
    Stops after ``iters`` products, when the largest Ritz value moves by ``≤ tol`` relative between two
    products once ``min_iters`` are done (``tol=None``: never), or at a breakdown (``‖w‖`` at rounding
    level: the Krylov space is invariant and the Ritz values exact). ``first``: ``(loss, M q₁)``, the
    start vector's product already computed (a tracker's one-product probe continued; it counts in
    ``hvps``, and its tensors are overwritten).

    Memory: the basis, at most ``max_basis`` (≥ 3; default ``iters``) parameter-sized vectors. When it
    is full the run restarts thick (Wu & Simon 2000): it keeps the Ritz vectors of ``λ_max`` and
    ``λ_min`` and the last Lanczos vector, with their projected matrix (the Ritz values and the
    coupling ``‖w‖ s_k``), so both extremes keep converging. ``iters=1`` gives the Rayleigh quotient of
    the start vector. ``unit_start=True``: ``v0`` is already a unit vector of the right shapes (a
    tracker's kept vector; saves a collective). A non-finite loss or product returns NaN.
    """
    params = op.params
    iters = check_iters(iters, "iters")
    tol = check_tol(tol)
    max_basis = iters if max_basis is None else check_iters(max_basis, "max_basis")
    min_iters = check_iters(min_iters, "min_iters")
    max_basis = max(max_basis, 3)
    reduce = op.reduce
    q = list(v0) if unit_start and v0 is not None else start_vector(v0, params, generator, reduce)
    rounding = float(torch.finfo(params[0].dtype).eps)

    basis: List[List[Tensor]] = [q]
    T = torch.zeros(1, 1, dtype=torch.float64)  # QᵀMQ; its last column is filled by the next product
    hvps = 0
    theta_max = theta_min = res_max = res_min = math.nan
    prev = None
    converged = False
    theta = s = None
    while True:
        k = len(basis) - 1
        if first is not None and hvps == 0:
            loss, w = first[0], list(first[1])
        else:
            loss, w = op(basis[k])
        hvps += 1
        sums = reduced([tensors.dot(b, w) for b in basis] + [loss.to(ACCUMULATE_DTYPE)], reduce)
        coeffs, loss_value = sums[:-1], sums[-1]
        if not (math.isfinite(loss_value) and all(math.isfinite(c) for c in coeffs)):
            return EigenResult(math.nan, None, hvps, False, math.nan)
        torch._foreach_sub_(w, _combination(coeffs, basis))
        second = reduced([tensors.dot(b, w) for b in basis] + [tensors.norm_sq(w)], reduce)
        coeffs2, w_sq = second[:-1], second[-1]
        torch._foreach_sub_(w, _combination(coeffs2, basis))
        column = torch.tensor([a + b for a, b in zip(coeffs, coeffs2)], dtype=torch.float64)
        T[:, k] = column
        T[k, :] = column
        beta = math.sqrt(max(w_sq - sum(c * c for c in coeffs2), 0.0))
        if not math.isfinite(beta):
            return EigenResult(math.nan, None, hvps, False, math.nan)
        theta, s = torch.linalg.eigh(T)
        theta_max, theta_min = float(theta[-1]), float(theta[0])
        res_max, res_min = beta * abs(float(s[-1, -1])), beta * abs(float(s[-1, 0]))
        scale = max(abs(theta_max), abs(theta_min), 1e-300)
        if beta <= 8 * rounding * scale * math.sqrt(k + 1):  # breakdown: the Ritz values are exact
            converged = True
        if (prev is not None and tol is not None and hvps >= min_iters
                and abs(theta_max - prev) <= tol * abs(theta_max)):
            converged = True
        prev = theta_max
        if converged or hvps >= iters:
            break
        nxt = tensors.scale(w, 1.0 / beta)
        if len(basis) >= max_basis:  # thick restart: [y_max, y_min, q_next]
            kept = [_normalized(_combination(s[:, i].tolist(), basis), reduce) for i in (-1, 0)]
            basis = [kept[0], kept[1], nxt]
            T = torch.zeros(3, 3, dtype=torch.float64)
            T[0, 0], T[1, 1] = theta_max, theta_min
            T[0, 2] = T[2, 0] = beta * float(s[-1, -1])
            T[1, 2] = T[2, 1] = beta * float(s[-1, 0])
            continue
        basis.append(nxt)
        grown = torch.zeros(k + 2, k + 2, dtype=torch.float64)
        grown[: k + 1, : k + 1] = T
        grown[k + 1, k] = grown[k, k + 1] = beta
        T = grown
    if len(basis) == 1:  # one product: the Rayleigh quotient; no λ_min information
        theta_min = res_min = math.nan
    vector = _normalized(_combination(s[:, -1].tolist(), basis), reduce) if keep_vector else None
    return EigenResult(theta_max, vector, hvps, converged, res_max, theta_min, res_min)


def _normalized(v: List[Tensor], reduce: Reduce) -> List[Tensor]:
    (n_sq,) = reduced([tensors.norm_sq(v)], reduce)
    return tensors.scale(v, 1.0 / math.sqrt(n_sq))


def power(op, *, iters: int, tol: Optional[float] = None, v0=None, generator: Optional[torch.Generator] = None,
          shift: float = 0.0, unit_start: bool = False) -> tuple[EigenResult, Optional[List[Tensor]]]:
    """Power iteration on ``M − σI`` (``σ`` = ``shift``) from a unit vector; also returns the next iterate.

        λ_k = v_kᵀ M v_k,        v_{k+1} = (M − σI) v_k / ‖(M − σI) v_k‖

    for at most ``iters`` products, stopping once ``|λ_k − λ_{k−1}| ≤ tol·|λ_k|``. The estimate is the
    (unshifted) Rayleigh quotient of the returned unit vector. It converges to the eigenvalue of
    ``M − σI`` of largest magnitude, at rate ``max_{i>1} |λ_i − σ| / |λ_1 − σ|``: with ``σ ≤ λ_min``
    that is ``λ_max``; with ``σ = 0`` it is ``λ_min`` wherever ``|λ_min| > λ_max``. The second value
    returned is ``v_{k+1}`` (the warm start of a following call), or ``None`` after a NaN.
    ``unit_start``: as for ``lanczos``.
    """
    params = op.params
    reduce = op.reduce
    iters = check_iters(iters, "iters")
    tol = check_tol(tol)
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not math.isfinite(shift):
        raise ValueError(f"shift must be a finite number, got {shift!r}")
    shift = float(shift)
    v = list(v0) if unit_start and v0 is not None else start_vector(v0, params, generator, reduce)
    prev = None
    lam, residual, converged, hvps = math.nan, math.nan, False, 0
    nxt: Optional[List[Tensor]] = None
    for k in range(iters):
        loss, hv = op(v)
        hvps += 1
        # vᵀMv, ‖Mv‖² and ‖(M − σI)v‖² in one pass, the loss in the same collective
        lam, hv_sq, w_sq, loss_value = reduced([tensors.power_sums(v, hv, shift), loss], reduce)
        if not (math.isfinite(loss_value) and math.isfinite(lam) and math.isfinite(hv_sq)):
            return EigenResult(math.nan, v, hvps, False, math.nan), None
        residual = math.sqrt(max(hv_sq - lam * lam, 0.0))  # ‖Mv − λv‖² = ‖Mv‖² − λ² for a unit v
        if w_sq == 0.0:  # (M − σI)v = 0: v is an exact eigenvector (e.g. M = 0)
            return EigenResult(lam, v, hvps, True, residual), v
        scale = 1.0 / math.sqrt(w_sq)  # the next iterate (M − σI)v / ‖(M − σI)v‖, formed once
        nxt = list(torch._foreach_mul(hv, scale))
        if shift:
            torch._foreach_add_(nxt, v, alpha=-shift * scale)
        if prev is not None and tol is not None and abs(lam - prev) <= tol * abs(lam):
            converged = True
            break
        prev = lam
        if k < iters - 1:
            v = nxt
    return EigenResult(lam, v, hvps, converged, residual), nxt


def hutchinson(op, *, samples: int, generator: Optional[torch.Generator] = None) -> TraceResult:
    """Hutchinson's estimator ``tr(M) ≈ (1/s) Σ_{i≤s} zᵢᵀ M zᵢ`` with Rademacher ``zᵢ`` (entries ±1).

    Unbiased; its variance per sample is ``2(‖M‖_F² − Σ_j M_jj²)`` for Rademacher vectors (Hutchinson
    1990; Avron & Toledo 2011), so the standard error falls as ``1/√s``. ``samples`` products.
    Under sharding the vectors are drawn per shard from ``generator`` (ranks must seed it alike for
    replicated parameters). A non-finite loss or product gives NaN.
    """
    params = op.params
    samples = check_iters(samples, "samples")
    values = []
    for _ in range(samples):
        z = [torch.randint(0, 2, p.shape, generator=generator, dtype=torch.int8).to(p.device, p.dtype).mul_(2).sub_(1)
             for p in params]
        loss, hz = op(z)
        value, loss_value = reduced([tensors.dot(z, hz), loss.to(ACCUMULATE_DTYPE)], op.reduce)
        if not (math.isfinite(value) and math.isfinite(loss_value)):
            return TraceResult(math.nan, math.nan, len(values) + 1)
        values.append(value)
    mean = sum(values) / samples
    if samples > 1:
        var = sum((x - mean) ** 2 for x in values) / (samples - 1)
        stderr = math.sqrt(var / samples)
    else:
        stderr = math.nan
    return TraceResult(mean, stderr, samples)


# --- loss_fn conveniences (the autograd Hessian) ---------------------------------------------------


def power_iteration(loss_fn, params, *, iters: int = 100, tol: float | None = 1e-4, v0=None,
                    generator: torch.Generator | None = None, shift: float = 0.0, reuse_graph: bool = False,
                    reduce: Reduce = None, hv_mean=None) -> EigenResult:
    """Dominant eigenpair of ``H = ∇²f(θ)`` by power iteration on autograd Hessian-vector products.

    ``power`` on ``AutogradHessian(loss_fn, params, reuse_graph=…, hv_mean=…, reduce=…)``: MoXCo
    Algorithm 2. The result is the eigenvalue of largest **magnitude** of ``H − σI`` (``σ`` =
    ``shift``), reported unshifted: ``λ_min`` wherever a negative curvature dominates and ``σ = 0``.
    For the algebraic top eigenvalue use ``top_eigenvalue`` (Lanczos), or ``shift ≤ λ_min``.
    ``loss_fn`` may draw a new minibatch per call (stochastic HVPs; pass ``tol=None`` then).
    ``reuse_graph=True`` evaluates ``loss_fn`` once for the whole call (deterministic ``loss_fn`` only).
    """
    with AutogradHessian(loss_fn, params, reuse_graph=reuse_graph, hv_mean=hv_mean, reduce=reduce) as op:
        result, _ = power(op, iters=iters, tol=tol, v0=v0, generator=generator, shift=shift)
    return result


def top_eigenvalue(loss_fn, params, *, iters: int = 100, tol: float | None = 1e-4, v0=None,
                   generator: torch.Generator | None = None, reuse_graph: bool = False, reduce: Reduce = None,
                   hv_mean=None, max_basis: Optional[int] = None) -> tuple[float, List[Tensor]]:
    """``(λ_max, v)``: the algebraic largest eigenvalue of ``∇²f(θ)`` and its unit Ritz vector, by Lanczos.

    ``lanczos`` on the autograd Hessian (``iters`` products at most, stopping at a relative change
    ``≤ tol`` of the estimate); ``λ_max`` is the top of the spectrum whatever the sign of the other
    eigenvalues. Use ``extreme_eigenvalues`` for ``λ_min``, the HVP count and residuals. Pass the
    returned ``v`` as ``v0`` of a later call to warm start it.
    """
    result = extreme_eigenvalues(loss_fn, params, iters=iters, tol=tol, v0=v0, generator=generator,
                                 reuse_graph=reuse_graph, reduce=reduce, hv_mean=hv_mean, max_basis=max_basis)
    return result.eigenvalue, result.eigenvector


def extreme_eigenvalues(loss_fn, params, *, iters: int = 100, tol: float | None = 1e-4, v0=None,
                        generator: torch.Generator | None = None, reuse_graph: bool = False, reduce: Reduce = None,
                        hv_mean=None, max_basis: Optional[int] = None) -> EigenResult:
    """``lanczos`` on ``AutogradHessian(loss_fn, params, …)``: ``λ_max`` (``eigenvalue``), ``λ_min``
    (``eigenvalue_min``), residuals, Ritz vector and HVP count. ``params`` validated as for ``hvp``."""
    params = check_params(params)
    with AutogradHessian(loss_fn, params, reuse_graph=reuse_graph, hv_mean=hv_mean, reduce=reduce) as op:
        return lanczos(op, iters=iters, tol=tol, v0=v0, generator=generator, max_basis=max_basis)


def hessian_trace(loss_fn, params, *, samples: int = 100, generator: torch.Generator | None = None,
                  reuse_graph: bool = True, reduce: Reduce = None, hv_mean=None) -> TraceResult:
    """``tr(∇²f(θ))`` by ``hutchinson`` on the autograd Hessian (``samples`` HVPs; the graph is reused
    across them by default, so ``loss_fn`` runs once)."""
    with AutogradHessian(loss_fn, params, reuse_graph=reuse_graph, hv_mean=hv_mean, reduce=reduce) as op:
        return hutchinson(op, samples=samples, generator=generator)
