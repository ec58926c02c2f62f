"""The step's captured batch replayed at other parameters, for the re-evaluation, reference and probe groups.

In one process and under DDP a replay runs the unwrapped module with the point's tensors in the
parameters' slots (``capture.StepCapture.replay``), and its loss and gradient are averaged over the
ranks (each rank replays its part of the global batch). Under FSDP it runs the user's FSDP module
with the local shards swapped (``sharded.ShardedParams.replay``), whose reduce-scatter already
averages the gradient. Rank-local failures become NaN values of the same shapes
(``failures.Failures.local``), so that every rank enters the same collectives.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from moxco import tensors
from moxco.agent.capture import ForwardCall, StepCapture
from moxco.agent.distributed import DataParallelGroup
from moxco.agent.failures import Failures
from moxco.agent.sharded import ShardedParams
from moxco.agent.step import StepContext

NAN = lambda: torch.tensor(math.nan, dtype=torch.float64)  # noqa: E731


class Replays:
    """Replays of the step's batch (see the module docstring); ``part`` names the metric part a
    replay serves (its failures are that part's)."""

    def __init__(self, capture: StepCapture, names: Sequence[str], group: DataParallelGroup,
                 shards: Optional[ShardedParams], failures: Failures) -> None:
        self.capture, self.names, self.group, self.shards, self.failures = capture, list(names), group, shards, failures

    def named(self, values: Sequence[Tensor]) -> Dict[str, Tensor]:
        """``values`` by parameter name (the optimizer's order), for a replay's slots."""
        return dict(zip(self.names, values))

    @staticmethod
    def nan_like(params: Sequence[Tensor]) -> List[Tensor]:
        return [torch.full_like(p, math.nan) for p in params]

    def with_grad(self, ctx: StepContext, point: Sequence[Tensor], part: str) -> Tuple[Tensor, List[Tensor]]:
        """``(f(y, z_t), ∇f(y, z_t))`` at ``y = point`` over the global batch (this rank's shards of
        the gradient under FSDP)."""
        if self.shards is not None:  # through the FSDP module; its reduce-scatter averages the gradient
            loss, grads = self.shards.replay(self.capture, ctx.calls, point, with_grad=True,
                                             on_error=self.failures.rank_error(part))
            return self.group.mean_scalar(loss), grads

        def compute():
            leaves = [t.detach().requires_grad_(True) for t in point]
            return self.capture.replay(ctx.calls, self.named(leaves), with_grad=True, grad_wrt=leaves)

        loss, grads = self.failures.local(part, compute, lambda: (NAN(), self.nan_like(ctx.params)))
        averaged = self.group.mean([loss.reshape(1), *grads])
        return averaged[0].reshape(()), averaged[1:]

    def difference(self, ctx: StepContext, point: Sequence[Tensor], part: str) -> Tuple[Tensor, Tensor]:
        """The replay at ``y = point`` (``x_{t−1}`` or ``x*``): ``(f(y, z_t), this rank's
        ‖∇f(x_t, z_t) − ∇f(y, z_t)‖²)``, taken at once while the replay's gradient is still in
        cache: one fused read on the CPU (``moxco.native``), elsewhere formed in that gradient (the
        agent's own, overwritten)."""
        loss_ref, grad_ref = self.with_grad(ctx, point, part)
        return loss_ref, tensors.dist_sq(ctx.grad, grad_ref, overwrite_ys=True, x_scale=ctx.grad_scale)

    def loss_at(self, ctx: StepContext, point: Sequence[Tensor], part: str) -> Tensor:
        """``f(y, z_t)`` at ``y = point`` over the global batch, without a gradient."""
        if self.shards is not None:
            loss, _ = self.shards.replay(self.capture, ctx.calls, point, with_grad=False,
                                         on_error=self.failures.rank_error(part))
        else:
            loss, _ = self.failures.local(
                part, lambda: self.capture.replay(ctx.calls, self.named(point), with_grad=False), lambda: (NAN(), None))
        return self.group.mean_scalar(loss)

    def graph(self, ctx: StepContext, part: str) -> Callable[[], Tensor]:
        """A closure giving the differentiable mean loss of the step's batch at ``x_t`` (graphs
        kept, for Hessian-vector products); a rank-local failure gives a NaN curvature, which turns
        every rank's product into NaN."""
        calls, current = list(ctx.calls), self.named(ctx.params)

        def replay():
            self.capture.replaying = True
            try:
                return self.capture.replay_graph(calls, current)
            finally:
                self.capture.replaying = False

        nan_curvature = lambda: sum((p.square() * math.nan).sum() for p in ctx.params)  # noqa: E731
        return lambda: self.failures.local(part, replay, nan_curvature)

    def gradients_of(self, ctx: StepContext, parts: Sequence[List[ForwardCall]], part: str) -> List[List[Tensor]]:
        """``∇f(x_t, ·)`` of each piece of the batch, each averaged over ranks (under DDP the k-th
        pieces of all ranks form a piece of the global batch)."""
        out = []
        current = self.named(ctx.params)
        for piece in parts:
            if self.shards is not None:  # FSDP's reduce-scatter already averages over ranks
                out.append(self.shards.replay(self.capture, piece, None, with_grad=True,
                                              on_error=self.failures.rank_error(part))[1])
                continue
            _, grads = self.failures.local(
                part, lambda: self.capture.replay(piece, current, with_grad=True, grad_wrt=ctx.params),
                lambda: (None, self.nan_like(ctx.params)))
            out.append(self.group.mean(grads))
        return out
