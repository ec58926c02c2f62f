"""What the integrations share: the framework's own loss step as the module the agent attaches
to (``LossStep``), and the framework's metrics as the run's own series (``log_scalars``).

A framework forms the step's loss in a method of its own: Lightning in the LightningModule's
``training_step(batch, batch_idx)``, the Hugging Face Trainer in ``compute_loss(model, inputs)``.
Whatever the loss is made of there (``F.cross_entropy(self(x), y)``, a label smoother, a custom
``compute_loss``), its output is the loss. ``LossStep`` makes that method a module: the
integration routes the framework's calls through it, so the agent records each call's arguments
and the loss it returned, and replays the step at other parameters by calling the method again
with those parameters in the model's slots. No extra call is needed in the user's code, and the
loss is the user's loss exactly.

During a replay the method's side effects are silenced where the framework has them (``quiet``:
Lightning's ``self.log``), and the model called is the unwrapped one (the framework's call may go
through a DDP wrapper, whose gradient synchronisation a replay must not join).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Callable, ContextManager, Optional

import torch
from torch import nn


class LossStep(nn.Module):
    """``forward(*args, **kwargs) = step(model, *args, **kwargs)``: a framework's loss step with
    ``model`` (its parameters are the agent's, named ``model.…``) as a module. ``quiet()``: a
    context in which a replay runs (side effects off). In training mode exactly when ``model`` is."""

    def __init__(self, model: nn.Module, step: Callable[..., Any], *,
                 quiet: Optional[Callable[[], ContextManager]] = None) -> None:
        super().__init__()
        self.model = model
        self._step = step
        self._quiet = quiet or contextlib.nullcontext
        self.live: Optional[Any] = None  # the model the framework passed to this call (maybe wrapped)
        self.capture: Optional[Any] = None  # the agent's StepCapture: whether a replay is running

    @property
    def training(self) -> bool:  # follows the model: the framework switches it, not this wrapper
        return self.model.training if "model" in self._modules else True

    @training.setter
    def training(self, mode: bool) -> None:
        pass

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.capture is not None and self.capture.replaying:
            with self._quiet():
                return self._step(self.model, *args, **kwargs)
        return self._step(self.live if self.live is not None else self.model, *args, **kwargs)


def log_scalars(agent: Any, metrics: Mapping[str, Any], step: int) -> None:
    """``agent.log`` the scalar entries of a framework's metrics dict at ``step``: a name moxco uses
    itself (the catalogue's) is stored as ``user/<name>``, one the wire refuses is skipped."""
    from moxco.catalogue import metric
    from moxco.wire import WireError, check_metric_name

    values = {}
    for name, value in metrics.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                continue
        elif not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        name = f"user/{name}" if metric(str(name)) is not None else str(name)
        try:
            values[check_metric_name(name)] = value
        except WireError:
            continue
    if values:
        agent.log(values, step=step)
