"""Capture the forward calls of one optimizer step and replay them at other parameters.

The re-evaluation metrics need ``f(y, z_t)`` and ``∇f(y, z_t)`` at ``y = x_{t−1}`` (or ``x*``) on the
*same* minibatch ``z_t`` the user's step saw. A forward pre-hook records every training-mode call
of the model since the last optimizer step (several under gradient accumulation) with the RNG
state it started from; replaying one runs the model with the other parameters substituted in
their slots, as ``torch.func.functional_call`` does (``_Slots``), and the RNG state restored for
it (same dropout masks, the user's RNG stream saved and put back), on copies of the buffers
(BatchNorm running statistics are not updated). The user's parameters and ``.grad`` are never
written.

How the loss is found, in order: the loop formed it with ``loss = agent.loss(loss_fn, output,
*targets)`` (``record_loss``: the function and targets are kept for the replays); the model's
output is a scalar tensor; it has a ``loss`` field (Hugging Face models given labels); it is a
tuple whose first item is a scalar. Otherwise the user names the criterion at ``attach(...,
criterion=nn.CrossEntropyLoss())`` (its calls are recorded the same way, its targets replayed),
optionally with ``loss_fn(output, *targets)`` when the loss is not ``criterion(model(x), y)``
verbatim. The integrations attach to the framework's own loss step instead of the model
(``integrations.LossStep``: Lightning's ``training_step``, the Trainer's ``compute_loss``), whose
output is the loss. When the loss cannot be found, ``CaptureError`` names the call that gives it
for the loop seen (``loop``: ``plain``, ``closure``, ``lightning``, ``huggingface``).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from moxco.agent.distributed import unwrap


AUTOCAST_DEVICES = ("cpu", "cuda")


class _ReplayConditions:
    """The user's forward conditions for a replay: its RNG state (the user's stream saved and put
    back afterwards, so it is untouched: same dropout masks, as ``torch.random.fork_rng`` does, in
    a few calls instead of its generic context manager) and its autocast state (bf16 forwards
    replay in bf16)."""

    __slots__ = ("call", "cpu_state", "cuda_state", "autocasts")

    def __init__(self, call: "ForwardCall") -> None:
        self.call = call

    def __enter__(self) -> None:
        call = self.call
        self.cpu_state = torch.get_rng_state()
        self.cuda_state = None
        if call.cuda_rng is not None:
            self.cuda_state = torch.cuda.get_rng_state(call.cuda_rng[0])
        self.autocasts = []
        try:
            torch.set_rng_state(call.rng_state)
            if call.cuda_rng is not None:
                torch.cuda.set_rng_state(call.cuda_rng[1], call.cuda_rng[0])
            for kind, dtype in call.autocast:
                autocast = torch.autocast(kind, dtype=dtype)
                autocast.__enter__()
                self.autocasts.append(autocast)
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc) -> None:
        try:
            for autocast in reversed(self.autocasts):
                autocast.__exit__(None, None, None)
        finally:
            self._restore_rng()

    def _restore_rng(self) -> None:
        torch.set_rng_state(self.cpu_state)
        if self.cuda_state is not None:
            torch.cuda.set_rng_state(self.cuda_state, self.call.cuda_rng[0])


class _Slots:
    """Where a module keeps each of its parameters and buffers: the owning submodule's
    ``_parameters`` or ``_buffers`` dict and the key, under every name that reaches the tensor (a
    tied weight, GPT-2's ``lm_head.weight`` and ``transformer.wte.weight``, has two), each with the
    name ``named_parameters()``/``named_buffers()`` give it.

    A replay substitutes its tensors there and puts the originals back, as ``functional_call``
    does, but the walk over the modules that finds them is made once instead of at every call
    (``StepCapture.slots`` makes it again when a slot no longer holds the tensor found there)."""

    def __init__(self, module: nn.Module) -> None:
        self.entries: List[Tuple[str, Dict[str, Any], str, Tensor]] = []  # (canonical name, dict, key, tensor)
        self.buffers: List[Tuple[str, Tensor]] = []  # (name, tensor), each buffer once
        first: Dict[int, str] = {}
        for kind, named in (("_parameters", module.named_parameters(remove_duplicate=False)),
                            ("_buffers", module.named_buffers(remove_duplicate=False))):
            for name, tensor in named:
                prefix, _, key = name.rpartition(".")
                canonical = first.setdefault(id(tensor), name)
                self.entries.append((canonical, getattr(module.get_submodule(prefix), kind), key, tensor))
                if kind == "_buffers" and canonical == name:
                    self.buffers.append((name, tensor))

    def current(self) -> bool:
        """Whether every slot still holds the tensor found there."""
        return all(slots.get(key) is tensor for _, slots, key, tensor in self.entries)

    def swap_in(self, values: Dict[str, Tensor]) -> List[Tuple[Dict[str, Any], str, Tensor]]:
        """Put ``values`` (by canonical name) in their slots; returns what ``restore`` puts back."""
        swapped: List[Tuple[Dict[str, Any], str, Tensor]] = []
        try:
            for canonical, slots, key, tensor in self.entries:
                value = values.get(canonical)
                if value is not None:
                    swapped.append((slots, key, slots[key]))
                    slots[key] = value
        except BaseException:
            self.restore(swapped)
            raise
        return swapped

    @staticmethod
    def restore(swapped: List[Tuple[Dict[str, Any], str, Tensor]]) -> None:
        for slots, key, original in reversed(swapped):
            slots[key] = original


class CaptureError(RuntimeError):
    """The step's loss cannot be found or replayed; the message says what to pass to ``attach``."""


# how to give the step's loss, per loop style (StepCapture.loop)
FUNCTIONAL_HINT = ("use `loss = agent.loss(F.cross_entropy, output, y)` for `F.cross_entropy(output, y)` (any "
                   "function of the output), or attach(..., criterion=nn.CrossEntropyLoss())")
LOOP_HINTS = {
    "plain": FUNCTIONAL_HINT,
    "closure": "in the closure use `loss = agent.loss(loss_fn, output, y)`, and call agent.before_optimizer_step() "
               "after its backward",
    "lightning": "MoxcoCallback replays your LightningModule's training_step(batch, batch_idx): it must return the "
                 "loss (a scalar tensor, or a dict with 'loss')",
    "huggingface": "MoxcoCallback replays the Trainer's compute_loss(model, inputs): it must return the loss (a "
                   "scalar tensor, or (loss, outputs))",
}

@dataclass
class ForwardCall:
    args: tuple
    kwargs: dict
    rng_state: Tensor
    cuda_rng: Optional[Tuple[int, Tensor]]
    autocast: Tuple[Tuple[str, torch.dtype], ...] = ()
    output: Any = None
    targets: Optional[tuple] = None
    loss: Optional[Tensor] = None
    loss_fn: Optional[Callable[..., Tensor]] = None  # from agent.loss(loss_fn, output, *targets)
    output_id: int = 0  # id() of the output, to check agent.loss was given the model's output itself


def loss_from_output(output: Any) -> Optional[Tensor]:
    """The scalar loss carried by a model output, or None (see the module docstring)."""
    if isinstance(output, Tensor):
        return output if output.numel() == 1 else None
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if isinstance(loss, Tensor) and loss.numel() == 1:
        return loss
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor) and output[0].numel() == 1:
        return output[0]
    return None


def _any_autocast() -> bool:
    check = getattr(torch._C, "_is_any_autocast_enabled", None)  # private; absent: ask each device
    return check() if check is not None else any(torch.is_autocast_enabled(kind) for kind in AUTOCAST_DEVICES)


class StepCapture:
    """Records the training-mode forward calls between two optimizer steps (see module docstring)."""

    def __init__(self, model: nn.Module, *, criterion: Optional[nn.Module] = None,
                 loss_fn: Optional[Callable[..., Tensor]] = None, loop: str = "plain") -> None:
        self.model = model
        self.loop = loop  # the loop style, for the hint of a CaptureError (LOOP_HINTS)
        # torch.compile and DDP wrap the module; replays run the original eagerly on the same
        # parameters (and outside DDP's gradient synchronisation)
        self.replay_module: nn.Module = unwrap(model)
        self.criterion = criterion
        self.loss_fn = loss_fn
        self.calls: List[ForwardCall] = []
        self.replaying = False
        self.error: Optional[CaptureError] = None
        self._slots: Optional[_Slots] = None  # where the replay module keeps its tensors (slots())
        self._device_param: Optional[weakref.ref] = None  # a parameter whose .device is the module's
        self._handles = [
            model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            model.register_forward_hook(self._after_forward, with_kwargs=True),
        ]
        if criterion is not None:  # an nn.Module (agent.options checks it)
            self._handles.append(criterion.register_forward_hook(self._after_criterion))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def clear(self) -> None:
        self.calls.clear()

    # --- hooks (on the training thread; cheap: references and an RNG snapshot) -------------------

    def _recording(self) -> bool:
        return not self.replaying and self.model.training and torch.is_grad_enabled()

    def _device(self) -> Optional[torch.device]:
        # walking module.parameters() took ~30 µs a forward in the benchmark's loop; a parameter's
        # .device follows model.to(...), and a weak reference follows the parameter's replacement
        param = self._device_param() if self._device_param is not None else None
        if param is None:
            param = next(iter(self.replay_module.parameters()), None)
            if param is None:
                return None
            self._device_param = weakref.ref(param)
        return param.device

    def _before_forward(self, module, args, kwargs):
        if not self._recording():
            return None
        device = self._device()
        cuda_rng = None
        if device is not None and device.type == "cuda":
            cuda_rng = (device.index if device.index is not None else torch.cuda.current_device(),
                        torch.cuda.get_rng_state(device))
        autocast = ()
        if _any_autocast():  # one call in the common case, where none is on
            autocast = tuple((kind, torch.get_autocast_dtype(kind)) for kind in AUTOCAST_DEVICES
                             if torch.is_autocast_enabled(kind))
        self.calls.append(ForwardCall(args, kwargs, torch.get_rng_state(), cuda_rng, autocast))
        return None

    def _after_forward(self, module, args, kwargs, output):
        if not self._recording() or not self.calls:
            return None
        call = self.calls[-1]
        call.output_id = id(output)
        loss = loss_from_output(output)
        if loss is not None:
            call.loss = loss.detach()
        # The output is kept only while a criterion or agent.targets() may still need it, and
        # dropped as soon as they ran: a language model's output holds its logits (batch × sequence
        # × vocabulary), which the user's loop frees right after forming the loss.
        if self.criterion is not None or self.loss_fn is not None:
            call.output = output
        return None

    def _after_criterion(self, module, args, output):
        # a hook runs inside the user's forward: it records, it never raises
        if not self._recording() or not self.calls:
            return None
        call = next((c for c in self.calls if c.targets is None), None)
        if call is None:
            return None
        if self.loss_fn is None and (not args or args[0] is not call.output):
            self.error = CaptureError(
                "the criterion was not called on the model's output itself (e.g. criterion(out.view(-1, V), y)); "
                "pass attach(..., loss_fn=lambda output, *targets: ...) to say how the loss is formed")
            return None
        call.targets = tuple(args[1:])
        call.loss = output.detach()
        call.output = None  # the criterion ran: the replay forms its loss from its own output
        return None

    def record_loss(self, loss_fn: Callable[..., Tensor], output: Any, targets: tuple, loss: Any) -> None:
        """``agent.loss(loss_fn, output, *targets)``: the latest forward call's loss is
        ``loss_fn(output, *targets)``, ``loss`` its value (computed by the caller)."""
        if not self.calls:
            if self._recording():
                raise CaptureError("agent.loss(...) must follow the model's forward call (in training mode)")
            return  # evaluation: nothing to record
        call = self.calls[-1]
        if id(output) != call.output_id:
            raise CaptureError("agent.loss(loss_fn, output, *targets) must be given the model's output itself; "
                               "form anything else inside loss_fn, e.g. agent.loss(lambda out, y: "
                               "F.cross_entropy(out.view(-1, V), y.view(-1)), output, y)")
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise CaptureError(f"agent.loss(...): loss_fn returned {type(loss).__name__}, not a scalar tensor")
        call.loss_fn, call.targets, call.loss, call.output = loss_fn, tuple(targets), loss.detach(), None

    def set_targets(self, *targets: Any) -> None:
        """Tell the agent the targets of the latest forward call (plain-function losses)."""
        if not self.calls:
            raise CaptureError("agent.targets(...) must follow the model's forward call")
        call = self.calls[-1]
        call.targets = targets
        if self.loss_fn is None:
            raise CaptureError("agent.targets(...) needs attach(..., loss_fn=...) to know how the loss is formed; "
                               "or form the loss with `loss = agent.loss(loss_fn, output, *targets)` instead")
        with torch.no_grad():
            call.loss = self.loss_fn(call.output, *targets).detach()
        call.output = None

    # --- reading and replaying -------------------------------------------------------------------

    def has_batch(self) -> bool:
        return bool(self.calls) and all(c.loss is not None for c in self.calls)

    def step_loss(self) -> Tensor:
        """``f(x_t, z_t)``: the mean of the recorded losses of this step's forward calls."""
        if self.error is not None:
            raise self.error
        if not self.calls:
            hint = "" if self.loop in ("plain", "huggingface") else f" ({LOOP_HINTS[self.loop]})"
            raise CaptureError("no training-mode forward call of the model was seen before optimizer.step()" + hint)
        losses = [c.loss for c in self.calls]
        if any(l is None for l in losses):
            raise CaptureError(self.missing_loss_message())
        if len(losses) == 1:  # the common case, in one dispatch
            return losses[0].to(torch.float64)
        return torch.stack([l.to(torch.float64) for l in losses]).mean()

    def missing_loss_message(self) -> str:
        """Why the step's loss is not known, and the call that gives it for this loop."""
        if self.loop in ("lightning", "huggingface"):
            return f"cannot find the loss: {LOOP_HINTS[self.loop]}"
        if self.loss_fn is not None and self.criterion is None:
            return ("cannot find the loss: attach(..., loss_fn=...) was given but not this step's targets: call "
                    "agent.targets(y) right after the forward call, or form the loss with `loss = agent.loss(loss_fn, "
                    "output, y)`")
        if self.criterion is not None:
            return "cannot find the loss (the criterion was not called on this step's model output): " + FUNCTIONAL_HINT
        return "cannot find the loss (the model's output is not a scalar and has no .loss): " + LOOP_HINTS[self.loop]

    def _loss_of(self, call: ForwardCall, output: Any) -> Tensor:
        if call.loss_fn is not None:
            return call.loss_fn(output, *call.targets)
        if call.targets is not None:
            fn = self.loss_fn if self.loss_fn is not None else self.criterion
            return fn(output, *call.targets)
        loss = loss_from_output(output)
        if loss is None:
            raise CaptureError("the replayed output carries no loss")
        return loss

    def slots(self) -> _Slots:
        """The replay module's ``_Slots``, found again when the module's tensors changed."""
        if self._slots is None or not self._slots.current():
            self._slots = _Slots(self.replay_module)
        return self._slots

    def _substituted(self, named_params: Dict[str, Tensor]) -> Tuple[_Slots, Dict[str, Tensor]]:
        """The slots and what a replay puts in them: ``named_params``, and copies of the buffers
        (BatchNorm running statistics are updated in the copies, not in the user's)."""
        slots = self.slots()
        return slots, {**{name: b.detach().clone() for name, b in slots.buffers}, **named_params}

    def _forward(self, slots: _Slots, values: Dict[str, Tensor], call: ForwardCall) -> Any:
        swapped = slots.swap_in(values)
        try:
            return self.replay_module(*call.args, **call.kwargs)
        finally:
            slots.restore(swapped)

    def replay(self, calls: Sequence[ForwardCall], named_params: Dict[str, Tensor], *, with_grad: bool,
               grad_wrt: Optional[Sequence[Tensor]] = None) -> Tuple[Tensor, Optional[List[Tensor]]]:
        """Mean loss of ``calls`` at the parameters ``named_params`` and, if ``with_grad``, its
        gradient with respect to ``grad_wrt`` (tensors appearing in ``named_params``).

        Calls are replayed one at a time and their gradients summed, so the peak memory is one
        forward graph, as in the user's accumulation loop.
        """
        slots, values = self._substituted(named_params)
        total_loss: Optional[Tensor] = None
        total_grad: Optional[List[Tensor]] = None
        self.replaying = True
        try:
            for call in calls:
                with _ReplayConditions(call), torch.set_grad_enabled(with_grad):
                    output = self._forward(slots, values, call)
                    loss = self._loss_of(call, output)
                    if len(calls) > 1:
                        loss = loss / len(calls)
                if with_grad:
                    grads = torch.autograd.grad(loss, list(grad_wrt), allow_unused=True)
                    # sparse gradients (nn.Embedding(sparse=True)) densified: the agent's own
                    # temporaries, compared elementwise with the dense x_t-side quantities
                    grads = [torch.zeros_like(p) if g is None else (g.to_dense() if g.is_sparse else g)
                             for g, p in zip(grads, grad_wrt)]
                    total_grad = grads if total_grad is None else [a + b for a, b in zip(total_grad, grads)]
                loss = loss.detach().to(torch.float64)
                total_loss = loss if total_loss is None else total_loss + loss
        finally:
            self.replaying = False
        return total_loss, total_grad

    def replay_graph(self, calls: Sequence[ForwardCall], named_params: Dict[str, Tensor]) -> Tensor:
        """Differentiable mean loss of ``calls`` at ``named_params`` (graphs kept: for HVPs)."""
        slots, values = self._substituted(named_params)
        losses = []
        for call in calls:
            with _ReplayConditions(call), torch.enable_grad():
                losses.append(self._loss_of(call, self._forward(slots, values, call)))
        return torch.stack(losses).mean()

    @staticmethod
    def batch_size(calls: Sequence[ForwardCall]) -> int:
        """Samples in ``calls``: the leading dimension of the first tensor argument of each call
        (inside tuples, lists and mappings too: a Lightning batch, a Hugging Face ``inputs`` dict)."""
        return sum(_leading_dim(call) or 0 for call in calls)

    @staticmethod
    def token_count(calls: Sequence[ForwardCall]) -> Optional[int]:
        """Tokens in ``calls`` when the batch tells: the elements of each call's ``input_ids``
        (keyword or mapping entry), else of its first integer tensor of two or more dimensions
        (batch × sequence, padding included); None when no call has one."""
        total, found = 0, False
        for call in calls:
            ids = _token_ids(call)
            if ids is not None:
                total, found = total + ids.numel(), True
        return total if found else None

    @staticmethod
    def split_calls(calls: Sequence[ForwardCall], parts: int) -> Optional[List[List[ForwardCall]]]:
        """Split the step's batch into ``parts`` disjoint pieces along dim 0 (every tensor argument
        and target with the batch's leading size is split the same way), or None when that is not
        possible (fewer samples than parts, or no batch dimension to split)."""
        pieces: List[List[ForwardCall]] = [[] for _ in range(parts)]
        for call in calls:
            size = _leading_dim(call)
            if size is None or size < parts:
                return None
            bounds = [round(i * size / parts) for i in range(parts + 1)]
            for k in range(parts):
                cut = slice(bounds[k], bounds[k + 1])
                take = lambda x, cut=cut: _cut(x, cut, size)  # noqa: E731
                pieces[k].append(ForwardCall(
                    tuple(take(a) for a in call.args), {n: take(v) for n, v in call.kwargs.items()},
                    call.rng_state, call.cuda_rng, call.autocast, None,
                    None if call.targets is None else tuple(take(t) for t in call.targets), None, call.loss_fn))
        return pieces


def _tensors(value: Any, depth: int = 0):
    """The tensors in ``value``, depth first, through tuples, lists and mappings (a few levels)."""
    if isinstance(value, Tensor):
        yield value
    elif depth < 4 and isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item, depth + 1)
    elif depth < 4 and isinstance(value, Mapping):
        for item in value.values():
            yield from _tensors(item, depth + 1)


def _cut(value: Any, cut: slice, size: int, depth: int = 0) -> Any:
    """``value`` with every tensor whose leading dimension is ``size`` sliced by ``cut``, through
    tuples, lists and mappings (a mapping's own type kept when it can be built from a dict)."""
    if isinstance(value, Tensor):
        return value[cut] if value.dim() > 0 and value.shape[0] == size else value
    if depth < 4 and isinstance(value, tuple):
        items = [_cut(v, cut, size, depth + 1) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if depth < 4 and isinstance(value, list):
        return [_cut(v, cut, size, depth + 1) for v in value]
    if depth < 4 and isinstance(value, Mapping):
        items = {k: _cut(v, cut, size, depth + 1) for k, v in value.items()}
        try:
            return type(value)(items)
        except Exception:
            return items
    return value


def _leading_dim(call: ForwardCall) -> Optional[int]:
    for value in (*call.args, *call.kwargs.values()):
        for tensor in _tensors(value):
            if tensor.dim() > 0:
                return int(tensor.shape[0])
    return None


def _token_ids(call: ForwardCall) -> Optional[Tensor]:
    for value in (call.kwargs.get("input_ids"), *call.args, *call.kwargs.values()):
        if isinstance(value, Mapping) and isinstance(value.get("input_ids"), Tensor):
            return value["input_ids"]
        if isinstance(value, Tensor) and value.dim() >= 2 and not value.is_floating_point() and not value.is_complex():
            return value
    return None
