"""The agent-overhead benchmark's training loops and configurations (``bench/agent_overhead.py``).

Two training loops, built in code, nothing downloaded: ``mlp`` (784→512→512→10 ReLU MLP, batch 128,
``nn.CrossEntropyLoss``, AdamW) and ``gpt2`` (a tiny random-init ``GPT2LMHeadModel``, token ids from
a stdlib source file); and the configurations every repeat runs (no agent, the agent's settings,
the floors).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

# --- workloads ----------------------------------------------------------------------------------


@dataclass
class Workload:
    name: str
    description: str
    build: Callable[[], tuple]  # -> (model, optimizer, criterion or None)
    loss: Callable[[nn.Module, Optional[nn.Module], Any], torch.Tensor]
    batches: List[Any]

    def attach_options(self, criterion) -> Dict[str, Any]:
        return {"criterion": criterion} if criterion is not None else {}


def mlp_workload(seed: int = 0, n_batches: int = 8, batch: int = 128) -> Workload:
    g = torch.Generator().manual_seed(seed + 1)
    teacher = torch.randn(784, 10, generator=g)
    batches = []
    for _ in range(n_batches):
        x = torch.randn(batch, 784, generator=g)
        batches.append((x, (x @ teacher).argmax(1)))

    def build():
        model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3), nn.CrossEntropyLoss()

    def loss(model, criterion, batch):
        x, y = batch
        return criterion(model(x), y)

    return Workload("mlp", f"MLP 784→512→512→10, batch {batch}, CrossEntropyLoss, AdamW", build, loss, batches)


def local_token_ids(vocab: int) -> torch.Tensor:
    """Token ids from local text: byte pairs of the stdlib's argparse.py, mod ``vocab``."""
    import argparse as source_module

    data = Path(source_module.__file__).read_bytes()
    pairs = torch.tensor(list(data[: len(data) // 2 * 2]), dtype=torch.long).view(-1, 2)
    return (pairs[:, 0] * 256 + pairs[:, 1]) % vocab


def gpt2_workload(seed: int = 0, n_batches: int = 8, vocab: int = 2048, seq: int = 128, batch: int = 2) -> Workload:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    ids = local_token_ids(vocab)
    g = torch.Generator().manual_seed(seed + 2)
    batches = []
    for _ in range(n_batches):
        starts = torch.randint(0, len(ids) - seq, (batch,), generator=g)
        batches.append(torch.stack([ids[s : s + seq] for s in starts.tolist()]))
    config = GPT2Config(vocab_size=vocab, n_positions=seq, n_embd=128, n_layer=2, n_head=4)

    def build():
        model = GPT2LMHeadModel(config)
        model.train()
        return model, torch.optim.AdamW(model.parameters(), lr=3e-4), None

    def loss(model, criterion, batch_ids):
        return model(input_ids=batch_ids, labels=batch_ids).loss

    desc = f"GPT2LMHeadModel (2 layers, 4 heads, width 128, vocab {vocab}), batch {batch}×{seq} tokens, AdamW"
    return Workload("gpt2", desc, build, loss, batches)


WORKLOADS = {"mlp": mlp_workload, "gpt2": gpt2_workload}
# timed steps and repeats per model when --steps/--repeats are not given (windows are whole
# multiples of the default probe interval, 100, so the defaults' probe is amortised as in training)
DEFAULT_STEPS = {"mlp": 200, "gpt2": 100}
DEFAULT_REPEATS = {"mlp": 5, "gpt2": 4}


def make_workload(name: str, args=None) -> Workload:
    if name == "gpt2" and args is not None and getattr(args, "gpt2_batch", None):
        return gpt2_workload(batch=args.gpt2_batch)
    return WORKLOADS[name]()


# --- configurations -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    key: str
    label: str
    agent: Optional[Dict[str, Any]] = None  # attach options; None: no agent
    floor: bool = False  # time one extra forward+backward per step
    bytes_floor: bool = False  # move the free metrics' bytes before each step, computing nothing
    interleave: bool = False  # with the agent: the floor's pass at x_{t−1} on odd steps (interleaved ratio)


CONFIGS = [
    Config("base", "no agent"),
    Config("free", "free metrics (`reeval_every=0, probe_every=0`)", dict(reeval_every=0, probe_every=0)),
    Config("free_nodist", "free metrics, `track_distance=False`",
           dict(reeval_every=0, probe_every=0, track_distance=False)),
    Config("reeval1", "`reeval_every=1` (probe off)", dict(reeval_every=1, probe_every=0)),
    Config("defaults", "defaults (`reeval_every=10, probe_every=100`)", dict(reeval_every=10, probe_every=100)),
    Config("floor", "no agent + one extra forward+backward (the floor: at `x_{t−1}` and `x_t`, a step each)", floor=True),
    Config("reeval1_floor", "`reeval_every=1`, and the floor's pass at `x_{t−1}` every other step",
           dict(reeval_every=1, probe_every=0), interleave=True),
    Config("bytes", "no agent + the free metrics' bytes moved, nothing computed (their floor)", bytes_floor=True),
]
RSS_CONFIGS = ["base", "free", "free_nodist", "reeval1", "defaults", "defaults_nodist"]
EXTRA_RSS = {"defaults_nodist": Config("defaults_nodist", "defaults, `track_distance=False`",
                                       dict(reeval_every=10, probe_every=100, track_distance=False))}


def config_by_key(key: str) -> Config:
    for c in CONFIGS:
        if c.key == key:
            return c
    return EXTRA_RSS[key]


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# --- the free metrics' overhead against the work per step (--sweep) ------------------------------

SWEEP = {"mlp": ("samples", [32, 128, 512, 2048]), "gpt2": ("tokens", [1, 2, 8, 32])}  # batch sizes
SWEEP_SECONDS = 1.0  # timed wall time per run, whatever the step's length
