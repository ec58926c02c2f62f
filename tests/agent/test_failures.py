"""A failure drops the metrics that failed, never the unrelated metrics of the same group."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

import moxco.agent
from moxco.catalogue import needing
from moxco.collector import open_store


@pytest.fixture
def url(tmp_path):
    return f"sqlite:///{tmp_path / 'runs.db'}"


def flat(params):
    return torch.cat([p.detach().reshape(-1) for p in params]).clone()


def test_a_loss_the_agent_cannot_find_drops_the_loss_metrics_and_keeps_the_loss_free_ones(url, caplog):
    """``((model(x) − y)**2).mean()`` without ``criterion=``: the agent cannot find the loss, so
    ``loss`` and everything that needs it are dropped (said once), and ``grad_norm_sq``,
    ``update_norm``, ``distance``, ``update_corr`` and ``update_corr_rs`` are stored, each equal to
    its value recomputed from the parameters and gradients the loop saw."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    steps = 8
    with caplog.at_level(logging.WARNING, logger="moxco.agent"):
        agent = moxco.agent.attach(model, opt, url=url, run="no-loss", reeval_every=1, probe_every=2)
        xs, gs = [flat(model.parameters())], []
        for _ in range(steps):
            x, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
            ((model(x) - y) ** 2).mean().backward()
            gs.append(flat(p.grad for p in model.parameters()))
            opt.step()
            opt.zero_grad()
            xs.append(flat(model.parameters()))
        agent.close()
    assert set(agent.errors) == {"loss"} and "criterion" in agent.errors["loss"]
    assert "agent.loss(F.cross_entropy, output, y)" in agent.errors["loss"]  # the call a plain loop needs
    assert set(agent.dropped()) == set(needing("loss")) and set(agent.dropped().values()) == {"loss"}
    assert sum("disabled" in r.message for r in caplog.records) == 1

    store = open_store(url)
    assert store.run("no-loss").config["errors"] == agent.errors
    stored = set(store.metrics("no-loss"))
    assert not stored & set(needing("loss"))
    series = {m: store.series("no-loss", m) for m in ("grad_norm_sq", "update_norm", "distance", "update_corr",
                                                      "update_corr_rs")}
    assert series["grad_norm_sq"][0].tolist() == list(range(steps))
    np.testing.assert_allclose(series["grad_norm_sq"][1], [float(g @ g) for g in gs], rtol=1e-12)
    assert series["update_norm"][0].tolist() == list(range(steps))
    np.testing.assert_allclose(series["update_norm"][1], [float((xs[t + 1] - xs[t]).norm()) for t in range(steps)],
                               rtol=1e-9)
    np.testing.assert_allclose(series["distance"][1], [float((xs[t] - xs[0]).norm()) for t in range(steps)],
                               rtol=1e-9, atol=1e-15)
    assert series["update_corr"][0].tolist() == list(range(1, steps))
    corr = [float(gs[t] @ (xs[t] - xs[t - 1])) for t in range(1, steps)]
    np.testing.assert_allclose(series["update_corr"][1], corr, rtol=1e-9)
    np.testing.assert_allclose(series["update_corr_rs"][1], corr, rtol=1e-9)
    assert "phase" in stored and "sharpness_target" in stored  # the probe's loss-free parts ran too


class VectorModel(nn.Module):
    """Takes one sample without a batch dimension, ``x`` of shape (6,), and returns its loss
    ``(w·x + b − 1)²``: a quadratic in the parameters whose Hessian is ``2 [x; 1][x; 1]ᵀ``."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 1).double()

    def forward(self, x):
        return ((self.linear(x) - 1.0) ** 2).sum()


def test_a_failing_three_way_split_drops_the_denoised_gradient_norm_and_never_sharpness(url, caplog):
    """The split cuts dim 0 into thirds; here dim 0 is not a batch dimension, so the thirds cannot go
    through the model. That failure is said once (``errors["split"]``); ``sharpness`` is stored at
    every probe, equal to the explicit Hessian's top eigenvalue, and goodness goes on with the raw
    ``‖g_t‖²`` as its gradient term."""
    torch.manual_seed(1)
    model = VectorModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(6, dtype=torch.float64)
    steps, probe_every = 12, 3
    with caplog.at_level(logging.WARNING, logger="moxco.agent"):
        agent = moxco.agent.attach(model, opt, url=url, run="split", reeval_every=1, probe_every=probe_every,
                                   sharpness_iters=5, goodness={"sharpness_target": 100.0})
        grads = []
        for _ in range(steps):
            model(x).backward()
            grads.append(float(sum((p.grad ** 2).sum() for p in model.parameters())))
            opt.step()
            opt.zero_grad()
        agent.close()
    assert set(agent.errors) == {"split"}
    assert "raw ‖g_t‖²" in caplog.text  # the log says what goodness uses instead
    store = open_store(url)
    steps_s, sharpness = store.series("split", "sharpness")
    assert steps_s.tolist() == list(range(0, steps, probe_every))
    z = torch.cat([x, torch.ones(1, dtype=torch.float64)])
    np.testing.assert_allclose(sharpness, 2 * float(z @ z), rtol=1e-6)
    steps_g, grad_terms = store.series("split", "goodness_grad_term")
    assert steps_g.tolist() == list(range(0, steps, probe_every))
    np.testing.assert_allclose(grad_terms, [grads[t] for t in steps_g], rtol=1e-9)
    assert store.series("split", "inst_gap")[0].size == steps - 1  # the rest of the agent is whole


def test_a_failing_writer_part_drops_only_its_metrics(url):
    """ALIGATOR's loss denoiser fails on the writer thread: goodness and its terms are dropped;
    sharpness, its target and the aggregates are stored at every probe as before."""
    torch.manual_seed(2)
    model = VectorModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    agent = moxco.agent.attach(model, opt, url=url, run="writer-part", reeval_every=1, probe_every=2,
                               goodness={"sharpness_target": 100.0})

    def boom(value):
        raise RuntimeError("injected in the denoiser")

    agent.writer.loss_denoiser.update = boom
    x = torch.randn(6, dtype=torch.float64)
    for _ in range(8):
        model(x).backward()
        opt.step()
        opt.zero_grad()
    agent.close()
    assert set(agent.errors) == {"split", "goodness"} and "injected" in agent.errors["goodness"]
    store = open_store(url)
    for metric in ("sharpness", "sharpness_target"):
        assert store.series("writer-part", metric)[0].tolist() == [0, 2, 4, 6], metric
    assert store.series("writer-part", "avg_gap")[0].size == 7
    assert not {"goodness", "goodness_grad_term"} & set(store.metrics("writer-part"))
