"""The wire format: what a metric point is, how values and names travel, one rule for each.

The agent (embedded or over HTTP), the collector's API and its store all use this module, so a
name or a value is judged the same wherever it enters:

* a **point** is ``(step, metric, value, wall_time, rank)``; ``rank`` is ``RUN_LEVEL_RANK`` (-1)
  for run-level values and the torch.distributed rank for per-rank ones. On the wire (docs/api.md)
  it is the array ``[metric, step, value, wall_time]`` or ``[metric, step, value, wall_time, rank]``.
* **values** are float64; NaN and ±Inf are valid (a diverging run) and travel as the strings
  ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` (JSON has no such numbers); ``null`` reads as NaN.
  ``-0.0`` is stored as ``0.0``, in values and wall times (SQLite cannot keep the sign of a zero;
  PostgreSQL could, so both stores drop it here).
* **names** are checked as whole strings (never with ``$``, which matches before a final newline):
  a run name has 1–200 characters, not only spaces, no ``/``, no control character, and is not
  ``.`` or ``..``; a metric name has 1–100 characters and no control character; a batch id 1–200
  characters and no control character; a writer session id 1–100 characters and no control
  character; a name pattern (the run list's glob) 1–400 characters and no control character; a
  free text (an operator's reason) up to 1,000 characters and no control character other than a
  newline or tab. Control characters are Unicode's ``Cc`` (U+0000–U+001F, U+007F–U+009F: NUL,
  newline and NEL among them) and lone surrogates (``Cs``): no database stores them alike.
* **documents** (a run's ``config``, ``optimizer``, ``policy``; an action) are JSON objects nested at
  most 32 levels whose keys and strings hold no NUL or lone surrogate (``check_document``); a run's
  config is at most ``MAX_CONFIG_BYTES`` (256 KiB) as JSON once merged, its optimizer the same.

Pure Python and NumPy (``parse_points``, the collector's fast ingest parser); no torch.
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass
from typing import Any, Iterable, List, Optional, Sequence, Tuple

RUN_LEVEL_RANK = -1
MAX_RANK = 2**31 - 1
MAX_STEP = 2**63 - 1
MAX_RUN_NAME = 200
MAX_METRIC_NAME = 100
MAX_BATCH_ID = 200
MAX_TEXT = 1000
MAX_SESSION = 100
MAX_PATTERN = 400
MAX_DEPTH = 32  # nesting of a document (orjson writes at most 255 levels back)
MAX_CONFIG_BYTES = 256 * 1024  # a run's config (and its optimizer) as JSON, after merging

NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


class WireError(ValueError):
    """A name, value or point that the wire format refuses; the message says what and why.
    ``field`` names what was refused (``run``, ``metric``, ``batch_id``, ``reason``, ``points``,
    ``config``…), ``index`` the offending point of a batch; ``too_large``: refused for its size
    only (the API answers 413, not 422)."""

    def __init__(self, message: str, *, field: str = "", index: Optional[int] = None,
                 too_large: bool = False) -> None:
        super().__init__(message)
        self.field, self.index, self.too_large = field, index, too_large


@dataclass(frozen=True)
class Point:
    """One metric point: ``(step, metric, value, wall_time, rank)``; rank -1 is run-level."""

    step: int
    metric: str
    value: float
    wall_time: float
    rank: int = RUN_LEVEL_RANK


# --- names ---------------------------------------------------------------------------------------------

# Unicode categories refused in names: Cc (C0 controls, DEL, C1 controls: "\n", "\x00", "\x85") and
# Cs (lone surrogates, which no database encoding can store).
_REFUSED = frozenset(("Cc", "Cs"))


def _bad_char(text: str, allowed: str = "") -> Optional[str]:
    if text.isprintable() and text.isascii():  # the common case, one C-level pass
        return None
    for ch in text:
        if ch not in allowed and unicodedata.category(ch) in _REFUSED:
            return ch
    return None


def check_run_name(name: Any) -> str:
    """A run name: 1–200 characters, not only spaces, no ``/`` and no control character, not ``.``
    or ``..`` (URL clients normalise those path segments away). Returns it; ``WireError`` otherwise."""
    if not isinstance(name, str):
        raise WireError(f"a run name is a string, got {type(name).__name__}", field="run")
    if not 1 <= len(name) <= MAX_RUN_NAME:
        raise WireError(f"a run name has 1 to {MAX_RUN_NAME} characters, this one has {len(name)}", field="run")
    if not name.strip():
        raise WireError("a run name may not be only spaces", field="run")
    bad = _bad_char(name)
    if "/" in name or bad is not None:
        raise WireError("a run name may not contain '/' or control characters"
                        + (f" (found {bad!r})" if bad is not None else ""), field="run")
    if name in (".", ".."):
        raise WireError("a run name may not be '.' or '..'", field="run")
    return name


def check_metric_name(name: Any) -> str:
    """A metric name: 1–100 characters, no control character. Returns it; ``WireError`` otherwise."""
    if not isinstance(name, str):
        raise WireError(f"a metric name is a string, got {type(name).__name__}", field="metric")
    if not 1 <= len(name) <= MAX_METRIC_NAME:
        raise WireError(f"a metric name has 1 to {MAX_METRIC_NAME} characters, got {len(name)}", field="metric")
    bad = _bad_char(name)
    if bad is not None:
        raise WireError(f"a metric name may not contain control characters (found {bad!r} in {name!r})",
                        field="metric")
    return name


def check_batch_id(batch_id: Any) -> str:
    """A batch id: 1–200 characters, no control character."""
    if not isinstance(batch_id, str) or not 1 <= len(batch_id) <= MAX_BATCH_ID:
        raise WireError(f"`batch_id` must be a string of 1 to {MAX_BATCH_ID} characters", field="batch_id")
    if _bad_char(batch_id) is not None:
        raise WireError("`batch_id` may not contain control characters", field="batch_id")
    return batch_id


def check_session(session: Any) -> str:
    """A writer session id (``PUT /runs/{run}`` and batches: who writes the run now): 1–100
    characters, no control character."""
    if not isinstance(session, str) or not 1 <= len(session) <= MAX_SESSION:
        raise WireError(f"`session` must be a string of 1 to {MAX_SESSION} characters", field="session")
    if _bad_char(session) is not None:
        raise WireError("`session` may not contain control characters", field="session")
    return session


def check_name_pattern(pattern: Any, what: str = "name") -> str:
    """A name pattern (the run list's glob: ``*``, ``?``, ``[…]``): 1–400 characters, no control
    character."""
    if not isinstance(pattern, str) or not 1 <= len(pattern) <= MAX_PATTERN:
        raise WireError(f"`{what}` must be a pattern of 1 to {MAX_PATTERN} characters", field=what)
    bad = _bad_char(pattern)
    if bad is not None:
        raise WireError(f"`{what}` may not contain control characters (found {bad!r})", field=what)
    return pattern


def check_document(value: Any, what: str, *, max_bytes: Optional[int] = None) -> Any:
    """A JSON document (a run's config, optimizer, policy; an action): nested at most ``MAX_DEPTH``
    levels, no NUL character or lone surrogate in any key or string (PostgreSQL refuses them,
    SQLite would keep them: both stores answer alike), and, with ``max_bytes``, at most that many
    bytes as JSON (``WireError`` with ``too_large``). Iterative: no recursion to exhaust."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = list(item.values())
            for key in item:
                if isinstance(key, str) and _bad_document_char(key):
                    raise WireError(f"{what} has a key with a NUL character or lone surrogate: {key!r}", field=what)
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            if isinstance(item, str) and _bad_document_char(item):
                raise WireError(f"{what} has a string with a NUL character or lone surrogate: {item[:80]!r}",
                                field=what)
            continue
        for child in children:
            if isinstance(child, (dict, list, tuple)):
                if depth + 1 > MAX_DEPTH:
                    raise WireError(f"{what} nests objects/arrays deeper than {MAX_DEPTH} levels", field=what)
                stack.append((child, depth + 1))
            elif isinstance(child, str) and _bad_document_char(child):
                raise WireError(f"{what} has a string with a NUL character or lone surrogate: {child[:80]!r}",
                                field=what)
    if max_bytes is not None:
        size = document_size(value)
        if size > max_bytes:
            raise WireError(f"{what} is {size} bytes as JSON; the limit is {max_bytes} bytes (keep large "
                            "artefacts out of a run's registration)", field=what, too_large=True)
    return value


def document_size(value: Any) -> int:
    """Bytes of ``value`` as compact JSON (how the stores keep it, give or take whitespace)."""
    import json

    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str).encode("utf-8", "surrogatepass"))


def _bad_document_char(text: str) -> bool:
    if "\x00" in text:
        return True
    if text.isascii():
        return False
    return any("\ud800" <= ch <= "\udfff" for ch in text)


def check_text(text: Any, what: str = "reason") -> str:
    """Free text (an operator's reason, a decision's rejection message): up to 1,000 characters, no
    control character other than newline and tab."""
    if not isinstance(text, str) or len(text) > MAX_TEXT:
        raise WireError(f"`{what}` must be a string of at most {MAX_TEXT} characters", field=what)
    bad = _bad_char(text, allowed="\n\t")
    if bad is not None:
        raise WireError(f"`{what}` may not contain control characters (found {bad!r})", field=what)
    return text


# --- values --------------------------------------------------------------------------------------------


def encode_value(value: float) -> Any:
    """A metric value as JSON: a number, or ``"NaN"``/``"Infinity"``/``"-Infinity"``."""
    value = float(value)
    if math.isfinite(value):
        return value + 0.0  # -0.0 → 0.0
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def decode_value(value: Any) -> float:
    """A JSON value back to a float: numbers, the three strings, and ``null`` (NaN)."""
    if value is None:
        return math.nan
    if isinstance(value, str):
        try:
            return NONFINITE[value]
        except KeyError:
            raise WireError(f'a value is a number, "NaN", "Infinity", "-Infinity" or null, got {value!r}') from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise WireError(f"a value is a number, got {type(value).__name__}")
    return float(value) + 0.0


def json_float(value: Optional[float]) -> Any:
    """A float for a JSON response: ``None`` stays ``None``, non-finite values become their strings."""
    if value is None:
        return None
    return encode_value(value)


def json_floats(values: Any) -> List[Any]:
    """A float64 array as a JSON list: non-finite entries as their strings (found vectorised)."""
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    out = values.tolist()
    for i in np.flatnonzero(~np.isfinite(values)).tolist():
        out[i] = encode_value(out[i])
    return out


# --- points --------------------------------------------------------------------------------------------


def encode_point(point: Point | Tuple) -> list:
    """A ``Point`` (or ``(step, metric, value, wall_time[, rank])``) as the API's point array."""
    if isinstance(point, tuple) and not isinstance(point, Point):
        step, metric, value, wall_time, *rest = point
        rank = rest[0] if rest else RUN_LEVEL_RANK
    else:
        step, metric, value, wall_time, rank = point.step, point.metric, point.value, point.wall_time, point.rank
    out = [metric, int(step), encode_value(value), float(wall_time)]
    if rank != RUN_LEVEL_RANK:
        out.append(int(rank))
    return out


Columns = Tuple[Sequence[str], Sequence[int], List[float], Sequence[float], Sequence[int]]


def _first_bad(column: Sequence[Any], ok) -> int:
    for i, item in enumerate(column):
        if not ok(item):
            return i
    return -1


def _ok_metric(name: Any) -> bool:
    try:
        check_metric_name(name)
        return True
    except WireError:
        return False


def parse_points(points: Any) -> Columns:
    """Validate a batch's ``points`` array column-wise; returns ``(metrics, steps, values, wall_times,
    ranks)`` with values as floats (non-finite decoded, ``-0.0`` as ``0.0``).

    A point is ``[metric, step, value, wall_time]`` or ``[…, rank]``. The fast path checks each
    column's set of element types and its range with C-level builtins; only when something is wrong
    does a Python loop find the first offending point for the error, a ``WireError`` with ``index``.
    """
    import numpy as np

    def fail(column: str, i: int, why: str):
        raise WireError(f"points[{i}]: {column} {why}", field=column, index=i)

    if not isinstance(points, list):
        raise WireError("`points` must be an array of [metric, step, value, wall_time(, rank)] arrays",
                        field="points")
    if not points:
        return (), (), [], (), ()
    if set(map(type, points)) != {list}:
        i = _first_bad(points, lambda p: type(p) is list)
        raise WireError(f"points[{i}] is not an array", field="points", index=i)
    lengths = set(map(len, points))
    if not lengths <= {4, 5}:
        i = _first_bad(points, lambda p: len(p) in (4, 5))
        raise WireError(f"points[{i}] has {len(points[i])} elements; a point is [metric, step, value, wall_time] "
                        "or [metric, step, value, wall_time, rank]", field="points", index=i)
    if lengths == {4}:
        metrics, steps, values, walls = zip(*points)
        ranks: Sequence[int] = (RUN_LEVEL_RANK,) * len(points)
    elif lengths == {5}:
        metrics, steps, values, walls, ranks = zip(*points)
    else:
        metrics, steps, values, walls, ranks = zip(*(p if len(p) == 5 else p + [RUN_LEVEL_RANK] for p in points))

    if set(map(type, metrics)) != {str}:
        fail("metric", _first_bad(metrics, lambda m: type(m) is str), "must be a string")
    if (min(map(len, metrics)) < 1 or max(map(len, metrics)) > MAX_METRIC_NAME
            or not all(m.isprintable() and m.isascii() for m in set(metrics))):
        i = _first_bad(metrics, _ok_metric)
        if i >= 0:
            try:
                check_metric_name(metrics[i])
            except WireError as exc:
                fail("metric", i, str(exc).replace("a metric name ", "", 1))
    if set(map(type, steps)) != {int}:
        fail("step", _first_bad(steps, lambda s: type(s) is int), "must be an integer")
    if min(steps) < 0 or max(steps) > MAX_STEP:
        fail("step", _first_bad(steps, lambda s: 0 <= s <= MAX_STEP), "must be between 0 and 2**63-1")
    if set(map(type, ranks)) != {int}:
        fail("rank", _first_bad(ranks, lambda r: type(r) is int), "must be an integer")
    if min(ranks) < RUN_LEVEL_RANK or max(ranks) > MAX_RANK:
        fail("rank", _first_bad(ranks, lambda r: RUN_LEVEL_RANK <= r <= MAX_RANK),
             "must be -1 (run level) or a rank ≥ 0")
    if not set(map(type, walls)) <= {int, float}:
        fail("wall_time", _first_bad(walls, lambda w: type(w) in (int, float)),
             "must be a number (seconds since the epoch)")
    try:
        wall_array = np.array(walls, dtype=np.float64)
    except OverflowError:
        wall_array = np.array([math.inf])
    if not np.isfinite(wall_array).all():
        fail("wall_time", _first_bad(walls, lambda w: -1e18 < w < 1e18), "must be finite")
    if 0.0 in walls:  # -0.0 == 0.0: one C-level pass finds either
        walls = [w + 0.0 for w in walls]
    value_types = set(map(type, values))
    if value_types <= {float, int}:
        out_values = list(values)
    else:
        out_values = []
        for i, v in enumerate(values):
            t = type(v)
            if t is float or t is int:
                out_values.append(v)
            elif v is None:
                out_values.append(math.nan)
            elif t is str and v in NONFINITE:
                out_values.append(NONFINITE[v])
            else:
                fail("value", i, 'must be a number, "NaN", "Infinity", "-Infinity" or null')
    if int in value_types:
        try:
            out_values = [float(v) for v in out_values]
        except OverflowError:
            fail("value", _first_bad(values, lambda v: type(v) is not int or abs(v) < 1e308),
                 "is too large for a float64")
    if 0.0 in out_values:  # -0.0 == 0.0: one C-level pass finds either
        out_values = [v + 0.0 for v in out_values]
    return metrics, steps, out_values, walls, ranks


def point_columns(points: Iterable[Point | Tuple]) -> Columns:
    """Points given in Python (the embedded agent) as the columns ``parse_points`` returns, with the
    same checks: the embedded store and the API refuse the same names and keep the same values."""
    metrics_, steps, values, walls, ranks = [], [], [], [], []
    for point in points:
        p = point if isinstance(point, Point) else Point(*point)
        metrics_.append(p.metric)
        steps.append(int(p.step))
        values.append(float(p.value) + 0.0)
        walls.append(float(p.wall_time) + 0.0)
        ranks.append(int(p.rank))
    for i, name in enumerate(set(metrics_)):
        check_metric_name(name)
    if steps and (min(steps) < 0 or max(steps) > MAX_STEP):
        raise WireError("a step is between 0 and 2**63-1", field="step")
    if ranks and (min(ranks) < RUN_LEVEL_RANK or max(ranks) > MAX_RANK):
        raise WireError("a rank is -1 (run level) or ≥ 0", field="rank")
    return metrics_, steps, values, walls, ranks


__all__ = ["MAX_BATCH_ID", "MAX_CONFIG_BYTES", "MAX_DEPTH", "MAX_METRIC_NAME", "MAX_PATTERN", "MAX_RUN_NAME",
           "MAX_SESSION", "MAX_TEXT", "NONFINITE", "Point", "RUN_LEVEL_RANK", "WireError", "check_batch_id",
           "check_document", "check_metric_name", "check_name_pattern", "check_run_name", "check_session",
           "check_text", "decode_value", "document_size", "encode_point", "encode_value", "json_float",
           "json_floats", "parse_points", "point_columns"]
