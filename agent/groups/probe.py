"""The probe group: curvature, the denoised gradient norm's split, the convexity ratio and the
optimizer's state, every ``probe_every`` steps.

Everything that evaluates the loss runs on the probe batch: the probe set (``attach(...,
probe_data=...)``, ``agent.probe_set``), else the step's own batch. Parts, each with what its
failure drops:

* ``sharpness``: ``λ_max(∇²f)`` at ``x_t`` (a ``moxco.curvature.Sharpness`` tracker warm-started from
  the previous probe's vector, ``sharpness_iters`` Hessian-vector products, MoXCo A.2.1), and
  ``sharpness_min`` = ``λ_min`` when the probe's products gave it (a Lanczos probe: the cold start,
  or ``sharpness_iters ≥ 2``);
* ``sharpness_precond`` (Adam-family optimizers): ``λ_max(P⁻¹∇²f)`` with ``P = √v̂ + ε`` read from the
  optimizer's own second moments at the probe (its own warm tracker; from the first probe after the
  optimizer's first step), and ``sharpness_precond_target``, the adaptive edge of stability
  ``2(1+β₁)/((1−β₁)η)`` (Cohen et al. 2022);
* ``hessian_trace`` (opt-in): Hutchinson's ``tr(∇²f)`` with ``hessian_trace`` Rademacher samples;
* ``split``: the gradients of three disjoint thirds of the probe batch, whose sums
  (``moxco.aligator.split_sums``) give the writer's ALIGATOR estimate of ``‖∇F‖²`` for goodness's
  gradient term (MoXCo A.2.2); without it (a batch of fewer than three samples, or after a failure)
  the gradient term is the raw ``‖g_t‖²``, biased up by the gradient noise;
* ``probe_loss`` (with a probe set): ``F(x_t)`` on the probe set, goodness's loss term, and with a
  reference ``∇F(x_t)`` for the convexity ratio (one forward, or one forward+backward);
* ``convexity_ratio``: with a reference ``x*``, one probe's summands ``⟨∇F(x_t), x_t − x*⟩`` and
  ``F(x_t) − F(x*)`` (audit eq. 6; summed on the writer thread): on the probe set, or with the
  step's own ``f(x_t)`` and ``g_t``;
* ``optimizer``: the ``moxco.optim`` optimizers' own state (``hyperparameters()``: lr, α, β, the
  critical-momenta buffer's statistics, the phase);
* ``sharpness_target``: ``λ_target``, the user's or ``k · λ_EOS`` with the optimizer's η, α, β
  (MoXCo Theorem 2), read here because the optimizer may change its lr every step.

The Hessian-vector products are autograd's double backward, call by call (``Replays.hessian``;
one call's gradient graph built once for all of a probe's products, every curvature metric's), or,
under FSDP (or ``sharpness_hvp="finite_difference"``, or where autograd reports that the model
cannot be differentiated twice), central finite differences of two gradient replays. ``phase`` is recorded on this cadence too (``agent.step.StepState.phase_point``).
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from moxco import metrics
from moxco.agent.capture import ForwardCall, StepCapture
from moxco.agent.failures import Failures
from moxco.agent.groups import every
from moxco.agent.options import AgentOptions
from moxco.agent.probe_set import STEP_BATCH, ProbeSet
from moxco.agent.replays import Replays
from moxco.agent.step import StepContext, StepState
from moxco.aligator import split_sums
from moxco.catalogue import GOODNESS_TERMS, names
from moxco.curvature import Preconditioned, Sharpness, adam_preconditioner, hutchinson
from moxco.goodness import adaptive_eos_sharpness, eos_sharpness

log = logging.getLogger("moxco.agent")

# a tracker's cold start: Lanczos from a random vector until its estimate moves by ≤ 1e-6 relative
# (7-18 products on small MLPs; within 1e-6 of the explicit Hessian's λ_max), at most 20
COLD_ITERS, COLD_TOL = 20, 1e-6
SPLIT_FALLBACK = "goodness's gradient term is the raw ‖g_t‖² (biased up by the gradient noise) from now on"
PRECOND_NEEDS_ADAM = ("sharpness_precond needs an Adam-family optimizer (torch.optim.Adam, AdamW, or "
                      "moxco.optim.MoXCo over one): its P = √v̂ + ε is the optimizer's own second moments")
GOODNESS_NEEDS_PRECOND = "goodness sharpness='precond' scores sharpness_precond, which this run does not measure"


# what autograd says when a kernel's backward has no derivative itself (PyTorch's fused attention
# on GPUs, a custom Function marked once_differentiable): no double backward through it
NO_DOUBLE_BACKWARD = re.compile(r"derivative for .* is not implemented|once_differentiable|double backward", re.I)


def no_double_backward(exc: BaseException) -> bool:
    """Whether ``exc`` says that a Hessian-vector product by double backward is impossible here."""
    return isinstance(exc, (RuntimeError, NotImplementedError)) and bool(NO_DOUBLE_BACKWARD.search(str(exc)))


def adam_family(optimizer: Any) -> Optional[torch.optim.Optimizer]:
    """The ``torch.optim.Adam``/``AdamW`` that holds the second moments: ``optimizer`` itself, or the
    base a wrapper steps (``moxco.optim.MoXCo``'s ``base``); None for any other optimizer."""
    for _ in range(4):
        if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            return optimizer
        optimizer = getattr(optimizer, "base", None)
        if optimizer is None:
            return None
    return None


class _Tracker(Sharpness):
    """``moxco.curvature.Sharpness`` over the operator the probe builds for it (``Replays.hessian``:
    call-by-call autograd products, or finite differences through FSDP on the local shards), with
    ``P`` read by ``precondition()`` at every probe when it tracks ``λ_max(P⁻¹H)``."""

    def __init__(self, params: List[Tensor], precondition: Optional[Callable[[], List[Tensor]]] = None,
                 **settings: Any) -> None:
        super().__init__(params, preconditioner=precondition, **settings)

    def operator(self, op):
        self.params = op.params  # under FSDP: this probe's local shards (FSDP's lazy init may replace them)
        return op if self.preconditioner is None else Preconditioned(op, self.preconditioner())


class Probe:
    """The probe (see the module docstring)."""

    name = "probe"

    def __init__(self, options: AgentOptions, failures: Failures, state: StepState, replays: Replays,
                 optimizer: torch.optim.Optimizer, params: List[Tensor], *, seed: int,
                 reference: Optional[List[Tensor]], probe_set: Optional[ProbeSet]) -> None:
        o = options
        self.due = every(o.probe_every)
        self.failures, self.state, self.replays = failures, state, replays
        self.optimizer, self.goodness, self.reference, self.probe_set = optimizer, o.goodness, reference, probe_set
        shards = replays.shards
        self.hvp_option = o.sharpness_hvp
        self.finite_difference = o.sharpness_hvp == "finite_difference" or (
            o.sharpness_hvp == "auto" and shards is not None)
        self.on_config: Optional[Callable[[Dict[str, Any]], None]] = None  # stores a change of describe()
        # the curvature's own random numbers (start vectors, Hutchinson's signs): under FSDP each rank
        # draws its shards' independently; elsewhere every rank draws the same (replicated parameters)
        self.generator = torch.Generator().manual_seed(seed + 1 + (replays.group.rank if shards is not None else 0))
        self._settings = dict(iters_per_call=o.sharpness_iters, cold_iters=max(o.sharpness_iters, COLD_ITERS),
                              cold_tol=COLD_TOL, refine=o.sharpness_refine, generator=self.generator,
                              reduce=shards.reduce if shards is not None else None)
        self.adam = adam_family(optimizer)
        precond = o.sharpness_precond if o.sharpness_precond is not None else self.adam is not None
        self._precond = precond
        self.rebind(shards.owners if shards is not None else params)
        self.trace_samples = o.hessian_trace
        self.pending_errors: List[Tuple[str, BaseException]] = []  # recorded once the run is registered
        self._graph: Optional[Dict[str, Any]] = None  # during a probe: its gradient graph (CallsHessian)

        failures.declare("sharpness", self.name, ["sharpness", "sharpness_min"])
        if precond:
            failures.declare("sharpness_precond", self.name, ["sharpness_precond", "sharpness_precond_target"])
            if self.adam is None:
                self.pending_errors.append(("sharpness_precond", ValueError(PRECOND_NEEDS_ADAM)))
        if self.goodness.sharpness == "precond" and (not precond or self.adam is None):
            self.pending_errors.append(("goodness", ValueError(GOODNESS_NEEDS_PRECOND)))
        if self.trace_samples:
            failures.declare("hessian_trace", self.name, ["hessian_trace"])
        failures.declare("split", self.name, note=SPLIT_FALLBACK)
        if probe_set is not None:
            failures.declare("probe_loss", self.name, ["goodness", *GOODNESS_TERMS, "convexity_ratio"])
        failures.declare("convexity_ratio", self.name, ["convexity_ratio"])
        failures.declare("optimizer", self.name, names("optimizer"))
        failures.declare("sharpness_target", self.name, ["sharpness_target"])

    def rebind(self, params: List[Tensor]) -> None:
        """Track the curvature over ``params`` (at attach, and when the optimizer's parameters
        change): the trackers start cold."""
        self.sharpness = _Tracker(params, **self._settings)
        self.sharpness_precond = _Tracker(params, self._preconditioner, **self._settings) if self._precond else None

    def state_dict(self) -> Dict[str, Any]:
        """The trackers' vectors and estimates and the curvature's random state (a checkpoint)."""
        return {"sharpness": self.sharpness.state_dict(),
                "sharpness_precond": None if self.sharpness_precond is None else self.sharpness_precond.state_dict(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore ``state_dict()``; a bare ``Sharpness.state_dict()`` (older checkpoints) restores
        the top eigenvalue's tracker only."""
        if "eigenvector" in state:
            self.sharpness.load_state_dict(state)
            return
        self.sharpness.load_state_dict(state["sharpness"])
        if self.sharpness_precond is not None and state.get("sharpness_precond") is not None:
            self.sharpness_precond.load_state_dict(state["sharpness_precond"])
        if state.get("generator") is not None:
            self.generator.set_state(state["generator"])

    def describe(self) -> Dict[str, Any]:
        """What the run's config records: the probe batch and how the curvature is measured."""
        return {
            "probe_set": self.probe_set.describe() if self.probe_set is not None else dict(STEP_BATCH),
            "curvature": {"hvp": "finite_difference" if self.finite_difference else "autograd",
                          "sharpness_iters": self.sharpness.iters_per_call,
                          "sharpness_refine": self.sharpness.refine,
                          "sharpness_precond": self.sharpness_precond is not None and self.adam is not None,
                          "hessian_trace_samples": self.trace_samples},
        }

    def compute(self, ctx: StepContext) -> None:
        """The probe's values (``ctx.probe``, read on the writer thread) and the phase point."""
        ctx.probe = {}
        if self.probe_set is not None:
            calls: Optional[List[ForwardCall]] = self.probe_set.calls(ctx.calls)
        else:
            calls = list(ctx.calls) if ctx.has_batch else None
        if calls:
            self._graph = {}  # the probe batch's gradient graph, built once for the curvature metrics
            try:
                self.failures.run("sharpness", self._sharpness, ctx, calls)
                if self.sharpness_precond is not None:
                    self.failures.run("sharpness_precond", self._sharpness_precond, ctx, calls)
                if self.trace_samples:
                    self.failures.run("hessian_trace", self._trace, ctx, calls)
            finally:
                self._graph = None  # freed before the other replays
            self.failures.run("split", self._split, ctx, calls)
            at_x = self.failures.run("probe_loss", self._probe_loss, ctx, calls) if self.probe_set else None
            if self.reference is not None:
                self.failures.run("convexity_ratio", self._convexity_terms, ctx, calls, at_x)
        self.failures.run("optimizer", self._optimizer_state, ctx)
        ctx.values.update(self.state.phase_point())
        # read with the optimizer state of this step: the writer thread must not read the live optimizer
        target = self.failures.run("sharpness_target", self.sharpness_target)
        if target is not None:
            ctx.probe["sharpness_target"] = float(target)
        if self.sharpness_precond is not None and self.adam is not None:
            self.failures.run("sharpness_precond", self._precond_target, ctx)

    # --- curvature ---------------------------------------------------------------------------------

    def _hessian(self, ctx: StepContext, part: str, calls: List[ForwardCall]):
        return self.replays.hessian(ctx, part, calls, finite_difference=self.finite_difference, shared=self._graph)

    def _products(self, ctx: StepContext, part: str, calls: List[ForwardCall], solve: Callable[[Any], Any]) -> Any:
        """``solve(operator)``; with ``sharpness_hvp="auto"``, a model autograd cannot differentiate
        twice (``no_double_backward``) switches every curvature metric to finite differences, once,
        logged and stored with the run's config."""
        try:
            return solve(self._hessian(ctx, part, calls))
        except Exception as exc:
            if self.finite_difference or self.hvp_option != "auto" or not no_double_backward(exc):
                raise
            self.finite_difference = True
            log.warning("moxco: %s: no double backward through this model (%s); the curvature metrics use "
                        "finite differences of two gradient replays from now on", part, str(exc).splitlines()[0])
            if self.on_config is not None:
                self.on_config({"curvature": dict(self.describe()["curvature"],
                                                  autograd_failed=str(exc).splitlines()[0][:300])})
            return solve(self._hessian(ctx, part, calls))

    def _sharpness(self, ctx: StepContext, calls: List[ForwardCall]) -> None:
        ctx.probe["sharpness"] = self._products(ctx, "sharpness", calls, self.sharpness)
        low = self.sharpness.eigenvalue_min
        if math.isfinite(low):  # a Lanczos probe whose smallest Ritz pair converged: λ_min at no extra product
            ctx.probe["sharpness_min"] = low

    def _preconditioner(self) -> List[Tensor]:
        if self.replays.shards is not None:
            return self.replays.shards.local_preconditioner(self.optimizer)
        return adam_preconditioner(self.optimizer, self.sharpness_precond.params)

    def _sharpness_precond(self, ctx: StepContext, calls: List[ForwardCall]) -> None:
        if self.adam is None:
            raise ValueError(PRECOND_NEEDS_ADAM)
        if not any("exp_avg_sq" in s for s in self.adam.state.values()):
            return  # before the optimizer's first step there is no v̂ yet
        ctx.probe["sharpness_precond"] = self._products(ctx, "sharpness_precond", calls, self.sharpness_precond)

    def _precond_target(self, ctx: StepContext) -> None:
        lr = float(self.optimizer.param_groups[0]["lr"])  # the step size the user schedules (MoXCo's own η)
        beta1 = float(self.adam.param_groups[0]["betas"][0])
        ctx.probe["sharpness_precond_target"] = adaptive_eos_sharpness(lr, beta1)

    def _trace(self, ctx: StepContext, calls: List[ForwardCall]) -> None:
        def solve(op):
            with op:
                return hutchinson(op, samples=self.trace_samples, generator=self.generator).estimate

        ctx.probe["hessian_trace"] = self._products(ctx, "hessian_trace", calls, solve)

    # --- gradient norm, F and the convexity ratio --------------------------------------------------

    def _split(self, ctx: StepContext, calls: List[ForwardCall]) -> None:
        thirds = StepCapture.split_calls(calls, 3)
        if thirds is None:  # fewer than three samples: no split
            return
        grads = self.replays.gradients_of(ctx, thirds, "split")
        ctx.probe["split_sums"] = split_sums(*grads, reduce=ctx.reduce)
        ctx.probe["split_sizes"] = [StepCapture.batch_size(part) * self.replays.group.world for part in thirds]

    def _probe_loss(self, ctx: StepContext, calls: List[ForwardCall]) -> Tuple[Tensor, Optional[List[Tensor]]]:
        # F(x_t) on the probe set; ∇F(x_t) too when the convexity ratio needs it (one pass either way)
        if self.reference is not None and self.failures.live("convexity_ratio"):
            loss, grad = self.replays.with_grad(ctx, None, "probe_loss", calls=calls)
        else:
            loss, grad = self.replays.loss_at(ctx, None, "probe_loss", calls=calls), None
        ctx.probe["probe_loss"] = loss
        return loss, grad

    def _convexity_terms(self, ctx: StepContext, calls: List[ForwardCall],
                         at_x: Optional[Tuple[Tensor, Optional[List[Tensor]]]]) -> None:
        # F and ∇F at x_t: on the probe set (the probe_loss part's pass), else the step's own f(x_t, z_t)
        # and g_t; summed on the writer thread (ConvexityRatio there): no device read on this one
        if self.probe_set is not None:
            if at_x is None or at_x[1] is None:
                return  # probe_loss failed: its failure dropped convexity_ratio
            loss, grad, scale = at_x[0], at_x[1], None
        else:
            loss, grad, scale = ctx.loss, ctx.grad, ctx.grad_scale
        loss_ref = self.replays.loss_at(ctx, self.reference, "convexity_ratio", calls=calls)
        ctx.probe["convexity_terms"] = metrics.convexity_terms(
            loss, loss_ref, grad, ctx.params, self.reference, reduce=ctx.reduce, grad_scale=scale)

    # --- the optimizer ---------------------------------------------------------------------------

    def _optimizer_state(self, ctx: StepContext) -> None:
        describe = getattr(self.optimizer, "hyperparameters", None)
        if not callable(describe):
            return
        state = describe()
        for key in names("optimizer"):
            value = state.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                ctx.values[key] = float(value)
        if state.get("phase") in (1, 2):
            self.state.phase = int(state["phase"])

    def sharpness_target(self) -> Optional[float]:
        """``λ_target``: the user's (goodness on the plain pair), else ``k · λ_EOS`` with the
        optimizer's own η, α, β (MoXCo Theorem 2): ``optimizer.eos_sharpness()`` for
        moxco.optim.MoXCo, else from param group 0 (heavy-ball momentum as α)."""
        s = self.goodness
        if s.sharpness_target is not None and s.sharpness == "plain":  # else it is sharpness_precond's target
            return s.sharpness_target
        own = getattr(self.optimizer, "eos_sharpness", None)
        if callable(own):
            value = float(own())
            return s.k * value if math.isfinite(value) and value > 0 else None
        group: Any = self.optimizer.param_groups[0]
        lr = group.get("lr")
        if not isinstance(lr, (int, float)) or lr <= 0:
            return None
        alpha = group.get("alpha", group.get("momentum", 0.0)) or 0.0
        beta = group.get("beta", 0.0) if isinstance(group.get("beta", 0.0), (int, float)) else 0.0
        try:
            return s.k * eos_sharpness(float(lr), float(alpha), float(beta))
        except ValueError:
            return None
