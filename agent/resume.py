"""The agent's run: opening it (run identity), its checkpoints, resuming it, closing it at exit.

``Resumable`` (a mixin of ``agent.core.Agent``) opens the run through the sink (``open_run``: a
name already taken starts a new run ``name-2`` unless ``resume``; the store gives the run's stable
id) and checkpoints the agent.

``Agent.state_dict()`` holds everything the series depend on, as plain data (numbers, strings,
lists, dicts and tensors: ``torch.load(..., weights_only=True)`` reads it): the training thread's
``StepState`` (the step, ``x_{t−1}``, ``x_0``, ``s_{t−1}``, the phase, the agent's random
generator), the sharpness tracker's vector, whether ``.grad`` has been seen rescaled, the decisions
applied, and the writer's state (``MetricWriter.state_dict``: the aggregates, the convexity
ratio's sums, ALIGATOR's denoisers, the decision policy's state). ``to_plain``/``from_plain``
write ALIGATOR's denoisers (``moxco.aligator``) as such plain data.

Without a checkpoint, ``attach(..., resume=True)`` continues the run from what its stored series
say (``from_store``): the step after the last stored one, the phase, and the aggregates whose next
value follows from their last one (``exp_gap``, ``exp_smooth``, ``max_smooth``; ``avg_gap`` from
its last value and the number of its points, exact for a run without epoch resets). What the store
cannot give is said (``NOT_FROM_STORE``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import Any, Dict, List, Mapping, Optional

from moxco.agent.options import AgentOptions, default_url
from moxco.agent.sink import EmbeddedSink, open_sink
from moxco.agent.writer import MetricWriter

log = logging.getLogger("moxco.agent")

STATE_VERSION = 1
EVERY_STEP = ("lr", "grad_norm_sq", "loss", "step_time")  # series with a point at every measured step

# what a resumed run without the agent's checkpoint starts afresh, and what that means
NOT_FROM_STORE = (
    "x_0 (distance restarts from the resumed parameters)",
    "x_{t−1} (the first step's update_norm, update_corr and re-evaluation are left out)",
    "the sharpness tracker's vector (the first probe starts cold)",
    "ALIGATOR's denoisers (goodness's estimates start over)",
    "the convexity ratio's sums",
    "the agent's random generator",
)


# --- ALIGATOR's denoisers as plain data -----------------------------------------------------------

_PLAIN_MODULE = "moxco.aligator"


def to_plain(obj: Any) -> Any:
    """An object of ``moxco.aligator`` (an ``Aligator``, its experts, a ``GradNormSqEstimator``) as
    nested dicts and lists of numbers: its attributes, by name."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a NamedTuple (GradNormSqTerms)
        return {"__class__": type(obj).__name__, "items": [to_plain(x) for x in obj]}
    if isinstance(obj, (list, tuple)):
        return [to_plain(x) for x in obj]
    if type(obj).__module__ != _PLAIN_MODULE:
        raise TypeError(f"cannot save a {type(obj).__name__} in the agent's state")
    names = getattr(type(obj), "__slots__", None) or list(vars(obj))
    return {"__class__": type(obj).__name__, "fields": {n: to_plain(getattr(obj, n)) for n in names}}


def from_plain(data: Any) -> Any:
    """The object ``to_plain`` wrote (classes of ``moxco.aligator`` only)."""
    import moxco.aligator as module

    if isinstance(data, list):
        return [from_plain(x) for x in data]
    if not isinstance(data, Mapping) or "__class__" not in data:
        return data
    cls = getattr(module, data["__class__"], None)
    if not isinstance(cls, type):
        raise ValueError(f"not a class of moxco.aligator: {data['__class__']!r}")
    if "items" in data:
        return cls(*(from_plain(x) for x in data["items"]))
    obj = object.__new__(cls)
    for name, value in data["fields"].items():
        setattr(obj, name, from_plain(value))
    return obj


# --- from the store ---------------------------------------------------------------------------------


def from_store(opened: Any, aggregates: Any) -> Dict[str, Any]:
    """What a resumed run's stored series give (``OpenedRun``): ``{"step": the next step or None,
    "phase": the stored phase or None}``, and the running aggregates loaded into ``aggregates``
    (``metrics.GapSmoothAggregates``) from their last values."""
    run = opened.run
    latest: Mapping[str, Any] = opened.latest or {}
    counts: Mapping[str, int] = opened.counts or {}
    state: Dict[str, Dict[str, Any]] = {}
    for name, kind in (("avg_gap", "mean"), ("exp_gap", "ema"), ("max_smooth", "max"), ("exp_smooth", "ema")):
        value, count = latest.get(name, (0, None))[1], int(counts.get(name, 0))
        if value is None or count == 0 or math.isnan(value):
            continue
        if kind == "mean":
            state[name] = {"count": count, "skipped": 0, "sum": value * count}
        elif kind == "ema":
            state[name] = {"beta": getattr(aggregates, name).beta, "count": count, "skipped": 0, "value": value}
        else:
            state[name] = {"count": count, "skipped": 0, "value": value}
    aggregates.load_state_dict(state)
    # the step after the last one measured: the every-step series say it (a phase point set by a
    # decision is stored at the step after its boundary, which no step measured yet)
    measured = [latest[m][0] for m in EVERY_STEP if m in latest]
    last = max(measured) if measured else run.last_step
    return {"step": None if last is None else int(last) + 1, "phase": run.phase, "aggregates": sorted(state)}


def check_state(state: Mapping[str, Any]) -> None:
    """``ValueError`` unless ``state`` is an ``Agent.state_dict()`` this version reads."""
    if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION or "step_state" not in state:
        raise ValueError("not a moxco agent state (Agent.state_dict()) of this version")


def applied_after(decisions: List[Any], step: int, applied: set) -> List[Any]:
    """The decisions of the run acknowledged as applied at ``step`` or later and not in
    ``applied``: taken after the checkpoint by the job that was stopped, to be applied again at the
    same step by the job that resumes from it."""
    return [d for d in decisions if d.applied_step is not None and d.rejected is None
            and int(d.applied_step) >= step and d.id not in applied]


def describe_missing(parts: Optional[List[str]] = None) -> str:
    return "; ".join(parts if parts is not None else NOT_FROM_STORE)


class Resumable:
    """The ``Agent``'s run: opening it (run identity, resume from the store), its checkpoints (a
    mixin of ``agent.core.Agent``, whose ``__init__`` sets the state these methods use)."""

    def _open_writer(self, o: AgentOptions) -> None:
        """Open the sink and the run (``open_run``: a new run, or with ``resume`` the run of that
        name), and start the writer thread. A store that cannot be reached is spooled to, never an
        error; ``resume="must"`` with no such run is (``NotFoundError``), when the store answers."""
        optimizer = self.optimizer
        hyperparameters = {k: v for k, v in optimizer.defaults.items() if isinstance(v, (int, float, str, bool))}
        config = {"optimizer": type(optimizer).__name__, "hyperparameters": hyperparameters,
                  "reeval_every": o.reeval_every, "probe_every": o.probe_every, "random_scaling": self.random_scaling,
                  "reference": o.reference is not None, "start_step": o.start_step or 0,
                  "goodness": o.goodness.__dict__, "policy": o.policy.to_dict(),
                  "decisions": self.inbox.stats.to_dict(), "world_size": self.group.world,
                  **(self.probe.describe() if self._bound else {}), **dict(o.config or {})}
        callbacks = dict(on_decision=self._receive_decision, on_answer=self.inbox.answered, on_error=self._record_error,
                         on_run=self._opened)
        if o.store is not None:
            self.store = EmbeddedSink(o.store, run=self.run, owns_store=False, **callbacks)
        else:
            self.store = open_sink(o.url or default_url(), self.run, token=o.token, **callbacks,
                                   **dict(o.transport or {}))
        self.writer = MetricWriter(self.store, self.run, goodness_settings=o.goodness, policy=o.policy.to_dict(),
                                   sharpness_target=lambda: self.probe.sharpness_target() if self._bound else None,
                                   on_error=self._record_error, probe_set=o.probe_data is not None,
                                   on_answer=self.inbox.answered)
        if self._bound:
            self.probe.on_config = self.writer.update_run  # (stored off the training thread)
        try:
            opened = self.store.open_run(self.run, resume=o.resume, session=self.session, config=config,
                                         optimizer={"class": type(optimizer).__name__, **hyperparameters},
                                         policy=o.policy.to_dict())
        except Exception:
            self.writer.close(timeout=1.0)
            self.store.close()
            raise
        if opened is None:
            what = ("continues the run of that name if there is one" if o.resume else
                    "is a new run (named with a suffix if the name is taken)")
            log.warning("moxco: run %r: the store did not answer at attach; the points are kept and the run %s once "
                        "it answers%s", self.run, what,
                        "; give start_step= to number the steps after the stored ones" if o.resume and
                        o.start_step is None else "")
            return
        self._opened(opened, at_attach=True)

    def _opened(self, opened: Any, at_attach: bool = False) -> None:
        """The store opened the run (at attach, or later when it was away then): its name and id,
        and for a resumed run without the agent's checkpoint what its series give (``resume``)."""
        self.run, self.run_id = opened.run.name, opened.run.id
        if self.writer is not None:
            self.writer.run = self.run
        if opened.renamed:
            log.warning("moxco: a run named %r exists already: this job's run is %r (attach(..., resume=True) "
                        "continues the existing run instead)", opened.requested, self.run)
        if opened.created or not at_attach:
            if not opened.created:
                log.warning("moxco: run %r resumed when the store answered; steps are numbered as at attach", self.run)
            return
        restored = from_store(opened, self.writer.aggregates)
        if self.options.start_step is None and restored["step"] is not None:
            self._start_step = restored["step"]
        self._store_phase = restored["phase"]
        log.warning("moxco: run %r resumed from its stored series at step %d (phase %s, aggregates %s); not stored, so "
                    "starting afresh unless agent.load_state_dict(...) restores a checkpoint: %s", self.run,
                    self._start_step, self._store_phase or 1, ", ".join(restored["aggregates"]) or "none",
                    describe_missing())

    def state_dict(self, timeout: float = 60.0) -> Dict[str, Any]:
        """Everything the agent's series depend on, to save with the job's checkpoint (plain data
        and tensors: ``torch.save``/``torch.load(weights_only=True)``): the step, ``x_{t−1}``,
        ``x_0``, the phase, the random generator, the sharpness vector, the decisions applied, and
        the writer thread's aggregates, ALIGATOR denoisers and policy state (``agent.resume``).
        Waits until the writer has stored (or spooled) every step measured so far, so that a job
        killed after its checkpoint loses no point before it."""
        state: Dict[str, Any] = {
            "version": STATE_VERSION, "run": self.run, "run_id": self.run_id, "step": self.step,
            "step_state": self.state.state_dict() if self.state is not None else None,
            "sharpness": self.probe.state_dict() if self._bound else None,
            "gradient": {"changes_seen": bool(getattr(self.raw_gradient, "_changes_seen", False))} if self._bound
            else None,
            "decisions": self.inbox.state_dict(), "writer": None}
        if self.writer is not None:
            def snapshot():
                self.writer._flush()
                self.store.sync(timeout)
                return self.writer.state_dict()

            try:
                state["writer"] = self.writer.call(snapshot, timeout)
            except Exception as exc:
                self._record_error("resume", exc)
        return state

    def load_state_dict(self, state: Mapping[str, Any], timeout: float = 60.0) -> None:
        """Restore a ``state_dict()``: the series continue exactly as the checkpointed job's would
        have (call it before the first step after attaching to the resumed run: ``attach(...,
        run=state["run"], resume=True)``, as the integrations do). A policy state newer than the
        store's is given to the store; decisions the stopped job applied after the checkpoint are
        applied again at the same steps."""
        check_state(state)
        if state.get("run_id") and self.run_id and state["run_id"] != self.run_id:
            log.warning("moxco: the agent state of run %r (id %s) is loaded into run %r (id %s)", state.get("run"),
                        state["run_id"], self.run, self.run_id)
        if not self._bound:
            self._pending_state = state  # lazy parameters: restored when they exist
            self._start_step = int(state["step"])
            return
        if state["step_state"] is not None:
            self.state.load_state_dict(state["step_state"])
        if state.get("sharpness") is not None:
            self.probe.load_state_dict(state["sharpness"])
        if state.get("gradient") and state["gradient"].get("changes_seen"):
            self.raw_gradient.step_seen(True)
        applied = set(state["decisions"]["applied"])
        self.inbox.load_state_dict(state["decisions"])
        self.free.skipped()
        if self.writer is None:
            return
        if state.get("writer") is not None:
            self.writer.call(lambda: self.writer.load_state_dict(state["writer"]), timeout)
            policy_state = state["writer"].get("policy_state")
            if policy_state is not None:
                self.failures.run("resume", lambda: self.store.put_run(self.run, policy_state=policy_state))
        else:
            log.warning("moxco: run %r: the agent state has no writer state: the aggregates, ALIGATOR and the "
                        "policy's progress start over", self.run)
        try:  # decisions the stopped job applied after its checkpoint: again, at the same step
            for decision in applied_after(self.store.decisions(self.run), self.step, applied):
                self.inbox.receive(decision.id, replace(decision, apply_at=decision.applied_step, applied_step=None,
                                                        applied_at=None))
        except Exception as exc:
            log.warning("moxco: run %r: cannot read the run's decisions to apply again those taken after the "
                        "checkpoint (%s)", self.run, exc)


def close_at_exit(ref: "weakref.ref[Agent]") -> None:
    """At interpreter exit, an agent not closed: its points are flushed and its run marked
    ``interrupted`` (the process ended without ``close()``)."""
    agent = ref()
    if agent is None or agent._closed:
        return
    log.warning("moxco: run %r was not closed (agent.close()); closing it at interpreter exit: what was measured is "
                "stored and the run is marked interrupted", agent.run)
    try:
        agent.close("interrupted")
    except Exception as exc:  # noqa: BLE001 - exiting: say it, never raise
        log.warning("moxco: closing run %r at exit failed: %s", agent.run, exc)
