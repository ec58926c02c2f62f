"""Points on PostgreSQL live in ``point_chunks`` (revision 0005): arrays per write, series and
block. These tests drive both stores with the same random mix of appends, replays, overlaps and
out-of-order writes against a plain Python model of "first write wins", check the chunk
invariants the reads rely on, the ``metric_points`` view the dashboards query, and the migration
of existing points in both directions."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import sqlalchemy as sa

from moxco.collector import downsample as ds
from moxco.collector.schema import BLOCK_STEPS, RUN_LEVEL_RANK
from moxco.collector.store import MIGRATIONS, Store, normalize_url, upgrade


def _ingest(store, model, run, batch_id, points):
    """Ingest ``points`` [(metric, rank, step, value)] and apply them to ``model`` (first write
    wins, also inside the batch); returns (stored, expected stored)."""
    new = 0
    for metric, rank, step, value in points:
        series = model.setdefault((metric, rank), {})
        if step not in series:
            series[step] = value
            new += 1
    got = store.ingest(run, ([p[0] for p in points], [p[2] for p in points], [p[3] for p in points],
                             [1000.0 + p[2] for p in points], [p[1] for p in points]), batch_id=batch_id)
    return got.stored, new


def _random_batch(rng, model):
    """Mostly appends, sometimes a replay, an overlap reaching back, scattered steps, NaN/Inf."""
    metric = rng.choice(["loss", "inst_gap"])
    rank = rng.choice([RUN_LEVEL_RANK, RUN_LEVEL_RANK, 1])
    last = max(model.get((metric, rank), {-1: 0}))
    kind = rng.random()
    if kind < 0.5:
        steps = list(range(last + 1, last + 1 + rng.randint(1, 700)))
    elif kind < 0.7:
        lo = rng.randint(0, max(0, last))
        steps = list(range(lo, lo + rng.randint(1, 1500)))
    elif kind < 0.85:
        steps = rng.sample(range(0, last + 3000), rng.randint(1, 200))
    else:
        steps = [rng.randint(0, last + 10) for _ in range(rng.randint(1, 50))]  # repeats inside the batch
    values = [rng.choice([math.nan, math.inf, -math.inf]) if rng.random() < 0.02 else rng.gauss(0, 1) for _ in steps]
    return [(metric, rank, s, v) for s, v in zip(steps, values)]


def test_random_writes_read_back_first_write_wins_on_both_stores(store_url):
    rng = random.Random(20261123)
    model: dict = {}
    with Store(store_url) as store:
        store.put_run("r")
        for k in range(60):
            points = _random_batch(rng, model)
            stored, expected = _ingest(store, model, "r", f"b{k}", points)
            assert stored == expected, k
        # the batch id is kept
        assert store.ingest("r", (["loss"], [10**6], [1.0], [1.0], [RUN_LEVEL_RANK]), batch_id="b0").duplicate
        for (metric, rank), series in model.items():
            want_steps = np.array(sorted(series), dtype=np.int64)
            want_values = np.array([series[s] for s in want_steps.tolist()])
            steps, values = store.series("r", metric, rank=rank)
            np.testing.assert_array_equal(steps, want_steps)
            np.testing.assert_array_equal(values, want_values)  # NaN equal to NaN, ±Inf as they are
            for start, end in [(0, 0), (1023, 1024), (BLOCK_STEPS * 2 - 5, BLOCK_STEPS * 3 + 5),
                               (int(want_steps[len(want_steps) // 2]), None), (None, 700)]:
                steps, values = store.series("r", metric, rank=rank, start=start, end=end)
                keep = (want_steps >= (start or 0)) & (want_steps <= (2**62 if end is None else end))
                np.testing.assert_array_equal(steps, want_steps[keep])
                np.testing.assert_array_equal(values, want_values[keep])
            # the block summaries the minmax downsampling reads equal those of the points read back
            stored_blocks = store.block_summaries("r", metric, rank=rank)
            steps, values, walls = store.series_columns("r", metric, rank=rank)
            want = ds.block_summaries(steps, values, walls, BLOCK_STEPS)
            for field in ("block", "count", "first_step", "last_step", "min_step", "max_step", "nan_step"):
                np.testing.assert_array_equal(stored_blocks[field], want[field], err_msg=field)
        if store.dialect == "postgresql":
            _check_chunks(store, model)


def _check_chunks(store, model):
    """Every chunk: sorted unique steps inside its block, ``n`` and first/last consistent; a
    series' chunks disjoint; the ``metric_points`` view equal to the model with NaN as NULL."""
    with store.engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT metric, rank, block, n, first_step, last_step, steps FROM point_chunks").all()
        seen: dict = {}
        for metric, rank, block, n, first, last, steps in rows:
            steps = np.array(steps)
            assert steps.size == n and steps[0] == first and steps[-1] == last
            assert np.all(np.diff(steps) > 0) and np.all(steps // BLOCK_STEPS == block)
            seen.setdefault((metric, rank), []).append(steps)
        for key, parts in seen.items():
            together = np.concatenate(parts)
            assert np.unique(together).size == together.size, key  # disjoint
        view = conn.exec_driver_sql("SELECT metric, rank, step, value FROM metric_points").all()
    want = sorted((m, r, s, None if v != v else v) for (m, r), series in model.items() for s, v in series.items())
    assert sorted(view) == want


def _points_at_0004(url):
    """A store at revision 0004 with points written the old way (one row each, and the series'
    ``latest_points`` rows): NaN as NULL, ±Inf, two ranks, several blocks, a gap."""
    engine = sa.create_engine(normalize_url(url))
    upgrade(engine, "0004")
    rows = [(1, "loss", -1, s, None if s == 7 else (math.inf if s == 8 else s / 10), 5.0 + s)
            for s in list(range(0, 3000)) + list(range(5000, 5003))]
    rows += [(1, "loss", 0, s, -float(s), 1.0) for s in range(0, 2048, 3)]
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO runs (name, status, config, created_at, updated_at) "
                             "VALUES ('r', 'running', '{}', 1, 1)")
        conn.exec_driver_sql("INSERT INTO metric_points VALUES (%s, %s, %s, %s, %s, %s)", rows)
        conn.exec_driver_sql("INSERT INTO latest_points SELECT DISTINCT ON (rank) run_id, metric, rank, step, value, "
                             "wall_time, 1, 0 FROM metric_points ORDER BY rank, step DESC")  # as the store kept it
    engine.dispose()
    return rows


def test_migration_0005_moves_points_into_chunks_and_back(pg_url):
    from alembic import command
    from alembic.config import Config

    rows = _points_at_0004(pg_url)
    with Store(pg_url) as store:  # upgrades to the head
        for rank in (-1, 0):
            want = sorted((s, v) for _r, _m, k, s, v, _w in rows if k == rank)
            steps, values = store.series("r", "loss", rank=rank)
            assert steps.tolist() == [s for s, _v in want]
            np.testing.assert_array_equal(values, [math.nan if v is None else v for _s, v in want])
        with store.engine.connect() as conn:
            assert sorted(conn.exec_driver_sql("SELECT * FROM metric_points").all()) == sorted(rows)
            blocks = conn.exec_driver_sql("SELECT rank, block, n FROM point_chunks ORDER BY rank, block").all()
        assert blocks == [(-1, 0, 1024), (-1, 1, 1024), (-1, 2, 952), (-1, 4, 3), (0, 0, 342), (0, 1, 341)]
        # a write after the migration appends a chunk next to the migrated ones
        got = store.ingest("r", (["loss"] * 3, [2999, 3000, 3001], [9.0] * 3, [1.0] * 3, [-1] * 3), batch_id="after")
        assert got.stored == 2
        rows.append((1, "loss", -1, 3000, 9.0, 1.0))
        rows.append((1, "loss", -1, 3001, 9.0, 1.0))
        engine = store.engine
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.downgrade(config, "0004")
        with engine.connect() as conn:
            assert sorted(conn.exec_driver_sql("SELECT * FROM metric_points").all()) == sorted(rows)
            assert "metric_points" in sa.inspect(conn).get_table_names()
            assert "point_chunks" not in sa.inspect(conn).get_table_names()
    with Store(pg_url) as store:  # and up again
        assert store.series("r", "loss")[0].size == 3000 + 3 + 2


@pytest.mark.parametrize("per_batch", [1, 200, 5000])
def test_long_appended_series_reads_sorted_in_one_pass(store_url, per_batch):
    """Appends of any batch size (one point per chunk to several blocks per batch) read back in
    order, whole and by range, and the cached reader only fetches the tail."""
    with Store(store_url) as store:
        store.put_run("r")
        n = 12_000 if per_batch > 1 else 1_100
        for k, lo in enumerate(range(0, n, per_batch)):
            steps = list(range(lo, min(n, lo + per_batch)))
            store.ingest("r", (["loss"] * len(steps), steps, [float(s) for s in steps], [0.0] * len(steps),
                               [-1] * len(steps)), batch_id=f"b{k}")
        steps, values, _ = store.series_columns("r", "loss")
        assert steps.tolist() == list(range(n)) and values.tolist() == [float(s) for s in range(n)]
        store.ingest("r", (["loss"], [n], [1.5], [0.0], [-1]), batch_id="tail")
        assert store.series_columns("r", "loss")[0][-2:].tolist() == [n - 1, n]
        assert store.series("r", "loss", start=BLOCK_STEPS - 1, end=BLOCK_STEPS)[0].tolist() == [BLOCK_STEPS - 1,
                                                                                                BLOCK_STEPS]


def test_closed_blocks_are_merged_into_one_chunk(pg_url):
    """A slow job sends one step per series and batch: each block of a series is many one-point
    chunks until the series moves past it, then one row; points, NaN and order are kept, and a
    late write of a missing step into a merged block adds a chunk beside it."""
    def chunks(store):
        with store.engine.connect() as conn:
            return conn.exec_driver_sql("SELECT metric, block, count(*), sum(n) FROM point_chunks "
                                        "GROUP BY metric, block ORDER BY metric, block").all()

    with Store(pg_url) as store:
        store.put_run("r")
        n = 2 * BLOCK_STEPS + 10
        steps = [s for s in range(n) if s != 9]  # step 9 comes late
        for step in steps:
            value = math.nan if step == 5 else float(step)
            store.ingest("r", (["loss", "gap"], [step, step], [value, -value], [1.0, 2.0], [-1, -1]),
                         batch_id=f"b{step}")
        full = BLOCK_STEPS
        assert chunks(store) == [("gap", 0, 1, full - 1), ("gap", 1, 1, full), ("gap", 2, 10, 10),
                                 ("loss", 0, 1, full - 1), ("loss", 1, 1, full), ("loss", 2, 10, 10)]
        got = store.ingest("r", (["loss", "loss"], [7, 9], [99.0, 9.0], [1.0, 1.0], [-1, -1]), batch_id="late")
        assert got.stored == 1
        assert chunks(store)[3] == ("loss", 0, 2, full)
        got_steps, got_values = store.series("r", "loss")
        want = np.arange(n, dtype=float)
        want[5] = math.nan
        np.testing.assert_array_equal(got_steps, np.arange(n))
        np.testing.assert_array_equal(got_values, want)
        np.testing.assert_array_equal(store.series("r", "gap")[0], steps)
