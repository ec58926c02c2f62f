"""The statistics behind the audit's verdicts, pure NumPy (no SciPy at run time).

* ``mean_and_standard_error``: the sample mean and its standard error ``s/√n``;
* ``successive_difference_standard_error``: the standard error of a mean from von Neumann's mean
  square successive difference, which does not count a slowly varying trend as noise;
* ``sign_test``: the mean's sign at ``z`` of those standard errors;
* ``rank_correlation`` (Spearman's ρ, ties at their average rank) and ``rank_correlation_interval``:
  its ``z``-standard-error interval through Fisher's transform, ``atanh ρ ± z·√(1.06/(n−3))``
  (the variance of Fieller, Hartley & Pearson 1957 for Spearman's ρ);
* ``median_interval``: the distribution-free ``z``-standard-error interval of a median, between two
  order statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import numpy as np

#: the significance every test of the audit states: this many standard errors
Z = 2.0
#: Spearman's ρ under Fisher's transform has variance ≈ SPEARMAN_VARIANCE / (n − 3)
SPEARMAN_VARIANCE = 1.06


def mean_and_standard_error(values: np.ndarray) -> Tuple[float, float]:
    """``(mean, s/√n)``; the error is NaN with fewer than two values."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return math.nan, math.nan
    mean = float(values.mean())
    se = float(values.std(ddof=1) / math.sqrt(values.size)) if values.size > 1 else math.nan
    return mean, se


def successive_difference_standard_error(values: np.ndarray) -> float:
    """``√(δ²/n)`` with von Neumann's ``δ² = Σ (x_{t+1} − x_t)² / (2(n − 1))``: the standard error of
    the mean of independent noise around a slowly varying mean. A trend (the decay of a full-batch
    run's values, the early steep phase of a stochastic one) is not counted as noise, as it is in
    ``s/√n``; for independent, identically distributed values both estimate the same error. NaN
    with fewer than three values."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < 3:
        return math.nan
    delta2 = float(np.sum(np.diff(values) ** 2) / (2 * (values.size - 1)))
    return math.sqrt(delta2 / values.size)


@dataclass(frozen=True)
class SignTest:
    """The sign of a mean at ``Z`` standard errors: ``z = mean / se`` with the successive-difference
    error ``se``; ``sign`` is −1 or +1 when ``|z| ≥ Z``, 0 when the data do not decide it.
    ``se_iid`` is the textbook ``s/√n``, for reference."""

    n: int
    mean: float
    se: float
    z: float
    sign: int
    se_iid: float

    def describe(self, name: str) -> str:
        """``mean NAME = −0.026 ± 0.002 (SE, n = 49), 13 standard errors from 0`` (no NaN in the text)."""
        if self.n == 0:
            return f"no {name} value"
        if math.isnan(self.se):
            return f"mean {name} = {self.mean:+.3g} over {self.n} value(s), too few for a standard error"
        return (f"mean {name} = {self.mean:+.3g} ± {self.se:.2g} (SE, n = {self.n}), "
                f"{abs(self.z):.3g} standard errors from 0")


def _ratio(mean: float, se: float) -> float:
    if math.isnan(se):
        return math.nan
    if se > 0:
        return mean / se
    return math.copysign(math.inf, mean) if mean != 0 else 0.0  # every value the same


def sign_test(values: np.ndarray, z: float = Z) -> SignTest:
    values = np.asarray(values, dtype=np.float64)
    mean, se_iid = mean_and_standard_error(values)
    se = successive_difference_standard_error(values)
    stat = _ratio(mean, se)
    sign = 0 if math.isnan(stat) or abs(stat) < z else (1 if stat > 0 else -1)
    return SignTest(int(values.size), mean, se, stat, sign, se_iid)


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(values.size, dtype=np.float64)
    sorted_values = values[order]
    i = 0
    while i < values.size:
        j = i
        while j + 1 < values.size and sorted_values[j + 1] == sorted_values[i]:
            j += 1
        ranks[order[i : j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return ranks


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's ρ: the Pearson correlation of the ranks (NaN when either side is constant)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size < 2:
        return math.nan
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denominator) if denominator > 0 else math.nan


def rank_correlation_interval(rho: float, n: int, z: float = Z) -> Tuple[float, float]:
    """``tanh(atanh ρ ∓ z·√(1.06/(n−3)))``: the ``z``-standard-error interval of Spearman's ρ over
    ``n`` pairs; ``(−1, 1)`` (no information) for ``n ≤ 3`` or an undefined ρ."""
    if n <= 3 or math.isnan(rho):
        return -1.0, 1.0
    centre = math.atanh(min(max(rho, -0.999999), 0.999999))
    half = z * math.sqrt(SPEARMAN_VARIANCE / (n - 3))
    return math.tanh(centre - half), math.tanh(centre + half)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson's correlation (NaN when either side is constant or has fewer than two values)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


def median_interval(values: np.ndarray, z: float = Z) -> Tuple[float, float]:
    """The distribution-free ``z``-standard-error interval of the median of ``n`` values: the order
    statistics of ranks ``⌊n/2 − z√n/2⌋`` and ``⌈1 + n/2 + z√n/2⌉`` (1-based, clipped to ``[1, n]``),
    from the normal approximation of the binomial count of values below the median (Conover,
    "Practical nonparametric statistics", §3.2). NaN for no value; with 5 values it is ``[min, max]``."""
    values = np.sort(np.asarray(values, dtype=np.float64))
    n = values.size
    if n == 0:
        return math.nan, math.nan
    half = z * math.sqrt(n) / 2
    low = max(1, math.floor(n / 2 - half))
    high = min(n, math.ceil(1 + n / 2 + half))
    return float(values[low - 1]), float(values[high - 1])
