"""The step's captured batch (or the probe set) replayed at other parameters, for the re-evaluation,
reference and probe groups.

In one process and under DDP a replay runs the unwrapped module with the point's tensors in the
parameters' slots (``capture.StepCapture.replay``), and its loss and gradient are averaged over the
ranks (each rank replays its part of the global batch). Under FSDP it runs the user's FSDP module
with the local shards swapped (``sharded.ShardedParams.replay``), whose reduce-scatter already
averages the gradient. Rank-local failures become NaN values of the same shapes
(``failures.Failures.local``), so that every rank enters the same collectives.

``calls`` (every method): the forward calls to replay, the step's (``ctx.calls``) by default, or the
probe set's (``agent.probe_set``). ``hessian`` gives the curvature operator of the mean loss of
``calls`` at ``x_t`` (``moxco.curvature``): autograd products summed call by call (one call's
gradient graph built once a probe), or the central
finite difference of two replays (the only way under FSDP).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from moxco import tensors
from moxco.agent.capture import ForwardCall, StepCapture
from moxco.agent.distributed import DataParallelGroup
from moxco.agent.failures import Failures
from moxco.agent.sharded import ShardedParams
from moxco.agent.step import StepContext
from moxco.curvature import AutogradHessian, FiniteDifferenceHessian, fd_epsilon

NAN = lambda: torch.tensor(math.nan, dtype=torch.float64)  # noqa: E731


class Replays:
    """Replays of the step's batch (see the module docstring); ``part`` names the metric part a
    replay serves (its failures are that part's)."""

    def __init__(self, capture: StepCapture, names: Sequence[str], group: DataParallelGroup,
                 shards: Optional[ShardedParams], failures: Failures) -> None:
        self.capture, self.names, self.group, self.shards, self.failures = capture, list(names), group, shards, failures

    def named(self, values: Sequence[Tensor]) -> Dict[str, Tensor]:
        """``values`` by parameter name (the optimizer's order), for a replay's slots."""
        return dict(zip(self.names, values))

    @staticmethod
    def nan_like(params: Sequence[Tensor]) -> List[Tensor]:
        return [torch.full_like(p, math.nan) for p in params]

    def with_grad(self, ctx: StepContext, point: Optional[Sequence[Tensor]], part: str,
                  calls: Optional[Sequence[ForwardCall]] = None) -> Tuple[Tensor, List[Tensor]]:
        """``(f(y, z_t), ∇f(y, z_t))`` at ``y = point`` (None: ``x_t``) over the global batch (this
        rank's shards of the gradient under FSDP)."""
        calls = ctx.calls if calls is None else calls
        if self.shards is not None:  # through the FSDP module; its reduce-scatter averages the gradient
            loss, grads = self.shards.replay(self.capture, calls, point, with_grad=True,
                                             on_error=self.failures.rank_error(part))
            return self.group.mean_scalar(loss), grads
        point = ctx.params if point is None else point

        def compute():
            leaves = [t.detach().requires_grad_(True) for t in point]
            return self.capture.replay(calls, self.named(leaves), with_grad=True, grad_wrt=leaves)

        loss, grads = self.failures.local(part, compute, lambda: (NAN(), self.nan_like(ctx.params)))
        averaged = self.group.mean([loss.reshape(1), *grads])
        return averaged[0].reshape(()), averaged[1:]

    def difference(self, ctx: StepContext, point: Sequence[Tensor], part: str) -> Tuple[Tensor, Tensor]:
        """The replay at ``y = point`` (``x_{t−1}`` or ``x*``): ``(f(y, z_t), this rank's
        ‖∇f(x_t, z_t) − ∇f(y, z_t)‖²)``, taken at once while the replay's gradient is still in
        cache: one fused read on the CPU (``moxco.native``), elsewhere formed in that gradient (the
        agent's own, overwritten)."""
        loss_ref, grad_ref = self.with_grad(ctx, point, part)
        return loss_ref, tensors.dist_sq(ctx.grad, grad_ref, overwrite_ys=True, x_scale=ctx.grad_scale)

    def loss_at(self, ctx: StepContext, point: Optional[Sequence[Tensor]], part: str,
                calls: Optional[Sequence[ForwardCall]] = None) -> Tensor:
        """``f(y, z_t)`` at ``y = point`` (None: ``x_t``) over the global batch, without a gradient."""
        calls = ctx.calls if calls is None else calls
        if self.shards is not None:
            loss, _ = self.shards.replay(self.capture, calls, point, with_grad=False,
                                         on_error=self.failures.rank_error(part))
        else:
            named = self.named(ctx.params if point is None else point)
            loss, _ = self.failures.local(
                part, lambda: self.capture.replay(calls, named, with_grad=False), lambda: (NAN(), None))
        return self.group.mean_scalar(loss)

    def hessian(self, ctx: StepContext, part: str, calls: Optional[Sequence[ForwardCall]] = None, *,
                finite_difference: bool = False, shared: Optional[Dict[str, Any]] = None):
        """The Hessian of the mean loss of ``calls`` at ``x_t`` as a ``moxco.curvature`` operator.

        * autograd (one process, DDP): ``H v = (1/n) Σ_c ∇²f_c v``, one call's graph alive at a time
          (as in the user's accumulation loop, so a probe set of several batches costs the memory of
          one), averaged over DDP ranks (``hv_mean``); a rank-local failure gives a NaN curvature,
          which turns every rank's product into NaN; ``shared``: see ``CallsHessian``;
        * ``finite_difference``: ``(∇f(x_t + εv) − ∇f(x_t − εv)) / 2ε`` from two gradient replays:
          in one process and under DDP on the live parameters (moved in place and restored bit for
          bit), under FSDP through the user's FSDP module on this rank's local shards (no double
          backward, which FSDP's reduce-scatter does not allow; its partial sums summed over ranks).
        """
        calls = list(ctx.calls if calls is None else calls)
        if finite_difference:
            eps = fd_epsilon(self.compute_dtype(ctx.params, calls))
            if self.shards is not None:
                on_error = self.failures.rank_error(part)

                def sharded_gradient():
                    return self.shards.replay(self.capture, calls, None, with_grad=True, on_error=on_error)

                return FiniteDifferenceHessian(None, self.shards.local(), grad_fn=sharded_gradient, eps=eps,
                                               reduce=self.shards.reduce)
            return FiniteDifferenceHessian(None, list(ctx.params), eps=eps,
                                           grad_fn=lambda: self.with_grad(ctx, None, part, calls=calls))
        if self.shards is not None:
            raise RuntimeError("Hessian-vector products by double backward are not possible through FSDP "
                               "(its reduce-scatter is not differentiable): use finite differences")
        current = self.named(ctx.params)
        nan_curvature = lambda: sum((p.square() * math.nan).sum() for p in ctx.params)  # noqa: E731

        def loss_of(call: ForwardCall) -> Callable[[], Tensor]:
            def replay():
                self.capture.replaying = True
                try:
                    return self.capture.replay_graph([call], current) / len(calls)
                finally:
                    self.capture.replaying = False

            return lambda: self.failures.local(part, replay, nan_curvature)

        return CallsHessian([loss_of(call) for call in calls], list(ctx.params),
                            hv_mean=self.group.mean if self.group.active else None, shared=shared)

    def compute_dtype(self, params: Sequence[Tensor], calls: Sequence[ForwardCall]) -> torch.dtype:
        """The least precise floating dtype the gradient is computed in: the parameters', the calls'
        autocast dtype, FSDP's mixed-precision ``param_dtype``. A finite difference's step is chosen
        for it (``fd_epsilon``): bf16 arithmetic with float32's step leaves a rounding error far above
        the step's truncation (λ_max 1.5-2.6 % off on a small MLP, 0.1 % with bf16's step)."""
        dtypes = {p.dtype for p in params if p.is_floating_point()}
        dtypes.update(dtype for call in calls for _, dtype in call.autocast)
        if self.shards is not None:
            for module in self.shards.module.modules():
                try:  # FSDP2's policy, a private attribute: where it is not found, the parameters' dtype
                    param_dtype = module._get_fsdp_state()._mp_policy.param_dtype
                except Exception:
                    continue
                if param_dtype is not None:
                    dtypes.add(param_dtype)
        return max(dtypes, key=lambda d: torch.finfo(d).eps) if dtypes else torch.float32

    def gradients_of(self, ctx: StepContext, parts: Sequence[List[ForwardCall]], part: str) -> List[List[Tensor]]:
        """``∇f(x_t, ·)`` of each piece of the batch, each averaged over ranks (under DDP the k-th
        pieces of all ranks form a piece of the global batch)."""
        out = []
        current = self.named(ctx.params)
        for piece in parts:
            if self.shards is not None:  # FSDP's reduce-scatter already averages over ranks
                out.append(self.shards.replay(self.capture, piece, None, with_grad=True,
                                              on_error=self.failures.rank_error(part))[1])
                continue
            _, grads = self.failures.local(
                part, lambda: self.capture.replay(piece, current, with_grad=True, grad_wrt=ctx.params),
                lambda: (None, self.nan_like(ctx.params)))
            out.append(self.group.mean(grads))
        return out


class CallsHessian:
    """``v ↦ (f, Σ_c ∇²f_c v)`` for a loss that is a sum of per-call losses ``f_c`` (each closure
    returns its share of the mean), one ``moxco.curvature.AutogradHessian`` product per call: the
    peak memory is one call's graph. A single call keeps its gradient graph for every product until
    ``close()`` (the replay is deterministic: same batch, same dropout masks), so a probe's further
    products cost only the double backward, ``S + k·D`` instead of ``k·(S + D)``; several calls
    are replayed at each product, so that only one call's graph is ever alive. ``shared`` (a dict
    that lives for one probe) passes that single call's graph on to the next operator of the same
    probe (the plain and the preconditioned sharpness, the trace): one ``S`` a probe; a graph
    whose loss is not finite (a rank-local failure's NaN stand-in) is not passed on, so each
    metric replays and reports its own failure. ``hv_mean`` averages the sum over data-parallel
    ranks."""

    reduce = None  # replicated parameters: inner products are complete on every rank

    def __init__(self, loss_fns: Sequence[Callable[[], Tensor]], params: List[Tensor], *,
                 hv_mean: Optional[Callable[[List[Tensor]], List[Tensor]]] = None,
                 shared: Optional[Dict[str, Any]] = None) -> None:
        single = len(loss_fns) == 1
        self.shared = shared if single else None
        graph = self.shared.get("graph") if self.shared is not None else None
        self.ops = [AutogradHessian(fn, params, reuse_graph=single, graph=graph) for fn in loss_fns]
        self.params = params
        self.hv_mean = hv_mean
        self.hvps = 0

    def __call__(self, vs) -> Tuple[Tensor, List[Tensor]]:
        loss, total = self.ops[0](vs)
        if self.shared is not None and "graph" not in self.shared and bool(torch.isfinite(loss)):
            self.shared["graph"] = self.ops[0].graph
        for op in self.ops[1:]:
            more, hv = op(vs)
            loss = loss + more
            torch._foreach_add_(total, hv)
        self.hvps += 1
        if self.hv_mean is not None:
            total = self.hv_mean(total)
        return loss, total

    def close(self) -> None:
        """Free a kept gradient graph."""
        for op in self.ops:
            op.close()

    def __enter__(self) -> "CallsHessian":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
