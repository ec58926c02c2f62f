"""Fused CPU reductions for the agent's every-step sums: ``moxco/kernels.c``, compiled on first use
with the machine's C compiler and loaded through ``ctypes``.

Why: the free metrics and the re-evaluation's ``‖∇f(x_t) − ∇f(x_{t−1})‖²`` are a handful of sums
over every parameter. Eagerly, each sum is one or more passes of multi-tensor kernels, so the
same parameter-sized arrays go through memory several times (about 16 array transfers for the
free metrics, where reading ``g``, ``x``, ``x_{t−1}``, ``x_0`` once and writing ``x_{t−1}`` once is
5). One fused loop does each job in one pass, in double-precision accumulators (relative error
~1e-12 where the eager sums give ~1e-7): the step_sums table of bench/agent_overhead.py measures
both. The curvature probe's power step takes its three sums the same way (``power_sums``).

Everything here is an optimisation with an exact fallback. ``moxco.tensors`` calls these functions
first; they return ``None`` (and the eager path runs) when the tensors are not all plain contiguous
CPU float32 or float64 tensors of one dtype, when ``MOXCO_NATIVE=0``, or when no compiler is found
or the build fails (logged once). Accelerators keep the eager multi-tensor kernels. The kernels
write ``x_{t−1}``'s memory without bumping its version counter, which nothing reads: the agent's
copies are never saved by autograd across a step.

The shared library is cached per source, compiler, flags and CPU in ``$MOXCO_CACHE``, else
``$XDG_CACHE_HOME/moxco``, else ``~/.cache/moxco`` (a private temporary folder if that cannot be
written), so the ~0.3 s build happens once per machine. ``warm()`` builds it ahead of the first
step (``attach`` calls it).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import torch
from torch import Tensor

log = logging.getLogger("moxco.native")

SOURCE = Path(__file__).with_name("kernels.c")
# -march=native: the cache key holds the CPU's flags, so a shared cache never serves another CPU
FLAGS = ("-O3", "-fopenmp-simd", "-fPIC", "-shared", "-pthread")
TUNE_FLAGS = ("-march=native",)  # dropped when the compiler refuses them

OP_STEP, OP_NORMS, OP_DIST, OP_SUMS, OP_POWER = 0, 1, 2, 3, 4
# elements per thread below which another thread costs more than it saves (starting a thread takes
# tens of microseconds; on 2 cores sharing one memory bus a second thread did not pay at 3·10⁷)
MIN_PER_THREAD = 1 << 20

_lock = threading.Lock()
_tried = False
_function = None  # moxco_reduce, once loaded
_why_not: Optional[str] = None
_disabled = 0  # depth of ``disabled()`` blocks


def _cache_dir() -> Path:
    if os.environ.get("MOXCO_CACHE"):
        return Path(os.environ["MOXCO_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "moxco"


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _compile(cc: str, output: Path) -> None:
    errors = []
    for flags in (FLAGS + TUNE_FLAGS, FLAGS):
        done = subprocess.run([cc, *flags, "-o", str(output), str(SOURCE)], capture_output=True, text=True,
                              timeout=120)
        if done.returncode == 0:
            return
        errors.append(done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"])
    raise RuntimeError(f"{cc} could not build {SOURCE.name}: {errors[-1][0]}")


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cc, version, " ".join(FLAGS + TUNE_FLAGS),
                                    platform.machine(), _cpu_signature()]).encode()).hexdigest()[:20]
    name = f"kernels-{key}.so"
    for folder in (_cache_dir(), None):
        try:
            if folder is None:  # a private folder of this process's own: nothing to share, nothing to trust
                folder = Path(tempfile.mkdtemp(prefix="moxco-native-"))
            path = folder / name
            if not path.exists():
                folder.mkdir(parents=True, exist_ok=True)
                partial = folder / f".{name}.{os.getpid()}.{threading.get_ident()}"
                try:
                    _compile(cc, partial)
                    os.replace(partial, path)  # atomic: concurrent ranks each build, one file wins
                finally:
                    partial.unlink(missing_ok=True)
            return ctypes.CDLL(str(path))
        except OSError as exc:
            last = exc
    raise RuntimeError(f"could not write or load the kernels' library: {last}")


def _load() -> None:
    global _tried, _function, _why_not
    with _lock:
        if _tried:
            return
        _tried = True
        if os.environ.get("MOXCO_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
            _why_not = "MOXCO_NATIVE=0"
            return
        try:
            function = _build().moxco_reduce
            function.restype = ctypes.c_int
            p = ctypes.c_void_p
            function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, p, p, p, p, p, ctypes.c_double,
                                 ctypes.c_int, p]
            _function = function
        except Exception as exc:  # an optimisation: the eager path computes the same sums
            _why_not = f"{type(exc).__name__}: {exc}"
            log.info("moxco: fused CPU kernels unavailable (%s); using the multi-tensor path", _why_not)


def warm() -> bool:
    """Build and load the kernels now (not in a training step); whether they are available."""
    if not _tried:
        _load()
    return _function is not None


def status() -> str:
    """``"loaded"``, or why the eager path is used."""
    warm()
    return "loaded" if _function is not None else str(_why_not)


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within the block every function here returns ``None``, so ``moxco.tensors`` takes its eager
    path (process-wide): for comparisons of the two paths in one process, as the tests and
    bench/agent_overhead.py make them. ``MOXCO_NATIVE=0`` does the same for a whole run."""
    global _disabled
    _disabled += 1
    try:
        yield
    finally:
        _disabled -= 1


# tensors whose data pointer is their memory: subclasses (DTensor, fake and functorch tensors) are not
_PLAIN = (Tensor, torch.nn.Parameter)


def _eligible(lists: Sequence[Sequence[Tensor]]) -> Optional[torch.dtype]:
    """The one dtype of the lists' tensors when the kernels may read them: plain tensors (no
    subclass), contiguous, strided, on the CPU, all float32 or all float64, pairwise of equal size;
    else ``None``."""
    first = lists[0]
    if not first:
        return None
    dtype = first[0].dtype
    if dtype is not torch.float32 and dtype is not torch.float64:
        return None
    numel = [t.numel() for t in first]
    for ts in lists:
        flat = getattr(ts, "flat", None)
        if flat is not None:  # a tensors.FlatCopy: contiguous views of one buffer, checked once
            if not (flat.is_cpu and flat.dtype is dtype and ts.numels == numel):
                return None
            continue
        if len(ts) != len(numel):
            return None
        for t, n in zip(ts, numel):
            if not (type(t) in _PLAIN and t.is_cpu and t.dtype is dtype and t.layout is torch.strided
                    and t.is_contiguous() and t.numel() == n):
                return None
    return dtype


def _pointers(ts: Sequence[Tensor]):
    addresses = getattr(ts, "addresses", None)  # a FlatCopy's views never move
    if addresses is None:
        addresses = [t.data_ptr() for t in ts]
    return (ctypes.c_void_p * len(ts))(*addresses)


def _threads(total: int) -> int:
    return max(1, min(torch.get_num_threads(), total // MIN_PER_THREAD))


def _run(op: int, lists: Sequence[Sequence[Tensor]], width: int, scale: float = 1.0,
         optional: Optional[Sequence[Tensor]] = None, threads: Optional[int] = None) -> Optional[Tensor]:
    if _disabled or (_function is None and (_tried or not warm())):
        return None
    dtype = _eligible(list(lists) + ([optional] if optional is not None else []))
    if dtype is None:
        return None
    numel = [t.numel() for t in lists[0]]
    counts = (ctypes.c_int64 * len(numel))(*numel)
    arrays = [_pointers(ts) for ts in lists] + [None] * (3 - len(lists))
    out = torch.empty(width, dtype=torch.float64)
    done = _function(op, int(dtype is torch.float64), len(numel), arrays[0], arrays[1], arrays[2],
                     _pointers(optional) if optional is not None else None, counts, float(scale),
                     threads or _threads(sum(numel)), out.data_ptr())
    return out if done == 0 else None


def step_sums(gs: Sequence[Tensor], xs: Sequence[Tensor], prev: Sequence[Tensor],
              origin: Optional[Sequence[Tensor]], *, advance: bool,
              threads: Optional[int] = None) -> Optional[Tensor]:
    """``[‖g‖², ⟨g, x − p⟩, ‖x − p‖², ‖x − o‖²]`` (float64; the last is 0 without ``origin``) in
    one pass (``tensors.step_sums``), and with ``advance`` ``p ← x`` bit for bit on the way;
    ``None``, touching nothing, when not applicable."""
    lists: List[Sequence[Tensor]] = [gs, xs, prev]
    return _run(OP_STEP if advance else OP_SUMS, lists, 4, optional=origin, threads=threads)


def norms_sq(xs: Sequence[Tensor], threads: Optional[int] = None) -> Optional[Tensor]:
    """``[‖x_1‖², …, ‖x_n‖²]`` (float64) in one pass (``tensors.norms_sq``), or ``None``."""
    return _run(OP_NORMS, [xs], len(xs), threads=threads)


def power_sums(vs: Sequence[Tensor], hs: Sequence[Tensor], shift: float = 0.0,
               threads: Optional[int] = None) -> Optional[Tensor]:
    """``[⟨v, h⟩, ‖h‖², ‖h − σv‖²]`` (float64) in one pass that writes nothing (``tensors.power_sums``),
    or ``None``."""
    return _run(OP_POWER, [vs, hs], 3, scale=shift, threads=threads)


def dist_sq(xs: Sequence[Tensor], ys: Sequence[Tensor], scale: float = 1.0,
            threads: Optional[int] = None) -> Optional[Tensor]:
    """``‖s·x − y‖²`` (0-dim float64) in one pass that writes nothing (``tensors.dist_sq``), or
    ``None``."""
    out = _run(OP_DIST, [xs, ys], 1, scale=scale, threads=threads)
    return None if out is None else out[0]
