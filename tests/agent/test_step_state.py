"""The agent's step state (``agent.state``) is explicit and round-trips through ``state_dict``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import moxco.agent
from moxco.agent.step import Previous
from moxco.collector import open_store

STEPS, SPLIT = 10, 5
COMPARED = ("loss", "grad_norm_sq", "distance", "update_norm", "update_corr", "update_corr_rs", "loss_diff", "inst_gap",
            "inst_smooth")


def batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 3, generator=gen, dtype=torch.float64), torch.randn(16, 1, generator=gen, dtype=torch.float64))
            for _ in range(STEPS)]


def model_and_optimizer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)


CRITERION = nn.MSELoss()


def train(model, opt, agent, data):
    criterion = CRITERION
    for x, y in data:
        criterion(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def attach(model, opt, url, run, **options):
    return moxco.agent.attach(model, opt, url=url, run=run, reeval_every=1, probe_every=0, random_scaling=True,
                              criterion=CRITERION, **options)


def test_a_restored_step_state_continues_the_series_and_the_random_scaling_exactly(tmp_path):
    """One run straight through; another stopped after 5 steps, its ``agent.state.state_dict()``
    loaded into a new agent (another seed) that continues: the parameters (randomly scaled updates
    included) and every series from step 4's update norm on are the straight run's."""
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    data = batches()
    model, opt = model_and_optimizer()
    straight = attach(model, opt, url, "straight", seed=3)
    train(model, opt, straight, data)
    straight.close()
    final = [p.detach().clone() for p in model.parameters()]

    model, opt = model_and_optimizer()
    first = attach(model, opt, url, "first", seed=3)
    train(model, opt, first, data[:SPLIT])
    saved = first.state.state_dict()
    first.close()
    assert saved["step"] == SPLIT and saved["holds"] == Previous.X_PREV.value
    second = attach(model, opt, url, "second", seed=99, start_step=SPLIT)
    second.state.load_state_dict(saved)
    train(model, opt, second, data[SPLIT:])
    second.close()
    assert first.errors == second.errors == {}
    for a, b in zip(final, model.parameters()):
        assert torch.equal(a, b.detach())

    store = open_store(url)
    for metric in COMPARED:
        steps, values = store.series("straight", metric)
        keep = steps >= (SPLIT - 1 if metric == "update_norm" else SPLIT)
        got_steps, got = store.series("second", metric)
        np.testing.assert_array_equal(got_steps, steps[keep], err_msg=metric)
        np.testing.assert_allclose(got, values[keep], rtol=1e-12, atol=1e-15, err_msg=metric)


def test_the_copy_of_the_previous_iterate_moves_through_its_states(tmp_path, monkeypatch, caplog):
    """Nothing before the first step's end; x_t once the step's measurements are taken; x_{t−1} at
    the next step. A copy that cannot be made is said once with what stops (the update metrics, the
    re-evaluation, random scaling), and the rest goes on."""
    from moxco import tensors

    model, opt = model_and_optimizer()
    agent = attach(model, opt, f"sqlite:///{tmp_path / 'runs.db'}", "states", seed=0)
    assert agent.state.holds is Previous.NONE and agent.state.previous() is None
    seen, x_t = [], []

    def after_the_agents_pre_hook(*args):
        seen.append(agent.state.holds)
        x_t.append([p.detach().clone() for p in model.parameters()])

    opt.register_step_pre_hook(after_the_agents_pre_hook)
    train(model, opt, agent, batches()[:3])
    assert seen == [Previous.X_T] * 3 and agent.state.holds is Previous.X_PREV
    assert all(torch.equal(a, b) for a, b in zip(agent.state.previous(), x_t[-1]))
    agent.close()

    def no_memory(*args, **kwargs):
        raise RuntimeError("injected: out of memory")

    url = f"sqlite:///{tmp_path / 'nocopy.db'}"
    model, opt = model_and_optimizer()
    agent = attach(model, opt, url, "no-copy", seed=0, track_distance=False)
    monkeypatch.setattr(tensors, "copy_params", no_memory)
    twin, twin_opt = model_and_optimizer()
    with caplog.at_level("WARNING", logger="moxco.agent"):
        train(model, opt, agent, batches())
        train(twin, twin_opt, agent, batches())  # plain SGD: no random scaling
        agent.close()
    assert set(agent.errors) == {"copy"} and "random scaling stop" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    store = open_store(url)
    assert set(store.metrics("no-copy")) == {"loss", "grad_norm_sq", "lr", "step_time", "samples_per_second"}
    assert store.series("no-copy", "loss")[0].tolist() == list(range(STEPS))


def test_state_dict_refuses_nothing_it_wrote_and_restores_the_generator():
    from moxco.agent.step import StepState

    state = StepState(3, torch.Generator().manual_seed(5), [torch.ones(2)])
    state.settle([torch.full((2,), 2.0)])
    state.end_step()
    saved = state.state_dict()
    draw = torch.rand(3, generator=state.generator)
    other = StepState(0, torch.Generator().manual_seed(6), None)
    other.load_state_dict(saved)
    assert other.step == 4 and other.holds is Previous.X_PREV
    assert torch.equal(other.previous()[0], torch.full((2,), 2.0)) and torch.equal(other.x0[0], torch.ones(2))
    assert torch.equal(torch.rand(3, generator=other.generator), draw)
    with pytest.raises(ValueError):
        other.load_state_dict({**saved, "holds": "somewhere"})
