"""``attach(model, optimizer)``: what the agent hooks, what it keeps, what it computes when.

Hooks (all removable, none on the user's tensors):

* model forward pre/post hooks: record this step's forward calls (``capture.StepCapture``);
* optimizer step pre-hook, at ``x_t`` with ``g_t`` in ``.grad``:
  - free metrics every step: ``loss``, ``grad_norm_sq``, ``distance``, ``update_corr``,
    ``update_corr_rs`` (dot products with the one parameter copy the agent keeps, ``x_{t−1}``);
  - every ``reeval_every`` steps: the batch replayed at ``x_{t−1}`` (``loss_diff``, ``inst_gap``,
    ``inst_smooth``) and, with a reference, at ``x*`` (``inst_gap_ref``, ``inst_smooth_ref``);
  - every ``probe_every`` steps: ``sharpness`` (warm-started power iteration on the cached
    batch), the three-way split sums for the denoised gradient norm, ``convexity_ratio``;
  - then ``x_{t−1} ← x_t`` (in place);
* optimizer step post-hook, at ``x_{t+1}``: random scaling ``x_{t+1} = x_t + s_t Δ_t`` if asked;
  a pending decision is applied here, at the step boundary. ``update_norm`` of step t is taken at
  the next pre-hook, in the same pass over ``x_{t+1} − x_t`` as ``update_corr`` (at ``close()`` for
  the last step).

Values leave the training thread as unread 0-dim tensors on a bounded queue
(``writer.MetricWriter``); the writer thread reads them, keeps the aggregates, the ALIGATOR
denoisers and goodness, and writes through the sink, whose store runs the decision policy. Every
piece of agent work runs under ``_guard``: an exception disables that metric group, is logged once
and stored with the run, and training goes on.
"""

from __future__ import annotations

import logging
import math
import os
import random
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from moxco import metrics, native, tensors
from moxco.catalogue import names as catalogue_names
from moxco.agent.capture import StepCapture
from moxco.agent.distributed import DataParallelGroup, unwrap
from moxco.agent.gradients import RawGradient
from moxco.agent.sink import EmbeddedSink
from moxco.agent.transport import open_sink
from moxco.agent.sharded import SHARPNESS_UNSUPPORTED, ShardedParams, ShardedRawGradient, uses_fsdp1, uses_fsdp2
from moxco.agent.writer import (FREE_SUMS, GRAD_RESCALE_RATIOS, GRADIENT_UNKNOWN, REPLAY_SUMS, GoodnessSettings,
                                MetricWriter, StepRecord)
from moxco.aligator import split_sums
from moxco.collector.store import Store
from moxco.goodness import eos_sharpness
from moxco.hessian import Sharpness
from moxco.decision import Decision
from moxco.policy import PolicyConfig

log = logging.getLogger("moxco.agent")

GROUPS = ("free", "reeval", "reference", "probe", "writer", "store", "decision", "capture")
ADJECTIVES = ("brisk", "calm", "deft", "eager", "fleet", "keen", "lucid", "nimble", "quiet", "steady", "swift", "vivid")
NOUNS = ("basin", "cliff", "delta", "fjord", "glade", "mesa", "ridge", "saddle", "slope", "valley", "vale", "summit")


def default_run_name() -> str:
    """A readable, unique-enough run name: ``adjective-noun-YYYYmmdd-HHMMSS``."""
    rng = random.Random()
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}-{time.strftime('%Y%m%d-%H%M%S')}"


def default_url() -> str:
    return os.environ.get("MOXCO_URL") or f"sqlite:///{Path.cwd() / 'moxco.db'}"


def _load_reference(reference: Any, named: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """``x*`` from a state_dict or a checkpoint path, as detached copies matching ``named``."""
    if isinstance(reference, (str, os.PathLike)):
        reference = torch.load(reference, map_location="cpu", weights_only=True)
        if isinstance(reference, Mapping) and "model" in reference and isinstance(reference["model"], Mapping):
            reference = reference["model"]
    if not isinstance(reference, Mapping):
        raise TypeError(f"reference must be a state_dict or a checkpoint path, got {type(reference).__name__}")
    missing = [n for n in named if n not in reference]
    if missing:
        raise ValueError(f"reference is missing parameters {missing[:5]}{' …' if len(missing) > 5 else ''}")
    out = {}
    for name, p in named.items():
        ref = reference[name]
        if ref.shape != p.shape:
            raise ValueError(f"reference parameter {name!r} has shape {tuple(ref.shape)}, the model {tuple(p.shape)}")
        out[name] = ref.detach().to(device=p.device, dtype=p.dtype).clone()
    return out


class Agent:
    """The attached agent. Use ``attach(...)`` to create one; ``close()`` (or ``with``) flushes."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, url: Optional[str] = None,
                 run: Optional[str] = None, reeval_every: int = 10, probe_every: int = 100,
                 reference: Any = None, random_scaling: bool = False, criterion: Optional[nn.Module] = None,
                 loss_fn: Optional[Callable[..., Tensor]] = None, sharpness_iters: int = 1,
                 goodness: Optional[GoodnessSettings | Mapping[str, Any]] = None,
                 policy: Optional[PolicyConfig | Mapping[str, Any]] = None,
                 on_decision: Optional[Callable[[Decision], Any]] = None, track_distance: bool = True,
                 start_step: int = 0, seed: Optional[int] = None, config: Optional[Mapping[str, Any]] = None,
                 scaler: Any = None, store: Optional[Store] = None, token: Optional[str] = None,
                 transport: Optional[Mapping[str, Any]] = None, manual_pre_step: bool = False) -> None:
        for name, value in (("reeval_every", reeval_every), ("probe_every", probe_every), ("start_step", start_step)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if not isinstance(sharpness_iters, int) or sharpness_iters < 1:
            raise ValueError(f"sharpness_iters must be a positive integer, got {sharpness_iters!r}")
        self.model, self.optimizer = model, optimizer
        self.reeval_every, self.probe_every = reeval_every, probe_every
        self.random_scaling = bool(random_scaling)
        self.on_decision = on_decision
        self.step = start_step
        self.group = DataParallelGroup()
        # every rank must agree on the run name and on the agent's random numbers
        self.run = self.group.broadcast(run or default_run_name())
        seed = self.group.broadcast(seed if seed is not None else random.randrange(2**62))
        self.errors: Dict[str, str] = {}
        self._closed = False
        # seconds the training thread spent in each metric group (overhead()); summed in _guard
        self._spent: Dict[str, float] = {}

        # parameters in the optimizer's order, named through the model (for functional replays)
        names = {id(p): n for n, p in unwrap(model).named_parameters()}
        self.params: List[Tensor] = [p for group in optimizer.param_groups for p in group["params"]]
        unknown = [i for i, p in enumerate(self.params) if id(p) not in names]
        if unknown:
            raise ValueError("the optimizer holds parameters that are not the model's (first at position "
                             f"{unknown[0]}); attach the model whose parameters the optimizer updates")
        self.names = [names[id(p)] for p in self.params]
        # FSDP: the agent works on the local shards and sums partial sums over ranks (agent.sharded)
        self.shards = (ShardedParams(model, self.params, self.names, self.group)
                       if uses_fsdp2(model) or uses_fsdp1(model) else None)
        self._reduce = self.shards.reduce if self.shards is not None else None
        if self.shards is not None:
            self.params = self.shards.local()

        # the fused CPU reductions are built (once per machine, ~0.3 s) here, not in the first step
        if any(p.device.type == "cpu" for p in self.params):
            native.warm()
        self.capture = StepCapture(model, criterion=criterion, loss_fn=loss_fn)
        self.raw_gradient = (ShardedRawGradient(self.shards, scaler) if self.shards is not None
                             else RawGradient(self.params, scaler))
        self._step_grads: Optional[List[Tensor]] = None
        self._grad_scale: Optional[Tensor] = None  # g_t = _grad_scale · .grad this step (None: 1)
        self._free: Optional[metrics.FreeSums] = None  # this step's, while the pre-step hook runs
        self._versions_after_step: Optional[List[int]] = None  # see _after_step_metrics
        self._prev: Optional[List[Tensor]] = None  # x_{t−1} (the one copy free metrics need)
        self._prev_advanced = False  # whether this step's free metrics have made _prev x_t
        self._prev_is_previous = True  # whether _prev is still x_{t−1} after the free metrics ran
        self._x0: Optional[List[Tensor]] = tensors.copy_params(self.params) if track_distance else None
        self._scale = 1.0  # s_{t−1}
        self._reference = None
        if reference is not None:
            owners = self.shards.owners if self.shards is not None else self.params
            ref = _load_reference(reference, dict(zip(self.names, owners)))
            self._reference = self.shards.shard_full(ref) if self.shards is not None else [ref[n] for n in self.names]
        self._generator = torch.Generator().manual_seed(seed)
        # the agent draws its random numbers from its own generator: the user's RNG stream is untouched
        hvp_params = self.shards.owners if self.shards is not None else self.params  # (no HVPs under FSDP)
        self._sharpness = Sharpness(hvp_params, iters_per_call=sharpness_iters, cold_iters=max(sharpness_iters, 20),
                                    generator=self._generator, hv_mean=self.group.mean if self.group.active else None)
        self._incoming: List[tuple[str, Decision]] = []  # from the writer or sender thread (rank 0)
        self._applied: set[str] = set()  # decision ids applied: delivery is at-least-once
        self._pending: Optional[tuple[str, Decision]] = None  # to apply at the next step boundary
        self._pending_lock = threading.Lock()
        self._epoch_start = False
        self.phase = 1
        self._phase_recorded: Optional[tuple[int, int]] = None  # (step, phase) of the last phase point

        goodness_settings = goodness if isinstance(goodness, GoodnessSettings) else GoodnessSettings(**dict(goodness or {}))
        policy_config = policy if isinstance(policy, PolicyConfig) else (PolicyConfig(**dict(policy)) if policy else PolicyConfig())
        self.goodness_settings = goodness_settings
        self.store = None
        self._owns_store = store is None
        self.writer: Optional[MetricWriter] = None
        if self.group.is_writer:  # one writer per job: rank 0
            self._open_writer(store, url, optimizer, reeval_every, probe_every, reference, start_step,
                              goodness_settings, policy_config, config, token, transport)
        # manual_pre_step: the loop calls before_optimizer_step() itself, for optimizers stepped with
        # a closure that runs forward and backward inside step() (Lightning, LBFGS-style loops)
        self._hooks = [] if manual_pre_step else [optimizer.register_step_pre_hook(self._before_step)]
        self._hooks.append(optimizer.register_step_post_hook(self._after_step))
        if self.shards is not None and probe_every:
            self._record_error("sharpness", RuntimeError(SHARPNESS_UNSUPPORTED))  # once, stored with the run

    def before_optimizer_step(self) -> None:
        """Take the pre-step measurements now: for ``attach(..., manual_pre_step=True)``, call it after
        the step's last backward and before the update, where the optimizer's step pre-hook would
        run in a plain loop (inside ``optimizer.step(closure)`` that hook runs before the closure's
        forward and backward). Never raises into the loop."""
        try:
            self._before_step(self.optimizer, (), {})
        except Exception as exc:  # _before_step guards its groups; this is the last line of defence
            self._record_error("capture", exc)

    def _open_writer(self, store, url, optimizer, reeval_every, probe_every, reference, start_step,
                     goodness_settings, policy_config, config, token=None, transport=None) -> None:
        # an http(s):// URL gives the HTTP transport (agent.transport), anything else the embedded
        # store (agent.sink); both register the run with its policy, and the store's ingest decides
        if store is not None:
            self.store = EmbeddedSink(store, on_decision=self._receive_decision, owns_store=False)
        else:
            self.store = open_sink(url or default_url(), self.run, token=token, on_decision=self._receive_decision,
                                   **dict(transport or {}))
        hyperparameters = {k: v for k, v in optimizer.defaults.items() if isinstance(v, (int, float, str, bool))}
        self.store.put_run(self.run, config={
            "optimizer": type(optimizer).__name__, "hyperparameters": hyperparameters,
            "reeval_every": reeval_every, "probe_every": probe_every, "random_scaling": self.random_scaling,
            "reference": reference is not None, "start_step": start_step,
            "goodness": goodness_settings.__dict__, "policy": policy_config.to_dict(),
            "world_size": self.group.world, **dict(config or {}),
        }, optimizer={"class": type(optimizer).__name__, **hyperparameters}, policy=policy_config.to_dict(),
            status="running")
        self.writer = MetricWriter(self.store, self.run, goodness_settings=goodness_settings,
                                   sharpness_target=self._sharpness_target, on_error=self._record_error)

    # --- user-facing ---------------------------------------------------------------------------

    def epoch(self) -> None:
        """Declare an epoch start: the gap/smoothness aggregates reset (audit paper §2)."""
        self._epoch_start = True

    def targets(self, *targets: Any) -> None:
        """For plain-function losses: tell the agent the targets of the latest forward call."""
        self._guard("capture", self.capture.set_targets, *targets)

    def decisions(self) -> List[Decision]:
        """The run's decisions (``moxco.decision.Decision``, the same in embedded and HTTP mode),
        with their acknowledgements; read from the store now, on the caller's thread."""
        return self.store.decisions(self.run) if self.store is not None else []

    def _submit(self, record: StepRecord) -> None:
        if self.writer is not None:
            self.writer.submit(record)

    def close(self, status: str = "finished") -> None:
        """Remove the hooks, flush every queued point, mark the run ``status``."""
        if self._closed:
            return
        self._closed = True
        for handle in self._hooks:
            handle.remove()
        self.capture.remove()
        self.raw_gradient.remove()
        if self.writer is None:
            return
        if "free" not in self.errors:
            self._guard("free", self._final_update_norm)
        self.writer.close()
        try:
            self.store.set_status(self.run, status)
        except Exception as exc:  # the store may be gone; closing must not raise into the job
            self._record_error("store", exc)
        if self._owns_store:
            try:  # the HTTP sink flushes (bounded by its close_timeout) and leaves the rest spooled
                self.store.close()
            except Exception as exc:
                self._record_error("store", exc)

    def __enter__(self) -> "Agent":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("failed" if exc_type is not None else "finished")

    # --- failure isolation ---------------------------------------------------------------------

    def _record_error(self, group: str, exc: BaseException) -> None:
        if group in self.errors:
            return
        self.errors[group] = message = error_summary(exc)
        log.warning("moxco: %s metrics disabled for run %r after an error: %s\n%s", group, self.run, message,
                    "".join(traceback.format_exception(exc)[-3:]))
        try:
            if self.writer is not None and self.writer.running:  # stored off the training thread
                self.writer.update_run({"errors": dict(self.errors)})
            elif self.store is not None:  # attach or close: not inside a step
                self.store.put_run(self.run, config={"errors": dict(self.errors)})
        except Exception:
            pass

    def _guard(self, group: str, fn: Callable, *args, **kwargs):
        if group in self.errors:
            return None
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            self._record_error(group, exc)
            return None
        finally:
            self._spent[group] = self._spent.get(group, 0.0) + (time.perf_counter() - start)

    def overhead(self) -> Dict[str, float]:
        """Wall seconds the training thread has spent in each metric group since ``attach``:
        ``free`` (the every-step metrics, with the gradient norms recorded at the end of each
        backward), ``reeval`` (replays at ``x_{t−1}``: ``loss_diff``,
        ``inst_gap``, ``inst_smooth``), ``reference`` (replays at ``x*``), ``probe`` (sharpness,
        goodness), ``decision``; and ``copy`` when the free metrics are off (they advance the copy
        of ``x_{t−1}`` to ``x_t`` themselves, else it is one copy). What the hooks spend around them
        (handing the step to the writer thread) and the writer thread's own time are not in it.
        Under a device's asynchronous execution these are launch times, not kernel times."""
        spent = dict(self._spent)
        spent["free"] = spent.get("free", 0.0) + self.raw_gradient.spent
        return spent

    def _due(self, every: int) -> bool:
        return every > 0 and self.step % every == 0

    def _reeval_due(self) -> bool:
        return (self._prev is not None and self._due(self.reeval_every) and "reeval" not in self.errors
                and self.capture.has_batch())

    # --- the step ------------------------------------------------------------------------------

    def _grads(self) -> List[Tensor]:
        """``.grad`` as the user left it at ``optimizer.step()``: ``g_t = _grad_scale · _grads()``
        (DESIGN §2: the AMP scale removed, before clipping), passed to ``moxco.metrics`` as
        ``grad_scale`` so that ``g_t`` is never materialised."""
        if self._step_grads is None and self.shards is not None:
            self._step_grads = self.shards.grads()
        if self._step_grads is None:
            grads = [p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in self.params]
            self._step_grads = grads
        return self._step_grads

    def _recover_raw_gradient(self, values: Dict[str, Any]) -> None:
        self.raw_gradient.check()
        modified = self.raw_gradient.modified()
        known = not modified or self.raw_gradient.has_norms()
        # while .grad is left as autograd wrote it, ‖g_t‖² comes from the free metrics' own pass
        self.raw_gradient.step_seen(modified)
        if not modified:
            return
        if not known:  # the first change to .grad, after steps that made none: this step's g_t is unknown
            values[GRADIENT_UNKNOWN] = ("the loop began changing .grad after backward (clipping or scaling) at this "
                                        "step, and the norms that undo it were not recorded for it; they are from the "
                                        "next backward on")
            return
        m, ratios = self.raw_gradient.multiplier()
        # the user rescaled .grad in place (clipping, AMP): the sums over it are rescaled instead
        self._grad_scale = m
        values[GRAD_RESCALE_RATIOS] = ratios

    def _before_step(self, optimizer, args, kwargs) -> None:
        if self._closed:
            return
        values: Dict[str, Any] = {}
        probe: Optional[Dict[str, Any]] = None
        self._step_grads = None
        self._grad_scale = None
        if self.shards is not None:
            self.params = self.shards.local()  # FSDP's lazy init may replace the shard tensors
        with torch.no_grad():
            self._guard("free", self._recover_raw_gradient, values)
        # the replay at x_{t−1} comes first: the free metrics then advance the copy x_{t−1} to x_t
        # in place, and the re-evaluation's formulas take their products from the free metrics.
        # The raw gradient's norms are read before it: an FSDP replay's backward records its own
        raw_norms_sq = self._guard("free", self.raw_gradient.raw_norms_sq)
        replay = self._guard("reeval", self._replay_difference, self._prev, "reeval") if self._reeval_due() else None
        # the free metrics overwrite x_{t−1} with x_t when they run, also when they fail part way
        self._prev_is_previous = "free" in self.errors or self._prev is None
        self._prev_advanced = False
        with torch.no_grad():
            self._guard("free", self._free_metrics, values, raw_norms_sq)
        if replay is not None:
            self._guard("reeval", self._reeval, values, *replay)
        self._free = None
        if self._reference is not None and self._due(self.reeval_every) and self.capture.has_batch():
            self._guard("reference", self._reeval_reference, values)
        if self._due(self.probe_every) and self.capture.has_batch():
            probe = {}
            self._guard("probe", self._probe, probe, values)
        if self.group.active and self._due(self.probe_every):
            # decisions come from rank 0's policy; every rank applies them at the same step boundary
            self._guard("decision", self._share_decision)
        if not self._prev_advanced:
            self._guard("copy", self._advance_prev)
        record = StepRecord(self.step, values, epoch_start=self._epoch_start, probe=probe)
        self._epoch_start = False
        self._step_grads = None
        self._grad_scale = None
        self.raw_gradient.clear()
        self._submit(record)

    @torch.no_grad()
    def _advance_prev(self) -> None:
        """``x_{t−1} ← x_t`` where the free metrics did not do it in passing (first step, free off)."""
        if self._prev is None or [p.shape for p in self._prev] != [p.shape for p in self.params]:
            self._prev = tensors.copy_params(self.params)
        else:
            tensors.copy_(self._prev, self.params)
        self._prev_advanced = True

    def _free_metrics(self, values: Dict[str, Any], raw_norms_sq: Optional[Tensor]) -> None:
        values["loss"] = self._step_loss()
        # one float64 vector (one collective when sharded, one device read on the writer thread):
        # ‖g_t‖² from the norms recorded at the end of backward (no second read of .grad);
        # update_corr and the previous step's update_norm from one difference x_t − x_{t−1},
        # which the re-evaluation reuses (inst_gap's inner product is update_corr, inst_smooth's
        # denominator the step length); distance to x_0; and x_{t−1} ← x_t on the way, with the
        # copy as the scratch for the differences (tensors.step_sums(advance=True))
        self._free = metrics.free_sums(self._grads(), self.params, self._prev, self._x0,
                                       grad_norms_sq=raw_norms_sq, reduce=self._reduce, scale=self._scale,
                                       advance_prev=True, grad_scale=self._grad_scale)
        self._prev_advanced = self._prev is not None
        values[FREE_SUMS] = self._free

    def _step_loss(self) -> Tensor:
        """``f(x_t, z_t)`` over the global batch (the mean of the ranks' losses under DDP)."""
        local = self._local("free", self.capture.step_loss, lambda: torch.tensor(math.nan, dtype=torch.float64))
        return self.group.mean_scalar(local)

    def _named(self, tensors_: Sequence[Tensor]) -> Dict[str, Tensor]:
        return dict(zip(self.names, tensors_))

    def _local(self, group: str, compute: Callable[[], Any], fallback: Callable[[], Any]) -> Any:
        """Run a rank-local computation that precedes a collective.

        In one process an exception propagates to ``_guard`` (the group is disabled). Under DDP a
        rank must never skip a collective the others enter (they would wait forever), so a local
        failure is recorded and replaced by NaN values of the same shapes: every rank then stores
        NaN for that metric, visibly, and training goes on.
        """
        if not self.group.active:
            return compute()
        try:
            return compute()
        except Exception as exc:
            self._record_error(f"{group} (rank {self.group.rank})", exc)
            return fallback()

    def _rank_error(self, group: str) -> Callable[[BaseException], None]:
        """Records a rank-local failure whose collectives still run (the metric becomes NaN)."""
        return lambda exc: self._record_error(f"{group} (rank {self.group.rank})" if self.group.active else group, exc)

    def _nan_like_params(self) -> List[Tensor]:
        return [torch.full_like(p, math.nan) for p in self.params]

    def _replay_with_grad(self, point: Sequence[Tensor], group: str):
        if self.shards is not None:  # through the FSDP module; its reduce-scatter averages the gradient
            loss, grads = self.shards.replay(self.capture, self.capture.calls, point, with_grad=True,
                                             on_error=self._rank_error(group))
            return self.group.mean_scalar(loss), grads
        def compute():
            leaves = [t.detach().requires_grad_(True) for t in point]
            return self.capture.replay(self.capture.calls, self._named(leaves), with_grad=True, grad_wrt=leaves)

        nan = lambda: (torch.tensor(math.nan, dtype=torch.float64), self._nan_like_params())
        loss, grads = self._local(group, compute, nan)
        averaged = self.group.mean([loss.reshape(1), *grads])
        return averaged[0].reshape(()), averaged[1:]

    def _replay_difference(self, point: Sequence[Tensor], group: str) -> Tuple[Tensor, Tensor]:
        """The replay at ``y = point`` (``x_{t−1}`` or ``x*``): ``(f(y, z_t), this rank's
        ‖∇f(x_t, z_t) − ∇f(y, z_t)‖²)``, taken at once while the replay's gradient is still in
        cache: one fused read on the CPU (``moxco.native``), elsewhere formed in that gradient (the
        agent's own, overwritten)."""
        loss_ref, grad_ref = self._replay_with_grad(point, group)
        return loss_ref, tensors.dist_sq(self._grads(), grad_ref, overwrite_ys=True, x_scale=self._grad_scale)

    def _reeval(self, values: Dict[str, Any], loss_prev: Tensor, grad_diff_sq: Tensor) -> None:
        """``loss_diff``, ``inst_gap``, ``inst_smooth`` from the replay at ``x_{t−1}`` (run before
        the free metrics advanced the copy of ``x_{t−1}``) and the free metrics' products, as
        ``metrics.ReplaySums``: the formulas are applied on the writer thread."""
        loss = values["loss"] if "loss" in values else self._step_loss()
        replays = values.setdefault(REPLAY_SUMS, [])
        # (⟨g_t, x_t − x_{t−1}⟩, ‖x_t − x_{t−1}‖²) from this hook's free metrics, when they ran;
        # else from x_{t−1}, which is then still in place (the free metrics are off)
        free = self._free
        if free is not None and free.has_update:
            dot_step, step_sq = free.update_products()
        elif not self._prev_is_previous:  # the free metrics failed after overwriting x_{t−1}: loss_diff alone
            replays.append(metrics.replay_sums(loss, loss_prev))
            return
        else:
            dot_step = step_sq = None
        replays.append(metrics.replay_sums(loss, loss_prev, grad_diff_sq, self._grads(), self.params, self._prev,
                                           grad_dot_step=dot_step, step_sq=step_sq, reduce=self._reduce,
                                           grad_scale=self._grad_scale))

    def _reeval_reference(self, values: Dict[str, Any]) -> None:
        """``inst_gap_ref``, ``inst_smooth_ref`` from the replay at ``x*`` (``metrics.ReplaySums``)."""
        loss_ref, grad_diff_sq = self._replay_difference(self._reference, "reference")
        loss = values["loss"] if "loss" in values else self._step_loss()
        values.setdefault(REPLAY_SUMS, []).append(
            metrics.replay_sums(loss, loss_ref, grad_diff_sq, self._grads(), self.params, self._reference,
                                reference=True, reduce=self._reduce, grad_scale=self._grad_scale))

    def _probe(self, probe: Dict[str, Any], values: Dict[str, Any]) -> None:
        calls = list(self.capture.calls)
        current = self._named(self.params)

        def replay():
            self.capture.replaying = True
            try:
                return self.capture.replay_graph(calls, current)
            finally:
                self.capture.replaying = False

        def loss_fn():  # a NaN curvature on a failing rank turns every rank's HVP into NaN
            return self._local("probe", replay, lambda: sum((p.square() * math.nan).sum() for p in self.params))

        if self.shards is None:  # no double backward through FSDP (agent.sharded)
            probe["sharpness"] = torch.tensor(self._sharpness(loss_fn), dtype=torch.float64)
        thirds = self.capture.split_calls(calls, 3)
        if thirds is not None:
            split_grads = []
            for part in thirds:  # under DDP, the k-th thirds of all ranks form a third of the global batch
                if self.shards is not None:  # FSDP's reduce-scatter already averages over ranks
                    split_grads.append(self.shards.replay(self.capture, part, None, with_grad=True,
                                                          on_error=self._rank_error("probe"))[1])
                    continue
                _, grads = self._local(
                    "probe", lambda: self.capture.replay(part, current, with_grad=True, grad_wrt=self.params),
                    lambda: (None, self._nan_like_params()))
                split_grads.append(self.group.mean(grads))
            probe["split_sums"] = split_sums(*split_grads, reduce=self._reduce)
            probe["split_sizes"] = [self.capture.batch_size(part) * self.group.world for part in thirds]
        if self._reference is not None:
            # F and ∇F on the probe batch (the step's batch): F(x_t) and g_t are the step's own
            if self.shards is not None:
                loss_ref, _ = self.shards.replay(self.capture, calls, self._reference, with_grad=False,
                                                 on_error=self._rank_error("probe"))
            else:
                loss_ref, _ = self._local(
                    "probe", lambda: self.capture.replay(calls, self._named(self._reference), with_grad=False),
                    lambda: (torch.tensor(math.nan, dtype=torch.float64), None))
            # summed on the writer thread (ConvexityRatio there): no device read on this one
            probe["convexity_terms"] = metrics.convexity_terms(
                self._step_loss(), self.group.mean_scalar(loss_ref), self._grads(), self.params, self._reference,
                reduce=self._reduce, grad_scale=self._grad_scale)
        self._guard("optimizer", self._optimizer_state, values)
        values.update(self._phase_point())
        # λ_target read here, with the optimizer state of this step (the hypergradient changes lr
        # every step): the writer thread must not read the live optimizer
        target = self._sharpness_target()
        if target is not None:
            probe["sharpness_target"] = float(target)

    def _optimizer_state(self, values: Dict[str, Any]) -> None:
        """The optimizer's own state on the probe cadence, for the moxco.optim optimizers (their
        ``hyperparameters()``: phase, current α, β, lr, critical-momenta buffer statistics)."""
        describe = getattr(self.optimizer, "hyperparameters", None)
        if not callable(describe):
            return
        state = describe()
        for key in catalogue_names("optimizer"):
            value = state.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                values[key] = float(value)
        if state.get("phase") in (1, 2):
            self.phase = int(state["phase"])

    def _after_step(self, optimizer, args, kwargs) -> None:
        if self._closed:
            return
        values: Dict[str, Any] = {}
        with torch.no_grad():
            self._guard("free", self._after_step_metrics, values)
        if values:
            self._submit(StepRecord(self.step, values))
        self.capture.clear()
        self.step += 1
        self._guard("decision", self._apply_pending_decision)

    def _after_step_metrics(self, values: Dict[str, Any]) -> None:
        if self._prev is None:
            return
        if self.random_scaling:
            # x_{t+1} = x_t + s_t Δ_t, s_t ~ Exp(1): lerp from the proposed point towards x_t by 1 − s_t
            self._scale = float(torch.empty(()).exponential_(1.0, generator=self._generator))
            torch._foreach_lerp_(self.params, self._prev, 1.0 - self._scale)
        # update_norm = ‖x_{t+1} − x_t‖ is taken at the next step's pre-hook, in the same pass as
        # update_corr; the version counters let close() tell whether x_{t+1} is still in place
        self._versions_after_step = [p._version for p in self.params]

    def _final_update_norm(self) -> None:
        """The last step's ``update_norm`` (no next pre-hook takes it), if the parameters are still
        ``x_{t+1}``; never under FSDP, where it would be a collective that other ranks may not join."""
        if (self._prev is None or self._versions_after_step is None or self._reduce is not None
                or [p._version for p in self.params] != self._versions_after_step):
            return
        with torch.no_grad():
            self._submit(StepRecord(self.step - 1, {"update_norm": metrics.distance(self.params, self._prev)}))

    # --- decisions -----------------------------------------------------------------------------

    def _sharpness_target(self) -> Optional[float]:
        """``λ_target``: the user's, else ``k · λ_EOS`` with the optimizer's own η, α, β (MoXCo
        Theorem 2): ``optimizer.eos_sharpness()`` for moxco.optim.MoXCo, else from param group 0
        (heavy-ball momentum as α)."""
        s = self.goodness_settings
        if s.sharpness_target is not None:
            return s.sharpness_target
        own = getattr(self.optimizer, "eos_sharpness", None)
        if callable(own):
            value = float(own())
            return s.k * value if math.isfinite(value) and value > 0 else None
        group = self.optimizer.param_groups[0]
        lr = group.get("lr")
        if not isinstance(lr, (int, float)) or lr <= 0:
            return None
        alpha = group.get("alpha", group.get("momentum", 0.0)) or 0.0
        beta = group.get("beta", 0.0) if isinstance(group.get("beta", 0.0), (int, float)) else 0.0
        try:
            return s.k * eos_sharpness(float(lr), float(alpha), float(beta))
        except ValueError:
            return None

    def _receive_decision(self, ident: str, decision: Decision) -> None:
        """Queue a decision for the next step boundary (a redelivered or applied id is ignored)."""
        with self._pending_lock:
            if ident not in self._applied and all(ident != queued for queued, _ in self._incoming):
                self._incoming.append((ident, decision))

    def _take_incoming(self) -> Optional[tuple[str, Decision]]:
        with self._pending_lock:
            return self._incoming.pop(0) if self._incoming else None

    def _share_decision(self) -> None:
        self._pending = self.group.broadcast(self._take_incoming())

    def _apply_pending_decision(self) -> None:
        if self.group.active:
            pending, self._pending = self._pending, None
        else:
            pending = self._take_incoming()
        if pending is None or pending[0] in self._applied:
            return
        ident, decision = pending
        action = dict(decision.action)
        commit = getattr(self.optimizer, "commit", None)
        if callable(commit):
            commit(**{k: v for k, v in action.items() if k != "phase"})
        elif self.on_decision is not None:
            self.on_decision(decision)
        else:
            log.warning("moxco: decision %s for run %r has no optimizer.commit and no on_decision callback; "
                        "it is recorded but not applied", ident, self.run)
            return
        self._applied.add(ident)
        if self.writer is not None:  # the store is written from the writer thread, never from the step
            self.writer.acknowledge(ident, self.step)
        self.phase = int(action.get("phase", 2))
        point = self._phase_point()
        if point:
            self._submit(StepRecord(self.step, point))

    def _phase_point(self) -> Dict[str, int]:
        """``{"phase": …}`` for the current step, or nothing when this step's phase is recorded
        already: a decision applied at the boundary before a probe step records the phase it set,
        and the probe must not send the same point again."""
        if self._phase_recorded == (self.step, self.phase):
            return {}
        self._phase_recorded = (self.step, self.phase)
        return {"phase": self.phase}


ERROR_SUMMARY_CHARS = 300


def error_summary(exc: BaseException) -> str:
    """``"Type: first line of the message"``, at most ``ERROR_SUMMARY_CHARS`` characters: what is
    stored with the run (``config["errors"]``) and shown by ``agent.errors``. PyTorch's dispatcher
    errors run to kilobytes (every backend listed); the log keeps the whole message once."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= ERROR_SUMMARY_CHARS else text[: ERROR_SUMMARY_CHARS - 1] + "…"


def attach(model: nn.Module, optimizer: torch.optim.Optimizer, **options: Any) -> Agent:
    """Attach the moxco agent to a training loop: ``moxco.agent.attach(model, opt)``.

    Options: ``url`` (default ``$MOXCO_URL``, else ``sqlite:///moxco.db`` in the working dir; an
    ``http(s)://`` URL sends to a collector through ``agent.transport.HttpSink``, with ``token``
    (default ``$MOXCO_TOKEN``) and ``transport`` options such as ``spool_dir``),
    ``run`` (default a generated readable name), ``reeval_every`` (10; 0 = off), ``probe_every``
    (100; 0 = off), ``reference`` (``x*``: state_dict or checkpoint path), ``random_scaling``
    (False), ``criterion`` / ``loss_fn`` (for a plain model + criterion loop), ``goodness``,
    ``policy``, ``on_decision``, ``sharpness_iters``, ``start_step``, ``seed``, ``config``,
    ``scaler`` (an AMP GradScaler, so its scale is removed from ``g_t``), ``track_distance`` (True),
    ``manual_pre_step`` (False: for ``optimizer.step(closure)`` loops, call
    ``agent.before_optimizer_step()`` after the last backward instead of the step pre-hook).
    """
    return Agent(model, optimizer, **options)
