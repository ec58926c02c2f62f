"""MoXCo Table 2 in miniature: binarising a small network with ProxQuant, plain (SGD) against
MoXCo-ProxQuant, on scikit-learn's digits.

    python examples/proxquant_digits.py --out DIR [--seeds 4] [--steps 3000] [--quick]

The paper fine-tunes full-precision ResNets on CIFAR-10 into binary ones (MoXCo §4(iv), A.4.5):
ProxQuant's W-shaped regulariser with the homotopy λ_t = 1e-5·t, step size η = 0.025 without a
schedule; MoXCo with α_t = (3t−1)/(3t+1), β random each step, the goodness policy (τ = 0.15,
threshold δ = 0.87, targets: the full-precision weights' training loss and sharpness) switching to
Phase 2 with α = 0.7, β = 0.3 and a hypergradient step size. Here, scaled down:

* data: the 1,797 digits, a seeded split of 1,297 for training and 500 for testing, pixels
  standardised;
* network: a 64-128-128-10 ReLU MLP (``--width``); every weight matrix is binarised (``±s`` with the per-tensor
  scale ``s = mean|w|``), biases stay in full precision;
* full precision (FP): SGD with momentum 0.9, η = 0.05, 3,000 steps of batch 64, seed 0; its test
  top-1 is the FP column, its training loss and sharpness the goodness targets;
* both binarising runs fine-tune that FP model for ``--steps`` steps of batch 64 with η = 0.025 and
  ProxQuant(λ₀ = 1e-5, scale mean|w|) as MoXCo's prox: ProxQuant-SGD is MoXCo with α = β = 0 (the
  SGD step followed by the prox, exactly), MoXCo-ProxQuant uses the paper's α, β and policy through
  the moxco agent (``probe_every=20``; its decision is applied with ``MoXCo.commit``);
* after fine-tuning, the hard quantisation ``w ← s·sign(w)`` (``MoXCo.finalize_prox``) gives the
  binarised network whose test top-1 is reported; the seed changes the data order and MoXCo's β.

Prints mean (std) of the binarised top-1 over the seeds next to FP, as Table 2 does, and writes
``DIR/proxquant.json`` and ``DIR/proxquant.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch
from torch import nn

ETA_FP, ETA = 0.05, 0.025
LAMBDA0 = 1e-5
BATCH = 64
TAU, THRESHOLD = 0.15, 0.87
RESTART = {"phase": 2, "alpha": 0.7, "beta": 0.3}


def digits_split(seed: int = 0, n_test: int = 500):
    """``(x_train, y_train, x_test, y_test)``: a seeded split, pixels standardised with the training
    set's mean and standard deviation."""
    from sklearn.datasets import load_digits

    data = load_digits()
    order = np.random.RandomState(seed).permutation(len(data.data))
    test, train = order[:n_test], order[n_test:]
    x = data.data.astype(np.float32)
    mean, std = x[train].mean(0), x[train].std(0) + 1e-6
    x = (x - mean) / std
    y = data.target.astype(np.int64)
    return (torch.tensor(x[train]), torch.tensor(y[train]), torch.tensor(x[test]), torch.tensor(y[test]))


def make_model(seed: int = 0, width: int = 128) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


def weights(model: nn.Module) -> List[nn.Parameter]:
    """The binarised tensors: every weight matrix (biases stay in full precision)."""
    return [p for name, p in model.named_parameters() if name.endswith("weight")]


def biases(model: nn.Module) -> List[nn.Parameter]:
    return [p for name, p in model.named_parameters() if name.endswith("bias")]


def batches(n: int, seed: int):
    """Shuffled index batches of ``BATCH``, reshuffled each pass, from a private generator."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=gen)
        for start in range(0, n - BATCH + 1, BATCH):
            yield order[start : start + BATCH]


@torch.no_grad()
def top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def pretrain(data, steps: int, width: int = 128) -> nn.Module:
    """The full-precision model: SGD with momentum, seed 0."""
    x, y = data[0], data[1]
    model = make_model(0, width)
    opt = torch.optim.SGD(model.parameters(), lr=ETA_FP, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    for _, index in zip(range(steps), batches(len(x), 0)):
        loss_fn(model(x[index]), y[index]).backward()
        opt.step()
        opt.zero_grad()
    return model


def targets(model: nn.Module, data) -> Tuple[float, float]:
    """The goodness targets (MoXCo §4(iv)): the FP weights' training loss and top Hessian eigenvalue."""
    from moxco.hessian import top_eigenvalue

    x, y = data[0], data[1]
    loss_fn = nn.CrossEntropyLoss()
    params = list(model.parameters())
    with torch.no_grad():
        loss = float(loss_fn(model(x), y))
    lam, _ = top_eigenvalue(lambda: loss_fn(model(x), y), params, iters=200, tol=1e-6,
                            generator=torch.Generator().manual_seed(0))
    return loss, float(lam)


def finetune(fp: nn.Module, data, *, method: str, seed: int, steps: int, goodness_targets: Tuple[float, float],
             url: str = "") -> Dict[str, float]:
    """Binarise a copy of ``fp`` by ``method`` (``"proxquant-sgd"`` or ``"moxco-proxquant"``);
    returns the binarised network's test top-1 and what the run did."""
    import copy

    from moxco.optim import MoXCo, ProxQuant

    x, y, x_test, y_test = data
    model = copy.deepcopy(fp)
    prox = ProxQuant(lambda0=LAMBDA0, scale="mean_abs")
    groups = [{"params": weights(model), "prox": prox}, {"params": biases(model)}]
    if method == "proxquant-sgd":
        opt = MoXCo(groups, torch.optim.SGD, lr=ETA, alpha=0.0, beta=0.0)
    elif method == "moxco-proxquant":
        opt = MoXCo(groups, torch.optim.SGD, lr=ETA, alpha="increasing", beta="random", seed=seed)
    else:
        raise ValueError(f"unknown method {method!r}")
    loss_fn = nn.CrossEntropyLoss()
    agent = None
    if method == "moxco-proxquant":
        import moxco.agent

        loss_target, sharpness_target = goodness_targets
        # the probe set is the training set the targets were measured on: goodness then compares
        # λ_max and F of one function with their FP values (a minibatch's λ_max is larger than F's)
        agent = moxco.agent.attach(
            model, opt, url=url, run=f"{method}-seed{seed}", reeval_every=0, probe_every=20, seed=seed,
            criterion=loss_fn, probe_data=(x, y),
            goodness={"tau": TAU, "sharpness_target": sharpness_target, "loss_target": loss_target},
            policy={"threshold": THRESHOLD, "consecutive": 3, "action": RESTART},
            config={"example": "proxquant_digits", "dtype": "float32"})
    started = time.perf_counter()
    for _, index in zip(range(steps), batches(len(x), seed)):
        loss = loss_fn(model(x[index]), y[index])
        loss.backward()
        opt.step()
        opt.zero_grad()
    phase, committed_at = opt.phase, None
    if agent is not None:
        agent.close()
        if agent.errors:
            raise RuntimeError(f"moxco agent errors: {agent.errors}")
        applied = [d for d in agent.decisions() if d.status == "applied"]
        committed_at = applied[0].applied_step if applied else None
    with opt.theta():
        before = top1(model, x_test, y_test)
    opt.finalize_prox()
    levels = [torch.unique(w.detach().abs()).numel() for w in weights(model)]
    return {"method": method, "seed": seed, "top1": top1(model, x_test, y_test), "top1_before_projection": before,
            "train_top1": top1(model, x, y), "final_phase": phase, "committed_at": committed_at,
            "binary": all(n == 1 for n in levels), "seconds": time.perf_counter() - started}


def study(seeds: int, steps: int, fp_steps: int, url: str, width: int = 128) -> Dict[str, object]:
    data = digits_split(0)
    started = time.perf_counter()
    fp = pretrain(data, fp_steps, width)
    fp_top1 = top1(fp, data[2], data[3])
    goodness_targets = targets(fp, data)
    fp_seconds = time.perf_counter() - started
    runs = [finetune(fp, data, method=m, seed=s, steps=steps, goodness_targets=goodness_targets, url=url)
            for s in range(seeds) for m in ("proxquant-sgd", "moxco-proxquant")]
    return {"width": width, "fp_top1": fp_top1, "fp_seconds": fp_seconds, "loss_target": goodness_targets[0],
            "sharpness_target": goodness_targets[1], "steps": steps, "fp_steps": fp_steps, "seeds": seeds,
            "runs": runs}


def _mean_std(values: List[float]) -> str:
    if len(values) < 2:
        return f"{100 * statistics.mean(values):.2f} (one seed)"
    return f"{100 * statistics.mean(values):.2f} ({100 * statistics.stdev(values):.2f})"


def table(result: Dict[str, object]) -> str:
    runs = result["runs"]
    pq = [r["top1"] for r in runs if r["method"] == "proxquant-sgd"]
    mx = [r["top1"] for r in runs if r["method"] == "moxco-proxquant"]
    committed = [r["committed_at"] for r in runs if r["method"] == "moxco-proxquant"]
    lines = ["| model (bits) | FP (32) | ProxQuant-SGD (1) | MoXCo-ProxQuant (1) | boost over ProxQuant-SGD | "
             "MoXCo Phase 2 at step | all weights binary |",
             "| --- | --- | --- | --- | --- | --- | --- |",
             f"| MLP 64-{result['width']}-{result['width']}-10 | {100 * result['fp_top1']:.2f} | {_mean_std(pq)} | {_mean_std(mx)} | "
             f"{100 * (statistics.mean(mx) - statistics.mean(pq)):+.2f} | "
             f"{', '.join('—' if c is None else str(c) for c in committed)} | "
             f"{'yes' if all(r['binary'] for r in runs) else 'no'} |"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--fp-steps", type=int, default=3000)
    p.add_argument("--width", type=int, default=128, help="hidden width of the MLP (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="1 seed, 600 steps (what the test suite runs)")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.fp_steps = 1, 600, 1000
    torch.set_num_threads(1)  # a tiny network: threads only contend
    args.out.mkdir(parents=True, exist_ok=True)
    result = study(args.seeds, args.steps, args.fp_steps, f"sqlite:///{args.out / 'proxquant.db'}", args.width)
    text = table(result)
    print(text)
    (args.out / "proxquant.md").write_text(text + "\n")
    (args.out / "proxquant.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
