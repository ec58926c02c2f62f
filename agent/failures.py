"""Failure isolation: a failing computation disables the metrics it produces, and only those.

Every piece of agent work runs under ``Failures.run(part, ...)``. A *part* is one computation and
the metrics it produces (``declare``): the free group's fused sums give ``grad_norm_sq``,
``update_norm``, ``distance``, ``update_corr`` and ``update_corr_rs``; the probe's power iteration
gives ``sharpness``; and so on. When a part raises, the exception is recorded once under the part's
name (``errors``: its type and first line, stored with the run), logged once with its traceback
tail, and the part's metrics are dropped: the part is not run again, nor is any part all of whose
metrics are dropped. A part whose failure takes away something other metrics need declares those:
the step's loss drops every metric that ``moxco.catalogue.needing("loss")`` lists, the raw gradient
every metric ``needing("gradient")`` lists. Training always goes on.

Under DDP and FSDP a rank must never skip a collective that the other ranks enter, so a rank-local
failure inside a part that holds collectives (``local``) is recorded as ``"<part> (rank r)"`` and
replaced by NaN values of the same shapes: every rank stores NaN for that metric, visibly.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

log = logging.getLogger("moxco.agent")

ERROR_SUMMARY_CHARS = 300


def error_summary(exc: BaseException) -> str:
    """``"Type: first line of the message"``, at most ``ERROR_SUMMARY_CHARS`` characters: what is
    stored with the run (``config["errors"]``) and shown by ``agent.errors``. PyTorch's dispatcher
    errors run to kilobytes (every backend listed); the log keeps the whole message once."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= ERROR_SUMMARY_CHARS else text[: ERROR_SUMMARY_CHARS - 1] + "…"


class Failures:
    """The parts of the agent's work, which of them failed, and the training thread's time in each
    metric group (``spent``, for ``Agent.overhead``)."""

    def __init__(self, run: str, *, rank: int = 0, distributed: bool = False) -> None:
        self.run_name, self.rank, self.distributed = run, rank, distributed
        self.errors: Dict[str, str] = {}
        self.spent: Dict[str, float] = {}
        self.on_error: Optional[Callable[[Dict[str, str]], None]] = None  # stores the errors with the run
        self._parts: Dict[str, Tuple[str, Tuple[str, ...]]] = {}  # part → (group, metrics it gives or takes away)
        self._dropped: Dict[str, str] = {}  # metric → the part whose failure dropped it
        self._notes: Dict[str, str] = {}
        self._off: set = set()  # the parts that do not run (live), updated at each failure
        self._lock = threading.Lock()  # the writer thread reports its own failures here too

    def declare(self, part: str, group: str, metrics: Iterable[str] = (), *, note: str = "") -> None:
        """``part`` is a computation of metric ``group`` (the key of its time in ``spent``) giving
        ``metrics``, which its failure drops; ``note``: what else its failure means, for the log."""
        self._parts[part] = (group, tuple(metrics))
        self._update_off()
        if note:
            self._notes[part] = note

    def live(self, part: str) -> bool:
        """Whether ``part`` runs: it has not failed, and not all of its metrics are dropped."""
        return part not in self._off

    def _update_off(self) -> None:
        self._off = {part for part, (_, metrics) in self._parts.items()
                     if part in self.errors or (metrics and all(m in self._dropped for m in metrics))}

    def dropped(self) -> Dict[str, str]:
        """Each metric dropped by a failure, with the part whose failure dropped it."""
        return dict(self._dropped)

    def record(self, part: str, exc: BaseException, *, rank_local: bool = False) -> None:
        """Record ``part``'s failure (once: later failures of the same part are not logged), drop
        its metrics, and store the errors with the run. ``rank_local``: a failure on this rank
        only, whose values were replaced by NaN (``local``): nothing is dropped."""
        with self._lock:
            if part in self.errors:
                return
            self.errors[part] = message = error_summary(exc)
            metrics = [] if rank_local else [m for m in self._parts.get(part, ("", ()))[1] if m not in self._dropped]
            for metric in metrics:
                self._dropped[metric] = part
            self._update_off()
        if rank_local:
            what = f"{part} failed on this rank; every rank stores NaN for its metrics where it fails"
        elif metrics:
            what = f"{', '.join(metrics)} disabled after an error in {part}"
        elif part in self._parts:
            what = f"{part} disabled after an error"
        else:
            what = f"{part} failed (training goes on)"
        if part in self._notes:
            what += f" ({self._notes[part]})"
        log.warning("moxco: %s for run %r: %s\n%s", what, self.run_name, message,
                    "".join(traceback.format_exception(exc)[-3:]))
        if self.on_error is not None:
            self.on_error(dict(self.errors))

    def run(self, part: str, fn: Callable, *args: Any) -> Any:
        """``fn(*args)`` unless ``part`` is off; an exception is recorded (``record``) and gives None."""
        if part in self._off:  # (live, inlined: this runs a few times a step)
            return None
        start = time.perf_counter()
        try:
            return fn(*args)
        except Exception as exc:
            self.record(part, exc)
            return None
        finally:
            group = self._parts[part][0]
            self.spent[group] = self.spent.get(group, 0.0) + (time.perf_counter() - start)

    def local(self, part: str, compute: Callable[[], Any], fallback: Callable[[], Any]) -> Any:
        """A rank-local computation that precedes a collective: in one process an exception
        propagates to ``run`` (the part is disabled); under DDP/FSDP it is recorded as
        ``"<part> (rank r)"`` and ``fallback()`` (NaN values of the same shapes) is returned, so that
        every rank enters the same collectives."""
        if not self.distributed:
            return compute()
        try:
            return compute()
        except Exception as exc:
            self.record(self.rank_key(part), exc, rank_local=True)
            return fallback()

    def rank_key(self, part: str) -> str:
        """The key of a rank-local failure of ``part``."""
        return f"{part} (rank {self.rank})" if self.distributed else part

    def rank_error(self, part: str) -> Callable[[BaseException], None]:
        """Records a rank-local failure of ``part`` whose collectives still run (its values are NaN);
        in one process, the failure of ``part`` itself."""
        if not self.distributed:
            return lambda exc: self.record(part, exc)
        return lambda exc: self.record(self.rank_key(part), exc, rank_local=True)
