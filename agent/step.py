"""The agent's step state (kept from step to step) and the per-step context its metric groups share.

``StepState`` is everything on the training thread that the next step's metrics depend on: the
step counter, the copy of the previous iterate and what it holds (``Previous``), ``x_0``, the last
random scale ``s_{t−1}``, the phase, the agent's random generator. ``state_dict()`` /
``load_state_dict()`` round-trip it.

``StepContext`` is one optimizer step as the metric groups see it at the step pre-hook: ``g_t`` as
``.grad`` (the lists of gradient tensors as the user left them) and ``grad_scale`` (``g_t =
grad_scale · .grad`` after clipping or AMP unscaling, ``None`` for 1), the parameters ``x_t``, the
step's loss, the shared fused sums of ``moxco.metrics.free_sums``, the captured batch, and the
values handed to the writer thread.
"""

from __future__ import annotations

import enum
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from moxco import metrics, tensors


class Previous(enum.Enum):
    """What the agent's one parameter copy holds, relative to the step in progress."""

    NONE = "none"  # no copy yet (before the first step's end)
    X_PREV = "x_{t-1}"  # the previous iterate: the re-evaluation replays there
    X_T = "x_t"  # this step's iterate: the free metrics' pass wrote it over x_{t−1}
    UNKNOWN = "unknown"  # a pass that writes x_t over x_{t−1} failed part way: neither, until re-copied


class StepState:
    """The training thread's state between steps (see the module docstring).

    The copy moves through ``Previous``: ``X_PREV`` at a step's pre-hook, ``X_T`` once the free
    metrics' pass advanced it (``settle`` copies where they did not), ``X_PREV`` again when the step
    ends (``end_step``)."""

    def __init__(self, step: int, generator: torch.Generator, x0: Optional[List[Tensor]]) -> None:
        self.step = step
        self.generator = generator  # the agent's own random numbers: the user's RNG stream is untouched
        self.x0 = x0
        self.prev: Optional[List[Tensor]] = None
        self.holds = Previous.NONE
        self.scale = 1.0  # s_{t−1}: x_t − x_{t−1} = s_{t−1} Δ_{t−1} under random scaling
        self.phase = 1
        self.phase_recorded: Optional[Tuple[int, int]] = None  # (step, phase) of the last phase point
        self.epoch_start = False
        self.versions_after_step: Optional[List[int]] = None  # x_{t+1}'s version counters (close())

    def previous(self) -> Optional[List[Tensor]]:
        """``x_{t−1}``, or None when the copy does not hold it."""
        return self.prev if self.holds is Previous.X_PREV else None

    def current(self) -> Optional[List[Tensor]]:
        """``x_t`` (from the step's pre-hook end to the next step), or None when the copy does not hold it."""
        return self.prev if self.holds is Previous.X_T else None

    @torch.no_grad()
    def settle(self, params: Sequence[Tensor]) -> None:
        """``x_{t−1} ← x_t`` where the free metrics did not do it in passing (first step, free off
        or failed): the copy holds ``x_t`` afterwards."""
        if self.holds is Previous.X_T:
            return
        self.holds = Previous.UNKNOWN
        if self.prev is None or [p.shape for p in self.prev] != [p.shape for p in params]:
            self.prev = tensors.copy_params(params)
        else:
            tensors.copy_(self.prev, params)
        self.holds = Previous.X_T

    @torch.no_grad()
    def extend(self, params: Sequence[Tensor]) -> None:
        """Parameters joined the optimizer between steps: their current values are their
        ``x_{t−1}`` (the optimizer did not move them) and their ``x_0``."""
        if self.prev is not None:
            self.prev = tensors.copy_params([*self.prev, *params])
        if self.x0 is not None:
            self.x0 = tensors.copy_params([*self.x0, *params])

    @torch.no_grad()
    def restart(self, params: Sequence[Tensor]) -> None:
        """The optimizer's parameters changed otherwise: no ``x_{t−1}`` until the step ends, and
        ``x_0`` is where they are now."""
        self.prev, self.holds = None, Previous.NONE
        if self.x0 is not None:
            self.x0 = tensors.copy_params(params)

    def end_step(self) -> None:
        """The optimizer step is done: ``x_t`` is the next step's ``x_{t−1}``."""
        self.step += 1
        if self.holds is Previous.X_T:
            self.holds = Previous.X_PREV

    def phase_point(self) -> Dict[str, int]:
        """``{"phase": …}`` for the current step, or nothing when this step's phase is recorded
        already (a decision applied at the boundary before a probe step records the phase it set)."""
        if self.phase_recorded == (self.step, self.phase):
            return {}
        self.phase_recorded = (self.step, self.phase)
        return {"phase": self.phase}

    def state_dict(self) -> Dict[str, Any]:
        """Everything above as tensors and numbers (detached copies), for ``load_state_dict``."""
        copy = lambda ts: None if ts is None else [t.detach().clone() for t in ts]
        return {"step": self.step, "holds": self.holds.value, "prev": copy(self.prev), "x0": copy(self.x0),
                "scale": self.scale, "phase": self.phase, "phase_recorded": self.phase_recorded,
                "generator": self.generator.get_state()}

    @torch.no_grad()
    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a ``state_dict()`` (into the agent's own buffers, which keep their memory layout)."""
        for name in ("prev", "x0"):
            saved, mine = state[name], getattr(self, name)
            if saved is None or mine is None or [t.shape for t in saved] != [t.shape for t in mine]:
                setattr(self, name, None if saved is None else tensors.copy_params(saved))
            else:
                tensors.copy_(mine, saved)
        self.step, self.scale, self.phase = int(state["step"]), float(state["scale"]), int(state["phase"])
        self.holds = Previous(state["holds"])
        recorded = state["phase_recorded"]
        self.phase_recorded = None if recorded is None else (int(recorded[0]), int(recorded[1]))
        self.generator.set_state(state["generator"])


class StepContext:
    """One optimizer step as the metric groups see it (made at the pre-hook, dropped after it).

    ``grad``: the gradient tensors as the user left them, read on first use; ``g_t = grad_scale ·
    grad`` (``grad_scale`` None: 1), passed to ``moxco.metrics`` as ``grad_scale`` so that ``g_t``
    is never materialised. ``raw_norms_sq``: per-tensor ``‖g_i‖²`` recorded at the end of backward,
    when recorded. ``loss``: ``f(x_t, z_t)`` (None when it cannot be found). ``free``: the step's
    ``metrics.FreeSums`` once the free group ran. ``calls``: the step's captured forward calls;
    ``has_batch``: whether they can be replayed (every call's loss known). ``values`` and ``probe``:
    what goes to the writer thread (``writer.StepRecord``)."""

    __slots__ = ("step", "params", "reduce", "calls", "values", "probe", "grad_scale", "raw_norms_sq", "loss", "free",
                 "_grad", "_read_grad", "_has_batch", "_capture")

    def __init__(self, step: int, params: List[Tensor], reduce: metrics.Reduce, capture: Any,
                 read_grad: Callable[[], List[Tensor]]) -> None:
        self.step, self.params, self.reduce = step, params, reduce
        self.calls, self._capture, self._has_batch = capture.calls, capture, None
        self.values: Dict[str, Any] = {}
        self.probe: Optional[Dict[str, Any]] = None
        self.grad_scale: Optional[Tensor] = None
        self.raw_norms_sq: Optional[Tensor] = None
        self.loss: Optional[Tensor] = None
        self.free: Optional[metrics.FreeSums] = None
        self._grad: Optional[List[Tensor]] = None
        self._read_grad = read_grad

    @property
    def has_batch(self) -> bool:
        """Whether the step's batch can be replayed (``StepCapture.has_batch``), asked once."""
        if self._has_batch is None:
            self._has_batch = self._capture.has_batch()
        return self._has_batch

    @property
    def grad(self) -> List[Tensor]:
        """``.grad`` of every parameter (zeros where there is none), as the user left it at ``step()``."""
        if self._grad is None:
            self._grad = self._read_grad()
        return self._grad


def grad_of(params: Sequence[Tensor]) -> List[Tensor]:
    """``.grad`` of each parameter, detached (zeros for a parameter without one)."""
    return [p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in params]
