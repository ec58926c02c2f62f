"""``attach(model, optimizer)``: what the agent hooks, what it keeps, what it computes when.

Hooks (all removable, none on the user's tensors):

* the model's forward pre/post hooks record the step's training-mode forward calls, so that the
  batch can be replayed at other parameters (``capture.StepCapture``); the agent's own forward
  hooks bind it to the optimizer's parameters once they exist (lazy modules) and pick up parameter
  groups added later (``binding``);
* at the end of each backward, the gradients' version counters (and norms, once ``.grad`` has been
  seen rescaled after backward), so that ``g_t`` is the raw gradient (``gradients.RawGradient``);
* the optimizer's step pre-hook, at ``x_t`` with ``g_t`` in ``.grad``, runs the metric groups
  (``agent/groups/``) due at this step, in this order (``_measure``):

  1. ``free``: ``g_t``'s scale, the step's loss, its learning rate, time and throughput;
  2. ``reeval`` (every ``reeval_every`` steps): the batch replayed at ``x_{t−1}``, which the next
     item overwrites;
  3. ``free``: one fused pass for ``grad_norm_sq``, ``distance``, ``update_corr``,
     ``update_corr_rs`` and the previous step's ``update_norm``, writing ``x_t`` over ``x_{t−1}``;
  4. ``reeval``'s formulas, with the products of that pass;
  5. ``reference`` (same cadence, with ``reference=``): the replay at ``x*``;
  6. ``probe`` (every ``probe_every`` steps, on the probe set of ``probe_data`` or the step's batch):
     the curvature (sharpness, its preconditioned form, the trace), the gradient-norm split, the
     convexity ratio's terms, the optimizer's state, the phase;

  then hands the step's values, unread, to the writer thread;
* the optimizer's step post-hook, at ``x_{t+1}``: random scaling ``x_{t+1} = x_t + s_t Δ_t`` if
  asked for, then the decisions due at this step boundary are applied (``decisions``: the boundary
  is fixed by the run's configuration; in the ``sync`` mode the step waits here for the policy's
  answer to a probe when it has not come yet).

Kept between steps (``step.StepState``): one copy of the parameters (``x_{t−1}``), ``x_0`` with
``track_distance``, ``x*`` with a reference, the sharpness tracker's vector, the step counter and
phase. The writer thread (``writer.MetricWriter``) reads the values, keeps the aggregates, ALIGATOR
and goodness, and writes through the sink, whose store runs the decision policy. Every piece of work
runs under ``failures.Failures``: a failure drops the metrics it produces, is logged once and stored
with the run, and training goes on.

The run: ``attach`` opens it through the sink (``open_run``: a taken name starts a new run with a
suffixed name unless ``resume``); ``state_dict``/``load_state_dict`` checkpoint and restore the
agent with the job (``resume``); an agent not closed is closed at interpreter exit, its run marked
``interrupted``.
"""

from __future__ import annotations

import atexit
import functools
import logging
import numbers
import random
import uuid
import weakref
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import nn

from moxco.agent import binding
from moxco.agent.binding import Bindable
from moxco.agent.capture import StepCapture
from moxco.agent.decisions import DecisionInbox, Outcome
from moxco.agent.distributed import DataParallelGroup
from moxco.agent.failures import Failures
from moxco.agent.options import OPTION_NAMES, AgentOptions, check_names, default_run_name, default_url
from moxco.agent.probe_set import ProbeSet
from moxco.agent.resume import Resumable, close_at_exit
from moxco.agent.step import Previous, StepContext, StepState
from moxco.agent.writer import WRITER_PARTS, MetricWriter, StepRecord, user_values
from moxco.decision import Decision

log = logging.getLogger("moxco.agent")

COPY_NOTE = "x_{t−1} is no longer kept: update_norm, update_corr(_rs), the re-evaluation and random scaling stop"
LAZY_NOTE = "the optimizer's parameters are not initialised yet (a lazy module): measurement starts once they are"


class Agent(Bindable, Resumable):
    """The attached agent. Use ``attach(...)`` to create one; ``close()`` (or ``with``) flushes."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, options: Optional[AgentOptions] = None,
                 **keywords: Any) -> None:
        o = options if options is not None else AgentOptions.from_keywords(**keywords)
        self.options, self.model, self.optimizer = o, model, optimizer
        self.run = o.run or default_run_name()
        self._closed = True  # until set up: close() does nothing, and the optimizer is free again
        binding.claim(optimizer, self)
        try:
            self._setup(o)
        except BaseException:
            binding.release(optimizer, self)
            raise

    def _setup(self, o: AgentOptions) -> None:
        model, optimizer = self.model, self.optimizer
        self.random_scaling, self.on_decision = o.random_scaling, o.on_decision
        self.group = DataParallelGroup()
        # every rank must agree on the run name and on the agent's random numbers
        self.run = self.requested_run = self.group.broadcast(self.run)
        self.run_id: Optional[str] = None  # the run's stable id, once the store opened it
        self.session = uuid.uuid4().hex[:16]  # this writer's session (the prefix of its batch ids)
        seed = self.group.broadcast(o.seed if o.seed is not None else random.randrange(2**62))
        self.failures = Failures(self.run, rank=self.group.rank, distributed=self.group.active)
        self.errors: Dict[str, str] = self.failures.errors  # failed part → "Type: first line"
        self._seed = seed
        self._generator = torch.Generator().manual_seed(seed)  # the agent's own: the user's RNG stream is untouched
        self.params, self.names = binding.optimizer_params(model, optimizer)  # (ValueError: not the model's)
        loop = "closure" if o.manual_pre_step else "plain"
        self.capture = StepCapture(model, criterion=o.criterion, loss_fn=o.loss_fn, loop=loop)
        self.state: Optional[StepState] = None  # from the binding on
        self.probe_set: Optional[ProbeSet] = None
        self._start_step, self._unmeasured, self._store_phase = o.start_step or 0, 0, None
        self._pending_state: Optional[Mapping[str, Any]] = None
        self.failures.declare("copy", "copy", note=COPY_NOTE)
        self.failures.declare("decision", "decision")
        self.failures.declare("params", "free", note=LAZY_NOTE)
        self.failures.declare("resume", "writer")
        for part, dropped in WRITER_PARTS.items():
            self.failures.declare(part, "writer", dropped)
        self.inbox = DecisionInbox(self.group, mode=o.decision_mode(o.url or default_url()), lag=o.policy.lag,
                                   timeout=o.decision_timeout)
        self._receive_decision = self.inbox.receive  # (the writer's and the sinks' callback)
        self.goodness_settings = o.goodness
        self.store = None
        self._owns_store = o.store is None
        self.writer: Optional[MetricWriter] = None
        self.failures.on_error = self._store_errors
        self._closed = False
        self._bound = False
        self._hooks: List[Any] = []
        try:
            if not binding.any_lazy(self.params):
                self._bind()  # (a setting the agent refuses, FSDP1, is said here, before the run is opened)
            if self.group.is_writer:  # one writer per job: rank 0
                self._open_writer(o)
                if self.errors:  # said at the binding, before the run was open
                    self._store_errors(dict(self.errors))
        except BaseException:
            self.capture.remove()
            if self._bound:
                self.raw_gradient.remove()
            raise
        self.run, self.run_id, self._start_step, self._store_phase = self.group.broadcast(
            (self.run, self.run_id, self._start_step, self._store_phase))
        self.failures.run_name = self.run
        if self._bound:  # what the store gave a resumed run
            self.state.step = self._start_step
            if self._store_phase is not None:
                self.state.phase = int(self._store_phase)
        self._hooks = [model.register_forward_pre_hook(self._before_forward),
                       model.register_forward_hook(self._after_forward)]
        # manual_pre_step: the loop calls before_optimizer_step() itself, for optimizers stepped with
        # a closure that runs forward and backward inside step() (Lightning, LBFGS-style loops)
        if not o.manual_pre_step:
            self._hooks.append(optimizer.register_step_pre_hook(self._before_step))
        self._hooks.append(optimizer.register_step_post_hook(self._after_step))
        self._exit_hook = functools.partial(close_at_exit, weakref.ref(self))
        atexit.register(self._exit_hook)

    # --- the step ------------------------------------------------------------------------------

    def _before_step(self, optimizer, args, kwargs) -> None:
        if self._closed:
            return
        try:
            if not self._bound and not self.failures.run("params", self._bind):
                if "unbound" not in self.failures.spent:
                    self.failures.spent["unbound"] = 0.0
                    log.warning("moxco: run %r: %s", self.run, LAZY_NOTE)
                return
            if binding.param_count(self.optimizer) != self._n_params:
                self.failures.run("params", self._rebind)
            self._measure()
        except Exception as exc:  # every part runs guarded; this is the last line of defence
            self._record_error("agent", exc)

    def _measure(self) -> None:
        """At ``x_t``, with ``g_t`` in ``.grad``: the metric groups due at this step, in order."""
        step, state = self.state.step, self.state
        ctx = self._context()
        with torch.no_grad():
            self.free.recover_gradient(ctx)  # g_t = grad_scale · .grad (clipping, AMP undone)
            self.free.step_loss(ctx)  # f(x_t, z_t)
            self.free.loop_values(ctx)  # lr, step time, throughput
        # the replay at x_{t−1} comes before the free metrics' pass, which writes x_t over x_{t−1}
        replay = self.reeval.replay(ctx) if self.reeval.due(step) else None
        with torch.no_grad():
            self.free.compute(ctx)
        if replay is not None:
            self.reeval.finish(ctx, replay)  # its formulas take their products from that pass
        if self.reference.due(step):
            self.reference.compute(ctx)
        if self.probe.due(step):
            self.probe.compute(ctx)
        if state.holds is not Previous.X_T:  # x_{t−1} ← x_t where the free metrics did not do it in passing
            self.failures.run("copy", state.settle, ctx.params)
        if ctx.probe is not None:  # its decision, if any, is due at a boundary the configuration fixes
            self.inbox.expect(step)
        self._submit(StepRecord(step, ctx.values, epoch_start=state.epoch_start, probe=ctx.probe))
        state.epoch_start = False
        self.raw_gradient.clear()

    def _context(self) -> StepContext:
        if self.shards is not None:
            self.params = self.shards.local()  # FSDP's lazy init may replace the shard tensors
        return StepContext(self.state.step, self.params, self._reduce, self.capture, self._read_grad)

    def _after_step(self, optimizer, args, kwargs) -> None:
        if self._closed:
            return
        try:
            self.capture.clear()
            if not self._bound:  # not measured: the step is counted all the same
                self._unmeasured += 1
                return
            with torch.no_grad():
                self.free.after_step(self.params)  # at x_{t+1}: random scaling
            self.state.end_step()
            self.failures.run("decision", self._apply_pending_decision)
        except Exception as exc:  # the last line of defence, as in _before_step
            self._record_error("agent", exc)

    def _apply_pending_decision(self) -> None:
        """The decisions due at this boundary (``agent.decisions``): applied or rejected, acknowledged."""
        for outcome in self.inbox.at_boundary(self.step, self.optimizer, self.on_decision):
            if self.writer is not None:  # the store is written from the writer thread, never from the step
                self.writer.acknowledge(outcome.ident, self.step, rejected=outcome.rejected)
            if outcome.rejected is not None:
                self._report_rejection(outcome)
                continue
            self.state.phase = outcome.decision.phase
            point = self.state.phase_point()
            if point:
                self._submit(StepRecord(self.step, point))
        self._store_decision_stats(self.inbox.changed())

    def _report_rejection(self, outcome: Outcome) -> None:
        """A decision the agent could not apply: logged once, acknowledged as rejected (the store
        keeps the reason), counted (``inbox.stats.rejected``); the next decisions are applied as
        usual. Not an ``errors`` entry: no metric is lost."""
        log.warning("moxco: decision %s rejected at step %d for run %r (later decisions are applied as usual): %s",
                    outcome.ident, self.step, self.run, outcome.rejected)

    def _store_decision_stats(self, stats: Optional[Dict[str, Any]]) -> None:
        if stats is not None and self.writer is not None:
            self.writer.update_run({"decisions": stats})

    def _submit(self, record: StepRecord) -> None:
        if self.writer is not None:
            self.writer.submit(record)

    # --- user-facing ---------------------------------------------------------------------------

    @property
    def step(self) -> int:
        """The optimizer step the next pre-hook measures (``start_step`` + steps taken)."""
        return self.state.step if self.state is not None else self._start_step + self._unmeasured

    @property
    def phase(self) -> int:
        """The MoXCo phase: 1 explores, 2 commits (after a decision is applied)."""
        return self.state.phase if self.state is not None else int(self._store_phase or 1)

    def before_optimizer_step(self) -> None:
        """Take the pre-step measurements now: for ``attach(..., manual_pre_step=True)``, call it after
        the step's last backward and before the update, where the optimizer's step pre-hook would
        run in a plain loop (inside ``optimizer.step(closure)`` that hook runs before the closure's
        forward and backward). Never raises into the loop."""
        self._before_step(self.optimizer, (), {})

    def epoch(self) -> None:
        """Declare an epoch start: the gap/smoothness aggregates reset (audit paper §2)."""
        if self.state is not None:
            self.state.epoch_start = True

    def loss(self, loss_fn: Any, output: Any, *targets: Any, **kwargs: Any) -> Any:
        """``loss = agent.loss(F.cross_entropy, model(x), y)``: returns ``loss_fn(output, *targets,
        **kwargs)``, the step's loss (backpropagate it as usual), and tells the agent how it was
        formed so that its replays form it the same way at other parameters: the one call a loop
        whose loss is a function of the model's output needs (``F.cross_entropy``, ``((out −
        y)**2).mean()``, anything). ``output`` is the model's output itself; form anything else
        inside ``loss_fn``. The function runs once here, as your own line would."""
        fn = functools.partial(loss_fn, **kwargs) if kwargs else loss_fn
        value = fn(output, *targets)
        self.failures.run("loss", self.capture.record_loss, fn, output, targets, value)
        return value

    def targets(self, *targets: Any) -> None:
        """With ``attach(..., loss_fn=...)``: tell the agent the targets of the latest forward call
        (``agent.loss(loss_fn, output, *targets)`` does both in one call)."""
        self.failures.run("loss", self.capture.set_targets, *targets)

    def log(self, values: Mapping[str, Any], step: Optional[int] = None) -> None:
        """Store your own scalar series next to moxco's: ``agent.log({"val_loss": 0.31, "accuracy":
        0.92})``. Names follow ``moxco.wire.check_metric_name`` and may not be a moxco metric's (the
        catalogue's); values are numbers or one-element tensors (read off the training thread, NaN
        and ±Inf kept). ``step`` (default ``agent.step``, the number of optimizer steps taken: the
        step whose parameters the values describe) is the x coordinate. The series are the run's
        ``user`` group (``moxco.catalogue.GROUPS``): stored, served and exported like the others.
        A bad name or value is a ``ValueError``/``TypeError`` here; nothing else raises."""
        checked = user_values(values)
        at = self.step if step is None else step
        if not isinstance(at, numbers.Integral) or isinstance(at, bool) or at < 0:
            raise ValueError(f"agent.log: step must be a non-negative integer, got {step!r}")
        if checked and not self._closed:
            self._submit(StepRecord(int(at), checked, user=True))

    def flush(self, timeout: float = 30.0) -> bool:
        """Store everything measured so far before returning (or put it in the spool on disk when
        the store is away); False when that did not finish within ``timeout`` seconds. For scripts,
        tests and checkpoints: the training loop never needs it."""
        if self.writer is None:
            return True
        try:
            return bool(self.writer.call(lambda: (self.writer._flush(), self.store.sync(timeout))[1], timeout))
        except Exception as exc:
            self._record_error("store", exc)
            return False

    def decisions(self) -> List[Decision]:
        """The run's decisions (``moxco.decision.Decision``, the same in embedded and HTTP mode),
        with their acknowledgements; read from the store now, on the caller's thread."""
        return self.store.decisions(self.run) if self.store is not None else []

    def close(self, status: str = "finished") -> None:
        """Remove the hooks, flush every queued point, mark the run ``status``."""
        if self._closed:
            return
        self._closed = True
        binding.release(self.optimizer, self)
        atexit.unregister(self._exit_hook)
        for handle in self._hooks:
            handle.remove()
        self.capture.remove()
        if self._bound:
            self.raw_gradient.remove()
        if self.writer is None:
            return
        last = self.free.final_update_norm(self.params, sharded=self.shards is not None) if self._bound else None
        if last:
            self._submit(StepRecord(self.state.step - 1, last))
        self._store_decision_stats(self.inbox.stats.to_dict())  # the waits' final counts
        self.writer.close()
        try:
            self.store.set_status(self.run, status)
        except Exception as exc:  # the store may be gone; closing must not raise into the job
            self._record_error("store", exc)
        if self._owns_store:
            try:  # the sinks flush (bounded by the HTTP sink's close_timeout) and leave the rest spooled
                self.store.close()
            except Exception as exc:
                self._record_error("store", exc)

    def __enter__(self) -> "Agent":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("failed" if exc_type is not None else "finished")

    # --- failures and cost ---------------------------------------------------------------------

    def _record_error(self, part: str, exc: BaseException) -> None:
        """A failure of ``part`` (``agent.failures``): its metrics dropped, logged once, stored."""
        self.failures.record(part, exc)

    def _store_errors(self, errors: Dict[str, str]) -> None:
        try:
            if self.writer is not None and self.writer.running:  # stored off the training thread
                self.writer.update_run({"errors": errors})
            elif self.store is not None:  # attach or close: not inside a step
                self.store.put_run(self.run, config={"errors": errors})
        except Exception:
            pass

    def dropped(self) -> Dict[str, str]:
        """Every metric a failure has dropped, with the failed part (a key of ``errors``)."""
        return self.failures.dropped()

    def overhead(self) -> Dict[str, float]:
        """Wall seconds the training thread has spent in each metric group since ``attach``:
        ``free`` (the every-step metrics, with the gradient records at the end of each backward),
        ``reeval`` (replays at ``x_{t−1}``), ``reference`` (replays at ``x*``), ``probe``,
        ``decision``; and ``copy`` when the free metrics are off (they advance the copy of
        ``x_{t−1}`` to ``x_t`` themselves, else it is one copy). What the hooks spend around them
        (handing the step to the writer thread) and the writer thread's own time are not in it.
        Under a device's asynchronous execution these are launch times, not kernel times."""
        spent = {k: v for k, v in self.failures.spent.items() if k != "unbound"}
        spent["free"] = spent.get("free", 0.0) + (self.raw_gradient.spent if self._bound else 0.0)
        return spent


_D = AgentOptions  # the options' defaults, in one place


def attach(model: nn.Module, optimizer: torch.optim.Optimizer, *, url: Optional[str] = _D.url,
           run: Optional[str] = _D.run, reeval_every: int = _D.reeval_every, probe_every: int = _D.probe_every,
           reference: Any = _D.reference, random_scaling: bool = _D.random_scaling, criterion: Any = _D.criterion,
           loss_fn: Any = _D.loss_fn, sharpness_iters: int = _D.sharpness_iters,
           sharpness_refine: Optional[float] = _D.sharpness_refine,
           sharpness_hvp: str = _D.sharpness_hvp, sharpness_precond: Optional[bool] = _D.sharpness_precond,
           hessian_trace: Any = _D.hessian_trace, probe_data: Any = _D.probe_data,
           probe_batches: int = _D.probe_batches, goodness: Any = _D.goodness,
           policy: Any = _D.policy, on_decision: Any = _D.on_decision, decisions: Optional[str] = _D.decisions,
           decision_timeout: float = _D.decision_timeout, track_distance: bool = _D.track_distance,
           start_step: Optional[int] = _D.start_step, seed: Optional[int] = _D.seed, config: Any = _D.config,
           scaler: Any = _D.scaler, store: Any = _D.store, token: Optional[str] = _D.token,
           transport: Any = _D.transport, manual_pre_step: bool = _D.manual_pre_step, resume: Any = _D.resume,
           **unknown: Any) -> Agent:
    """Attach the moxco agent to a training loop: ``agent = moxco.agent.attach(model, opt)``.

    Where it stores:

    * ``url``: ``sqlite:///path.db`` or ``postgresql://…`` (the embedded store), or
      ``http(s)://host:port`` (a collector, ``moxco serve``). Default ``$MOXCO_URL``, else
      ``sqlite:///moxco.db`` in the working directory.
    * ``run``: the run's name. Default a readable generated one (``adjective-noun-date-time``). A name
      a run has already starts a new run named ``name-2`` (said once) unless ``resume``.
    * ``resume`` (False): ``True`` continues the run of that name (or starts it); ``"must"``
      continues it and fails (``NotFoundError``) when there is none. Restore the agent's own state
      with ``agent.load_state_dict(checkpoint)`` (the integrations do it with the trainer's
      checkpoints); without one the run continues from what its series give (docs/agent.md).
    * ``token``: the collector's ``ingest`` token over HTTP. Default ``$MOXCO_TOKEN``.
    * ``transport``: HTTP transport settings (``spool_dir``, ``spool_max_bytes``, ``timeout``, …;
      docs/agent.md).
    * ``store``: an open store to write to instead of ``url`` (the caller closes it).
    * ``config``: a mapping stored with the run (its hyper-parameters, dataset, …).

    What it measures, and when:

    * ``reeval_every`` (10): steps between replays of the batch at ``x_{t−1}`` (``loss_diff``,
      ``inst_gap``, ``inst_smooth``); 0 = off.
    * ``probe_every`` (100): steps between probes (``sharpness``, goodness, ``convexity_ratio``,
      the optimizer's state); 0 = off.
    * ``probe_data`` (None): the probe set, on which ``F``, ``∇F`` (``convexity_ratio``), the
      curvature and goodness's inputs are evaluated: one batch (a tensor, mapping or tuple), or an
      iterable of batches (a DataLoader) from which ``probe_batches`` (4) are drawn once, at attach.
      None: the step's own batch.
    * ``reference`` (None): ``x*``, a state_dict or checkpoint path: ``inst_gap_ref``,
      ``inst_smooth_ref``, ``convexity_ratio``.
    * ``track_distance`` (True): keep ``x_0`` for ``distance`` (one parameter copy).
    * ``sharpness_iters`` (1): Hessian-vector products per probe for each tracked eigenvalue (the
      first probe runs a Lanczos until converged, at most 20).
    * ``sharpness_refine`` (0.05): with one product a probe, the relative residual ``‖Hv − ρv‖/|ρ|``
      of the estimate above which the probe continues as Lanczos until its estimate moves by ≤ 1e-3
      (the error of a one-product estimate is about ``(‖Hv − ρv‖/ρ)²``); None: one product always.
    * ``sharpness_hvp`` ("auto"): ``"autograd"`` (double backward), ``"finite_difference"`` (two
      gradient replays); "auto" uses finite differences under FSDP, and from the first probe on which
      autograd reports that the model cannot be differentiated twice (fused kernels).
    * ``sharpness_precond`` (None: on for Adam and AdamW, and MoXCo over them): ``sharpness_precond``
      = ``λ_max(P⁻¹H)`` with ``P`` from the optimizer's ``exp_avg_sq``, and ``sharpness_precond_target``.
    * ``hessian_trace`` (False): ``hessian_trace`` by Hutchinson, True = 10 samples per probe, or a number.
    * ``start_step`` (0; a run resumed without a checkpoint: after its last stored step): the step
      number of the first step.
    * ``seed`` (random): the agent's own random numbers (the curvature's start vectors and Hutchinson
      signs, the probe set's dropout masks, random scaling).

    How to find the loss, and the gradient:

    * ``criterion``: the ``nn.Module`` loss of a ``criterion(model(x), y)`` loop.
    * ``loss_fn``: ``loss_fn(output, *targets)`` when the loss is formed differently; with a plain
      function loss, tell the targets with ``agent.targets(y)`` after the forward, or form the
      loss with ``loss = agent.loss(F.cross_entropy, model(x), y)`` (no ``loss_fn`` needed).
    * ``scaler``: the AMP ``GradScaler``, so that its scale is removed from ``g_t``.
    * ``manual_pre_step`` (False): for ``optimizer.step(closure)`` loops, call
      ``agent.before_optimizer_step()`` after the last backward instead of the step pre-hook.

    What it changes (only when asked):

    * ``random_scaling`` (False): scale every update by ``s_t ~ Exp(1)`` (audit paper §4.3).
    * ``goodness``: ``{"tau", "sharpness_target", "k", "loss_target", "form", "sharpness"}``
      (``GoodnessSettings``; ``"sharpness": "precond"`` scores the preconditioned pair, for Adam-family runs).
    * ``policy``: ``{"threshold", "consecutive", "min_step", "cooldown", "max_decisions", "lag",
      "action"}`` (``moxco.policy.PolicyConfig``): when to tell the optimizer to switch phase; a
      decision fired by the probe of step ``s`` is applied at the boundary ``s + 1 + lag``.
    * ``on_decision``: called with each ``Decision`` when the optimizer has no ``commit()`` (phase
      2) or ``explore()`` (phase 1).
    * ``decisions``: ``"sync"`` (the default in embedded mode) applies each decision exactly at the
      step its configuration fixes, the step waiting there for the policy's answer when it has not
      come yet (at most ``decision_timeout`` seconds, 5); ``"async"`` (the default over HTTP) never
      waits and applies a decision at the first boundary after it arrives.

    Every value is checked here (``AgentOptions``): a bad one is a ``ValueError`` that names it, an
    unknown keyword a ``TypeError`` that names it and the closest option; a second agent on the same
    optimizer is a ``RuntimeError``. Nothing else raises: a store that cannot be reached or written
    is spooled to (one warning), parameters that do not exist yet are measured once they do.
    """
    check_names(unknown)
    given = locals()
    return Agent(model, optimizer, AgentOptions(**{name: given[name] for name in OPTION_NAMES}))
