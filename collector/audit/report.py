"""Self-contained HTML reports of audits: plots drawn with Matplotlib's Agg backend and embedded as
base64 PNG, styles inline, no script and no external resource, so the file can be mailed, attached
to an issue, or opened offline. ``write_report`` writes the HTML and the JSON summary beside it.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from moxco import __version__
from moxco.collector.audit.analysis import (
    DEGRADED, FAILS, HOLDS, NOT_MEASURED, SECTIONS, Plot, RunAudit, Section, _json_value,
)

COLORS = {"update_corr": "#1f77b4", "update_corr_rs": "#ff7f0e", "loss_diff": "#2ca02c"}
RUN_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
VERDICT_CLASS = {HOLDS: "holds", DEGRADED: "degraded", FAILS: "fails", NOT_MEASURED: "absent"}


def _figure(nrows: int = 1, height: float = 3.2, sharex: bool = True):
    try:
        from matplotlib.figure import Figure
    except ModuleNotFoundError as exc:  # pragma: no cover - depends on the install
        raise ModuleNotFoundError("moxco audit draws its plots with matplotlib: pip install 'moxco[audit]'",
                                  name=exc.name) from None
    fig = Figure(figsize=(7.2, height * nrows), dpi=100, layout="constrained")
    axes = fig.subplots(nrows, 1, sharex=sharex, squeeze=False)[:, 0]
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig, axes


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _symlog(ax, values: Sequence[np.ndarray]) -> None:
    finite = np.concatenate([np.abs(v[np.isfinite(v)]) for v in values if len(v)] or [np.zeros(0)])
    finite = finite[finite > 0]
    if finite.size:
        ax.set_yscale("symlog", linthresh=float(np.quantile(finite, 0.1)))


def _positive(steps: np.ndarray, values: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    keep = np.isfinite(values) & (values > 0)
    return steps[keep], values[keep]


# --- single-run plots (kinds named by analysis.Plot.kind) -----------------------------------------


def draw_loss(d: Dict[str, Any]):
    fig, (ax,) = _figure()
    ax.plot(d["steps"], d["loss"], lw=1.2, color="#333")
    ax.set_xlabel("step"), ax.set_ylabel("loss")
    return fig


def draw_gaps(d: Dict[str, Any]):
    fig, (ax,) = _figure(height=3.6)
    steps, gaps, tol = d["inst_steps"], d["inst"], d["tolerance"]
    over = gaps > tol
    ax.fill_between(steps, -tol, tol, color="#999", alpha=0.3, lw=0, label="float-error tolerance")
    ax.scatter(steps[~over], gaps[~over], s=8, color="#1f77b4", label="inst_gap ≤ tolerance")
    ax.scatter(steps[over], gaps[over], s=10, color="#d62728", label="inst_gap > tolerance")
    ax.plot(d["avg_steps"], d["avg"], color="#2ca02c", lw=1.8, label="avg_gap")
    ax.plot(d["exp_steps"], d["exp"], color="#9467bd", lw=1.8, label="exp_gap")
    ax.axhline(0, color="black", lw=0.8)
    _symlog(ax, [gaps, d["avg"], d["exp"]])
    ax.set_xlabel("step"), ax.set_ylabel("convexity gap"), ax.legend(fontsize=8)
    return fig


def draw_ratio(d: Dict[str, Any]):
    fig, (ax,) = _figure()
    steps, ratio = d["steps"], d["ratio"]
    ax.plot(steps, ratio, marker="o", ms=3, color="#333")
    finite = ratio[np.isfinite(ratio)]
    lo = min(-0.5, float(finite.min()) if finite.size else 0.0)
    hi = max(1.5, float(finite.max()) if finite.size else 1.0)
    ax.axhspan(1, hi * 1.1 if hi > 0 else 1.5, color="#2ca02c", alpha=0.12)
    ax.axhspan(0, 1, color="#ff9f1c", alpha=0.15)
    ax.axhspan(lo * 1.1 if lo < 0 else -0.5, 0, color="#d62728", alpha=0.12)
    ax.set_ylim(lo * 1.1 if lo < 0 else -0.5, hi * 1.1)
    ax.set_xlabel("step"), ax.set_ylabel("convexity_ratio")
    return fig


def draw_smoothness(d: Dict[str, Any]):
    fig, (ax,) = _figure(height=3.6)
    for key, steps_key, style in (("inst", "inst_steps", dict(s=6, color="#1f77b4", alpha=0.35, label="inst_smooth")),):
        s, v = _positive(d[steps_key], d[key])
        ax.scatter(s, v, **style)
    for key, color in (("max", "#d62728"), ("exp", "#2ca02c")):
        s, v = _positive(d[f"{key}_steps"], d[key])
        ax.plot(s, v, color=color, lw=1.6, label=f"{key}_smooth")
    s, v = _positive(d["sharp_steps"], d["sharp"])
    ax.plot(s, v, "s-", color="#333", ms=4, lw=1, label="sharpness λ_max")
    ax.set_yscale("log"), ax.set_xlabel("step"), ax.legend(fontsize=8)
    return fig


def draw_pairs(d: Dict[str, Any]):
    fig, (ax,) = _figure(height=3.6)
    smooth, sharp = d["smooth"], d["sharpness"]
    points = ax.scatter(sharp, smooth, c=d["steps"], cmap="viridis", s=18)
    fig.colorbar(points, ax=ax, label="step")
    lo = float(min(smooth.min(), sharp.min())) / 2
    hi = float(max(smooth.max(), sharp.max())) * 2
    grid = np.geomspace(lo, hi, 50)
    ax.plot(grid, grid, color="black", lw=1)
    ax.fill_between(grid, grid / 2, grid * 2, color="#999", alpha=0.2, lw=0)
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_xlabel("sharpness λ_max"), ax.set_ylabel("median inst_smooth since the previous probe")
    return fig


def draw_corr(d: Dict[str, Any]):
    fig, (ax,) = _figure()
    steps, corr = d["steps"], d["corr"]
    ax.plot(steps, corr, color="#1f77b4", alpha=0.35, lw=0.8)
    ax.plot(steps, np.cumsum(corr) / np.arange(1, corr.size + 1), color="#1f77b4", lw=2, label="running mean")
    ax.axhline(0, color="black", lw=0.8)
    _symlog(ax, [corr])
    ax.set_xlabel("step"), ax.set_ylabel("update_corr"), ax.legend(fontsize=8)
    return fig


def draw_cumsum(d: Dict[str, Any]):
    fig, (ax,) = _figure(height=3.6)
    for key in ("update_corr", "update_corr_rs", "loss_diff"):
        ax.plot(d["steps"], d[key], lw=1.6, color=COLORS[key], label=f"Σ {key}",
                ls="--" if key == "update_corr_rs" else "-")
    ax.axhline(0, color="black", lw=0.8)
    _symlog(ax, [d["update_corr"], d["update_corr_rs"], d["loss_diff"]])
    ax.set_xlabel("step"), ax.set_ylabel("cumulative sum"), ax.legend(fontsize=8)
    return fig


def draw_moxco(d: Dict[str, Any]):
    fig, (ax, ax2) = _figure(2, height=2.8)
    ax.plot(d["steps"], d["goodness"], marker="o", ms=3, color="#333", label="goodness")
    ax.axhline(d["threshold"], color="#d62728", ls="--", lw=1, label=f"C = {d['threshold']:g}")
    for step in d["decisions"]:
        ax.axvline(step, color="#2ca02c", lw=1.5)
    ax.set_ylim(-0.02, 1.02), ax.set_ylabel("goodness"), ax.legend(fontsize=8)
    for name, (steps, values) in d["terms"].items():
        s, v = _positive(np.asarray(steps), np.asarray(values))
        if s.size:
            ax2.plot(s, v, lw=1.4, label=name.replace("goodness_", ""))
    if ax2.lines:
        ax2.set_yscale("log")
    ax2.set_ylabel("terms"), ax2.set_xlabel("step")
    if len(d["phase"]):
        twin = ax2.twinx()
        twin.step(d["phase_steps"], d["phase"], where="post", color="#9467bd", lw=1.2, label="phase")
        twin.set_ylim(0.5, 2.5), twin.set_yticks([1, 2]), twin.set_ylabel("phase")
    ax2.legend(fontsize=8, loc="upper left")
    return fig


DRAW: Dict[str, Callable[[Dict[str, Any]], Any]] = {
    "loss": draw_loss, "gaps": draw_gaps, "ratio": draw_ratio, "smoothness": draw_smoothness, "pairs": draw_pairs,
    "corr": draw_corr, "cumsum": draw_cumsum, "moxco": draw_moxco,
}


def render_plot(plot: Plot) -> str:
    fig = DRAW[plot.kind](plot.data)
    fig.suptitle(plot.title, fontsize=10)
    return _png(fig)


# --- HTML ------------------------------------------------------------------------------------------

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em;margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em} td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f6f6f6} .meta{color:#666;font-size:.9em} figure{margin:1em 0} figure img{max-width:100%;border:1px solid #eee}
figcaption{color:#555;font-size:.88em} code{background:#f3f3f3;padding:0 .25em;border-radius:3px}
.verdict{font-weight:600;padding:.4em .7em;border-radius:4px;display:inline-block;margin:.4em 0}
.holds{background:#e3f6e5;color:#17692a} .degraded{background:#fff3d6;color:#8a5a00} .fails{background:#fde4e4;color:#a11a1a}
.absent{background:#eee;color:#555} td.num{font-variant-numeric:tabular-nums;text-align:right}
"""


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "∞" if value > 0 else "−∞"
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    if isinstance(value, list):
        return "; ".join(_fmt(v) for v in value) or "none"
    return str(value)


def _esc(text: Any) -> str:
    return html.escape(str(text))


def _numbers_table(numbers: Dict[str, Any], key: str) -> str:
    rows = "".join(f"<tr><th>{_esc(k)}</th><td class='num' data-key='{_esc(key)}.{_esc(k)}'>{_esc(_fmt(v))}</td></tr>"
                   for k, v in numbers.items() if not isinstance(v, (list, dict)) or v)
    return f"<table class='numbers'>{rows}</table>"


def _figure_html(plot: Plot, image: str) -> str:
    return (f"<figure class='plot' data-plot='{_esc(plot.key)}'><img alt='{_esc(plot.title)}' "
            f"src='data:image/png;base64,{image}'><figcaption>{_esc(plot.caption)}</figcaption></figure>")


def _verdict_html(verdict: str, line: str, key: str = "") -> str:
    return (f"<div class='verdict {VERDICT_CLASS[verdict]}' data-verdict='{_esc(key)}'>Verdict: {_esc(line)}</div>")


def section_html(section: Section, images: Dict[str, str]) -> str:
    parts = [f"<section id='{section.key}'><h2>{_esc(section.title)}</h2>",
             f"<p class='meta'>{_esc(section.paper)}</p>"]
    parts += [_figure_html(p, images[p.key]) for p in section.plots]
    parts.append(_numbers_table(section.numbers, section.key))
    for name, extra in section.extra_verdicts.items():
        label = name.replace("_", " ")
        numbers = {k: v for k, v in extra.items() if k not in ("verdict", "verdict_line")}
        parts.append(f"<h3>{_esc(label)} (eq. 12)</h3>{_numbers_table(numbers, section.key + '.' + name)}")
        parts.append(_verdict_html(extra["verdict"], f"{label}: {extra['verdict_line']}", f"{section.key}.{name}"))
    parts.append(f"<p class='reading'>{_esc(section.reading)}</p>")
    parts.append(_verdict_html(section.verdict, section.verdict_line, section.key))
    parts.append("</section>")
    return "".join(parts)


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_esc(title)}</title>"
            f"<style>{STYLE}</style></head><body>{body}"
            f"<p class='meta'>generated by moxco {__version__} audit, {time.strftime('%Y-%m-%d %H:%M:%S')}</p></body></html>")


def run_report_html(result: RunAudit) -> str:
    images = {p.key: render_plot(p) for p in result.all_plots()}
    run = result.run
    summary_rows = "".join(
        f"<tr><td><a href='#{s.key}'>{_esc(s.title)}</a></td><td><span class='verdict {VERDICT_CLASS[s.verdict]}'>"
        f"{_esc(s.verdict_line)}</span></td></tr>" for s in result.sections)
    config = {k: v for k, v in run.config.items() if not isinstance(v, dict)}
    body = [f"<h1>moxco audit: {_esc(run.name)}</h1>",
            f"<p class='meta'>status {_esc(run.status)} · {_esc(result.overview['steps'])} steps · store "
            f"{_esc(run.source)}</p>",
            "<p>Does the classical convexity/smoothness analysis describe this run? One section per assumption "
            "of the audit paper (Reevaluating Theoretical Analysis Methods for Optimization in Deep Learning); "
            "the verdict rules are in docs/audit.md.</p>",
            f"<table class='summary'><tr><th>assumption</th><th>verdict</th></tr>{summary_rows}</table>",
            "<h2>Run</h2>", _numbers_table({**{k: v for k, v in result.overview.items() if k != 'metrics'}, **config}, "run")]
    body += [_figure_html(p, images[p.key]) for p in result.plots]
    body += [section_html(s, images) for s in result.sections]
    return _page(f"moxco audit: {run.name}", "".join(body))


def write_report(result: RunAudit, out: Path) -> Tuple[Path, Path]:
    """Write ``out`` (HTML) and ``out`` with suffix ``.json`` (the summary). Returns both paths."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(run_report_html(result), encoding="utf-8")
    summary = out.with_suffix(".json")
    summary.write_text(json.dumps(result.to_json(), indent=1, allow_nan=False), encoding="utf-8")
    return out, summary


# --- side by side ------------------------------------------------------------------------------------


def _overlay(title: str, results: Sequence[RunAudit], series: Callable[[RunAudit], Tuple[np.ndarray, np.ndarray]],
             ylabel: str, scale: str = "linear", transform: Optional[Callable[[np.ndarray], np.ndarray]] = None):
    fig, (ax,) = _figure()
    drawn = []
    for color, result in zip(RUN_COLORS * 4, results):
        steps, values = series(result)
        if transform is not None and values.size:
            values = transform(values)
        if values.size:
            ax.plot(steps, values, lw=1.5, color=color, label=result.run.name)
            drawn.append(values)
    if scale == "symlog":
        _symlog(ax, drawn)
    elif scale == "log":
        ax.set_yscale("log")
    ax.set_xlabel("step"), ax.set_ylabel(ylabel)
    if drawn:
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig


def _finite(result: RunAudit, metric: str) -> Tuple[np.ndarray, np.ndarray]:
    return result.run.finite(metric)


def _positive_series(result: RunAudit, metric: str) -> Tuple[np.ndarray, np.ndarray]:
    return _positive(*result.run.get(metric))


COMPARE_PLOTS = (
    ("loss", "training loss", lambda r: _finite(r, "loss"), "loss", "linear", None),
    ("avg_gap", "avg_gap (w.r.t. x_{t-1})", lambda r: _finite(r, "avg_gap"), "avg_gap", "symlog", None),
    ("convexity_ratio", "convexity_ratio (w.r.t. x*)", lambda r: _finite(r, "convexity_ratio"), "ratio", "symlog", None),
    ("exp_smooth", "exp_smooth", lambda r: _positive_series(r, "exp_smooth"), "exp_smooth", "log", None),
    ("sharpness", "sharpness λ_max", lambda r: _positive_series(r, "sharpness"), "λ_max", "log", None),
    ("cumsum_update_corr", "Σ update_corr", lambda r: _finite(r, "update_corr"), "Σ update_corr", "symlog", np.cumsum),
    ("cumsum_update_corr_rs", "Σ update_corr_rs", lambda r: _finite(r, "update_corr_rs"), "Σ update_corr_rs", "symlog",
     np.cumsum),
    ("cumsum_loss_diff", "Σ loss_diff", lambda r: _finite(r, "loss_diff"), "Σ loss_diff", "symlog", np.cumsum),
    ("goodness", "goodness", lambda r: _finite(r, "goodness"), "goodness", "linear", None),
)

#: the headline number of each section in the comparison table
HEADLINE = {"path_convexity": "fraction_nonconvex", "global_convexity": "convexity_ratio",
            "smoothness": "median_smooth_over_sharpness", "descent_lemma": "mean_update_corr", "moxco": "max_goodness"}


def compare_json(results: Sequence[RunAudit]) -> Dict[str, Any]:
    return {"runs": [r.run.name for r in results],
            "verdicts": {s: {r.run.name: r.section(s).verdict_line for r in results} for s in SECTIONS},
            "headline": {s: {r.run.name: _json_value(r.section(s).numbers.get(HEADLINE[s])) for r in results}
                         for s in SECTIONS},
            "audits": {r.run.name: r.to_json() for r in results}}


def compare_html(results: Sequence[RunAudit]) -> str:
    head = "".join(f"<th>{_esc(r.run.name)}</th>" for r in results)
    config_keys = ("optimizer", "random_scaling", "example", "reference")
    config_rows = "".join(
        f"<tr><th>{_esc(k)}</th>" + "".join(f"<td>{_esc(_fmt(r.run.config.get(k)))}</td>" for r in results) + "</tr>"
        for k in config_keys)
    loss_row = "<tr><th>loss first → last</th>" + "".join(
        f"<td class='num'>{_fmt(r.overview['first_loss'])} → {_fmt(r.overview['last_loss'])}</td>" for r in results) + "</tr>"
    rows = []
    for key in SECTIONS:
        cells = []
        for r in results:
            s = r.section(key)
            number = s.numbers.get(HEADLINE[key])
            cells.append(f"<td><span class='verdict {VERDICT_CLASS[s.verdict]}' data-verdict='{_esc(r.run.name)}.{key}'>"
                         f"{_esc(s.verdict_line)}</span><br><span class='meta'>{HEADLINE[key]} = {_esc(_fmt(number))}"
                         "</span></td>")
        rows.append(f"<tr><th><a href='#{key}'>{_esc(results[0].section(key).title)}</a></th>{''.join(cells)}</tr>")
    body = [f"<h1>moxco audit: {len(results)} runs side by side</h1>",
            f"<table class='compare'><tr><th></th>{head}</tr>{config_rows}{loss_row}{''.join(rows)}</table>"]
    for key, title, series, ylabel, scale, transform in COMPARE_PLOTS:
        if not any(series(r)[0].size for r in results):
            continue
        image = _png(_overlay(title, results, series, ylabel, scale, transform))
        body.append(_figure_html(Plot(key, title, "overlay", {}, caption=f"{title}, one line per run."), image))
    for r in results:
        body.append(f"<h2 id='run-{_esc(r.run.name)}'>{_esc(r.run.name)}</h2>")
        for s in r.sections:
            body.append(f"<p><b>{_esc(s.title)}</b>: {_esc(s.reading)}</p>")
    return _page("moxco audit: comparison", "".join(body))


def write_compare(results: Sequence[RunAudit], out: Path) -> Tuple[Path, Path]:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(compare_html(results), encoding="utf-8")
    summary = out.with_suffix(".json")
    summary.write_text(json.dumps(compare_json(results), indent=1, allow_nan=False), encoding="utf-8")
    return out, summary
