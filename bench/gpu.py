"""The agent on a GPU: overhead, memory, host synchronisations and correctness, in one prepared run.

Workloads, built in code (random init, token ids drawn from a seeded generator, nothing downloaded):

* ``gpt2``: ``transformers.GPT2LMHeadModel(GPT2Config())`` (124 M parameters), batch 8 × 1,024
  tokens, bf16 autocast, AdamW (``fused=True`` where available), dropout on,
  ``model(input_ids=ids, labels=ids).loss``; ``--tiny``: a 2-layer GPT-2 (width 128, vocabulary
  2,048, 0.7 M parameters), batch 2 × 128;
* ``mlp``: the MLP of ``bench/agent_overhead.py`` (784→512→512→10, batch 128, float32, its data),
  with fused AdamW, ``attach(..., criterion=criterion)``.

What one run measures, every figure against a no-agent run of the same process:

* **Step time** with no agent, the free metrics (``reeval_every=0, probe_every=0``),
  ``reeval_every=1`` (probe off) and the defaults (a whole probe interval timed where the plan
  allows); each repeat runs every configuration once, in an order rotated from repeat to repeat, on
  a fresh copy of the same initial model; the table gives medians over repeats of the per-repeat
  ratio to that repeat's no-agent run. The time is the device's (CUDA events on the default stream
  around the timed window; ``time.perf_counter`` on the CPU), after warm-up steps that include the
  first, cold, sharpness probe; the wall time of the window is reported beside it.
* **Re-evaluation against its floor, in one run**: ``reeval_every=2, probe_every=4``, and on the
  odd steps (no re-evaluation) one extra forward+backward of the step's batch at ``x_{t−1}`` (a twin
  of the model, copied before ``attach``, holding the previous iterate), right before
  ``optimizer.step()``, where the agent replays. Events around ``optimizer.step()`` (which runs the
  agent's hooks) give, per step kind, the free metrics and AdamW (odd steps), plus the
  re-evaluation (steps 2 mod 4), plus a warm probe (steps 0 mod 4): the re-evaluation's cost is the
  difference of the medians of the first two, the probe's the difference of the last two, the floor
  the median of the extra pass. The budget is re-evaluation ≤ 1.1 × the floor.
* **Peak memory** (``torch.cuda.max_memory_allocated`` since a reset before the model is copied;
  on the CPU the resident set's high-water mark, approximate) and **retained memory** (allocated
  after the window, between steps), both in parameter copies over the no-agent run.
* **Host synchronisations on the training thread**: short runs of each configuration under
  ``torch.cuda.set_sync_debug_mode("warn")``, its warnings recorded by thread (the training thread
  and the autograd engine's threads, which work for it, against the writer thread, which may read
  values), minus what the same loop without the agent does, with the code location of each. A
  second count, which also runs on the CPU: the host reads of tensor values on the training thread
  (``.item()``, ``float()``, ``bool()``, ``.tolist()``, ``nonzero``, copies to the host),
  seen by a ``TorchDispatchMode`` and a ``TorchFunctionMode`` pushed on that thread only. The
  budget is zero.
* **Correctness**, in a subprocess with ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` and
  ``torch.use_deterministic_algorithms(True, warn_only=True)`` (the operations it warns about are
  listed): the parameters after every step bitwise identical with and without the agent
  (``reeval_every=1, probe_every=2``, so that replays and probes run; the GPT-2 with eager
  attention), with a second no-agent run as the control of determinism itself; and the metrics of
  a short float32 run (no autocast, dropout off, TF32 off; a 2-layer GPT-2 with eager attention,
  and the MLP) equal to an independent float64 replay on the CPU of the same steps from the
  recorded parameters and batches, with plain autograd, within ``REPLAY_RTOL`` times the magnitude
  of the terms each metric is formed from.

Output: a markdown table (device, versions, budgets met or missed) on stdout, and with ``--out DIR``
``DIR/gpu-bench.md`` and ``DIR/gpu-bench.json`` (every figure; rewritten after each section, so a
run cut short still leaves what it measured). ``--write-docs`` puts the table into
docs/benchmarks-agent.md between the ``bench:gpu`` markers; ``--report JSON`` renders a saved JSON
instead of measuring (with ``--write-docs``: into the doc).

    python bench/gpu.py --device cuda --out "$OUT"      # the device run: ≤ 5 min (time limit 300 s)
    python bench/gpu.py --tiny --device cpu --out /tmp/g  # every code path on the CPU, < 1 min
    python bench/gpu.py --report /tmp/g/gpu-bench.json --write-docs

On the CPU the script sets ``MOXCO_NATIVE=0`` (unless it is set): the agent then takes the tensor
path it takes on an accelerator, not its fused CPU kernels. On a lent machine (no network, torch and
transformers installed), ``bench/gpu_device.sh`` installs moxco's own dependencies from carried
wheels and runs the first command.
"""

from __future__ import annotations

import os
import sys

CORRECTNESS_FLAG = "--_correctness"
if CORRECTNESS_FLAG in sys.argv:
    # cuBLAS reads it when it creates its handle, so before torch touches the GPU (deterministic GEMMs)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import argparse
import collections
import contextlib
import copy
import functools
import gc
import json
import math
import platform
import re
import subprocess
import tempfile
import threading
import time
import traceback
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
# the CPU benchmark's MLP and data, the commit measured, medians, and writing into its doc
from benchkit import add_write_docs, median, source_state, write_between_markers  # noqa: E402
from overhead_report import DOC, DOC_TITLE  # noqa: E402
from overhead_workloads import mlp_workload  # noqa: E402

BEGIN, END = "<!-- bench:gpu:begin -->", "<!-- bench:gpu:end -->"
JSON_NAME, MD_NAME = "gpu-bench.json", "gpu-bench.md"
SCHEMA = 1

# budgets (the design's, on an accelerator)
FREE_BUDGET = 0.01  # free metrics: ≤ 1 % of the step
REEVAL_BUDGET = 1.1  # re-evaluation: ≤ 1.1 × one extra forward+backward
SYNC_BUDGET = 0  # host synchronisations on the training thread, per step
FREE_COPIES = 2  # x_{t−1}, and x_0 with track_distance (the default)
REEVAL_COPIES = 3  # with x* (these runs have none)
# the float64 replay: |agent − float64| ≤ REPLAY_RTOL × (the magnitude of the terms the metric is formed
# from, TOLERANCE_RULE). float32 rounds at 6e-8 (relative); on the CPU the largest error of the tiny plan's
# replays is 5e-7 of that scale (grad_norm_sq on the agent's tensor path; 1.2e-7 with its fused CPU
# kernels). A GPU's float32 GEMMs and reductions sum in other orders (TF32 off); REPLAY_RTOL leaves a
# factor of 100 for that, and still catches an error of 1e-4 anywhere.
REPLAY_RTOL = 5e-5
EXP_BETA = 0.99  # exp_gap, exp_smooth: e_t = β e_{t−1} + (1 − β) v_t, e_0 = 0 (audit paper eq. 3, 5)

CONFIGS: Dict[str, Tuple[str, Optional[Dict[str, Any]]]] = {
    "base": ("no agent", None),
    "free": ("free metrics (`reeval_every=0, probe_every=0`)", dict(reeval_every=0, probe_every=0)),
    "reeval1": ("`reeval_every=1` (probe off)", dict(reeval_every=1, probe_every=0)),
    "defaults": ("defaults (`reeval_every=10, probe_every=100`)", {}),
}
MIXED = dict(reeval_every=2, probe_every=4)  # with the floor's pass on the odd steps
SYNC_CONFIGS: Dict[str, Tuple[str, Optional[Dict[str, Any]]]] = {
    **CONFIGS, "probe": ("probe every 2 steps (`reeval_every=0, probe_every=2`)", dict(reeval_every=0, probe_every=2)),
}
BITWISE_AGENT = dict(reeval_every=1, probe_every=2)
REPLAY_AGENT = dict(reeval_every=1, probe_every=0)
REPLAYED = ("loss", "grad_norm_sq", "update_norm", "distance", "update_corr", "update_corr_rs", "loss_diff",
            "inst_gap", "inst_smooth", "avg_gap", "exp_gap", "max_smooth", "exp_smooth")
SYNC_WARNING = "called a synchronizing"  # torch's sync debug warning: "called a synchronizing CUDA operation"
SECTION_MARGIN_S = 15.0  # a run that would start with less time left is skipped (and listed as such)


# --- the plan: sizes for the device run and for the CPU ---------------------------------------


TINY_GPT2 = dict(vocab_size=2048, n_positions=128, n_embd=128, n_layer=2, n_head=4)
NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


@dataclass(frozen=True)
class Plan:
    name: str
    gpt2: Dict[str, Any]  # GPT2Config overrides ({}: the defaults, 124 M parameters)
    gpt2_batch: int
    gpt2_seq: int
    repeats: int
    warmup: int  # untimed steps first (step 0 has no x_{t−1}, and the defaults' cold probe)
    steps: Dict[str, int]  # timed steps per configuration run, by workload
    defaults_steps: Dict[str, int]  # the defaults' window: a whole probe interval (100) where it fits
    mixed_steps: Dict[str, int]  # the interleaved run's window (a multiple of 4)
    sync_steps: int
    bitwise_steps: int
    replay_steps: int
    replay_seq: int  # tokens per sequence of the float32 GPT-2 replayed in float64 (2 sequences, 2 layers)
    time_limit: float  # seconds for the whole run; repeats are dropped to stay within it
    threads: int  # torch intra-op threads (0: torch's default)


FULL = Plan("full", {}, 8, 1024, repeats=3, warmup=5, steps={"gpt2": 20, "mlp": 200},
            defaults_steps={"gpt2": 100, "mlp": 200}, mixed_steps={"gpt2": 24, "mlp": 200}, sync_steps=8,
            bitwise_steps=4, replay_steps=6, replay_seq=128, time_limit=300.0, threads=0)
TINY = Plan("tiny", TINY_GPT2, 2, 64, repeats=2, warmup=3, steps={"gpt2": 4, "mlp": 8},
            defaults_steps={"gpt2": 4, "mlp": 8}, mixed_steps={"gpt2": 8, "mlp": 8}, sync_steps=3,
            bitwise_steps=3, replay_steps=4, replay_seq=64, time_limit=150.0, threads=1)


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.start, self.seconds = time.perf_counter(), seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()


DEADLINE = Deadline(FULL.time_limit)


def log(message: str) -> None:
    print(f"[{DEADLINE.elapsed():6.1f} s] {message}", file=sys.stderr, flush=True)


def error_entry(where: str, exc: BaseException) -> Dict[str, str]:
    lines = str(exc).strip().splitlines()
    return {"where": where, "error": f"{type(exc).__name__}: {lines[0] if lines else ''}"[:500],
            "traceback": "".join(traceback.format_exception(exc)[-4:])[-2000:]}


# --- the device: clock, memory, synchronisation probes (one implementation each, chosen once) ---


class HostClock:
    """Host wall time: on the CPU the work is done when the call returns."""

    label = "`time.perf_counter`"

    def mark(self) -> float:
        return time.perf_counter()

    def wait(self) -> None:
        pass

    @staticmethod
    def seconds(a: float, b: float) -> float:
        return b - a


class CudaClock:
    """CUDA events on the current stream: device time between two marks, read after ``wait()``
    (``Event.elapsed_time`` needs both events completed; it returns milliseconds)."""

    label = "CUDA events (`torch.cuda.Event(enable_timing=True)`)"

    def mark(self) -> "torch.cuda.Event":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def wait(self) -> None:
        torch.cuda.synchronize()

    @staticmethod
    def seconds(a: "torch.cuda.Event", b: "torch.cuda.Event") -> float:
        return a.elapsed_time(b) / 1e3


def _status_bytes(field_name: str) -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return math.nan


class HostMemory:
    """The process's resident set: high-water mark reset through ``/proc/self/clear_refs``. The C
    allocator keeps memory freed by earlier runs, so on the CPU these figures are approximate."""

    label = "resident set size (`VmHWM` after `/proc/self/clear_refs`; approximate)"

    def start(self) -> None:
        gc.collect()
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        self.origin = _status_bytes("VmRSS")

    def peak(self) -> float:
        return _status_bytes("VmHWM") - self.origin

    def now(self) -> float:
        return _status_bytes("VmRSS") - self.origin


class CudaMemory:
    """``torch.cuda.max_memory_allocated`` since ``reset_peak_memory_stats()``, and
    ``memory_allocated``: bytes held by tensors (the caching allocator's own reserve excluded)."""

    label = "`torch.cuda.max_memory_allocated` / `memory_allocated`"

    def start(self) -> None:
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        self.origin = float(torch.cuda.memory_allocated())

    def peak(self) -> float:
        return float(torch.cuda.max_memory_allocated()) - self.origin

    def now(self) -> float:
        return float(torch.cuda.memory_allocated()) - self.origin


class Tally:
    """Counted events by side (the training thread, or a background thread) and by location."""

    def __init__(self, training_ident: int) -> None:
        self.training_ident = training_ident
        self.training = 0
        self.background = 0
        self.locations: collections.Counter = collections.Counter()
        self.background_locations: collections.Counter = collections.Counter()
        self.threads: collections.Counter = collections.Counter()
        self.kinds: collections.Counter = collections.Counter()
        self._lock = threading.Lock()

    def training_side(self) -> bool:
        """The training thread, or a thread torch started for it (the autograd engine's device
        threads run backward and its hooks while the training thread waits); not a Python thread
        that the agent started (the writer)."""
        if threading.get_ident() == self.training_ident:
            return True
        dummy = getattr(threading, "_DummyThread", None)
        current = threading.current_thread()
        return isinstance(current, dummy) if dummy is not None else current.name.startswith("Dummy-")

    def add(self, kind: str, site: str) -> None:
        training = self.training_side()
        with self._lock:
            self.threads[threading.current_thread().name] += 1
            self.kinds[kind] += 1
            if training:
                self.training += 1
                self.locations[site] += 1
            else:
                self.background += 1
                self.background_locations[site] += 1


_SKIP_FUNCTIONS = {"__torch_dispatch__", "__torch_function__", "_show", "add", "_count"}


def call_site() -> str:
    """``file:line function`` of the innermost frame outside torch and the warnings machinery,
    and ``via`` the innermost frame in moxco's code, when that is a different one."""
    torch_dir = str(Path(torch.__file__).parent)
    moxco_dirs = tuple(str(p) for p in _moxco_dirs())
    frame = sys._getframe(1)
    site = via = None
    while frame is not None and (site is None or via is None):
        filename = frame.f_code.co_filename
        internal = (filename.startswith(torch_dir) or filename == warnings.__file__
                    or (filename == __file__ and frame.f_code.co_name in _SKIP_FUNCTIONS) or filename.startswith("<"))
        here = f"{_short(filename)}:{frame.f_lineno} {frame.f_code.co_name}"
        if site is None and not internal:
            site = here
        if via is None and filename.startswith(moxco_dirs):
            via = here
        frame = frame.f_back
    site = site or "unknown"
    return site if via is None or via == site else f"{site} (via {via})"


@functools.lru_cache(maxsize=1)
def _moxco_dirs() -> Tuple[Path, ...]:
    import moxco
    import moxco.agent
    import moxco.collector

    return tuple(Path(m.__file__).parent for m in (moxco, moxco.agent, moxco.collector))


def _short(filename: str) -> str:
    path = Path(filename)
    for base in (ROOT, *(p.parent for p in _moxco_dirs())):
        try:
            return str(path.relative_to(base))
        except ValueError:
            continue
    parts = path.parts
    return "/".join(parts[parts.index("site-packages") + 1:]) if "site-packages" in parts else path.name


class CudaSyncDebug:
    """``torch.cuda.set_sync_debug_mode("warn")`` (process-wide), its warnings recorded by the thread
    that raised them; other warnings pass through."""

    label = "`torch.cuda.set_sync_debug_mode(\"warn\")`"
    key = "cuda_sync_debug"

    def __init__(self, message: str = SYNC_WARNING, set_mode: Optional[Callable[[str], None]] = None) -> None:
        self.message = message
        self.set_mode = set_mode if set_mode is not None else torch.cuda.set_sync_debug_mode

    @contextlib.contextmanager
    def counting(self) -> Iterator[Tally]:
        tally = Tally(threading.get_ident())
        with warnings.catch_warnings():  # restores showwarning and the filters afterwards
            original = warnings.showwarning

            def _show(message, category, filename, lineno, file=None, line=None):
                if self.message in str(message):
                    tally.add("synchronisation", call_site())
                else:
                    original(message, category, filename, lineno, file, line)

            warnings.filterwarnings("always", message=".*" + re.escape(self.message))
            warnings.showwarning = _show
            self.set_mode("warn")
            try:
                yield tally
            finally:
                self.set_mode("default")


# host reads: operations whose result the host must wait for when their input is on the device
_READ_OPS = {"_local_scalar_dense", "nonzero", "equal", "allclose", "masked_select", "_unique", "_unique2",
             "unique_dim", "unique_consecutive", "is_nonzero", "nonzero_static", "item"}


def _tensors(values: Any) -> Iterator[Tensor]:
    for v in values:
        if isinstance(v, Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from _tensors(v)


class _DispatchReads(TorchDispatchMode):
    def __init__(self, tally: Tally, device_type: str) -> None:
        super().__init__()
        self.tally, self.device_type = tally, device_type

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        on_device = any(t.device.type == self.device_type for t in _tensors(list(args) + list(kwargs.values())))
        if on_device and name in _READ_OPS:
            self.tally.add(name, call_site())
        elif self.device_type != "cpu" and name in ("_to_copy", "copy_"):
            out_device = (kwargs.get("device") if name == "_to_copy" else (args[0].device if args else None))
            src = args[0] if name == "_to_copy" else (args[1] if len(args) > 1 else None)
            if (isinstance(src, Tensor) and src.device.type == self.device_type and out_device is not None
                    and torch.device(out_device).type == "cpu"):
                self.tally.add("copy to host", call_site())
        return func(*args, **kwargs)


class _FunctionReads(TorchFunctionMode):
    """What the dispatch mode does not see: ``.tolist()`` and ``.numpy()`` read a CPU tensor's storage
    without an operator (on an accelerator their copy to the host is a dispatched ``_to_copy``); and
    ``torch.tensor(data, device=…)`` copies host data to the device inside the factory (from pageable
    memory, a synchronising copy on an accelerator)."""

    def __init__(self, tally: Tally, device_type: str) -> None:
        super().__init__()
        self.tally, self.device_type = tally, device_type

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in ("tolist", "numpy") and self.device_type == "cpu":
            self.tally.add(name, call_site())
        out = func(*args, **kwargs)
        if (name in ("tensor", "as_tensor") and kwargs.get("device") is not None and args
                and not isinstance(args[0], Tensor) and isinstance(out, Tensor) and out.numel() > 0
                and out.device.type == self.device_type):  # (an empty tensor copies nothing)
            self.tally.add("host data to the device", call_site())
        return out


class HostReads:
    """Host reads of tensor values on the training thread: both modes are pushed on that thread only
    (torch's mode stacks are thread-local, and the autograd engine carries them into backward)."""

    key = "host_reads"

    def __init__(self, device_type: str) -> None:
        self.device_type = device_type
        where = "every tensor" if device_type == "cpu" else f"{device_type} tensors"
        self.label = (f"host reads of tensor values on the training thread ({where}; `TorchDispatchMode` + "
                      "`TorchFunctionMode`)")

    @contextlib.contextmanager
    def counting(self) -> Iterator[Tally]:
        tally = Tally(threading.get_ident())
        with _FunctionReads(tally, self.device_type), _DispatchReads(tally, self.device_type):
            yield tally


@dataclass
class Device:
    device: torch.device
    clock: Any
    memory: Any
    sync_probes: List[Any]

    @staticmethod
    def choose(name: str) -> "Device":
        device = torch.device(name)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise SystemExit("--device cuda: torch sees no CUDA device")
            if device.index is None:  # "cuda": the current device, named by its index
                device = torch.device("cuda", torch.cuda.current_device())
            return Device(device, CudaClock(), CudaMemory(), [CudaSyncDebug(), HostReads("cuda")])
        if device.type != "cpu":
            raise SystemExit(f"--device {name}: only cuda and cpu are supported")
        # the agent's tensor path, the one it takes on an accelerator, not its fused CPU kernels
        # (read when the kernels are first used; inherited by the correctness subprocess)
        os.environ.setdefault("MOXCO_NATIVE", "0")
        return Device(device, HostClock(), HostMemory(), [HostReads("cpu")])


def device_info(device: torch.device) -> Dict[str, Any]:
    import transformers

    info: Dict[str, Any] = {"type": device.type, "torch": torch.__version__, "transformers": transformers.__version__,
                            "python": platform.python_version(), "cpu_count": os.cpu_count(),
                            "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=torch.cuda.get_device_name(device), memory_gib=props.total_memory / 2**30,
                    capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            info["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    else:
        info["name"] = info["cpu"]
    return info


# --- workloads ----------------------------------------------------------------------------------


@dataclass
class Work:
    name: str
    description: str
    template: nn.Module  # the initial weights, on the device; every run trains a deep copy
    batches: List[Any]  # on the device
    forward: Callable[[nn.Module, Any], Tensor]  # one batch's loss (autocast inside)
    attach_options: Dict[str, Any]
    lr: float
    reference: Callable[[], Tuple[nn.Module, Callable[[nn.Module, Any], Tensor]]]  # float64 CPU model and loss
    info: Dict[str, Any] = field(default_factory=dict)

    def model(self) -> nn.Module:
        return copy.deepcopy(self.template)

    def named(self, model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    @property
    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for _, p in self.named(self.template))

    @property
    def parameters(self) -> int:
        return sum(p.numel() for _, p in self.named(self.template))


def eager_attention(model: nn.Module) -> nn.Module:
    """Switch a Hugging Face model to its eager attention (every transformers version this runs on)."""
    setter = getattr(model, "set_attn_implementation", None)
    if callable(setter):
        setter("eager")
    else:
        model.config._attn_implementation = "eager"
    if model.config._attn_implementation != "eager":
        raise RuntimeError(f"could not switch to eager attention: {model.config._attn_implementation!r}")
    return model


def _cpu(batch: Any) -> Any:
    return tuple(t.cpu() for t in batch) if isinstance(batch, (tuple, list)) else batch.cpu()


def gpt2_work(device: torch.device, overrides: Dict[str, Any], batch: int, seq: int, *, autocast: bool,
              attn: Optional[str] = None, name: str = "gpt2", seed: int = 0, n_batches: int = 4) -> Work:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    config = GPT2Config(**overrides)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    if attn == "eager":
        eager_attention(model)
    model.to(device).train()
    g = torch.Generator().manual_seed(seed + 1)
    batches = [torch.randint(0, config.vocab_size, (batch, seq), generator=g).to(device) for _ in range(n_batches)]
    dtype = torch.bfloat16 if autocast else None

    def forward(m: nn.Module, ids: Tensor) -> Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            return m(input_ids=ids, labels=ids).loss

    def reference():
        ref = eager_attention(GPT2LMHeadModel(GPT2Config(**overrides)))
        ref.to(dtype=torch.float64).train()  # dropout as the workload's config says (off for the replay)
        return ref, lambda m, ids: m(input_ids=ids.cpu(), labels=ids.cpu()).loss

    size = "GPT2Config() defaults" if not overrides else \
        f"{config.n_layer} layers, {config.n_head} heads, width {config.n_embd}, vocabulary {config.vocab_size}"
    dropout = "dropout on" if config.resid_pdrop > 0 else "dropout off"
    work = Work(name, f"GPT2LMHeadModel ({size}), batch {batch}×{seq} tokens, "
                      f"{'bf16 autocast' if autocast else 'float32'}, {dropout}, AdamW",
                model, batches, forward, {}, 3e-4, reference)
    work.info = {"attention": model.config._attn_implementation, "autocast": str(dtype) if dtype else None,
                 "tokens_per_step": batch * seq, "dropout": config.resid_pdrop}
    work.description += f", {work.parameters / 1e6:.1f} M parameters, `{work.info['attention']}` attention"
    return work


def mlp_work(device: torch.device, seed: int = 0) -> Work:
    source = mlp_workload(seed=seed)
    torch.manual_seed(seed)
    model, _, criterion = source.build()
    model.to(device).train()
    batches = [tuple(t.to(device) for t in b) for b in source.batches]

    def forward(m: nn.Module, batch: Tuple[Tensor, Tensor]) -> Tensor:
        return criterion(m(batch[0]), batch[1])

    def reference():
        ref = copy.deepcopy(model).to(device="cpu", dtype=torch.float64)
        return ref, lambda m, b: nn.functional.cross_entropy(m(b[0].cpu().double()), b[1].cpu())

    return Work("mlp", "MLP 784→512→512→10 (the CPU benchmark's), batch 128, float32, CrossEntropyLoss, AdamW",
                model, batches, forward, {"criterion": criterion}, 1e-3, reference, {"tokens_per_step": None})


def make_optimizer(params: List[Tensor], lr: float) -> Tuple[torch.optim.Optimizer, bool]:
    """AdamW, ``fused=True`` where this torch has it for the parameters' device, else the default."""
    try:
        return torch.optim.AdamW(params, lr=lr, fused=True), True
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(params, lr=lr), False


class Loop:
    """One training run: a fresh copy of the workload's model, AdamW, and the agent when asked
    (``attach`` with an embedded SQLite store in ``tmpdir``, ``seed=0``); ``twin`` keeps a copy of
    the model made before ``attach`` (without the agent's hooks)."""

    def __init__(self, work: Work, agent_options: Optional[Dict[str, Any]], tmpdir: str, label: str,
                 seed: int = 0, twin: bool = False) -> None:
        import moxco.agent

        self.work = work
        torch.manual_seed(seed)
        self.model = work.model()
        self.named = work.named(self.model)
        self.params = [p for _, p in self.named]
        self.optimizer, self.fused = make_optimizer(self.params, work.lr)
        self.twin = copy.deepcopy(self.model) if twin else None
        self.agent = None
        self.url = self.run = None
        if agent_options is not None:
            self.url = f"sqlite:///{tmpdir}/{work.name}-{label}-{uuid.uuid4().hex[:8]}.db"
            self.agent = moxco.agent.attach(self.model, self.optimizer, url=self.url, run=f"{work.name}-{label}",
                                            seed=0, **work.attach_options, **agent_options)
            self.run = self.agent.run

    def batch(self, i: int) -> Any:
        return self.work.batches[i % len(self.work.batches)]

    def forward_backward(self, i: int) -> None:
        self.work.forward(self.model, self.batch(i)).backward()

    def update(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, i: int) -> None:
        self.forward_backward(i)
        self.update()

    def floor_pass(self, i: int) -> None:
        """One extra forward+backward of step i's batch on the twin (``.grad`` untouched)."""
        twin_params = [p for p in self.twin.parameters() if p.requires_grad]
        torch.autograd.grad(self.work.forward(self.twin, self.batch(i)), twin_params)

    def sync_twin(self) -> None:
        with torch.no_grad():
            torch._foreach_copy_([p for p in self.twin.parameters() if p.requires_grad], self.params)

    def close(self) -> Dict[str, str]:
        """Close the agent (idempotent); its errors: the metric groups it disabled."""
        if self.agent is None:
            return {}
        self.agent.close()
        return dict(self.agent.errors)

    def __enter__(self) -> "Loop":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()  # also when the run failed: the writer thread stops, the store closes


# --- timing -------------------------------------------------------------------------------------


def timed_run(work: Work, dev: Device, key: str, steps: int, warmup: int, tmpdir: str, seed: int) -> Dict[str, Any]:
    """Mean device time per step over a window of ``steps`` after ``warmup``, the window's wall time,
    the median time of ``optimizer.step()`` (where the agent's per-step work runs), and memory: peak
    and retained, over what was allocated before the model was copied."""
    dev.memory.start()
    with Loop(work, CONFIGS[key][1], tmpdir, key, seed) as loop:
        for i in range(warmup):
            loop.step(i)
        dev.clock.wait()
        t0 = time.perf_counter()
        first = dev.clock.mark()
        around_step = []  # optimizer.step(): AdamW, and the agent's hooks when attached
        for i in range(warmup, warmup + steps):
            loop.forward_backward(i)
            before = dev.clock.mark()
            loop.optimizer.step()
            around_step.append((before, dev.clock.mark()))
            loop.optimizer.zero_grad(set_to_none=True)
        last = dev.clock.mark()
        dev.clock.wait()
        wall = time.perf_counter() - t0
        out = {"step_s": dev.clock.seconds(first, last) / steps, "wall_s": wall / steps, "steps": steps,
               "optimizer_step_s": median([dev.clock.seconds(a, b) for a, b in around_step]),
               "peak_bytes": dev.memory.peak(), "retained_bytes": dev.memory.now(), "fused_adamw": loop.fused}
        out["errors"] = loop.close()
    return out


def mixed_run(work: Work, dev: Device, steps: int, warmup: int, tmpdir: str, seed: int,
              label: str = "mixed") -> Dict[str, Any]:
    """``reeval_every=2, probe_every=4`` with the floor's pass at ``x_{t−1}`` on odd steps; events
    around the forward+backward, the floor's pass and ``optimizer.step()`` of every timed step."""
    marks = []
    with Loop(work, MIXED, tmpdir, label, seed, twin=True) as loop:
        for i in range(warmup + steps):
            if i % 2 == 0:
                loop.sync_twin()  # x_i: x_{t−1} at the next (odd) step's floor pass; untimed
            m0 = dev.clock.mark()
            loop.forward_backward(i)
            m1 = dev.clock.mark()
            if i % 2 == 1:
                loop.floor_pass(i)
            m2 = dev.clock.mark()
            loop.optimizer.step()
            m3 = dev.clock.mark()
            loop.optimizer.zero_grad(set_to_none=True)
            if i >= warmup:
                marks.append((i, m0, m1, m2, m3))
        dev.clock.wait()
        errors = loop.close()
    s = dev.clock.seconds
    kinds: Dict[str, Dict[str, List[float]]] = {k: {"forward_backward": [], "floor": [], "optimizer_step": []}
                                                for k in ("free", "reeval", "probe")}
    for i, m0, m1, m2, m3 in marks:
        kind = "free" if i % 2 else ("probe" if i % 4 == 0 else "reeval")
        kinds[kind]["forward_backward"].append(s(m0, m1))
        kinds[kind]["floor"].append(s(m1, m2))
        kinds[kind]["optimizer_step"].append(s(m2, m3))
    free_opt, reeval_opt, probe_opt = (median(kinds[k]["optimizer_step"]) for k in ("free", "reeval", "probe"))
    return {"floor_s": median(kinds["free"]["floor"]), "reeval_s": reeval_opt - free_opt,
            "probe_s": probe_opt - reeval_opt if "probe" not in errors else math.nan,
            "free_optimizer_step_s": free_opt, "forward_backward_s": median(kinds["free"]["forward_backward"]),
            "steps": steps, "errors": errors}


def timing_section(work: Work, dev: Device, plan: Plan, tmpdir: str, budget_s: float,
                   results: Dict[str, Any], errors: List[Dict[str, str]]) -> None:
    """Interleaved repeats of every configuration and the mixed run; per-repeat ratios to that
    repeat's no-agent run. A repeat starts only while the last one's duration fits in ``budget_s``."""
    order = list(CONFIGS) + ["mixed"]
    runs: Dict[str, List[Optional[Dict[str, Any]]]] = {k: [] for k in order}
    out = results.setdefault("timing", {})
    started = time.perf_counter()
    last = 0.0
    for r in range(plan.repeats):
        spent = time.perf_counter() - started
        if r > 0 and spent + last > budget_s:
            log(f"{work.name}: {r} repeat(s), not {plan.repeats}: the time limit")
            break
        t_repeat = time.perf_counter()
        for key in order[r % len(order):] + order[:r % len(order)]:
            log(f"{work.name}: repeat {r + 1}/{plan.repeats}: {key}")
            try:
                if key == "mixed":
                    runs[key].append(mixed_run(work, dev, plan.mixed_steps[work.name], max(plan.warmup, 1), tmpdir, r))
                else:
                    steps = plan.defaults_steps[work.name] if key == "defaults" else plan.steps[work.name]
                    runs[key].append(timed_run(work, dev, key, steps, plan.warmup, tmpdir, r))
            except Exception as exc:  # one failed run leaves the others' figures
                errors.append(error_entry(f"{work.name}/timing/repeat {r + 1}/{key}", exc))
                runs[key].append(None)
                _release(dev)
        last = time.perf_counter() - t_repeat
    out.update(summarise_timing(work, runs, plan))


def _release(dev: Device) -> None:
    gc.collect()
    if dev.device.type == "cuda":
        torch.cuda.empty_cache()


def _get(run: Optional[Dict[str, Any]], key: str) -> float:
    return math.nan if run is None else float(run.get(key, math.nan))


def _ratio(a: float, b: float) -> float:
    return a / b if b and not (math.isnan(a) or math.isnan(b)) else math.nan


def summarise_timing(work: Work, runs: Dict[str, List[Optional[Dict[str, Any]]]], plan: Plan) -> Dict[str, Any]:
    base = runs["base"]
    pbytes = work.param_bytes
    configs = {}
    for key in CONFIGS:
        rs = runs[key]
        ratio = [_ratio(_get(r, "step_s"), _get(b, "step_s")) for r, b in zip(rs, base)]
        wall = [_ratio(_get(r, "wall_s"), _get(b, "wall_s")) for r, b in zip(rs, base)]
        peak = [(_get(r, "peak_bytes") - _get(b, "peak_bytes")) / pbytes for r, b in zip(rs, base)]
        kept = [(_get(r, "retained_bytes") - _get(b, "retained_bytes")) / pbytes for r, b in zip(rs, base)]
        # the agent's work in optimizer.step(), timed directly, over the no-agent step
        direct = [_ratio(_get(r, "optimizer_step_s") - _get(b, "optimizer_step_s"), _get(b, "step_s"))
                  for r, b in zip(rs, base)]
        errors = {}
        for r in rs:
            errors.update((r or {}).get("errors", {}))
        configs[key] = {"label": CONFIGS[key][0], "runs": rs, "ratios": ratio, "wall_ratios": wall,
                        "step_s": median([_get(r, "step_s") for r in rs]), "ratio": median(ratio),
                        "optimizer_step_s": median([_get(r, "optimizer_step_s") for r in rs]),
                        "in_step_over_step": median(direct), "in_step_over_step_each": direct,
                        "wall_ratio": median(wall), "peak_copies": median(peak), "retained_copies": median(kept),
                        "peak_copies_each": peak, "retained_copies_each": kept, "errors": errors,
                        "steps": plan.defaults_steps[work.name] if key == "defaults" else plan.steps[work.name]}
    mixed = runs["mixed"]
    reeval_ratio = [_ratio(_get(m, "reeval_s"), _get(m, "floor_s")) for m in mixed]
    cross = [_ratio(_get(a, "step_s") - _get(f, "step_s"), _get(m, "floor_s"))
             for a, f, m in zip(runs["reeval1"], runs["free"], mixed)]
    probe_step = [_ratio(_get(m, "probe_s"), _get(b, "step_s")) for m, b in zip(mixed, base)]
    probe_floor = [_ratio(_get(m, "probe_s"), _get(m, "floor_s")) for m in mixed]
    mixed_errors: Dict[str, str] = {}
    for m in mixed:
        mixed_errors.update((m or {}).get("errors", {}))
    window = plan.defaults_steps[work.name]
    return {
        "repeats": len(base), "configs": configs,
        "defaults_window_amortises_probe": plan.warmup <= 100 <= plan.warmup + window - 1,
        "reeval": {"runs": mixed, "ratios": reeval_ratio, "ratio": median(reeval_ratio),
                   "reeval_s": median([_get(m, "reeval_s") for m in mixed]),
                   "floor_s": median([_get(m, "floor_s") for m in mixed]),
                   "cross_check_ratios": cross, "cross_check_ratio": median(cross), "errors": mixed_errors},
        "probe": {"probe_s": median([_get(m, "probe_s") for m in mixed]), "step_ratios": probe_step,
                  "step_ratio": median(probe_step), "floor_ratios": probe_floor, "floor_ratio": median(probe_floor),
                  "error": mixed_errors.get("probe") or mixed_errors.get("sharpness")},
    }


def probe_variant(work: Work, dev: Device, plan: Plan, tmpdir: str, results: Dict[str, Any],
                  errors: List[Dict[str, str]]) -> None:
    """One mixed run of the same GPT-2 with eager attention (plain matrix products, which double
    backward goes through on every backend): the probe's time if the default attention's fails."""
    try:
        eager = copy.copy(work)
        eager.template = eager_attention(copy.deepcopy(work.template))
        eager.name = f"{work.name}-eager"
        log(f"{work.name}: the mixed run with eager attention")
        run = mixed_run(eager, dev, plan.mixed_steps[work.name], max(plan.warmup, 1), tmpdir, 0, label="mixed-eager")
        base = results["timing"]["configs"]["base"]["step_s"]
        results["probe_eager_attention"] = {
            "run": run, "probe_s": run["probe_s"], "floor_s": run["floor_s"], "reeval_s": run["reeval_s"],
            "probe_floor_ratio": _ratio(run["probe_s"], run["floor_s"]),
            "reeval_floor_ratio": _ratio(run["reeval_s"], run["floor_s"]),
            "probe_step_ratio": _ratio(run["probe_s"], base), "errors": run["errors"]}
        del eager
    except Exception as exc:
        errors.append(error_entry(f"{work.name}/probe with eager attention", exc))
    _release(dev)


# --- host synchronisations ----------------------------------------------------------------------


def sync_section(work: Work, dev: Device, plan: Plan, tmpdir: str, results: Dict[str, Any],
                 errors: List[Dict[str, str]]) -> None:
    """Each configuration's training-thread synchronisations over ``plan.sync_steps`` steps after
    warm-up, with each probe of the device, minus the no-agent loop's."""
    warmup = max(plan.warmup, 3)  # past the cold probe (step 0) and the probe run's first warm one (step 2)
    out = results.setdefault("syncs", {})
    for probe in dev.sync_probes:
        counts: Dict[str, Any] = {"label": probe.label}
        for key, (label, options) in SYNC_CONFIGS.items():
            if DEADLINE.left() < SECTION_MARGIN_S:
                errors.append({"where": f"{work.name}/syncs/{probe.key}/{key}", "error": "skipped: the time limit"})
                counts[key] = None
                continue
            log(f"{work.name}: counting {probe.key} with {key}")
            try:
                with Loop(work, options, tmpdir, f"sync-{key}") as loop:
                    for i in range(warmup):
                        loop.step(i)
                    dev.clock.wait()
                    with probe.counting() as tally:
                        for i in range(warmup, warmup + plan.sync_steps):
                            loop.step(i)
                    dev.clock.wait()
                    run_errors = loop.close()
                counts[key] = {"label": label, "steps": plan.sync_steps, "training": tally.training,
                               "background": tally.background, "training_per_step": tally.training / plan.sync_steps,
                               "locations": dict(tally.locations.most_common(12)),
                               "background_locations": dict(tally.background_locations.most_common(6)),
                               "kinds": dict(tally.kinds), "threads": dict(tally.threads), "errors": run_errors}
            except Exception as exc:
                errors.append(error_entry(f"{work.name}/syncs/{probe.key}/{key}", exc))
                counts[key] = None
            _release(dev)
        base = counts.get("base")
        for key in SYNC_CONFIGS:
            if key != "base" and counts.get(key) is not None:
                counts[key]["agent_per_step"] = (counts[key]["training_per_step"] - base["training_per_step"]
                                                 if base is not None else math.nan)
                counts[key]["agent_locations"] = _location_difference(counts[key]["locations"],
                                                                      base["locations"] if base else {})
        out[probe.key] = counts


def _location_difference(agent: Dict[str, int], base: Dict[str, int]) -> Dict[str, int]:
    return {k: v - base.get(k, 0) for k, v in agent.items() if v - base.get(k, 0) > 0}


# --- correctness (a subprocess: deterministic algorithms, cuBLAS workspace config) -------------


def parameters_differ(expected: List[Tensor], named: List[Tuple[str, Tensor]]) -> Optional[Dict[str, Any]]:
    """None when every parameter is bitwise equal to ``expected``; else which differ, and by how much."""
    differing = [(n, e, p) for e, (n, p) in zip(expected, named) if not torch.equal(e, p.detach())]
    if not differing:
        return None
    name, e, p = differing[0]
    return {"tensors_differing": len(differing), "first": name,
            "max_abs_difference": float((e.double() - p.detach().double()).abs().max())}


def bitwise_check(work: Work, steps: int, tmpdir: str) -> Dict[str, Any]:
    """Three runs from the same seed: no agent (the reference), no agent again (the control: is the
    loop deterministic at all?), and the agent with ``BITWISE_AGENT``; the parameters after every
    step compared bit for bit with the reference's."""
    reference: List[List[Tensor]] = []

    def run(options: Optional[Dict[str, Any]], label: str) -> Tuple[List[Optional[Dict[str, Any]]], Dict[str, str]]:
        found = []
        with Loop(work, options, tmpdir, label) as loop:
            for i in range(steps):
                loop.step(i)
                if label == "reference":
                    reference.append([p.detach().clone() for p in loop.params])
                else:
                    found.append(parameters_differ(reference[i], loop.named))
            return found, loop.close()

    run(None, "reference")
    control, _ = run(None, "control")
    agent, errors = run(BITWISE_AGENT, "agent")
    return {"steps": steps, "agent_options": BITWISE_AGENT, "control_identical": [d is None for d in control],
            "agent_identical": [d is None for d in agent], "control_differences": control,
            "agent_differences": agent, "agent_errors": errors,
            "deterministic": all(d is None for d in control),
            "identical": all(d is None for d in agent) and len(agent) == steps}


def record_parameters(loop: Loop) -> Dict[str, Tensor]:
    return {n: p.detach().to("cpu", copy=True) for n, p in loop.named}


def replay_check(work: Work, steps: int, tmpdir: str) -> Dict[str, Any]:
    """A float32 run with ``REPLAY_AGENT``; the stored metrics against ``float64_replay`` of the same
    steps from the recorded ``x_t`` (before each update) and batches."""
    from moxco.collector import open_store

    xs = []
    with Loop(work, REPLAY_AGENT, tmpdir, "replay") as loop:
        for i in range(steps):
            loop.forward_backward(i)
            xs.append(record_parameters(loop))  # x_i: the point step i's gradient is taken at
            loop.update()
        xs.append(record_parameters(loop))  # x_steps, for the last update_norm
        errors = loop.close()
    store = open_store(loop.url)
    try:
        stored = {m: dict(zip(*(a.tolist() for a in store.series(loop.run, m)))) for m in REPLAYED}
    finally:
        store.close()
    reference, scales = float64_replay(work, xs, [_cpu(loop.batch(i)) for i in range(steps)])
    metrics = {}
    for name in REPLAYED:
        ref, got = reference[name], stored[name]
        rows = []
        for step in sorted(set(ref) | set(got)):
            a, b = got.get(step), ref.get(step)
            tol = REPLAY_RTOL * scales[name].get(step, math.nan)
            err = abs(a - b) if a is not None and b is not None else math.nan
            rows.append({"step": step, "agent": a, "float64": b, "error": err, "tolerance": tol,
                         "within": a is not None and b is not None and err <= tol})
        worst = max((r["error"] / r["tolerance"] for r in rows if r["tolerance"] > 0 and not math.isnan(r["error"])),
                    default=math.nan)
        metrics[name] = {"rows": rows, "ok": bool(rows) and all(r["within"] for r in rows),
                         "worst_error_over_tolerance": worst,
                         "worst_relative_to_scale": worst * REPLAY_RTOL if not math.isnan(worst) else math.nan}
    return {"steps": steps, "agent_options": REPLAY_AGENT, "agent_errors": errors, "metrics": metrics,
            "tolerance": {"rtol": REPLAY_RTOL, "rule": TOLERANCE_RULE},
            "ok": all(m["ok"] for m in metrics.values()) and not errors}


TOLERANCE_RULE = ("|agent − float64| ≤ rtol × scale; scale: |value| for loss, grad_norm_sq, update_norm, distance; "
                  "‖g_t‖·‖x_t − x_{t−1}‖ for update_corr(_rs); |f(x_t)| + |f(x_{t−1})| for loss_diff; that plus "
                  "‖g_t‖·‖x_t − x_{t−1}‖ for inst_gap; (‖g_t‖ + ‖∇f(x_{t−1})‖)/‖x_t − x_{t−1}‖ for inst_smooth; "
                  "the largest scale so far for the running aggregates")


def float64_replay(work: Work, xs: List[Dict[str, Tensor]], batches: List[Any]
                   ) -> Tuple[Dict[str, Dict[int, float]], Dict[str, Dict[int, float]]]:
    """The metrics from their definitions, in float64 on the CPU with plain autograd: ``f(x_t, z_t)``,
    ``g_t``, and for t ≥ 1 ``f(x_{t−1}, z_t)``, ``∇f(x_{t−1}, z_t)``; ``update_corr`` stored at t is
    ``⟨g_t, x_t − x_{t−1}⟩``, ``update_norm`` at t is ``‖x_{t+1} − x_t‖``. Returns the values and
    each value's scale (``TOLERANCE_RULE``), by metric and step."""
    model, loss_fn = work.reference()
    named = dict(model.named_parameters())
    names = list(xs[0])

    def flat(x: Dict[str, Tensor]) -> Tensor:
        return torch.cat([x[n].reshape(-1).double() for n in names])

    def loss_and_grad(x: Dict[str, Tensor], batch: Any) -> Tuple[float, Tensor]:
        with torch.no_grad():
            for n in names:
                named[n].copy_(x[n].double())
        params = [named[n] for n in names]
        loss = loss_fn(model, batch)
        grads = torch.autograd.grad(loss, params)
        return float(loss), torch.cat([g.reshape(-1) for g in grads])

    v: Dict[str, Dict[int, float]] = {m: {} for m in REPLAYED}
    sc: Dict[str, Dict[int, float]] = {m: {} for m in REPLAYED}
    flats = [flat(x) for x in xs]
    x0 = flats[0]
    avg_sum, n_avg, exp_gap, exp_smooth, max_smooth = 0.0, 0, 0.0, 0.0, -math.inf
    gap_scale = smooth_scale = 0.0
    for t, batch in enumerate(batches):
        f, g = loss_and_grad(xs[t], batch)
        put = lambda m, value, scale: (v[m].__setitem__(t, value), sc[m].__setitem__(t, scale))
        put("loss", f, abs(f))
        gn = float(g @ g)
        put("grad_norm_sq", gn, gn)
        d = float((flats[t] - x0).norm())
        put("distance", d, d)
        u = float((flats[t + 1] - flats[t]).norm())
        put("update_norm", u, u)
        if t == 0:
            continue
        step = flats[t] - flats[t - 1]
        step_norm = float(step.norm())
        corr = float(g @ step)
        corr_scale = math.sqrt(gn) * step_norm
        put("update_corr", corr, corr_scale)
        put("update_corr_rs", corr, corr_scale)
        f_prev, g_prev = loss_and_grad(xs[t - 1], batch)
        put("loss_diff", f - f_prev, abs(f) + abs(f_prev))
        gap = f - f_prev - corr
        put("inst_gap", gap, abs(f) + abs(f_prev) + corr_scale)
        smooth = float((g - g_prev).norm()) / step_norm
        put("inst_smooth", smooth, (math.sqrt(gn) + float(g_prev.norm())) / step_norm)
        gap_scale, smooth_scale = max(gap_scale, sc["inst_gap"][t]), max(smooth_scale, sc["inst_smooth"][t])
        avg_sum, n_avg = avg_sum + gap, n_avg + 1
        exp_gap = EXP_BETA * exp_gap + (1 - EXP_BETA) * gap
        exp_smooth = EXP_BETA * exp_smooth + (1 - EXP_BETA) * smooth
        max_smooth = max(max_smooth, smooth)
        put("avg_gap", avg_sum / n_avg, gap_scale)
        put("exp_gap", exp_gap, gap_scale)
        put("max_smooth", max_smooth, smooth_scale)
        put("exp_smooth", exp_smooth, smooth_scale)
    return v, sc


def correctness_child(args: argparse.Namespace, plan: Plan) -> None:
    """Runs in the subprocess: writes its JSON to ``args._correctness`` after each part."""
    dev = Device.choose(args.device)
    path = Path(args._correctness)
    out: Dict[str, Any] = {"deterministic_settings": {}, "bitwise": {}, "replay": {}, "errors": [],
                           "nondeterministic_warnings": []}
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    out["deterministic_settings"] = {"use_deterministic_algorithms": "warn_only",
                                     "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
                                     "cudnn.deterministic": True, "cudnn.benchmark": False}

    def save() -> None:
        path.write_text(json.dumps(out, indent=1, default=_json_default, allow_nan=True))

    def checks(section: str, what: str, builders: List[Tuple[str, Callable[[], Work]]],
               check: Callable[[Work], Dict[str, Any]]) -> None:
        for name, build in builders:
            log(f"correctness: {name}: {what}")
            try:
                work = build()
                out[section][name] = {"workload": work.description, **check(work)}
                del work
            except Exception as exc:
                out["errors"].append(error_entry(f"correctness/{section}/{name}", exc))
            _release(dev)
            save()

    with tempfile.TemporaryDirectory(prefix="moxco-gpu-") as tmpdir, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # eager attention: fused attention kernels may accumulate in a nondeterministic order in backward
        checks("bitwise", f"parameters with and without the agent, {plan.bitwise_steps} steps",
               [("gpt2", lambda: gpt2_work(dev.device, plan.gpt2, plan.gpt2_batch, plan.gpt2_seq, autocast=True,
                                           attn="eager")),
                ("mlp", lambda: mlp_work(dev.device))],
               lambda work: bitwise_check(work, plan.bitwise_steps, tmpdir))
        # float32 matrix products in float32 (no TF32), for the replay's tolerance; eager attention: plain
        # matrix products, which honour that setting on every backend
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        checks("replay", f"metrics against a float64 replay, {plan.replay_steps} steps",
               [("gpt2", lambda: gpt2_work(dev.device, {**TINY_GPT2, **NO_DROPOUT}, 2, plan.replay_seq,
                                           autocast=False, attn="eager", name="gpt2-replay")),
                ("mlp", lambda: mlp_work(dev.device))],
               lambda work: replay_check(work, plan.replay_steps, tmpdir))
        out["nondeterministic_warnings"] = sorted({str(w.message)[:300] for w in caught
                                                   if "determinis" in str(w.message)})
    save()


def correctness_section(args: argparse.Namespace, plan: Plan, results: Dict[str, Any], timeout: float) -> None:
    with tempfile.TemporaryDirectory(prefix="moxco-gpu-check-") as tmp:
        path = Path(tmp) / "correctness.json"
        cmd = [sys.executable, __file__, CORRECTNESS_FLAG, str(path), "--device", args.device,
               "--threads", str(args.threads)] + (["--tiny"] if plan is TINY else [])
        log(f"correctness: subprocess (timeout {timeout:.0f} s)")
        try:
            proc = subprocess.run(cmd, timeout=max(timeout, 10), cwd=ROOT)
            code: Optional[int] = proc.returncode
        except subprocess.TimeoutExpired:
            code = None
            results["errors"].append({"where": "correctness", "error": f"timed out after {timeout:.0f} s"})
        if path.exists():
            results["correctness"] = json.loads(path.read_text())
            results["errors"].extend(results["correctness"].pop("errors", []))
        if code not in (0, None):
            results["errors"].append({"where": "correctness", "error": f"the subprocess exited with {code}"})


# --- results: JSON, budgets, markdown -----------------------------------------------------------


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (torch.device, torch.dtype, Path)):
        return str(obj)
    raise TypeError(f"not JSON: {type(obj).__name__}")


def budgets(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Every budget: the measured value, the target, met (True/False; None when not measured)."""
    rows: List[Dict[str, Any]] = []
    # time and memory are judged on an accelerator only: the CPU run checks the script, not the budgets
    judged = results.get("device", {}).get("type") == "cuda"

    def add(name: str, workload: str, value: Any, target: str, met: Optional[bool], note: str = "") -> None:
        rows.append({"budget": name, "workload": workload, "value": value, "target": target, "met": met, "note": note})

    def judge(value: float, ok: bool) -> Optional[bool]:
        return ok if judged and known(value) else None

    def known(x: Any) -> bool:
        return isinstance(x, (int, float)) and not math.isnan(x)

    for name, w in results.get("workloads", {}).items():
        t = w.get("timing", {})
        configs = t.get("configs", {})
        free = configs.get("free", {})
        over = free.get("ratio", math.nan) - 1
        add("free metrics, step time over no agent", name, over, f"≤ {FREE_BUDGET:.0%}",
            judge(over, over <= FREE_BUDGET), _errors_note(free.get("errors")))
        rr = t.get("reeval", {}).get("ratio", math.nan)
        add("re-evaluation / one extra forward+backward", name, rr, f"≤ {REEVAL_BUDGET}",
            judge(rr, rr <= REEVAL_BUDGET), _errors_note(t.get("reeval", {}).get("errors")))
        for key, limit in (("free", FREE_COPIES), ("reeval1", REEVAL_COPIES)):
            kept = configs.get(key, {}).get("retained_copies", math.nan)
            add(f"memory retained between steps, {key}", name, kept, f"≤ {limit} parameter copies",
                judge(kept, kept <= limit + 0.01))
        syncs = w.get("syncs", {})
        probe_key = CudaSyncDebug.key if CudaSyncDebug.key in syncs else HostReads.key
        for key in ("free", "reeval1", "defaults", "probe"):
            c = (syncs.get(probe_key) or {}).get(key)
            value = c.get("agent_per_step", math.nan) if c else math.nan
            label = "synchronisations" if probe_key == CudaSyncDebug.key else "host reads (CPU: no synchronisation)"
            add(f"training-thread {label} a step, {key}", name, value, "0",
                value <= SYNC_BUDGET if known(value) else None)
    correctness = results.get("correctness", {})
    for name, b in correctness.get("bitwise", {}).items():
        ok = b.get("identical")
        add("parameters bitwise identical with and without the agent, every step", name,
            f"{sum(b.get('agent_identical', []))}/{b.get('steps')} steps", "all", ok,
            ("" if b.get("deterministic") else "the no-agent control run was not deterministic itself; ")
            + _errors_note(b.get("agent_errors")))
    for name, r in correctness.get("replay", {}).items():
        worst = max((m.get("worst_error_over_tolerance", math.nan) for m in r.get("metrics", {}).values()),
                    default=math.nan)
        add("metrics = float64 replay (worst error / tolerance)", name, worst, "≤ 1", r.get("ok"),
            _errors_note(r.get("agent_errors")))
    return rows


def _errors_note(errors: Optional[Dict[str, str]]) -> str:
    return "; ".join(f"agent error in {k}: {v}" for k, v in (errors or {}).items())


def _fmt(value: Any, kind: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, str):
        return value
    if kind == "pct":
        return f"{100 * value:+.2f} %"
    if kind == "ms":
        return f"{value * 1e3:.3f}"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _spread(xs: Sequence[float], kind: str = "") -> str:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if len(xs) < 2:
        return ""
    if kind == "pct":
        return f" [{100 * (min(xs) - 1):+.1f}–{100 * (max(xs) - 1):+.1f} %]"
    return f" [{min(xs):.3f}–{max(xs):.3f}]"


def device_line(info: Dict[str, Any]) -> str:
    if info.get("type") == "cuda":
        return (f"{info.get('name')} ({info.get('memory_gib', 0):.0f} GiB, compute capability {info.get('capability')}, "
                f"driver {info.get('driver') or 'unknown'}), CUDA {info.get('cuda')}, cuDNN {info.get('cudnn')}, "
                f"torch {info.get('torch')}, transformers {info.get('transformers')}, Python {info.get('python')}")
    return (f"CPU only: {info.get('name')} ({info.get('cpu_count')} cores, {info.get('threads')} torch thread(s)), "
            f"torch {info.get('torch')}, transformers {info.get('transformers')}, Python {info.get('python')}")


def markdown(results: Dict[str, Any]) -> str:
    info = results.get("device", {})
    cuda = info.get("type") == "cuda"
    lines = [f"### On {info.get('name', '?')}" if cuda else "### On the CPU (the script's own check, not a GPU figure)",
             "",
             f"Command: `{results.get('command')}` ({results.get('elapsed_s', 0) / 60:.1f} min, {results.get('date')}; "
             f"plan `{results.get('plan', {}).get('name')}`). Device: {device_line(info)}. {results.get('source')}. "
             f"Clock: {results.get('clock')}; memory: {results.get('memory')}.",
             "",
             "| budget | workload | measured | target | verdict |",
             "| --- | --- | ---: | --- | --- |"]
    for row in budgets(results):
        value = row["value"]
        kind = "pct" if "over no agent" in row["budget"] else ""
        verdict = {True: "meets", False: "**misses**", None: "not measured" if cuda else "not judged (CPU)"}[row["met"]]
        note = f" ({row['note']})" if row["note"] else ""
        lines.append(f"| {row['budget']} | {row['workload']} | {_fmt(value, kind)} | {row['target']} | {verdict}{note} |")
    for name, w in results.get("workloads", {}).items():
        t = w.get("timing", {})
        if not t:
            continue
        lines += ["", f"#### {name}: {w.get('description')}", "",
                  f"{w.get('parameters', 0):,} parameters ({w.get('param_bytes', 0) / 2**20:.1f} MiB); "
                  f"{t.get('repeats')} repeat(s); ratios are medians of per-repeat ratios to that repeat's "
                  "no-agent run [min–max].", "",
                  "| configuration | timed steps | ms/step | × no agent | wall × no agent | `optimizer.step()`, ms | "
                  "peak memory over no agent, copies | retained, copies | agent errors |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for key, c in t.get("configs", {}).items():
            lines.append(f"| {c['label']} | {c['steps']} | {_fmt(c['step_s'], 'ms')} | {_fmt(c['ratio'])}"
                         f"{_spread(c['ratios'])} | {_fmt(c['wall_ratio'])} | {_fmt(c.get('optimizer_step_s'), 'ms')} | "
                         f"{'' if key == 'base' else _fmt(c['peak_copies'])} | "
                         f"{'' if key == 'base' else _fmt(c['retained_copies'])} | {_errors_note(c['errors']) or ''} |")
        r, p = t.get("reeval", {}), t.get("probe", {})
        free = t.get("configs", {}).get("free", {})
        lines += ["",
                  f"* The free metrics timed directly (`optimizer.step()` with the agent minus without, medians "
                  f"over the window's steps): {_fmt(free.get('in_step_over_step'), 'pct')} of the no-agent step"
                  f"{_spread([1 + x for x in free.get('in_step_over_step_each', [])], 'pct')}.",
                  f"* Re-evaluation, in one run with its floor (`reeval_every=2, probe_every=4`, the floor's pass at "
                  f"`x_{{t−1}}` on the odd steps): {_fmt(r.get('reeval_s'), 'ms')} ms against "
                  f"{_fmt(r.get('floor_s'), 'ms')} ms = **{_fmt(r.get('ratio'))} × the floor**{_spread(r.get('ratios', []))}; "
                  f"cross-check from the separate runs, (step[`reeval_every=1`] − step[free]) / floor: "
                  f"{_fmt(r.get('cross_check_ratio'))}{_spread(r.get('cross_check_ratios', []))}.",
                  f"* One warm probe (sharpness, one power iteration, and the three split gradients of the "
                  f"gradient-norm estimator): " + (f"failed: {p['error']}" if p.get("error") else
                                                   f"{_fmt(p.get('probe_s'), 'ms')} ms = {_fmt(p.get('step_ratio'))} "
                                                   f"× the no-agent step, {_fmt(p.get('floor_ratio'))} × the floor") + "."]
        if not t.get("defaults_window_amortises_probe"):
            lines.append("* The defaults' window is shorter than the probe interval (100 steps): no probe in it.")
        eager = w.get("probe_eager_attention")
        if eager:
            lines.append(f"* The same mixed run with eager attention: probe " +
                         (f"failed: {eager['errors'].get('probe')}" if "probe" in eager.get("errors", {}) else
                          f"{_fmt(eager.get('probe_s'), 'ms')} ms = {_fmt(eager.get('probe_floor_ratio'))} × its floor "
                          f"({_fmt(eager.get('floor_s'), 'ms')} ms)") +
                         f"; re-evaluation {_fmt(eager.get('reeval_floor_ratio'))} × its floor.")
        for probe_key, counts in w.get("syncs", {}).items():
            parts = []
            for key in SYNC_CONFIGS:
                c = counts.get(key)
                if c is None:
                    continue
                where = "; ".join(f"`{loc}` ×{n}" for loc, n in list(c.get("agent_locations", {}).items())[:4])
                parts.append(f"{key}: {c['training']} on the training side over {c['steps']} steps "
                             f"({c['background']} on background threads)" + (f", the agent's: {where}" if where else ""))
            lines.append(f"* {counts.get('label')}: " + "; ".join(parts) + ".")
    correctness = results.get("correctness", {})
    if correctness:
        lines += ["", "#### Correctness", ""]
        for name, b in correctness.get("bitwise", {}).items():
            lines.append(f"* {name} ({b.get('workload')}): parameters after each of {b.get('steps')} steps, with the "
                         f"agent (`reeval_every=1, probe_every=2`) against without: identical "
                         f"{sum(b.get('agent_identical', []))}/{b.get('steps')}; the no-agent control run: identical "
                         f"{sum(b.get('control_identical', []))}/{b.get('steps')}." + (
                             f" Agent errors: {_errors_note(b.get('agent_errors'))}." if b.get("agent_errors") else ""))
        for name, r in correctness.get("replay", {}).items():
            worst = {m: v.get("worst_relative_to_scale") for m, v in r.get("metrics", {}).items()}
            lines.append(f"* {name} ({r.get('workload')}), {r.get('steps')} steps against float64: "
                         + ", ".join(f"`{m}` {_fmt(x)}" for m, x in worst.items())
                         + f" (largest |error| / scale; tolerance {REPLAY_RTOL:g})."
                         + (f" Agent errors: {_errors_note(r.get('agent_errors'))}." if r.get("agent_errors") else ""))
        warned = correctness.get("nondeterministic_warnings")
        if warned:
            lines.append("* Operations without a deterministic implementation (warned): " + "; ".join(warned) + ".")
    if results.get("errors"):
        lines += ["", "Errors (those figures are missing):", ""]
        lines += [f"* {e['where']}: {e['error']}" for e in results["errors"]]
    return "\n".join(lines) + "\n"


def write_outputs(results: Dict[str, Any], out: Optional[Path]) -> None:
    results["elapsed_s"] = DEADLINE.elapsed()
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=1, default=_json_default, allow_nan=True)
    tmp = out / (JSON_NAME + ".tmp")
    tmp.write_text(text)
    tmp.replace(out / JSON_NAME)
    (out / MD_NAME).write_text(safe_markdown(results))


def safe_markdown(results: Dict[str, Any]) -> str:
    """The table, or why it could not be made: the JSON is written first and keeps every figure."""
    try:
        return markdown(results)
    except Exception as exc:
        return f"The table could not be rendered ({error_entry('markdown', exc)['error']}); see {JSON_NAME}.\n"


# --- main ---------------------------------------------------------------------------------------


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda or cpu (default: cuda when torch sees one)")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer GPT-2 and a few steps: every code path in < 1 min")
    parser.add_argument("--out", type=Path, default=None, help=f"write {MD_NAME} and {JSON_NAME} into this folder")
    add_write_docs(parser, DOC, "the table")
    parser.add_argument("--report", type=Path, default=None, help="render this saved JSON instead of measuring")
    parser.add_argument("--time-limit", type=float, default=None, help="seconds for the whole run (default: the plan's)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: the plan's)")
    parser.add_argument("--source", default=None,
                        help="the code measured, when this tree has no git history (bench/gpu_device.sh passes it)")
    parser.add_argument(CORRECTNESS_FLAG, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.report is not None:
        text = markdown(json.loads(args.report.read_text()))
        print(text)
        if args.write_docs:
            write_between_markers(DOC, text, BEGIN, END, DOC_TITLE)
        return 0
    plan = TINY if args.tiny else FULL
    args.threads = plan.threads if args.threads is None else args.threads
    if args.threads:
        torch.set_num_threads(args.threads)
    DEADLINE.seconds = args.time_limit or plan.time_limit
    if args._correctness:
        correctness_child(args, plan)
        return 0
    import logging

    logging.getLogger("moxco").setLevel(logging.ERROR)
    dev = Device.choose(args.device)
    command = " ".join(["python bench/gpu.py", *(argv if argv is not None else sys.argv[1:])])
    results: Dict[str, Any] = {
        "schema": SCHEMA, "command": command, "date": time.strftime("%Y-%m-%d"),
        "source": f"source: {args.source}" if args.source else source_state(),
        "device": device_info(dev.device), "plan": {k: v for k, v in vars(plan).items()},
        "clock": dev.clock.label, "memory": dev.memory.label, "sync_probes": [p.label for p in dev.sync_probes],
        "moxco_native": os.environ.get("MOXCO_NATIVE"),
        "budgets_design": {"free": FREE_BUDGET, "reeval": REEVAL_BUDGET, "syncs": SYNC_BUDGET,
                           "free_copies": FREE_COPIES, "reeval_copies": REEVAL_COPIES, "replay_rtol": REPLAY_RTOL},
        "workloads": {}, "errors": []}
    log(f"device: {device_line(results['device'])}")
    write_outputs(results, args.out)
    correctness_section(args, plan, results, timeout=min(0.35 * DEADLINE.left(), 240))
    write_outputs(results, args.out)
    with tempfile.TemporaryDirectory(prefix="moxco-gpu-") as tmpdir:
        builders = [("gpt2", lambda: gpt2_work(dev.device, plan.gpt2, plan.gpt2_batch, plan.gpt2_seq, autocast=True)),
                    ("mlp", lambda: mlp_work(dev.device))]
        shares = {"gpt2": 0.75, "mlp": 1.0}  # of the time left when the workload starts, less the syncs' reserve
        for name, build in builders:
            entry: Dict[str, Any] = results["workloads"].setdefault(name, {})
            if DEADLINE.left() < 2 * SECTION_MARGIN_S:
                results["errors"].append({"where": name, "error": "skipped: the time limit"})
                continue
            try:
                log(f"{name}: building")
                work = build()
            except Exception as exc:
                results["errors"].append(error_entry(f"{name}/build", exc))
                continue
            entry.update(description=work.description, parameters=work.parameters, param_bytes=work.param_bytes,
                         **work.info)
            reserve = 0.3 * DEADLINE.left() if name == "gpt2" else 0.25 * DEADLINE.left()
            timing_section(work, dev, plan, tmpdir, shares[name] * (DEADLINE.left() - reserve), entry,
                           results["errors"])
            write_outputs(results, args.out)
            if name == "gpt2":
                probe_variant(work, dev, plan, tmpdir, entry, results["errors"])
                write_outputs(results, args.out)
            sync_section(work, dev, plan, tmpdir, entry, results["errors"])
            write_outputs(results, args.out)
            del work
            _release(dev)
    write_outputs(results, args.out)
    text = safe_markdown(results)
    print(text)
    if args.write_docs:
        write_between_markers(DOC, text, BEGIN, END, DOC_TITLE)
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
