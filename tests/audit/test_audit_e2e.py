"""End to end: the GPT-2 and BERT pretraining examples run with the agent (subprocesses, a few dozen
steps of tiny models), ``moxco audit`` reads the stored runs, and

* every number the JSON summary and the HTML report show is recomputed here from the stored series;
* the HTML renders in headless Chromium (the system browser, driven by playwright) with every plot
  present and readable (two or more tick labels on both axes of every panel, none overlapping); a
  screenshot is saved in the test's tmp dir;
* ``moxco audit --compare`` puts both runs side by side, with a configuration table that has no
  empty row.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moxco.collector import open_store
from moxco.collector.audit.analysis import DTYPE_EPS, TOLERANCE_FACTOR
from tests.audit.browser import render, unreadable

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--steps", "24", "--batch-size", "8", "--seq-len", "32", "--vocab-size", "512", "--hidden", "32",
         "--corpus-bytes", "300000", "--probe-every", "4", "--reeval-every", "1", "--device", "cpu", "--quiet"]


def run_example(script: str, url: str, run: str, *extra: str) -> None:
    result = subprocess.run([sys.executable, str(ROOT / "examples" / script), *SMALL, "--url", url, "--run", run, *extra],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "moxco agent errors" not in result.stderr, result.stderr


def moxco_audit(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "moxco.cli", "audit", *args], capture_output=True, text=True,
                            timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm")
    url = f"sqlite:///{tmp / 'runs.db'}"
    run_example("pretrain_gpt2.py", url, "gpt2-adamw", "--optimizer", "adamw")
    run_example("pretrain_bert.py", url, "bert-sgdm-rs", "--optimizer", "sgdm", "--random-scaling")
    return tmp, url


def finite(store, run, metric):
    steps, values = store.series(run, metric)
    keep = np.isfinite(values)
    return steps[keep], values[keep]


def check_numbers_against_the_store(summary: dict, store, run: str) -> None:
    sections = summary["sections"]
    assert set(sections) == {"path_convexity", "global_convexity", "smoothness", "descent_lemma", "moxco"}
    assert store.series(run, "loss")[0].size == 24

    # convexity along the path: the fraction of steps over the float32 tolerance, recomputed
    gap_steps, gaps = finite(store, run, "inst_gap")
    loss = dict(zip(*store.series(run, "loss")))
    diff = dict(zip(*store.series(run, "loss_diff")))
    tol = np.array([TOLERANCE_FACTOR * DTYPE_EPS["float32"] * (abs(loss[s]) + abs(loss[s] - diff[s]) + abs(diff[s] - g))
                    for s, g in zip(gap_steps, gaps)])
    path = sections["path_convexity"]["numbers"]
    assert path["measured_steps"] == gap_steps.size == 23
    assert path["nonconvex_steps"] == int((gaps > tol).sum())
    assert path["max_inst_gap"] == pytest.approx(gaps.max(), rel=1e-12)
    assert path["final_avg_gap"] == pytest.approx(gaps.mean(), rel=1e-9)  # no epochs: the mean of all gaps
    assert sections["path_convexity"]["verdict"] == ("holds" if (gaps <= tol).all() else "fails")

    # the identity update_corr_t + inst_gap_t = loss_diff_t (same batch z_t, audit eq. 2, 9, 13)
    corr = dict(zip(*store.series(run, "update_corr")))
    for s, g in zip(gap_steps, gaps):
        assert corr[s] + g == pytest.approx(diff[s], rel=1e-6, abs=1e-7)

    # descent lemma
    _, uc = finite(store, run, "update_corr")
    numbers = sections["descent_lemma"]["numbers"]
    assert numbers["mean_update_corr"] == pytest.approx(uc.mean(), rel=1e-12)
    se = math.sqrt(np.sum(np.diff(uc) ** 2) / (2 * (uc.size - 1)) / uc.size)  # von Neumann's successive differences
    assert numbers["standard_error"] == pytest.approx(se, rel=1e-9)
    assert numbers["standard_error_iid"] == pytest.approx(uc.std(ddof=1) / math.sqrt(uc.size), rel=1e-9)
    assert numbers["fraction_negative"] == pytest.approx((uc < 0).mean())
    z = uc.mean() / se
    assert sections["descent_lemma"]["verdict"] == ("holds" if z <= -2 else "fails" if z >= 2 else "inconclusive")
    assert f"{abs(z):.3g} standard errors from 0" in sections["descent_lemma"]["verdict_line"]
    rs = sections["descent_lemma"]["extra_verdicts"]["random_scaling_identity"]
    _, rs_values = finite(store, run, "update_corr_rs")
    _, ld_values = finite(store, run, "loss_diff")
    assert rs["sum_update_corr_rs"] == pytest.approx(rs_values.sum(), rel=1e-9)
    assert rs["sum_loss_diff"] == pytest.approx(ld_values.sum(), rel=1e-9)

    # smoothness vs sharpness: the interval medians and their ratio
    sharp_steps, sharp = finite(store, run, "sharpness")
    smooth_steps, smooth = finite(store, run, "inst_smooth")
    ratios, previous = [], -1
    for s, lam in zip(sharp_steps, sharp):
        window = smooth[(smooth_steps > previous) & (smooth_steps <= s)]
        previous = s
        if window.size and lam > 0:
            ratios.append(np.median(window) / lam)
    smooth_numbers = sections["smoothness"]["numbers"]
    assert smooth_numbers["final_max_smooth"] == pytest.approx(smooth.max(), rel=1e-12)
    assert smooth_numbers["median_smooth_over_sharpness"] == pytest.approx(np.median(ratios), rel=1e-9)

    # global convexity is absent without a reference, and the verdict line says how to get it
    assert sections["global_convexity"]["verdict"] == "not measured"
    assert "reference" in sections["global_convexity"]["verdict_line"]

    # MoXCo: goodness maximum and the threshold the run's policy used
    _, goodness = finite(store, run, "goodness")
    assert sections["moxco"]["numbers"]["max_goodness"] == pytest.approx(goodness.max(), rel=1e-12)
    assert sections["moxco"]["numbers"]["threshold"] == store.run(run).config["policy"]["threshold"]


@pytest.mark.slow
@pytest.mark.parametrize("run", ["gpt2-adamw", "bert-sgdm-rs"])
def test_examples_then_audit_report(runs, run):
    tmp, url = runs
    out = tmp / f"{run}.html"
    printed = moxco_audit(run, "--store", url, "--out", str(out)).stdout
    summary = json.loads(out.with_suffix(".json").read_text())
    store = open_store(url)
    check_numbers_against_the_store(summary, store, run)
    for key, section in summary["sections"].items():
        assert section["verdict_line"] in printed
    if run == "bert-sgdm-rs":
        assert store.run(run).config["random_scaling"] is True
        assert summary["sections"]["descent_lemma"]["extra_verdicts"]["random_scaling_identity"]["verdict"] in ("holds", "fails")

    info = render(out, tmp / f"{run}.png")
    assert (tmp / f"{run}.png").stat().st_size > 10_000
    print(f"screenshot: {tmp / f'{run}.png'}")
    assert [p["plot"] for p in info["plots"]] == summary["plots"]
    assert len(summary["plots"]) >= 7  # loss, gaps, smoothness ×2, update_corr, cumsum, moxco
    assert unreadable(info) == []
    assert info["external"] == []  # self-contained
    assert "nan" not in info["text"].lower().split()
    for key, section in summary["sections"].items():
        assert info["verdicts"][key] == f"Verdict: {section['verdict_line']}"


@pytest.mark.slow
def test_compare_puts_the_runs_side_by_side(runs):
    tmp, url = runs
    out = tmp / "compare.html"
    moxco_audit("--compare", "gpt2-adamw", "bert-sgdm-rs", "--store", url, "--out", str(out), "--quiet")
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["runs"] == ["gpt2-adamw", "bert-sgdm-rs"]
    for run in summary["runs"]:
        single = summary["audits"][run]
        for key, line in summary["verdicts"].items():
            assert line[run] == single["verdicts"][key]
    info = render(out, tmp / "compare.png")
    plots = {p["plot"] for p in info["plots"]}
    assert plots >= {"loss", "avg_gap", "exp_smooth", "sharpness", "cumsum_update_corr", "running_mean_update_corr",
                     "cumsum_loss_diff", "goodness"}
    assert unreadable(info) == []
    # the configuration table: no empty row; what differs is marked, and it is what the runs were given
    rows = {row["key"]: row for row in info["config"]}
    assert rows and all(any(cell != "—" for cell in row["cells"]) for row in rows.values())
    assert rows["optimizer"]["cells"] == ["AdamW", "SGD"] and rows["optimizer"]["differs"]
    assert rows["lr"]["cells"] == ["0.001", "0.05"] and rows["lr"]["differs"]
    assert rows["random_scaling"]["cells"] == ["no", "yes"]
    assert rows["example"]["cells"] == ["gpt2", "bert"]
    assert not rows["reeval_every"]["differs"]
    assert [row["key"] for row in summary["configuration"]] == [row["key"] for row in info["config"]]


def test_unknown_run_lists_the_available_ones(runs):
    tmp, url = runs
    result = subprocess.run([sys.executable, "-m", "moxco.cli", "audit", "gpt3", "--store", url], capture_output=True,
                            text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 1
    assert "no run named 'gpt3'" in result.stderr
    assert "available runs: bert-sgdm-rs, gpt2-adamw" in result.stderr
