"""The audit's verdicts on tasks whose answer is known: convex sanity tasks (audit paper fig. 1 and
6: least squares, logistic regression) say "holds"; a path through a double-well's concave hump
says "fails"; the rules themselves on constructed series (docs/audit.md, "Verdict rules")."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer, load_diabetes
from torch import nn

import moxco.agent
from moxco.collector import open_store
from moxco.collector.audit.analysis import (
    DEGRADED, FAILS, HOLDS, NOT_APPLICABLE, NOT_MEASURED, RunData, StoreSource, audit, audit_descent,
    audit_global_convexity, audit_path_convexity, audit_smoothness, rank_correlation,
)
from tests.training import full_batch


def standardized(x: np.ndarray) -> torch.Tensor:
    return torch.tensor((x - x.mean(0)) / x.std(0), dtype=torch.float64)


def train(url, run, model, criterion, x, y, lr, steps, reference=None, probe_every=5):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    full_batch(model, opt, criterion, x, y, steps, url=url, run=run, reeval_every=1, probe_every=probe_every,
               reference=reference, seed=0, config={"dtype": "float64"})
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def two_run_audit(tmp_path, make_model, criterion, x, y, lr, steps):
    """The paper's two-run way: x* from a first run, then the audited run with reference=x*."""
    url = f"sqlite:///{tmp_path / 'convex.db'}"
    torch.manual_seed(0)
    x_star = train(url, "first", make_model(), criterion, x, y, lr, 3 * steps)
    torch.manual_seed(1)  # another initialisation: the audited path is not the first run's
    train(url, "audited", make_model(), criterion, x, y, lr, steps, reference=x_star)
    return audit(StoreSource(open_store(url)).load("audited"))


def test_least_squares_holds_everywhere(tmp_path):
    data = load_diabetes()
    x = standardized(data.data)
    y = torch.tensor(data.target, dtype=torch.float64).unsqueeze(1)
    y = (y - y.mean()) / y.std()
    design = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
    lr = 0.25 * 2 / float(torch.linalg.eigvalsh(2 * design.T @ design / len(x)).max())
    result = two_run_audit(tmp_path, lambda: nn.Linear(x.shape[1], 1).double(), nn.MSELoss(), x, y, lr, 60)
    assert result.section("path_convexity").verdict == HOLDS
    assert result.section("path_convexity").numbers["nonconvex_steps"] == 0
    assert result.section("global_convexity").verdict == HOLDS
    assert result.section("global_convexity").numbers["convexity_ratio"] > 1
    assert result.section("descent_lemma").verdict == HOLDS
    # on a quadratic inst_smooth = ‖A d‖/‖d‖ ≤ λ_max(A) = the sharpness (full batch, converged power iteration)
    smooth = result.section("smoothness")
    assert smooth.verdict in (HOLDS, DEGRADED), smooth.reading
    assert smooth.numbers["median_smooth_over_sharpness"] <= 1 + 1e-6


def test_logistic_regression_on_breast_cancer_holds(tmp_path):
    data = load_breast_cancer()
    x = standardized(data.data)
    y = torch.tensor(data.target, dtype=torch.float64).unsqueeze(1)
    result = two_run_audit(tmp_path, lambda: nn.Linear(x.shape[1], 1).double(), nn.BCEWithLogitsLoss(), x, y, 0.5, 60)
    for key in ("path_convexity", "global_convexity", "descent_lemma"):
        assert result.section(key).verdict == HOLDS, (key, result.section(key).reading)
    assert result.section("path_convexity").numbers["measured_steps"] == 59


class DoubleWell(nn.Module):
    """f(w) = (w² − 1)²: concave on |w| < 1/√3, convex outside."""

    def __init__(self, w0: float):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([w0], dtype=torch.float64))

    def forward(self, batch):
        return ((self.w**2 - 1) ** 2).sum() + 0.0 * batch.sum()


def test_a_path_over_the_double_well_hump_fails(tmp_path):
    url = f"sqlite:///{tmp_path / 'dw.db'}"
    model = DoubleWell(0.05)  # starts on the hump and rolls down into the well at w = 1
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    agent = moxco.agent.attach(model, opt, url=url, run="dw", reeval_every=1, probe_every=0,
                               config={"dtype": "float64"})
    for _ in range(60):
        model(torch.zeros(1, dtype=torch.float64)).backward()
        opt.step()
        opt.zero_grad()
    agent.close()
    store = open_store(url)
    section = audit(StoreSource(store).load("dw")).section("path_convexity")
    assert section.verdict == FAILS
    # the non-convex steps are exactly those taken inside the concave region |w| < 1/√3
    gaps = store.series("dw", "inst_gap")[1]
    assert section.numbers["nonconvex_steps"] == int((gaps > 0).sum()) > 0
    assert "falsifies convexity" in section.reading


def test_the_same_path_started_in_the_well_holds(tmp_path):
    url = f"sqlite:///{tmp_path / 'dw.db'}"
    model = DoubleWell(1.5)  # convex region only
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    agent = moxco.agent.attach(model, opt, url=url, run="dw", reeval_every=1, probe_every=0,
                               config={"dtype": "float64"})
    for _ in range(40):
        model(torch.zeros(1, dtype=torch.float64)).backward()
        opt.step()
        opt.zero_grad()
    agent.close()
    assert audit(StoreSource(open_store(url)).load("dw")).section("path_convexity").verdict == HOLDS


# --- the rules on constructed series ---------------------------------------------------------------


def series(**named):
    return {k: (np.arange(len(v), dtype=np.int64) if s is None else np.asarray(s), np.asarray(v, dtype=float))
            for k, (s, v) in ((k, (None, v) if not isinstance(v, tuple) else v) for k, v in named.items())}


def test_convexity_ratio_readings():
    for ratio, verdict, K in ((2.5, HOLDS, None), (0.25, DEGRADED, 0.25), (-0.4, FAILS, None), (math.inf, HOLDS, None)):
        section = audit_global_convexity(RunData("r", series(convexity_ratio=[0.9, 0.5, ratio])))
        assert (section.verdict, section.K) == (verdict, K)
    degraded = audit_global_convexity(RunData("r", series(convexity_ratio=[0.25])))
    assert degraded.verdict_line == ("holds with degradation K = 0.25 (bounds 4x looser): convexity_ratio = 0.25 over "
                                     "1 probes ∈ (0, 1]")
    assert audit_global_convexity(RunData("r", {})).verdict == NOT_MEASURED
    assert "reference" in audit_global_convexity(RunData("r", {})).verdict_line


def test_gap_tolerance_scales_with_the_dtype():
    # a gap of 1e-9 on losses of order 1 is float32 rounding, but a real gap in float64
    run = {"loss": [1.0, 1.0, 1.0], "loss_diff": [-1e-3, -1e-3, -1e-3], "inst_gap": [-1e-4, 1e-9, -1e-4]}
    assert audit_path_convexity(RunData("r", series(**run), config={"dtype": "float32"})).verdict == HOLDS
    assert audit_path_convexity(RunData("r", series(**run), config={"dtype": "float64"})).verdict == FAILS
    assert audit_path_convexity(RunData("r", series(**run)), dtype="float64").verdict == FAILS
    assert audit_path_convexity(RunData("r", {})).verdict == NOT_MEASURED


def test_smoothness_rules():
    steps = np.arange(1, 41)
    sharp_steps = np.arange(4, 41, 4)
    level = np.linspace(1, 10, sharp_steps.size)
    smooth = np.repeat(level, 4)  # inst_smooth equal to the sharpness of its interval's probe
    run = lambda factor, sharp: RunData("r", series(inst_smooth=(steps, smooth * factor), sharpness=(sharp_steps, sharp)))
    assert audit_smoothness(run(1.0, level)).verdict == HOLDS
    scaled = audit_smoothness(run(0.1, level))
    assert scaled.verdict == DEGRADED and scaled.K == pytest.approx(0.1)
    assert audit_smoothness(run(1.0, level[::-1])).verdict == FAILS  # anti-correlated
    assert audit_smoothness(RunData("r", series(inst_smooth=(steps, smooth)))).verdict == NOT_MEASURED
    assert rank_correlation(np.array([1, 2, 3, 4.0]), np.array([10, 20, 30, 35.0])) == pytest.approx(1.0)


def test_descent_and_random_scaling_rules():
    rng = np.random.default_rng(0)
    progress = -0.01 + 0.001 * rng.standard_normal(200)
    # with random scaling, update_corr_rs and loss_diff are two unbiased estimates of the same progress
    rs = RunData("r", series(update_corr=progress + 0.02, update_corr_rs=progress + 0.001 * rng.standard_normal(200),
                             loss_diff=progress), config={"random_scaling": True})
    section = audit_descent(rs)
    assert section.verdict == FAILS  # mean update_corr = +0.01 > 0
    assert section.extra_verdicts["random_scaling_identity"]["verdict"] == HOLDS
    biased = RunData("r", series(update_corr=progress, update_corr_rs=progress + 0.005, loss_diff=progress),
                     config={"random_scaling": True})
    assert audit_descent(biased).verdict == HOLDS
    assert audit_descent(biased).extra_verdicts["random_scaling_identity"]["verdict"] == FAILS
    no_rs = audit_descent(RunData("r", series(update_corr=progress, update_corr_rs=progress, loss_diff=progress)))
    assert no_rs.extra_verdicts["random_scaling_identity"]["verdict"] == NOT_APPLICABLE
