"""What the benchmarks share: medians and spreads over repeats, the machine and the code measured,
and writing a run's markdown into the docs, which a benchmark does only when asked (``--write-docs``).

Benchmarks import it with ``bench/`` on ``sys.path`` (a script run as ``python bench/X.py`` has it).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Iterable, Optional

ROOT = Path(__file__).resolve().parent.parent


# --- figures over repeats ------------------------------------------------------------------------


def median(xs: Iterable[Optional[float]]) -> float:
    """The median of the figures that exist (None and NaN left out); NaN when none does."""
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.median(xs) if xs else math.nan


def spread(xs: Iterable[float], fmt: str = ".3f") -> str:
    """``min–max`` of the figures that exist, or ``one repeat``."""
    xs = [x for x in xs if not math.isnan(x)]
    return f"{min(xs):{fmt}}–{max(xs):{fmt}}" if len(xs) > 1 else "one repeat"


def fmt_ms(s: float) -> str:
    """Seconds as milliseconds with two decimals, ``–`` for NaN."""
    return f"{s * 1e3:.2f}" if not math.isnan(s) else "–"


# --- the machine and the code measured ---------------------------------------------------------


@functools.lru_cache(maxsize=1)
def source_state() -> str:
    """The commit benchmarked and whether agent/ or moxco/ had uncommitted changes (read-only git),
    taken once, when a benchmark first asks (at its start): the code it imported, not what the tree
    holds by the end of a run."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "agent", "moxco"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return "source: unknown"
    if not head:
        return "source: unknown"
    return f"source: commit {head}" + (" with uncommitted changes in agent/ or moxco/" if dirty else "")


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` says."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu


def machine_line() -> str:
    """The machine a CPU benchmark of the agent ran on: cores, CPU, torch and its threads, Python, the code."""
    import torch

    return (f"{os.cpu_count()} CPU cores ({cpu_name()}), no GPU, shared with other jobs; torch {torch.__version__}, "
            f"{torch.get_num_threads()} intra-op thread(s); Python {platform.python_version()}; {source_state()}")


# --- writing into the docs ---------------------------------------------------------------------


def add_write_docs(parser: argparse.ArgumentParser, doc: Path, what: str = "the results") -> None:
    """``--write-docs``: off unless given; a benchmark prints its markdown and leaves the docs alone."""
    parser.add_argument("--write-docs", action="store_true",
                        help=f"write {what} into {doc.relative_to(ROOT) if doc.is_relative_to(ROOT) else doc}")


def write_between_markers(doc: Path, markdown: str, begin: str, end: str, title: str) -> None:
    """Put ``markdown`` between the ``begin`` and ``end`` marker lines of ``doc``, replacing what was
    there; the block is appended when the markers are missing, and ``doc`` made (under ``title``)
    when it does not exist."""
    block = f"{begin}\n{markdown.strip()}\n{end}"
    text = doc.read_text() if doc.exists() else f"{title}\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        doc.write_text(head + block + tail)
    else:
        doc.write_text(text.rstrip() + "\n\n" + block + "\n")


def write_section(doc: Path, section: str, heading: str) -> None:
    """Replace the section of ``doc`` that starts at the line ``heading`` (up to the next ``## ``
    heading, which stays) with ``section``, which starts with that heading; append it when ``doc``
    has no such section."""
    text = doc.read_text() if doc.exists() else ""
    section = section.rstrip("\n") + "\n"
    start = text.find(heading)
    if start < 0:
        doc.write_text(text.rstrip("\n") + "\n\n" + section if text.strip() else section)
        return
    end = text.find("\n## ", start + len(heading))
    doc.write_text(text[:start] + section + (text[end:] if end >= 0 else ""))
