"""Convex sanity tasks (audit paper fig. 1, fig. 6): full-batch GD on least squares and logistic
regression. Convexity means inst_gap ≤ 0 at every step (up to float error); steady descent means
a negative mean update correlation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer, load_diabetes
from torch import nn

import moxco.agent
from moxco.collector import open_store
from tests.training import full_batch


def standardized(x: np.ndarray) -> torch.Tensor:
    x = (x - x.mean(0)) / x.std(0)
    return torch.tensor(x, dtype=torch.float64)


def run_full_batch(tmp_path, model, criterion, x, y, lr, steps, run):
    url = f"sqlite:///{tmp_path / 'convex.db'}"
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    full_batch(model, opt, criterion, x, y, steps, url=url, run=run, reeval_every=1, probe_every=10)
    return open_store(url)


# below ηλ = 1 every eigen-direction contracts without overshoot, so each ⟨∇F(x_{t+1}), x_{t+1} − x_t⟩
# = −ηλ²(1 − ηλ)·(coordinate)² is negative; between 1/λ and 2/λ GD still converges but overshoots
# along the top direction and the update correlation can be positive (as the audit paper notes)
@pytest.mark.parametrize("fraction_of_eos", [0.25, 0.45])
def test_least_squares_on_diabetes(tmp_path, fraction_of_eos):
    data = load_diabetes()
    x, y = standardized(data.data), torch.tensor(data.target, dtype=torch.float64).unsqueeze(1)
    y = (y - y.mean()) / y.std()
    design = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
    hessian_max = float(torch.linalg.eigvalsh(2 * design.T @ design / len(x)).max())  # of MSE loss
    lr = fraction_of_eos * 2 / hessian_max  # stable GD: below the edge of stability 2/λ
    model = nn.Linear(x.shape[1], 1).double()
    store = run_full_batch(tmp_path, model, nn.MSELoss(), x, y, lr, 150, "lsq")
    gaps = store.series("lsq", "inst_gap")[1]
    losses = store.series("lsq", "loss")[1]
    scale = np.abs(losses).max()
    assert np.all(gaps <= 1e-12 * scale), gaps.max()
    assert store.series("lsq", "update_corr")[1].mean() < 0
    assert losses[-1] < losses[0]


def test_logistic_regression_on_breast_cancer(tmp_path):
    data = load_breast_cancer()
    x, y = standardized(data.data), torch.tensor(data.target, dtype=torch.float64).unsqueeze(1)
    model = nn.Linear(x.shape[1], 1).double()
    store = run_full_batch(tmp_path, model, nn.BCEWithLogitsLoss(), x, y, 0.5, 200, "logreg")
    gaps = store.series("logreg", "inst_gap")[1]
    assert np.all(gaps <= 1e-12), gaps.max()
    assert store.series("logreg", "update_corr")[1].mean() < 0
    # the smoothness of logistic loss is bounded by λ_max(XᵀX)/(4n): inst_smooth respects it
    bound = float(torch.linalg.eigvalsh(torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1).T
                                        @ torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)).max()) / (4 * len(x))
    assert store.series("logreg", "max_smooth")[1][-1] <= bound * (1 + 1e-9)


def test_a_double_well_path_is_flagged_non_convex(tmp_path):
    """A 1-D double-well f(w) = (w² − 1)² crossed from the hump: positive inst_gap appears."""

    class DoubleWell(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor([0.05], dtype=torch.float64))

        def forward(self, batch):
            return ((self.w**2 - 1) ** 2).sum() + 0.0 * batch.sum()

    model = DoubleWell()
    url = f"sqlite:///{tmp_path / 'dw.db'}"
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    agent = moxco.agent.attach(model, opt, url=url, run="dw", reeval_every=1, probe_every=0)
    for _ in range(60):
        model(torch.zeros(1, dtype=torch.float64)).backward()
        opt.step()
        opt.zero_grad()
    agent.close()
    gaps = open_store(url).series("dw", "inst_gap")[1]
    assert gaps.max() > 0  # concave region |w| < 1/√3 is crossed
