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

Block summaries (what the store keeps per ``BLOCK_STEPS`` steps of a series, ``series_blocks``):

* ``block_summaries`` summarises sorted points per block: count, first and last point, the first
  point equal to the minimum and to the maximum (NaN skipped), the first NaN. Summaries of disjoint
  point sets of one block merge exactly (``Store`` merges appends into the stored row).
* ``minmax_summaries`` is ``minmax_indices`` computed from such summaries ("units": whole blocks,
  or the summary of the in-range part of a block cut by a step range) instead of from the points:
  the same equal-width step buckets over ``[first step, last step]``, but a unit goes whole into
  the bucket holding its first step. When no bucket edge falls between two points of one unit
  (e.g. bucket width a multiple of the block size, edges on block starts) the answer is *exactly*
  ``minmax_indices``' answer; otherwise bucket edges move to unit boundaries, and still every
  bucket keeps its first, min, max and last point and its first NaN: the series' extremes, first
  and last points and first NaN are always kept, at most ``max_points`` points are returned, and
  every returned point is a stored point.
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


SUMMARY_FIELDS = ("count", "first_step", "first_value", "first_wall", "last_step", "last_value", "last_wall",
                  "min_step", "min_value", "min_wall", "max_step", "max_value", "max_wall", "nan_step", "nan_wall")


def _first_in_segments(positions: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Per segment ``[starts[k], ends[k]]``: the smallest of the sorted ``positions`` inside it, or -1."""
    first = np.searchsorted(positions, starts)
    valid = first < positions.size
    candidate = positions[np.where(valid, first, 0)] if positions.size else np.zeros(starts.size, np.int64)
    return np.where(valid & (candidate <= ends), candidate, -1)


def block_summaries(steps: np.ndarray, values: np.ndarray, walls: np.ndarray, block_steps: int,
                    groups: np.ndarray = None) -> dict:
    """Summaries of sorted, unique-step points per block ``step // block_steps``: a dict of equal-length
    arrays, ``block`` and ``SUMMARY_FIELDS`` (with ``groups``, an int per point, several series at
    once, each sorted by step, groups contiguous: a block ends where the group changes too, and
    ``group`` says whose). ``min_*``/``max_*`` are the first point equal to the
    block's minimum/maximum ignoring NaN (``min_step`` -1 and ``min_value`` NaN when the block is
    all NaN); ``nan_step`` is the first NaN's step (-1: none; ``has_nan`` says which)."""
    steps = np.asarray(steps, dtype=np.int64)
    values = np.asarray(values, dtype=np.float64)
    walls = np.asarray(walls, dtype=np.float64)
    n = steps.size
    blocks = np.floor_divide(steps, int(block_steps))
    groups = np.zeros(n, np.int64) if groups is None else np.asarray(groups, dtype=np.int64)
    if n == 0:
        return {"block": blocks, "group": groups, "has_nan": np.zeros(0, bool),
                **{f: np.empty(0, np.int64 if f.endswith("step") or f == "count" else np.float64)
                   for f in SUMMARY_FIELDS}}
    starts = np.flatnonzero(np.r_[True, (blocks[1:] != blocks[:-1]) | (groups[1:] != groups[:-1])])
    ends = np.r_[starts[1:], n] - 1
    counts = ends - starts + 1
    with np.errstate(invalid="ignore"):
        lo, hi = np.fmin.reduceat(values, starts), np.fmax.reduceat(values, starts)
    out = {"block": blocks[starts], "group": groups[starts], "count": counts,
           "first_step": steps[starts], "first_value": values[starts], "first_wall": walls[starts],
           "last_step": steps[ends], "last_value": values[ends], "last_wall": walls[ends]}
    for name, target in (("min", lo), ("max", hi)):
        at = _first_in_segments(np.flatnonzero(values == np.repeat(target, counts)), starts, ends)
        ok = at >= 0
        out[f"{name}_step"] = np.where(ok, steps[at], -1)
        out[f"{name}_value"] = np.where(ok, values[at], np.nan)
        out[f"{name}_wall"] = np.where(ok, walls[at], np.nan)
    at = _first_in_segments(np.flatnonzero(np.isnan(values)), starts, ends)
    out["has_nan"] = at >= 0
    out["nan_step"] = np.where(at >= 0, steps[at], -1)
    out["nan_wall"] = np.where(at >= 0, walls[at], np.nan)
    return out


def minmax_summaries(units: dict, max_points: int):
    """``minmax_indices`` from block summaries (``units``: a ``block_summaries``-shaped dict, sorted
    by step, disjoint). Returns ``(steps, values, walls)`` of the chosen points, or ``None`` when
    the series is not larger than ``max_points`` (then every point is the answer: read them)."""
    if max_points < 1:
        raise ValueError(f"max_points must be at least 1, got {max_points}")
    count = np.asarray(units["count"], dtype=np.int64)
    if int(count.sum()) <= max_points:
        return None
    first_step = np.asarray(units["first_step"], dtype=np.int64)
    last_step = np.asarray(units["last_step"], dtype=np.int64)
    has_nan = np.asarray(units["has_nan"], dtype=bool)
    any_nan = bool(has_nan.any())
    per_bucket = 5 if any_nan else 4
    if max_points < per_bucket:  # as minmax_indices: first and last (or first) point
        picks = [("first", 0), ("last", count.size - 1)][:max_points]
        return (np.array([units[f"{k}_step"][i] for k, i in picks], dtype=np.int64),
                np.array([units[f"{k}_value"][i] for k, i in picks], dtype=np.float64),
                np.array([units[f"{k}_wall"][i] for k, i in picks], dtype=np.float64))
    buckets = max_points // per_bucket
    first, last = int(first_step[0]), int(last_step[-1])
    span = last - first + 1
    edges = first + np.ceil(np.arange(buckets) * (span / buckets)).astype(np.int64)  # as _bucket_starts
    bucket = np.searchsorted(edges, first_step, side="right") - 1
    starts = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]])
    ends = np.r_[starts[1:], count.size] - 1
    sizes = ends - starts + 1
    parts = [("first", starts), ("last", ends)]
    for name, reduce in (("min", np.fmin), ("max", np.fmax)):
        column = np.asarray(units[f"{name}_value"], dtype=np.float64)
        with np.errstate(invalid="ignore"):
            target = reduce.reduceat(column, starts)
        at = _first_in_segments(np.flatnonzero(column == np.repeat(target, sizes)), starts, ends)
        parts.append((name, at[at >= 0]))
    if any_nan:
        at = _first_in_segments(np.flatnonzero(has_nan), starts, ends)
        parts.append(("nan", at[at >= 0]))
    steps = np.concatenate([np.asarray(units[f"{k}_step"], dtype=np.int64)[i] for k, i in parts])
    values = np.concatenate([np.full(i.size, np.nan) if k == "nan" else np.asarray(units[f"{k}_value"], np.float64)[i]
                             for k, i in parts])
    walls = np.concatenate([np.asarray(units[f"{k}_wall"], dtype=np.float64)[i] for k, i in parts])
    steps, keep = np.unique(steps, return_index=True)
    return steps, values[keep], walls[keep]


def downsample(steps: np.ndarray, values: np.ndarray, max_points: int, method: str = "minmax") -> np.ndarray:
    """Indices chosen by ``method`` (``minmax``, ``lttb``; ``none`` keeps all points)."""
    if method == "minmax":
        return minmax_indices(steps, values, max_points)
    if method == "lttb":
        return lttb_indices(steps, values, max_points)
    if method == "none":
        return np.arange(np.asarray(steps).size)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
