"""FSDP (``fully_shard``, 2 ranks, gloo on CPU) stores the same metrics as one process on the same global batch.

The model is float64 so that the comparison is tight: the only differences are the reduction order
of the partial sums over the two shards and of FSDP's gradient reduce-scatter. The curvature is the
exception by construction: one process multiplies by the Hessian by double backward, FSDP by
central finite differences of two replays (and each rank draws its shards' start vector), so
``sharpness``, ``sharpness_precond`` and goodness's sharpness term agree to the finite difference's
error (float64: within ``CURVATURE_RTOL``) once the probes have converged (``sharpness_iters=8``, 30
with Adam). (``goodness`` itself differs: its gradient term splits the batch in other thirds.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import moxco.agent
from moxco.aligator import split_terms
from moxco.collector import open_store
from tests.agent.gloo import in_gloo_group

from torch.distributed.fsdp import fully_shard  # FSDP2: torch ≥ 2.6 (the project installs 2.13)

GLOBAL_BATCH, STEPS, PROBE_EVERY, MAX_NORM = 24, 10, 3, 0.3
COMPARED = ("loss", "grad_norm_sq", "distance", "update_norm", "update_corr", "update_corr_rs", "loss_diff",
            "inst_gap", "inst_smooth", "avg_gap", "max_smooth", "inst_gap_ref", "inst_smooth_ref", "convexity_ratio")
CURVATURE = ("sharpness", "goodness_sharpness_term")
CURVATURE_RTOL = 1e-7  # measured: 5e-12 (sharpness), 6e-9 (sharpness_precond, the worse-conditioned P⁻¹H)


def make_model_and_data():
    torch.manual_seed(0)
    # odd sizes: uneven shards, and the last layer's weight (1 × 10) leaves rank 1 an empty shard
    model = nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 10), nn.Tanh(), nn.Linear(10, 1)).double()
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(GLOBAL_BATCH, 5, generator=gen, dtype=torch.float64),
                torch.randn(GLOBAL_BATCH, 1, generator=gen, dtype=torch.float64)) for _ in range(STEPS)]
    reference = {k: v + 0.1 for k, v in model.state_dict().items()}
    return model, batches, reference


def shard(model):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def train(model, batches, *, rank=0, world=1, attach=None, adam=False):
    """Trains; returns the full parameters and gradients after every step (and the agent, if any)."""
    criterion = nn.MSELoss()
    opt = (torch.optim.Adam(model.parameters(), lr=0.01) if adam else
           torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5))
    agent = moxco.agent.attach(model, opt, criterion=criterion, **attach) if attach is not None else None
    probes = []
    if agent is not None and agent.writer is not None:  # keep the probes' split sums (goodness needs sharpness)
        submit = agent._submit
        agent._submit = lambda record: (probes.append((record.step, record.probe["split_sums"].clone(),
                                                       record.probe["split_sizes"]))
                                        if record.probe and "split_sums" in record.probe else None, submit(record))
    share = GLOBAL_BATCH // world
    history = []
    for x, y in batches:
        local = slice(rank * share, (rank + 1) * share)
        criterion(model(x[local]), y[local]).backward()
        # clipping rescales .grad in place: the agent's g_t is still the raw gradient (DESIGN §2)
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        opt.step()
        history.append(([full(p.detach()).clone() for p in model.parameters()],
                        [full(p.grad).clone() for p in model.parameters()]))  # the agent gave .grad back
        opt.zero_grad()
    if agent is not None:
        agent.close()
    return history, agent, probes


OPTIONS = dict(reeval_every=1, probe_every=PROBE_EVERY, seed=5, sharpness_iters=8)
ADAM_OPTIONS = dict(OPTIONS, reeval_every=0, sharpness_iters=30)  # P⁻¹H is worse conditioned: more products


def _faulty_run(rank, world, url):
    """The replays' loss fails on rank 1 only, between FSDP's forward and backward collectives."""
    model, batches, reference = make_model_and_data()
    model = shard(model)
    criterion = nn.MSELoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    agent = moxco.agent.attach(model, opt, url=url, run="fsdp-faulty", criterion=criterion, reference=reference,
                               **OPTIONS)
    if rank == 1:
        def boom(*args, **kwargs):
            raise RuntimeError("injected on rank 1")
        agent.capture._loss_of = boom
    share = GLOBAL_BATCH // world
    for x, y in batches:
        local = slice(rank * share, (rank + 1) * share)
        criterion(model(x[local]), y[local]).backward()
        opt.step()
        opt.zero_grad()
    agent.close()
    expected = ({"reeval (rank 1)", "reference (rank 1)", "sharpness (rank 1)", "split (rank 1)",
                 "convexity_ratio (rank 1)"} if rank == 1 else set())
    assert set(agent.errors) == expected, agent.errors


def _worker(rank, world, init_file, url, out):
    def work():
        model, batches, reference = make_model_and_data()
        plain, _, _ = train(shard(model), batches, rank=rank, world=world)
        model, batches, reference = make_model_and_data()
        watched, agent, probes = train(shard(model), batches, rank=rank, world=world,
                                       attach=dict(url=url, run="fsdp", reference=reference, **OPTIONS))
        assert agent.errors == {}, agent.errors
        # the user's parameters and gradients are bit-identical with and without the agent (the finite
        # differences move the shards and put them back bit for bit)
        for step, ((p_plain, g_plain), (p_watched, g_watched)) in enumerate(zip(plain, watched)):
            for a, b in zip(p_plain + g_plain, p_watched + g_watched):
                assert torch.equal(a, b), f"step {step}: the agent changed the training"
        # Adam: the preconditioned sharpness reads P from the optimizer's sharded second moments
        model, batches, _ = make_model_and_data()
        _, adam_agent, _ = train(shard(model), batches, rank=rank, world=world, adam=True,
                                 attach=dict(url=url, run="fsdp-adam", hessian_trace=4, **ADAM_OPTIONS))
        assert adam_agent.errors == {}, adam_agent.errors
        if rank == 0:
            torch.save({"params": plain[-1][0], "probes": probes}, out)

        _faulty_run(rank, world, url)  # must not hang

        # FSDP1 (FullyShardedDataParallel) is refused at attach with a clear message
        from torch.distributed.fsdp import FullyShardedDataParallel

        legacy = FullyShardedDataParallel(make_model_and_data()[0], device_id=torch.device("cpu"), use_orig_params=True)
        with pytest.raises(NotImplementedError, match="fully_shard"):
            moxco.agent.attach(legacy, torch.optim.SGD(legacy.parameters(), lr=0.1), url=url, run="fsdp1")

    in_gloo_group(rank, world, init_file, work)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """One 2-rank job (the runs "fsdp" and "fsdp-faulty") and the single-process run "single"."""
    tmp_path = tmp_path_factory.mktemp("fsdp")
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    out = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), url, str(out)), nprocs=2, join=True)
    # the same global batch in one process
    model, batches, reference = make_model_and_data()
    _, agent, probes = train(model, batches, attach=dict(url=url, run="single", reference=reference, **OPTIONS))
    assert agent.errors == {}
    adam_model, batches, _ = make_model_and_data()
    _, adam_agent, _ = train(adam_model, batches, adam=True, attach=dict(url=url, run="single-adam", hessian_trace=4,
                                                                        **ADAM_OPTIONS))
    assert adam_agent.errors == {}
    return open_store(url), torch.load(out), model, probes


@pytest.mark.timeout(300)
def test_two_rank_fsdp_equals_single_process(job):
    store, ranks, model, probes = job
    # rank 1 wrote nothing
    assert {r.name for r in store.list_runs()[1]} == {"fsdp", "fsdp-adam", "fsdp-faulty", "single", "single-adam"}
    assert store.run("fsdp").config["world_size"] == 2
    assert store.run("fsdp").config["curvature"]["hvp"] == "finite_difference"
    assert store.run("single").config["curvature"]["hvp"] == "autograd"
    norms = np.sqrt(store.series("single", "grad_norm_sq")[1])
    assert np.sum(norms > MAX_NORM) >= STEPS // 2  # clipping is active on most steps
    for metric in COMPARED:
        steps_fsdp, fsdp_values = store.series("fsdp", metric)
        steps_single, single_values = store.series("single", metric)
        assert steps_fsdp.size > 0, metric
        if metric == "update_norm":
            # the last step's update_norm is taken at close(), never under FSDP (a collective at close
            # could hang a job whose ranks do not all close): one process has it, FSDP stops one short
            assert steps_single[-1] == STEPS - 1 and steps_fsdp[-1] == STEPS - 2
            steps_single, single_values = steps_single[:-1], single_values[:-1]
        np.testing.assert_array_equal(steps_fsdp, steps_single, err_msg=metric)
        np.testing.assert_allclose(fsdp_values, single_values, rtol=1e-9, atol=1e-12, err_msg=metric)
    # the three-way split of the goodness estimator: under FSDP the k-th third of the global batch is
    # the ranks' k-th thirds (another partition than one process's); both must add up to g_t
    grad_norm_sq = dict(zip(*store.series("fsdp", "grad_norm_sq")))
    assert [p[0] for p in ranks["probes"]] == [p[0] for p in probes] == list(range(0, STEPS, PROBE_EVERY))
    for step, sums, sizes in ranks["probes"]:
        assert sizes == [GLOBAL_BATCH // 3] * 3
        observed = split_terms(sums, sizes).observed  # ‖Σ w_i ĝ_i‖²
        np.testing.assert_allclose(observed, grad_norm_sq[step], rtol=1e-9)
    for a, b in zip(ranks["params"], model.parameters()):
        np.testing.assert_allclose(a.numpy(), b.detach().numpy(), rtol=1e-9, atol=1e-12)


def compare_curvature(store, fsdp_run, single_run, metrics):
    for metric in metrics:
        steps_fsdp, fsdp_values = store.series(fsdp_run, metric)
        steps_single, single_values = store.series(single_run, metric)
        assert steps_fsdp.size > 0 and np.all(np.isfinite(fsdp_values)), metric
        np.testing.assert_array_equal(steps_fsdp, steps_single, err_msg=metric)
        np.testing.assert_allclose(fsdp_values, single_values, rtol=CURVATURE_RTOL, err_msg=metric)


@pytest.mark.timeout(300)
def test_fsdp_sharpness_by_finite_differences_equals_the_single_process_autograd_value(job):
    store = job[0]
    compare_curvature(store, "fsdp", "single", CURVATURE)
    assert store.series("fsdp", "sharpness")[0].tolist() == list(range(0, STEPS, PROBE_EVERY))


@pytest.mark.timeout(300)
def test_fsdp_preconditioned_sharpness_reads_the_sharded_adam_state_and_equals_one_process(job):
    store = job[0]
    compare_curvature(store, "fsdp-adam", "single-adam", ("sharpness", "sharpness_precond", "sharpness_precond_target"))
    # from the first probe after Adam's first step (step 0's probe precedes it)
    assert store.series("fsdp-adam", "sharpness_precond")[0].tolist() == list(range(PROBE_EVERY, STEPS, PROBE_EVERY))
    # Hutchinson's signs are drawn per shard, so the two traces are different samples of one estimator:
    # both present and finite, and within a factor of each other
    trace_fsdp, trace_single = store.series("fsdp-adam", "hessian_trace")[1], store.series("single-adam", "hessian_trace")[1]
    assert trace_fsdp.size == trace_single.size == len(range(0, STEPS, PROBE_EVERY))
    assert np.all(np.isfinite(trace_fsdp)) and np.all(np.isfinite(trace_single))


@pytest.mark.timeout(300)
def test_a_failure_on_one_fsdp_rank_neither_hangs_nor_hides(job):
    store = job[0]
    loss = store.series("fsdp-faulty", "loss")[1]
    assert loss.size == STEPS and np.all(np.isfinite(loss))
    for metric in ("inst_gap", "inst_smooth", "inst_gap_ref", "convexity_ratio", "sharpness"):
        values = store.series("fsdp-faulty", metric)[1]
        assert values.size > 0 and np.all(np.isnan(values)), metric  # stored as NaN on every rank, not lost
