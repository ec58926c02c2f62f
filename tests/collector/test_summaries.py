"""Block summaries (``series_blocks``) and minmax downsampling from them, against the raw path.

Property tests (hypothesis): ``minmax_summaries`` over ``block_summaries`` equals ``minmax_indices``
over the points whenever bucket edges fall on block boundaries, and otherwise equals the raw
algorithm with each block moved whole into the bucket of its first step (so extremes, first/last
points and the first NaN survive). Then the store: whatever order, overlap and replay the points
arrive in, every stored block summary equals the summary recomputed from the stored points, and
the series endpoint's minmax answer equals the pure function on the raw points — on SQLite and
PostgreSQL.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moxco.collector import downsample as ds
from moxco.collector.schema import BLOCK_STEPS
from moxco.collector.store import Store

VALUES = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                   st.sampled_from([0.0, -0.0, 1.0, math.nan, math.inf, -math.inf]))


def _points(steps, values):
    steps = np.asarray(sorted(set(steps)), dtype=np.int64)
    values = np.asarray(values[: steps.size] + [0.0] * (steps.size - len(values)), dtype=np.float64)
    walls = 1000.0 + steps * 0.5
    return steps, values, walls


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.all((a == b) | (np.isnan(a) & np.isnan(b))))


def _units(steps, values, walls, block):
    return ds.block_summaries(steps, values, walls, block)


def _snapped_reference(steps, values, walls, block, max_points):
    """The definition for unaligned edges: raw minmax per bucket, where a block goes whole into
    the bucket holding its first point."""
    n = steps.size
    any_nan = bool(np.isnan(values).any())
    per_bucket = 5 if any_nan else 4
    buckets = max_points // per_bucket
    span = int(steps[-1]) - int(steps[0]) + 1
    edges = int(steps[0]) + np.ceil(np.arange(buckets) * (span / buckets)).astype(np.int64)
    blocks = np.floor_divide(steps, block)
    block_first = {}
    for s, b in zip(steps.tolist(), blocks.tolist()):
        block_first.setdefault(b, s)
    bucket_of = np.array([np.searchsorted(edges, block_first[b], side="right") - 1 for b in blocks.tolist()])
    chosen = set()
    for b in np.unique(bucket_of):
        idx = np.flatnonzero(bucket_of == b)
        chosen.update([idx[0], idx[-1]])
        v = values[idx]
        finite = ~np.isnan(v)
        if finite.any():
            chosen.add(idx[np.flatnonzero(v == np.min(v[finite]))[0]])
            chosen.add(idx[np.flatnonzero(v == np.max(v[finite]))[0]])
        if (~finite).any():
            chosen.add(idx[np.flatnonzero(~finite)[0]])
    index = np.array(sorted(chosen))
    assert n > max_points
    return steps[index], values[index], walls[index]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(block=st.sampled_from([1, 2, 4, 8]), buckets=st.integers(1, 12), per_block=st.integers(1, 4),
       offset=st.integers(-3, 50), data=st.data())
def test_aligned_buckets_give_exactly_the_raw_answer(block, buckets, per_block, offset, data):
    # a series over [first, first + buckets * per_block * block): bucket edges on block starts
    first = offset * block
    width = buckets * per_block * block
    inner = data.draw(st.sets(st.integers(first + 1, first + width - 2), max_size=width)) if width > 2 else set()
    steps_list = sorted({first, first + width - 1} | inner)
    values = data.draw(st.lists(VALUES, min_size=len(steps_list), max_size=len(steps_list)))
    steps, values, walls = _points(steps_list, values)
    per_bucket = 5 if np.isnan(values).any() else 4
    max_points = buckets * per_bucket + data.draw(st.integers(0, per_bucket - 1))
    got = ds.minmax_summaries(_units(steps, values, walls, block), max_points)
    raw = ds.minmax_indices(steps, values, max_points)
    if got is None:
        assert steps.size <= max_points and raw.tolist() == list(range(steps.size))
        return
    assert got[0].tolist() == steps[raw].tolist()
    assert _same(got[1], values[raw]) and _same(got[2], walls[raw])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(block=st.sampled_from([1, 3, 4, 16]), steps_list=st.sets(st.integers(-40, 400), min_size=1, max_size=300),
       max_points=st.integers(1, 60), data=st.data())
def test_any_buckets_keep_extremes_nan_first_and_last(block, steps_list, max_points, data):
    steps_list = sorted(steps_list)
    values = data.draw(st.lists(VALUES, min_size=len(steps_list), max_size=len(steps_list)))
    steps, values, walls = _points(steps_list, values)
    got = ds.minmax_summaries(_units(steps, values, walls, block), max_points)
    if got is None:
        assert steps.size <= max_points
        return
    out_steps, out_values, out_walls = got
    assert out_steps.size <= max_points and np.all(np.diff(out_steps) > 0)
    at = np.searchsorted(steps, out_steps)
    assert np.all(steps[at] == out_steps)  # real points, with their own value and wall time
    assert _same(out_values, values[at]) and _same(out_walls, walls[at])
    per_bucket = 5 if np.isnan(values).any() else 4
    if max_points < per_bucket:
        assert out_steps.tolist() == [steps[0], steps[-1]][:max_points]
        return
    kept = set(out_steps.tolist())
    assert {int(steps[0]), int(steps[-1])} <= kept
    finite = ~np.isnan(values)
    if finite.any():
        v = values[finite]
        assert int(steps[finite][np.flatnonzero(v == v.min())[0]]) in kept
        assert int(steps[finite][np.flatnonzero(v == v.max())[0]]) in kept
    if (~finite).any():
        assert int(steps[~finite][0]) in kept
    ref = _snapped_reference(steps, values, walls, block, max_points)
    assert out_steps.tolist() == ref[0].tolist() and _same(out_values, ref[1])


@settings(max_examples=200, deadline=None)
@given(steps_list=st.sets(st.integers(-100, 300), min_size=1, max_size=200), cut=st.integers(0, 200),
       block=st.sampled_from([1, 4, 8]), data=st.data())
def test_summaries_of_disjoint_parts_merge_to_the_whole(steps_list, cut, block, data):
    steps_list = sorted(steps_list)
    values = data.draw(st.lists(VALUES, min_size=len(steps_list), max_size=len(steps_list)))
    steps, values, walls = _points(steps_list, values)
    whole = _units(steps, values, walls, block)
    mask = np.array([random.Random(cut + i).random() < 0.5 for i in range(steps.size)])
    a, b = _units(steps[mask], values[mask], walls[mask], block), _units(steps[~mask], values[~mask], walls[~mask], block)
    merged = {}
    for part in (a, b):
        for k in range(part["block"].size):
            row = {f: part[f][k] for f in ds.SUMMARY_FIELDS + ("has_nan",)}
            merged[int(part["block"][k])] = _merge(merged.get(int(part["block"][k])), row)
    assert sorted(merged) == whole["block"].tolist()
    for k, blk in enumerate(whole["block"].tolist()):
        for f in ds.SUMMARY_FIELDS:
            assert _same(np.array([merged[blk][f]], float), np.array([whole[f][k]], float)), (blk, f)


def _merge(old, new):
    """The merge the store's upsert does (in SQL), in Python."""
    if old is None:
        return dict(new)
    out = dict(old)
    out["count"] = old["count"] + new["count"]
    for name, better in (("first", lambda n, o: n["first_step"] < o["first_step"]),
                         ("last", lambda n, o: n["last_step"] > o["last_step"]),
                         ("min", lambda n, o: not math.isnan(n["min_value"]) and (
                             math.isnan(o["min_value"]) or n["min_value"] < o["min_value"]
                             or (n["min_value"] == o["min_value"] and n["min_step"] < o["min_step"]))),
                         ("max", lambda n, o: not math.isnan(n["max_value"]) and (
                             math.isnan(o["max_value"]) or n["max_value"] > o["max_value"]
                             or (n["max_value"] == o["max_value"] and n["max_step"] < o["max_step"]))),
                         ("nan", lambda n, o: n["has_nan"] and (not o["has_nan"] or n["nan_step"] < o["nan_step"]))):
        if better(new, old):
            for f in ds.SUMMARY_FIELDS:
                if f.startswith(name + "_"):
                    out[f] = new[f]
            if name == "nan":
                out["has_nan"] = True
    return out


# --- the store: summaries maintained on ingest, on SQLite and PostgreSQL --------------------------

def _check_store(store: Store, run: str, metric: str, rank: int = -1) -> None:
    steps, values, walls = store.series_columns(run, metric, rank=rank)
    stored = store.block_summaries(run, metric, rank=rank)
    expected = ds.block_summaries(steps, values, walls, BLOCK_STEPS)
    assert stored["block"].tolist() == expected["block"].tolist()
    for f in ds.SUMMARY_FIELDS + ("has_nan",):
        assert _same(np.asarray(stored[f], float), np.asarray(expected[f], float)), f
    answered = 0
    for max_points, start, end in ((2000, None, None), (21, None, None), (13, None, None), (9, None, None),
                                   (3, None, None), (12, 700, None), (12, None, 5000), (11, 1500, 4100),
                                   (8, 1024, 4095), (8, 1000, 99_999)):
        lo = 0 if start is None else int(np.searchsorted(steps, start))
        hi = steps.size if end is None else int(np.searchsorted(steps, end, side="right"))
        s, v, w = steps[lo:hi], values[lo:hi], walls[lo:hi]
        got = store.series_minmax(run, metric, rank=rank, start=start, end=end, max_points=max_points)
        want = ds.minmax_summaries(ds.block_summaries(s, v, w, BLOCK_STEPS), max_points) if s.size else None
        if got is None:  # the caller reads the points: small range, or fewer blocks than buckets
            continue
        answered += 1
        total, g_steps, g_values, g_walls = got
        assert total == s.size
        assert want is not None and g_steps.tolist() == want[0].tolist()
        assert _same(g_values, want[1]) and _same(g_walls, want[2])
    assert answered >= 5


def test_store_summaries_follow_out_of_order_overlapping_and_replayed_batches(store_url):
    rng = random.Random(7)
    with Store(store_url) as store:
        store.put_run("r")
        n = 6000
        values = [math.sin(i / 50.0) for i in range(n)]
        for i in rng.sample(range(n), 40):
            values[i] = rng.choice([math.nan, math.inf, -math.inf, 5.0, -5.0])
        # appends in order, in batches that straddle block boundaries, two metrics and a rank
        batches, k = [], 0
        while k < 4000:
            size = rng.randint(1, 700)
            batches.append(list(range(k, min(k + size, 4000))))
            k += size
        # then: a batch out of order with gaps, a replay (same points, new batch id), overlapping
        # batches with new points in old blocks, and a far-away block
        batches += [list(range(5000, 6000, 3)), list(range(4000, 4500)), list(range(100, 300)),
                    list(range(4200, 5200)), list(range(4001, 6000, 7)), [100_000, 100_001]]
        for b, chunk in enumerate(batches):
            rng.shuffle(chunk)
            metrics = ["loss"] * len(chunk) + ["gn"] * len(chunk)
            steps = chunk + chunk
            vals = [values[s % n] for s in chunk] + [float(s) for s in chunk]
            store.ingest("r", (metrics, steps, vals, [1000.0 + s for s in steps], [-1] * len(steps)), batch_id=f"b{b}")
            if b % 5 == 0:
                store.ingest("r", [(s, "loss", values[s % n], 2000.0, 0) for s in chunk])
            if b in (3, len(batches) - 1):
                _check_store(store, "r", "loss")
        # a retried batch id stores nothing; a duplicate point in one batch keeps the first value
        store.ingest("r", (["loss"], [0], [99.0], [0.0], [-1]), batch_id="b0")
        store.ingest("r", (["loss", "loss"], [200_000, 200_000], [1.0, 2.0], [0.0, 0.0], [-1, -1]), batch_id="dup")
        assert store.series("r", "loss", start=200_000)[1].tolist() == [1.0]
        for metric, rank in (("loss", -1), ("gn", -1), ("loss", 0)):
            _check_store(store, "r", metric, rank)


def test_store_minmax_of_a_large_series_matches_the_raw_path_when_aligned(store_url):
    """256 blocks; 642 points → 128 buckets of exactly two blocks: the raw answer; 1000 points → 200
    buckets (snapped); 2000 points → 400 buckets, more than blocks: ``None`` (the caller reads raw)."""
    with Store(store_url) as store:
        store.put_run("big")
        n = 256 * BLOCK_STEPS
        values = np.sin(np.arange(n) / 300.0)
        values[12345] = math.nan
        values[99999] = 50.0
        for k in range(0, n, 50_000):
            idx = np.arange(k, min(k + 50_000, n))
            store.ingest("big", (["loss"] * idx.size, idx.tolist(), values[idx].tolist(), (idx * 0.01).tolist(),
                                 [-1] * idx.size), batch_id=f"b{k}")
        steps = np.arange(n)
        # 128 buckets of exactly 2 blocks (5 points each with the NaN): edges on block starts
        total, s, v, w = store.series_minmax("big", "loss", max_points=128 * 5 + 2)
        raw = ds.minmax_indices(steps, values, 128 * 5 + 2)
        assert total == n and s.tolist() == raw.tolist() and _same(v, values[raw])
        assert 99999 in s.tolist() and 12345 in s.tolist()
        assert store.series_minmax("big", "loss", max_points=1000)[0] == n  # 200 buckets (snapped)
        assert store.series_minmax("big", "loss", max_points=2000) is None  # more buckets than blocks
        assert store.series_minmax("big", "nope", max_points=2000) is None


def test_migration_0003_backfills_summaries(tmp_path):
    from moxco.collector.store import upgrade

    url = f"sqlite:///{tmp_path / 'old.db'}"
    store = Store(url, migrate=False)
    upgrade(store.engine, "0002")
    with store.engine.begin() as conn:  # a run and its points as a 0002 store holds them (no series_blocks yet)
        conn.exec_driver_sql("INSERT INTO runs (name, status, config, created_at, updated_at) "
                             "VALUES ('r', 'running', '{}', 1, 1)")
        run_id = conn.exec_driver_sql("SELECT id FROM runs").scalar()
        conn.exec_driver_sql("INSERT INTO metric_points VALUES (?, 'loss', -1, ?, ?, 1.0)",
                             [(run_id, i, None if i == 7 else float(i % 17)) for i in range(3000)])
        conn.exec_driver_sql("INSERT INTO latest_points VALUES (?, 'loss', -1, 2999, 7.0, 1.0, 1, 0)", (run_id,))
    store.close()
    with Store(url) as store:  # upgrades to head
        _check_store(store, "r", "loss")
