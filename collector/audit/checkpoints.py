"""Checkpoint mode: the global metrics of a run computed after the fact from saved parameters.

``moxco audit --checkpoints DIR --reference FINAL.pt --data SPEC`` loads every checkpoint ``x_t`` in
``DIR`` (in step order), evaluates ``F(x_t)`` and ``∇F(x_t)`` on a fixed probe set, and with the
reference ``x*`` (``F(x*)``, ``∇F(x*)``) computes, per checkpoint, with the formulas of
``moxco.metrics``:

* ``convexity_ratio`` (running, audit eq. 6): ``metrics.ConvexityRatio``;
* ``inst_gap_ref`` = ``F(x_t) − F(x*) − ⟨∇F(x_t), x_t − x*⟩`` (eq. 2 with ``y = x*``): ``metrics.inst_gap``;
* ``inst_smooth_ref`` = ``‖∇F(x_t) − ∇F(x*)‖ / ‖x_t − x*‖`` (eq. 4 with ``y = x*``): ``metrics.inst_smooth``;

and writes them into the store under a run, at the checkpoints' steps.

Checkpoints (``DIR``): files ``*.pt`` / ``*.pth`` / ``*.bin`` (``torch.load``; a state_dict, or a
dict with the state_dict under ``"model"`` or ``"state_dict"`` and optionally the step under
``"step"``) and Hugging Face ``checkpoint-N/`` folders (``model.safetensors`` or
``pytorch_model.bin``). The step is the dict's ``"step"``, else the last integer in the name
(``step_000120.pt``, ``checkpoint-120``). The reference file is skipped if it lies in ``DIR``.

Probe data (``--data SPEC``): ``SPEC`` is ``package.module:function`` or ``path/to/file.py:function``.
The function is called with no argument, or with the checkpoint directory (a ``pathlib.Path``) if it
takes one, and returns ``(model_fn, batches)`` or ``(model_fn, batches, loss_fn)``:

* ``model_fn()`` builds the model (architecture only; the checkpoints supply the weights);
* ``batches``: a sequence of probe batches; a ``dict`` is passed as ``model(**batch)``, a
  tuple/list as ``model(*batch)``, anything else as ``model(batch)``;
* the loss is the model's output if it is a scalar, its ``.loss`` (Hugging Face models given
  labels), or its first item if it is a tuple; ``loss_fn(model, batch) -> scalar`` overrides this.

``F`` is the mean of the batch losses (equal weights: give equal-sized batches), evaluated with the
model in eval mode (no dropout), so every checkpoint sees the same function.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from moxco import metrics
from moxco.collector.audit.analysis import AuditError
from moxco.collector.store import StoreError
from moxco.wire import Point

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin")
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
WRITTEN_METRICS = ("convexity_ratio", "inst_gap_ref", "inst_smooth_ref")


@dataclass
class ProbeData:
    model_fn: Callable[[], nn.Module]
    batches: Sequence[Any]
    loss_fn: Optional[Callable[[nn.Module, Any], Tensor]] = None


def _import_target(spec: str):
    if ":" not in spec:
        raise AuditError(f"--data must be 'module:function' or 'path/to/file.py:function', got {spec!r}")
    target, _, attr = spec.rpartition(":")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise AuditError(f"--data: no such file {str(path)!r}")
        sys.path.insert(0, str(path.parent))  # so the file can import its neighbours (examples/lm_common.py)
        module_spec = importlib.util.spec_from_file_location(f"moxco_probe_data_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            raise AuditError(f"--data: cannot import module {target!r} ({exc})") from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise AuditError(f"--data: {target!r} has no function {attr!r}")
    return function


def load_probe_data(spec: str, checkpoints_dir: Optional[Path] = None) -> ProbeData:
    """Resolve ``--data SPEC`` into a ``ProbeData`` (see the module docstring for the format)."""
    function = _import_target(spec)
    positional = [p for p in inspect.signature(function).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    result = function(checkpoints_dir) if positional and checkpoints_dir is not None else function()
    if not isinstance(result, (tuple, list)) or len(result) not in (2, 3):
        raise AuditError(f"--data {spec}: the function must return (model_fn, batches) or (model_fn, batches, loss_fn), "
                         f"got {type(result).__name__}")
    model_fn, batches = result[0], list(result[1])
    loss_fn = result[2] if len(result) == 3 else None
    if not callable(model_fn):
        raise AuditError(f"--data {spec}: model_fn must be callable, got {type(model_fn).__name__}")
    if not batches:
        raise AuditError(f"--data {spec}: the probe set is empty")
    return ProbeData(model_fn, batches, loss_fn)


def _step_of(path: Path, state: Any) -> int:
    if isinstance(state, Mapping) and isinstance(state.get("step"), int):
        return int(state["step"])
    numbers = re.findall(r"\d+", path.stem if path.is_file() else path.name)
    if not numbers:
        raise AuditError(f"cannot tell the step of checkpoint {str(path)!r}: no 'step' key and no number in its name")
    return int(numbers[-1])


def _state_dict(state: Any, path: Path) -> Dict[str, Tensor]:
    if isinstance(state, Mapping):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise AuditError(f"{str(path)!r} is not a state_dict (nor a dict holding one under 'model' or 'state_dict')")
    return dict(state)


def load_checkpoint(path: Path) -> Tuple[Dict[str, Tensor], Any]:
    """``(state_dict, raw)`` of a checkpoint file or a Hugging Face ``checkpoint-N`` folder."""
    path = Path(path)
    if path.is_dir():
        for name in HF_WEIGHTS:
            weights = path / name
            if weights.exists():
                if name.endswith(".safetensors"):
                    from safetensors.torch import load_file

                    return load_file(str(weights)), {}
                raw = torch.load(weights, map_location="cpu", weights_only=True)
                return _state_dict(raw, weights), raw
        raise AuditError(f"{str(path)!r} holds none of {HF_WEIGHTS}")
    if not path.exists():
        raise AuditError(f"no such checkpoint: {str(path)!r}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise AuditError(f"cannot load {str(path)!r}: {type(exc).__name__}: {exc}") from None
    return _state_dict(raw, path), raw


def find_checkpoints(directory: Path, exclude: Sequence[Path] = ()) -> List[Tuple[int, Path]]:
    """``[(step, path)]`` of the checkpoints in ``directory``, in step order."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AuditError(f"--checkpoints: {str(directory)!r} is not a directory")
    skip = {Path(p).resolve() for p in exclude}
    found = []
    for path in sorted(directory.iterdir()):
        if path.resolve() in skip:
            continue
        if path.is_file() and path.suffix in CHECKPOINT_SUFFIXES:
            raw = torch.load(path, map_location="cpu", weights_only=True) if path.suffix != ".bin" else {}
            found.append((_step_of(path, raw), path))
        elif path.is_dir() and any((path / name).exists() for name in HF_WEIGHTS):
            found.append((_step_of(path, None), path))
    if not found:
        raise AuditError(f"no checkpoints ({', '.join(CHECKPOINT_SUFFIXES)} files or checkpoint-N/ folders) in "
                         f"{str(directory)!r}")
    steps = [s for s, _ in found]
    duplicates = sorted({s for s in steps if steps.count(s) > 1})
    if duplicates:
        raise AuditError(f"several checkpoints claim the same step(s) {duplicates[:5]} in {str(directory)!r}")
    return sorted(found)


def _loss_of(output: Any) -> Tensor:
    if isinstance(output, Tensor) and output.dim() == 0:
        return output
    loss = getattr(output, "loss", None)
    if isinstance(loss, Tensor):
        return loss
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor) and output[0].dim() == 0:
        return output[0]
    raise AuditError("cannot find the loss in the model's output (not a scalar, no .loss, not a tuple starting with "
                     "a scalar): return a loss_fn(model, batch) as the third item of --data")


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


class ProbeEvaluator:
    """``F`` and ``∇F`` on the probe set at any parameters, through one model instance."""

    def __init__(self, data: ProbeData, device: torch.device) -> None:
        self.data, self.device = data, device
        self.model = data.model_fn().to(device).eval()
        self.params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.batches = [_to(b, device) for b in data.batches]

    def load(self, state: Mapping[str, Tensor], path: Path) -> List[Tensor]:
        missing = [n for n, _ in self.params if n not in state]
        if missing:
            raise AuditError(f"{str(path)!r} lacks parameters {missing[:5]}{' …' if len(missing) > 5 else ''} of the model "
                             "that --data builds")
        with torch.no_grad():
            for name, p in self.params:
                if state[name].shape != p.shape:
                    raise AuditError(f"{str(path)!r}: parameter {name!r} has shape {tuple(state[name].shape)}, the model "
                                     f"{tuple(p.shape)}")
                p.copy_(state[name])
            buffers = dict(self.model.named_buffers())
            for name, b in buffers.items():
                if name in state and state[name].shape == b.shape:
                    b.copy_(state[name])
        return [p.detach().clone() for _, p in self.params]

    def evaluate(self) -> Tuple[Tensor, List[Tensor]]:
        """``(F, ∇F)`` at the loaded parameters: the mean of the batch losses and its gradient."""
        for _, p in self.params:
            p.grad = None
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        n = len(self.batches)
        for batch in self.batches:
            if self.data.loss_fn is not None:
                loss = self.data.loss_fn(self.model, batch)
            elif isinstance(batch, Mapping):
                loss = _loss_of(self.model(**batch))
            elif isinstance(batch, (tuple, list)):
                loss = _loss_of(self.model(*batch))
            else:
                loss = _loss_of(self.model(batch))
            (loss / n).backward()
            total += loss.detach().double() / n
        grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for _, p in self.params]
        return total, grads


def checkpoint_audit(store, run: str, directory: Path, reference: Path, data_spec: str, *, device: Optional[str] = None,
                     progress: bool = True) -> Dict[str, Any]:
    """Compute and store the global metrics of the checkpoints in ``directory`` against ``reference``.

    Returns a summary: per checkpoint ``F(x_t)``, the running ratio, the gap and smoothness to
    ``x*``, and the two sums of the ratio."""
    directory, reference = Path(directory), Path(reference)
    ref_state, _ = load_checkpoint(reference)
    checkpoints = find_checkpoints(directory, exclude=[reference])
    data = load_probe_data(data_spec, directory)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        existing = set(store.metrics(run))
    except StoreError:
        existing = set()
    clash = sorted(existing & set(WRITTEN_METRICS))
    if clash:
        raise AuditError(f"run {run!r} already has {', '.join(clash)} points; checkpoint mode writes those metrics: "
                         "pass another --run name")
    evaluator = ProbeEvaluator(data, device)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(checkpoints) + 1, desc="moxco audit: checkpoints", unit="ckpt", disable=not progress,
               file=sys.stderr)
    x_star = evaluator.load(ref_state, reference)
    F_star, grad_star = evaluator.evaluate()
    bar.update(1)
    ratio = metrics.ConvexityRatio()
    rows, points = [], []
    for step, path in checkpoints:
        state, _ = load_checkpoint(path)
        x_t = evaluator.load(state, path)
        F_t, grad_t = evaluator.evaluate()
        value = ratio.update(F_t, F_star, grad_t, x_t, x_star)
        gap = float(metrics.inst_gap(F_t, F_star, grad_t, x_t, x_star))
        smooth = float(metrics.inst_smooth(grad_t, grad_star, x_t, x_star))
        now = time.time()
        points += [Point(step, "convexity_ratio", value, now), Point(step, "inst_gap_ref", gap, now),
                   Point(step, "inst_smooth_ref", smooth, now)]
        rows.append({"step": step, "checkpoint": str(path), "F": float(F_t), "convexity_ratio": value,
                     "inst_gap_ref": gap, "inst_smooth_ref": smooth})
        bar.set_postfix(step=step, ratio=f"{value:.3g}")
        bar.update(1)
    bar.close()
    about = {"source": "checkpoints", "checkpoints": str(directory.resolve()), "reference": str(reference.resolve()),
             "probe_batches": len(data.batches), "probe_data": data_spec}
    try:  # an existing run (say, the online run of the same training) keeps its status and gains the points
        status = store.run(run).status
        store.put_run(run, config={"checkpoint_audit": about}, status=status)
    except StoreError:
        status = None
        store.put_run(run, config={**about, "dtype": str(evaluator.params[0][1].dtype).replace("torch.", "")},
                      status="running")
    store.ingest(run, points)
    if status is None:
        store.set_status(run, "finished")
    return {"run": run, "F_reference": float(F_star), "numerator": ratio.numerator, "denominator": ratio.denominator,
            "convexity_ratio": ratio.value, "reading": metrics.interpret_convexity_ratio(ratio.value),
            "checkpoints": rows}
