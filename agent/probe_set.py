"""The probe set: fixed batches on which the probe group evaluates ``F``, ``∇F``, the curvature and
goodness's inputs (``attach(..., probe_data=...)``).

``probe_data`` is

* **one batch**: a tensor, a mapping or a tuple;
* or **an iterable of batches** (a list, a ``DataLoader``, a generator): the agent draws its first
  ``probe_batches`` batches (default 4) once, at attach, and keeps them; fewer if it ends sooner.
  The user's random state is saved and put back around the draw, so a shuffling ``DataLoader`` does
  not move the training loop's random stream. Give a held-out loader, or the training loader itself
  (``iter()`` of a ``DataLoader`` starts a new pass: the training loop's own pass is not consumed);
  an iterator is consumed by the draw.

A batch is what the training loop gives the model:

* a model whose forward returns the loss: a mapping is called as ``model(**batch)`` (a Hugging Face
  batch with ``labels``), a tuple or list as ``model(*batch)``, a tensor as ``model(batch)``;
* with ``criterion=`` or ``loss_fn=``: ``(inputs, targets)`` (a ``DataLoader``'s ``[x, y]`` too), the
  inputs as above and the targets a tensor or a tuple of them; the loss is
  ``loss_fn(model(inputs), *targets)`` (or the criterion's), as for the step's batch.

Tensors are moved to the model's device once and kept there: the probe set costs its own size in
memory. Each batch is replayed as a recorded forward call of the step is (``capture.ForwardCall``):
in training mode, BatchNorm statistics untouched, under the step's autocast, and with one random
state per batch fixed at attach from the agent's seed, so dropout draws the same masks at every
probe and at ``x*``: ``F`` is one fixed function of the parameters, and finite differences of its
gradient are curvature, not noise. ``F`` is the mean of the batches' losses. Under DDP and FSDP each
rank replays its own ``probe_data`` and the agent averages over ranks, as for the step's batch:
give every rank the same data, or each rank its equal share.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import Tensor

from moxco.agent.capture import ForwardCall, StepCapture


class ProbeSetError(ValueError):
    """``probe_data`` cannot be used; the message says why and what a batch must look like."""


def _to_device(value: Any, device: Optional[torch.device]) -> Any:
    if device is None:
        return value
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    return value


def _is_one_batch(data: Any) -> bool:
    return isinstance(data, (Tensor, Mapping, tuple))


def _draw(data: Any, count: int) -> List[Any]:
    """The first ``count`` batches of the iterable ``data``, the user's random state untouched."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    python = random.getstate()
    try:
        import numpy as np
        numpy_state = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy is a dependency
        np = None
        numpy_state = None
    batches: List[Any] = []
    try:
        for batch in data:
            batches.append(batch)
            if len(batches) >= count:
                break
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        random.setstate(python)
        if np is not None:
            np.random.set_state(numpy_state)
    return batches


def _call(batch: Any, index: int, with_targets: bool, rng_state: Tensor,
          cuda_rng: Optional[tuple]) -> ForwardCall:
    where = f"probe_data batch {index}"
    targets = None
    inputs = batch
    if with_targets:
        if isinstance(batch, Tensor) or not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ProbeSetError(
                f"{where} is a {type(batch).__name__}; with criterion= or loss_fn= a batch is (inputs, targets) "
                "(for one batch pass a tuple: probe_data=(x, y))")
        inputs, targets = batch
        targets = tuple(targets) if isinstance(targets, (tuple, list)) else (targets,)
    if isinstance(inputs, Tensor):
        args, kwargs = (inputs,), {}
    elif isinstance(inputs, Mapping):
        args, kwargs = (), dict(inputs)
    elif isinstance(inputs, (tuple, list)):
        args, kwargs = tuple(inputs), {}
    else:
        raise ProbeSetError(f"{where}: the model's inputs must be a tensor, a mapping (model(**batch)) or a tuple "
                            f"(model(*batch)), got {type(inputs).__name__}")
    return ForwardCall(args, kwargs, rng_state, cuda_rng, (), None, targets, None)


class ProbeSet:
    """The fixed probe batches as forward calls (see the module docstring)."""

    def __init__(self, calls: List[ForwardCall]) -> None:
        if not calls:
            raise ProbeSetError("probe_data gave no batch (an empty iterable)")
        self._calls = calls
        self.batches = len(calls)
        self.samples = StepCapture.batch_size(calls)

    @classmethod
    def build(cls, data: Any, *, batches: int, with_targets: bool, device: Optional[torch.device],
              seed: int) -> "ProbeSet":
        """``probe_data`` → the probe set: one batch, or the first ``batches`` of an iterable, moved to
        ``device``; ``with_targets``: the loss is a criterion's or ``loss_fn``'s (batches are
        ``(inputs, targets)``); ``seed``: each batch's fixed random state."""
        if isinstance(data, (str, bytes)) or not (_is_one_batch(data) or hasattr(data, "__iter__")):
            raise ProbeSetError(f"probe_data must be a batch (a tensor, a mapping or a tuple) or an iterable of "
                                f"batches (a list, a DataLoader), got {type(data).__name__}")
        drawn = [data] if _is_one_batch(data) else _draw(data, batches)
        cuda_rng = None
        if device is not None and device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            cuda_rng = (index, torch.cuda.get_rng_state(index))
        calls = [_call(_to_device(batch, device), i, with_targets,
                       torch.Generator().manual_seed(seed + i).get_state(), cuda_rng)
                 for i, batch in enumerate(drawn)]
        return cls(calls)

    def calls(self, step_calls: Sequence[ForwardCall]) -> List[ForwardCall]:
        """The probe batches' calls, under the autocast state of the step's first forward call."""
        autocast = step_calls[0].autocast if step_calls else ()
        if not autocast:
            return list(self._calls)
        return [dataclasses.replace(call, autocast=autocast) for call in self._calls]

    def describe(self) -> Dict[str, Any]:
        """What the run's config records: where ``F`` and the curvature are evaluated."""
        return {"source": "probe_data", "batches": self.batches, "samples": self.samples}


STEP_BATCH = {"source": "step batch"}  # the run's config without probe_data
