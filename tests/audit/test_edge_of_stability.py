"""The audit's edge of stability: the sharpness against its edge, with the preconditioned pair
beside the plain one for Adam-family runs (docs/audit.md, "Smoothness and sharpness").

* an Adam run recorded by the agent (full-batch Adam on a small tanh network, probes every 3 steps):
  the JSON and the HTML carry the preconditioned pair's ratio statistics, recomputed here from the
  stored points with NumPy, its plot and a verdict that names the preconditioned pair as the yardstick;
* an Adam run whose plain λ_max hovers at 2/η while λ_max(P⁻¹H) stays far below its edge is not
  "at the edge of stability": the yardstick of an Adam-family optimizer is the preconditioned pair;
* an SGD run has nothing about the preconditioned pair (no number, no panel, no word);
* an Adam run without the preconditioned series says so instead of judging the plain pair;
* the share of probes with negative curvature (λ_min < 0), and the median's interval itself.
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch
from sklearn.datasets import load_digits

from moxco.collector import open_store
from moxco.collector.audit.analysis import FAILS, HOLDS, INCONCLUSIVE, NOT_MEASURED, RunData, audit_smoothness
from moxco.collector.audit.stability import EOS_BAND, MIN_PROBES
from moxco.collector.audit.stats import median_interval
from tests.audit.browser import render, unreadable
from tests.audit.test_misreports import cli_audit, no_nan, store_run
from tests.training import full_batch

BETA1, LR = 0.9, 0.01


def independent(steps_a, a, steps_b, b, start, scale=1.0):
    """The ratio statistics of a pair over the probes at or after ``start``, from the raw points."""
    common = sorted(set(steps_a.tolist()) & set(steps_b.tolist()))
    da, db = dict(zip(steps_a.tolist(), a.tolist())), dict(zip(steps_b.tolist(), b.tolist()))
    late = np.array([da[s] / (db[s] / scale) for s in common if s >= start and math.isfinite(da[s])
                     and math.isfinite(db[s]) and db[s] > 0])
    n = late.size
    ordered = np.sort(late)
    # the 2-SE distribution-free interval of a median: order statistics around rank n/2 ± √n (z = 2)
    low = ordered[max(0, int(math.floor(n / 2 - math.sqrt(n))) - 1)]
    high = ordered[min(n, int(math.ceil(1 + n / 2 + math.sqrt(n)))) - 1]
    return {"probes": n, "median": float(np.median(late)), "q25": float(np.percentile(late, 25)),
            "q75": float(np.percentile(late, 75)), "above": float(np.mean(late > 1)), "low": float(low),
            "high": float(high)}


def expected_verdict(stats):
    if stats["probes"] < MIN_PROBES:
        return INCONCLUSIVE
    if stats["low"] >= 1 / EOS_BAND and stats["high"] <= EOS_BAND:
        return HOLDS
    if stats["high"] < 1 / EOS_BAND or stats["low"] > EOS_BAND:
        return FAILS
    return INCONCLUSIVE


def cell(html, key):
    """The text of the report's number cell ``data-key=key``."""
    marker = f"data-key='{key}'>"
    assert marker in html, key
    start = html.index(marker) + len(marker)
    return html[start:html.index("<", start)]


def close(reported, value):
    assert reported is not None and math.isclose(reported, value, rel_tol=1e-12, abs_tol=1e-15), (reported, value)


# --- an Adam run recorded by the agent ------------------------------------------------------------


def adam_run(url, run, steps=45, probe_every=3):
    data = load_digits()
    x = torch.tensor(data.data[:128], dtype=torch.float32) / 16.0
    x = x - x.mean(dim=0)
    y = torch.nn.functional.one_hot(torch.tensor(data.target[:128]), 10).float()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10))
    opt = torch.optim.Adam(model.parameters(), lr=LR, betas=(BETA1, 0.999))

    full_batch(model, opt, torch.nn.MSELoss(), x, y, steps, url=url, run=run, reeval_every=1, probe_every=probe_every,
               seed=0)


def test_an_adam_run_reports_the_preconditioned_pair_beside_the_plain_one(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'adam.db'}"
    adam_run(url, "adam")
    summary, html, printed = cli_audit(tmp_path, url, "adam", capsys)
    with open_store(url) as store:
        series = {m: tuple(np.asarray(a) for a in store.series("adam", m))
                  for m in ("loss", "sharpness", "sharpness_target", "sharpness_precond", "sharpness_precond_target")}
    loss_steps = series["loss"][0]
    start = loss_steps.min() + (loss_steps.max() - loss_steps.min()) / 2
    precond = independent(*series["sharpness_precond"], *series["sharpness_precond_target"], start)
    plain = independent(*series["sharpness"], *series["sharpness_target"], start)
    assert precond["probes"] >= MIN_PROBES and plain["probes"] >= MIN_PROBES
    # the stored target is the adaptive edge of Adam's β₁ and η: 38/η
    assert np.allclose(series["sharpness_precond_target"][1], 2 * (1 + BETA1) / ((1 - BETA1) * LR))

    eos = summary["sections"]["smoothness"]["extra_verdicts"]["edge_of_stability"]
    assert eos["yardstick"] == "precond"
    for prefix, stats in (("precond", precond), ("plain", plain)):
        assert eos[f"{prefix}_second_half_probes"] == stats["probes"]
        close(eos[f"{prefix}_median_ratio"], stats["median"])
        close(eos[f"{prefix}_ratio_q25"], stats["q25"])
        close(eos[f"{prefix}_ratio_q75"], stats["q75"])
        close(eos[f"{prefix}_fraction_above_edge"], stats["above"])
        close(eos[f"{prefix}_median_ratio_low"], stats["low"])
        close(eos[f"{prefix}_median_ratio_high"], stats["high"])
        # the report shows the same numbers
        assert cell(html, f"smoothness.edge_of_stability.{prefix}_median_ratio") == f"{stats['median']:.4g}"
        assert cell(html, f"smoothness.edge_of_stability.{prefix}_ratio_q75") == f"{stats['q75']:.4g}"
    close(eos["precond_final_edge"], 2 * (1 + BETA1) / ((1 - BETA1) * LR))
    assert eos["verdict"] == expected_verdict(precond)
    assert "Adam-family, so the yardstick is the preconditioned pair" in eos["verdict_line"]
    assert f"median λ_max(P⁻¹H) / (2(1+β₁)/((1−β₁)η)) = {precond['median']:.3g}" in eos["verdict_line"]
    assert "is not the yardstick for an Adam-family optimizer" in eos["verdict_line"]
    assert "edge of stability (Cohen et al. 2022)" in html
    assert "edge_of_stability" in summary["plots"] and "data-plot='edge_of_stability'" in html
    assert "λ_max(P⁻¹H) at 2(1+β₁)/((1−β₁)η)" in summary["sections"]["smoothness"]["reading"]
    assert no_nan(eos["verdict_line"]) and no_nan(html)
    # drawn in Chromium: the plain and the preconditioned pair, one panel each, every axis readable
    info = render(tmp_path / "adam.html", tmp_path / "adam.png")
    [plot] = [p for p in info["plots"] if p["plot"] == "edge_of_stability"]
    assert sum(axes["panel"] for axes in plot["axes"]) == 2
    assert unreadable(info) == []


# --- constructed runs -------------------------------------------------------------------------------


def probes(n=40, every=5):
    return np.arange(every, every * n + 1, every)


def adam_config(**extra):
    return {"optimizer": "AdamW", "probe_every": 5, "reeval_every": 1, "curvature": {"sharpness_precond": True},
            "goodness": {"k": 1.0, "sharpness_target": None, "sharpness": "plain"}, **extra}


def test_a_plain_sharpness_at_2_over_eta_does_not_put_an_adam_run_at_the_edge(tmp_path, capsys):
    """The plain λ_max hovers at 2/η (a plain-pair reading would say "at the edge"); λ_max(P⁻¹H) is a
    quarter of 38/η: the run is below its edge of stability, and the report says which pair decides."""
    rng = np.random.default_rng(0)
    s = probes()
    edge, adaptive = 2 / LR, 2 * (1 + BETA1) / ((1 - BETA1) * LR)
    series = {"loss": (np.arange(0, 201), np.linspace(2, 1, 201)),
              "sharpness": (s, edge * (1 + 0.03 * rng.standard_normal(s.size))),
              "sharpness_target": (s, np.full(s.size, edge)),
              "sharpness_precond": (s, adaptive * (0.25 + 0.02 * rng.standard_normal(s.size))),
              "sharpness_precond_target": (s, np.full(s.size, adaptive))}
    store_run(f"sqlite:///{tmp_path / 'a.db'}", "adamw", adam_config(), series)
    summary, html, _ = cli_audit(tmp_path, f"sqlite:///{tmp_path / 'a.db'}", "adamw", capsys)
    eos = summary["sections"]["smoothness"]["extra_verdicts"]["edge_of_stability"]
    precond = independent(*series["sharpness_precond"], *series["sharpness_precond_target"], 100)
    plain = independent(*series["sharpness"], *series["sharpness_target"], 100)
    assert expected_verdict(plain) == HOLDS  # what the plain pair alone would have claimed
    assert eos["verdict"] == FAILS and "not at the edge of stability" in eos["verdict_line"]
    close(eos["precond_median_ratio"], precond["median"])
    close(eos["plain_median_ratio"], plain["median"])
    assert f"the plain λ_max / λ_EOS (median {plain['median']:.3g}) is not the yardstick" in eos["verdict_line"]


def test_an_adam_run_hovering_at_its_adaptive_edge_holds(tmp_path, capsys):
    rng = np.random.default_rng(1)
    s = probes()
    adaptive = 2 * (1 + BETA1) / ((1 - BETA1) * LR)
    series = {"loss": (np.arange(0, 201), np.linspace(2, 1, 201)),
              "sharpness": (s, 0.04 * (2 / LR) * np.ones(s.size)), "sharpness_target": (s, np.full(s.size, 2 / LR)),
              "sharpness_precond": (s, adaptive * np.minimum(0.97 + 0.03 * rng.standard_normal(s.size), 1.05)),
              "sharpness_precond_target": (s, np.full(s.size, adaptive))}
    store_run(f"sqlite:///{tmp_path / 'a.db'}", "adamw", adam_config(), series)
    summary, _, _ = cli_audit(tmp_path, f"sqlite:///{tmp_path / 'a.db'}", "adamw", capsys)
    eos = summary["sections"]["smoothness"]["extra_verdicts"]["edge_of_stability"]
    assert eos["verdict"] == HOLDS and "at the edge of stability" in eos["verdict_line"]
    close(eos["precond_median_ratio"], independent(*series["sharpness_precond"],
                                                   *series["sharpness_precond_target"], 100)["median"])


def test_an_sgd_run_has_nothing_about_the_preconditioned_pair(tmp_path, capsys):
    rng = np.random.default_rng(2)
    s = probes()
    k = 0.5  # goodness's multiplier: the stored target is k·λ_EOS, the edge is target / k
    series = {"loss": (np.arange(0, 201), np.linspace(2, 1, 201)), "inst_smooth": (np.arange(1, 201), np.ones(200)),
              "sharpness": (s, 20.0 * (1.02 + 0.02 * rng.standard_normal(s.size))),
              "sharpness_target": (s, np.full(s.size, k * 20.0))}
    config = {"optimizer": "SGD", "probe_every": 5, "reeval_every": 1,
              "curvature": {"sharpness_precond": False}, "goodness": {"k": k, "sharpness_target": None}}
    store_run(f"sqlite:///{tmp_path / 's.db'}", "sgd", config, series)
    summary, html, _ = cli_audit(tmp_path, f"sqlite:///{tmp_path / 's.db'}", "sgd", capsys)
    section = summary["sections"]["smoothness"]
    eos = section["extra_verdicts"]["edge_of_stability"]
    plain = independent(*series["sharpness"], *series["sharpness_target"], 100, scale=k)
    assert eos["yardstick"] == "plain" and eos["verdict"] == expected_verdict(plain) == HOLDS
    close(eos["plain_median_ratio"], plain["median"])
    assert "precond" not in json.dumps(section)
    for word in ("precond", "P⁻¹H", "Adam", "β₁"):
        assert word not in html, word
    info = render(tmp_path / "sgd.html", tmp_path / "sgd.png")
    [plot] = [p for p in info["plots"] if p["plot"] == "edge_of_stability"]
    assert sum(axes["panel"] for axes in plot["axes"]) == 1


def test_an_adam_run_without_the_preconditioned_series_says_so(tmp_path, capsys):
    s = probes()
    series = {"loss": (np.arange(0, 201), np.linspace(2, 1, 201)),
              "sharpness": (s, np.full(s.size, 2 / LR)), "sharpness_target": (s, np.full(s.size, 2 / LR))}
    store_run(f"sqlite:///{tmp_path / 'a.db'}", "adam", adam_config(optimizer="Adam",
                                                                     curvature={"sharpness_precond": False}), series)
    summary, html, _ = cli_audit(tmp_path, f"sqlite:///{tmp_path / 'a.db'}", "adam", capsys)
    eos = summary["sections"]["smoothness"]["extra_verdicts"]["edge_of_stability"]
    assert eos["verdict"] == NOT_MEASURED
    assert "Adam-family: its edge of stability is λ_max(P⁻¹H)" in eos["cause"]
    assert "sharpness_precond=False" in eos["cause"]
    assert "is not the yardstick for an Adam-family optimizer" in eos["cause"]
    assert not any(k.startswith("precond_") for k in eos)


def test_the_share_of_probes_with_negative_curvature():
    s = probes(12)
    low = np.array([-0.5, 0.1, -0.02, 0.3, np.nan, -1.0, 0.2, 0.2, 0.0, -0.1, 0.4, 0.5])
    run = RunData("r", {"sharpness_min": (s, low), "sharpness": (s, np.ones(s.size))}, config={"optimizer": "SGD"})
    section = audit_smoothness(run)
    finite = low[np.isfinite(low)]
    assert section.numbers["sharpness_min_probes"] == finite.size == 11
    assert section.numbers["negative_curvature_probes"] == 4
    assert section.numbers["fraction_negative_curvature"] == 4 / 11
    assert "λ_min < 0 (negative curvature) at 4 of the 11 probes" in section.reading
    assert "fraction_negative_curvature" not in audit_smoothness(RunData("r", {"sharpness": (s, np.ones(s.size))})).numbers


def test_the_median_interval_covers_the_median_at_two_standard_errors():
    """Over many samples of a symmetric distribution the interval holds the true median (0) about
    95 % of the time (2 SE; order statistics make it a little wider), and with 5 values it is the range."""
    rng = np.random.default_rng(3)
    covered = np.mean([lo <= 0 <= hi for lo, hi in (median_interval(rng.standard_normal(41)) for _ in range(2000))])
    assert 0.94 <= covered <= 0.99, covered
    values = rng.standard_normal(5)
    assert median_interval(values) == (values.min(), values.max())
    assert all(math.isnan(v) for v in median_interval(np.zeros(0)))
