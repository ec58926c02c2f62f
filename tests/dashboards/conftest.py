"""Shared fixtures of the dashboard tests: the generated dashboard models and the metric names the
collector exposes according to docs/api.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from moxco import catalogue
from moxco.dashboards import build

REPO = Path(__file__).resolve().parents[2]


def documented_exposition() -> set:
    """Every metric family name docs/api.md's exposition section promises: ``moxco_<metric>`` for
    each DESIGN §3 metric name (moxco.catalogue), plus the families it names explicitly."""
    text = (REPO / "docs" / "api.md").read_text("utf-8")
    section = text[text.index("## Prometheus exposition"):]
    explicit = set(re.findall(r"`(moxco_[a-z_]+)", section))
    exposed = {f"moxco_{metric}" for metric in catalogue.ALL} | explicit
    # a histogram family is scraped as its _bucket, _sum and _count series
    for family in list(exposed):
        if family.endswith("_seconds") and "duration" in family:
            exposed |= {family + "_bucket", family + "_sum", family + "_count"}
    return exposed


@pytest.fixture(scope="session")
def models() -> dict:
    """uid → the generated dashboard model (plain JSON data)."""
    return {build.to_dict(factory())["uid"]: build.to_dict(factory()) for factory in build.DASHBOARDS.values()}
