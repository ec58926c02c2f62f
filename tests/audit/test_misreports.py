"""The audit's verdicts say no more than their evidence: each case here was once misreported.

* a descent-lemma mean 0.226 standard errors from 0 is inconclusive, not "holds";
* smoothness against a sharpness that moved by ×2.04 with ρ = 0.04 is inconclusive, not "fails";
* an operator's decision is credited to the operator, never to the policy, and no NaN is printed;
* "not measured" / "not applicable" name the actual cause (the agent's stored error, negative
  sharpness values, an optimizer that is not MoXCo, no reference), and the agent's stored errors
  head the report;
* no sentence of any audit contains "nan".

Runs are written into a real SQLite store and audited through ``moxco audit`` (the CLI), so what
is checked is what a reader gets: the printed verdicts, the JSON summary and the HTML report.
"""

from __future__ import annotations

import json
import math
import re
from html import escape

import numpy as np
import pytest

from moxco.cli import main
from moxco.collector import open_store
from moxco.collector.audit.analysis import (
    FAILS, HOLDS, INCONCLUSIVE, NOT_APPLICABLE, NOT_MEASURED, RunData, audit, audit_descent, audit_smoothness,
    rank_correlation,
)
from moxco.wire import Point
from moxco.decision import Decision

MOXCO_POLICY = {"threshold": 0.85, "min_step": 1_000_000, "consecutive": 3, "cooldown": 0, "max_decisions": 1,
                "action": {"phase": 2, "alpha": 0.1, "beta": 0.1}}


def store_run(url, name, config, series, *, operator=None):
    """A run as the agent leaves it: its config and series in a store (and an operator's decision)."""
    with open_store(url) as store:
        store.put_run(name, config=config)
        points = [Point(int(s), metric, float(v), 0.0) for metric, (steps, values) in series.items()
                  for s, v in zip(steps, values)]
        store.ingest(name, points)
        if operator is not None:
            store.add_decision(name, Decision(operator["step"], operator["action"], source="operator",
                                              issued_by="alice", reason=operator["reason"]))
        store.set_status(name, "finished")


def cli_audit(tmp_path, url, run, capsys):
    out = tmp_path / f"{run}.html"
    code = main(["audit", run, "--store", url, "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(out.with_suffix(".json").read_text()), out.read_text(), captured.out


def no_nan(text: str) -> bool:
    return re.search(r"\bnan\b", text, flags=re.IGNORECASE) is None


def steps_of(n, start=1):
    return np.arange(start, start + n)


# --- 1. the descent lemma at 0.226 standard errors ------------------------------------------------


def not_significant_update_corr(n=400, z=-0.226, seed=0):
    """Most steps slightly positive (median ≈ +1.4e-5), 39 % strongly negative, the mean ``z``
    standard errors (successive differences) from 0."""
    rng = np.random.default_rng(seed)
    negative = rng.random(n) < 0.39
    values = np.where(negative, -np.abs(rng.normal(0, 3.9e-5, n)), np.abs(rng.normal(2e-5, 1e-5, n)))
    se = math.sqrt(np.sum(np.diff(values) ** 2) / (2 * (n - 1)) / n)
    return values + (z * se - values.mean())  # a shift leaves successive differences unchanged


def test_a_descent_lemma_mean_not_significant_at_2_se_is_inconclusive():
    corr = not_significant_update_corr()
    assert 0.35 < (corr < 0).mean() < 0.45 and np.median(corr) > 0
    section = audit_descent(RunData("r", {"update_corr": (steps_of(corr.size), corr)}))
    assert section.verdict == INCONCLUSIVE, section.verdict_line
    assert "0.226 standard errors from 0" in section.verdict_line
    assert "not significant at 2 SE" in section.verdict_line
    # the same noise, shifted to 3 standard errors either side, decides
    for z, verdict in ((-3.0, HOLDS), (3.0, FAILS)):
        shifted = not_significant_update_corr(z=z)
        assert audit_descent(RunData("r", {"update_corr": (steps_of(shifted.size), shifted)})).verdict == verdict


def test_a_full_batch_run_whose_every_step_descends_holds():
    # GD on a quadratic: update_corr negative at every step, decaying geometrically; the decay is no noise
    corr = -0.1 * 0.8 ** np.arange(60)
    section = audit_descent(RunData("r", {"update_corr": (steps_of(60), corr)}))
    assert section.verdict == HOLDS, section.verdict_line


# --- 2. smoothness over a small sharpness range ---------------------------------------------------


def smoothness_run(sharpness, smooth_levels, every=10):
    """inst_smooth constant at each probe interval's level; the sharpness at each probe."""
    probes = np.arange(every, every * (len(sharpness) + 1), every)
    steps = np.arange(1, probes[-1] + 1)
    smooth = np.repeat(np.asarray(smooth_levels, dtype=float), every)
    return RunData("r", {"inst_smooth": (steps, smooth), "sharpness": (probes, np.asarray(sharpness, dtype=float))})


def test_smoothness_over_a_small_sharpness_range_is_inconclusive():
    sharpness = np.linspace(1.0, 2.04, 12)
    order = np.array([6, 2, 9, 0, 11, 4, 7, 1, 10, 3, 8, 5])  # ρ ≈ 0.04 against the sharpness
    smooth = 0.674 * np.median(sharpness) * (1 + 0.1 * (order - 5.5) / 5.5)
    rho = rank_correlation(smooth, sharpness)
    assert abs(rho) < 0.1
    section = audit_smoothness(smoothness_run(sharpness, smooth))
    assert section.numbers["sharpness_range"] == pytest.approx(2.04)
    assert 0.5 <= section.numbers["median_smooth_over_sharpness"] <= 2
    assert section.verdict == INCONCLUSIVE, section.verdict_line
    assert "less than ×3" in section.verdict_line and "Spearman ρ" in section.verdict_line


def test_smoothness_that_does_not_move_with_a_sharpness_that_moved_tenfold_fails():
    rng = np.random.default_rng(1)
    sharpness = np.geomspace(1.0, 10.0, 30)
    smooth = 3.0 * (1 + 0.05 * rng.standard_normal(30))  # flat: no co-movement at all
    section = audit_smoothness(smoothness_run(sharpness, smooth))
    assert section.verdict == FAILS, section.verdict_line
    assert section.numbers["rank_correlation_high"] < 0.5


def test_smoothness_with_four_pairs_is_inconclusive_not_judged_on_the_ratio():
    section = audit_smoothness(smoothness_run([1.0, 3.0, 5.0, 10.0], [10.0, 1.0, 6.0, 2.0]))
    assert section.verdict == INCONCLUSIVE
    assert "too few for a rank correlation" in section.verdict_line


# --- 3. who decided --------------------------------------------------------------------------------


def test_an_operator_decision_is_attributed_to_the_operator(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    probes = np.arange(0, 430, 10)
    goodness = 0.2 + 0.3 * probes / probes[-1]  # never reaches C = 0.85
    store_run(url, "op", {"optimizer": "MoXCo", "policy": MOXCO_POLICY, "probe_every": 10, "reeval_every": 0},
              {"loss": (np.arange(430), np.linspace(2, 1, 430)), "goodness": (probes, goodness)},
              operator={"action": {"phase": 2, "alpha": 0.1, "beta": 0.1}, "step": 421,
                        "reason": "issued with token 'alice'"})
    summary, html, printed = cli_audit(tmp_path, url, "op", capsys)
    moxco = summary["sections"]["moxco"]
    assert moxco["verdict"] == FAILS  # an operator's decision is no evidence of the goodness criterion
    assert "the policy decided" not in html and "the policy decided" not in printed
    decision = moxco["numbers"]["decisions"][0]
    assert decision["source"] == "operator" and decision["step"] == 421
    assert decision["line"].startswith("operator ") and "at step 421" in decision["line"]
    assert "issued with token 'alice'" in decision["line"]
    assert any(line.startswith("operator ") for line in summary["summary"])  # said before the verdicts
    assert no_nan(html) and no_nan(json.dumps(moxco["reading"])) and no_nan(printed)


def test_a_policy_decision_names_the_policy_and_its_goodness():
    steps = np.arange(0, 100, 10)
    score = np.array([0.2, 0.5, 0.9, 0.91, 0.92, 0.93, 0.9, 0.9, 0.9, 0.9])
    decision = Decision(40, source="policy", goodness=0.92, policy=MOXCO_POLICY, run="p").acknowledged(41, 0.0)
    run = RunData("p", {"goodness": (steps, score)}, config={"optimizer": "MoXCo", "policy": MOXCO_POLICY},
                  decisions=[decision])
    section = audit(run).section("moxco")
    assert section.verdict == HOLDS
    assert "the policy decided phase=2, alpha=0.1, beta=0.1 at step 40 (goodness 0.920 ≥ C = 0.85)" in section.test
    assert "applied at step 41" in section.reading



def test_the_moxco_section_says_whether_decision_timing_is_reproducible():
    """``decision_timing`` (``moxco.decision.reproducibility``) and one sentence: a sync run's policy
    decision applied at its ``apply_at`` is reproducible with the same seed; one applied late after a
    timed-out wait, or one from an async run, is not."""
    steps = np.arange(0, 100, 10)
    score = np.full(steps.size, 0.95)
    on_time = Decision(40, goodness=0.95, policy=MOXCO_POLICY, run="p", apply_at=43).acknowledged(43, 0.0)
    late = Decision(40, goodness=0.95, policy=MOXCO_POLICY, run="p", apply_at=43).acknowledged(50, 0.0)
    sync = {"mode": "sync", "timeouts": 1}
    readings = {}
    for name, mode, decision, reproducible in (("on time", sync, on_time, True), ("late", sync, late, False),
                                               ("async", {"mode": "async"}, on_time, False)):
        run = RunData("p", {"goodness": (steps, score)}, decisions=[decision],
                      config={"optimizer": "MoXCo", "policy": MOXCO_POLICY, "decisions": mode})
        section = audit(run).section("moxco")
        assert section.numbers["decision_timing"]["reproducible"] is reproducible
        assert ("Decision timing is reproducible with the same seed" in section.reading) is reproducible
        readings[name] = section.reading
    assert "7 step(s) after its apply_at 43" in readings["late"] and "timed out" in readings["late"]
    assert "asynchronous" in readings["async"]

# --- 4. the true causes ----------------------------------------------------------------------------


def test_not_measured_names_the_agents_stored_error_and_the_report_leads_with_it(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    error = "RuntimeError: the replay's forward raised: shape mismatch"
    store_run(url, "failed", {"optimizer": "SGD", "reeval_every": 1, "probe_every": 10, "errors": {"reeval": error}},
              {"loss": (np.arange(50), np.linspace(2, 1, 50)), "update_corr": (steps_of(49), -np.ones(49))})
    summary, html, printed = cli_audit(tmp_path, url, "failed", capsys)
    path = summary["sections"]["path_convexity"]
    assert path["verdict"] == NOT_MEASURED
    assert error in path["verdict_line"] and "reeval_every" not in path["verdict_line"]
    assert error in summary["sections"]["smoothness"]["verdict_line"]
    assert summary["agent_errors"] == {"reeval": error}
    assert summary["summary"][0] == f"the agent disabled its reeval metrics after an error: {error}"
    assert html.index(escape(error)) < html.index("class='summary'")  # before the verdict table


def test_smoothness_not_measured_names_negative_sharpness_values(tmp_path, capsys):
    # a Hugging Face run with reeval_every=1 and 3 probes whose power iteration found negative eigenvalues
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    store_run(url, "hf", {"optimizer": "AdamW", "reeval_every": 1, "probe_every": 4, "integration": "transformers.Trainer"},
              {"loss": (np.arange(12), np.linspace(2, 1, 12)), "inst_smooth": (steps_of(11), np.full(11, 3.0)),
               "sharpness": (np.array([4, 8, 11]), np.array([-2.0, -1.5, -0.7]))})
    summary, _, _ = cli_audit(tmp_path, url, "hf", capsys)
    line = summary["sections"]["smoothness"]["verdict_line"]
    assert summary["sections"]["smoothness"]["verdict"] == NOT_MEASURED
    assert "3 of the 3 paired sharpness probes are ≤ 0" in line and "negative sharpness values" in line
    assert "reeval_every" not in line and "probe_every=" not in line


def test_moxco_is_not_applicable_to_an_adamw_run_and_no_reference_is_named(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    probes = np.arange(0, 100, 10)
    store_run(url, "adamw", {"optimizer": "AdamW", "policy": {**MOXCO_POLICY, "min_step": 0}, "reeval_every": 1,
                             "probe_every": 10, "reference": False},
              {"loss": (np.arange(100), np.linspace(2, 1, 100)), "goodness": (probes, np.full(10, 0.1))})
    summary, _, _ = cli_audit(tmp_path, url, "adamw", capsys)
    moxco = summary["sections"]["moxco"]
    assert moxco["verdict"] == NOT_APPLICABLE
    assert moxco["verdict_line"].startswith("not applicable: the optimizer is AdamW, not MoXCo")
    glob = summary["sections"]["global_convexity"]
    assert glob["verdict"] == NOT_MEASURED and "no reference x* was given" in glob["verdict_line"]


# --- 5. no NaN in prose ---------------------------------------------------------------------------


@pytest.mark.parametrize("series", [
    {},
    {"loss": (np.arange(3), np.full(3, np.nan))},
    {"loss": (np.arange(5), np.ones(5)), "update_corr": (steps_of(1), np.array([0.3]))},
    {"update_corr": (steps_of(4), np.array([np.nan, 1.0, np.nan, -1.0])),
     "inst_gap": (steps_of(4), np.full(4, np.nan)), "sharpness": (np.array([2, 4]), np.array([np.nan, 1.0]))},
    {"goodness": (np.arange(4), np.array([0.1, np.nan, 0.95, 0.96])),
     "inst_smooth": (steps_of(9), np.full(9, 2.0)), "sharpness": (np.array([3, 6, 9]), np.array([2.0, 2.0, 2.0]))},
], ids=["empty", "nan-loss", "one-step", "all-nan-gaps", "goodness-with-nan"])
def test_no_sentence_of_an_audit_says_nan(series):
    decisions = [Decision(2, source="operator", issued_by="alice", run="r")]
    result = audit(RunData("r", series, config={"optimizer": "MoXCo"}, decisions=decisions))
    for section in result.sections:
        for text in (section.verdict_line, section.reading, section.test, section.cause):
            assert no_nan(text), (section.key, text)
        for extra in section.extra_verdicts.values():
            assert no_nan(extra["verdict_line"]), extra
    assert all(no_nan(line) for line in result.summary)
