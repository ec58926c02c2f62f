"""Every SQL query of the generated dashboards (panels, annotations, variables) runs on a real
PostgreSQL store written by the collector's storage layer, with Grafana's macros expanded as its
PostgreSQL data source documents them, and returns what the store holds. This is what keeps the
panels working when the schema changes (points became chunks behind the ``metric_points`` view in
revision 0005)."""

from __future__ import annotations

import math
import re
import time

import numpy as np
import pytest

from moxco import catalogue
from moxco.collector.store import Store
from moxco.decision import Decision
from moxco.dashboards.store_sql import FULL_RESOLUTION
from moxco.dashboards.validate import iter_queries, sql_metric_names

INTERVAL_S = 60  # what Grafana puts for $__interval here ("1m")


def expand(sql: str, runs, start: float, end: float) -> str:
    """Grafana's PostgreSQL macros and template variables, as documented: ``$__interval`` is the
    panel's interval (here 1m), ``$__unixEpochGroupAlias(col, 1m)`` is ``floor(col/60)*60 AS
    "time"``, ``$__unixEpochFilter(col)`` is ``col >= from AND col <= to`` (epoch seconds),
    ``${run:sqlstring}`` the selected runs quoted and joined with commas."""
    sql = sql.replace("${run:sqlstring}", ",".join("'" + r.replace("'", "''") + "'" for r in runs))
    sql = sql.replace("$__interval", "1m")
    sql = re.sub(r"\$__unixEpochGroupAlias\(([^,]+),\s*1m\)",
                 lambda m: f'floor({m.group(1)}/{INTERVAL_S})*{INTERVAL_S} AS "time"', sql)
    sql = re.sub(r"\$__unixEpochFilter\(([^)]+)\)", lambda m: f"{m.group(1)} >= {start} AND {m.group(1)} <= {end}", sql)
    assert "$" not in sql, sql  # every macro and variable the dashboards use is expanded
    return sql


@pytest.fixture
def store(pg_url, models):
    """Two runs written through the storage layer: every metric a dashboard query names, over
    three blocks of steps with a NaN and an out-of-order rewrite, plus decisions."""
    metrics = sorted(set().union(*(sql_metric_names(text) for m in models.values()
                                   for _w, lang, text in iter_queries(m) if lang == "sql")))
    assert {"loss", "phase", "goodness", "sharpness"} <= set(metrics)
    now = time.time()
    rng = np.random.default_rng(7)
    with Store(pg_url) as store:
        for run, n in (("alpha", 3000), ("beta's", 40)):
            store.put_run(run, policy={"threshold": 0.75, "consecutive": 10**6} if run == "alpha" else None)
            for k, lo in enumerate(range(0, n, 250)):
                steps = list(range(lo, min(n, lo + 250)))
                names = [m for m in metrics for _ in steps]
                values = [math.nan if s == 17 else (1.0 + (s % 2) if m == "phase" else float(rng.normal()))
                          for m in metrics for s in steps]
                walls = [now - 600 + s * 0.1 for _m in metrics for s in steps]
                store.ingest(run, (names, steps * len(metrics), values, walls, [-1] * len(names)),
                             batch_id=f"{run}-{k}")
            store.ingest(run, (["loss"], [5], [-50.0], [now], [-1]), batch_id=f"{run}-back")  # stored already: ignored
            store.add_decision(run, Decision(n - 1, {"phase": 2}, source="operator"))
        store.set_status("beta's", "finished")  # a finished run stays selectable
        yield store


def test_every_dashboard_query_runs_and_matches_the_store(store, models):
    start, end = time.time() - 3600, time.time() + 60
    ran = set()
    for uid, model in models.items():
        variable = next(v for v in model["templating"]["list"] if v["name"] == "run")
        selections = [["alpha", "beta's"]] if variable.get("multi") else [["alpha"], ["beta's"]]
        for where, lang, text in iter_queries(model):
            if lang != "sql":
                continue
            for runs in selections:
                sql = expand(text, runs, start, end)
                with store.engine.connect() as conn:
                    result = conn.exec_driver_sql(sql)
                    rows = [dict(zip(result.keys(), row)) for row in result]
                _check(store, sql, rows, runs, (uid, where, runs))
            ran.add(where)
    # every by-step panel, the two variables, the two tables, the decision annotations
    assert len(ran) == len(catalogue.PANELS) + 5, sorted(ran)


PIVOT = re.compile(r"FILTER \(WHERE x\.metric = '([^']+)'\) AS \"([^\"]+)\"")


def _finite(steps, values):
    return [(int(s), float(v)) for s, v in zip(steps, values) if math.isfinite(v)]


def _check(store, sql, rows, runs, where):
    if sql.startswith("SELECT name FROM runs"):  # the run variable: every run, newest first
        assert [r["name"] for r in rows] == ["beta's", "alpha"], where
    elif "'NaN')" in sql and "threshold" in sql:  # the C variable: the run's stored threshold
        assert [list(r.values()) for r in rows] == [["0.75" if runs == ["alpha"] else "NaN"]], where
    elif 'AS "step"' in sql:  # a catalogue panel by step: full resolution, else block summaries
        (run,) = runs
        steps_out = [r["step"] for r in rows]
        assert steps_out == sorted(set(steps_out)), where
        for metric, label in PIVOT.findall(sql):
            steps, values = store.series(run, metric)
            got = [(r["step"], r[label]) for r in rows if r[label] is not None]
            if steps.size <= FULL_RESOLUTION:
                assert got == _finite(steps, values), where
            else:  # each block's first, lowest, highest and last point, and its first NaN as a gap
                blocks = store.block_summaries(run, metric)
                want = set()
                for k in range(blocks["block"].size):
                    for f in ("first", "min", "max", "last"):
                        if blocks[f"{f}_step"][k] >= 0 and math.isfinite(blocks[f"{f}_value"][k]):
                            want.add((int(blocks[f"{f}_step"][k]), float(blocks[f"{f}_value"][k])))
                assert got == sorted(want), where
                assert min(v for _s, v in got) == np.nanmin(values) and max(v for _s, v in got) == np.nanmax(values)
                nan_steps = {int(s) for s, v in zip(steps, values) if math.isnan(v)}
                assert nan_steps and nan_steps <= set(steps_out), where  # the NaN is a gap where it is
                assert len(rows) <= 5 * blocks["block"].size * len(PIVOT.findall(sql)), where
        if '"C"' in sql:
            assert {r["C"] for r in rows} == ({0.75} if run == "alpha" else {None}), where
    elif 'AS "last loss"' in sql:  # the runs summary table
        assert [r["run"] for r in rows] == runs, where
        for row in rows:
            loss = store.series(row["run"], "loss")[1]
            sharpness = store.series(row["run"], "sharpness")[1]
            assert row["last loss"] == store.latest(row["run"])["loss"].value
            assert row["min loss"] == np.nanmin(loss) and row["max sharpness"] == np.nanmax(sharpness), where
            assert row["phase"] == store.latest(row["run"])["phase"].value and row["decisions"] == 1
            assert row["threshold C"] == (0.75 if row["run"] == "alpha" else None)
    else:  # decisions, as annotations or as a table
        assert len(rows) == sum(len(store.decisions(run)) for run in runs) == len(runs), where
        assert all("phase" in (r.get("action") or r.get("text")) for r in rows), where
