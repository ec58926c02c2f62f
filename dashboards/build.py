"""The moxco Grafana dashboards, written as code with the Grafana Foundation SDK's typed builders.

Two dashboards:

* ``moxco-live-run`` (**moxco · live run**): one run (variable ``run``: every run in the store,
  finished ones too), the MoXCo story top to bottom: where the run is now, then each panel of the
  metric catalogue twice, side by side: live from Prometheus against wall time (left), and by step
  from the store at full resolution, long series downsampled by the store's block summaries
  (right): loss and gradient norm, sharpness against ``λ_target`` (the edge-of-stability bound),
  goodness against the threshold C of the run's stored policy (variable ``C``) and its three
  terms, the phase, the optimizer's state, the audit metrics; then the series the run logs itself
  (``agent.log``), by step from the store, one line each; then the run's decisions.
* ``moxco-compare-runs`` (**moxco · compare runs**): several runs side by side (multi-select
  ``run``), with a summary table from the store (each run's threshold C included).

Live panels query Prometheus (the collector's ``/metrics``: ``moxco_<metric>{run}`` gauges,
docs/api.md); since several collector workers expose the same gauges, every query aggregates
``max by (run)`` so a run is one line whatever the number of workers. The run list, the threshold,
the by-step panels, the decision table and the decision annotations query the PostgreSQL store
(``dashboards/store_sql.py``) through Grafana's PostgreSQL datasource;
tests/dashboards/test_sql_on_store.py runs every such query on a real one.

``python -m moxco.dashboards.build`` (or ``moxco dashboards build``) writes the JSON to
``dashboards/json/`` and the Kubernetes ConfigMap that carries it to
``deploy/k8s/grafana-dashboards.yaml`` (and the alert rules' to ``deploy/k8s/prometheus-rules.yaml``);
``--check`` exits 1 when the committed files are stale.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus, stat, table, timeseries, trend
from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm

from moxco import catalogue
from moxco.dashboards.sdk import AnnotationBuilder, SQLQueryBuilder
from moxco.dashboards.store_sql import (DECISIONS_ANNOTATION_SQL, DECISIONS_TABLE_SQL, FULL_RESOLUTION, RUNS_SQL,
                                        RUNS_SUMMARY_SQL, THRESHOLD_SQL, by_step_sql, user_series_sql)

# --- datasources: fixed uids, so provisioning, push and the dashboards agree --------------------

PROMETHEUS_UID = "moxco-prometheus"
PROMETHEUS_TYPE = "prometheus"
POSTGRES_UID = "moxco-postgres"
POSTGRES_TYPE = "grafana-postgresql-datasource"  # Grafana ≥ 10.3's id of the core PostgreSQL plugin

PROMETHEUS = dm.DataSourceRef(type_val=PROMETHEUS_TYPE, uid=PROMETHEUS_UID)
POSTGRES = dm.DataSourceRef(type_val=POSTGRES_TYPE, uid=POSTGRES_UID)

LIVE_UID = "moxco-live-run"
COMPARE_UID = "moxco-compare-runs"
TAGS = ["moxco"]

REPO_ROOT = Path(__file__).resolve().parent.parent
JSON_DIR = Path(__file__).resolve().parent / "json"
K8S_CONFIGMAP = REPO_ROOT / "deploy" / "k8s" / "grafana-dashboards.yaml"
ALERT_RULES = REPO_ROOT / "deploy" / "prometheus" / "rules" / "moxco-alerts.yml"
K8S_RULES_CONFIGMAP = REPO_ROOT / "deploy" / "k8s" / "prometheus-rules.yaml"

# --- small builders ------------------------------------------------------------------------------


class _Ids:
    """Hands out panel ids 1, 2, … within one dashboard (Grafana wants them unique)."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> int:
        self.n += 1
        return self.n


def prom(expr: str, legend: str, ref: str) -> prometheus.Dataquery:
    """A range query on the moxco Prometheus datasource."""
    return prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref).range().datasource(PROMETHEUS)


def prom_instant(expr: str, ref: str = "A") -> prometheus.Dataquery:
    """An instant query (stat panels): the latest value only."""
    return prometheus.Dataquery().expr(expr).legend_format("__auto").ref_id(ref).instant().datasource(PROMETHEUS)


def sql(query: str, ref: str = "A", fmt: str = "time_series") -> SQLQueryBuilder:
    """A raw-SQL query on the moxco PostgreSQL datasource (the collector's store)."""
    return SQLQueryBuilder().ref_id(ref).raw_sql(" ".join(query.split())).format(fmt).datasource(POSTGRES)


def _legend(mode: cm.LegendDisplayMode = cm.LegendDisplayMode.LIST, calcs: Sequence[str] = ()) -> cb.VizLegendOptions:
    return (cb.VizLegendOptions().display_mode(mode).placement(cm.LegendPlacement.BOTTOM).show_legend(True)
            .calcs(list(calcs)))


def _tooltip() -> cb.VizTooltipOptions:
    return cb.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI).sort(cm.SortOrder.NONE)


def _thresholds(*steps: tuple) -> db.ThresholdsConfig:
    """Absolute thresholds from ``(value, color)`` pairs; the first value is None (the base)."""
    return db.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps(
        [dm.Threshold(value=v, color=c) for v, c in steps])


def _dashed(color: str = "", dash: Sequence[int] = (10, 10)) -> List[dm.DynamicConfigValue]:
    style = [dm.DynamicConfigValue(id_val="custom.lineStyle", value={"fill": "dash", "dash": list(dash)})]
    if color:
        style.append(dm.DynamicConfigValue(id_val="color", value={"mode": "fixed", "fixedColor": color}))
    return style


def series_panel(ids: _Ids, title: str, description: str, targets: Iterable, *, unit: str = "short",
                 log: bool = False, span: int = 12, height: int = 8, step_line: bool = False,
                 legend: Optional[cb.VizLegendOptions] = None, datasource: dm.DataSourceRef = PROMETHEUS,
                 ) -> timeseries.Panel:
    """A time-series panel; ``log`` uses a symmetric log axis (the values can be ≤ 0 or span decades)."""
    panel = (timeseries.Panel().id(ids()).title(title).description(description).datasource(datasource)
             .targets(list(targets)).unit(unit).span(span).height(height)
             .legend(legend or _legend()).tooltip(_tooltip())
             .line_width(1).fill_opacity(0).show_points(cm.VisibilityMode.NEVER).span_nulls(False)
             .line_interpolation(cm.LineInterpolation.STEP_AFTER if step_line else cm.LineInterpolation.LINEAR))
    if log:
        panel = panel.scale_distribution(cb.ScaleDistributionConfig().type(cm.ScaleDistribution.SYMLOG).log(10))
    return panel


def stat_panel(ids: _Ids, title: str, description: str, expr: str, *, unit: str = "short",
               thresholds: Optional[db.ThresholdsConfig] = None, mappings: Optional[list] = None,
               decimals: Optional[float] = None, span: int = 4) -> stat.Panel:
    """A single-number panel on the latest value of ``expr``."""
    panel = (stat.Panel().id(ids()).title(title).description(description).datasource(PROMETHEUS)
             .with_target(prom_instant(expr)).unit(unit).span(span).height(4)
             .graph_mode(cm.BigValueGraphMode.NONE).color_mode(cm.BigValueColorMode.BACKGROUND)
             .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
             .thresholds(thresholds or _thresholds((None, "blue"))).no_value("–"))
    if mappings:
        panel = panel.mappings(mappings)
    if decimals is not None:
        panel = panel.decimals(decimals)
    return panel


def _style(out, panel: "catalogue.Panel", threshold_label: Optional[str]):
    """A catalogue panel's look on a time-series or trend builder: range, decimals, the dashes of
    its metrics, the threshold C's line, the catalogue's reference lines."""
    if panel.value_range is not None:
        out = out.min(panel.value_range[0]).max(panel.value_range[1])
    if panel.phase:
        out = out.decimals(0)
    for m in catalogue.panel_metrics(panel.id):
        if m.dash:
            out = out.override_by_name(m.label or m.name, _dashed(m.color, m.dash))
    if panel.threshold and threshold_label:
        out = out.override_by_name(threshold_label, _dashed("green"))
    if panel.refs:
        steps = [(None, "red")] + [(value, "green" if value > 0 else "orange") for value, _label, _color in
                                   sorted(panel.refs)]
        out = (out.thresholds(_thresholds(*steps))
               .thresholds_style(cb.GraphThresholdsStyleConfig().mode(cm.GraphTresholdsStyleMode.DASHED)))
    return out


def catalogue_panel(ids: _Ids, panel: "catalogue.Panel", query: Callable[[str], str], span: int = 12) -> timeseries.Panel:
    """A live time-series panel drawn from a ``moxco.catalogue`` panel: its metrics (``query(name)``,
    with their labels and dashes), its scale, range, the threshold C and its reference lines."""
    metrics = catalogue.panel_metrics(panel.id)
    refs = [chr(ord("A") + i) for i in range(len(metrics) + 1)]
    targets = [prom(query(m.name), m.label or m.name, ref) for m, ref in zip(metrics, refs)]
    if panel.threshold:
        targets.append(prom("vector($C)", "C", refs[len(metrics)]))
    out = series_panel(ids, panel.title, panel.help, targets, unit=panel.grafana_unit, log=panel.log,
                       span=span, step_line=panel.stepped)
    return _style(out, panel, "C")


BY_STEP_NOTE = (f" By step, from the store: every run, finished ones too; a series of up to {FULL_RESOLUTION:,} "
                "points at full resolution, a longer one as each 1,024-step block's first, lowest, highest and "
                "last point (every spike kept); a NaN is a gap.")


def by_step_panel(ids: _Ids, panel: "catalogue.Panel", span: int = 12) -> trend.Panel:
    """The same catalogue panel by step from the store (Grafana's trend panel: a numeric x axis),
    the threshold C read from the run's stored policy."""
    metrics = catalogue.panel_metrics(panel.id)
    query = by_step_sql([(m.name, m.label or m.name) for m in metrics], threshold=panel.threshold)
    out = (trend.Panel().id(ids()).title(f"{panel.title} · by step").description(panel.help + BY_STEP_NOTE)
           .datasource(POSTGRES).with_target(sql(query, fmt="table")).x_field("step").unit(panel.grafana_unit)
           .span(span).height(8).legend(_legend()).tooltip(_tooltip()).line_width(1).fill_opacity(0)
           .show_points(cm.VisibilityMode.AUTO).span_nulls(False)
           .line_interpolation(cm.LineInterpolation.STEP_AFTER if panel.stepped else cm.LineInterpolation.LINEAR))
    if panel.log:
        out = out.scale_distribution(cb.ScaleDistributionConfig().type(cm.ScaleDistribution.SYMLOG).log(10))
    return _style(out, panel, "C" if panel.threshold else None)


USER_SERIES_NOTE = ("Every series the run logs with agent.log({...}) (every stored series that is not one of "
                    "moxco's metrics), one line per name, by step from the store. A series logged every few steps "
                    "is drawn through the steps it skips.")


def user_series_panel(ids: _Ids, span: int = 24) -> trend.Panel:
    """The run's own series (``agent.log``) by step from the store, one line each: the query reads
    every series the catalogue does not name, long (``step, metric, Value``); Grafana splits it by
    ``metric`` (frames named after it) and joins the frames on ``step`` again (the trend panel
    draws one frame), each ``Value`` named after its frame."""
    query = user_series_sql(catalogue.ALL)
    return (trend.Panel().id(ids()).title("Your metrics").description(USER_SERIES_NOTE + BY_STEP_NOTE)
            .datasource(POSTGRES).with_target(sql(query, fmt="table"))
            .with_transformation(dm.DataTransformerConfig(id_val="partitionByValues", options={
                "fields": ["metric"], "keepFields": False, "naming": {"asLabels": False}}))
            .with_transformation(dm.DataTransformerConfig(id_val="joinByField", options={
                "byField": "step", "mode": "outer"}))
            .x_field("step").span(span).height(8).legend(_legend()).tooltip(_tooltip()).line_width(1)
            .fill_opacity(0).show_points(cm.VisibilityMode.AUTO).span_nulls(False)
            .line_interpolation(cm.LineInterpolation.LINEAR))


# --- PromQL --------------------------------------------------------------------------------------


def gauge(metric: str, selector: str) -> str:
    """``max by (run) (moxco_<metric>{selector})``: one series per run however many workers expose
    it (``max`` keeps a NaN only when every worker reports NaN, i.e. when the run's value is NaN)."""
    return f"max by (run) (moxco_{metric}{{{selector}}})"


# --- shared pieces -------------------------------------------------------------------------------

PHASE_MAPPINGS = [dm.ValueMap(options={
    "1": dm.ValueMappingResult(text="1 · explore", color="blue", index=0),
    "2": dm.ValueMappingResult(text="2 · commit", color="green", index=1),
})]


def run_variable(multi: bool) -> db.QueryVariable:
    """``run``: every run of the store, newest first (finished runs stay selectable)."""
    variable = (db.QueryVariable("run").label("run").datasource(POSTGRES).query(" ".join(RUNS_SQL.split()))
                .refresh(dm.VariableRefresh.ON_DASHBOARD_LOAD)
                .description("The store's runs, newest first, finished ones too (the moxco PostgreSQL datasource)."))
    if multi:
        variable = variable.multi(True).include_all(False)
    return variable


def threshold_variable() -> db.QueryVariable:
    """``C`` (hidden): the goodness threshold of the selected run's stored decision policy; NaN when
    the run has none (``vector(NaN)`` draws nothing)."""
    return (db.QueryVariable("C").label("goodness threshold C").datasource(POSTGRES)
            .query(" ".join(THRESHOLD_SQL.split())).refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .hide(dm.VariableHide.HIDE_VARIABLE)
            .description("The run's stored decision policy's goodness threshold C (PolicyConfig.threshold); "
                         "NaN when the run has no policy."))


def decision_annotations(selector: str) -> List[AnnotationBuilder]:
    """Decision markers (from the store, with their goodness and action) and phase changes (from
    Prometheus, so they show without PostgreSQL too). A Prometheus-only decision marker is there,
    off by default, for setups without the PostgreSQL datasource."""
    return [
        AnnotationBuilder("Decisions").datasource(POSTGRES).icon_color("orange")
        .sql_target(sql(DECISIONS_ANNOTATION_SQL, ref="Decisions", fmt="table")),
        AnnotationBuilder("Phase changes").datasource(PROMETHEUS).icon_color("purple")
        .expr(f"max by (run) (changes(moxco_phase{{{selector}}}[2m])) > 0")
        .extra(titleFormat="phase changed", textFormat="run {{run}}", tagKeys="run", step="60s"),
        AnnotationBuilder("Decisions (Prometheus)").datasource(PROMETHEUS).icon_color("yellow").enable(False)
        .expr(f"max by (run) (changes(moxco_decisions_total{{{selector}}}[2m])) > 0")
        .extra(titleFormat="decision", textFormat="run {{run}}", tagKeys="run", step="60s"),
    ]


def _dashboard(uid: str, title: str, description: str) -> db.Dashboard:
    return (db.Dashboard(title).uid(uid).description(description).tags(TAGS).editable()
            .refresh("10s").time("now-1h", "now").timezone("browser")
            .tooltip(dm.DashboardCursorSync.CROSSHAIR)
            .timepicker(db.TimePicker().refresh_intervals(["5s", "10s", "30s", "1m", "5m", "15m"])))


# --- the live-run dashboard ----------------------------------------------------------------------


def live_run() -> db.Dashboard:
    """The one-run dashboard (uid ``moxco-live-run``)."""
    ids = _Ids()
    sel = 'run="$run"'
    g = lambda metric: gauge(metric, sel)  # noqa: E731

    d = _dashboard(LIVE_UID, "moxco · live run",
                   "One training run as the moxco agent sees it: loss, gradient norm, sharpness against "
                   "the EOS bound, the MoXCo goodness score against C with its three terms, phase and "
                   "decisions, and the convexity/smoothness audit metrics.")
    d = d.with_variable(run_variable(multi=False)).with_variable(threshold_variable())
    for annotation in decision_annotations(sel):
        d = d.annotation(annotation)

    # Where the run is now.
    d = d.with_row(db.Row("Now").id(ids()))
    d = d.with_panel(stat_panel(ids, "Step", "Last step the collector received (moxco_run_step).",
                                f"max(moxco_run_step{{{sel}}})", decimals=0))
    d = d.with_panel(stat_panel(ids, "Phase", "MoXCo phase: 1 explores, 2 commits (after a decision).",
                                f"max(moxco_phase{{{sel}}})", mappings=PHASE_MAPPINGS, decimals=0))
    d = d.with_panel(stat_panel(
        ids, "Goodness", "Latest MoXCo goodness score (eq. 6); the goodness panels below draw it against the "
        "threshold C of the run's stored policy.", f"max(moxco_goodness{{{sel}}})", unit="none", decimals=3, span=2))
    d = d.with_panel(stat_panel(
        ids, "Threshold C", "The goodness threshold of the run's stored decision policy (empty: the run has no "
        "policy).", "vector($C)", unit="none", decimals=3, span=2))
    d = d.with_panel(stat_panel(
        ids, "Sharpness / λ_target", "λ̂ / λ_target: above 100 % the run is sharper than the edge-of-stability "
        "target (k·λ_EOS, MoXCo Theorem 2).",
        f"max(moxco_sharpness{{{sel}}}) / max(moxco_sharpness_target{{{sel}}})", unit="percentunit",
        thresholds=_thresholds((None, "green"), (0.9, "orange"), (1.0, "red"))))
    d = d.with_panel(stat_panel(ids, "Decisions", "Phase-switch decisions taken for the run so far.",
                                f"max(moxco_decisions_total{{{sel}}})", decimals=0))
    d = d.with_panel(stat_panel(
        ids, "Since last ingest", "Seconds since the agent's last batch reached the collector.",
        f"time() - max(moxco_run_last_ingest_timestamp_seconds{{{sel}}})", unit="s", decimals=0,
        thresholds=_thresholds((None, "green"), (120, "orange"), (600, "red"))))

    # Training, MoXCo and the audit: one row per section of the metric catalogue; each catalogue
    # panel live from Prometheus (left) and by step from the store (right). The run page draws the
    # same panels.
    for section, title in catalogue.SECTIONS:
        d = d.with_row(db.Row(title).id(ids()))
        for panel in catalogue.PANELS:
            if panel.section == section:
                d = d.with_panel(catalogue_panel(ids, panel, g)).with_panel(by_step_panel(ids, panel))

    # The run's own series (agent.log), by step from the store.
    d = d.with_row(db.Row("Your metrics").id(ids()))
    d = d.with_panel(user_series_panel(ids))

    d = d.with_row(db.Row("Decisions").id(ids()))
    d = d.with_panel(
        table.Panel().id(ids()).title("Decisions").description(
            "The run's phase-switch decisions: the goodness and its three terms when it fired, the action, "
            "and the step the agent applied it at.")
        .datasource(POSTGRES).with_target(sql(DECISIONS_TABLE_SQL, fmt="table")).span(24).height(8))
    return d


# --- the compare-runs dashboard ------------------------------------------------------------------


def compare_runs() -> db.Dashboard:
    """Several runs side by side (uid ``moxco-compare-runs``)."""
    ids = _Ids()
    sel = 'run=~"$run"'
    legend = _legend(cm.LegendDisplayMode.TABLE, ["lastNotNull", "min", "max"])

    def panel(title: str, description: str, metric: str, **kw) -> timeseries.Panel:
        return series_panel(ids, title, description, [prom(gauge(metric, sel), "{{run}}", "A")],
                            legend=legend, **kw)

    d = _dashboard(COMPARE_UID, "moxco · compare runs",
                   "Several moxco runs side by side: the same MoXCo and audit panels, one line per run.")
    d = d.with_variable(run_variable(multi=True))
    for annotation in decision_annotations(sel):
        d = d.annotation(annotation)

    d = d.with_row(db.Row("Runs").id(ids()))
    d = d.with_panel(
        table.Panel().id(ids()).title("Runs (store)").description(
            "One row per selected run from the store: status, last step, phase, loss, goodness and the threshold "
            "C of its stored policy, the largest sharpness seen, the convexity ratio and the number of decisions.")
        .datasource(POSTGRES).with_target(sql(RUNS_SUMMARY_SQL, fmt="table")).span(24).height(6))

    d = d.with_row(db.Row("Training").id(ids()))
    d = d.with_panel(panel("Loss", "Minibatch loss per run.", "loss"))
    d = d.with_panel(panel("Squared gradient norm", "‖g_t‖² per run.", "grad_norm_sq", log=True))

    d = d.with_row(db.Row("MoXCo").id(ids()))
    d = d.with_panel(series_panel(
        ids, "Sharpness / λ_target", "λ̂ / λ_target per run: above 1 (dashed) a run is past its edge-of-stability "
        "target.", [prom(f"{gauge('sharpness', sel)} / {gauge('sharpness_target', sel)}", "{{run}}", "A"),
                    prom("vector(1)", "EOS", "B")], legend=legend, unit="none")
        .override_by_name("EOS", _dashed("red")))
    d = d.with_panel(series_panel(
        ids, "Goodness", "Goodness per run; each run's threshold C is in the table above (its stored policy).",
        [prom(gauge("goodness", sel), "{{run}}", "A")], legend=legend, unit="none").min(0).max(1))
    d = d.with_panel(panel("Phase", "1 explore, 2 commit.", "phase", unit="none", step_line=True, span=8)
                     .min(1).max(2).decimals(0))
    d = d.with_panel(panel("Distance ‖x − x₀‖", "How far each run has travelled from its start.", "distance",
                           log=True, span=8))
    d = d.with_panel(panel("Convexity ratio", "> 1 convex-like, (0, 1] convex analysis applies, ≤ 0 strongly "
                           "non-convex.", "convexity_ratio", unit="none", span=8))

    d = d.with_row(db.Row("Audit").id(ids()))
    d = d.with_panel(panel("Convexity gap (EMA)", "exp_gap per run: ≤ 0 on a mostly convex path.", "exp_gap",
                           log=True, span=8))
    d = d.with_panel(panel("Smoothness (EMA)", "exp_smooth per run: the local smoothness level.", "exp_smooth",
                           log=True, span=8))
    d = d.with_panel(panel("Update correlation", "update_corr per run: < 0 on average when the descent lemma "
                           "holds.", "update_corr", log=True, span=8))
    return d


# --- output --------------------------------------------------------------------------------------

DASHBOARDS: Dict[str, Callable[[], db.Dashboard]] = {
    f"{LIVE_UID}.json": live_run,
    f"{COMPARE_UID}.json": compare_runs,
}


def to_dict(dashboard: db.Dashboard) -> dict:
    """The dashboard model as plain JSON data (through the SDK's encoder)."""
    return json.loads(json.dumps(dashboard.build(), cls=JSONEncoder))


def render(dashboard: db.Dashboard) -> str:
    """The committed text of a dashboard: 2-space indented JSON, non-ASCII kept, final newline."""
    return json.dumps(to_dict(dashboard), indent=2, ensure_ascii=False) + "\n"


def configmap(name: str, files: Dict[str, str], source: str) -> str:
    """A Kubernetes ConfigMap carrying ``files`` (deploy/k8s), as YAML with each file in a literal
    block, so the cluster gets byte-for-byte the committed files."""
    lines = [
        f"# Generated by `python -m moxco.dashboards.build`: do not edit; the source is {source}.",
        "apiVersion: v1",
        "kind: ConfigMap",
        "metadata:",
        f"  name: {name}",
        "  namespace: moxco",
        "  labels:",
        "    app.kubernetes.io/part-of: moxco",
        "data:",
    ]
    for key, text in sorted(files.items()):
        lines.append(f"  {key}: |")
        lines.extend(("    " + line) if line else "" for line in text.rstrip("\n").split("\n"))
    return "\n".join(lines) + "\n"


def generate() -> Dict[Path, str]:
    """Every generated file, path → text."""
    rendered = {name: render(factory()) for name, factory in DASHBOARDS.items()}
    files = {JSON_DIR / name: text for name, text in rendered.items()}
    files[K8S_CONFIGMAP] = configmap("grafana-dashboards", rendered, "dashboards/build.py")
    if ALERT_RULES.exists():  # a checkout; an installed package has no deploy/
        files[K8S_RULES_CONFIGMAP] = configmap("prometheus-rules", {ALERT_RULES.name: ALERT_RULES.read_text("utf-8")},
                                               "deploy/prometheus/rules/moxco-alerts.yml")
    return files


def stale_files() -> List[Path]:
    """Generated files whose committed text differs from what the code generates now."""
    return [path for path, text in generate().items()
            if not path.exists() or path.read_text(encoding="utf-8") != text]


def write_all() -> List[Path]:
    """Regenerate every file; returns the ones that changed."""
    changed = stale_files()
    for path, text in generate().items():
        if path in changed:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    return changed


def run(check: bool = False, out=None) -> int:
    """``build`` (and ``build --check``): exit status 0, or 1 when ``check`` finds stale files."""
    out = out or sys.stdout
    if check:
        stale = stale_files()
        for path in stale:
            print(f"stale: {path.relative_to(REPO_ROOT)} (run `moxco dashboards build`)", file=out)
        if not stale:
            print("dashboards are up to date", file=out)
        return 1 if stale else 0
    changed = write_all()
    for path in generate():
        state = "written" if path in changed else "unchanged"
        print(f"{state}: {path.relative_to(REPO_ROOT)}", file=out)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moxco.dashboards.build", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed JSON is stale; write nothing")
    args = parser.parse_args(argv)
    return run(check=args.check)


if __name__ == "__main__":
    sys.exit(main())
