"""The reproductions of docs/audit.md at reduced scale (``--quick`` sizes; the full runs are
``bench/audit_claims.py``):

* audit paper fig. 5: full-batch GD on a tanh network reaches the edge of stability 2/η and its
  smoothness measures follow the sharpness there (η = 0.5, 1,000 steps);
* MoXCo Table 2 in miniature: ProxQuant-SGD and MoXCo-ProxQuant binarise every weight matrix of
  the digits MLP exactly, the goodness policy switches MoXCo to Phase 2 through the agent, and both
  binary networks classify far above chance (1 seed, 600 steps).

The conventions table of docs/audit.md is the one ``moxco.collector.audit.conventions`` gives the
JSON, and every number an audit maps to a convention names one of its rows.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from moxco.collector import open_store
from moxco.collector.audit import conventions
from moxco.collector.audit.analysis import HOLDS, RunData, audit
from moxco.collector.audit.source import StoreSource

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))

import smoothness_at_eos  # noqa: E402
import proxquant_digits  # noqa: E402


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the examples' tiny networks, as their main() runs them
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_gd_reaches_the_edge_of_stability_and_smoothness_follows_the_sharpness(tmp_path, one_thread):
    url = f"sqlite:///{tmp_path / 'eos.db'}"
    smoothness_at_eos.train(0.5, 1000, url, "eos")
    row = smoothness_at_eos.summarize(StoreSource(open_store(url)).load("eos"), 0.5)
    assert row["initial_sharpness"] < 0.7 * row["two_over_eta"]  # progressive sharpening, then the edge
    assert row["plateau_over_two_over_eta"] == pytest.approx(1.0, abs=0.05)
    assert row["median_inst_smooth_late_over_plateau"] == pytest.approx(1.0, abs=0.1)
    assert row["final_exp_smooth_over_plateau"] == pytest.approx(1.0, abs=0.15)
    assert row["plateau_verdict"] == HOLDS, row["plateau_verdict_line"]


@pytest.mark.slow
def test_proxquant_binarises_and_moxco_commits_through_the_agent(tmp_path, one_thread):
    result = proxquant_digits.study(seeds=1, steps=600, fp_steps=1000, url=f"sqlite:///{tmp_path / 'pq.db'}")
    assert result["fp_top1"] > 0.9
    runs = {r["method"]: r for r in result["runs"]}
    assert all(r["binary"] for r in runs.values())  # every weight exactly ±s after the final projection
    assert runs["proxquant-sgd"]["final_phase"] == 1
    assert runs["moxco-proxquant"]["final_phase"] == 2 and runs["moxco-proxquant"]["committed_at"] is not None
    for r in runs.values():
        assert 0.5 < r["top1"] <= 1.0  # chance is 0.1
    assert "| MLP 64-128-128-10 |" in proxquant_digits.table(result)


def test_the_docs_conventions_table_is_the_audits():
    text = (ROOT / "docs" / "audit.md").read_text()
    assert conventions.markdown_table() in text, "regenerate the table: conventions.markdown_table()"


def test_every_audited_number_names_a_convention_of_the_table():
    result = audit(RunData("r", {}))
    summary = result.to_json()
    assert summary["conventions"] == conventions.table_json()
    for key, section in summary["sections"].items():
        assert section["conventions"], key
        assert set(section["conventions"].values()) <= set(conventions.CONVENTIONS), key
