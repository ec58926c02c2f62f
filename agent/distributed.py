"""What the agent needs from ``torch.distributed``: averages over data-parallel ranks, and one writer.

Under DDP every rank holds the full parameters and the gradient in ``.grad`` is already the global
mean; what is local is the minibatch. So the agent's own passes (the loss, replays at ``x_{t−1}``
and ``x*``, Hessian-vector products, the three-way split) are averaged over ranks, which makes the
metrics of a 2-rank job equal those of one process on the same global batch (equal per-rank batch
sizes, as DDP assumes). Rank 0 is the only one that writes to the store and runs the policy; it
broadcasts decisions at probe steps so that every rank applies them at the same step.

Outside ``torch.distributed`` (or with a world of one) every method is a no-op.
"""

from __future__ import annotations

from typing import Any, List, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn


class DataParallelGroup:
    """Averages and broadcasts over the default process group (no-ops without one)."""

    def __init__(self) -> None:
        self.active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.world = dist.get_world_size() if self.active else 1
        self.rank = dist.get_rank() if self.active else 0

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def mean(self, values: Sequence[Tensor]) -> List[Tensor]:
        """All-reduce average of a list of tensors in one flat collective (returns new tensors)."""
        values = list(values)
        if not self.active or not values:
            return values
        dtype = values[0].dtype if all(v.dtype == values[0].dtype for v in values) else torch.float64
        flat = torch.cat([v.detach().reshape(-1).to(dtype) for v in values])
        dist.all_reduce(flat)
        flat /= self.world
        out, offset = [], 0
        for v in values:
            n = v.numel()
            out.append(flat[offset : offset + n].reshape(v.shape).to(v.dtype))
            offset += n
        return out

    def mean_scalar(self, value: Tensor) -> Tensor:
        return self.mean([value.reshape(1)])[0].reshape(()) if self.active else value

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def unwrap(model: nn.Module) -> nn.Module:
    """The module that holds the parameters: through ``torch.compile`` and DDP wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model
