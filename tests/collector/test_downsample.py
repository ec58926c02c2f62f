"""Downsampling against brute-force reference implementations written the obvious way."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moxco.collector.downsample import downsample, lttb_indices, minmax_indices


def minmax_reference(steps, values, max_points):
    n = len(steps)
    if n <= max_points:
        return list(range(n))
    per = 5 if any(math.isnan(v) for v in values) else 4
    if max_points < per:
        return [0, n - 1][:max_points]
    buckets = max_points // per
    first, last = int(steps[0]), int(steps[-1])
    span = last - first + 1
    edges = [first + math.ceil(k * span / buckets) for k in range(buckets)] + [last + 1]
    out = set()
    for k in range(buckets):
        idx = [i for i in range(n) if edges[k] <= steps[i] < edges[k + 1]]
        if not idx:
            continue
        out.update((idx[0], idx[-1]))
        real = [i for i in idx if not math.isnan(values[i])]
        if real:
            out.add(min(real, key=lambda i: (values[i], i)))
            out.add(min(real, key=lambda i: (-values[i], i)))
        nans = [i for i in idx if math.isnan(values[i])]
        if nans:
            out.add(nans[0])
    return sorted(out)


def lttb_reference(steps, values, max_points):
    n = len(steps)
    if n <= max_points:
        return list(range(n))
    if max_points < 3:
        return [0, n - 1][:max_points]
    inner = max_points - 2
    edges = [1 + math.floor(k * (n - 2) / inner) for k in range(inner + 1)]
    edges[-1] = n - 1
    out, a = [0], 0
    ax, ay = float(steps[0]), float(values[0])
    for b in range(inner):
        lo, hi = edges[b], edges[b + 1]
        if b + 1 < inner:
            nxt = range(edges[b + 1], edges[b + 2])
            cx = sum(float(steps[i]) for i in nxt) / len(nxt)
            finite = [values[i] for i in nxt if not math.isnan(values[i])]
            cy = sum(finite) / len(finite) if finite else math.nan
        else:
            cx, cy = float(steps[-1]), float(values[-1])
        best, pick = -1.0, lo
        for i in range(lo, hi):
            area = abs((ax - cx) * (values[i] - ay) - (ax - steps[i]) * (cy - ay))
            if not math.isnan(area) and area > best:
                best, pick = area, i
        out.append(pick)
        if not math.isnan(values[pick]):
            ax, ay = float(steps[pick]), float(values[pick])
    return out + [n - 1]


def series(rng, n, *, gaps=False, nan_rate=0.0, spikes=0):
    steps = np.cumsum(rng.integers(1, 5, n)) if gaps else np.arange(n)
    values = rng.standard_normal(n).cumsum()
    values[rng.random(n) < nan_rate] = np.nan
    for i in rng.integers(0, n, spikes):
        values[i] = 1e6 * rng.choice([-1, 1])
    return steps.astype(np.int64), values


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n,max_points", [(50, 60), (1000, 40), (997, 101), (3000, 9), (500, 4), (500, 2)])
def test_minmax_equals_reference_and_keeps_extremes(seed, n, max_points):
    rng = np.random.default_rng(seed)
    steps, values = series(rng, n, gaps=seed % 2 == 1, nan_rate=0.01 if seed >= 3 else 0.0, spikes=3)
    got = minmax_indices(steps, values, max_points)
    assert got.tolist() == minmax_reference(steps.tolist(), values.tolist(), max_points)
    assert got.size <= max_points
    if n > max_points >= 5:
        finite = values[~np.isnan(values)]
        assert np.nanmax(values[got]) == finite.max() and np.nanmin(values[got]) == finite.min()
        assert got[0] == 0 and got[-1] == n - 1
        assert np.isnan(values).any() == np.isnan(values[got]).any()  # a divergence never disappears


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n,max_points", [(1000, 50), (777, 3), (2000, 500), (40, 100)])
def test_lttb_equals_reference(seed, n, max_points):
    rng = np.random.default_rng(seed)
    steps, values = series(rng, n, gaps=seed % 2 == 1, nan_rate=0.02 if seed >= 2 else 0.0)
    got = lttb_indices(steps, values, max_points)
    assert got.tolist() == lttb_reference(steps.tolist(), values.tolist(), max_points)
    assert got.size == min(n, max_points) and np.all(np.diff(got) > 0)


def test_infinite_values_are_kept_as_extremes():
    steps = np.arange(10_000)
    values = np.sin(steps / 100.0)
    values[1234], values[8765] = np.inf, -np.inf
    for method in ("minmax", "lttb"):
        kept = downsample(steps, values, 100, method)
        assert {1234, 8765} <= set(kept.tolist())


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="max_points"):
        minmax_indices(np.arange(5), np.zeros(5), 0)
    with pytest.raises(ValueError, match="method"):
        downsample(np.arange(5), np.zeros(5), 3, "mean")
