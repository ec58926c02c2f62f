"""Several audits side by side (``moxco audit --compare``): what differs in their configuration,
their verdicts with the headline number of each section, overlaid series, and each run's readings.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from moxco.collector.audit.analysis import SECTIONS, Plot, RunAudit, json_value
from moxco.collector.audit.plots import RUN_COLORS, figure, positive, running_mean, svg, symlog
from moxco.collector.audit.report import VERDICT_CLASS, esc, figure_html, fmt, page, policy_text

#: configuration rows, in this order, then any other scalar config entry whose value differs
CONFIG_ROWS: Tuple[Tuple[str, str, Callable[[RunAudit], Any]], ...] = (
    ("optimizer", "optimizer", lambda r: r.run.optimizer_name),
    ("lr", "lr", lambda r: r.run.hyperparameters.get("lr")),
    ("alpha", "α", lambda r: r.run.hyperparameters.get("alpha")),
    ("beta", "β", lambda r: r.run.hyperparameters.get("beta")),
    ("momentum", "momentum", lambda r: r.run.hyperparameters.get("momentum")),
    ("betas", "Adam betas", lambda r: r.run.hyperparameters.get("betas")),
    ("weight_decay", "weight decay", lambda r: r.run.hyperparameters.get("weight_decay")),
    ("policy", "decision policy", lambda r: policy_text(r.run.policy_config) if r.run.policy_config else None),
    ("random_scaling", "random scaling", lambda r: r.run.config.get("random_scaling")),
    ("reference", "reference x*", lambda r: r.run.config.get("reference")),
    ("reeval_every", "reeval_every", lambda r: r.run.config.get("reeval_every")),
    ("probe_every", "probe_every", lambda r: r.run.config.get("probe_every")),
)
SKIPPED_CONFIG = {"errors", "hyperparameters", "goodness", "policy", "optimizer", "start_step", "world_size"}


def config_rows(results: Sequence[RunAudit]) -> List[Tuple[str, str, List[Any], bool]]:
    """``(key, label, value per run, differs)`` for each configuration row that any run has a value
    for: the fixed rows first, then the other scalar config entries that differ between runs."""
    rows = []
    for key, label, get in CONFIG_ROWS:
        values = [get(r) for r in results]
        if any(v is not None for v in values):
            rows.append((key, label, values, len({repr(v) for v in values}) > 1))
    fixed = {key for key, _, _ in CONFIG_ROWS}
    extra = sorted({k for r in results for k, v in r.run.config.items()
                    if k not in fixed | SKIPPED_CONFIG and not isinstance(v, (dict, list))})
    for key in extra:
        values = [results[i].run.config.get(key) for i in range(len(results))]
        if any(v is not None for v in values) and len({repr(v) for v in values}) > 1:
            rows.append((key, key, values, True))
    return rows


def _finite(result: RunAudit, metric: str) -> Tuple[np.ndarray, np.ndarray]:
    return result.run.finite(metric)


def _cumsum(metric: str):
    def series(result: RunAudit):
        steps, values = _finite(result, metric)
        return steps, np.cumsum(values)
    return series


def _running_mean(metric: str):
    def series(result: RunAudit):
        steps, values = _finite(result, metric)
        return steps, running_mean(values)[0]
    return series


#: (key, title, series, y label, scale)
COMPARE_PLOTS = (
    ("loss", "training loss", lambda r: _finite(r, "loss"), "loss", "linear"),
    ("avg_gap", "avg_gap (w.r.t. x_{t-1})", lambda r: _finite(r, "avg_gap"), "avg_gap", "symlog"),
    ("convexity_ratio", "convexity_ratio (w.r.t. x*)", lambda r: _finite(r, "convexity_ratio"), "ratio", "symlog"),
    ("exp_smooth", "exp_smooth", lambda r: positive(*r.run.get("exp_smooth")), "exp_smooth", "log"),
    ("sharpness", "sharpness λ_max", lambda r: positive(*r.run.get("sharpness")), "λ_max", "log"),
    ("running_mean_update_corr", "running mean of update_corr", _running_mean("update_corr"),
     "mean update_corr so far", "linear"),
    ("cumsum_update_corr", "Σ update_corr", _cumsum("update_corr"), "Σ update_corr", "symlog"),
    ("cumsum_update_corr_rs", "Σ update_corr_rs", _cumsum("update_corr_rs"), "Σ update_corr_rs", "symlog"),
    ("cumsum_loss_diff", "Σ loss_diff", _cumsum("loss_diff"), "Σ loss_diff", "symlog"),
    ("goodness", "goodness", lambda r: _finite(r, "goodness"), "goodness", "linear"),
)

#: the headline number of each section in the comparison table
HEADLINE = {"path_convexity": "fraction_nonconvex", "global_convexity": "convexity_ratio",
            "smoothness": "median_smooth_over_sharpness", "descent_lemma": "mean_update_corr", "moxco": "max_goodness"}


def overlay(title: str, results: Sequence[RunAudit], series, ylabel: str, scale: str = "linear",
            key: Optional[str] = None) -> str:
    fig, (ax,) = figure()
    drawn = []
    for color, result in zip(RUN_COLORS * 4, results):
        steps, values = series(result)
        if values.size:
            ax.plot(steps, values, lw=1.5, color=color, label=result.run.name)
            drawn.append(values)
    if scale == "symlog":
        symlog(ax, drawn)
    elif scale == "log":
        ax.set_yscale("log")
    if key == "running_mean_update_corr":
        ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel("step"), ax.set_ylabel(ylabel)
    if drawn:
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return svg(fig, key or title)


def compare_json(results: Sequence[RunAudit]) -> Dict[str, Any]:
    return {"runs": [r.run.name for r in results],
            "configuration": [{"key": key, "label": label, "values": json_value(values), "differs": differs}
                              for key, label, values, differs in config_rows(results)],
            "verdicts": {s: {r.run.name: r.section(s).verdict_line for r in results} for s in SECTIONS},
            "headline": {s: {r.run.name: json_value(r.section(s).numbers.get(HEADLINE[s])) for r in results}
                         for s in SECTIONS},
            "audits": {r.run.name: r.to_json() for r in results}}


def compare_html(results: Sequence[RunAudit]) -> str:
    head = "".join(f"<th>{esc(r.run.name)}</th>" for r in results)
    config = "".join(
        f"<tr class='{'differs' if differs else 'same'}' data-config='{esc(key)}'><th>{esc(label)}</th>"
        + "".join(f"<td>{esc(fmt(v))}</td>" for v in values) + "</tr>"
        for key, label, values, differs in config_rows(results))
    loss_row = "<tr><th>loss first → last</th>" + "".join(
        f"<td class='num'>{fmt(r.overview['first_loss'])} → {fmt(r.overview['last_loss'])}</td>" for r in results) + "</tr>"
    rows = []
    for key in SECTIONS:
        cells = []
        for r in results:
            s = r.section(key)
            number = s.numbers.get(HEADLINE[key])
            cells.append(f"<td><span class='verdict {VERDICT_CLASS[s.verdict]}' data-verdict='{esc(r.run.name)}.{key}'>"
                         f"{esc(s.verdict_line)}</span><br><span class='meta'>{HEADLINE[key]} = {esc(fmt(number))}"
                         "</span></td>")
        rows.append(f"<tr><th><a href='#{key}'>{esc(results[0].section(key).title)}</a></th>{''.join(cells)}</tr>")
    body = [f"<h1>moxco audit: {len(results)} runs side by side</h1>",
            "<h2>Configuration</h2><p class='meta'>Highlighted rows differ between the runs.</p>",
            f"<table class='config'><tr><th></th>{head}</tr>{config}</table>",
            "<h2>Verdicts</h2>",
            f"<table class='compare'><tr><th></th>{head}</tr>{loss_row}{''.join(rows)}</table>"]
    for key, title, series, ylabel, scale in COMPARE_PLOTS:
        if not any(series(r)[0].size for r in results):
            continue
        image = overlay(title, results, series, ylabel, scale, key)
        body.append(figure_html(Plot(key, title, "overlay", {}, caption=f"{title}, one line per run."), image))
    for r in results:
        body.append(f"<h2 id='run-{esc(r.run.name)}'>{esc(r.run.name)}</h2>")
        for line in r.summary:
            body.append(f"<p class='notice info'>{esc(line)}</p>")
        for s in r.sections:
            reading = f" {s.reading}" if s.reading else ""
            body.append(f"<p><b>{esc(s.title)}</b>: {esc(s.verdict_line)}.{esc(reading)}</p>")
    return page("moxco audit: comparison", "".join(body))
