"""``moxco demo``: a small training run with the agent attached, stored in the embedded SQLite store.

A 2-layer tanh MLP learns a noisy teacher network with the MoXCo optimizer (inertial exploration
around SGD, ``moxco.optim.MoXCo``), the agent attached with
``moxco.agent.attach(model, opt, criterion=...)`` (re-evaluation every step, probes every
``probe_every`` steps). The policy watches the goodness score against the optimizer's own
edge-of-stability bound and its decision reaches ``opt.commit(...)``: Phase 2, less inertia,
hypergradient step size, at the step the policy's ``lag`` fixes (the same step on every run of a
seed). At the end the run is read back from the store, summarised, and checked
against independent ground truth (explicit Hessian, identities); the exit code is non-zero if a
check fails.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import nn

import moxco.agent
from moxco.collector import open_store
from moxco.optim import MoXCo

NOISE_STD = 0.1


class Progress:
    """A dependency-free progress bar on stderr (a line per 10 % when stderr is not a terminal)."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total, self.enabled = total, enabled
        self.tty = sys.stderr.isatty()
        self.started = time.perf_counter()
        self._last_decile = -1

    def update(self, done: int, note: str = "") -> None:
        if not self.enabled:
            return
        fraction = done / self.total
        decile = int(fraction * 10)
        if not self.tty and decile == self._last_decile and done != self.total:
            return
        self._last_decile = decile
        elapsed = time.perf_counter() - self.started
        line = f"[{'#' * int(fraction * 30):<30}] {done}/{self.total} {elapsed:5.1f}s {note}"
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)
        if self.tty and done == self.total:
            print(file=sys.stderr)


def make_task(seed: int) -> Tuple[nn.Module, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 1))
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
        inputs = torch.randn(4096, 8, generator=gen)
        targets = teacher(inputs) + NOISE_STD * torch.randn(4096, 1, generator=gen)
    torch.manual_seed(seed + 1)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)), inputs, targets


def explicit_top_eigenvalue(model: nn.Module, state: dict, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Ground truth: the largest eigenvalue of the explicit Hessian of the MSE loss (float64)."""
    names = list(state)
    shapes = [state[n].shape for n in names]
    flat = torch.cat([state[n].double().reshape(-1) for n in names])
    model64 = make_task(0)[0].double()

    def loss_of(vector):
        chunks, i = {}, 0
        for name, shape in zip(names, shapes):
            n = math.prod(shape)
            chunks[name] = vector[i : i + n].reshape(shape)
            i += n
        return nn.functional.mse_loss(torch.func.functional_call(model64, chunks, (inputs.double(),)), targets.double())

    return float(torch.linalg.eigvalsh(torch.func.hessian(loss_of)(flat)).max())


def run_demo(steps: int = 300, probe_every: int = 10, seed: int = 0, url: Optional[str] = None,
             run: Optional[str] = None, quiet: bool = False) -> int:
    model, inputs, targets = make_task(seed)
    batch_size = 96
    opt = MoXCo(model.parameters(), torch.optim.SGD, lr=0.05, alpha=0.9, beta=0.5, seed=seed)
    criterion = nn.MSELoss()

    url = url or f"sqlite:///{Path.cwd() / 'moxco.db'}"
    run = run or f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    agent = moxco.agent.attach(
        model, opt, url=url, run=run, reeval_every=1, probe_every=probe_every, criterion=criterion,
        sharpness_iters=10, seed=seed,
        goodness={"tau": 1.0, "loss_target": NOISE_STD**2, "form": "eos"},  # λ bound: opt.eos_sharpness()
        policy={"threshold": 0.9, "consecutive": 3, "min_step": 50},
        config={"task": "teacher-student regression", "batch_size": batch_size},
    )
    gen = torch.Generator().manual_seed(seed + 2)
    progress = Progress(steps, enabled=not quiet)
    last_probe: Optional[Tuple[int, dict, torch.Tensor, torch.Tensor]] = None
    for step in range(steps):
        index = torch.randint(0, inputs.shape[0], (batch_size,), generator=gen)
        x, y = inputs[index], targets[index]
        loss = criterion(model(x), y)
        loss.backward()
        if probe_every and step % probe_every == 0:  # kept only for the ground-truth check below
            last_probe = (step, {k: v.detach().clone() for k, v in model.named_parameters()}, x, y)
        opt.step()
        opt.zero_grad()
        progress.update(step + 1, f"loss={loss.item():.4f} phase={agent.phase}")
    agent.close()

    with torch.no_grad():
        full_loss = float(criterion(model(inputs), targets))
    return _report(url, run, agent, model, opt, last_probe, full_loss)


def _report(url, run, agent, model, opt, last_probe, full_loss) -> int:
    store = open_store(url)
    names = store.metrics(run)
    print(f"\nmoxco demo: run {run!r} stored in {url}")
    print(f"  {'metric':<24} {'points':>6} {'last':>12} {'min':>12} {'max':>12}")
    for name in names:
        steps, values = store.series(run, name)
        finite = values[np.isfinite(values)]
        low, high = (finite.min(), finite.max()) if finite.size else (math.nan, math.nan)
        print(f"  {name:<24} {steps.size:>6} {values[-1]:>12.5g} {low:>12.5g} {high:>12.5g}")
    decisions = store.decisions(run)
    for d in decisions:
        print(f"  decision at step {d.step} (goodness {d.goodness:.3f}) due at step {d.apply_at}, applied at step "
              f"{d.applied_step}: {dict(d.action)}")

    checks = []
    if last_probe is not None:
        step, state, x, y = last_probe
        steps, values = store.series(run, "sharpness")
        stored = float(values[steps == step][0])
        exact = explicit_top_eigenvalue(model, state, x, y)
        checks.append(("tracked sharpness within 2% of the explicit-Hessian eigenvalue",
                       abs(stored - exact) <= 0.02 * abs(exact), f"{stored:.5g} vs {exact:.5g} at step {step}"))
    corr, corr_rs = store.series(run, "update_corr")[1], store.series(run, "update_corr_rs")[1]
    checks.append(("update_corr == update_corr_rs without random scaling",
                   corr.size > 0 and np.array_equal(corr, corr_rs), f"{corr.size} points"))
    raw = store.series(run, "loss")[1][-20:]
    denoised = agent.writer.loss_denoiser.estimate
    checks.append(("ALIGATOR loss closer to the full-data loss than raw minibatch losses",
                   abs(denoised - full_loss) < np.abs(raw - full_loss).mean(),
                   f"{abs(denoised - full_loss):.2e} vs {np.abs(raw - full_loss).mean():.2e}"))
    checks.append(("the policy's decision was stored, committed by the optimizer at the step it was due, "
                   "and acknowledged",
                   len(decisions) == 1 and opt.phase == 2
                   and decisions[0].applied_step == decisions[0].apply_at == opt.hyperparameters()["committed_at"],
                   f"{len(decisions)} decision(s), optimizer phase {opt.phase}"))
    checks.append(("no agent errors", not agent.errors, str(agent.errors or "none")))
    print("\nself-check against ground truth")
    for label, ok, detail in checks:
        print(f"  [{'PASS' if ok else 'FAIL'}] {label} ({detail})")
    return 0 if all(ok for _, ok, _ in checks) else 1
