"""Self-contained HTML reports of audits: the plots are inline SVG (``plots``: data rasterised,
text as glyph paths), styles inline, no script and no external resource, so the file can be mailed,
attached to an issue, or opened offline. ``write_report`` writes the HTML and the JSON summary
beside it; ``compare`` puts several runs side by side.
"""

from __future__ import annotations

import html
import json
import math
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Tuple

import numpy as np

from moxco import __version__
from moxco.collector.audit.analysis import (
    DEGRADED, FAILS, HOLDS, INCONCLUSIVE, NOT_APPLICABLE, NOT_MEASURED, Plot, RunAudit, Section,
)
from moxco.collector.audit.plots import render
from moxco.collector.audit.verdicts import SUB_VERDICT_KEYS

VERDICT_CLASS = {HOLDS: "holds", DEGRADED: "degraded", FAILS: "fails", INCONCLUSIVE: "inconclusive",
                 NOT_MEASURED: "absent", NOT_APPLICABLE: "absent"}

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em;margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em} td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f6f6f6} .meta{color:#666;font-size:.9em} figure{margin:1em 0} figure svg{width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:.88em} code{background:#f3f3f3;padding:0 .25em;border-radius:3px}
.verdict{font-weight:600;padding:.4em .7em;border-radius:4px;display:inline-block;margin:.4em 0}
.holds{background:#e3f6e5;color:#17692a} .degraded{background:#fff3d6;color:#8a5a00} .fails{background:#fde4e4;color:#a11a1a}
.inconclusive{background:#e4ecfb;color:#1f3f80} .absent{background:#eee;color:#555} td.num{font-variant-numeric:tabular-nums;text-align:right}
.notice{border-left:4px solid #a11a1a;background:#fdf2f2;padding:.4em .8em;margin:.6em 0} .notice.info{border-color:#1f3f80;background:#f2f5fd}
tr.differs th{background:#fff3d6}
"""


def fmt(value: Any) -> str:
    """A value for a table cell (NaN shows as "—": not measured)."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isnan(value):
            return "—"
        if math.isinf(value):
            return "∞" if value > 0 else "−∞"
        return f"{value:.4g}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {fmt(v)}" for k, v in value.items()) or "—"
    if isinstance(value, (list, tuple)):
        return "; ".join(fmt(v) for v in value) or "none"
    return str(value)


def esc(text: Any) -> str:
    return html.escape(str(text))


def numbers_table(numbers: Dict[str, Any], key: str) -> str:
    rows = "".join(f"<tr><th>{esc(k)}</th><td class='num' data-key='{esc(key)}.{esc(k)}'>{esc(fmt(v))}</td></tr>"
                   for k, v in numbers.items() if not isinstance(v, (list, dict)) or v)
    return f"<table class='numbers'>{rows}</table>"


def figure_html(plot: Plot, image: str) -> str:
    return (f"<figure class='plot' data-plot='{esc(plot.key)}' aria-label='{esc(plot.title)}'>{image}"
            f"<figcaption>{esc(plot.caption)}</figcaption></figure>")


def verdict_html(verdict: str, line: str, key: str = "") -> str:
    return f"<div class='verdict {VERDICT_CLASS[verdict]}' data-verdict='{esc(key)}'>Verdict: {esc(line)}</div>"


def section_html(section: Section, images: Dict[str, str]) -> str:
    parts = [f"<section id='{section.key}'><h2>{esc(section.title)}</h2>",
             f"<p class='meta'>{esc(section.paper)}</p>"]
    parts += [figure_html(p, images[p.key]) for p in section.plots]
    parts.append(numbers_table({k: v for k, v in section.numbers.items() if k != "decisions"}, section.key))
    for name, extra in section.extra_verdicts.items():
        label = name.replace("_", " ")
        numbers = {k: v for k, v in extra.items() if k not in SUB_VERDICT_KEYS}
        paper = f" ({extra['paper']})" if extra.get("paper") else ""
        parts.append(f"<h3>{esc(label)}{esc(paper)}</h3>{numbers_table(numbers, section.key + '.' + name)}")
        parts.append(verdict_html(extra["verdict"], f"{label}: {extra['verdict_line']}", f"{section.key}.{name}"))
    if section.reading:
        parts.append(f"<p class='reading'>{esc(section.reading)}</p>")
    parts.append(verdict_html(section.verdict, section.verdict_line, section.key))
    parts.append("</section>")
    return "".join(parts)


def page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>"
            f"<style>{STYLE}</style></head><body>{body}"
            f"<p class='meta'>generated by moxco {__version__} audit, {time.strftime('%Y-%m-%d %H:%M:%S')}</p></body></html>")


def summary_html(result: RunAudit) -> str:
    """The agent's stored errors and the run's decisions, said before any verdict."""
    errors = result.run.errors
    if errors:
        items = "".join(f"<li data-error='{esc(k)}'><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in sorted(errors.items()))
        parts = [f"<div class='notice' id='agent-errors'>The agent disabled these metrics after an error during the "
                 f"run; sections that need them say so.<ul>{items}</ul></div>"]
    else:
        parts = ["<p class='meta' id='agent-errors'>No agent error is stored with this run.</p>"]
    from moxco.collector.audit.moxco_section import decision_line

    if result.run.decisions:
        items = "".join(f"<li>{esc(decision_line(d))}</li>" for d in result.run.decisions)
        parts.append(f"<div class='notice info' id='decisions'>Decisions of this run:<ul>{items}</ul></div>")
    return "".join(parts)


def run_table(result: RunAudit) -> Dict[str, Any]:
    run = result.run
    table = {k: v for k, v in result.overview.items() if k != "metrics"}
    table.update({k: v for k, v in run.config.items() if not isinstance(v, (dict, list)) and k != "optimizer"})
    table.update({f"optimizer.{k}": v for k, v in run.hyperparameters.items()})
    policy = run.policy_config
    table["policy"] = policy_text(policy)
    return table


def policy_text(policy: Any) -> str:
    if not isinstance(policy, Mapping):
        return "none"
    action = policy.get("action") or {}
    act = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in action.items())
    return (f"C = {fmt(policy.get('threshold'))}, {fmt(policy.get('consecutive'))} consecutive, min_step "
            f"{fmt(policy.get('min_step'))}" + (f", action {act}" if act else ""))


def run_report_html(result: RunAudit) -> str:
    images = {p.key: render(p) for p in result.all_plots()}
    run = result.run
    summary_rows = "".join(
        f"<tr><td><a href='#{s.key}'>{esc(s.title)}</a></td><td><span class='verdict {VERDICT_CLASS[s.verdict]}'>"
        f"{esc(s.verdict_line)}</span></td></tr>" for s in result.sections)
    body = [f"<h1>moxco audit: {esc(run.name)}</h1>",
            f"<p class='meta'>status {esc(run.status)} · {esc(result.overview['steps'])} steps · read from "
            f"{esc(run.source)}</p>",
            "<p>Does the classical convexity/smoothness analysis describe this run? One section per assumption "
            "of the audit paper (Reevaluating Theoretical Analysis Methods for Optimization in Deep Learning); "
            "each verdict states its test and numbers; the rules and conventions are in docs/audit.md.</p>",
            summary_html(result),
            f"<table class='summary'><tr><th>assumption</th><th>verdict</th></tr>{summary_rows}</table>",
            "<h2>Run</h2>", numbers_table(run_table(result), "run")]
    body += [figure_html(p, images[p.key]) for p in result.plots]
    body += [section_html(s, images) for s in result.sections]
    return page(f"moxco audit: {run.name}", "".join(body))


def write_report(result: RunAudit, out: Path) -> Tuple[Path, Path]:
    """Write ``out`` (HTML) and ``out`` with suffix ``.json`` (the summary). Returns both paths."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(run_report_html(result), encoding="utf-8")
    summary = out.with_suffix(".json")
    summary.write_text(json.dumps(result.to_json(), indent=1, allow_nan=False), encoding="utf-8")
    return out, summary


def write_compare(results, out: Path) -> Tuple[Path, Path]:
    """The side-by-side report (``compare``) and its JSON."""
    from moxco.collector.audit.compare import compare_html, compare_json

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(compare_html(results), encoding="utf-8")
    summary = out.with_suffix(".json")
    summary.write_text(json.dumps(compare_json(results), indent=1, allow_nan=False), encoding="utf-8")
    return out, summary
