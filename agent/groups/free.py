"""The free group: every step's metrics, from dot products over the parameters (no extra pass).

``loss`` ``f(x_t, z_t)``; ``grad_norm_sq`` ``‖g_t‖²`` (MoXCo eq. 6, the raw minibatch value);
``distance`` ``‖x_t − x_0‖``; ``update_corr`` ``⟨g_t, x_t − x_{t−1}⟩`` (audit eq. 9, the previous
step's update against this step's gradient) and ``update_corr_rs`` ``⟨g_t, Δ_{t−1}⟩`` (audit eq.
13); ``update_norm`` ``‖x_t − x_{t−1}‖``, stored at step t−1. All but the loss come from one fused
pass (``moxco.metrics.free_sums``) that also writes ``x_t`` over the agent's copy of ``x_{t−1}``.
And what the loop tells for free: ``lr``, the first parameter group's learning rate used by this
step; ``step_time``, the wall time from the previous step's pre-hook to this one's (this step's
forward and backward and the previous update); ``samples_per_second`` and ``tokens_per_second``,
the step's batch (``StepCapture.batch_size``, ``token_count``; times the ranks) over it.

Parts, and what their failure drops:

* ``gradient``: ``g_t = grad_scale · .grad``, the raw gradient before clipping and AMP unscaling
  (``agent.gradients``); every metric ``catalogue.needing("gradient")`` lists;
* ``loss``: the step's loss (``agent.capture``); every metric ``catalogue.needing("loss")`` lists
  (the loss-free metrics go on);
* ``free``: the fused sums: ``grad_norm_sq``, ``update_norm``, ``distance``, ``update_corr``,
  ``update_corr_rs``;
* ``random_scaling``: at the step post-hook, ``x_{t+1} = x_t + s_t Δ_t`` with ``s_t ~ Exp(1)``
  (audit paper §4.3), when asked for;
* ``lr``: ``lr``; ``timing``: ``step_time``, ``samples_per_second``, ``tokens_per_second``.
"""

from __future__ import annotations

import math
import time
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from moxco import metrics
from moxco.agent.capture import StepCapture
from moxco.agent.distributed import DataParallelGroup
from moxco.agent.failures import Failures
from moxco.agent.gradients import RawGradient
from moxco.agent.groups import always
from moxco.agent.step import Previous, StepContext, StepState
from moxco.agent.writer import FREE_SUMS, GRAD_RESCALE_RATIOS, GRADIENT_UNKNOWN
from moxco.catalogue import names, needing

GRADIENT_RECORD_FAILED = ("the end-of-backward gradient record failed (agent.errors['gradient']), so .grad may hold "
                          "a rescaled gradient")
SUMS = metrics.FreeSums.METRICS
TIMING = ("step_time", "samples_per_second", "tokens_per_second")
FIRST_CHANGE = ("the loop began changing .grad after backward (clipping or scaling) at this step, and the norms that "
                "undo it were not recorded for it; they are from the next backward on")


class FreeMetrics:
    """The every-step metrics (see the module docstring)."""

    name = "free"

    def __init__(self, failures: Failures, state: StepState, capture: StepCapture, raw_gradient: RawGradient,
                 group: DataParallelGroup, *, random_scaling: bool, optimizer: Any = None) -> None:
        self.failures, self.state, self.capture, self.raw_gradient = failures, state, capture, raw_gradient
        self.group, self.random_scaling, self.optimizer = group, random_scaling, optimizer
        self.due = always
        self._last_step_at: Optional[float] = None
        failures.declare("gradient", self.name, needing("gradient"))
        failures.declare("loss", self.name, needing("loss"))
        failures.declare("free", self.name, SUMS)
        failures.declare("random_scaling", self.name)
        failures.declare("lr", self.name, ["lr"])
        failures.declare("timing", self.name, TIMING)
        assert set(SUMS + TIMING + ("loss", "lr")) == set(names("free")), "the free group's parts and the catalogue"

    # --- the step pre-hook ----------------------------------------------------------------------

    def recover_gradient(self, ctx: StepContext) -> None:
        """``ctx.grad_scale`` (``g_t = grad_scale · .grad``) and the recorded ``‖g_i‖²``; when
        ``g_t`` cannot be known this step, the writer leaves the gradient metrics out."""
        if self.failures.run("gradient", self._recover, ctx) is None:
            ctx.grad_scale = ctx.raw_norms_sq = None
            ctx.values.setdefault(GRADIENT_UNKNOWN, GRADIENT_RECORD_FAILED)
            self.raw_gradient.remove()  # off for good: no more end-of-backward records

    def _recover(self, ctx: StepContext) -> bool:
        raw = self.raw_gradient
        raw.check()
        modified = raw.modified()
        known = not modified or raw.has_norms()
        # while .grad is left as autograd wrote it, ‖g_t‖² comes from the free metrics' own pass
        raw.step_seen(modified)
        if modified and not known:  # the first change to .grad, after steps that made none
            ctx.values[GRADIENT_UNKNOWN] = FIRST_CHANGE
        elif modified:  # the user rescaled .grad in place (clipping, AMP): the sums over it are rescaled instead
            ctx.grad_scale, ctx.values[GRAD_RESCALE_RATIOS] = raw.multiplier()
        # read before any replay: an FSDP replay's backward records its own norms
        ctx.raw_norms_sq = raw.raw_norms_sq()
        return True

    def step_loss(self, ctx: StepContext) -> None:
        """``loss = f(x_t, z_t)``, over the global batch (the mean of the ranks' losses under DDP)."""
        ctx.loss = self.failures.run("loss", self._loss)
        if ctx.loss is not None:
            ctx.values["loss"] = ctx.loss

    def _loss(self) -> Tensor:
        nan = lambda: torch.tensor(math.nan, dtype=torch.float64)  # noqa: E731
        return self.group.mean_scalar(self.failures.local("loss", self.capture.step_loss, nan))

    def loop_values(self, ctx: StepContext) -> None:
        """``lr``, ``step_time`` and the throughput: what the loop tells at no cost."""
        now = time.perf_counter()
        if self.optimizer is not None:
            self.failures.run("lr", self._lr, ctx)
        if self._last_step_at is not None:
            self.failures.run("timing", self._timing, ctx, now - self._last_step_at)
        self._last_step_at = now

    def _lr(self, ctx: StepContext) -> None:
        lr = self.optimizer.param_groups[0].get("lr")
        if isinstance(lr, torch.Tensor) or (isinstance(lr, (int, float)) and not isinstance(lr, bool)):
            ctx.values["lr"] = lr  # (a tensor lr is read on the writer thread)

    def _timing(self, ctx: StepContext, seconds: float) -> None:
        ctx.values["step_time"] = seconds
        if seconds <= 0:
            return
        samples = StepCapture.batch_size(ctx.calls)
        if samples:
            ctx.values["samples_per_second"] = samples * self.group.world / seconds
        tokens = StepCapture.token_count(ctx.calls)
        if tokens:
            ctx.values["tokens_per_second"] = tokens * self.group.world / seconds

    def skipped(self) -> None:
        """A step the agent did not measure (parameters not there yet): its time is not this one's."""
        self._last_step_at = None

    def compute(self, ctx: StepContext) -> None:
        """The fused sums (``metrics.FreeSums``, read on the writer thread), and ``x_{t−1} ← x_t``."""
        self.failures.run("free", self._sums, ctx)

    def _sums(self, ctx: StepContext) -> None:
        # one float64 vector (one collective when sharded, one device read on the writer thread):
        # ‖g_t‖² from the norms recorded at the end of backward when there are some (no second read
        # of .grad); update_corr and the previous step's update_norm from one difference
        # x_t − x_{t−1}, which the re-evaluation reuses; distance to x_0; and x_{t−1} ← x_t on the
        # way, with the copy as the scratch for the differences
        prev = self.state.previous()
        if prev is not None:
            self.state.holds = Previous.UNKNOWN  # the pass writes x_t over x_{t−1} as it goes
        ctx.free = metrics.free_sums(ctx.grad, ctx.params, prev, self.state.x0, grad_norms_sq=ctx.raw_norms_sq,
                                     reduce=ctx.reduce, scale=self.state.scale, advance_prev=True,
                                     grad_scale=ctx.grad_scale)
        if prev is not None:
            self.state.holds = Previous.X_T
        ctx.values[FREE_SUMS] = ctx.free

    # --- the step post-hook and close() ---------------------------------------------------------

    def after_step(self, params: List[Tensor]) -> None:
        """At ``x_{t+1}``: random scaling if asked for; the version counters that tell ``close()``
        whether ``x_{t+1}`` is still in place."""
        if self.state.current() is None:
            return
        if self.random_scaling:
            self.failures.run("random_scaling", self._scale_update, params)
        if self.failures.live("free"):
            self.state.versions_after_step = [p._version for p in params]

    @torch.no_grad()
    def _scale_update(self, params: List[Tensor]) -> None:
        # x_{t+1} = x_t + s_t Δ_t, s_t ~ Exp(1): lerp from the proposed point towards x_t by 1 − s_t
        scale = float(torch.empty(()).exponential_(1.0, generator=self.state.generator))
        self.state.scale = 1.0
        torch._foreach_lerp_(params, self.state.current(), 1.0 - scale)
        self.state.scale = scale

    def final_update_norm(self, params: Sequence[Tensor], sharded: bool) -> Optional[Dict[str, Any]]:
        """The last step's ``update_norm`` (no next pre-hook takes it), if the parameters are still
        ``x_{t+1}``; never under FSDP, where it would be a collective that other ranks may not join."""
        return self.failures.run("free", self._final_update_norm, params, sharded)

    @torch.no_grad()
    def _final_update_norm(self, params: Sequence[Tensor], sharded: bool) -> Optional[Dict[str, Any]]:
        x_t, versions = self.state.previous(), self.state.versions_after_step  # (the step has ended)
        if x_t is None or versions is None or sharded or [p._version for p in params] != versions:
            return None
        return {"update_norm": metrics.distance(params, x_t)}
