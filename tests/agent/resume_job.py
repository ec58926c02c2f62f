"""A deterministic float64 training job for the resume tests, and the job itself as a process the
tests SIGKILL right after its checkpoint.

``python -m tests.agent.resume_job URL RUN STEPS CHECKPOINT [SPOOL_DIR]`` trains ``STEPS`` steps,
saves ``{"model", "optimizer", "agent"}`` (the agent's ``state_dict()``) to CHECKPOINT, prints
``saved`` and kills itself with SIGKILL: no ``close()``, no interpreter exit.

The job: a tanh MLP on a fixed regression, MoXCo (its phase switch applied by ``commit``), random
scaling, every metric group, and a policy that fires at the first probe from step 10 on. After each
probe step the loop waits for the agent to flush; decisions are ``sync`` with lag 0, so the decision
is applied at the boundary right after its probe in every run of the job.
"""

from __future__ import annotations

import os
import signal
import sys

import torch
from torch import nn

import moxco.agent
from moxco.optim import MoXCo

PROBE_EVERY = 5
OPTIONS = dict(reeval_every=1, probe_every=PROBE_EVERY, random_scaling=True, sharpness_iters=2, decisions="sync",
               goodness={"tau": 1e-6, "loss_target": 0.0},
               policy={"threshold": 0.5, "consecutive": 1, "min_step": 10, "max_decisions": 1, "lag": 0,
                       "action": {"phase": 2, "alpha": 0.1, "beta": 0.1}})
CRITERION = nn.MSELoss()


def model_and_optimizer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    return model, MoXCo(model.parameters(), torch.optim.SGD, lr=0.05, alpha=0.9, beta=0.5, seed=0)


def batch(step: int):
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(24, 4, generator=gen, dtype=torch.float64)
    return x, torch.sin(x.sum(1, keepdim=True)) + 0.1 * torch.randn(24, 1, generator=gen, dtype=torch.float64)


def train(model, opt, agent, start: int, stop: int) -> None:
    for step in range(start, stop):
        x, y = batch(step)
        CRITERION(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        if step % PROBE_EVERY == 0:
            assert agent.flush(60), "the agent did not flush"


def attach(model, opt, url, run, seed, spool=None, **options):
    transport = {"spool_dir": spool, "linger": 0.05} if url.startswith("http") else None
    return moxco.agent.attach(model, opt, url=url, run=run, seed=seed, criterion=CRITERION, transport=transport,
                              **OPTIONS, **options)


def main() -> None:
    url, run, steps, checkpoint = sys.argv[1:5]
    spool = sys.argv[5] if len(sys.argv) > 5 else None
    model, opt = model_and_optimizer()
    agent = attach(model, opt, url, run, seed=1, spool=spool)
    train(model, opt, agent, 0, int(steps))
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "agent": agent.state_dict()}, checkpoint)
    print("saved", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    main()
