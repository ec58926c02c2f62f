"""ALIGATOR online denoising, and the unbiased squared-gradient-norm estimator built on it.

MoXCo's goodness score (MoXCo eq. 6) needs the loss ``F(θ_t)`` and the squared
population gradient norm ``‖∇F(θ_t)‖²`` at every step, but each step only sees one noisy minibatch.
MoXCo A.2.2 denoises both with ALIGATOR:

* ``Aligator``: the online TV-denoiser of Baby, Zhao & Wang, "An Optimal Reduction of
  TV-Denoising to Adaptive Online Learning" (AISTATS 2021). Online-averaging experts, each alive on
  one interval of a geometric covering, are mixed by exponential weights on the squared loss
  (Follow-the-Leading-History, Hazan & Seshadhri 2007; strongly adaptive online learning, Daniely
  et al. 2015). It tracks a signal whose smoothness is unknown and changes over time without a
  window or decay to tune, in O(log t) work per observation. The learning rate is the paper's
  exp-concavity rate ``1/(8B²)`` when a bound ``B`` is given, else ``1/σ̂²`` from an online noise
  estimate (the default; measured far better, see the class docstring).
* ``GradNormSqEstimator``: MoXCo A.2.2's three-way minibatch split, corrected (the paper prints the
  cross term with the wrong sign and an estimator of it whose mean is zero; see the class
  docstring and docs/aligator.md). Each raw term is unbiased and denoised by its own ``Aligator``.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from moxco import tensors
from moxco.tensors import TensorList

Reduce = Optional[Callable[[Tensor], Optional[Tensor]]]

__all__ = ["Aligator", "GradNormSqEstimator", "GradNormSqTerms", "split_sums", "split_terms"]


class _Expert:
    """Online averaging on ``[start, end]``: forecasts the mean of the observations since ``start``."""

    __slots__ = ("end", "count", "mean", "diff_sq_sum", "log_weight")

    def __init__(self, end: int, log_weight: float) -> None:
        self.end = end
        self.count = 0
        self.mean = 0.0
        self.diff_sq_sum = 0.0  # Σ (y_τ − y_{τ−1})² over its life after the first observation
        self.log_weight = log_weight


class Aligator:
    """ALIGATOR online denoiser (Baby, Zhao & Wang, AISTATS 2021) for a scalar stream ``y_t = μ_t + ε_t``.

    **Experts.** Each expert runs online averaging on one interval of a geometric covering: at every
    level ``k ≥ 0`` an expert is born at each ``t = i·2^k`` (``i ≥ 1``; ``t`` counts observations
    from 1) and lives until ``t + 2^(k+1) − 1``, forecasting the mean of ``y_start..y_now``. Each
    interval is twice as long as in Daniely et al.'s covering ``[i·2^k, (i+1)·2^k − 1]`` (which it
    contains), so level-``k`` intervals overlap by half: at most ``2·⌊log₂ t⌋ + 1`` experts are
    alive and for every level one of them has averaged between ``2^k`` and ``2^(k+1)`` values.
    (With the plain covering every expert restarts at ``t = 2^K`` and the output collapses to the
    raw ``y_t`` there.)

    **Meta-learner** (Follow-the-Leading-History exponential weights for the exp-concave loss
    ``ℓ_t(x) = (x − y_t)²``). When ``y_t`` arrives:

    1. experts whose interval ended at ``t − 1`` are removed;
    2. each survivor ``i`` with forecast ``m_i`` (its mean of ``y_start..y_{t−1}``) is reweighted
       ``w_i ← w_i · exp(−α_t (m_i − y_t)²)`` and the survivors are renormalised to total mass
       ``1 − 1/t``;
    3. the experts born at ``t`` enter sharing the FLH prior mass ``1/t`` (all of it at ``t = 1``);
    4. every alive expert absorbs ``y_t`` into its mean.

    **Learning rate** ``α_t``:

    * ``bound=B`` (the paper's rate): ``α = 1/(8B²)``, the exp-concavity constant of ``(x − y)²`` for
      ``|x|, |y| ≤ B`` (``α ≤ 1/(2 max (x − y)²)``), which gives FLH's ``O(B² log t)`` regret on
      every interval (Hazan & Seshadhri). ``B`` must bound the *noisy* ``|y_t|``.
    * ``bound=None`` (default): ``α_t = 1/σ̂_t²`` with the noise variance estimated online from
      successive differences, ``σ̂_t² = ½ Σ_i w_i d_i / Σ_i w_i``, where ``d_i`` is survivor ``i``'s
      mean of ``(y_τ − y_{τ−1})²`` over its life up to ``τ = t``. The exp-concavity rate is
      worst-case: ``B`` must cover the noise tails and the signal's whole range, so a hand-off to a
      new expert costs ``~8B² log t`` of squared error and the mixture sticks to stale long
      averages (measured, bench/aligator.py: 6-19× the default's MSE, 7-42× that of the best
      fixed window). Scaling by the local noise level instead makes a hand-off cost about
      ``log t`` noise variances, and follows a noise level that shrinks during training. ``d_i`` and ``σ̂²`` ignore translations and scale with ``a²``, as the losses
      do, so the estimates of ``a·y + b`` are ``a·estimate + b``. While ``σ̂ = 0`` (all differences
      zero so far in every survivor's life) every forecast is exact and no reweighting happens.

    **Output.** ``update(y_t)`` returns (and ``estimate`` holds) the denoised value of ``μ_t``
    *including* ``y_t``: ``Σ_i w_i · mean_i`` over the alive experts after step 4 with the weights
    of steps 2-3. It is also the forecast of ``y_{t+1}`` from ``y_1..y_t``. Work per update is
    proportional to the number of alive experts, ``O(log t)``.

    **Non-finite input** (a diverging loss): ``update(nan | ±inf)`` returns its input unchanged for
    that step so the divergence stays visible, and leaves the state alone (``t``, experts, weights,
    noise scale, ``estimate``); ``n_skipped`` counts such steps.
    """

    def __init__(self, bound: float | None = None) -> None:
        if bound is not None:
            if isinstance(bound, bool) or not isinstance(bound, numbers.Real):
                raise TypeError(f"bound must be a number or None, got {type(bound).__name__}")
            if not (math.isfinite(bound) and bound > 0):
                raise ValueError(f"bound must be a finite positive number or None, got {bound!r}")
        self.bound = None if bound is None else float(bound)
        self.reset()

    def reset(self) -> None:
        """Forget every observation (a fresh denoiser with the same ``bound``)."""
        self._t = 0
        self._experts: list[_Expert] = []
        self._previous_y = math.nan
        self._estimate = math.nan
        self._learning_rate = math.nan
        self.n_skipped = 0

    @property
    def t(self) -> int:
        """Number of finite observations absorbed."""
        return self._t

    @property
    def estimate(self) -> float:
        """Denoised value at the latest finite observation (NaN before the first one)."""
        return self._estimate

    @property
    def n_experts(self) -> int:
        """Number of alive experts (at most ``2·⌊log₂ t⌋ + 1``)."""
        return len(self._experts)

    @property
    def learning_rate(self) -> float:
        """``α_t`` of the latest reweighting (``inf`` while ``σ̂ = 0``, NaN before ``t = 2``)."""
        return self._learning_rate

    def update(self, y: float) -> float:
        """Absorb ``y_t`` and return the denoised estimate of ``μ_t`` (``y`` itself if not finite)."""
        y = float(y)
        if not math.isfinite(y):
            self.n_skipped += 1
            return y
        self._t += 1
        t = self._t
        experts = [e for e in self._experts if e.end >= t]
        if experts:
            self._learning_rate = self._next_learning_rate(experts, (y - self._previous_y) ** 2)
            if math.isfinite(self._learning_rate):
                for e in experts:
                    e.log_weight -= self._learning_rate * (e.mean - y) ** 2
            _normalize_log_weights(experts, total=1.0 - 1.0 / t)
        newborn_levels = _trailing_zero_bits(t) + 1  # the levels k with 2^k dividing t
        newborn_log_weight = -math.log(newborn_levels * (t if experts else 1))
        for level in range(newborn_levels):
            experts.append(_Expert(end=t + (2 << level) - 1, log_weight=newborn_log_weight))

        anchor = experts[0].mean if experts[0].count else y
        weighted_offset = 0.0
        for e in experts:
            e.count += 1
            e.mean += (y - e.mean) / e.count
            weighted_offset += math.exp(e.log_weight) * (e.mean - anchor)
        self._experts = experts
        self._previous_y = y
        # anchor + Σ w (mean − anchor) (Σ w = 1): exactly the constant when every mean equals it.
        self._estimate = anchor + weighted_offset
        return self._estimate

    def _next_learning_rate(self, survivors: list[_Expert], diff_sq: float) -> float:
        """``1/(8B²)``, or ``1/σ̂_t²`` from the survivors' squared differences (including ``diff_sq``)."""
        for e in survivors:
            e.diff_sq_sum += diff_sq
        if self.bound is not None:
            return 1.0 / (8.0 * self.bound * self.bound)
        top = max(e.log_weight for e in survivors)
        weights = [math.exp(e.log_weight - top) for e in survivors]
        mean_diff_sq = sum(w * e.diff_sq_sum / e.count for w, e in zip(weights, survivors)) / sum(weights)
        noise_variance = 0.5 * mean_diff_sq
        return 1.0 / noise_variance if noise_variance > 0 else math.inf


def _trailing_zero_bits(t: int) -> int:
    return (t & -t).bit_length() - 1


def _normalize_log_weights(experts: list[_Expert], total: float) -> None:
    """Shift the log-weights so that ``Σ exp(log_weight) = total`` (log-sum-exp, no underflow)."""
    top = max(e.log_weight for e in experts)
    log_sum = top + math.log(sum(math.exp(e.log_weight - top) for e in experts))
    shift = math.log(total) - log_sum
    for e in experts:
        e.log_weight += shift


class GradNormSqTerms(NamedTuple):
    """The three terms of ``‖∇F‖² = ‖ĝ‖² + ‖ĝ − ∇F‖² − 2(ĝ − ∇F)ᵀĝ`` (raw or denoised)."""

    observed: float  # ‖ĝ‖²
    variance: float  # estimate of E‖ĝ − ∇F‖²
    cross: float  # estimate of −2 E[(ĝ − ∇F)ᵀĝ]

    @property
    def total(self) -> float:
        return self.observed + self.variance + self.cross


def split_sums(g1: TensorList, g2: TensorList, g3: TensorList, *, reduce: Reduce = None) -> Tensor:
    """``[‖ĝ₁‖², ‖ĝ₂‖², ‖ĝ₃‖², ‖ĝ₂−ĝ₃‖², ‖ĝ₁−ĝ₃‖², ‖ĝ₁−ĝ₂‖²]`` as one float64 tensor.

    Every entry is a sum over parameters, so on a sharded model these are partial sums: ``reduce``
    (as in ``moxco.metrics``: sums a 1-D float64 tensor across ranks in place, or returns the sum,
    e.g. a wrapped ``torch.distributed.all_reduce``) is called once on the stacked six. No
    ``.item()`` here (no device synchronisation).
    """
    norms = [tensors.norm_sq(g) for g in (g1, g2, g3)]
    dists = [tensors.dist_sq(g2, g3), tensors.dist_sq(g1, g3), tensors.dist_sq(g1, g2)]
    sums = torch.stack(norms + dists)
    if reduce is None:
        return sums
    reduced = reduce(sums)
    return sums if reduced is None else reduced


def split_terms(sums: Tensor | Sequence[float], sizes: Sequence[float] | None = None) -> GradNormSqTerms:
    """Raw, unbiased terms from ``split_sums``; ``sizes`` are the three splits' sample counts (equal if None).

    With ``w_i = b_i / Σb`` and ``D_ij = ‖ĝ_i − ĝ_j‖²``:
    ``observed = ‖Σ w_i ĝ_i‖² = Σ w_i ‖ĝ_i‖² − Σ_{i<j} w_i w_j D_ij``;
    ``variance = (1/Σb) · mean_{i<j} D_ij / (1/b_i + 1/b_j)`` (``E D_ij = tr Σ·(1/b_i + 1/b_j)``);
    ``cross = −2 · (1/3) Σ_i (b_i/Σb) C_i`` with the pivot products
    ``C_i = (ĝ_i − ĝ_j)ᵀ(ĝ_i − ĝ_k) = (D_ij + D_ik − D_jk)/2``, ``E C_i = tr Σ / b_i``.
    For equal sizes: ``variance = Σ_i ‖ĝ_i − ĝ‖² / (3·2)`` and ``cross = −2 Σ_i C_i / 9 = −2·variance``.
    """
    values = [float(v) for v in (sums.tolist() if isinstance(sums, Tensor) else sums)]
    if len(values) != 6:
        raise ValueError(f"expected the 6 sums of split_sums, got {len(values)}")
    if sizes is None:
        sizes = (1.0, 1.0, 1.0)
    sizes = [float(b) for b in sizes]
    if len(sizes) != 3 or not all(math.isfinite(b) and b > 0 for b in sizes):
        raise ValueError(f"sizes must be three finite positive sample counts, got {sizes!r}")
    norm1, norm2, norm3, d23, d13, d12 = values
    b1, b2, b3 = sizes
    total_size = b1 + b2 + b3
    w1, w2, w3 = b1 / total_size, b2 / total_size, b3 / total_size

    observed = w1 * norm1 + w2 * norm2 + w3 * norm3 - (w1 * w2 * d12 + w1 * w3 * d13 + w2 * w3 * d23)
    trace_cov = (d12 / (1 / b1 + 1 / b2) + d13 / (1 / b1 + 1 / b3) + d23 / (1 / b2 + 1 / b3)) / 3.0
    variance = trace_cov / total_size
    pivots = ((d12 + d13 - d23) / 2.0, (d12 + d23 - d13) / 2.0, (d13 + d23 - d12) / 2.0)
    cross = -2.0 * (w1 * pivots[0] + w2 * pivots[1] + w3 * pivots[2]) / 3.0
    return GradNormSqTerms(observed, variance, cross)


class GradNormSqEstimator:
    """Denoised, unbiased ``‖∇F(θ_t)‖²`` from a minibatch split in three (MoXCo A.2.2, corrected).

    ``‖ĝ‖²`` of the minibatch mean gradient ``ĝ`` is biased upward: ``E‖ĝ‖² = ‖∇F‖² + E‖ĝ − ∇F‖²``
    (``= ‖∇F‖² + tr Σ / B``, i.e. ``O(dσ²/B)``). Expanding ``‖∇F‖² = ‖ĝ − (ĝ − ∇F)‖²`` gives

        ‖∇F‖² = ‖ĝ‖² + ‖ĝ − ∇F‖² − 2 (ĝ − ∇F)ᵀĝ,

    MoXCo A.2.2's decomposition, which prints ``+2`` for the cross term. Since
    ``E[(ĝ − ∇F)ᵀĝ] = E‖ĝ − ∇F‖² = V``, the three terms have means ``‖∇F‖² + V``, ``V`` and
    ``−2V``. With independent splits ``ĝ₁, ĝ₂, ĝ₃`` (means ``∇F``, covariances ``Σ/b_i``):

    * ``observed = ‖ĝ‖²`` with ``ĝ = (ĝ₁ + ĝ₂ + ĝ₃)/3``;
    * ``variance = Σ_i ‖ĝ_i − ĝ‖² / (3·2)`` (sample variance of the splits is ``3V`` on average);
    * ``cross = −2 · Σ_i (ĝ_i − ĝ_j)ᵀ(ĝ_i − ĝ_k) / 9``: each pivot product has mean
      ``tr Σ/b = 3V``, so the average over the three pivots divided by 3 estimates ``V``.

    (The paper's ``2(ĝ₁ − ĝ₂)ᵀĝ₃`` has mean zero for independent splits.) For equal splits the
    pivot sum equals ``(3/2) Σ_i ‖ĝ_i − ĝ‖²``, so ``cross = −2·variance`` exactly, and
    ``observed + variance + cross = (ĝ₁ᵀĝ₂ + ĝ₁ᵀĝ₃ + ĝ₂ᵀĝ₃)/3``, the U-statistic. No other split
    symmetrisation can differ: an estimator linear in the dot products ``ĝ_iᵀĝ_j`` and symmetric
    in the splits is ``a Σ_i ‖ĝ_i‖² + c Σ_{i<j} ĝ_iᵀĝ_j``, and unbiasedness for every ``∇F`` and
    ``Σ`` fixes ``a, c`` (``1/9, −1/9`` for ``V``; ``0, 1/3`` for ``‖∇F‖²``). Unequal ``sizes`` use
    the weighted forms of ``split_terms``.

    Each term is denoised by its own ``Aligator`` (``bound=None``, scale-adaptive) and
    ``estimate = max(0, Σ denoised terms)``: ``‖∇F‖² ≥ 0``, so clamping can only reduce the error
    (it adds a small upward bias when ``‖∇F‖²`` is near 0 compared with the noise). A step whose
    terms are not all finite (a diverging run) changes no denoiser and returns ``+inf`` when the
    gradients overflowed without NaNs (``update_terms``: when ``observed`` is ``+inf``), else NaN.
    """

    def __init__(self) -> None:
        self.denoisers = GradNormSqTerms(Aligator(), Aligator(), Aligator())
        self.raw_terms: GradNormSqTerms | None = None  # the latest step's raw terms
        self._estimate = math.nan

    def reset(self) -> None:
        for denoiser in self.denoisers:
            denoiser.reset()
        self.raw_terms = None
        self._estimate = math.nan

    @property
    def t(self) -> int:
        """Number of steps with finite terms absorbed."""
        return self.denoisers.observed.t

    @property
    def estimate(self) -> float:
        """``max(0, Σ denoised terms)`` at the latest finite step (NaN before the first)."""
        return self._estimate

    @property
    def denoised_terms(self) -> GradNormSqTerms:
        return GradNormSqTerms(*(d.estimate for d in self.denoisers))

    def update(
        self,
        g1: TensorList,
        g2: TensorList,
        g3: TensorList,
        sizes: Sequence[float] | None = None,
        *,
        reduce: Reduce = None,
    ) -> float:
        """Mean gradients of the three disjoint splits (sample counts ``sizes``, equal if None) →
        denoised ``‖∇F‖²``. ``reduce`` sums the partial sums across ranks (see ``split_sums``)."""
        sums = split_sums(g1, g2, g3, reduce=reduce)
        estimate = self.update_terms(*split_terms(sums, sizes))
        if math.isnan(estimate) and not bool(sums.isnan().any()):
            return math.inf  # an overflowed gradient (inf − inf made the terms NaN)
        return estimate

    def update_terms(self, observed: float, variance: float, cross: float) -> float:
        """Feed already computed raw terms (e.g. ``split_terms`` after an all-reduce)."""
        raw = GradNormSqTerms(float(observed), float(variance), float(cross))
        self.raw_terms = raw
        if not all(math.isfinite(v) for v in raw):
            return math.inf if raw.observed == math.inf else math.nan
        for denoiser, value in zip(self.denoisers, raw):
            denoiser.update(value)
        self._estimate = max(0.0, self.denoised_terms.total)
        return self._estimate
