"""The agent with the papers' optimizers: their state is recorded, λ_target comes from their own
η, α, β, and the policy's decision reaches ``MoXCo.commit``."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch
from torch import nn

import moxco.agent
from moxco.collector import open_store
from moxco.goodness import eos_sharpness
from moxco.optim import MoXCo, SGDCM


def regression(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 4, generator=gen)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [0.0]]) + 0.05 * torch.randn(256, 1, generator=gen)
    torch.manual_seed(seed)
    return nn.Linear(4, 1), x, y


def test_moxco_optimizer_state_target_and_commit(tmp_path):
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    model, x, y = regression()
    criterion = nn.MSELoss()
    opt = MoXCo(model.parameters(), torch.optim.SGD, lr=0.05, alpha=0.9, beta=0.5, seed=0)
    assert opt.eos_sharpness() == pytest.approx(eos_sharpness(0.05, 0.9, 0.5))
    agent = moxco.agent.attach(model, opt, url=url, run="moxco", reeval_every=1, probe_every=5, criterion=criterion,
                               goodness={"tau": 1.0, "loss_target": 0.0025, "form": "eos"},
                               policy={"threshold": 0.9, "consecutive": 2, "min_step": 20,
                                       "action": {"phase": 2, "alpha": 0.1, "beta": 0.1}})
    assert agent._sharpness_target() == pytest.approx(opt.eos_sharpness())
    acknowledged_from = []
    ingest = agent.store.ingest

    def recording_ingest(*args, acks=(), **kwargs):
        if acks:
            acknowledged_from.append(threading.current_thread().name)
        return ingest(*args, acks=acks, **kwargs)

    agent.store.ingest = recording_ingest
    for _ in range(150):
        criterion(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    agent.close()
    assert agent.errors == {}
    assert opt.phase == 2
    assert acknowledged_from == ["moxco-writer[moxco]"]  # the store is never written from the step

    store = open_store(url)
    (decision,) = store.decisions("moxco")
    assert decision.applied_step is not None and decision.applied_step > decision.step
    steps, alpha = store.series("moxco", "alpha")
    assert alpha[steps < decision.step].max() == pytest.approx(0.9)
    assert alpha[steps > decision.applied_step].max() == pytest.approx(0.1)
    phase_steps, phase = store.series("moxco", "phase")
    assert set(phase[phase_steps <= decision.step]) == {1.0} and phase[-1] == 2.0
    assert np.all(store.series("moxco", "lr")[1] > 0)
    # λ_target follows the optimizer's own η, α, β through the phase switch (hypergradient lr too)
    target_steps, target = store.series("moxco", "sharpness_target")
    assert np.array_equal(target_steps, steps)
    lr_steps, lr = store.series("moxco", "lr")
    assert lr_steps.tolist() == list(range(150))  # the learning rate of every step
    lr = lr[np.searchsorted(lr_steps, target_steps)]
    beta = store.series("moxco", "beta")[1]
    before = target_steps < decision.step
    assert target[before] == pytest.approx(np.full(before.sum(), eos_sharpness(0.05, 0.9, 0.5)))
    after = target_steps > decision.applied_step
    assert after.sum() > 0
    assert target[after] == pytest.approx([eos_sharpness(l, a, b) for l, a, b in zip(lr[after], alpha[after], beta[after])])


def test_critical_momenta_buffer_statistics_are_recorded(tmp_path):
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    model, x, y = regression(1)
    criterion = nn.MSELoss()
    opt = SGDCM(model.parameters(), lr=0.02, momentum=0.9)
    agent = moxco.agent.attach(model, opt, url=url, run="cm", reeval_every=0, probe_every=4, criterion=criterion)
    for _ in range(40):
        criterion(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    agent.close()
    assert agent.errors == {}
    store = open_store(url)
    variance = store.series("cm", "buffer_variance")[1]
    cosine = store.series("cm", "buffer_cosine")[1]
    assert variance.size == 10 and np.all(variance[np.isfinite(variance)] >= 0)
    finite = cosine[np.isfinite(cosine)]
    assert finite.size > 0 and np.all(np.abs(finite) <= 1 + 1e-9)
