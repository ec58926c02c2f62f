"""Recover the raw gradient ``g_t`` at ``optimizer.step()`` time (DESIGN §2: unscaled by AMP, before
clipping).

By the time the optimizer's step pre-hook runs, the user may have changed ``.grad`` in place:
``GradScaler.unscale_`` divides by the loss scale ``S``, ``clip_grad_norm_`` multiplies by
``c = min(1, max_norm/‖g‖)``. Both are *uniform* rescalings, so ``g_t = m · .grad`` for one scalar
``m``. A post-accumulate-grad hook on every parameter records, after each backward, the squared
norm of what autograd left in ``.grad`` (``S·g_t``, the last record of the step covering all
micro-batches) and the tensor's version counter. At the step:

* no version changed → ``.grad`` is untouched: ``m = 1`` (no work at all);
* otherwise ``m = sqrt(Σ‖hooked‖² / S²) / ‖.grad‖``, with ``S`` read from the ``GradScaler`` the
  user passed (``attach(..., scaler=scaler)``; 1 without one), and the per-parameter ratios are
  returned too so the writer can check the rescaling was uniform (``clip_grad_value_`` is not:
  then the gradient metrics of that step are flagged, not silently wrong).

Everything stays on the device as 0-dim tensors: no synchronisation on the training thread.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor


class RawGradient:
    """Per-parameter records of the gradient autograd produced (see the module docstring)."""

    def __init__(self, params: Sequence[Tensor], scaler=None) -> None:
        self.params = list(params)
        self.scaler = scaler
        self._norm_sq: List[Optional[Tensor]] = [None] * len(self.params)
        self._version: List[Optional[int]] = [None] * len(self.params)
        self._handles = [p.register_post_accumulate_grad_hook(self._recorder(i))
                         for i, p in enumerate(self.params) if p.requires_grad]

    def _recorder(self, index: int):
        def record(param: Tensor) -> None:
            grad = param.grad
            if grad is None:
                return
            self._norm_sq[index] = torch.linalg.vector_norm(grad.detach(), dtype=torch.float64).square()
            self._version[index] = grad._version
        return record

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
        now, hooked = [], []
        for p, norm_sq in zip(self.params, self._norm_sq):
            if p.grad is None or norm_sq is None:
                continue
            now.append(torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float64).square())
            hooked.append(norm_sq)
        if not now:
            one = torch.ones((), dtype=torch.float64)
            return one, one.reshape(1)
        now_t, hooked_t = torch.stack(now), torch.stack(hooked)
        if self.scaler is not None and self.scaler.is_enabled():
            # the scale as a device tensor (get_scale() would synchronise)
            hooked_t = hooked_t / self.scaler._get_scale_async().to(hooked_t).square()
        m = (hooked_t.sum() / now_t.sum()).sqrt()
        nonzero = now_t > 0
        ratios = (hooked_t[nonzero] / now_t[nonzero]).sqrt()
        return m, ratios

    def clear(self) -> None:
        self._norm_sq = [None] * len(self.params)
        self._version = [None] * len(self.params)
