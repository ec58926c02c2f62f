"""Downsampling a metric series for plotting: pure NumPy functions, no I/O.

A training series can hold millions of points; a plot needs a few thousand. Both methods return
*indices* into the input (so steps, values and wall times stay aligned and every returned point is
a real stored point, never an average), sorted and unique:

* ``minmax_indices``: the steps are cut into equal-width buckets; each bucket keeps its first,
  minimum, maximum and last point, and, when the bucket holds a NaN (a diverged value, which min
  and max skip), its first NaN. Spikes and divergences survive any amount of downsampling, which
  is what a loss plot must show. Vectorised: O(n), no Python loop over points or buckets.
* ``lttb_indices``: Largest-Triangle-Three-Buckets (Steinarsson 2013): the first and last point,
  and per bucket the point forming the largest triangle with the previously chosen point and the
  mean of the next bucket. Visually faithful for smooth series, does not guarantee extremes.
  The bucket loop is sequential by definition (each choice depends on the previous one); the work
  inside a bucket is vectorised.

Inputs: ``steps`` (int, strictly increasing, as stored) and ``values`` (float, may hold NaN/±Inf).
"""

from __future__ import annotations

import math

import numpy as np

METHODS = ("minmax", "lttb", "none")


def _bucket_starts(steps: np.ndarray, buckets: int) -> np.ndarray:
    """Start index of every non-empty bucket when ``[steps[0], steps[-1]]`` is cut into
    ``buckets`` equal step ranges (``steps`` sorted): a binary search per bucket edge, no per-point
    temporary arrays."""
    first, last = int(steps[0]), int(steps[-1])
    span = last - first + 1
    edges = first + np.ceil(np.arange(buckets) * (span / buckets)).astype(np.int64)
    starts = np.searchsorted(steps, edges, side="left")
    return np.unique(starts[starts < steps.size])


def minmax_indices(steps: np.ndarray, values: np.ndarray, max_points: int) -> np.ndarray:
    """Indices of at most ``max_points`` points keeping first/min/max/last (and first NaN) per bucket."""
    steps = np.asarray(steps)
    values = np.asarray(values, dtype=np.float64)
    n = steps.size
    if max_points < 1:
        raise ValueError(f"max_points must be at least 1, got {max_points}")
    if n <= max_points:
        return np.arange(n)
    nan = np.isnan(values)
    any_nan = bool(nan.any())
    per_bucket = 5 if any_nan else 4
    if max_points < per_bucket:  # too few points for one full bucket: first and last (or first)
        return np.array([0, n - 1][:max_points])
    starts = _bucket_starts(steps, max_points // per_bucket)
    ends = np.r_[starts[1:], n] - 1
    chosen = [starts, ends]
    if any_nan:
        # fmin/fmax skip NaN; a bucket of only NaN yields NaN and no index from these two
        lo, hi = np.fmin.reduceat(values, starts), np.fmax.reduceat(values, starts)
    else:
        lo, hi = np.minimum.reduceat(values, starts), np.maximum.reduceat(values, starts)
    counts = ends - starts + 1
    for target in (lo, hi):
        # the first point of each bucket equal to its extreme: scan only the points equal to some
        # bucket's extreme (few), then keep, per bucket, the first one inside it
        hit = np.flatnonzero(values == np.repeat(target, counts))
        first = np.searchsorted(hit, starts)
        valid = first < hit.size
        candidate = hit[np.where(valid, first, 0)] if hit.size else first
        chosen.append(candidate[valid & (candidate <= ends)])
    if any_nan:
        positions = np.flatnonzero(nan)
        first = np.searchsorted(positions, starts)
        valid = first < positions.size
        candidate = positions[np.where(valid, first, 0)]
        chosen.append(candidate[valid & (candidate <= ends)])
    return np.unique(np.concatenate(chosen))


def lttb_indices(steps: np.ndarray, values: np.ndarray, max_points: int) -> np.ndarray:
    """Indices of ``max_points`` points chosen by Largest-Triangle-Three-Buckets.

    Buckets are equal-count (the classic formulation). The "next bucket" average skips NaN (a
    bucket of only NaN averages to NaN); NaN areas are skipped, so a NaN point is chosen only when
    its whole bucket is NaN (then the bucket's first point); an infinite value gives an infinite
    area and is chosen.
    """
    x = np.asarray(steps, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    n = x.size
    if max_points < 1:
        raise ValueError(f"max_points must be at least 1, got {max_points}")
    if n <= max_points:
        return np.arange(n)
    if max_points < 3:
        return np.array([0, n - 1][:max_points])
    inner = max_points - 2
    edges = (1 + np.floor(np.arange(inner + 1) * ((n - 2) / inner))).astype(np.int64)
    edges[-1] = n - 1
    lo_edges = edges[:-1]
    sizes = np.diff(edges)
    # per-bucket sums over x[:-1], y[:-1]: reduceat's last segment runs to the end of its input,
    # and the last point is not part of the last bucket
    nan = np.isnan(y[:-1])
    nan_count = np.add.reduceat(nan, lo_edges) if nan.any() else np.zeros(inner, dtype=np.int64)
    has_nan = nan_count > 0
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        mean_x = np.add.reduceat(x[:-1], lo_edges) / sizes
        mean_y = np.add.reduceat(np.where(nan, 0.0, y[:-1]) if has_nan.any() else y[:-1], lo_edges) / (sizes - nan_count)
    # the third vertex of bucket b's triangles: bucket b+1's mean, or the last point for the last bucket
    cxs = np.r_[mean_x[1:], x[-1]].tolist()
    cys = np.r_[mean_y[1:], y[-1]].tolist()
    bounds = edges.tolist()
    flags = has_nan.tolist()
    out = np.empty(max_points, dtype=np.int64)
    out[0], out[-1] = 0, n - 1
    a = 0
    ax, ay = float(x[0]), float(y[0])
    with np.errstate(invalid="ignore", over="ignore"):
        for b in range(inner):
            lo, hi = bounds[b], bounds[b + 1]
            cx, cy = cxs[b], cys[b]
            # twice the triangle area, up to sign: (ax-cx)(Y-ay) - (ax-X)(cy-ay)
            p, q = ax - cx, cy - ay
            area = y[lo:hi] - ay
            area *= p
            area -= (ax - x[lo:hi]) * q
            np.abs(area, out=area)
            if flags[b] or not math.isfinite(p) or not math.isfinite(q):
                pick = 0 if np.all(np.isnan(area)) else int(np.nanargmax(area))
            else:
                pick = int(area.argmax())
            a = lo + pick
            out[b + 1] = a
            if not math.isnan(y[a]):  # a NaN anchor would make every later area NaN: keep the last real one
                ax, ay = float(x[a]), float(y[a])
    return out


def downsample(steps: np.ndarray, values: np.ndarray, max_points: int, method: str = "minmax") -> np.ndarray:
    """Indices chosen by ``method`` (``minmax``, ``lttb``; ``none`` keeps all points)."""
    if method == "minmax":
        return minmax_indices(steps, values, max_points)
    if method == "lttb":
        return lttb_indices(steps, values, max_points)
    if method == "none":
        return np.arange(np.asarray(steps).size)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
