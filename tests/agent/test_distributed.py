"""DDP with 2 ranks (gloo, CPU) stores the same metrics as one process on the same global batch (and probe set)."""

from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import moxco.agent
from moxco.collector import open_store
from tests.agent.gloo import in_gloo_group

GLOBAL_BATCH, STEPS = 32, 12
COMPARED = ("loss", "grad_norm_sq", "distance", "update_norm", "update_corr", "update_corr_rs", "loss_diff",
            "inst_gap", "inst_smooth", "avg_gap", "max_smooth", "inst_gap_ref", "inst_smooth_ref", "convexity_ratio",
            "sharpness")


def make_model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(GLOBAL_BATCH, 6, generator=gen, dtype=torch.float64),
                torch.randn(GLOBAL_BATCH, 1, generator=gen, dtype=torch.float64)) for _ in range(STEPS)]
    reference = {k: v + 0.1 for k, v in model.state_dict().items()}
    return model, batches, reference


def train(model, batches, url, run, reference, rank=0, world=1):
    criterion = nn.MSELoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    agent = moxco.agent.attach(model, opt, url=url, run=run, reeval_every=1, probe_every=3, criterion=criterion,
                               reference=reference, seed=5, sharpness_iters=2)
    share = GLOBAL_BATCH // world
    for x, y in batches:
        local = slice(rank * share, (rank + 1) * share)
        criterion(model(x[local]), y[local]).backward()
        opt.step()
        opt.zero_grad()
    agent.close()
    return agent.errors


PROBE_SET = 16
PROBE_COMPARED = ("sharpness", "sharpness_precond", "sharpness_precond_target", "hessian_trace", "convexity_ratio",
                  "goodness_loss_term")


def train_on_a_probe_set(model, batches, url, run, reference, rank=0, world=1):
    """AdamW with a probe set: one process holds all 16 probe samples, each DDP rank its half."""
    criterion = nn.MSELoss()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(PROBE_SET, 6, generator=gen, dtype=torch.float64)
    y = torch.randn(PROBE_SET, 1, generator=gen, dtype=torch.float64)
    share = PROBE_SET // world
    mine = slice(rank * share, (rank + 1) * share)
    agent = moxco.agent.attach(model, opt, url=url, run=run, reeval_every=0, probe_every=3, criterion=criterion,
                               reference=reference, seed=5, sharpness_iters=2, hessian_trace=3,
                               probe_data=(x[mine], y[mine]))
    share = GLOBAL_BATCH // world
    for bx, by in batches:
        local = slice(rank * share, (rank + 1) * share)
        criterion(model(bx[local]), by[local]).backward()
        opt.step()
        opt.zero_grad()
    agent.close()
    return agent.errors


def _worker(rank, world, init_file, url):
    def work():
        model, batches, reference = make_model_and_data()
        ddp = nn.parallel.DistributedDataParallel(model)
        errors = train(ddp, batches, url, "ddp", reference, rank, world)
        assert errors == {}, errors
        model, batches, reference = make_model_and_data()
        errors = train_on_a_probe_set(nn.parallel.DistributedDataParallel(model), batches, url, "ddp-probe",
                                      reference, rank, world)
        assert errors == {}, errors

    in_gloo_group(rank, world, init_file, work)


@pytest.mark.timeout(300)
def test_two_rank_ddp_equals_single_process(tmp_path):
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), url), nprocs=2, join=True)
    model, batches, reference = make_model_and_data()
    assert train(model, batches, url, "single", reference) == {}
    model, batches, reference = make_model_and_data()
    assert train_on_a_probe_set(model, batches, url, "single-probe", reference) == {}

    store = open_store(url)
    # rank 1 wrote nothing of its own
    assert {r.name for r in store.list_runs()[1]} == {"ddp", "single", "ddp-probe", "single-probe"}
    assert store.run("ddp").config["world_size"] == 2
    # each rank's half of the probe set, averaged over ranks, is the whole probe set of one process; the
    # Hutchinson signs are drawn alike on every rank (replicated parameters), so even the trace agrees
    for ddp_run, single_run, metrics in (("ddp", "single", COMPARED), ("ddp-probe", "single-probe", PROBE_COMPARED)):
        for metric in metrics:
            steps_ddp, ddp_values = store.series(ddp_run, metric)
            steps_single, single_values = store.series(single_run, metric)
            assert steps_ddp.size > 0, metric
            np.testing.assert_array_equal(steps_ddp, steps_single, err_msg=metric)
            np.testing.assert_allclose(ddp_values, single_values, rtol=1e-9, atol=1e-12, err_msg=metric)


def _faulty_worker(rank, world, init_file, url):
    def work():
        model, batches, _ = make_model_and_data()
        ddp = nn.parallel.DistributedDataParallel(model)
        criterion = nn.MSELoss()
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        agent = moxco.agent.attach(ddp, opt, url=url, run="ddp-faulty", reeval_every=1, probe_every=3,
                                   criterion=criterion, seed=5)
        if rank == 1:  # a failure on one rank only, inside the groups that hold collectives
            def boom(*args, **kwargs):
                raise RuntimeError("injected on rank 1")
            agent.capture.replay = boom
            agent.capture.replay_graph = boom
        share = GLOBAL_BATCH // world
        for x, y in batches:
            local = slice(rank * share, (rank + 1) * share)
            criterion(ddp(x[local]), y[local]).backward()
            opt.step()
            opt.zero_grad()
        agent.close()
        if rank == 1:
            assert set(agent.errors) == {"reeval (rank 1)", "sharpness (rank 1)", "split (rank 1)"}, agent.errors

    in_gloo_group(rank, world, init_file, work)


@pytest.mark.timeout(300)
def test_a_failure_on_one_rank_neither_hangs_nor_hides(tmp_path):
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    mp.spawn(_faulty_worker, args=(2, str(tmp_path / "init"), url), nprocs=2, join=True)
    store = open_store(url)
    assert store.series("ddp-faulty", "loss")[0].size == STEPS
    assert np.all(np.isfinite(store.series("ddp-faulty", "loss")[1]))
    gaps = store.series("ddp-faulty", "inst_gap")[1]
    assert gaps.size == STEPS - 1 and np.all(np.isnan(gaps))  # stored as NaN on every step, not lost
    assert np.all(np.isnan(store.series("ddp-faulty", "sharpness")[1]))


def _deciding_worker(rank, world, init_file, url, out):
    import json

    def work():
        model, batches, _ = make_model_and_data()
        ddp = nn.parallel.DistributedDataParallel(model)
        criterion = nn.MSELoss()
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.5)
        applied = []
        agent = moxco.agent.attach(ddp, opt, url=url, run="ddp-decides", reeval_every=0, probe_every=3,
                                   criterion=criterion, seed=5, policy={"threshold": 1e-9, "consecutive": 1},
                                   on_decision=lambda decision: applied.append((decision.step, agent.step)))
        share = GLOBAL_BATCH // world
        for x, y in batches:
            local = slice(rank * share, (rank + 1) * share)
            criterion(ddp(x[local]), y[local]).backward()
            opt.step()
            opt.zero_grad()
        agent.close()
        with open(f"{out}-{rank}.json", "w") as f:
            json.dump({"applied": applied, "errors": agent.errors}, f)

    in_gloo_group(rank, world, init_file, work)


@pytest.mark.timeout(300)
def test_under_ddp_every_rank_applies_the_policy_decision_at_its_apply_at(tmp_path):
    """Rank 0's policy fires on the first probe (step 0): every rank applies the decision at the
    boundary the configuration fixes (0 + 1 + lag), whatever rank 0's writer thread does."""
    import json

    from moxco.policy import DEFAULT_LAG

    url = f"sqlite:///{tmp_path / 'runs.db'}"
    out = str(tmp_path / "ranks")
    mp.spawn(_deciding_worker, args=(2, str(tmp_path / "init"), url, out), nprocs=2, join=True)
    due = 1 + DEFAULT_LAG
    for rank in (0, 1):
        with open(f"{out}-{rank}.json") as f:
            result = json.load(f)
        assert result == {"applied": [[0, due]], "errors": {}}, rank
    (decision,) = open_store(url).decisions("ddp-decides")
    assert (decision.step, decision.apply_at, decision.applied_step) == (0, due, due)
