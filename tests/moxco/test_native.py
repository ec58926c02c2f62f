"""moxco.native: the fused CPU kernels against float64 ground truth, their thread split, what they
refuse (and leave untouched), and their build: cached, shared between processes, and replaced by
the eager path when it cannot happen."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moxco import native, tensors

ROOT = Path(__file__).resolve().parents[2]

# odd sizes (no multiple of any vector width), an empty tensor, and one above a thread's share
SHAPES = [(3, 5), (0,), (257,), (1000, 33), (native.MIN_PER_THREAD + 77,)]


def _lists(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    g, x, o = ([torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES] for _ in range(3))
    # nearby iterates with magnitudes spanning decades, as a real update's do
    p = [t - 1e-3 * torch.randn(t.shape, generator=gen, dtype=dtype) * torch.exp(2 * torch.randn(t.shape, generator=gen,
                                                                                              dtype=dtype)) for t in x]
    return g, x, p, o


def _exact(g, x, p, o):
    """``[‖g‖², ⟨g, x − p⟩, ‖x − p‖², ‖x − o‖²]`` in float64, from the differences in the tensors' type."""
    d = [(a - b).double() for a, b in zip(x, p)]
    e = [(a - b).double() for a, b in zip(x, o)]
    return [sum(float((u.double() ** 2).sum()) for u in g), sum(float((u.double() * v).sum()) for u, v in zip(g, d)),
            sum(float((v * v).sum()) for v in d), sum(float((v * v).sum()) for v in e)]


@pytest.fixture(autouse=True)
def _built():
    assert native.warm(), native.status()  # gcc is on every machine of this kind: the kernels must load


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_step_sums_equal_float64_ground_truth_and_advance_prev_bit_for_bit(dtype, threads):
    g, x, p, o = _lists(dtype)
    exact = _exact(g, x, p, o)  # the differences taken in the tensors' own type, as the eager path takes them
    before = [t.clone() for t in (g + x + o)]
    prev = [t.clone() for t in p]
    sums = native.step_sums(g, x, prev, o, advance=True, threads=threads)
    assert sums.dtype == torch.float64 and sums.shape == (4,)
    # float64 accumulators: far inside the eager path's ~1e-7
    assert [float(v) for v in sums] == [pytest.approx(e, rel=1e-11) for e in exact]
    assert all(torch.equal(a, b) for a, b in zip(prev, x))  # p ← x, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(g + x + o, before))  # nothing else written
    # without writing, and without the origin
    prev = [t.clone() for t in p]
    two = native.step_sums(g, x, prev, None, advance=False, threads=threads)
    assert [float(v) for v in two] == [pytest.approx(e, rel=1e-11) for e in exact[:3]] + [0.0]
    assert all(torch.equal(a, b) for a, b in zip(prev, p))


@pytest.mark.parametrize("threads", [1, 2, 5])
def test_norms_and_distance_equal_float64_ground_truth(threads):
    g, x, _, _ = _lists(torch.float32, seed=1)
    norms = native.norms_sq(g, threads=threads)
    assert norms.dtype == torch.float64 and norms.shape == (len(SHAPES),)
    assert [float(v) for v in norms] == [pytest.approx(float((t.double() ** 2).sum()), rel=1e-11, abs=0) for t in g]
    for scale in (1.0, 0.37):
        exact = sum(float(((torch.tensor(scale, dtype=torch.float32) * a - b).double() ** 2).sum())
                    for a, b in zip(x, g))
        # s·x − y may be one fused multiply-add (no rounding of s·x), where torch rounds twice
        assert float(native.dist_sq(x, g, scale, threads=threads)) == pytest.approx(exact, rel=1e-11 if scale == 1 else 1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threads", [1, 3])
def test_power_sums_equal_float64_ground_truth_and_the_eager_path(dtype, threads):
    """A power step's ``[⟨v, h⟩, ‖h‖², ‖h − σv‖²]`` in one pass, against float64 (the shifted difference
    formed in the tensors' type) and against the eager path ``tensors.power_sums`` takes elsewhere."""
    v, h, _, _ = _lists(dtype, seed=3)
    before = [t.clone() for t in v + h]
    for shift in (0.0, -2.5):
        s = torch.tensor(shift, dtype=dtype)
        exact = [sum(float((a.double() * b.double()).sum()) for a, b in zip(v, h)),
                 sum(float((b.double() ** 2).sum()) for b in h),
                 sum(float(((b - s * a).double() ** 2).sum()) for a, b in zip(v, h))]
        sums = native.power_sums(v, h, shift, threads=threads)
        assert sums.dtype == torch.float64 and sums.shape == (3,)
        # h − σv may be one fused multiply-add in the kernel, where torch rounds twice
        assert [float(x) for x in sums] == [pytest.approx(e, rel=1e-11 if shift == 0 else 1e-9) for e in exact]
        with native.disabled():
            eager = tensors.power_sums(v, h, shift)
        assert [float(x) for x in eager] == [pytest.approx(e, rel=1e-6) for e in exact]
    assert all(torch.equal(a, b) for a, b in zip(v + h, before))  # nothing written


def test_a_given_thread_count_gives_the_same_bits_every_time():
    g, x, p, o = _lists(torch.float32, seed=2)
    for threads in (1, 2, 4):
        runs = [native.step_sums(g, x, p, o, advance=False, threads=threads) for _ in range(5)]
        assert all(torch.equal(r, runs[0]) for r in runs)
    one, four = (native.step_sums(g, x, p, o, advance=False, threads=t) for t in (1, 4))
    assert torch.allclose(one, four, rtol=1e-12, atol=0)


def test_what_the_kernels_cannot_read_is_left_to_the_eager_path_untouched():
    g, x, p, _ = _lists(torch.float32, seed=3)
    prev = [t.clone() for t in p]
    refused = {
        "non-contiguous": ([g[3].t()] , [x[3].t()], [prev[3].t()]),
        "bfloat16": ([t.bfloat16() for t in g], [t.bfloat16() for t in x], [t.bfloat16() for t in prev]),
        "mixed dtypes": (g, [t.double() for t in x], prev),
        "sizes differ": ([g[0]], [x[2]], [prev[2]]),
        "lengths differ": (g[:2], x, prev),
        "sparse": ([g[3].to_sparse()], [x[3]], [prev[3]]),
        "empty": ([], [], []),
        "a tensor subclass": ([_Wrapped(g[0])], [x[0]], [prev[0]]),
    }
    for why, (gs, xs, ps) in refused.items():
        assert native.step_sums(gs, xs, ps, None, advance=True) is None, why
    assert all(torch.equal(a, b) for a, b in zip(prev, p))
    assert native.norms_sq([x[0], x[3].t()]) is None and native.dist_sq([x[0]], [x[0].half()]) is None
    # and moxco.tensors then gives the eager result
    expected = _exact(g[3:4], x[3:4], p[3:4], x[3:4])[1:3]
    got = tensors.step_sums([g[3].t()], [x[3].t()], [p[3].t().clone()], None, advance=True)
    assert [float(v) for v in got] == [pytest.approx(e, rel=1e-5) for e in expected]  # float32 dots
    with native.disabled():
        assert native.norms_sq(g) is None
    assert native.norms_sq(g) is not None


class _Wrapped(torch.Tensor):
    """A tensor subclass, as DTensor or a fake tensor is one: the kernels leave it to torch."""


def _probe(env: dict, cache: Path) -> dict:
    """A fresh interpreter's view of the kernels under ``env`` with the cache in ``cache``."""
    code = ("import json, time, torch; t = time.perf_counter(); from moxco import native, tensors; "
            "status = native.status(); spent = time.perf_counter() - t; "
            "g = [torch.arange(10.0)]; s = tensors.step_sums(g, g, [torch.zeros(10)], None, advance=True); "
            "print(json.dumps({'status': status, 'sums': s.tolist(), 'seconds': spent}))")
    full = {**os.environ, "MOXCO_CACHE": str(cache), "PYTHONPATH": str(ROOT), **env}
    done = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_library_is_built_once_per_machine_and_shared_between_processes(tmp_path):
    cache = tmp_path / "cache"
    # two processes building into one empty cache at once both load a whole library
    procs = [subprocess.Popen([sys.executable, "-c", "from moxco import native; print(native.status())"],
                              env={**os.environ, "MOXCO_CACHE": str(cache), "PYTHONPATH": str(ROOT)},
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    assert [p.communicate(timeout=300)[0].strip() for p in procs] == ["loaded", "loaded"]
    built = list(cache.glob("kernels-*.so"))
    assert len(built) == 1 and not [p for p in cache.iterdir() if p.name.startswith(".")]  # no partial file left
    stamp = built[0].stat().st_mtime_ns
    again = _probe({}, cache)
    assert again["status"] == "loaded" and again["sums"] == [285.0, 285.0]
    assert built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt


def test_without_a_compiler_or_when_switched_off_the_eager_path_gives_the_same_sums(tmp_path):
    broken = _probe({"CC": "/bin/false"}, tmp_path / "a")
    assert broken["status"].startswith("RuntimeError") and "could not build" in broken["status"]
    off = _probe({"MOXCO_NATIVE": "0"}, tmp_path / "b")
    assert off["status"] == "MOXCO_NATIVE=0" and not (tmp_path / "b").exists()
    assert broken["sums"] == off["sums"] == [285.0, 285.0]
