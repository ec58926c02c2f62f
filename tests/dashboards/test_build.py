"""The dashboards as code: committed JSON is fresh, the dashboards are structurally sound, tell the
MoXCo story, and query only metric names the collector exposes (docs/api.md)."""

from __future__ import annotations

import copy
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from moxco import catalogue
from moxco.cli import main as moxco_main
from moxco.dashboards import build
from moxco.dashboards.validate import (check_dashboard, iter_panels, iter_queries, promql_metric_names,
                                       referenced_variables, sql_metric_names)
from tests.dashboards.conftest import REPO, documented_exposition

DATASOURCES = {build.PROMETHEUS_UID, build.POSTGRES_UID}


# --- generated == committed ------------------------------------------------------------------------


def test_committed_files_equal_a_fresh_build():
    stale = build.stale_files()
    assert stale == [], f"regenerate with `moxco dashboards build`: stale {stale}"
    for path, text in build.generate().items():
        assert path.read_text("utf-8") == text


def test_committed_json_is_what_the_builders_return(models):
    for name, factory in build.DASHBOARDS.items():
        committed = json.loads((REPO / "dashboards" / "json" / name).read_text("utf-8"))
        assert committed == build.to_dict(factory())
        assert committed["uid"] == name.removesuffix(".json")


def _redirect_outputs(monkeypatch, tmp_path):
    monkeypatch.setattr(build, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(build, "JSON_DIR", tmp_path / "dashboards" / "json")
    monkeypatch.setattr(build, "K8S_CONFIGMAP", tmp_path / "deploy" / "k8s" / "grafana-dashboards.yaml")
    monkeypatch.setattr(build, "K8S_RULES_CONFIGMAP", tmp_path / "deploy" / "k8s" / "prometheus-rules.yaml")


def test_check_reports_stale_and_build_repairs(monkeypatch, tmp_path):
    _redirect_outputs(monkeypatch, tmp_path)
    out = io.StringIO()
    assert build.run(check=True, out=out) == 1  # nothing there yet
    assert "stale: dashboards/json/moxco-live-run.json" in out.getvalue()
    assert not (tmp_path / "dashboards").exists()  # --check writes nothing

    build.run(out=io.StringIO())
    assert build.run(check=True, out=io.StringIO()) == 0

    live = tmp_path / "dashboards" / "json" / "moxco-live-run.json"
    model = json.loads(live.read_text("utf-8"))
    model["panels"][1]["title"] = "edited by hand"
    live.write_text(json.dumps(model, indent=2, ensure_ascii=False) + "\n", "utf-8")
    out = io.StringIO()
    assert build.run(check=True, out=out) == 1
    assert out.getvalue().strip() == "stale: dashboards/json/moxco-live-run.json (run `moxco dashboards build`)"

    out = io.StringIO()
    build.run(out=out)
    assert "written: dashboards/json/moxco-live-run.json" in out.getvalue()
    assert "unchanged: dashboards/json/moxco-compare-runs.json" in out.getvalue()
    assert build.run(check=True, out=io.StringIO()) == 0


def test_cli_build_check_passes_on_the_committed_tree(capsys):
    assert moxco_main(["dashboards", "build", "--check"]) == 0
    assert "up to date" in capsys.readouterr().out


def test_module_entry_point_checks(tmp_path):
    python = shutil.which("python", path=str(Path(__import__("sys").executable).parent))
    done = subprocess.run([python, "-m", "moxco.dashboards.build", "--check"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


# --- structure -----------------------------------------------------------------------------------


def test_dashboards_are_structurally_sound(models):
    assert set(models) == {build.LIVE_UID, build.COMPARE_UID}
    for uid, model in models.items():
        assert check_dashboard(model, DATASOURCES) == [], uid


def _first_panel(model, kind="timeseries"):
    return next(p for p in iter_panels(model) if p["type"] == kind)


@pytest.mark.parametrize("breakage, expected", [
    (lambda m: _first_panel(m).pop("datasource"), "no datasource"),
    (lambda m: _first_panel(m)["targets"][0].update(expr="  "), "has no expression"),
    (lambda m: _first_panel(m)["targets"].clear(), "no queries"),
    (lambda m: _first_panel(m, "stat").update(id=_first_panel(m)["id"]), "also used by"),
    (lambda m: _first_panel(m, "stat")["gridPos"].update(x=_first_panel(m, "stat")["gridPos"]["x"] + 2), "overlaps"),
    (lambda m: _first_panel(m)["gridPos"].update(x=20, w=8), "outside the 24-column grid"),
    (lambda m: _first_panel(m)["targets"][0].update(expr='moxco_loss{run="$rnu"}'), "undefined variable $rnu"),
    (lambda m: m["templating"]["list"].pop(0), "undefined variable $run"),
    (lambda m: _first_panel(m).update(datasource={"type": "prometheus", "uid": "other"}), "unknown datasource uid"),
    (lambda m: m["annotations"]["list"][0]["target"].pop("rawSql"), "no query"),
    (lambda m: _first_panel(m)["targets"][0].update(refId=""), "refIds must be non-empty"),
])
def test_check_dashboard_finds_each_kind_of_problem(models, breakage, expected):
    model = copy.deepcopy(models[build.LIVE_UID])
    breakage(model)
    problems = check_dashboard(model, DATASOURCES)
    assert any(expected in p for p in problems), problems


def test_variables(models):
    live = {v["name"]: v for v in models[build.LIVE_UID]["templating"]["list"]}
    compare = {v["name"]: v for v in models[build.COMPARE_UID]["templating"]["list"]}
    for variables, multi in ((live, False), (compare, True)):
        run = variables["run"]  # every run of the store, finished ones too (not the running runs' gauge)
        assert run["query"].startswith("SELECT name FROM runs") and "status" not in run["query"]
        assert run["datasource"]["uid"] == build.POSTGRES_UID
        assert run["multi"] is multi
    # C is read from the run's stored policy, not typed in (tests/dashboards/test_sql_on_store.py runs it)
    assert live["C"]["type"] == "query" and live["C"]["datasource"]["uid"] == build.POSTGRES_UID
    assert "policy" in live["C"]["query"] and "${run:sqlstring}" in live["C"]["query"] and live["C"]["hide"] == 2
    assert "C" not in compare  # several runs, several thresholds: a column of the runs table there


def test_variable_references_are_parsed():
    assert referenced_variables('x{run=~"$run"} ${C} [[old]] ${run:sqlstring} $__interval $__timeFilter(t)') \
        == {"run", "C", "old"}


# --- the MoXCo story -----------------------------------------------------------------------------


def _panel_metrics(panel):
    found = set()
    for target in panel.get("targets") or []:
        found |= promql_metric_names(target.get("expr", "")) | {f"moxco_{m}" for m in sql_metric_names(target.get("rawSql", ""))}
    return found


def _panel_with(model, *metrics, kind="timeseries"):
    for panel in iter_panels(model):
        if panel["type"] == kind and set(metrics) <= _panel_metrics(panel):
            return panel
    raise AssertionError(f"no panel shows {metrics} together")


def test_live_dashboard_tells_the_moxco_story(models):
    live = models[build.LIVE_UID]
    _panel_with(live, "moxco_loss")
    _panel_with(live, "moxco_grad_norm_sq")
    sharp = _panel_with(live, "moxco_sharpness", "moxco_sharpness_target")  # λ̂ against λ_target/EOS
    assert any(o["matcher"]["options"] == "λ_target" for o in sharp["fieldConfig"]["overrides"])
    good = _panel_with(live, "moxco_goodness")
    assert any(t["expr"] == "vector($C)" for t in good["targets"])  # against the threshold C
    _panel_with(live, "moxco_goodness_grad_term", "moxco_goodness_sharpness_term", "moxco_goodness_loss_term")
    _panel_with(live, "moxco_phase")
    _panel_with(live, "moxco_inst_gap", "moxco_avg_gap", "moxco_exp_gap")
    _panel_with(live, "moxco_inst_smooth", "moxco_max_smooth", "moxco_exp_smooth")
    _panel_with(live, "moxco_update_corr", "moxco_update_corr_rs", "moxco_loss_diff")
    _panel_with(live, "moxco_convexity_ratio")
    _panel_with(live, "moxco_distance")
    history = [p for p in iter_panels(live) if p.get("datasource", {}).get("uid") == build.POSTGRES_UID]
    assert {"loss", "goodness", "sharpness"} <= {m for p in history for t in p["targets"]
                                                for m in sql_metric_names(t["rawSql"])}


def test_every_catalogue_panel_is_also_drawn_by_step_from_the_store_beside_the_live_one(models):
    live = models[build.LIVE_UID]
    panels = [p for p in iter_panels(live) if p["type"] != "row"]
    for panel in catalogue.PANELS:
        live_panel = next(p for p in panels if p["title"] == panel.title and p["type"] == "timeseries")
        by_step = next(p for p in panels if p["title"] == f"{panel.title} · by step")
        assert by_step["type"] == "trend" and by_step["options"]["xField"] == "step"
        assert by_step["datasource"]["uid"] == build.POSTGRES_UID and by_step["targets"][0]["format"] == "table"
        assert sql_metric_names(by_step["targets"][0]["rawSql"]) == {m.name for m in catalogue.panel_metrics(panel.id)}
        # side by side: the same row, the live panel on the left
        assert by_step["gridPos"]["y"] == live_panel["gridPos"]["y"] and by_step["gridPos"]["x"] > live_panel["gridPos"]["x"]
        if panel.threshold:  # C from the run's stored policy, dashed
            assert '"C"' in by_step["targets"][0]["rawSql"] and "policy" in by_step["targets"][0]["rawSql"]
            assert any(o["matcher"]["options"] == "C" for o in by_step["fieldConfig"]["overrides"])


def test_the_runs_own_series_have_one_by_step_panel_that_leaves_out_the_catalogue(models):
    """"Your metrics": every series of the run the catalogue does not name (agent.log), by step from
    the store, split into one line per metric and joined on the step again (the trend panel draws
    one frame). The names left out are the catalogue's, generated from it."""
    live = models[build.LIVE_UID]
    panels = list(iter_panels(live))
    (mine,) = [p for p in panels if p["title"] == "Your metrics" and p["type"] != "row"]
    row = next(p for p in panels if p["type"] == "row" and p["title"] == "Your metrics")
    assert mine["type"] == "trend" and mine["options"]["xField"] == "step"
    assert mine["datasource"]["uid"] == build.POSTGRES_UID and mine["targets"][0]["format"] == "table"
    assert mine["gridPos"]["y"] > row["gridPos"]["y"]
    sql = mine["targets"][0]["rawSql"]
    assert sql_metric_names(sql) == set()  # reads no metric by name …
    (excluded,) = re.findall(r"metric NOT IN \(([^)]*)\)", sql)
    assert re.findall(r"'([^']*)'", excluded) == list(catalogue.ALL)  # … but every one but the catalogue's
    assert sql.rstrip().endswith('SELECT x.step AS "step", x.metric AS "metric", x.value AS "Value" FROM x '
                                 'ORDER BY x.metric, x.step')
    assert [(t["id"], t["options"]) for t in mine["transformations"]] == [
        ("partitionByValues", {"fields": ["metric"], "keepFields": False, "naming": {"asLabels": False}}),
        ("joinByField", {"byField": "step", "mode": "outer"}),
    ]
    assert mine["fieldConfig"]["defaults"]["custom"]["spanNulls"] is False  # a NaN is a gap
    titles = [p["title"] for p in panels if p["type"] == "row"]  # after the catalogue's rows
    assert titles.index("Your metrics") > max(titles.index(t) for _s, t in catalogue.SECTIONS)


def test_decisions_and_phases_are_annotations(models):
    for model in models.values():
        annotations = {a["name"]: a for a in model["annotations"]["list"]}
        decisions = annotations["Decisions"]
        assert decisions["enable"] and decisions["datasource"]["uid"] == build.POSTGRES_UID
        sql = decisions["target"]["rawSql"]
        assert "FROM decisions d JOIN runs r" in sql and '"time"' in sql and '"text"' in sql
        assert "${run:sqlstring}" in sql  # quoted by Grafana, safe for any run name
        phase = annotations["Phase changes"]
        assert phase["enable"] and "moxco_phase" in phase["expr"]


def test_every_live_query_deduplicates_workers(models):
    """Several collector workers expose the same gauges: each run-level query aggregates by run."""
    for model in models.values():
        for where, lang, text in iter_queries(model):
            if lang != "promql" or where.startswith("variable") or text.startswith("vector("):
                continue
            assert "max" in text, f"{where}: {text}"


# --- metric names ---------------------------------------------------------------------------------


def test_metric_name_extraction():
    assert promql_metric_names('max by (run) (moxco_loss{run="$run"}) / on(run) group_left '
                               'sum(rate(moxco_x_total{a="b"}[5m])) > 0 and vector($C) or up offset 5m') \
        == {"moxco_loss", "moxco_x_total", "up"}
    assert promql_metric_names('max by (run) (abs(moxco_loss)) == Inf') == {"moxco_loss"}
    assert sql_metric_names("WHERE p.metric = 'loss' AND q.metric IN ('goodness', 'phase')") \
        == {"loss", "goodness", "phase"}


def test_promql_uses_only_documented_exposition(models):
    """Every metric a dashboard queries is one docs/api.md says /metrics exposes (the live check
    against a running collector is in test_live_metrics.py)."""
    exposed = documented_exposition()
    for model in models.values():
        for where, lang, text in iter_queries(model):
            if lang == "promql":
                unknown = promql_metric_names(text) - exposed
                assert not unknown, f"{where} queries {unknown}, which the collector does not expose"


def test_sql_reads_only_metric_names_of_the_contract(models):
    for model in models.values():
        for where, lang, text in iter_queries(model):
            if lang == "sql":
                assert sql_metric_names(text) <= set(catalogue.ALL), where


def test_every_promql_query_parses(models, tmp_path):
    """promtool parses each dashboard query (as a recording rule, variables substituted)."""
    rules = []
    for model in models.values():
        for i, (where, lang, text) in enumerate(iter_queries(model)):
            if lang == "promql":
                expr = (text.replace("$run", "r1").replace("$C", "0.85").replace("$__rate_interval", "1m")
                        .replace("$__interval", "1m"))
                rules.append({"record": f"dashboard:q{len(rules)}", "expr": expr})
    assert len(rules) > 30
    path = tmp_path / "queries.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboards", "rules": rules}]}), "utf-8")
    done = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules)} rules found" in done.stdout


def test_live_dashboard_draws_every_catalogue_panel(models):
    """The Training, MoXCo and audit rows come from moxco.catalogue: a metric added there is drawn here
    with no other change (the run page draws the same panels from the catalogue's JSON)."""
    live = models[build.LIVE_UID]
    by_title = {p["title"]: p for p in iter_panels(live) if p["type"] == "timeseries"}
    for panel in catalogue.PANELS:
        drawn = by_title.get(panel.title)
        assert drawn is not None, panel.id
        expected = {f"moxco_{m.name}" for m in catalogue.panel_metrics(panel.id)}
        assert _panel_metrics(drawn) == expected, panel.id
        assert drawn["description"] == panel.help
