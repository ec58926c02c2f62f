"""The agent's metric groups, one module each: what a group computes, and when.

Each group has a schedule, ``due(step)`` (a plain function of the step), and computes over the
step's ``agent.step.StepContext`` (``g_t`` as ``.grad`` with its scale, the parameters, the copy of
the previous iterate, the fused sums of ``moxco.metrics.free_sums``, the captured batch). The
formulas live in ``moxco`` (``moxco.metrics``, ``moxco.hessian``, ``moxco.aligator``); a group calls
them and hands unread tensors to the writer thread. A group's work is split into *parts* (one
computation and the metrics it gives, ``agent.failures``): a failing part drops its own metrics,
never the rest of its group.

* ``free``: every step: ``loss``, ``grad_norm_sq``, ``update_norm``, ``distance``, ``update_corr``,
  ``update_corr_rs``;
* ``reeval``: every ``reeval_every`` steps, the batch replayed at ``x_{t−1}``: ``loss_diff``,
  ``inst_gap``, ``inst_smooth`` (and their aggregates, on the writer thread);
* ``reference``: on the same cadence with ``reference=``, the replay at ``x*``: ``inst_gap_ref``,
  ``inst_smooth_ref``;
* ``probe``: every ``probe_every`` steps, on the probe set (``probe_data``) or the step's batch:
  ``sharpness`` and ``sharpness_min``, the preconditioned pair (Adam family), ``hessian_trace``
  (opt-in), the three-way split for the denoised ``‖∇F‖²``, ``F`` on the probe set,
  ``convexity_ratio``'s terms (with a reference), the optimizer's state, ``phase``,
  ``sharpness_target``.
"""

from __future__ import annotations

from typing import Callable


def every(n: int) -> Callable[[int], bool]:
    """The schedule ``step ↦ n > 0 and step % n == 0`` (never for ``n = 0``)."""
    if n <= 0:
        return never
    return lambda step: step % n == 0


def always(step: int) -> bool:
    """The schedule of the free group: every step."""
    return True


def never(step: int) -> bool:
    """The schedule of a group that is off."""
    return False
