"""Which parameters the agent measures: the optimizer's, named through the model, and when they exist.

The agent measures the parameters the optimizer updates, in the optimizer's order, named as the
model names them (the replays substitute them by name). Parameters of lazy modules (``LazyLinear``)
do not exist before the model's first forward: the agent binds to them at the end of that forward,
before the first backward, and measures from the first step. A parameter group added later
(``optimizer.add_param_group``) is picked up at the next forward (or step): its parameters' current
values are their ``x_{t−1}`` (the optimizer did not move them) and their ``x_0``.

One optimizer has at most one live agent (``claim``): a second ``attach`` on it is refused, since two
agents would each take the step's measurements and the second would replay with the first's hooks in
place.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, List, Tuple

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from moxco import native, tensors
from moxco.agent.distributed import unwrap
from moxco.agent.gradients import RawGradient
from moxco.agent.groups.free import FreeMetrics
from moxco.agent.groups.probe import Probe
from moxco.agent.groups.reeval import Reevaluation
from moxco.agent.groups.reference import Reference, load_reference
from moxco.agent.probe_set import ProbeSet
from moxco.agent.replays import Replays
from moxco.agent.sharded import ShardedParams, ShardedRawGradient, uses_fsdp1, uses_fsdp2
from moxco.agent.step import StepState, grad_of

log = logging.getLogger("moxco.agent")

_LIVE: "weakref.WeakKeyDictionary[Any, weakref.ref]" = weakref.WeakKeyDictionary()


def optimizer_params(model: nn.Module, optimizer: torch.optim.Optimizer) -> Tuple[List[torch.Tensor], List[str]]:
    """The optimizer's parameters in its order and their names in ``model``; ``ValueError`` when the
    optimizer holds a parameter that is not the model's (a programming error of the caller)."""
    names = {id(p): n for n, p in unwrap(model).named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    unknown = [i for i, p in enumerate(params) if id(p) not in names]
    if unknown:
        raise ValueError("the optimizer holds parameters that are not the model's (first at position "
                         f"{unknown[0]}); attach the model whose parameters the optimizer updates")
    return params, [names[id(p)] for p in params]


def param_count(optimizer: torch.optim.Optimizer) -> int:
    """How many parameters the optimizer holds (one ``len`` per group: cheap enough for every step)."""
    return sum(len(group["params"]) for group in optimizer.param_groups)


def any_lazy(params: List[torch.Tensor]) -> bool:
    """Whether some parameter is not materialised yet (a lazy module before its first forward)."""
    return any(is_lazy(p) for p in params)


def claim(optimizer: Any, agent: Any) -> None:
    """Record ``agent`` as ``optimizer``'s live agent; ``RuntimeError`` when it has one already."""
    ref = _LIVE.get(optimizer)
    other = ref() if ref is not None else None
    if other is not None and not getattr(other, "_closed", True):
        raise RuntimeError(f"this optimizer already has a moxco agent attached (run {other.run!r}); use that agent, "
                           "or close it (agent.close()) before attaching another")
    _LIVE[optimizer] = weakref.ref(agent)


def release(optimizer: Any, agent: Any) -> None:
    """``optimizer`` has no live agent any more (``agent`` closed)."""
    ref = _LIVE.get(optimizer)
    if ref is not None and ref() in (agent, None):
        del _LIVE[optimizer]


class Bindable:
    """The agent's binding to the optimizer's parameters (a mixin of ``agent.core.Agent``): builds
    what depends on them (the copies, the gradient records, the metric groups) once they exist, at
    the end of the first forward for lazy ones, and picks up parameters added later."""

    def _bind(self) -> bool:
        """Build what depends on the parameters (the copies, the gradient records, the metric
        groups), once they exist; False while some are not initialised."""
        o = self.options
        params, names = optimizer_params(self.model, self.optimizer)
        if any_lazy(params):
            return False
        self.names, self._n_params = names, len(params)
        # FSDP: the agent works on the local shards and sums partial sums over ranks (agent.sharded)
        self.shards = (ShardedParams(self.model, params, names, self.group)
                       if uses_fsdp2(self.model) or uses_fsdp1(self.model) else None)
        self._reduce = self.shards.reduce if self.shards is not None else None
        self.params = self.shards.local() if self.shards is not None else params
        self._read_grad = self.shards.grads if self.shards is not None else lambda: grad_of(self.params)
        # the fused CPU reductions are built (once per machine, ~0.3 s) here, not in the first step
        if any(p.device.type == "cpu" for p in self.params):
            native.warm()
        self.raw_gradient = (ShardedRawGradient(self.shards, o.scaler) if self.shards is not None
                             else RawGradient(self.params, o.scaler))
        self.state = StepState(self._start_step + self._unmeasured, self._generator,
                               tensors.copy_params(self.params) if o.track_distance else None)
        if self._store_phase is not None:
            self.state.phase = int(self._store_phase)
        reference = None if o.reference is None else load_reference(o.reference, self.names, self.params, self.shards)
        if self.probe_set is None and o.probe_data is not None:  # the fixed probe batches, drawn once
            self.probe_set = ProbeSet.build(o.probe_data, batches=o.probe_batches,
                                            with_targets=o.criterion is not None or o.loss_fn is not None,
                                            device=self.params[0].device if self.params else None, seed=self._seed)
        self.replays = Replays(self.capture, self.names, self.group, self.shards, self.failures)
        self.free = FreeMetrics(self.failures, self.state, self.capture, self.raw_gradient, self.group,
                                random_scaling=o.random_scaling, optimizer=self.optimizer)
        self.reeval = Reevaluation(o.reeval_every, self.failures, self.state, self.replays)
        self.reference = Reference(reference, o.reeval_every, self.failures, self.replays)
        self.probe = Probe(o, self.failures, self.state, self.replays, self.optimizer, self.params, seed=self._seed,
                           reference=reference, probe_set=self.probe_set)
        if self.writer is not None:  # bound after the run was opened (lazy parameters)
            self.probe.on_config = self.writer.update_run  # (stored off the training thread)
            self.writer.update_run(self.probe.describe())
        self._sharpness_target = self.probe.sharpness_target
        self._bound = True
        if o.probe_every:
            for part, exc in self.probe.pending_errors:  # a curvature option this run cannot honour
                self._record_error(part, exc)  # (stored with the run once it is open)
        if self._pending_state is not None:
            pending, self._pending_state = self._pending_state, None
            self.load_state_dict(pending)
        return True

    def _rebind(self) -> None:
        """The optimizer's parameters changed since the binding (``add_param_group``)."""
        if self.shards is not None:
            raise RuntimeError("parameters added to the optimizer after attach are not measured under FSDP")
        params, names = optimizer_params(self.model, self.optimizer)
        if any_lazy(params):
            return
        old, step = self.params, self.state.step
        if len(params) > len(old) and all(a is b for a, b in zip(params, old)):
            self.state.extend(params[len(old):])
            what = f"{len(params) - len(old)} parameters added to the optimizer are measured from step {step} on"
        else:
            self.state.restart(params)
            what = f"the optimizer's parameters changed: distance and the update metrics start over at step {step}"
        self.params, self.names, self._n_params = params, names, len(params)
        self.replays.names = list(names)
        self.raw_gradient.remove()
        self.raw_gradient = self.free.raw_gradient = RawGradient(params, self.options.scaler)
        self.probe.rebind(params)
        if self.reference.point is not None:
            self.reference.point = self.probe.reference = load_reference(self.options.reference, names, params, None)
        log.warning("moxco: run %r: %s", self.run, what)

    def _before_forward(self, module, args) -> None:
        if (self._bound and not self._closed and not self.capture.replaying
                and param_count(self.optimizer) != self._n_params):
            self.failures.run("params", self._rebind)

    def _after_forward(self, module, args, output) -> None:
        if not self._bound and not self._closed:
            self.failures.run("params", self._bind)
