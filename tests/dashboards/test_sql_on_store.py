"""Every SQL query of the generated dashboards (panels, annotations, variables) runs on a real
PostgreSQL store written by the collector's storage layer, with Grafana's macros expanded as its
PostgreSQL data source documents them, and returns what the store holds. This is what keeps the
panels working when the schema changes (points became chunks behind the ``metric_points`` view in
revision 0005). A third run is a training job's, with its own series logged through ``agent.log``:
the "Your metrics" panel returns exactly those."""

from __future__ import annotations

import math
import re
import time

import numpy as np
import pytest
import torch
from torch import nn

import moxco.agent
from moxco import catalogue
from moxco.collector.store import Store
from moxco.decision import Decision
from moxco.policy import PolicyConfig
from moxco.dashboards.store_sql import FULL_RESOLUTION
from moxco.dashboards.validate import iter_queries, sql_metric_names

INTERVAL_S = 60  # what Grafana puts for $__interval here ("1m")
OWN = "gamma"  # a training job's run, with its own series (agent.log)
OWN_SERIES = {"accuracy", "val_loss", "eval/tokens"}
# each run's threshold C: alpha's stored policy, none for beta's, the agent's default policy (its config)
THRESHOLD = {"alpha": 0.75, "beta's": None, OWN: PolicyConfig().threshold}


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
        _train_and_log(pg_url)
        store.add_decision(OWN, Decision(3, {"phase": 2}, source="operator"))
        yield store


def _train_and_log(url: str) -> None:
    """A short training job on the store (the embedded agent) that logs its own series: val_loss
    every 5th step, accuracy every step with a NaN, and a series longer than ``FULL_RESOLUTION``
    (read from its block summaries), at explicit steps."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    criterion = nn.MSELoss()
    agent = moxco.agent.attach(model, opt, url=url, run=OWN, criterion=criterion, reeval_every=0, probe_every=0)
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    for step in range(30):
        criterion(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        if step % 5 == 0:
            agent.log({"val_loss": 1.0 / (step + 1)})
        agent.log({"accuracy": math.nan if step == 7 else 0.5 + step / 100})
    for k in range(0, 3000, 500):
        agent.log({"eval/tokens": float((k + 1) % 7)}, step=k)  # (a few at a time, as a job would)
        for s in range(k + 1, k + 500):
            agent.log({"eval/tokens": math.sin(s / 40.0) + (25.0 if s == 2222 else 0.0)}, step=s)
    agent.close()
    assert not agent.errors, agent.errors


def test_every_dashboard_query_runs_and_matches_the_store(store, models):
    start, end = time.time() - 3600, time.time() + 60
    ran = set()
    for uid, model in models.items():
        variable = next(v for v in model["templating"]["list"] if v["name"] == "run")
        selections = [["alpha", "beta's"]] if variable.get("multi") else [["alpha"], ["beta's"], [OWN]]
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
    # every by-step panel, the user's own series, the two variables, the two tables, the decision annotations
    assert len(ran) == len(catalogue.PANELS) + 6, sorted(ran)


PIVOT = re.compile(r"FILTER \(WHERE x\.metric = '([^']+)'\) AS \"([^\"]+)\"")


def _finite(steps, values):
    return [(int(s), float(v)) for s, v in zip(steps, values) if math.isfinite(v)]


def _summarised(store, run, metric, got, steps_out) -> bool:
    """``got`` (step, value) is each 1,024-step block's first, lowest, highest and last finite
    point, extremes included, and the series' NaN steps are among ``steps_out`` (a gap there)."""
    steps, values = store.series(run, metric)
    blocks = store.block_summaries(run, metric)
    want = set()
    for k in range(blocks["block"].size):
        for f in ("first", "min", "max", "last"):
            if blocks[f"{f}_step"][k] >= 0 and math.isfinite(blocks[f"{f}_value"][k]):
                want.add((int(blocks[f"{f}_step"][k]), float(blocks[f"{f}_value"][k])))
    finite = [(s, v) for s, v in got if v is not None]
    assert finite == sorted(want)
    assert min(v for _s, v in finite) == np.nanmin(values) and max(v for _s, v in finite) == np.nanmax(values)
    assert {int(s) for s, v in zip(steps, values) if math.isnan(v)} <= steps_out
    return True


def _check(store, sql, rows, runs, where):
    if sql.startswith("SELECT name FROM runs"):  # the run variable: every run, newest first
        assert [r["name"] for r in rows] == [OWN, "beta's", "alpha"], where
    elif "'NaN')" in sql and "threshold" in sql:  # the C variable: the run's stored threshold
        (run,) = runs
        assert [list(r.values()) for r in rows] == [[str(THRESHOLD[run] or "NaN")]], where
    elif 'AS "metric"' in sql:  # the run's own series by step, long: step, metric, Value
        (run,) = runs
        own = set(store.metrics(run)) - set(catalogue.ALL)
        assert own == (OWN_SERIES if run == OWN else set()), where
        assert {r["metric"] for r in rows} == own, where  # every own series, no catalogue metric
        assert [(r["metric"], r["step"]) for r in rows] == sorted((r["metric"], r["step"]) for r in rows), where
        for metric in own:
            got = [(r["step"], r["Value"]) for r in rows if r["metric"] == metric]
            steps, values = store.series(run, metric)
            if steps.size <= FULL_RESOLUTION:
                assert [(s, v) for s, v in got if v is not None] == _finite(steps, values), where
                assert {s for s, v in got if v is None} == {int(s) for s, v in zip(steps, values) if math.isnan(v)}
            else:
                assert got and _summarised(store, run, metric, got, {s for s, _v in got}), where
        if run == OWN:
            assert [r["step"] for r in rows if r["metric"] == "val_loss"] == list(range(1, 31, 5))
            assert sum(r["Value"] is None for r in rows if r["metric"] == "accuracy") == 1  # the NaN, a gap
            assert max((r["Value"], r["step"]) for r in rows if r["metric"] == "eval/tokens")[1] == 2222  # the spike
            assert len([r for r in rows if r["metric"] == "eval/tokens"]) < 0.01 * 3000 * 5
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
                assert _summarised(store, run, metric, got, set(steps_out)), where
                nan_steps = {int(s) for s, v in zip(steps, values) if math.isnan(v)}
                assert nan_steps, where  # (the fixture stores one)
                assert len(rows) <= 5 * store.block_summaries(run, metric)["block"].size * len(PIVOT.findall(sql)), where
        if '"C"' in sql:
            assert {r["C"] for r in rows} == ({THRESHOLD[run]} if rows else set()), where
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
