"""One-line figures that fault and fuzz tests print, gathered for docs/reliability.md.

``figure(test, did, **counts)`` prints ``FIGURE | <what it did> | key value | …`` (shown with
``pytest -s``) and keeps it; ``tests/reliability/conftest.py`` and ``tests/security/conftest.py``
print every kept figure again in pytest's terminal summary, so a plain ``pytest`` run shows them.
Set ``MOXCO_FIGURES=path.jsonl`` to also append them to a file.
"""

from __future__ import annotations

import json
import os
from typing import Any, List, Tuple

FIGURES: List[Tuple[str, str]] = []


def figure(did: str, **counts: Any) -> str:
    line = "FIGURE | " + did + " | " + " | ".join(f"{k.replace('_', ' ')} {v}" for k, v in counts.items())
    print(line, flush=True)
    FIGURES.append((did, line))
    path = os.environ.get("MOXCO_FIGURES")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"did": did, **counts}) + "\n")
    return line


def summary(terminalreporter) -> None:
    if FIGURES:
        terminalreporter.section("moxco figures")
        for _, line in FIGURES:
            terminalreporter.write_line(line)
        FIGURES.clear()
