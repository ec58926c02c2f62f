"""A training job run as its own process by the fault tests (so it can be SIGKILLed).

``python -m tests.reliability.agent_job URL RUN SPOOL_DIR ACKED_LOG`` trains agent/demo.py's
task with the agent attached over HTTP, forever, printing ``step N`` after each step. Every batch
the collector answers 2xx is appended to ACKED_LOG as the JSON list of its ``[metric, step]`` keys
(flushed before the sender moves on), so after a SIGKILL the test knows exactly which points the
collector acknowledged.
"""

from __future__ import annotations

import json
import sys

import torch
from torch import nn

import moxco.agent
from moxco.agent.demo import NOISE_STD, make_task
from moxco.optim import MoXCo


def main() -> None:
    url, run, spool, acked_log = sys.argv[1:5]
    model, inputs, targets = make_task(0)
    opt = MoXCo(model.parameters(), torch.optim.SGD, lr=0.05, alpha=0.9, beta=0.5, seed=0)
    criterion = nn.MSELoss()
    agent = moxco.agent.attach(model, opt, url=url, run=run, reeval_every=3, probe_every=10, criterion=criterion,
                               sharpness_iters=1, seed=0, goodness={"tau": 1.0, "loss_target": NOISE_STD**2},
                               policy={"threshold": 1.0, "min_step": 10**9},
                               transport={"spool_dir": spool, "max_backoff": 0.5, "linger": 0.2})
    sink = agent.store
    deliver = sink._deliver
    log = open(acked_log, "a")

    def logged(envelope):
        outcome, delay = deliver(envelope)
        if outcome == "ok" and envelope["kind"] == "batch":
            log.write(json.dumps([p[:2] for p in envelope["body"]["points"]]) + "\n")
            log.flush()
        return outcome, delay

    sink._deliver = logged
    gen = torch.Generator().manual_seed(2)
    while True:
        index = torch.randint(0, inputs.shape[0], (96,), generator=gen)
        criterion(model(inputs[index]), targets[index]).backward()
        opt.step()
        opt.zero_grad()
        print(f"step {agent.step}", flush=True)


if __name__ == "__main__":
    main()
