"""The reference group: the step's batch replayed at a reference point ``x*``, on the re-evaluation cadence.

``inst_gap_ref = f(x_t, z_t) − f(x*, z_t) − ⟨g_t, x_t − x*⟩`` (audit eq. 2) and ``inst_smooth_ref =
‖g_t − ∇f(x*, z_t)‖ / ‖x_t − x*‖`` (eq. 4), with ``x*`` from ``attach(..., reference=state_dict or
checkpoint path)``: typically the end point of an earlier run (the audit paper's two-run setup).
One part, ``reference``. The probe group uses the same ``x*`` for ``convexity_ratio``.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import Tensor

from moxco import metrics
from moxco.agent.failures import Failures
from moxco.agent.groups import every, never
from moxco.agent.replays import Replays
from moxco.agent.sharded import ShardedParams
from moxco.agent.step import StepContext
from moxco.agent.writer import REPLAY_SUMS
from moxco.catalogue import names


def load_reference(reference: Any, names_: Sequence[str], params: Sequence[Tensor],
                   shards: Optional[ShardedParams]) -> List[Tensor]:
    """``x*`` from a state_dict or a checkpoint path (a ``{"model": state_dict}`` checkpoint too), as
    detached copies in the optimizer's parameter order, matching ``params`` (FSDP: this rank's
    shards, cut as the parameters are)."""
    if isinstance(reference, (str, os.PathLike)):
        reference = torch.load(reference, map_location="cpu", weights_only=True)
        if isinstance(reference, Mapping) and "model" in reference and isinstance(reference["model"], Mapping):
            reference = reference["model"]
    if not isinstance(reference, Mapping):
        raise TypeError(f"reference must be a state_dict or a checkpoint path, got {type(reference).__name__}")
    owners = shards.owners if shards is not None else params
    missing = [n for n in names_ if n not in reference]
    if missing:
        raise ValueError(f"reference is missing parameters {missing[:5]}{' …' if len(missing) > 5 else ''}")
    if shards is not None:
        return shards.shard_full(reference)
    out: Dict[str, Tensor] = {}
    for name, p in zip(names_, owners):
        ref = reference[name]
        if ref.shape != p.shape:
            raise ValueError(f"reference parameter {name!r} has shape {tuple(ref.shape)}, the model {tuple(p.shape)}")
        out[name] = ref.detach().to(device=p.device, dtype=p.dtype).clone()
    return [out[n] for n in names_]


class Reference:
    """The replay at ``x*`` (see the module docstring)."""

    name = "reference"

    def __init__(self, point: Optional[List[Tensor]], reeval_every: int, failures: Failures,
                 replays: Replays) -> None:
        self.point = point
        self.due = every(reeval_every) if point is not None else never
        self.failures, self.replays = failures, replays
        failures.declare("reference", self.name, [n for n in names("reference") if n != "convexity_ratio"])

    def compute(self, ctx: StepContext) -> None:
        """``metrics.ReplaySums`` of the replay at ``x*``, for the writer thread."""
        if ctx.has_batch:
            self.failures.run("reference", self._compute, ctx)

    def _compute(self, ctx: StepContext) -> None:
        loss_ref, grad_diff_sq = self.replays.difference(ctx, self.point, self.name)
        ctx.values.setdefault(REPLAY_SUMS, []).append(
            metrics.replay_sums(ctx.loss, loss_ref, grad_diff_sq, ctx.grad, ctx.params, self.point,
                                reference=True, reduce=ctx.reduce, grad_scale=ctx.grad_scale))
