"""Toy loss landscapes from the papers, as batched, differentiable torch functions.

The optimizer papers this project implements test exploration and flat-minimum bias on small
analytic landscapes before touching a network. This module gives those landscapes in one
place, with their published global minima checked against independent search (see
``tests/moxco/test_landscapes.py``), so that optimizer tests, escape-ratio studies and the
sharpness / goodness-score diagnostics can be run against a known ground truth.

Every function takes a tensor ``x`` of shape ``(..., d)`` (leading dimensions are a batch)
and returns shape ``(...)``. Everything is written with differentiable torch operations, so
``torch.autograd`` / ``torch.func.grad`` give gradients and, where the function is smooth,
``torch.func.hessian`` and Hessian-vector products work (forward-over-reverse included).

Sources (paper files in ``/work/shared/papers``; equation numbers are the papers'):

=========================  ====================================================================
function                   where it comes from
=========================  ====================================================================
``beale``                  MoXCo (000) §4(i), Fig. 2, A.4.1; workshop version (001) Fig. 1
``ackley``                 MoXCo (000) Fig. 1, A.4.1 (any d); Adam+CM (002) eq. 11 (d = 2)
``goldstein_price``        Adam+CM (002) Fig. 1, Table 1 (the classical function)
``log_goldstein_price``    Adam+CM (002) eq. 12: Picheny et al. (2013)'s log form
``levy``                   Adam+CM (002) eq. 13, Table 1 / Table 5
``ackley_rosenbrock``      Adam+CM (002) eq. 14, Fig. 11
``rosenbrock``             the classical function (a component of eq. 14)
``sharp_flat``             Adam+CM (002) eq. 9, Figs. 5-7, 17, 18 (two minima per coordinate)
``quadratic``              MoXCo (000) Theorem 2 / A.3: ``½xᵀAx + bᵀx + c``
=========================  ====================================================================

Standard definitions were cross-checked against Surjanovic & Bingham, *Virtual Library of
Simulation Experiments* (VLSE, sfu.ca/~ssurjano). The PDF extraction of the papers garbles
several formulas; where the printed formula and the standard one disagree, the function's
docstring says which one is implemented and why. In short:

* MoXCo A.4.1 prints Beale's third term as ``(2.625 − x₁x₁x₂³)²``; the standard term is
  ``(2.625 − x₁ + x₁x₂³)²`` (the printed one gives ``f(3, 0.5) = 2.25``, contradicting the
  stated minimum 0 there). The standard form is implemented.
* Adam+CM eq. 12 prints the Goldstein-Price log form without Picheny's input rescaling
  ``x̄ = 4x − 2`` and with garbled brackets, and places the minimum "at [0,1]²".
  ``log_goldstein_price`` implements ``(log GP(x) − 8.693) / 2.427`` in the original
  coordinates (minimum at (0, −1), as the brief and eq. 12's variables have it);
  ``unit_square=True`` gives Picheny's exact form on [0, 1]² (minimum at (0.5, 0.25)).
* Adam+CM eq. 14 (Ackley+Rosenbrock) states its global minimum at (2.1, 3.9), which is not a
  stationary point of the printed formula. The nearest minimum is (1.99766, 4.00122)
  (f = 0.368653, the lowest point of windows such as [−5, 5]²); the global minimum over R²
  is (2.99463, 9.00055), f = 0.356326. See :func:`ackley_rosenbrock`.
* Adam+CM says eq. 9 has "two global minima"; for D > 1 it has 2^D (every vertex of
  {0, 1}^D). See :func:`sharp_flat`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "Landscape",
    "LANDSCAPES",
    "get_landscape",
    "beale",
    "ackley",
    "goldstein_price",
    "log_goldstein_price",
    "levy",
    "ackley_rosenbrock",
    "rosenbrock",
    "sharp_flat",
    "SharpFlatMinima",
    "sharp_flat_minima",
    "Quadratic",
    "quadratic",
    "quadratic_minimiser",
    "GP_LOG_MEAN",
    "GP_LOG_STD",
    "LOG_GOLDSTEIN_PRICE_MIN",
    "ACKLEY_ROSENBROCK_MIN_POINT",
    "ACKLEY_ROSENBROCK_MIN_VALUE",
    "ACKLEY_ROSENBROCK_LOCAL_MIN_POINT",
    "ACKLEY_ROSENBROCK_LOCAL_MIN_VALUE",
    "ACKLEY_ROSENBROCK_PAPER_POINT",
]

Point = Tuple[float, ...]

# Picheny et al. (2013) standardisation constants of log GP (mean, std over the square).
GP_LOG_MEAN = 8.693
GP_LOG_STD = 2.427
#: min of ``log_goldstein_price``: ``(log 3 − 8.693) / 2.427 ≈ −3.1291255506``.
LOG_GOLDSTEIN_PRICE_MIN = (math.log(3.0) - GP_LOG_MEAN) / GP_LOG_STD

# Ackley+Rosenbrock (Adam+CM eq. 14) as printed: minima found numerically (multi-start
# L-BFGS on a dense grid, then Newton-refined to a gradient norm ~1e-14 in float64).
ACKLEY_ROSENBROCK_MIN_POINT: Point = (2.9946286438483076, 9.000552306944048)
ACKLEY_ROSENBROCK_MIN_VALUE = 0.3563258835434221
ACKLEY_ROSENBROCK_LOCAL_MIN_POINT: Point = (1.9976576968504525, 4.0012200425309)
ACKLEY_ROSENBROCK_LOCAL_MIN_VALUE = 0.3686532731164665
#: where Adam+CM (A.2.1, item 4) says the global minimum is; not a stationary point.
ACKLEY_ROSENBROCK_PAPER_POINT: Point = (2.1, 3.9)


# ---------------------------------------------------------------------------------------
# input handling
# ---------------------------------------------------------------------------------------


def _prepare(x: Any, name: str, dim: Optional[int] = None, min_dim: int = 1) -> Tensor:
    """Return ``x`` as a real floating tensor of shape (..., d), checking ``d``."""
    if not isinstance(x, Tensor):
        x = torch.as_tensor(x)
    if x.is_complex():
        raise TypeError(f"{name} expects a real tensor, got dtype {x.dtype}")
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    if x.ndim == 0:
        want = f"(..., {dim})" if dim is not None else "(..., d)"
        raise ValueError(f"{name} expects x of shape {want} (last dim = coordinates), got a 0-dim tensor")
    d = x.shape[-1]
    if dim is not None and d != dim:
        raise ValueError(
            f"{name} is defined on R^{dim}: expected x of shape (..., {dim}), got shape {tuple(x.shape)}"
        )
    if d < min_dim:
        raise ValueError(
            f"{name} needs at least {min_dim} coordinate(s) in the last dim, got shape {tuple(x.shape)}"
        )
    return x


def _safe_sqrt(t: Tensor) -> Tensor:
    """``sqrt(t)`` for ``t >= 0`` whose derivative at ``t = 0`` is 0 instead of inf·0 = NaN.

    Used for the Euclidean radius in Ackley-type terms: at the origin the radius is not
    differentiable; returning the zero subgradient keeps optimizers and Hessian-vector
    products finite there.
    """
    positive = t > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, t, torch.ones_like(t))), torch.zeros_like(t))


def _check_s(s: Any) -> Any:
    if isinstance(s, Tensor):
        if s.numel() != 1:
            raise ValueError(f"sharpness s must be a scalar, got a tensor of shape {tuple(s.shape)}")
        value = float(s.detach().reshape(()))
    else:
        try:
            value = float(s)
        except (TypeError, ValueError):
            raise TypeError(f"sharpness s must be a real number, got {s!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"sharpness s must be a finite number > 0 (the paper uses s > 1), got {value}")
    return s.reshape(()) if isinstance(s, Tensor) else value


# ---------------------------------------------------------------------------------------
# the landscapes
# ---------------------------------------------------------------------------------------


def beale(x: Tensor) -> Tensor:
    """Beale function (MoXCo §4(i), Fig. 2 and A.4.1; workshop version Fig. 1).

    ``f(x) = (1.5 − x₁ + x₁x₂)² + (2.25 − x₁ + x₁x₂²)² + (2.625 − x₁ + x₁x₂³)²``

    Domain: R² (usually evaluated on [−4.5, 4.5]²); x of shape (..., 2).
    Global minimum: ``f(3, 0.5) = 0`` (smooth; Hessian there [[3.15625, −11.4375],
    [−11.4375, 46.125]], positive definite with eigenvalues ≈ 0.3015 and 48.98).

    Discrepancy: MoXCo A.4.1 prints the third term as ``(2.625 − x₁x₁x₂³)²``, which gives
    ``f(3, 0.5) = 2.25`` and contradicts the paper's own minimum; the standard term (VLSE) is
    implemented. MoXCo §4(i) also says Beale "contains three sub-optimal and one global
    minima": a multi-start L-BFGS-B search finds only one interior minimum in [−4.5, 4.5]²
    (every other run ends on the boundary of the box), so those "sub-optimal minima" are
    presumably where its optimizers stalled on the flat regions, not critical points of f.
    """
    x = _prepare(x, "beale", dim=2)
    x1, x2 = x[..., 0], x[..., 1]
    return (
        (1.5 - x1 + x1 * x2) ** 2
        + (2.25 - x1 + x1 * x2**2) ** 2
        + (2.625 - x1 + x1 * x2**3) ** 2
    )


def ackley(x: Tensor, a: float = 20.0, b: float = 0.2, c: float = 2 * math.pi) -> Tensor:
    """Ackley function in any dimension (MoXCo Fig. 1, A.4.1; Adam+CM eq. 11 for d = 2).

    ``f(x) = −a·exp(−b·sqrt((1/d) Σᵢ xᵢ²)) − exp((1/d) Σᵢ cos(c·xᵢ)) + a + e``

    with a = 20, b = 0.2, c = 2π by default. Adam+CM eq. 11 is exactly the d = 2 case
    (``0.5(x² + y²)`` and ``0.5(cos 2πx + cos 2πy)``). Evaluated here as
    ``a·(1 − exp(−b r)) + (e − exp(mean cos))`` so that ``f(0) = 0`` exactly.

    Domain: R^d, any d ≥ 1 (usually [−32.768, 32.768]^d); x of shape (..., d).
    Global minimum: ``f(0, …, 0) = 0``, unique for any a > 0, b > 0 (both bracketed terms
    are ≥ 0 and vanish together only at the origin). Many local minima near the integer
    lattice.

    Smoothness: f is smooth except at the origin — the global minimum — where the term
    ``a(1 − exp(−b‖x‖/√d))`` has a cone-shaped tip (f grows linearly, slope ``ab/√d``).
    Autograd returns the zero subgradient there (not NaN); the Hessian at the origin is not
    meaningful.
    """
    x = _prepare(x, "ackley")
    r = _safe_sqrt((x * x).mean(dim=-1))
    return a * (-torch.expm1(-b * r)) + (math.e - torch.exp(torch.cos(c * x).mean(dim=-1)))


def _gp_factors(x: Tensor) -> Tuple[Tensor, Tensor]:
    """The two factors of Goldstein-Price, written in u = x₁ + x₂ and v = 2x₁ − 3x₂.

    ``[1 + (x₁+x₂+1)²(19 − 14x₁ + 3x₁² − 14x₂ + 6x₁x₂ + 3x₂²)] = 1 + (u+1)²(3u² − 14u + 19)``
    ``[30 + (2x₁−3x₂)²(18 − 32x₁ + 12x₁² + 48x₂ − 36x₁x₂ + 27x₂²)] = 30 + v²(3v² − 16v + 18)``
    (expand: 3x₁² + 6x₁x₂ + 3x₂² = 3u², 12x₁² − 36x₁x₂ + 27x₂² = 3v², −32x₁ + 48x₂ = −16v).
    """
    u = x[..., 0] + x[..., 1]
    v = 2 * x[..., 0] - 3 * x[..., 1]
    f1 = 1 + (u + 1) ** 2 * (3 * u**2 - 14 * u + 19)
    f2 = 30 + v**2 * (3 * v**2 - 16 * v + 18)
    return f1, f2


def goldstein_price(x: Tensor) -> Tensor:
    """Goldstein-Price function (the landscape of Adam+CM Fig. 1; VLSE "goldpr").

    ``f(x) = [1 + (x₁+x₂+1)²(19 − 14x₁ + 3x₁² − 14x₂ + 6x₁x₂ + 3x₂²)]
             × [30 + (2x₁−3x₂)²(18 − 32x₁ + 12x₁² + 48x₂ − 36x₁x₂ + 27x₂²)]``

    Domain: R² (usually [−2, 2]²); x of shape (..., 2).
    Global minimum: ``f(0, −1) = 3``.

    Structure (used by the tests): with u = x₁ + x₂ and v = 2x₁ − 3x₂ the function factors as
    ``F₁(u)·F₂(v)`` with ``F₁ = 1 + (u+1)²(3u² − 14u + 19) ≥ 1`` and
    ``F₂ = 30 + v²(3v² − 16v + 18) ≥ 3``; ``F₁' = 12(u+1)(u−1)(u−2)`` and
    ``F₂' = 12v(v−1)(v−3)``. So f > 0 everywhere and its local minima are exactly
    (u, v) ∈ {−1, 2} × {0, 3}: f(0, −1) = 3 (global), f(−0.6, −0.4) = 30, f(1.8, 0.2) = 84,
    f(1.2, 0.8) = 840.
    """
    x = _prepare(x, "goldstein_price", dim=2)
    f1, f2 = _gp_factors(x)
    return f1 * f2


def log_goldstein_price(x: Tensor, unit_square: bool = False) -> Tensor:
    """Log-scaled Goldstein-Price of Adam+CM eq. 12 (Picheny et al., 2013).

    ``f(x) = (log GP(x̄) − 8.693) / 2.427`` with natural log and ``GP`` =
    :func:`goldstein_price`; ``x̄ = x`` by default, ``x̄ = 4x − 2`` if ``unit_square``.

    * ``unit_square=False`` (default): domain R² (usually [−2, 2]²), global minimum
      ``f(0, −1) = (log 3 − 8.693)/2.427 ≈ −3.12913``; local minima at (−0.6, −0.4),
      (1.8, 0.2), (1.2, 0.8) with values ≈ −2.18039, −1.75615, −0.80742.
    * ``unit_square=True``: Picheny et al.'s exact form on [0, 1]² (VLSE "goldprsc"; the
      constants standardise log GP to mean 0, variance 1 there); global minimum
      ``f(0.5, 0.25) ≈ −3.12913``.

    Since GP ≥ 3 > 0 everywhere, the log is smooth on all of R² (computed as
    ``log F₁ + log F₂``, see :func:`goldstein_price`).

    Discrepancy: eq. 12 as extracted reads ``(1/2.427) log[1 + …] × [30 + … − 8.693]``
    (brackets garbled: the −8.693 belongs outside the log, the × inside it) and writes the
    polynomial in the raw x, y, yet says "the global minimum is present at [0,1]²" (garbled,
    Picheny's domain is [0,1]²). We follow the variables printed in eq. 12 by default
    (minimum at (0, −1)); the Picheny domain is available via ``unit_square=True``. Values are
    the same in both parametrisations (only the Hessian scales, by 16 for the unit square).
    Adam+CM Table 1 cannot be used as an oracle: its GP "loss" values 0.81–3.14 are
    positive although the log form is negative near every minimum (|f| at (1.2, 0.8) is
    0.807, at (0, −1) 3.129), and its "sharpness" 1.36–1.51 matches no Hessian eigenvalue of
    either form at a local minimum.
    """
    x = _prepare(x, "log_goldstein_price", dim=2)
    if unit_square:
        x = 4 * x - 2
    f1, f2 = _gp_factors(x)
    return (torch.log(f1) + torch.log(f2) - GP_LOG_MEAN) / GP_LOG_STD


def levy(x: Tensor) -> Tensor:
    """Levy function in any dimension (Adam+CM eq. 13, Table 1 and Table 5; VLSE "levy").

    ``f(x) = sin²(πw₁) + Σ_{i=1}^{d−1} (wᵢ − 1)²[1 + 10 sin²(πwᵢ + 1)]
             + (w_d − 1)²[1 + sin²(2πw_d)]``,   ``wᵢ = 1 + (xᵢ − 1)/4``.

    Domain: R^d, any d ≥ 1 (usually [−10, 10]^d; for d = 1 the sum is empty);
    x of shape (..., d). Global minimum: ``f(1, …, 1) = 0``; many local minima.

    Discrepancy: eq. 13 as extracted writes the first term ``sin²(πw)`` (subscript lost; it is
    w₁) and heads the formula ``f(x₁, x₂)`` although it is given for general d. It matches
    the VLSE / Laguna & Martí (2005) form with ``sin²(πwᵢ + 1)`` inside the sum (the older
    Levy–Montalvo form has ``sin²(πw_{i+1})`` there); that form is implemented.
    """
    x = _prepare(x, "levy")
    w = 1 + (x - 1) / 4
    first = torch.sin(math.pi * w[..., 0]) ** 2
    wi = w[..., :-1]
    middle = ((wi - 1) ** 2 * (1 + 10 * torch.sin(math.pi * wi + 1) ** 2)).sum(dim=-1)
    wd = w[..., -1]
    last = (wd - 1) ** 2 * (1 + torch.sin(2 * math.pi * wd) ** 2)
    return first + middle + last


def rosenbrock(x: Tensor) -> Tensor:
    """Rosenbrock function in any dimension d ≥ 2 (VLSE "rosen").

    ``f(x) = Σ_{i=1}^{d−1} [100(x_{i+1} − xᵢ²)² + (1 − xᵢ)²]``

    Domain: R^d, d ≥ 2 (usually [−5, 10]^d); x of shape (..., d).
    Global minimum: ``f(1, …, 1) = 0`` (smooth; a long, flat curved valley; for 4 ≤ d ≤ 7
    there is also a local minimum near (−1, 1, …, 1)).
    """
    x = _prepare(x, "rosenbrock", min_dim=2)
    xi, xn = x[..., :-1], x[..., 1:]
    return (100 * (xn - xi**2) ** 2 + (1 - xi) ** 2).sum(dim=-1)


def ackley_rosenbrock(x: Tensor) -> Tensor:
    """Ackley+Rosenbrock landscape of Adam+CM eq. 14 (Fig. 11), implemented as printed.

    ``f(x, y) = 0.05(1 − x)² + 0.05(y − x²)²
               + 0.6[exp(−0.2 sqrt(0.5(x² + y²))) − exp(0.5(cos 2πx + cos 2πy)) + e]``

    i.e. a Rosenbrock valley with coefficient 0.05 (not the usual 1 and 100) plus 0.6 times
    an Ackley-like bracket whose radial term enters with a *plus* sign and no factor 20
    (standard Ackley: ``−20 exp(−0.2 r) … + 20``). The bracket is therefore ≥ exp(−0.2 r) > 0
    and decreases away from the origin, pushing the minimum out along the parabola y = x²
    onto the lattice points where the cosine term vanishes.

    Domain: R² (x of shape (..., 2)); the registry uses [−5, 5] × [−5, 20], which contains
    the whole sublevel set {f < 0.357} (f ≥ 0.05(1 − x)² + 0.05(y − x²)² + 0.6 e^{−0.2r}
    confines it to x ∈ (−1.7, 3.7), |y − x²| < 2.7).

    Global minimum (computed; see :data:`ACKLEY_ROSENBROCK_MIN_POINT`):
    ``f(2.99463, 9.00055) ≈ 0.356326`` (dense grid + multi-start L-BFGS + Newton refinement).
    Next-best minimum: ``f(1.99766, 4.00122) ≈ 0.368653``, which is the minimum over any
    window that stops short of y ≈ 8.5, e.g. [−5, 5]².

    Discrepancy: the paper says "the global minima is present at (2.1, 3.9)". That point is
    not stationary for eq. 14 (‖∇f‖ ≈ 3.8, f ≈ 0.678); its nearest minimum is the (1.99766, 4.00122)
    one above, so the paper's statement is presumably a reading of a plot over a window
    excluding y ≈ 9. Had the radial term the standard sign (−exp(−0.2r)), the global minimum
    would be at the origin (f = −0.55), far from the stated point, so the printed sign looks
    intended and is kept. Non-smooth only at the origin (the radius), where autograd returns
    the zero subgradient; the origin is not a minimum (f(0) = 0.65).
    """
    x = _prepare(x, "ackley_rosenbrock", dim=2)
    x1, x2 = x[..., 0], x[..., 1]
    rosen = 0.05 * (1 - x1) ** 2 + 0.05 * (x2 - x1**2) ** 2
    r = _safe_sqrt(0.5 * (x1**2 + x2**2))
    bracket = (
        torch.exp(-0.2 * r)
        + (math.e - torch.exp(0.5 * (torch.cos(2 * math.pi * x1) + torch.cos(2 * math.pi * x2))))
    )
    return rosen + 0.6 * bracket


def sharp_flat(x: Tensor, s: float | Tensor) -> Tensor:
    """The sharp/flat family of Adam+CM eq. 9 (Figs. 5-7, 17, 18).

    ``f_s(x) = Σ_{i=1}^{D} min(xᵢ², s(xᵢ − 1)²)``

    Domain: R^D, any D ≥ 1 (the paper samples starts in [−5, 5]^D, D ∈ {1, 10});
    x of shape (..., D). ``s > 0`` is the sharpness coefficient (the paper uses s > 1;
    ``ValueError`` if s ≤ 0).

    Minima: every coordinate independently sits at 0 (curvature 2, the flat minimum when
    s > 1) or at 1 (curvature 2s, the sharp one), all with value 0 — so there are 2^D global
    minima, the vertices of {0, 1}^D, with diagonal Hessian entries 2 or 2s. The paper's "two
    global minima, a flat one at the origin and a sharper one at (1 ⋯ 1)" are the two extreme
    vertices (exactly right only for D = 1). See :func:`sharp_flat_minima`.

    Smoothness: f is piecewise quadratic with kinks where ``xᵢ² = s(xᵢ − 1)²``, i.e. at the
    ridge ``√s/(1 + √s)`` between the two minima and (s ≠ 1) at ``√s/(√s − 1)``; it is smooth
    (and has the stated curvatures) in a neighbourhood of every minimum.
    """
    x = _prepare(x, "sharp_flat")
    s = _check_s(s)
    if isinstance(s, Tensor):
        s = s.to(dtype=x.dtype, device=x.device)
    return torch.minimum(x * x, s * (x - 1) ** 2).sum(dim=-1)


class SharpFlatMinima(NamedTuple):
    """The two extreme minima of :func:`sharp_flat` and their (per-coordinate) curvatures."""

    flat: Tensor  #: the origin, shape (dim,)
    sharp: Tensor  #: (1, …, 1), shape (dim,)
    flat_curvature: float  #: Hessian at ``flat`` is ``flat_curvature · I`` (= 2)
    sharp_curvature: float  #: Hessian at ``sharp`` is ``sharp_curvature · I`` (= 2s)
    ridge: float  #: per-coordinate kink between them, ``√s/(1 + √s)``


def sharp_flat_minima(
    s: float, dim: int = 1, dtype: torch.dtype = torch.float64, device: Any = None
) -> SharpFlatMinima:
    """Flat minimum 0 (Hessian 2·I) and sharp minimum 1 (Hessian 2s·I) of ``sharp_flat``.

    Also returns the ridge ``√s/(1 + √s)``: under gradient flow a coordinate starting below
    it goes to 0 and one starting above it goes to 1 (for s > 1), which is how escape ratios
    (Adam+CM Figs. 6-7) classify the final point.
    """
    s = float(_check_s(s))
    if int(dim) != dim or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    dim = int(dim)
    return SharpFlatMinima(
        flat=torch.zeros(dim, dtype=dtype, device=device),
        sharp=torch.ones(dim, dtype=dtype, device=device),
        flat_curvature=2.0,
        sharp_curvature=2.0 * s,
        ridge=math.sqrt(s) / (1.0 + math.sqrt(s)),
    )


# ---------------------------------------------------------------------------------------
# quadratic
# ---------------------------------------------------------------------------------------


def _check_quadratic(A: Any, b: Any) -> Tuple[Tensor, Tensor]:
    A = torch.as_tensor(A)
    if A.is_complex():
        raise TypeError(f"A must be real, got dtype {A.dtype}")
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"A must be a square matrix (d, d), got shape {tuple(A.shape)}")
    if A.shape[0] == 0:
        raise ValueError("A must be at least 1x1")
    b = torch.as_tensor(b, device=A.device)
    if b.is_complex():
        raise TypeError(f"b must be real, got dtype {b.dtype}")
    dtype = torch.promote_types(A.dtype, b.dtype)
    if not dtype.is_floating_point:
        dtype = torch.float64
    A, b = A.to(dtype), b.to(dtype)
    d = A.shape[0]
    if b.shape != (d,):
        raise ValueError(f"b must have shape ({d},) to match A of shape {tuple(A.shape)}, got {tuple(b.shape)}")
    if not (torch.isfinite(A).all() and torch.isfinite(b).all()):
        raise ValueError("A and b must be finite")
    scale = float(A.abs().max()) if A.numel() else 0.0
    tol = 1e-6 if dtype in (torch.float16, torch.bfloat16) else (1e-5 if dtype == torch.float32 else 1e-10)
    if not torch.allclose(A, A.T, rtol=0.0, atol=tol * max(scale, 1e-300)):
        raise ValueError("A must be symmetric (the Hessian of ½xᵀAx is (A + Aᵀ)/2: pass that instead)")
    return A, b


@dataclass(frozen=True, eq=False)
class Quadratic:
    """``f(x) = ½xᵀAx + bᵀx + c`` (MoXCo Theorem 2 / A.3), callable on x of shape (..., d).

    A must be a symmetric (d, d) matrix. Then the gradient is ``Ax + b``, the Hessian is A
    everywhere, and for SPD A the unique global minimiser is ``x* = −A⁻¹b`` with value
    ``c − ½bᵀA⁻¹b``. (If A is not positive definite there is no minimiser: :meth:`minimiser`
    raises.) Build with :func:`quadratic`, which validates the inputs.
    """

    A: Tensor
    b: Tensor
    c: float = 0.0

    @property
    def dim(self) -> int:
        return int(self.A.shape[0])

    def __call__(self, x: Tensor) -> Tensor:
        x = _prepare(x, "quadratic", dim=self.dim)
        A = self.A.to(dtype=x.dtype, device=x.device)
        b = self.b.to(dtype=x.dtype, device=x.device)
        return 0.5 * ((x @ A) * x).sum(dim=-1) + x @ b + self.c

    def gradient(self, x: Tensor) -> Tensor:
        """Closed-form gradient ``Ax + b`` (batched: x of shape (..., d))."""
        x = _prepare(x, "quadratic", dim=self.dim)
        return x @ self.A.to(dtype=x.dtype, device=x.device) + self.b.to(dtype=x.dtype, device=x.device)

    def hessian(self) -> Tensor:
        """The Hessian, A (a copy)."""
        return self.A.clone()

    def eigenvalues(self) -> Tensor:
        """Eigenvalues of A in ascending order (the curvatures of Theorem 2)."""
        return torch.linalg.eigvalsh(self.A)

    def minimiser(self) -> Tensor:
        """``x* = −A⁻¹b``; raises ``ValueError`` unless A is positive definite."""
        return quadratic_minimiser(self.A, self.b)

    def min_value(self) -> Tensor:
        """``f(x*) = c − ½bᵀA⁻¹b = c + ½bᵀx*`` (0-dim tensor)."""
        return self.c + 0.5 * torch.dot(self.b, self.minimiser())


def quadratic(A: Any, b: Any, c: float = 0.0) -> Quadratic:
    """The quadratic ``½xᵀAx + bᵀx + c`` of MoXCo Theorem 2 as a callable :class:`Quadratic`.

    A: symmetric (d, d) matrix (``ValueError`` if not square, not symmetric or not finite);
    b: shape (d,); c: scalar. Domain R^d. Global minimum (A SPD): ``x* = −A⁻¹b``,
    ``f(x*) = c − ½bᵀA⁻¹b``; see :meth:`Quadratic.minimiser`, :meth:`Quadratic.hessian`.
    """
    A, b = _check_quadratic(A, b)
    if isinstance(c, Tensor):
        if c.numel() != 1:
            raise ValueError(f"c must be a scalar, got shape {tuple(c.shape)}")
        c = float(c.reshape(()))
    c = float(c)
    if not math.isfinite(c):
        raise ValueError(f"c must be finite, got {c}")
    return Quadratic(A=A, b=b, c=c)


def quadratic_minimiser(A: Any, b: Any) -> Tensor:
    """``−A⁻¹b``, the minimiser of ``½xᵀAx + bᵀx + c`` for symmetric positive definite A.

    Raises ``ValueError`` if A is not square / symmetric or not positive definite (then the
    quadratic is unbounded below or has no unique minimiser).
    """
    A, b = _check_quadratic(A, b)
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        raise ValueError("A is not positive definite: the quadratic has no unique minimiser")
    return -torch.cholesky_solve(b.unsqueeze(-1), L).squeeze(-1)


# ---------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Landscape:
    """A test landscape with its published (and independently checked) global minimum.

    Attributes:
        name: registry key.
        fn: the function, ``fn(x)`` with x of shape (..., dim) -> shape (...).
        dim: number of coordinates.
        bounds: one ``(low, high)`` pair per coordinate: the usual search box.
        global_minima: every global minimiser (points of length ``dim``).
        global_min_value: the value at each of them.
        reference: paper / equation and the standard reference.
        smooth_at_minimum: False where the minimum sits on a kink (Ackley's origin), so the
            gradient there is a subgradient and the Hessian is not defined.
        local_minima: known non-global minima worth knowing about (may be empty).
        params: the keyword arguments bound into ``fn`` (e.g. ``{"s": 10.0}``).
    """

    name: str
    fn: Callable[[Tensor], Tensor]
    dim: int
    bounds: Tuple[Tuple[float, float], ...]
    global_minima: Tuple[Point, ...]
    global_min_value: float
    reference: str
    smooth_at_minimum: bool = True
    local_minima: Tuple[Point, ...] = ()
    params: Mapping[str, Any] = field(default_factory=dict)

    def __call__(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def minima_tensor(self, dtype: torch.dtype = torch.float64, device: Any = None) -> Tensor:
        """Global minimisers as a (k, dim) tensor."""
        return torch.tensor(self.global_minima, dtype=dtype, device=device).reshape(-1, self.dim)

    def bounds_tensor(self, dtype: torch.dtype = torch.float64, device: Any = None) -> Tensor:
        """Bounds as a (dim, 2) tensor of ``[low, high]`` rows."""
        return torch.tensor(self.bounds, dtype=dtype, device=device).reshape(self.dim, 2)

    def sample(
        self,
        n: int,
        generator: Optional[torch.Generator] = None,
        dtype: torch.dtype = torch.float64,
        device: Any = None,
    ) -> Tensor:
        """``n`` points drawn uniformly from the bounds box, shape (n, dim)."""
        box = self.bounds_tensor(dtype=dtype, device=device)
        u = torch.rand(n, self.dim, generator=generator, dtype=dtype, device=device)
        return box[:, 0] + u * (box[:, 1] - box[:, 0])


_VLSE = "Surjanovic & Bingham, Virtual Library of Simulation Experiments"


def _box(low: float, high: float, dim: int) -> Tuple[Tuple[float, float], ...]:
    return tuple((float(low), float(high)) for _ in range(dim))


def _check_dim(dim: Any, name: str, min_dim: int = 1) -> int:
    if isinstance(dim, bool) or int(dim) != dim or dim < min_dim:
        raise ValueError(f"{name}: dim must be an integer >= {min_dim}, got {dim!r}")
    return int(dim)


def _bind(fn: Callable[..., Tensor], **kwargs: Any) -> Callable[[Tensor], Tensor]:
    if not kwargs:
        return fn

    def bound(x: Tensor) -> Tensor:
        return fn(x, **kwargs)

    bound.__name__ = fn.__name__
    bound.__qualname__ = fn.__qualname__
    bound.__doc__ = fn.__doc__
    return bound


def _make_beale(dim: Optional[int] = None) -> Landscape:
    if dim not in (None, 2):
        raise ValueError(f"beale is 2-D, got dim={dim}")
    return Landscape(
        name="beale",
        fn=beale,
        dim=2,
        bounds=_box(-4.5, 4.5, 2),
        global_minima=((3.0, 0.5),),
        global_min_value=0.0,
        reference=f"MoXCo (000) §4(i), Fig. 2, A.4.1 (printed 3rd term garbled); {_VLSE}: beale",
    )


def _make_ackley(dim: Optional[int] = None, a: float = 20.0, b: float = 0.2, c: float = 2 * math.pi) -> Landscape:
    dim = _check_dim(2 if dim is None else dim, "ackley")
    if not (a > 0 and b > 0):
        raise ValueError(f"ackley: need a > 0 and b > 0 for the minimum at the origin, got a={a}, b={b}")
    params = {} if (a, b, c) == (20.0, 0.2, 2 * math.pi) else {"a": a, "b": b, "c": c}
    return Landscape(
        name="ackley",
        fn=_bind(ackley, **params),
        dim=dim,
        bounds=_box(-32.768, 32.768, dim),
        global_minima=(tuple(0.0 for _ in range(dim)),),
        global_min_value=0.0,
        reference=f"MoXCo (000) Fig. 1, A.4.1; Adam+CM (002) eq. 11 (d = 2); {_VLSE}: ackley",
        smooth_at_minimum=False,
        params=dict(params),
    )


def _make_goldstein_price(dim: Optional[int] = None) -> Landscape:
    if dim not in (None, 2):
        raise ValueError(f"goldstein_price is 2-D, got dim={dim}")
    return Landscape(
        name="goldstein_price",
        fn=goldstein_price,
        dim=2,
        bounds=_box(-2.0, 2.0, 2),
        global_minima=((0.0, -1.0),),
        global_min_value=3.0,
        reference=f"Adam+CM (002) Fig. 1, Table 1; {_VLSE}: goldpr",
        local_minima=((-0.6, -0.4), (1.8, 0.2), (1.2, 0.8)),
    )


def _make_log_goldstein_price(dim: Optional[int] = None, unit_square: bool = False) -> Landscape:
    if dim not in (None, 2):
        raise ValueError(f"log_goldstein_price is 2-D, got dim={dim}")
    if unit_square:
        return Landscape(
            name="log_goldstein_price_unit",
            fn=_bind(log_goldstein_price, unit_square=True),
            dim=2,
            bounds=_box(0.0, 1.0, 2),
            global_minima=((0.5, 0.25),),
            global_min_value=LOG_GOLDSTEIN_PRICE_MIN,
            reference=f"Picheny, Wagner & Ginsbourger (2013) log form on [0,1]^2; {_VLSE}: goldprsc",
            local_minima=((0.35, 0.4), (0.95, 0.55), (0.8, 0.7)),
            params={"unit_square": True},
        )
    return Landscape(
        name="log_goldstein_price",
        fn=log_goldstein_price,
        dim=2,
        bounds=_box(-2.0, 2.0, 2),
        global_minima=((0.0, -1.0),),
        global_min_value=LOG_GOLDSTEIN_PRICE_MIN,
        reference="Adam+CM (002) eq. 12, Fig. 1, Table 1 (Picheny et al. 2013 log form, raw coordinates)",
        local_minima=((-0.6, -0.4), (1.8, 0.2), (1.2, 0.8)),
    )


def _make_levy(dim: Optional[int] = None) -> Landscape:
    dim = _check_dim(2 if dim is None else dim, "levy")
    return Landscape(
        name="levy",
        fn=levy,
        dim=dim,
        bounds=_box(-10.0, 10.0, dim),
        global_minima=(tuple(1.0 for _ in range(dim)),),
        global_min_value=0.0,
        reference=f"Adam+CM (002) eq. 13, Table 1, Table 5; Laguna & Marti (2005); {_VLSE}: levy",
    )


def _make_rosenbrock(dim: Optional[int] = None) -> Landscape:
    dim = _check_dim(2 if dim is None else dim, "rosenbrock", min_dim=2)
    return Landscape(
        name="rosenbrock",
        fn=rosenbrock,
        dim=dim,
        bounds=_box(-5.0, 10.0, dim),
        global_minima=(tuple(1.0 for _ in range(dim)),),
        global_min_value=0.0,
        reference=f"Rosenbrock (1960), component of Adam+CM (002) eq. 14; {_VLSE}: rosen",
    )


def _make_ackley_rosenbrock(dim: Optional[int] = None) -> Landscape:
    if dim not in (None, 2):
        raise ValueError(f"ackley_rosenbrock is 2-D, got dim={dim}")
    return Landscape(
        name="ackley_rosenbrock",
        fn=ackley_rosenbrock,
        dim=2,
        bounds=((-5.0, 5.0), (-5.0, 20.0)),
        global_minima=(ACKLEY_ROSENBROCK_MIN_POINT,),
        global_min_value=ACKLEY_ROSENBROCK_MIN_VALUE,
        reference=(
            "Adam+CM (002) eq. 14, Fig. 11 (paper's stated minimum (2.1, 3.9) is not stationary; "
            "minimum computed numerically)"
        ),
        local_minima=(ACKLEY_ROSENBROCK_LOCAL_MIN_POINT,),
    )


def _make_sharp_flat(dim: Optional[int] = None, s: float = 10.0) -> Landscape:
    dim = _check_dim(1 if dim is None else dim, "sharp_flat")
    s = float(_check_s(s))
    if dim > 16:
        raise ValueError(f"sharp_flat: the registry lists all 2^dim global minima; dim={dim} is too many (max 16)")
    flat = tuple(0.0 for _ in range(dim))
    sharp = tuple(1.0 for _ in range(dim))
    corners = [tuple(float(v) for v in p) for p in itertools.product((0.0, 1.0), repeat=dim)]
    others = [p for p in corners if p != flat and p != sharp]
    minima = (flat, sharp, *others) if dim > 1 else (flat, sharp)
    return Landscape(
        name="sharp_flat",
        fn=_bind(sharp_flat, s=s),
        dim=dim,
        bounds=_box(-5.0, 5.0, dim),
        global_minima=minima,
        global_min_value=0.0,
        reference="Adam+CM (002) eq. 9, Figs. 5-7 (flat minimum first, sharp minimum second)",
        params={"s": s},
    )


_BUILDERS: Dict[str, Callable[..., Landscape]] = {
    "beale": _make_beale,
    "ackley": _make_ackley,
    "goldstein_price": _make_goldstein_price,
    "log_goldstein_price": _make_log_goldstein_price,
    "log_goldstein_price_unit": lambda dim=None: _make_log_goldstein_price(dim, unit_square=True),
    "levy": _make_levy,
    "ackley_rosenbrock": _make_ackley_rosenbrock,
    "rosenbrock": _make_rosenbrock,
    "sharp_flat": _make_sharp_flat,
}


def get_landscape(name: str, dim: Optional[int] = None, **params: Any) -> Landscape:
    """Build the :class:`Landscape` ``name`` in ``dim`` dimensions with parameters ``params``.

    ``dim`` matters for the any-dimension families (``ackley``, ``levy``, ``rosenbrock``,
    ``sharp_flat``); the 2-D landscapes accept only ``dim`` None or 2. Parameters:
    ``ackley``: a, b, c; ``sharp_flat``: s (> 0). Example:
    ``get_landscape("sharp_flat", dim=10, s=100.0)`` is the D = 10 setting of Adam+CM Fig. 6.
    """
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise KeyError(f"unknown landscape {name!r}; known: {sorted(_BUILDERS)}") from None
    try:
        return builder(dim, **params)
    except TypeError as exc:  # unexpected keyword
        raise TypeError(f"{name}: {exc}") from None


#: The default instances: the 2-D landscapes of the papers' figures, ``sharp_flat`` in the
#: 1-D setting of Adam+CM Fig. 5 with s = 10. Use :func:`get_landscape` for other sizes.
LANDSCAPES: Dict[str, Landscape] = {name: get_landscape(name) for name in _BUILDERS}
