"""The probe group: curvature, the denoised gradient norm's split, the convexity ratio and the
optimizer's state, every ``probe_every`` steps.

Parts, each with what its failure drops:

* ``sharpness``: ``λ_max(∇²f)`` on the step's batch at ``x_t`` (``moxco.hessian.Sharpness``: a
  power iteration warm-started from the previous probe's vector, ``sharpness_iters`` Hessian-vector
  products, MoXCo A.2.1); not available under FSDP (``agent.sharded``);
* ``split``: the gradients of three disjoint thirds of the batch, whose sums
  (``moxco.aligator.split_sums``) give the writer's ALIGATOR estimate of ``‖∇F‖²`` for goodness's
  gradient term (MoXCo A.2.2); without it (a batch of fewer than three samples, or after a failure)
  the gradient term is the raw ``‖g_t‖²``, biased up by the gradient noise;
* ``convexity_ratio``: with a reference ``x*``, one probe's summands ``⟨∇F(x_t), x_t − x*⟩`` and
  ``F(x_t) − F(x*)`` on the step's batch (audit eq. 6; summed on the writer thread);
* ``optimizer``: the ``moxco.optim`` optimizers' own state (``hyperparameters()``: lr, α, β, the
  critical-momenta buffer's statistics, the phase);
* ``sharpness_target``: ``λ_target``, the user's or ``k · λ_EOS`` with the optimizer's η, α, β
  (MoXCo Theorem 2), read here because the optimizer may change its lr every step.

``phase`` is recorded on this cadence too (``agent.step.StepState.phase_point``).
"""

from __future__ import annotations

import math
from typing import Any, List, Optional

import torch
from torch import Tensor

from moxco import metrics
from moxco.agent.capture import StepCapture
from moxco.agent.failures import Failures
from moxco.agent.groups import every
from moxco.agent.options import GoodnessSettings
from moxco.agent.replays import Replays
from moxco.agent.step import StepContext, StepState
from moxco.aligator import split_sums
from moxco.catalogue import names
from moxco.goodness import eos_sharpness
from moxco.hessian import Sharpness

SPLIT_FALLBACK = "goodness's gradient term is the raw ‖g_t‖² (biased up by the gradient noise) from now on"


class Probe:
    """The probe (see the module docstring)."""

    name = "probe"

    def __init__(self, probe_every: int, failures: Failures, state: StepState, replays: Replays,
                 optimizer: torch.optim.Optimizer, goodness: GoodnessSettings, sharpness: Sharpness,
                 reference: Optional[List[Tensor]]) -> None:
        self.due = every(probe_every)
        self.failures, self.state, self.replays = failures, state, replays
        self.optimizer, self.goodness, self.sharpness, self.reference = optimizer, goodness, sharpness, reference
        failures.declare("sharpness", self.name, ["sharpness"])
        failures.declare("split", self.name, note=SPLIT_FALLBACK)
        failures.declare("convexity_ratio", self.name, ["convexity_ratio"])
        failures.declare("optimizer", self.name, names("optimizer"))
        failures.declare("sharpness_target", self.name, ["sharpness_target"])

    def compute(self, ctx: StepContext) -> None:
        """The probe's values (``ctx.probe``, read on the writer thread) and the phase point."""
        ctx.probe = {}
        if ctx.has_batch:
            self.failures.run("sharpness", self._sharpness, ctx)
            self.failures.run("split", self._split, ctx)
            if self.reference is not None:
                self.failures.run("convexity_ratio", self._convexity_terms, ctx)
        self.failures.run("optimizer", self._optimizer_state, ctx)
        ctx.values.update(self.state.phase_point())
        # read with the optimizer state of this step: the writer thread must not read the live optimizer
        target = self.failures.run("sharpness_target", self.sharpness_target)
        if target is not None:
            ctx.probe["sharpness_target"] = float(target)

    def _sharpness(self, ctx: StepContext) -> None:
        ctx.probe["sharpness"] = torch.tensor(self.sharpness(self.replays.graph(ctx, "sharpness")), dtype=torch.float64)

    def _split(self, ctx: StepContext) -> None:
        thirds = StepCapture.split_calls(ctx.calls, 3)
        if thirds is None:  # fewer than three samples: no split
            return
        grads = self.replays.gradients_of(ctx, thirds, "split")
        ctx.probe["split_sums"] = split_sums(*grads, reduce=ctx.reduce)
        ctx.probe["split_sizes"] = [StepCapture.batch_size(part) * self.replays.group.world for part in thirds]

    def _convexity_terms(self, ctx: StepContext) -> None:
        # F and ∇F on the probe batch (the step's batch): F(x_t) and g_t are the step's own;
        # summed on the writer thread (ConvexityRatio there): no device read on this one
        loss_ref = self.replays.loss_at(ctx, self.reference, "convexity_ratio")
        ctx.probe["convexity_terms"] = metrics.convexity_terms(
            ctx.loss, loss_ref, ctx.grad, ctx.params, self.reference, reduce=ctx.reduce, grad_scale=ctx.grad_scale)

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
        """``λ_target``: the user's, else ``k · λ_EOS`` with the optimizer's own η, α, β (MoXCo
        Theorem 2): ``optimizer.eos_sharpness()`` for moxco.optim.MoXCo, else from param group 0
        (heavy-ball momentum as α)."""
        s = self.goodness
        if s.sharpness_target is not None:
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
