"""Structural checks of generated dashboards, and the metric names their queries use.

``check_dashboard(model)`` returns a list of problems (empty when the dashboard is sound): every
panel has a datasource and queries with non-empty expressions, panel ids are unique, panels fit the
24-column grid without overlapping, every ``$variable`` a query or title uses is defined (or one of
Grafana's built-ins), and annotations have a datasource and a query.

``promql_metric_names(expr)`` and ``sql_metric_names(sql)`` extract the metric names a query reads,
so a test can hold them against what the collector exposes (docs/api.md, or a live ``/metrics``).
"""

from __future__ import annotations

import re
from typing import Dict, Iterator, List, Optional, Set, Tuple

__all__ = [
    "iter_panels",
    "iter_queries",
    "check_dashboard",
    "promql_metric_names",
    "sql_metric_names",
    "referenced_variables",
    "GRID_WIDTH",
]

GRID_WIDTH = 24

# Grafana's global variables and SQL macros ($__interval, $__timeFilter(...), ...).
_BUILTIN_PREFIX = "__"

_VAR_RE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)(?::[^\]]*)?\]\]|\$(\w+)")


def iter_panels(model: dict) -> Iterator[dict]:
    """Every panel, rows included, with the panels of collapsed rows after their row."""
    for panel in model.get("panels") or []:
        yield panel
        for inner in panel.get("panels") or []:
            yield inner


def iter_queries(model: dict) -> Iterator[Tuple[str, str, str]]:
    """``(where, language, text)`` for every query: panel targets, annotations and variables (a
    variable on a PostgreSQL datasource is ``sql``). ``language`` is ``promql`` or ``sql``."""
    for panel in iter_panels(model):
        if panel.get("type") == "row":
            continue
        for target in panel.get("targets") or []:
            where = f"panel {panel.get('id')} {panel.get('title')!r} target {target.get('refId')!r}"
            if "expr" in target:
                yield where, "promql", target["expr"]
            elif "rawSql" in target:
                yield where, "sql", target["rawSql"]
            else:
                yield where, "unknown", ""
    for annotation in (model.get("annotations") or {}).get("list") or []:
        where = f"annotation {annotation.get('name')!r}"
        if annotation.get("expr"):
            yield where, "promql", annotation["expr"]
        elif isinstance(annotation.get("target"), dict) and annotation["target"].get("rawSql"):
            yield where, "sql", annotation["target"]["rawSql"]
    for variable in (model.get("templating") or {}).get("list") or []:
        if variable.get("type") == "query":
            query = variable.get("query")
            text = query.get("query", "") if isinstance(query, dict) else (query or "")
            where = f"variable {variable.get('name')!r}"
            if "postgres" in str((variable.get("datasource") or {}).get("type", "")):
                yield where, "sql", text
                continue
            match = re.fullmatch(r"\s*label_values\((.*),\s*\w+\)\s*", text)
            yield where, "promql", match.group(1) if match else text


def referenced_variables(text: str) -> Set[str]:
    """Names of the dashboard variables ``text`` uses (``$x``, ``${x}``, ``${x:fmt}``, ``[[x]]``),
    Grafana's built-ins (``$__interval``, ``$__timeFilter``, …) left out."""
    names = set()
    for match in _VAR_RE.finditer(text):
        name = next(group for group in match.groups() if group)
        if not name.startswith(_BUILTIN_PREFIX):
            names.add(name)
    return names


def _overlaps(a: dict, b: dict) -> bool:
    return (a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"]
            and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"])


def _check_grid(panels: List[dict], problems: List[str], where: str) -> None:
    placed: List[Tuple[str, dict]] = []
    for panel in panels:
        pos = panel.get("gridPos")
        name = f"panel {panel.get('id')} {panel.get('title')!r}"
        if not isinstance(pos, dict) or not all(isinstance(pos.get(k), int) for k in ("x", "y", "w", "h")):
            problems.append(f"{name}: gridPos missing or not integers")
            continue
        if pos["w"] <= 0 or pos["h"] <= 0 or pos["x"] < 0 or pos["y"] < 0 or pos["x"] + pos["w"] > GRID_WIDTH:
            problems.append(f"{name}: gridPos {pos} outside the {GRID_WIDTH}-column grid")
        for other_name, other in placed:
            if _overlaps(pos, other):
                problems.append(f"{name} overlaps {other_name}{where}")
        placed.append((name, pos))


def check_dashboard(model: dict, datasource_uids: Optional[Set[str]] = None) -> List[str]:
    """Problems of a dashboard model (plain JSON data); ``[]`` when sound. With ``datasource_uids``,
    every datasource reference must be one of them."""
    problems: List[str] = []
    for key in ("uid", "title"):
        if not model.get(key):
            problems.append(f"dashboard has no {key}")
    if model.get("uid") and not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", model["uid"]):
        problems.append(f"dashboard uid {model['uid']!r} is not 1-40 of [A-Za-z0-9_-]")

    variables: Dict[str, dict] = {}
    for variable in (model.get("templating") or {}).get("list") or []:
        name = variable.get("name")
        if not name:
            problems.append("a template variable has no name")
        elif name in variables:
            problems.append(f"template variable {name!r} defined twice")
        variables[name] = variable

    def check_ref(ref, where: str) -> None:
        if not isinstance(ref, dict) or not ref.get("uid") or not ref.get("type"):
            problems.append(f"{where}: no datasource (type and uid)")
        elif datasource_uids is not None and ref["uid"] not in datasource_uids and not ref["uid"].startswith("$"):
            problems.append(f"{where}: unknown datasource uid {ref['uid']!r}")

    ids: Dict[int, str] = {}
    for panel in iter_panels(model):
        name = f"panel {panel.get('id')} {panel.get('title')!r}"
        pid = panel.get("id")
        if not isinstance(pid, int) or pid <= 0:
            problems.append(f"{name}: id must be a positive integer")
        elif pid in ids:
            problems.append(f"{name}: id {pid} also used by {ids[pid]}")
        else:
            ids[pid] = name
        if not panel.get("title"):
            problems.append(f"{name}: no title")
        if panel.get("type") == "row":
            if panel.get("panels") and not panel.get("collapsed"):
                problems.append(f"{name}: an expanded row must not carry panels (Grafana drops them)")
            continue
        check_ref(panel.get("datasource"), name)
        targets = panel.get("targets") or []
        if not targets:
            problems.append(f"{name}: no queries")
        refs = [t.get("refId") for t in targets]
        if any(not r for r in refs) or len(set(refs)) != len(refs):
            problems.append(f"{name}: refIds must be non-empty and unique, got {refs}")
        for target in targets:
            if "datasource" in target:
                check_ref(target["datasource"], f"{name} target {target.get('refId')!r}")
                if isinstance(target["datasource"], dict) and isinstance(panel.get("datasource"), dict) \
                        and target["datasource"].get("uid") != panel["datasource"].get("uid"):
                    problems.append(f"{name}: target {target.get('refId')!r} uses another datasource than the panel")
            if not (str(target.get("expr") or "").strip() or str(target.get("rawSql") or "").strip()):
                problems.append(f"{name}: target {target.get('refId')!r} has no expression")

    top = list(model.get("panels") or [])
    _check_grid(top, problems, "")
    for row in top:
        if row.get("type") == "row" and row.get("panels"):
            _check_grid(row["panels"], problems, f" (in row {row.get('title')!r})")
            for inner in row["panels"]:
                pos = inner.get("gridPos") or {}
                if isinstance(pos.get("y"), int) and pos["y"] <= row["gridPos"]["y"]:
                    problems.append(f"panel {inner.get('id')} sits above its row {row.get('title')!r}")

    for annotation in (model.get("annotations") or {}).get("list") or []:
        where = f"annotation {annotation.get('name')!r}"
        check_ref(annotation.get("datasource"), where)
        target = annotation.get("target")
        if not annotation.get("expr") and not (isinstance(target, dict) and target.get("rawSql")):
            problems.append(f"{where}: no query")

    texts = [(where, text) for where, _lang, text in iter_queries(model)]
    texts += [(f"panel {p.get('id')} title", p.get("title") or "") for p in iter_panels(model)]
    for where, text in texts:
        for name in sorted(referenced_variables(text) - set(variables)):
            problems.append(f"{where}: uses undefined variable ${name}")
    for where, lang, text in iter_queries(model):
        if lang == "unknown":
            problems.append(f"{where}: query of an unknown kind")
    return problems


# --- metric names --------------------------------------------------------------------------------

_PROMQL_KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "offset", "inf", "nan", "atan2", "start", "end",
}
_GROUPING_RE = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_IDENT_RE = re.compile(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")


def promql_metric_names(expr: str) -> Set[str]:
    """Metric names a PromQL expression selects: identifiers that are not functions, aggregation
    operators, keywords, labels (in ``{…}`` or grouping clauses), durations or variables."""
    text = _STRING_RE.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges, subqueries
    text = _GROUPING_RE.sub(" ", text)
    text = re.sub(r"\$\{[^}]*\}|\$\w+", " 0 ", text)  # dashboard variables
    text = re.sub(r"\b\d+(\.\d*)?([eE][-+]?\d+)?\b", " ", text)
    names = set()
    for match in _IDENT_RE.finditer(text):
        ident, call = match.group(1), match.group(2)
        if call or ident.lower() in _PROMQL_KEYWORDS:
            continue
        names.add(ident)
    return names


_SQL_METRIC_RE = re.compile(r"\bmetric\s*(?:=\s*'([^']*)'|IN\s*\(([^)]*)\))", re.IGNORECASE)


def sql_metric_names(sql: str) -> Set[str]:
    """Metric names a SQL query reads from ``metric_points`` (``metric = 'x'`` or ``metric IN (...)``)."""
    names = set()
    for single, many in _SQL_METRIC_RE.findall(sql):
        if single:
            names.add(single)
        else:
            names.update(re.findall(r"'([^']*)'", many))
    return names
