"""The re-evaluation group: the step's batch replayed at ``x_{t−1}``, every ``reeval_every`` steps.

``loss_diff = f(x_t, z_t) − f(x_{t−1}, z_t)`` (audit eq. 13), ``inst_gap = loss_diff − ⟨g_t, x_t −
x_{t−1}⟩`` (eq. 2), ``inst_smooth = ‖g_t − ∇f(x_{t−1}, z_t)‖ / ‖x_t − x_{t−1}‖`` (eq. 4); their
running aggregates ``avg_gap``, ``exp_gap`` (eq. 3), ``max_smooth``, ``exp_smooth`` (eq. 5) are
kept on the writer thread. One part, ``reeval``.

It runs in two stages around the free group's pass, which writes ``x_t`` over the agent's copy of
``x_{t−1}``: the replay at ``x_{t−1}`` first (``replay``), then the formulas (``finish``), which
take ``⟨g_t, x_t − x_{t−1}⟩`` (``update_corr``) and ``‖x_t − x_{t−1}‖²`` from that pass. Where the
free metrics are off the products are taken from the copy, which then still holds ``x_{t−1}``;
where their pass failed part way (the copy holds neither point) the step keeps ``loss_diff`` alone.
"""

from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor

from moxco import metrics
from moxco.agent.failures import Failures
from moxco.agent.groups import every
from moxco.agent.replays import Replays
from moxco.agent.step import Previous, StepContext, StepState
from moxco.agent.writer import REPLAY_SUMS
from moxco.catalogue import names


class Reevaluation:
    """The replay at ``x_{t−1}`` (see the module docstring)."""

    name = "reeval"

    def __init__(self, reeval_every: int, failures: Failures, state: StepState, replays: Replays) -> None:
        self.due = every(reeval_every)
        self.failures, self.state, self.replays = failures, state, replays
        failures.declare("reeval", self.name, names("reeval"))

    def replay(self, ctx: StepContext) -> Optional[Tuple[Tensor, Tensor]]:
        """``(f(x_{t−1}, z_t), ‖g_t − ∇f(x_{t−1}, z_t)‖²)`` (this rank's partial sum), before the
        free group overwrites ``x_{t−1}``; None when there is nothing to replay."""
        prev = self.state.previous()
        if prev is None or not ctx.has_batch:
            return None
        return self.failures.run("reeval", self.replays.difference, ctx, prev, self.name)

    def finish(self, ctx: StepContext, replay: Tuple[Tensor, Tensor]) -> None:
        """``metrics.ReplaySums`` of the replay, for the writer thread (which applies the formulas)."""
        self.failures.run("reeval", self._finish, ctx, *replay)

    def _finish(self, ctx: StepContext, loss_prev: Tensor, grad_diff_sq: Tensor) -> None:
        replays = ctx.values.setdefault(REPLAY_SUMS, [])
        if ctx.free is not None and ctx.free.has_update:  # the products of the free metrics' pass
            (dot_step, step_sq), point = ctx.free.update_products(), None
        elif self.state.holds is Previous.X_PREV:  # the free metrics are off: from x_{t−1} itself
            dot_step = step_sq = None
            point = self.state.prev
        else:  # their pass failed after it began to write x_t over x_{t−1}
            replays.append(metrics.replay_sums(ctx.loss, loss_prev))
            return
        replays.append(metrics.replay_sums(ctx.loss, loss_prev, grad_diff_sq, ctx.grad, ctx.params, point,
                                           grad_dot_step=dot_step, step_sq=step_sq, reduce=ctx.reduce,
                                           grad_scale=ctx.grad_scale))
