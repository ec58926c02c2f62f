"""Recover the raw gradient ``g_t`` at ``optimizer.step()`` time (DESIGN §2: unscaled by AMP, before
clipping).

By the time the optimizer's step pre-hook runs, the user may have changed ``.grad`` in place:
``GradScaler.unscale_`` divides by the loss scale ``S``, ``clip_grad_norm_`` multiplies by
``c = min(1, max_norm/‖g‖)``. Both are *uniform* rescalings, so ``g_t = m · .grad`` for one scalar
``m``. At the end of every backward pass (an autograd final callback, re-queued once so that it
runs after DDP's own, which writes the averaged gradient into ``.grad``), the squared norm of each
``.grad`` (``S·g_t``; the last backward of the step covers all micro-batches) and its version
counter are recorded. At the step:

* no version changed → ``.grad`` is untouched: ``m = 1`` (no work at all);
* otherwise ``m = sqrt(Σ‖recorded‖² / S²) / ‖.grad‖``, with ``S`` read from the ``GradScaler`` the
  user passed (``attach(..., scaler=scaler)``; 1 without one), and the per-parameter ratios are
  returned too so the writer can check the rescaling was uniform (``clip_grad_value_`` is not:
  then the gradient metrics of that step are flagged, not silently wrong).

Everything stays on the device as 0-dim tensors: no synchronisation on the training thread.

The norms cost one read of the whole gradient per backward, and they are needed only on steps
whose ``.grad`` is changed after backward. So while no step has found ``.grad`` changed (and no
scaler is enabled), only the version counters are recorded after the first step (``record_norms``
off; ``‖g_t‖²`` then comes from the free metrics' own pass over the gradient). The first step that
finds ``.grad`` changed after that cannot recover its ``g_t`` (``has_norms()`` is false: the agent
leaves that step's gradient metrics out, and says so), and the norms are recorded for the rest of
the run. A loop that clips or scales from its first step, as loops do, loses nothing; one that
starts later loses one step's gradient metrics.
"""

from __future__ import annotations

import time
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.autograd import Variable

from moxco import tensors


class RawGradient:
    """End-of-backward records of the gradient autograd produced (see the module docstring)."""

    def __init__(self, params: Sequence[Tensor], scaler=None) -> None:
        self.params = list(params)
        self.scaler = scaler
        self._norm_sq: Optional[Tensor] = None  # per parameter, at the end of the last backward
        self._version: List[Optional[int]] = [None] * len(self.params)
        self.record_norms = True  # see the module docstring
        self._changes_seen = False
        self._queued = False
        self.spent = 0.0  # seconds in the end-of-backward records (the training thread's, in backward)
        self.error: Optional[BaseException] = None  # the last record failed: reported at the step
        self._handles = [p.register_post_accumulate_grad_hook(self._on_accumulate)
                         for p in self.params if p.requires_grad]

    def _on_accumulate(self, param: Tensor) -> None:
        if not self._queued:  # once per backward pass
            self._queued = True
            Variable._execution_engine.queue_callback(self._requeue)

    def _requeue(self) -> None:
        # callbacks queued during backward (DDP's finalize) run before one queued from a callback
        Variable._execution_engine.queue_callback(self._snapshot)

    def _snapshot(self) -> None:
        # an autograd callback: an exception here would leave the user's backward(), so it is kept
        # and raised at the step, inside the agent's guard (``check``)
        self._queued = False
        start = time.perf_counter()
        try:
            self._record()
            self.error = None
        except Exception as exc:
            self._norm_sq, self.error = None, exc
        finally:
            self.spent += time.perf_counter() - start

    def _record(self) -> None:
        if self.record_norms:
            grads = [p.grad.detach() if p.grad is not None else torch.zeros(0, dtype=p.dtype) for p in self.params]
            self._norm_sq = tensors.norms_sq(grads)
        else:
            self._norm_sq = None
        self._version = [p.grad._version if p.grad is not None else None for p in self.params]

    def step_seen(self, modified: bool) -> None:
        """After a step's check: record the norms from the next backward on only once ``.grad`` has
        been found changed in this run (see the module docstring)."""
        self._changes_seen = self._changes_seen or modified
        self.record_norms = self._changes_seen

    def has_norms(self) -> bool:
        """Whether the last backward's gradient norms were recorded (``multiplier`` needs them)."""
        return self._norm_sq is not None

    def check(self) -> None:
        """Raise (at the step, where the agent's guard catches it) what the last end-of-backward
        record raised."""
        if self.error is not None:
            raise RuntimeError(f"the end-of-backward gradient record failed: {self.error}") from self.error

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def modified(self) -> bool:
        """True when some ``.grad`` changed in place since autograd wrote it (or a scaler is in use)."""
        if self.scaler is not None and self.scaler.is_enabled():
            return True
        for p, version in zip(self.params, self._version):
            if p.grad is not None and version is not None and p.grad._version != version:
                return True
        return False

    def multiplier(self) -> Tuple[Tensor, Tensor]:
        """``(m, ratios)``: ``g_t = m · .grad``; ``ratios`` are the per-parameter ``m_i`` (equal when
        the change was a uniform rescaling), for parameters whose gradient is non-zero."""
        if self._norm_sq is None:
            one = torch.ones((), dtype=torch.float64)
            return one, one.reshape(1)
        grads = [p.grad.detach() if p.grad is not None else torch.zeros(0, dtype=p.dtype) for p in self.params]
        now, recorded = tensors.norms_sq(grads), self._norm_sq.to(grads[0].device if grads else "cpu")
        if self.scaler is not None and self.scaler.is_enabled():
            # the scale as a device tensor (get_scale() would synchronise)
            recorded = recorded / self.scaler._get_scale_async().to(recorded).square()
        m = (recorded.sum() / now.sum()).sqrt()
        nonzero = now > 0
        return m, (recorded[nonzero] / now[nonzero]).sqrt()

    def raw_norms_sq(self) -> Optional[Tensor]:
        """Per-tensor ``‖g_i‖²`` of the raw gradient ``g_t`` (AMP scale removed, before any clipping),
        as recorded at the end of the last backward; ``None`` when no backward was recorded."""
        if self._norm_sq is None:
            return None
        if self.scaler is not None and self.scaler.is_enabled():
            return self._norm_sq / self.scaler._get_scale_async().to(self._norm_sq).square()
        return self._norm_sq

    def clear(self) -> None:
        self._norm_sq = None
        self._version = [None] * len(self.params)
