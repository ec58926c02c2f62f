"""Every SQL query of the generated dashboards runs on a real PostgreSQL store written by the
collector's storage layer, with Grafana's macros expanded as its PostgreSQL data source documents
them, and returns what the store holds. This is what keeps the panels working when the schema
changes (points became chunks behind the ``metric_points`` view in revision 0005)."""

from __future__ import annotations

import math
import re
import time

import numpy as np
import pytest

from moxco.collector.store import Store
from moxco.decision import Decision
from moxco.dashboards.validate import sql_metric_names

INTERVAL_S = 60  # what Grafana puts for $__interval here ("1m")


def sql_targets(model: dict):
    """``(where, target)`` of every target with a ``rawSql`` in a dashboard model."""
    found = []

    def walk(node, where):
        if isinstance(node, dict):
            if "rawSql" in node:
                found.append((where, node))
            for key, value in node.items():
                walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for k, value in enumerate(node):
                walk(value, f"{where}[{k}]")

    walk(model, "")
    return found


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
    metrics = sorted(set().union(*(sql_metric_names(t["rawSql"]) for m in models.values()
                                   for _w, t in sql_targets(m))))
    assert {"loss", "phase", "goodness", "sharpness"} <= set(metrics)
    now = time.time()
    rng = np.random.default_rng(7)
    with Store(pg_url) as store:
        for run, n in (("alpha", 3000), ("beta's", 40)):
            store.put_run(run)
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
        yield store


def test_every_dashboard_query_runs_and_matches_the_store(store, models):
    start, end = time.time() - 3600, time.time() + 60
    ran = 0
    for uid, model in models.items():
        variable = next(v for v in model["templating"]["list"] if v["name"] == "run")
        runs = ["alpha", "beta's"] if variable.get("multi") else ["alpha"]
        for where, target in sql_targets(model):
            assert target["datasource"]["type"] == "grafana-postgresql-datasource", (uid, where)
            sql = expand(target["rawSql"], runs, start, end)
            with store.engine.connect() as conn:
                result = conn.exec_driver_sql(sql)
                rows = [dict(zip(result.keys(), row)) for row in result]
            _check(store, sql, rows, runs, (uid, where))
            ran += 1
    assert ran >= 6


def _check(store, sql, rows, runs, where):
    if 'AS "last loss"' in sql:  # the runs summary table
        assert [r["run"] for r in rows] == runs, where
        for row in rows:
            loss = store.series(row["run"], "loss")[1]
            sharpness = store.series(row["run"], "sharpness")[1]
            assert row["last loss"] == store.latest(row["run"])["loss"][1]
            assert row["min loss"] == np.nanmin(loss) and row["max sharpness"] == np.nanmax(sharpness), where
            assert row["phase"] == store.latest(row["run"])["phase"][1] and row["decisions"] == 1
    elif "floor(" in sql:  # history of one metric: per minute, min and max with NaN skipped
        metric = sql_metric_names(sql).pop()
        values = store.series("alpha", metric)[1]
        assert len(rows) >= 2, where
        assert min(r["min"] for r in rows) == np.nanmin(values), where
        assert max(r["max"] for r in rows) == np.nanmax(values), where
        assert not any(math.isnan(r["min"]) or math.isnan(r["max"]) for r in rows), where
    else:  # decisions, as annotations or as a table
        assert len(rows) == sum(len(store.decisions(run)) for run in runs) == len(runs), where
        assert all("phase" in (r.get("action") or r.get("text")) for r in rows), where
