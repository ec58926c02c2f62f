"""``examples/edge_of_stability.py`` at reduced scale: full-batch GD's sharpness rises to and hovers at
2/η; full-batch Adam's preconditioned sharpness rises to and hovers at 2(1+β₁)/((1−β₁)η) = 38/η, while
its plain sharpness stays far below 2/η (Cohen et al. 2021, 2022)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from moxco.curvature import AutogradHessian, Preconditioned, adam_preconditioner, lanczos

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "edge_of_stability.py"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("examples_edge_of_stability", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs(example):
    torch.set_num_threads(1)
    return example.train("gd", 0.6, 300, 20), example.train("adam", 0.01, 300, 20)


def test_gd_sharpness_rises_to_and_hovers_at_two_over_eta(runs):
    gd, _ = runs
    ratios = gd.ratios()
    assert ratios[0] < 0.85  # it starts below the edge (progressive sharpening follows)
    assert max(ratios) > 0.98
    late = [r for t, r in zip(gd.steps, ratios) if t > 200]
    assert len(late) == 5 and all(0.9 < r < 1.15 for r in late), late


def test_adam_preconditioned_sharpness_rises_to_and_hovers_at_38_over_eta(runs):
    _, adam = runs
    assert adam.edge == pytest.approx(38 / 0.01)
    ratios = adam.ratios()
    assert ratios[0] < 0.3 and max(ratios) > 0.95
    late = [r for t, r in zip(adam.steps, ratios) if t > 200]
    assert all(0.7 < r < 1.15 for r in late), late
    # the plain sharpness of the same run is nowhere near 2/η: the wrong yardstick for Adam
    assert max(p * adam.lr / 2 for p in adam.plain) < 0.1


def test_the_tracked_values_agree_with_a_cold_lanczos_at_the_last_probe(example):
    x, y = example.digits()
    model = example.network()
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=0.01)
    tracker = example.Sharpness(params, iters_per_call=3, cold_iters=30, tol=1e-4, preconditioner=opt,
                                generator=torch.Generator().manual_seed(0))

    def loss_fn():
        return 0.5 * ((model(x) - y) ** 2).sum(dim=1).mean()

    for t in range(1, 61):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
        if t % 20 == 0:
            tracked = tracker(loss_fn)
    op = Preconditioned(AutogradHessian(loss_fn, params), adam_preconditioner(opt, params))
    cold = lanczos(op, iters=80, tol=1e-8, generator=torch.Generator().manual_seed(5))
    assert tracked == pytest.approx(cold.eigenvalue, rel=1e-2)


def test_table_and_plot(example, runs, tmp_path):
    gd, adam = runs
    text = example.table(gd, adam, 100)
    assert text.count("\n") == 1 + 3 and "| 201-300 |" in text
    example.plot(gd, adam, tmp_path / "eos.png")
    assert (tmp_path / "eos.png").stat().st_size > 10_000
