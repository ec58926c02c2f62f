"""FSDP: the agent on parameter shards (``torch.distributed.fsdp.fully_shard``, "FSDP2").

Under ``fully_shard`` every parameter is a ``DTensor`` sharded on dim 0 over the data-parallel
ranks, and so is its ``.grad`` (FSDP reduce-scatters the gradient: each rank holds its shard of the
global mean). The agent therefore works on the *local shards*:

* ``x_{t−1}``, ``x_0`` and ``x*`` are copies of the local shards (memory divided by the world size);
* every dot product and squared norm over parameters is a partial sum over the rank's shard, and
  the partial sums are **summed** across ranks (``ShardedParams.reduce``, one all-reduce per
  metric) — not averaged as under DDP, where each rank holds the same full vector;
* the per-rank losses are still **averaged** over ranks: each rank sees its part of the global batch.

Replays at ``x_{t−1}`` (and ``x*``) must run the user's FSDP module, whose forward all-gathers the
parameters from the shards and whose backward reduce-scatters the gradient into ``.grad`` (FSDP's
gradient never reaches ``torch.autograd.grad`` on the sharded parameters: the graph holds the
unsharded ones). So a replay (``ShardedParams.replay``):

1. swaps the local shards with the copy of the point, in place, under ``no_grad`` (one
   parameter-sized temporary at a time: the point's copy holds ``x_t`` meanwhile), so FSDP
   all-gathers the point's full parameters;
2. sets every ``.grad`` aside (the user's tensors, kept by reference) and clones the buffers;
3. runs the module's own forward and ``backward()`` on each recorded call (RNG and autocast state
   restored, as for the single-process replays), reading the reduce-scattered gradient shards;
4. swaps back (bit-for-bit: only copies), puts the user's ``.grad`` tensors back and restores the
   buffers in place (BatchNorm statistics unchanged).

A rank must never skip a collective the others enter. The FSDP forward and backward hold
collectives, so a replay is entered by every rank together: a failure while preparing it is agreed
on first (one small all-reduce) and every rank then skips it; a failure in the loss computation
after the forward is replaced by a NaN loss on the same output, whose backward runs the same
collectives. Either way every rank gets NaN for that metric and training goes on. A failure inside
the user's model forward on one rank only cannot be contained by the agent (it would hang the
user's own step just the same).

The curvature metrics (``sharpness``, ``sharpness_precond``, ``hessian_trace``) cannot use Hessian-vector
products by double backward: FSDP's reduce-scatter in the backward is not differentiable and the
gradient of the sharded parameters is not an autograd function of them (``torch.autograd.grad``
with respect to them reports them unused). They use central finite differences instead,
``H v ≈ (∇f(x + εv) − ∇f(x − εv)) / 2ε`` (``moxco.curvature.FiniteDifferenceHessian``): the local
shards are moved to ``x ± εv`` in place (``v`` is a list of local shards too), each gradient is a
replay through the FSDP module (below, at the current point), and the shards are restored bit for
bit. Every inner product of the eigensolvers is a partial sum over shards completed by ``reduce``.
The Adam preconditioner is read from the optimizer's sharded state (``local_preconditioner``).

FSDP1 (``FullyShardedDataParallel``) is detected and refused with a clear message (see
``docs/agent.md``).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moxco import tensors
from moxco.agent.distributed import DataParallelGroup, unwrap
from moxco.agent.gradients import RawGradient

def _fsdp2_module_type():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - older torch
        return None
    return FSDPModule


def uses_fsdp2(model: nn.Module) -> bool:
    """True when ``model`` (or a submodule) was sharded with ``fully_shard``."""
    kind = _fsdp2_module_type()
    return kind is not None and any(isinstance(m, kind) for m in unwrap(model).modules())


def uses_fsdp1(model: nn.Module) -> bool:
    """True when ``model`` holds a ``FullyShardedDataParallel`` wrapper (the FSDP1 API)."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover
        return False
    return any(isinstance(m, FullyShardedDataParallel) for m in unwrap(model).modules())


def _local(t: Tensor) -> Tensor:
    """The rank's shard of ``t`` (the tensor FSDP all-gathers from; written in place by optimizers)."""
    with torch.no_grad():  # to_local() under no_grad returns the DTensor's own local tensor
        return t.to_local() if hasattr(t, "to_local") else t


def _nan_loss(output: Any) -> Optional[Tensor]:
    """A NaN scalar that depends on every differentiable tensor of ``output`` (so its backward runs
    through the same modules, and FSDP's collectives, as the real loss's would)."""
    found: List[Tensor] = []

    def visit(value: Any) -> None:
        if isinstance(value, Tensor):
            if value.requires_grad and value.is_floating_point():
                found.append(value)
        elif isinstance(value, Mapping):
            for v in value.values():
                visit(v)
        elif isinstance(value, (tuple, list)):
            for v in value:
                visit(v)
        elif hasattr(value, "__dict__"):
            for v in vars(value).values():
                visit(v)

    visit(output)
    if not found:
        return None
    return sum(t.sum() for t in found) * math.nan


class ShardedParams:
    """The agent's view of FSDP2-sharded parameters (see the module docstring).

    ``params`` are the optimizer's parameters (``DTensor`` shards, in the optimizer's order),
    ``names`` their names in ``module``.
    """

    def __init__(self, model: nn.Module, params: Sequence[Tensor], names: Sequence[str],
                 group: DataParallelGroup) -> None:
        if uses_fsdp1(model):
            raise NotImplementedError(
                "moxco.agent supports FSDP through torch.distributed.fsdp.fully_shard (FSDP2); "
                "FullyShardedDataParallel (FSDP1, deprecated) is not supported: its flat parameters "
                "hide the parameter names and shapes the replays and the reference x* need")
        self.module = unwrap(model)
        self.owners = list(params)
        self.names = list(names)
        self.group = group
        for name, p in zip(self.names, self.owners):
            mesh = getattr(p, "device_mesh", None)
            if mesh is None:
                raise NotImplementedError(f"parameter {name!r} is not sharded by fully_shard (not a DTensor); "
                                          "shard every parameter the optimizer updates")
            if mesh.ndim != 1 or mesh.size() != group.world:
                raise NotImplementedError(
                    f"parameter {name!r} lives on a {mesh.ndim}-D device mesh of {mesh.size()} ranks; the agent "
                    f"supports FSDP over all {group.world} ranks of the default group (a 1-D mesh; no HSDP/TP)")

    # --- shards -------------------------------------------------------------------------------

    def local(self) -> List[Tensor]:
        """The local shards, fetched afresh (FSDP's lazy init may re-pad and replace them)."""
        return [_local(p) for p in self.owners]

    def grads(self) -> List[Tensor]:
        """The local shards of ``.grad`` (zeros where a parameter has no gradient)."""
        out = []
        for p, shard in zip(self.owners, self.local()):
            out.append(_local(p.grad).detach() if p.grad is not None else torch.zeros_like(shard))
        return out

    def local_preconditioner(self, optimizer) -> List[Tensor]:
        """This rank's shards of the Adam preconditioner ``P = √v̂ + ε``
        (``moxco.curvature.adam_preconditioner`` on the sharded parameters, whose optimizer state
        is sharded as they are: elementwise, no communication)."""
        from moxco.curvature import adam_preconditioner

        return [_local(t).detach() for t in adam_preconditioner(optimizer, self.owners)]

    def reduce(self, partials: Tensor) -> Tensor:
        """Sum float64 partial sums over the shards of all ranks (``moxco.metrics``' ``reduce``)."""
        if self.group.active:
            dist.all_reduce(partials)  # SUM: disjoint shards add up
        return partials

    def shard_full(self, full: Mapping[str, Tensor]) -> List[Tensor]:
        """The local shards of full tensors (e.g. a reference state_dict), sharded as the parameters."""
        from torch.distributed.tensor import distribute_tensor

        out = []
        for name, p in zip(self.names, self.owners):
            if name not in full:
                raise ValueError(f"reference is missing parameter {name!r}")
            ref = full[name]
            if hasattr(ref, "full_tensor"):  # a DTensor state_dict (model.state_dict() under fully_shard)
                ref = ref.full_tensor()
            if tuple(ref.shape) != tuple(p.shape):
                raise ValueError(f"reference parameter {name!r} has shape {tuple(ref.shape)}, "
                                 f"the model {tuple(p.shape)}")
            ref = ref.detach().to(device=_local(p).device, dtype=p.dtype)
            # src_data_rank=None: every rank cuts its own shard from its own copy (no communication)
            shard = distribute_tensor(ref, p.device_mesh, p.placements, src_data_rank=None).to_local()
            out.append(shard.detach().clone())
        return out

    # --- replays through the FSDP module --------------------------------------------------------

    @contextlib.contextmanager
    def _swapped(self, point: Optional[Sequence[Tensor]]) -> Iterator[None]:
        """Parameters at ``point`` inside the block (``point`` holds ``x_t`` meanwhile); exact swap back."""
        if point is None:
            yield
            return
        shards = self.local()
        done = 0
        try:
            with torch.no_grad():
                for a, b in zip(shards, point):
                    _swap(a, b)
                    done += 1
            yield
        finally:
            with torch.no_grad():
                for a, b in zip(shards[:done], point[:done]):
                    _swap(a, b)

    def _agree(self, ok: bool) -> bool:
        """True when every rank is ``ok`` (one small all-reduce)."""
        if not self.group.active:
            return ok
        flag = torch.tensor([0.0 if ok else 1.0], dtype=torch.float64)
        dist.all_reduce(flag)
        return float(flag) == 0.0

    def replay(self, capture, calls: Sequence[Any], point: Optional[Sequence[Tensor]], *, with_grad: bool,
               on_error: Callable[[BaseException], None]) -> Tuple[Tensor, Optional[List[Tensor]]]:
        """This rank's mean loss of ``calls`` at ``point`` (None: the current parameters) and, if
        ``with_grad``, the local shards of the gradient of the *global* mean loss (FSDP's
        reduce-scatter averages it over ranks). Entered by every rank together; a failure on one
        rank gives NaN values (on every rank, after the caller's reductions), never a hang."""
        from moxco.agent.capture import _ReplayConditions

        nan_loss = torch.tensor(math.nan, dtype=torch.float64)
        saved_grads: Optional[List[Optional[Tensor]]] = None
        buffers: List[Tuple[Tensor, Tensor]] = []
        stack = contextlib.ExitStack()
        ok = True
        try:
            if not calls:
                raise RuntimeError("no recorded forward call to replay")
            stack.enter_context(self._swapped(point))
            buffers = [(b, b.detach().clone()) for b in self.module.buffers()]
            if with_grad:
                saved_grads = [p.grad for p in self.owners]
                for p in self.owners:
                    p.grad = None
        except Exception as exc:
            on_error(exc)
            ok = False
        try:
            if not self._agree(ok):
                return nan_loss, (self._nan_grads() if with_grad else None)
            total = torch.zeros((), dtype=torch.float64)
            failed = False
            capture.replaying = True
            try:
                for call in calls:
                    with _ReplayConditions(call), torch.set_grad_enabled(with_grad):
                        output = self.module(*call.args, **call.kwargs)
                        try:
                            loss = capture._loss_of(call, output) / len(calls)
                        except Exception as exc:  # the backward must still run: same collectives
                            on_error(exc)
                            failed = True
                            loss = _nan_loss(output) if with_grad else None
                            if with_grad and loss is None:
                                raise
                    if with_grad:
                        loss.backward()
                    if loss is not None:
                        total = total + loss.detach().to(torch.float64)
            finally:
                capture.replaying = False
            if failed:
                total = nan_loss
            grads = None
            if with_grad:
                grads = [_local(p.grad).detach() if p.grad is not None else torch.zeros_like(s)
                         for p, s in zip(self.owners, self.local())]
            return total, grads
        finally:
            if saved_grads is not None:
                for p, g in zip(self.owners, saved_grads):
                    p.grad = g
            with torch.no_grad():
                for live, copy in buffers:
                    live.copy_(copy)
            stack.close()

    def _nan_grads(self) -> List[Tensor]:
        return [torch.full_like(s, math.nan) for s in self.local()]


def _swap(a: Tensor, b: Tensor) -> None:
    """Exchange the values of ``a`` and ``b`` in place (one temporary of their size)."""
    tmp = a.clone()
    a.copy_(b)
    b.copy_(tmp)


class ShardedRawGradient(RawGradient):
    """``RawGradient`` on FSDP shards: undoes clipping and the AMP loss scale as in one process.

    FSDP2 runs the parameters' post-accumulate-grad hooks after writing each reduce-scattered
    gradient shard, so the end-of-backward snapshot works as usual; here it records the squared
    norms of the *local* gradient shards. In-place ops on DTensor gradients do not bump the local
    shards' version counters, so a change is detected by comparing the norms at the step with the
    recorded ones (one read of the local shards), agreed over ranks (one small all-reduce, which
    synchronises), so that every rank enters the same collectives; the common factor ``m`` sums the
    squared norms over all ranks' shards (one more all-reduce, on steps where ``.grad`` changed).
    """

    def __init__(self, shards: ShardedParams, scaler=None) -> None:
        self.shards = shards
        super().__init__(shards.owners, scaler)

    def _local_grads(self) -> List[Tensor]:
        return [_local(p.grad).detach() if p.grad is not None else torch.zeros(0, dtype=p.dtype)
                for p in self.params]

    def _record(self) -> None:
        # always: a change is detected by comparing these norms (no version counters to go by)
        self._norm_sq = tensors.norms_sq(self._local_grads())
        self._now = None

    def clear(self) -> None:
        super().clear()
        self._now = None

    def modified(self) -> bool:
        if self.scaler is not None and self.scaler.is_enabled():
            return True
        if self._norm_sq is None:
            return False
        # in-place ops on DTensor gradients (clip_grad_norm_'s foreach multiply) do not bump the local
        # shards' version counters, so compare the squared norms themselves (one read of the shards)
        self._now = tensors.norms_sq(self._local_grads())
        return not self.shards._agree(bool(torch.equal(self._now, self._norm_sq)))

    def multiplier(self) -> Tuple[Tensor, Tensor]:
        if self._norm_sq is None:
            one = torch.ones((), dtype=torch.float64)
            return one, one.reshape(1)
        now = getattr(self, "_now", None)
        now = now if now is not None else tensors.norms_sq(self._local_grads())
        recorded = self._norm_sq
        if self.scaler is not None and self.scaler.is_enabled():
            recorded = recorded / self.scaler._get_scale_async().to(recorded).square()
        sums = self.shards.reduce(torch.stack([recorded.sum(), now.sum()]))
        m = (sums[0] / sums[1]).sqrt()
        nonzero = now > 0
        return m, (recorded[nonzero] / now[nonzero]).sqrt()
