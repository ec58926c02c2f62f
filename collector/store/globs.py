"""Run-name globs in SQL: ``list_runs(name="gpt2-*")`` matches names as ``fnmatch.fnmatchcase``
would, in the database (SQLite's ``GLOB``, PostgreSQL's anchored ``~``), the pattern always a bound
parameter."""

from __future__ import annotations

from typing import List, Tuple

from sqlalchemy import false, literal


def glob_tokens(pattern: str) -> List[tuple]:
    """``pattern`` in ``fnmatch``'s syntax as tokens: ``("lit", ch)``, ``("any",)`` (``*``),
    ``("one",)`` (``?``), ``("class", negated, [(lo, hi), …])`` (``[…]``, ``[!…]``; a ``[`` without
    its ``]`` is a literal, as in ``fnmatch``)."""
    out: List[tuple] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c == "*":
            if not out or out[-1] != ("any",):
                out.append(("any",))
        elif c == "?":
            out.append(("one",))
        elif c == "[":
            j = i
            if j < n and pattern[j] == "!":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 1
            if j >= n:
                out.append(("lit", "["))
                continue
            body, i = pattern[i:j], j + 1
            negated = body.startswith("!")
            body = body[1:] if negated else body
            ranges, k = [], 0
            while k < len(body):
                if k + 2 < len(body) and body[k + 1] == "-":
                    if body[k] <= body[k + 2]:  # fnmatch drops empty ranges such as z-a
                        ranges.append((body[k], body[k + 2]))
                    k += 3
                else:
                    ranges.append((body[k], body[k]))
                    k += 1
            out.append(("class", negated, ranges))
        else:
            out.append(("lit", c))
    return out


def glob_condition(column, pattern: str, dialect: str):
    """A SQL condition true where ``column`` matches the glob ``pattern`` as
    ``fnmatch.fnmatchcase`` would: SQLite's ``GLOB`` (case-sensitive; ``*``, ``?``, ``[`` of the
    pattern written as the classes ``[*]``, ``[?]``, ``[[]``), PostgreSQL's ``~`` with an anchored
    regular expression (every character that is not a letter or digit escaped). The pattern is
    always a bound parameter, never SQL text."""
    tokens = glob_tokens(pattern)
    if all(t[0] == "lit" for t in tokens):
        return column == pattern
    parts: List[str] = []
    for token in tokens:
        kind = token[0]
        if kind == "lit":
            parts.append(_lit(token[1], dialect))
        elif kind == "any":
            parts.append("*" if dialect == "sqlite" else ".*")
        elif kind == "one":
            parts.append("?" if dialect == "sqlite" else ".")
        else:
            _, negated, ranges = token
            if not ranges:  # fnmatch: an empty class matches nothing, an empty negated one any character
                if not negated:
                    return false()
                parts.append("?" if dialect == "sqlite" else ".")
                continue
            parts.append(_class(negated, ranges, dialect))
    if dialect == "sqlite":
        return column.op("GLOB")(literal("".join(parts)))
    return column.op("~")(literal("^" + "".join(parts) + "$"))


def _lit(ch: str, dialect: str) -> str:
    if dialect == "sqlite":
        return f"[{ch}]" if ch in "*?[" else ch
    return ch if ch.isalnum() else "\\" + ch


_GLOB_SPECIAL = "]^-"  # inside a GLOB class: "]" is literal only first, "^" anywhere but first, "-" first or last


def _class(negated: bool, ranges: List[Tuple[str, str]], dialect: str) -> str:
    if dialect != "sqlite":
        esc = lambda ch: ch if ch.isalnum() else "\\" + ch  # noqa: E731 - ARE: "\\" escapes inside brackets too
        body = "".join(esc(lo) if lo == hi else f"{esc(lo)}-{esc(hi)}" for lo, hi in ranges)
        return "[" + ("^" if negated else "") + body + "]"
    # GLOB has no escapes: peel the special characters off the ends of ranges, place each special
    # single where it means itself
    singles, spans = set(), []
    for lo, hi in ranges:
        while lo <= hi and (lo in _GLOB_SPECIAL or hi in _GLOB_SPECIAL):
            if lo in _GLOB_SPECIAL:
                singles.add(lo)
                lo = chr(ord(lo) + 1)
            elif hi in _GLOB_SPECIAL:
                singles.add(hi)
                hi = chr(ord(hi) - 1)
        if lo < hi:
            spans.append(f"{lo}-{hi}")
        elif lo == hi:
            singles.add(lo)
    body = ("]" if "]" in singles else "") + "".join(spans) + "".join(sorted(singles - set(_GLOB_SPECIAL)))
    body += ("^" if "^" in singles else "") + ("-" if "-" in singles else "")
    if not negated and body.startswith("^"):  # only "^" and "-" left: "-" first is literal too
        if body == "^":
            return "^"  # outside a class "^" is itself
        body = "-^"
    return "[" + ("^" if negated else "") + body + "]"
