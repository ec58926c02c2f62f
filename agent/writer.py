"""The background side of the agent: turns step records into stored points, off the training thread.

The training thread hands each step's values (0-dim tensors, not yet read) to ``submit``, which
never blocks: the queue is bounded and, when it is full, the record is counted as dropped and a
warning is logged once. The writer thread reads the tensors (the only
place a device synchronisation happens), updates the running aggregates, the ALIGATOR denoisers,
and the goodness score, and writes batches of points (with decision acknowledgements) through the
sink, whose store runs the run's decision policy on them.

A probe's record is urgent: the training thread may wait for the policy's answer to it at a step
boundary (``agent.decisions``), so it wakes the writer at once (no gathering) and its goodness
goes to the sink as soon as it is scored; the sink says when the store has decided on it, and a
probe the store cannot decide on (no goodness score, a dropped record, a failed write) is answered
here (``on_answer``) so that nobody waits for it.
"""

from __future__ import annotations

import logging
import math
import numbers
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from torch import Tensor

from moxco import metrics
from moxco.agent.options import GoodnessSettings
from moxco.aligator import Aligator, GradNormSqEstimator, split_terms
from moxco.goodness import Goodness, goodness
from moxco.policy import decide
from moxco.catalogue import GOODNESS_TERMS, needing
from moxco.wire import Point

log = logging.getLogger("moxco.agent")

FLUSH_SECONDS = 0.25
# after a record wakes the writer it waits this long and then takes every record queued: a few
# wake-ups a second, not one per step (the writer's Python work holds the GIL, and the training
# thread's own, a for-loop optimizer's step for one, waits for it: measured at 1–4 % of the
# benchmark MLP's 7 ms step with a wake-up per step; its time per record fell from 0.16 to 0.05 ms)
GATHER_SECONDS = 0.05
GRADIENT_METRICS = needing("gradient")  # what a step whose raw gradient is unknown leaves out
UNIFORM_TOLERANCE = 1e-4
FLUSH_POINTS = 2000
FREE_SUMS = "_free_sums"  # a StepRecord value: the step's metrics.FreeSums, read here in one go
REPLAY_SUMS = "_replay_sums"  # a StepRecord value: a list of metrics.ReplaySums (x_{t−1}, x*), read here
GRADIENT_UNKNOWN = "_gradient_unknown"  # a StepRecord value: why this step's g_t cannot be known
GRAD_RESCALE_RATIOS = "_grad_rescale_ratios"  # a StepRecord value: per-parameter g_t / .grad, checked uniform
# the probe's curvature values, stored as they come (goodness takes its λ̂ from one of them)
CURVATURE_POINTS = ("sharpness", "sharpness_min", "sharpness_precond", "sharpness_precond_target", "hessian_trace")
# the writer's own parts (agent.failures) and the metrics a failure of each drops; convexity_ratio's
# sum is the probe's part of that name
WRITER_PARTS = {
    "aggregates": tuple(metrics.GapSmoothAggregates().update(0.0, 0.0)),  # avg_gap, exp_gap, max_smooth, exp_smooth
    "goodness": ("goodness",) + GOODNESS_TERMS,  # ALIGATOR's f̂ and ĝ², the score
}


@dataclass
class StepRecord:
    step: int
    values: Dict[str, Any]
    wall_time: float = field(default_factory=time.time)
    epoch_start: bool = False
    probe: Optional[Dict[str, Any]] = None  # sharpness, split sums for the grad-norm estimator
    user: bool = False  # the user's own series (``agent.log``): stored as they are


class _Control:
    """Work for the writer thread between two records (a snapshot of its state, a flush): run
    there, in order, so it sees every record submitted before it."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn, self.done, self.result, self.error = fn, threading.Event(), None, None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except Exception as exc:  # handed back to the caller
            self.error = exc
        finally:
            self.done.set()


def _uniform(ratios: Tensor) -> bool:
    """Whether per-parameter rescaling factors are one common factor (relative spread ≤ 1e-4)."""
    ratios = ratios.detach().cpu().double()
    if ratios.numel() == 0:
        return True
    low, high = float(ratios.min()), float(ratios.max())
    return high - low <= UNIFORM_TOLERANCE * max(abs(high), 1e-300)


def user_values(values: Any) -> Dict[str, Any]:
    """``agent.log``'s values, checked: names by ``moxco.wire.check_metric_name`` and not a moxco
    metric's (the catalogue's); numbers as floats, one-element tensors detached (read on the writer
    thread). ``ValueError``/``TypeError`` say what is wrong."""
    from moxco.catalogue import metric
    from moxco.wire import check_metric_name

    if not isinstance(values, Mapping):
        raise TypeError(f"agent.log takes a mapping of names to values, got {type(values).__name__}")
    checked: Dict[str, Any] = {}
    for name, value in values.items():
        check_metric_name(name)
        if metric(name) is not None:
            raise ValueError(f"{name!r} is a moxco metric (moxco.catalogue); log your own series under another name, "
                             f"e.g. 'user/{name}'")
        if isinstance(value, Tensor):
            if value.numel() != 1:
                raise ValueError(f"agent.log: {name!r} has {value.numel()} elements; log scalars")
            checked[name] = value.detach().reshape(())
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            checked[name] = float(value)
        else:
            raise TypeError(f"agent.log: {name!r} is a {type(value).__name__}, not a number")
    return checked


def _read(value: Any) -> float:
    if isinstance(value, Tensor):
        return value.item()  # (a 0-dim tensor; from an accelerator, one copy to the host)
    return float(value)


class MetricWriter:
    """Owns the sink (``agent.sink.Sink``), the aggregates, the denoisers and goodness."""

    def __init__(self, store: Any, run: str, *, goodness_settings: GoodnessSettings,
                 sharpness_target: Callable[[], Optional[float]], on_error: Callable[[str, BaseException], None],
                 on_answer: Optional[Callable[[List[int]], None]] = None, queue_size: int = 10_000,
                 probe_set: bool = False, policy: Optional[Dict[str, Any]] = None) -> None:
        self.store, self.run = store, run
        self.goodness_settings = goodness_settings
        self.probe_set = probe_set  # F, ∇F and goodness's loss term come from the probe set
        self.sharpness_target = sharpness_target
        self.on_error = on_error
        self.on_answer = on_answer  # probes the store cannot decide on now (agent.decisions)
        self.aggregates = metrics.GapSmoothAggregates()
        self.convexity = metrics.ConvexityRatio()  # convexity_ratio's running sums (audit eq. 6)
        self.loss_denoiser = Aligator()
        self.grad_norm_estimator = GradNormSqEstimator()
        # the run's decision policy as the store runs it on these goodness points (moxco.policy.decide),
        # followed here for the agent's checkpoints: the store keeps the one that decides
        self.policy, self.policy_state = policy, None
        self.dropped = 0
        self.written = 0
        self._queue: "queue.Queue[Any]" = queue.Queue(maxsize=queue_size)
        self._urgent = threading.Event()  # a probe's record is queued: stop gathering
        self._buffer: List[Point] = []
        self._last_flush = time.monotonic()
        self._disabled: set[str] = set()
        self._warned: set[str] = set()
        # store updates handed over by the training thread, applied at the next flush (in order,
        # kept and retried while the store refuses them)
        self._updates_lock = threading.Lock()
        self._run_config: Optional[Dict[str, Any]] = None
        self._acknowledgements: List[tuple] = []
        self._thread = threading.Thread(target=self._loop, name=f"moxco-writer[{run}]", daemon=True)
        self._thread.start()

    # --- training thread -------------------------------------------------------------------------

    def submit(self, record: StepRecord) -> bool:
        """Queue ``record`` (never blocks); False when the queue is full and it was dropped (counted,
        warned once; a dropped probe is answered: no decision can come of it)."""
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            if self.dropped == 0:
                log.warning("moxco: the writer queue is full; step records are being dropped (run %r)", self.run)
            self.dropped += 1
            if record.probe is not None:
                self._answer([record.step])
            return False
        if record.probe is not None:
            self._urgent.set()
        return True

    def update_run(self, config: Dict[str, Any]) -> None:
        """Merge ``config`` into the run's stored config (the sink's ``put_run``), from the writer
        thread: the training thread never waits on the store (a locked SQLite file can hold a
        writer for its whole busy timeout)."""
        with self._updates_lock:
            self._run_config = {**(self._run_config or {}), **config}

    def acknowledge(self, ident: str, applied_step: int, rejected: Optional[str] = None) -> None:
        """Acknowledge decision ``ident`` as applied at ``applied_step`` (or refused: ``rejected``):
        it rides with the next batch the writer thread ingests (see ``update_run``)."""
        with self._updates_lock:
            self._acknowledgements.append((ident, applied_step) if rejected is None else
                                          (ident, applied_step, rejected))

    @property
    def running(self) -> bool:
        """Whether the thread is there to apply ``update_run`` and ``acknowledge``."""
        return self._thread.is_alive()

    def call(self, fn: Callable[[], Any], timeout: float) -> Any:
        """Run ``fn`` on the writer thread after every record submitted so far; its result, or
        ``TimeoutError`` when the thread did not get there within ``timeout`` seconds (a store that
        holds a write). Called on the training thread, which waits (checkpoints, ``flush``)."""
        control = _Control(fn)
        if not self.running:
            control.run()
        else:
            self._queue.put(control, timeout=timeout)
            if not control.done.wait(timeout):
                raise TimeoutError(f"the writer thread did not get to it within {timeout:g} s")
        if control.error is not None:
            raise control.error
        return control.result

    def flush(self, timeout: float = 30.0) -> None:
        """Store everything submitted so far (through the sink) before returning."""
        self.call(self._flush, timeout)

    def state_dict(self) -> Dict[str, Any]:
        """The writer's running state (call on the writer thread: ``call(writer.state_dict)``):
        the gap/smoothness aggregates, the convexity ratio's sums, ALIGATOR's denoisers (the loss,
        the three gradient-norm terms), and the decision policy's state."""
        from moxco.agent.resume import to_plain

        return {"aggregates": self.aggregates.state_dict(), "convexity": self.convexity.state_dict(),
                "loss_denoiser": to_plain(self.loss_denoiser), "grad_norm_estimator": to_plain(self.grad_norm_estimator),
                "policy_state": self.policy_state, "written": self.written}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore ``state_dict()`` (call on the writer thread)."""
        from moxco.agent.resume import from_plain

        self.aggregates.load_state_dict(state["aggregates"])
        self.convexity.load_state_dict(state["convexity"])
        self.loss_denoiser = from_plain(state["loss_denoiser"])
        self.grad_norm_estimator = from_plain(state["grad_norm_estimator"])
        self.policy_state = state.get("policy_state")

    def close(self, timeout: float = 30.0) -> None:
        """Flush everything queued and stop the thread."""
        self._queue.put(None)
        self._urgent.set()  # no gathering before the last flush
        self._thread.join(timeout)
        if not self._thread.is_alive():  # what arrived during the last flush
            self._flush()

    # --- writer thread ---------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=FLUSH_SECONDS)
            except queue.Empty:
                self._flush()
                continue
            if isinstance(first, StepRecord) and first.probe is None:
                self._urgent.wait(GATHER_SECONDS)  # cut short by a probe's record
            self._urgent.clear()  # (before gathering: a probe queued from now on sets it again)
            for record in self._gathered(first):
                if record is None:
                    self._flush()
                    return
                if isinstance(record, _Control):
                    record.run()
                    continue
                try:
                    self._absorb(record)
                except Exception as exc:  # never let one bad record stop the thread
                    self.on_error("writer", exc)
                    if record.probe is not None:
                        self._answer([record.step])
                if len(self._buffer) >= FLUSH_POINTS or time.monotonic() - self._last_flush >= FLUSH_SECONDS:
                    self._flush()

    def _gathered(self, first: Optional[StepRecord]):
        """``first``, then every record queued now, in order (``None``, the end, comes last)."""
        yield first
        while first is not None:
            try:
                first = self._queue.get_nowait()
            except queue.Empty:
                return
            yield first

    def _emit(self, step: int, name: str, value: float, wall_time: float) -> None:
        self._buffer.append(Point(step, name, value, wall_time))

    def _absorb(self, record: StepRecord) -> None:
        step, wall = record.step, record.wall_time
        if record.user:
            for name, value in record.values.items():
                self._emit(step, name, _read(value), wall)
            return
        if record.epoch_start:
            self.aggregates.reset_epoch()
        ratios = record.values.pop(GRAD_RESCALE_RATIOS, None)
        free = record.values.pop(FREE_SUMS, None)
        replays = record.values.pop(REPLAY_SUMS, ())
        unknown = record.values.pop(GRADIENT_UNKNOWN, None)
        values = {name: _read(value) for name, value in record.values.items()}
        for replay in replays:
            values.update(replay.values())
        if free is not None:
            now, before = free.values()
            values.update(now)
            for name, value in before.items():  # update_norm = ‖x_t − x_{t−1}‖ belongs to step t−1
                self._emit(step - 1, name, value, wall)
        gradient_known = unknown is None and (ratios is None or _uniform(ratios))
        if unknown is not None and "gradient_unknown" not in self._warned:
            self._warned.add("gradient_unknown")
            log.warning("moxco: gradient-based metrics of step %d are skipped: %s (run %r)", step, unknown, self.run)
        elif not gradient_known and "nonuniform_gradient" not in self._warned:
            # .grad was changed non-uniformly after backward (e.g. clip_grad_value_)
            self._warned.add("nonuniform_gradient")
            log.warning("moxco: .grad was modified non-uniformly after backward (clip_grad_value_?); "
                        "gradient-based metrics are skipped on such steps (run %r)", self.run)
        if not gradient_known:
            # g_t cannot be recovered, so the metrics that use it are left out for this step rather than wrong
            for name in GRADIENT_METRICS:
                values.pop(name, None)
        for name, value in values.items():
            self._emit(step, name, value, wall)
        self._part("aggregates", self._aggregates, step, values, wall)
        if "loss" in values:
            self._part("goodness", self.loss_denoiser.update, values["loss"])
        if record.probe is not None:
            terms = record.probe.pop("convexity_terms", None)
            # a step whose g_t is unknown adds no wrong term (on a probe set ∇F is the probe's own)
            if terms is not None and (gradient_known or self.probe_set):
                self._part("convexity_ratio", self._convexity_ratio, step, terms, wall)
            self._probe(step, record.probe, values, wall)

    def _part(self, part: str, fn: Callable, *args: Any) -> Any:
        """``fn(*args)`` unless ``part`` failed before; a failure disables ``part`` (its metrics,
        ``WRITER_PARTS``), is reported once (``on_error``), and the rest of the record goes on."""
        if part in self._disabled:
            return None
        try:
            return fn(*args)
        except Exception as exc:
            self._disabled.add(part)
            self.on_error(part, exc)
            return None

    def _aggregates(self, step: int, values: Dict[str, float], wall: float) -> None:
        for name, value in self.aggregates.update(values.get("inst_gap"), values.get("inst_smooth")).items():
            self._emit(step, name, value, wall)

    def _convexity_ratio(self, step: int, terms: Tensor, wall: float) -> None:
        self._emit(step, "convexity_ratio", self.convexity.update_terms(*terms.detach().cpu().tolist()), wall)

    def _goodness(self, probe: Dict[str, Any], values: Dict[str, float], sharpness: float,
                  target: Optional[float], step: int, wall: float) -> Optional[Goodness]:
        """The goodness score (MoXCo eq. 6) on ALIGATOR's ``ĝ²`` (the three-way split's estimate;
        without a split, the raw ``‖g_t‖²``) and ``f̂`` (ALIGATOR on the step losses, or ``F(x_t)`` on
        the probe set), when there is a sharpness and a target."""
        if "split_sums" in probe:
            grad_sq = self.grad_norm_estimator.update_terms(*split_terms(probe["split_sums"].cpu(), probe.get("split_sizes")))
        else:
            grad_sq = values.get("grad_norm_sq", math.nan)
        if target is None or math.isnan(sharpness):
            return None
        if self.probe_set:
            if "probe_loss" not in probe:
                return None  # F on the probe set failed (errors["probe_loss"]): goodness has no loss term
            loss = _read(probe["probe_loss"])
        else:
            loss = self.loss_denoiser.estimate
        s = self.goodness_settings
        score = goodness(max(grad_sq, 0.0) if not math.isnan(grad_sq) else grad_sq, sharpness,
                         loss, tau=s.tau, sharpness_target=target, loss_target=s.loss_target, form=s.form)
        for name, value in zip(("goodness",) + GOODNESS_TERMS, score):
            self._emit(step, name, value, wall)
        if self.policy is not None:
            try:
                self.policy_state, _ = decide(self.policy, self.policy_state, {step: score})
            except Exception as exc:  # the checkpoint then lacks the policy's state: the store keeps its own
                self.policy = None
                self.on_error("policy_state", exc)
        return score

    def _probe(self, step: int, probe: Dict[str, Any], values: Dict[str, float], wall: float) -> None:
        read = {name: _read(probe[name]) for name in CURVATURE_POINTS if name in probe}
        for name, value in read.items():
            self._emit(step, name, value, wall)
        target = probe["sharpness_target"] if "sharpness_target" in probe else self.sharpness_target()
        if target is not None:
            self._emit(step, "sharpness_target", float(target), wall)
        s = self.goodness_settings
        if s.sharpness == "precond":  # the adaptive pair: λ_max(P⁻¹H) against k · 2(1+β₁)/((1−β₁)η)
            sharpness = read.get("sharpness_precond", math.nan)
            edge = read.get("sharpness_precond_target")
            target = s.sharpness_target if s.sharpness_target is not None else (
                s.k * edge if edge is not None else None)
        else:
            sharpness = read.get("sharpness", math.nan)
        score = self._part("goodness", self._goodness, probe, values, sharpness, target, step, wall)
        if score is not None:
            self._flush(probes=[step])  # to the store now: its ingest runs the run's decision policy
        else:
            self._answer([step])  # no goodness: the policy has nothing to decide on

    def _answer(self, steps: List[int]) -> None:
        if self.on_answer is not None:
            try:
                self.on_answer(steps)
            except Exception as exc:  # noqa: BLE001 - the agent's callback must not stop the writer
                self.on_error("writer", exc)

    def _apply_updates(self) -> None:
        with self._updates_lock:
            config, self._run_config = self._run_config, None
        if config is None:
            return
        try:
            self.store.put_run(self.run, config=config)
        except Exception as exc:
            with self._updates_lock:  # kept for the next flush, ahead of what came since
                self._run_config = {**config, **(self._run_config or {})}
            self.on_error("store", exc)

    def _flush(self, probes: Sequence[int] = ()) -> None:
        """Send the buffered points with the acknowledgements queued so far in one ``ingest`` (kept
        and retried while the store refuses them). An acknowledgement the store has no decision for
        is reported, not retried, so the others are not held. ``probes``: the steps of the goodness
        points among them; the sink answers them once the store has decided, and when the write
        fails they are answered here (the policy decides when a later write lands: late)."""
        self._last_flush = time.monotonic()
        self._apply_updates()
        with self._updates_lock:
            acks, self._acknowledgements = self._acknowledgements, []
        if not self._buffer and not acks:
            return
        batch, self._buffer = self._buffer, []
        try:
            result = self.store.ingest(self.run, batch, acks=acks)
        except Exception as exc:
            self.on_error("store", exc)
            if probes:
                self._answer(list(probes))
            self._buffer = batch + self._buffer  # keep them for the next flush: nothing lost
            with self._updates_lock:
                self._acknowledgements = acks + self._acknowledgements
            if len(self._buffer) > 50 * FLUSH_POINTS:  # bounded memory while the store is away
                self.dropped += len(self._buffer) - 50 * FLUSH_POINTS
                self._buffer = self._buffer[-50 * FLUSH_POINTS :]
            return
        self.written += len(batch)
        for ident in getattr(result, "unknown_acks", None) or ():
            self.on_error("store", LookupError(f"run {self.run!r} has no decision {ident!r} to acknowledge"))
