"""The audit metrics, each written once, over flat parameter lists.

Source: the audit paper, "Reevaluating Theoretical Analysis Methods for Optimization in Deep Learning":

* ``inst_gap``      eq. 2: ``f(x_t,z_t) − f(y_t,z_t) − ⟨∇f(x_t,z_t), x_t − y_t⟩``; ``y_t = x_{t−1}`` or
  ``x*``. Non-positive on a convex ``f``; ``−½ dᵀAd`` on ``½xᵀAx + bᵀx`` with ``d = x_t − y_t``.
* ``inst_smooth``   eq. 4: ``‖∇f(x_t,z_t) − ∇f(y_t,z_t)‖ / ‖x_t − y_t‖``; ≤ L on an L-smooth ``f``.
* ``loss_diff``     eq. 13: ``f(x_t,z_t) − f(x_{t−1},z_t)``.
* ``update_corr``   eq. 9: ``⟨∇f(x_{t+1},z_{t+1}), x_{t+1} − x_t⟩``.
* ``update_corr_rs`` eq. 13: ``⟨∇f(x_{t+1},z_{t+1}), Δ_t⟩`` with ``Δ_t`` the unscaled update.
* ``avg``/``exp`` gaps eq. 3, ``max``/``exp`` smoothness eq. 5: the streaming aggregates below.
* ``convexity_ratio`` eq. 6: ``Σ_t ⟨∇F(x_t), x_t − x*⟩ / Σ_t (F(x_t) − F(x*))``.

Parameter-space reductions (dot products, squared norms) are *partial sums* on a sharded model.
Every function that reduces takes ``reduce``: a callable that sums a 1-D float64 tensor of partial
sums across ranks in place or returns the summed tensor (e.g. ``torch.distributed.all_reduce``
wrapped to return its input). Each function calls it once, with all its partials stacked, so a
metric costs one collective. Results are 0-dim float64 tensors: call ``float()`` when you need a
Python number (that synchronises with the device).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from moxco import tensors
from moxco.tensors import ACCUMULATE_DTYPE, TensorList

Reduce = Optional[Callable[[Tensor], Optional[Tensor]]]

EXP_BETA = 0.99  # the audit paper's choice for exp_gap / exp_smooth (after eq. 3)


def _reduced(partials: list[Tensor], reduce: Reduce) -> Tensor:
    stacked = torch.stack([p.to(ACCUMULATE_DTYPE) for p in partials])
    if reduce is None:
        return stacked
    out = reduce(stacked)
    return stacked if out is None else out


def _scaled(total: Tensor, grad_scale: Optional[Tensor], power: int = 1) -> Tensor:
    """A sum over the gradient as the user left it, ``.grad``, turned into the same sum over
    ``g = grad_scale · .grad``: ``× s`` for a sum linear in the gradient, ``× s²`` for its squared
    norm. After backward, AMP's unscale and clipping rescale ``.grad`` in place uniformly, and
    ``g`` (the raw gradient: AMP scale removed, before clipping) is recovered as ``s · .grad`` without a copy of it."""
    if grad_scale is None:
        return total
    return total * grad_scale.to(device=total.device, dtype=total.dtype) ** power


def _scalar(value: float | Tensor, like: Tensor) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach().to(dtype=ACCUMULATE_DTYPE, device=like.device).reshape(())
    return torch.tensor(float(value), dtype=ACCUMULATE_DTYPE, device=like.device)


def loss_diff(loss: float | Tensor, loss_prev: float | Tensor) -> Tensor:
    """``loss_diff_t = f(x_t, z_t) − f(x_{t−1}, z_t)`` (audit eq. 13), both losses on batch ``z_t``."""
    like = loss if isinstance(loss, Tensor) else torch.zeros(())
    return _scalar(loss, like) - _scalar(loss_prev, like)


def inst_gap(
    loss: float | Tensor,
    loss_ref: float | Tensor,
    grad: TensorList,
    params: TensorList,
    params_ref: TensorList,
    *,
    reduce: Reduce = None,
    grad_dot_step: Optional[Tensor] = None,
    grad_scale: Optional[Tensor] = None,
) -> Tensor:
    """Instantaneous convexity gap (audit eq. 2) with respect to a reference point ``y``.

    ``inst_gap = f(x, z) − f(y, z) − ⟨∇f(x, z), x − y⟩`` where ``loss = f(x, z)``,
    ``loss_ref = f(y, z)``, ``grad = ∇f(x, z)``, ``params = x``, ``params_ref = y``
    (``y = x_{t−1}`` for ``inst_gap``, ``y = x*`` for ``inst_gap_ref``). ``grad_dot_step``: the
    (reduced) ``⟨∇f(x, z), x − y⟩`` when the caller already has it (with ``y = x_{t−1}`` it is
    ``update_corr``); the lists are then not read. ``grad_scale``: ``∇f(x, z) = grad_scale · grad``
    (see ``_scaled``).
    """
    if grad_dot_step is None:
        (grad_dot_step,) = _reduced([_scaled(tensors.dot_diff(grad, params, params_ref), grad_scale)], reduce)
    return gap_from_products(loss, loss_ref, grad_dot_step)


def gap_from_products(loss: float | Tensor, loss_ref: float | Tensor, grad_dot_step: Tensor) -> Tensor:
    """``inst_gap`` (audit eq. 2) from its terms: ``f(x, z) − f(y, z) − ⟨∇f(x, z), x − y⟩``."""
    return loss_diff(loss, loss_ref).to(grad_dot_step.device) - grad_dot_step


def inst_smooth(
    grad: TensorList,
    grad_ref: TensorList,
    params: TensorList,
    params_ref: TensorList,
    *,
    reduce: Reduce = None,
    step_sq: Optional[Tensor] = None,
    consume_grad_ref: bool = False,
    grad_scale: Optional[Tensor] = None,
) -> Tensor:
    """Instantaneous smoothness (audit eq. 4): ``‖∇f(x,z) − ∇f(y,z)‖ / ‖x − y‖``.

    ``0/0`` (the parameters did not move and neither did the gradient) is NaN, ``c/0`` is +Inf:
    both are stored as they are, the aggregates below skip NaN. ``step_sq``: the (reduced)
    ``‖x − y‖²`` when the caller already has it; ``params`` and ``params_ref`` are then not read.
    ``consume_grad_ref``: ``grad_ref`` is the caller's temporary and may be overwritten
    (``tensors.dist_sq(..., overwrite_ys=True)``: no gradient-sized allocation). ``grad_scale``:
    ``∇f(x, z) = grad_scale · grad`` (see ``_scaled``); ``grad_ref − s·grad`` is formed in one
    pass (``dist_sq``'s ``x_scale``): ``s·grad`` is never materialised.
    """
    grad_diff = tensors.dist_sq(grad, grad_ref, overwrite_ys=consume_grad_ref, x_scale=grad_scale)
    if step_sq is None:
        grad_diff_sq, step_sq = _reduced([grad_diff, tensors.dist_sq(params, params_ref)], reduce)
    else:
        (grad_diff_sq,) = _reduced([grad_diff], reduce)
    return smooth_from_products(grad_diff_sq, step_sq)


def smooth_from_products(grad_diff_sq: Tensor, step_sq: Tensor) -> Tensor:
    """``inst_smooth`` (audit eq. 4) from the reduced squared norms ``‖∇f(x,z) − ∇f(y,z)‖²`` and
    ``‖x − y‖²`` (0/0 is NaN, c/0 is +Inf)."""
    return grad_diff_sq.sqrt() / step_sq.sqrt()


def update_corr(grad_next: TensorList, params_next: TensorList, params: TensorList, *, reduce: Reduce = None) -> Tensor:
    """Update correlation (audit eq. 9): ``⟨∇f(x_{t+1}, z_{t+1}), x_{t+1} − x_t⟩``, stored at step t+1."""
    (value,) = _reduced([tensors.dot_diff(grad_next, params_next, params)], reduce)
    return value


def update_corr_rs(grad_next: TensorList, update: TensorList, *, reduce: Reduce = None) -> Tensor:
    """Update correlation with random scaling (audit eq. 13): ``⟨∇f(x_{t+1}, z_{t+1}), Δ_t⟩``.

    ``Δ_t`` is the update the optimizer proposed, before the random scale ``s_t ~ Exp(1)``;
    without random scaling ``x_{t+1} − x_t = Δ_t`` and this equals ``update_corr``.
    """
    (value,) = _reduced([tensors.dot(grad_next, update)], reduce)
    return value


def update_corr_rs_from_update_corr(update_corr_value: Tensor | float, scale: float) -> Tensor | float:
    """``update_corr_rs`` from ``update_corr`` without a second dot product: ``x_{t+1} − x_t = s_t Δ_t``,
    so ``⟨g_{t+1}, Δ_t⟩ = ⟨g_{t+1}, x_{t+1} − x_t⟩ / s_t`` (audit eq. 13)."""
    if not scale > 0:
        raise ValueError(f"the random scale s_t must be positive, got {scale!r}")
    return update_corr_value / scale


def grad_norm_sq(grad: TensorList, *, reduce: Reduce = None) -> Tensor:
    """``grad_norm_sq = ‖g_t‖² = Σ_i ‖g_i‖²`` (MoXCo eq. 6, first term, raw minibatch value). The
    agent gets it from ``free_sums``, with the other every-step sums."""
    (value,) = _reduced([tensors.norm_sq(grad)], reduce)
    return value


def distance(params: TensorList, params_other: TensorList, *, reduce: Reduce = None) -> Tensor:
    """``‖x − y‖``: ``update_norm`` with ``y = x_t, x = x_{t+1}``; ``distance`` with ``y = x_0``."""
    (value,) = _reduced([tensors.dist_sq(params, params_other)], reduce)
    return value.sqrt()


@dataclass(frozen=True)
class FreeSums:
    """The every-step ("free") metrics of step ``t`` as one float64 vector of reduced
    sums: ``‖g_t‖²``; then ``⟨g_t, x_t − x_{t−1}⟩`` and ``‖x_t − x_{t−1}‖²`` if ``has_update``; then
    ``‖x_t − x_0‖²`` if ``has_origin``. Made on the training thread without reading the device
    (``free_sums``); ``values()`` reads it once, off that thread, and applies the formulas."""

    METRICS = ("grad_norm_sq", "update_norm", "distance", "update_corr", "update_corr_rs", "update_cos")  # values()'

    sums: Tensor
    has_update: bool
    has_origin: bool
    scale: float = 1.0  # s_{t−1}: x_t − x_{t−1} = s_{t−1} Δ_{t−1} under random scaling, else 1

    def update_products(self) -> Tuple[Tensor, Tensor]:
        """``(⟨g_t, x_t − x_{t−1}⟩, ‖x_t − x_{t−1}‖²)`` as 0-dim tensors (for the re-evaluation)."""
        if not self.has_update:
            raise ValueError("no previous iterate: the update products are undefined at the first step")
        return self.sums[1], self.sums[2]

    def values(self) -> Tuple[Dict[str, float], Dict[str, float]]:
        """``(metrics of step t, metrics of step t−1)``: ``grad_norm_sq``, ``update_corr`` (audit eq. 9),
        ``update_corr_rs`` (eq. 13), ``update_cos`` = ``update_corr / (‖g_t‖ ‖x_t − x_{t−1}‖)`` (NaN
        when either is 0), ``distance`` = ``‖x_t − x_0‖``; and ``update_norm`` =
        ``‖x_t − x_{t−1}‖``, which belongs to step t−1."""
        sums = self.sums.detach().cpu().tolist()
        now, before = {"grad_norm_sq": sums[0]}, {}
        if self.has_update:
            now["update_corr"] = sums[1]
            now["update_corr_rs"] = update_corr_rs_from_update_corr(sums[1], self.scale)
            scale = math.sqrt(sums[0] * sums[2])
            now["update_cos"] = sums[1] / scale if scale > 0 else math.nan
            before["update_norm"] = math.sqrt(sums[2])
        if self.has_origin:
            now["distance"] = math.sqrt(sums[-1])
        return now, before


def free_sums(grad: TensorList, params: TensorList, prev: Optional[TensorList], origin: Optional[TensorList], *,
              grad_norms_sq: Optional[Tensor] = None, reduce: Reduce = None, scale: float = 1.0,
              advance_prev: bool = False, grad_scale: Optional[Tensor] = None) -> FreeSums:
    """The free metrics of one step from one pass over the parameters (``tensors.step_sums``) and
    one collective when sharded: see ``FreeSums``. ``grad_norms_sq``: per-tensor ``‖g_i‖²`` the
    caller already has (the agent records them at the end of backward when ``.grad`` may be
    rescaled after it); else they come from the same pass.
    ``advance_prev``: ``prev`` holds ``params`` afterwards (``step_sums(..., advance=True)``).
    ``grad_scale``: ``g = grad_scale · grad`` (see ``_scaled``; ``grad_norms_sq`` are of ``g``)."""
    # without recorded norms ‖g‖² comes from the same pass as the rest (one read of grad)
    step = tensors.step_sums(grad, params, prev, origin, advance=advance_prev, grad_norm_sq=grad_norms_sq is None)
    if grad_norms_sq is None and grad_scale is None:
        partials = step  # [‖g‖², ...] as it comes: the common case, no more small operations
    else:
        if grad_norms_sq is None:
            grad_norm_sq, step = _scaled(step[:1], grad_scale, power=2), step[1:]
        else:
            grad_norm_sq = grad_norms_sq.to(device=step.device, dtype=ACCUMULATE_DTYPE).sum().reshape(1)
        if grad_scale is not None and prev is not None:  # ⟨g, x − x_{t−1}⟩ is the one sum of grad
            step = torch.cat([_scaled(step[:1], grad_scale), step[1:]])
        partials = torch.cat([grad_norm_sq, step])
    out = partials if reduce is None else reduce(partials)
    return FreeSums(partials if out is None else out, prev is not None, origin is not None, scale)


@dataclass
class ReplaySums:
    """The metrics of one replay of step ``t``'s batch at a point ``y``, as one float64
    vector of reduced sums: ``f(x_t, z_t)``, ``f(y, z_t)``; then, if ``has_products``,
    ``‖∇f(x_t, z_t) − ∇f(y, z_t)‖²``, ``⟨∇f(x_t, z_t), x_t − y⟩`` and ``‖x_t − y‖²``.

    ``y = x_{t−1}`` (``reference=False``): ``loss_diff``, ``inst_gap``, ``inst_smooth``; ``y = x*``:
    ``inst_gap_ref``, ``inst_smooth_ref``. Made on the training thread without reading the device
    (``replay_sums``); ``values()`` reads it once, off that thread, and applies the formulas
    (``loss_diff``, ``gap_from_products``, ``smooth_from_products``)."""

    sums: Tensor
    has_products: bool
    reference: bool = False

    def values(self) -> Dict[str, float]:
        sums = self.sums.detach().to("cpu", ACCUMULATE_DTYPE)
        suffix = "_ref" if self.reference else ""
        out: Dict[str, float] = {}
        if not self.reference:
            out["loss_diff"] = float(loss_diff(sums[0], sums[1]))
        if self.has_products:
            out["inst_gap" + suffix] = float(gap_from_products(sums[0], sums[1], sums[3]))
            out["inst_smooth" + suffix] = float(smooth_from_products(sums[2], sums[4]))
        return out


def replay_sums(loss: float | Tensor, loss_ref: float | Tensor, grad_diff_sq: Optional[Tensor] = None,
                grad: Optional[TensorList] = None, params: Optional[TensorList] = None,
                params_ref: Optional[TensorList] = None, *, grad_dot_step: Optional[Tensor] = None,
                step_sq: Optional[Tensor] = None, reduce: Reduce = None, grad_scale: Optional[Tensor] = None,
                reference: bool = False) -> ReplaySums:
    """``ReplaySums`` of a replay at ``y`` (``loss_ref = f(y, z)``, ``params_ref = y``), with one
    collective when sharded.

    ``grad_diff_sq``: this rank's partial ``‖∇f(x, z) − ∇f(y, z)‖²``, which the caller forms where
    the replay's gradient is still in cache (``tensors.dist_sq(grad, grad_ref, overwrite_ys=True)``);
    without it only the losses are kept (``loss_diff`` alone). ``grad_dot_step`` and ``step_sq``
    (reduced) when the caller has them, else they are computed from ``grad``, ``params`` and
    ``params_ref``; ``grad_scale`` as in ``inst_gap``."""
    like = loss if isinstance(loss, Tensor) else torch.zeros(())
    losses = [_scalar(loss, like), _scalar(loss_ref, like)]
    if grad_diff_sq is None:
        return ReplaySums(torch.stack(losses), False, reference)
    partials = [grad_diff_sq]
    if grad_dot_step is None:
        partials.append(_scaled(tensors.dot_diff(grad, params, params_ref), grad_scale))
    if step_sq is None:
        partials.append(tensors.dist_sq(params, params_ref))
    # the common case (one process, products from the free metrics) takes no reduction step: every
    # small op is a dispatch on the training thread, a kernel launch on an accelerator
    reduced = partials if reduce is None and len(partials) == 1 else list(_reduced(partials, reduce).unbind())
    grad_diff_sq = reduced.pop(0)
    if grad_dot_step is None:
        grad_dot_step = reduced.pop(0)
    if step_sq is None:
        step_sq = reduced.pop(0)
    terms = losses + [grad_diff_sq, grad_dot_step, step_sq]
    device = grad_diff_sq.device
    if any(t.dtype != ACCUMULATE_DTYPE or t.device != device or t.dim() for t in terms):
        terms = [t.to(device=device, dtype=ACCUMULATE_DTYPE).reshape(()) for t in terms]
    return ReplaySums(torch.stack(terms), True, reference)


# --- streaming aggregates (audit eq. 3 and eq. 5) -------------------------------------------------
#
# NaN observations (undefined values such as 0/0) are counted in ``skipped`` and leave the
# aggregate unchanged; ±Inf (divergence) is taken as it is. ``reset()`` starts a new epoch.


class RunningMean:
    """``avg_t = (1/t) Σ_{i≤t} v_i`` (``avg_gap``, audit eq. 3 left)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.skipped = 0
        self._sum = 0.0

    def update(self, value: float | Tensor) -> float:
        value = float(value)
        if math.isnan(value):
            self.skipped += 1
        else:
            self.count += 1
            self._sum += value
        return self.value

    @property
    def value(self) -> float:
        return self._sum / self.count if self.count else math.nan

    def state_dict(self) -> dict:
        return {"count": self.count, "skipped": self.skipped, "sum": self._sum}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.skipped, self._sum = int(state["count"]), int(state["skipped"]), float(state["sum"])


class ExponentialAverage:
    """``e_t = β e_{t−1} + (1 − β) v_t`` with ``e_0 = 0`` (``exp_gap``/``exp_smooth``, audit eq. 3/5).

    The recursion is the paper's, without bias correction, so early values are pulled towards 0
    (by the factor ``1 − β^t``); ``β = 0.99`` as in the paper.
    """

    def __init__(self, beta: float = EXP_BETA) -> None:
        if not (0.0 < beta < 1.0):
            raise ValueError(f"beta must be in (0, 1), got {beta!r}")
        self.beta = beta
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.skipped = 0
        self._value = 0.0

    def update(self, value: float | Tensor) -> float:
        value = float(value)
        if math.isnan(value):
            self.skipped += 1
        else:
            self.count += 1
            self._value = self.beta * self._value + (1.0 - self.beta) * value
        return self.value

    @property
    def value(self) -> float:
        return self._value if self.count else math.nan

    def state_dict(self) -> dict:
        return {"beta": self.beta, "count": self.count, "skipped": self.skipped, "value": self._value}

    def load_state_dict(self, state: dict) -> None:
        self.beta = float(state["beta"])
        self.count, self.skipped, self._value = int(state["count"]), int(state["skipped"]), float(state["value"])


class RunningMax:
    """``max_t = max_{i≤t} v_i`` (``max_smooth``, audit eq. 5 left)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.skipped = 0
        self._value = -math.inf

    def update(self, value: float | Tensor) -> float:
        value = float(value)
        if math.isnan(value):
            self.skipped += 1
        else:
            self.count += 1
            self._value = max(self._value, value)
        return self.value

    @property
    def value(self) -> float:
        return self._value if self.count else math.nan

    def state_dict(self) -> dict:
        return {"count": self.count, "skipped": self.skipped, "value": self._value}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.skipped, self._value = int(state["count"]), int(state["skipped"]), float(state["value"])


class ConvexityRatio:
    """Running ``convexity_ratio_T = Σ_t ⟨∇F(x_t), x_t − x*⟩ / Σ_t (F(x_t) − F(x*))`` (audit eq. 6).

    Feed one probe per call: ``F(x_t)``, ``F(x*)`` and ``∇F(x_t)`` on the probe set, the current
    parameters and the reference ``x*``. Reading (``interpret_convexity_ratio``): > 1 convex-like;
    (0, 1] convex analysis applies with a 1/K degradation; ≤ 0 strongly non-convex.
    Not reset at epochs: the ratio is defined over the whole trajectory.
    """

    def __init__(self) -> None:
        self.count = 0
        self.numerator = 0.0
        self.denominator = 0.0

    def update(
        self,
        loss: float | Tensor,
        loss_ref: float | Tensor,
        grad: TensorList,
        params: TensorList,
        params_ref: TensorList,
        *,
        reduce: Reduce = None,
        grad_scale: Optional[Tensor] = None,
    ) -> float:
        """Add one probe (see ``convexity_terms``); return the ratio."""
        terms = convexity_terms(loss, loss_ref, grad, params, params_ref, reduce=reduce, grad_scale=grad_scale)
        return self.update_terms(*terms.tolist())

    def update_terms(self, grad_dot_gap: float, loss_gap: float) -> float:
        """Add one probe's ``⟨∇F(x_t), x_t − x*⟩`` and ``F(x_t) − F(x*)``; return the ratio."""
        self.count += 1
        self.numerator += float(grad_dot_gap)
        self.denominator += float(loss_gap)
        return self.value

    @property
    def value(self) -> float:
        if self.count == 0:
            return math.nan
        if self.denominator == 0.0:
            return math.nan if self.numerator == 0.0 else math.copysign(math.inf, self.numerator)
        return self.numerator / self.denominator

    def state_dict(self) -> dict:
        return {"count": self.count, "numerator": self.numerator, "denominator": self.denominator}

    def load_state_dict(self, state: dict) -> None:
        self.count = int(state["count"])
        self.numerator, self.denominator = float(state["numerator"]), float(state["denominator"])


def convexity_terms(loss: float | Tensor, loss_ref: float | Tensor, grad: TensorList, params: TensorList,
                    params_ref: TensorList, *, reduce: Reduce = None, grad_scale: Optional[Tensor] = None) -> Tensor:
    """One probe's summands of ``convexity_ratio`` (audit eq. 6): ``[⟨∇F(x_t), x_t − x*⟩,
    F(x_t) − F(x*)]`` as a float64 vector on the gradient's device, not read from it (the agent
    hands it to its writer thread; ``ConvexityRatio.update_terms`` adds it up).
    ``∇F(x_t) = grad_scale · grad`` (see ``_scaled``)."""
    (grad_dot_gap,) = _reduced([_scaled(tensors.dot_diff(grad, params, params_ref), grad_scale)], reduce)
    return torch.stack([grad_dot_gap.reshape(()), loss_diff(loss, loss_ref).to(grad_dot_gap.device)])


def interpret_convexity_ratio(ratio: float) -> str:
    """The audit paper's reading of a convexity ratio (audit paper §3.2, fig. 3)."""
    if math.isnan(ratio):
        return "undefined"
    if ratio > 1.0:
        return "convex-like"
    if ratio > 0.0:
        return f"convex analysis applies with a {1.0 / ratio:.3g}x degradation"
    return "strongly non-convex"


class GapSmoothAggregates:
    """The four path aggregates of the audit paper, reset together at an epoch start.

    ``update(inst_gap, inst_smooth)`` returns ``{"avg_gap", "exp_gap", "max_smooth", "exp_smooth"}``.
    Per the audit paper (§2, last paragraph) aggregates are reset at each epoch when the run
    has epochs (``reset_epoch()``), never otherwise (pretraining).
    """

    def __init__(self, beta: float = EXP_BETA) -> None:
        self.avg_gap = RunningMean()
        self.exp_gap = ExponentialAverage(beta)
        self.max_smooth = RunningMax()
        self.exp_smooth = ExponentialAverage(beta)

    def update(self, inst_gap: float | Tensor | None = None, inst_smooth: float | Tensor | None = None) -> dict:
        out = {}
        if inst_gap is not None:
            out["avg_gap"] = self.avg_gap.update(inst_gap)
            out["exp_gap"] = self.exp_gap.update(inst_gap)
        if inst_smooth is not None:
            out["max_smooth"] = self.max_smooth.update(inst_smooth)
            out["exp_smooth"] = self.exp_smooth.update(inst_smooth)
        return out

    def reset_epoch(self) -> None:
        for aggregate in (self.avg_gap, self.exp_gap, self.max_smooth, self.exp_smooth):
            aggregate.reset()

    def state_dict(self) -> dict:
        return {name: getattr(self, name).state_dict() for name in ("avg_gap", "exp_gap", "max_smooth", "exp_smooth")}

    def load_state_dict(self, state: dict) -> None:
        for name, sub_state in state.items():
            getattr(self, name).load_state_dict(sub_state)
