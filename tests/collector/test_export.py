"""Data out: CSV and Parquet exports of a series and of a whole run (the API, ``moxco export``,
``Store.frame``) give back exactly what ``Store.series`` holds (values, NaN, ±Inf, steps) on SQLite
and on PostgreSQL; a 1 M-point export streams in bounded memory; series page beyond the per-call
cap; unknown query parameters are refused."""

from __future__ import annotations

import io
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from moxco.cli import main as moxco_main
from moxco.collector.api import ROUTES, create_app
from moxco.collector.store import EXPORT_CHUNK_POINTS, Store

REPO = Path(__file__).resolve().parents[2]
SPECIAL = {7: math.nan, 11: math.inf, 13: -math.inf, 2000: math.nan, 5000: -math.inf}


def _values(steps):
    return [SPECIAL.get(s, math.sin(s / 37.0) * 10 ** (s % 5 - 2)) for s in steps]


def _fill(store: Store, run: str = "r") -> None:
    """``loss`` over five blocks (gaps, non-finite values, an out-of-order late batch), ``goodness``
    every third step, a per-rank series, and a user series with a comma in its name."""
    store.put_run(run)
    steps = [s for s in range(0, 5200) if s % 97 != 5]
    late = steps[100:300]
    first = [s for s in steps if s not in set(late)]
    for k, lo in enumerate(range(0, len(first), 1500)):
        part = first[lo:lo + 1500]
        store.ingest(run, (["loss"] * len(part), part, _values(part), [1e9 + s * 0.25 for s in part], [-1] * len(part)),
                     batch_id=f"loss-{k}")
    store.ingest(run, (["loss"] * len(late), late, _values(late), [1e9 + s * 0.25 for s in late], [-1] * len(late)),
                 batch_id="late")
    good = list(range(0, 5200, 3))
    store.ingest(run, (["goodness"] * len(good), good, [math.nan if s == 300 else s / 5200 for s in good],
                       [1e9 + s * 0.25 + 0.01 for s in good], [-1] * len(good)), batch_id="goodness")
    store.ingest(run, [(s, "grad_norm_sq", 2.0, 1e9 + s, 0) for s in range(10)])
    store.ingest(run, [(s, "my,metric", -float(s), 1e9 + s * 0.25) for s in range(0, 60, 2)])


@pytest.fixture
def client(store_url):
    store = Store(store_url)
    _fill(store)
    with TestClient(create_app(store=store, auth=False, migrate=False), base_url="http://127.0.0.1") as c:
        yield c, store
    store.close()


def _same(got, want) -> bool:
    return np.array_equal(np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64), equal_nan=True)


def test_series_csv_and_parquet_round_trip_against_store_series(client):
    c, store = client
    steps, values = store.series("r", "loss")
    walls = store.series_columns("r", "loss")[2]
    assert np.isnan(values).sum() == 2 and np.isposinf(values).sum() == 1 and np.isneginf(values).sum() == 2
    r = c.get("/api/v1/runs/r/series/loss", params={"format": "csv"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert 'filename="r-loss.csv"' in r.headers["content-disposition"]
    frame = pd.read_csv(io.StringIO(r.text))
    assert list(frame.columns) == ["step", "value", "wall_time"]
    assert frame["step"].tolist() == steps.tolist()
    assert _same(frame["value"], values) and _same(frame["wall_time"], walls)
    assert "Infinity" in r.text and "-Infinity" in r.text and "\nNaN" not in r.text  # the API's spelling
    r = c.get("/api/v1/runs/r/series/loss", params={"format": "parquet"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/vnd.apache.parquet"
    table = pq.read_table(io.BytesIO(r.content), use_threads=False)
    assert table.schema.field("value").type == "double" and table["value"].null_count == 0  # NaN is NaN, not null
    assert table["step"].to_pylist() == steps.tolist() and _same(table["value"].to_numpy(), values)
    assert table.schema.metadata[b"metric"] == b"loss"
    # a range, and a per-rank series
    window = pd.read_csv(io.StringIO(c.get("/api/v1/runs/r/series/loss", params={
        "format": "csv", "start_step": 1000, "end_step": 3071}).text))
    keep = (steps >= 1000) & (steps <= 3071)
    assert window["step"].tolist() == steps[keep].tolist() and _same(window["value"], values[keep])
    ranked = pd.read_csv(io.StringIO(c.get("/api/v1/runs/r/series/grad_norm_sq",
                                           params={"format": "csv", "rank": 0}).text))
    assert ranked["step"].tolist() == list(range(10))


def test_run_export_is_wide_by_step_and_tells_a_stored_nan_from_a_missing_point(client):
    c, store = client
    metrics = ["loss", "goodness", "my,metric"]  # catalogue order, then the user's series
    csv = c.get("/api/v1/runs/r/export", params={"format": "csv"})
    assert csv.status_code == 200 and csv.text.splitlines()[0] == 'step,wall_time,loss,goodness,"my,metric"'
    frame = pd.read_csv(io.StringIO(csv.text), keep_default_na=False, na_values={m: ["NaN"] for m in metrics})
    parquet = pq.read_table(io.BytesIO(c.get("/api/v1/runs/r/export", params={"format": "parquet"}).content),
                            use_threads=False)
    assert parquet.column_names == ["step", "wall_time", *metrics]
    union = sorted(set().union(*(store.series("r", m)[0].tolist() for m in metrics)))
    assert frame["step"].tolist() == union == parquet["step"].to_pylist()
    for m in metrics:
        steps, values = store.series("r", m)
        at = np.searchsorted(union, steps)
        column = parquet[m]
        assert column.null_count == len(union) - steps.size  # null: no point at that step
        assert _same(column.to_numpy(zero_copy_only=False)[at], values)  # NaN: a stored NaN
        text = frame[m].tolist()
        assert sum(1 for v in text if v == "") == len(union) - steps.size
        assert _same([float(text[i]) for i in at], values)
    frame_api = store.frame("r")
    assert list(frame_api.columns) == ["wall_time", *metrics] and frame_api.index.name == "step"
    assert frame_api.index.tolist() == union
    assert _same(frame_api["loss"].to_numpy()[np.searchsorted(union, store.series("r", "loss")[0])],
                 store.series("r", "loss")[1])
    assert frame_api["wall_time"].loc[3] == 1e9 + 3 * 0.25  # the earliest of the step's points (loss, goodness)
    assert frame_api["wall_time"].loc[2] == 1e9 + 2 * 0.25 and math.isnan(frame_api["goodness"].loc[2])
    # some metrics only, and one rank
    some = pd.read_csv(io.StringIO(c.get("/api/v1/runs/r/export", params=[("metric", "goodness")]).text))
    assert list(some.columns) == ["step", "wall_time", "goodness"]
    ranked = pd.read_csv(io.StringIO(c.get("/api/v1/runs/r/export", params={"rank": 0}).text))
    assert list(ranked.columns) == ["step", "wall_time", "grad_norm_sq"] and len(ranked) == 10


def test_exports_refuse_what_they_cannot_do(client):
    c, _ = client
    r = c.get("/api/v1/runs/nope/series/loss", params={"format": "csv"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert c.get("/api/v1/runs/nope/export").status_code == 404
    r = c.get("/api/v1/runs/r/series/loss", params={"format": "csv", "max_points": 10})
    assert r.status_code == 422 and "max_points" in r.json()["error"]["message"]
    assert c.get("/api/v1/runs/r/series/loss", params={"format": "xlsx"}).status_code == 422
    assert c.get("/api/v1/runs/r/export", params={"format": "json"}).status_code == 422


def test_unknown_query_parameters_are_refused_on_every_api_route(client):
    c, _ = client
    r = c.get("/api/v1/runs/r/series/loss", params={"fromat": "csv"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_parameter"
    assert "'fromat'" in r.json()["error"]["message"] and "format" in r.json()["error"]["message"]
    checked = 0
    for route in ROUTES:
        if not route.path.startswith("/api/") or "GET" not in route.methods:
            continue
        path = route.path.replace("{run}", "r").replace("{metric}", "loss").replace("{decision_id}", "x")
        r = c.get(path, params={"no_such_parameter": "1"})
        assert r.status_code == 422 and "no_such_parameter" in r.json()["error"]["message"], path
        checked += 1
    assert checked >= 8
    assert c.get("/runs/r", params={"refresh": "0"}).status_code == 200  # the pages keep their own parameters


def test_series_pages_beyond_the_per_call_cap(client):
    c, store = client
    steps, values = store.series("r", "loss")
    got_steps, got_values, start, pages = [], [], None, 0
    while True:
        params = {"method": "none", "paged": "true", "max_points": 1000}
        if start is not None:
            params["start_step"] = start
        page = c.get("/api/v1/runs/r/series/loss", params=params).json()
        assert len(page["steps"]) <= 1000
        got_steps += page["steps"]
        got_values += [float(v) if not isinstance(v, str) else float(v.replace("Infinity", "inf")) for v in page["values"]]
        pages += 1
        start = page["next_start_step"]
        if start is None:
            break
    assert pages == math.ceil(steps.size / 1000) and got_steps == steps.tolist() and _same(got_values, values)
    r = c.get("/api/v1/runs/r/series/loss", params={"method": "none", "max_points": 1000})
    assert r.status_code == 422 and "paged=true" in r.json()["error"]["message"]
    assert c.get("/api/v1/runs/r/series/loss", params={"paged": "true"}).status_code == 422  # only with method=none


def test_moxco_export_from_a_store_and_from_a_collector(tmp_path, serve, monkeypatch):
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    with Store(url) as store:
        _fill(store, "job α")
        steps, values = store.series("job α", "loss")
        run_frame = store.frame("job α")
    monkeypatch.chdir(tmp_path)
    assert moxco_main(["export", "job α", "--store", url]) == 0
    written = pd.read_csv(tmp_path / "job α.csv", index_col="step")
    assert written.index.tolist() == run_frame.index.tolist()
    assert _same(written["loss"], run_frame["loss"]) and _same(written["wall_time"], run_frame["wall_time"])
    assert moxco_main(["export", "job α", "--store", url, "--metric", "loss", "--format", "parquet",
                       "-o", str(tmp_path / "loss.parquet")]) == 0
    table = pq.read_table(tmp_path / "loss.parquet", use_threads=False)
    assert table["step"].to_pylist() == steps.tolist() and _same(table["value"].to_numpy(), values)
    assert moxco_main(["export", "no such run", "--store", url]) == 2
    assert not (tmp_path / "no such run.csv").exists()

    collector = serve(url, "--no-auth")
    assert moxco_main(["export", "job α", "--url", collector.url, "--metric", "loss", "-o", "http.csv"]) == 0
    frame = pd.read_csv(tmp_path / "http.csv")
    assert frame["step"].tolist() == steps.tolist() and _same(frame["value"], values)
    monkeypatch.setenv("MOXCO_URL", collector.url)  # the collector from the environment
    assert moxco_main(["export", "job α", "--format", "parquet", "-o", "http.parquet"]) == 0
    table = pq.read_table(tmp_path / "http.parquet", use_threads=False)
    assert table["step"].to_pylist() == run_frame.index.tolist()
    assert moxco_main(["export", "missing", "-o", "x.csv"]) == 2
    assert not (tmp_path / "x.csv").exists() and not (tmp_path / "x.csv.partial").exists()


MEMORY_PROBE = textwrap.dedent("""
    import sys, tracemalloc
    import pyarrow, pyarrow.parquet  # imported before measuring
    from moxco.collector import export
    from moxco.collector.store import Store

    store = Store(sys.argv[1], migrate=False)
    # every code path once on a few points first: imports and caches are not the export's memory
    list(export.csv_series(store.series_chunks("big", "loss", end=10)))
    list(export.csv_table(["loss"], store.table_chunks("big", ["loss"], end=10)))
    list(export.parquet_series(store.series_chunks("big", "loss", end=10), {}))
    for kind in ("csv", "parquet", "table"):
        pool = pyarrow.default_memory_pool()
        tracemalloc.start()
        if kind == "csv":
            chunks = export.csv_series(store.series_chunks("big", "loss"))
        elif kind == "parquet":
            chunks = export.parquet_series(store.series_chunks("big", "loss"), {})
        else:
            chunks = export.csv_table(["loss"], store.table_chunks("big", ["loss"]))
        size = pieces = 0
        for chunk in chunks:
            size, pieces = size + len(chunk), pieces + 1
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        print(kind, size, pieces, peak, pool.max_memory())
""")


@pytest.mark.slow
def test_a_million_point_export_streams_in_bounded_memory(store_url):
    """Exporting 10^6 points holds one window of ``EXPORT_CHUNK_POINTS`` (32,768) points at a time:
    the Python objects alive at the peak (tracemalloc, in a fresh process) stay under 24 MB, where
    the series as Python floats alone would take 24 MB and reading it at once (``load_columns`` on
    SQLite) ~230 MB; pyarrow's own pool under 24 MB too. The output arrives in many pieces."""
    n = 1_000_000
    with Store(store_url) as store:
        store.put_run("big")
        for lo in range(0, n, 100_000):
            steps = list(range(lo, lo + 100_000))
            store.ingest("big", (["loss"] * len(steps), steps, np.sin(np.arange(lo, lo + 100_000) / 100.0).tolist(),
                                 [1e9 + s for s in steps], [-1] * len(steps)), batch_id=f"b{lo}")
        assert store.series_columns("big", "loss")[0].size == n
    done = subprocess.run([sys.executable, "-c", MEMORY_PROBE, store_url], capture_output=True, text=True,
                          cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr
    results = {line.split()[0]: list(map(int, line.split()[1:])) for line in done.stdout.splitlines()}
    assert set(results) == {"csv", "parquet", "table"}
    for kind, (size, pieces, peak, arrow_peak) in results.items():
        print(f"{kind}: {size / 2**20:.1f} MiB in {pieces} pieces, peak {peak / 2**20:.1f} MiB of Python objects, "
              f"pyarrow pool {arrow_peak / 2**20:.1f} MiB")
        assert size > (8 if kind == "parquet" else 20) * 2**20, kind  # the whole series went out
        assert pieces >= n // EXPORT_CHUNK_POINTS, kind  # in pieces, as it was read
        assert peak < 24 * 2**20, (kind, peak)
        assert arrow_peak < 24 * 2**20, (kind, arrow_peak)
