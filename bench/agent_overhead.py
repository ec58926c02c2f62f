"""Overhead of the moxco agent (DESIGN §6 budgets): step time, memory, re-evaluation cost.

Two training loops, built in code, nothing downloaded:

* ``mlp``: 784→512→512→10 ReLU MLP, batch 128, ``nn.CrossEntropyLoss``, AdamW (670k parameters),
  ``attach(..., criterion=criterion)``;
* ``gpt2``: ``transformers.GPT2LMHeadModel`` from a tiny random-init ``GPT2Config`` (2 layers,
  4 heads, width 128, vocabulary 2048, context 128; 675k parameters), batches of 2 × 128 tokens
  (``--gpt2-batch``), AdamW, dropout on; ``model(input_ids=ids, labels=ids).loss``, which the agent
  finds by itself. Token ids are byte pairs of a stdlib source file (``argparse.py``) mod the
  vocabulary: no tokenizer, no download.

Configurations, all in one process: ``no agent``; ``free`` (``reeval_every=0, probe_every=0``)
with and without ``track_distance``; ``reeval_every=1`` (probe off); the defaults
(``reeval_every=10, probe_every=100``); and ``floor``: no agent plus one extra forward+backward of
the step's batch (``torch.autograd.grad``, ``.grad`` untouched) right before ``optimizer.step()``,
where the agent replays, timed directly: the physical floor of the re-evaluation. Its passes
alternate, a step each, between the two points it could run at: ``x_{t−1}``, held by a twin of the
model whose parameters are copied from the live ones (untimed) after every step, which is where
``inst_smooth`` needs the gradient and so the floor the verdict is on; and ``x_t``, the live
parameters, whose values the backward has just read, reported beside it; ``reeval_every=1`` with
the floor's pass at ``x_{t−1}`` every other step, the agent's re-evaluation timed on the steps
between: the verdict's ratio, both halves measured in the same run (on a noisy machine two runs
minutes apart differ by more than the 10 % budget); and ``bytes``: no
agent plus, at the same point, a pass that moves exactly the bytes the free metrics must move
(``x_t``, ``x_{t−1}``, ``g_t``, ``x_0`` read once, ``x_{t−1}`` written once) in two multi-tensor
calls and computes nothing: the floor under the free metrics. The agent's own
re-evaluation is timed directly too (``Agent.overhead()``, the training thread's seconds per metric
group). Each repeat runs
every configuration once, in an order rotated from repeat to repeat, from the same seed, on a
fresh model, optimizer, agent and temporary SQLite store; the tables give medians over repeats of
per-repeat ratios to that repeat's no-agent run (the machines are noisy). The re-evaluation ratio
is ``reeval / floor`` per repeat from the interleaved run, both timed directly, then the median;
the same from the separate ``reeval_every=1`` and floor runs, and ``(step[reeval_every=1] −
step[free]) / floor``, are reported beside it as cross-checks.

A step's time is the wall time of ``--steps`` consecutive steps (after ``--warmup`` steps, which
include the agent's first, cold, sharpness probe) over their number: the amortised cost, the
writer thread's share of the CPU included. CPU time (user + system, all threads) and minor page
faults per step are reported beside it. Memory, two figures:

* retained: the bytes of every tensor the agent holds between steps, found by walking the agent's
  attributes (``state.prev``, ``state.x0``, ``reference.point``, the sharpness tracker's vectors, …; the user's
  parameters, gradients, optimizer state and batch excluded), in parameter copies;
* peak RSS growth: each configuration in a fresh subprocess, the kernel's RSS high-water mark
  reset (``/proc/self/clear_refs``) just before ``attach`` and read after ``--rss-steps`` steps,
  minus the same without the agent, in parameter copies (transient temporaries included; one
  run each: the no-agent figure repeats within 0.1 MiB, the agent's moved by up to 2 copies).

For reference, Cockpit (``cockpit-for-pytorch``; ``configuration("economy")``; BackPACK-extended
model and loss, per-sample losses in ``info``, as in its README) on the MLP with the same AdamW,
tracked every step and every 10 steps (the agent's ``reeval_every=1`` and default interval). It is
two to three orders of magnitude slower than the loop, so it runs few steps (``--cockpit-*``).

    python bench/agent_overhead.py                 # full, < 10 min on 2 CPU cores
    python bench/agent_overhead.py --quick         # ~4 min
    python bench/agent_overhead.py --profile       # top costs of free and reeval_every=1 instead
    python bench/agent_overhead.py --malloc tuned  # glibc kept from returning memory (tune_malloc)
    python bench/agent_overhead.py --models gpt2 --gpt2-batch 8 --malloc tuned   # 1,024 tokens a step
    python bench/agent_overhead.py --sweep --malloc tuned   # free metrics vs batch size: table and plot, ~5 min

Every run but ``--profile`` and ``--sweep`` ends with the table of ``moxco.tensors.step_sums`` on
one large tensor: the eager paths (whole-tensor temporaries, chunked, in the copy's own buffer) and
the fused kernel of ``moxco.native`` (what the agent runs on the CPU), with their precision.

The markdown is printed and written into docs/benchmarks-agent.md between the ``bench:agent``
markers (``--malloc tuned``: ``bench:agent-tuned``; ``--gpt2-batch``: ``bench:agent-gpt2-batch``;
``--profile``: ``bench:agent-profile``; ``--sweep``: ``bench:agent-sweep``, and the plot
docs/img/agent-free-overhead.png); ``--out FILE`` writes it to FILE too, ``--no-doc``
leaves the doc alone. Never a timed test: the numbers are reported, not asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import functools
import gc
import io
import json
import math
import os
import platform
import pstats
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks-agent.md"
BEGIN, END = "<!-- bench:agent:begin -->", "<!-- bench:agent:end -->"
TUNED_BEGIN, TUNED_END = "<!-- bench:agent-tuned:begin -->", "<!-- bench:agent-tuned:end -->"
FREE_TARGET, REEVAL_TARGET = 0.03, 1.1  # DESIGN §6
FREE_COPIES, REEVAL_REF_COPIES = 1, 3


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


# --- what the agent retains ---------------------------------------------------------------------

SKIP_ATTRS = {"model", "optimizer", "params", "replay_module", "store", "writer", "criterion", "loss_fn", "capture",
              "scaler", "on_decision", "_generator", "generator", "_hooks", "_handles", "_pending_lock"}


def _storage_key(t: torch.Tensor):
    try:
        return t.untyped_storage().data_ptr()
    except Exception:
        return id(t)


def retained_tensors(agent, model: nn.Module, optimizer) -> Dict[str, int]:
    """Bytes of the tensors the agent holds, by attribute path (storages counted once; the user's
    parameters, gradients and optimizer state excluded). ``capture`` only references the user's
    batch (and is cleared at every step), so it is not walked."""
    foreign = set()
    for p in model.parameters():
        foreign.add(_storage_key(p))
        if p.grad is not None:
            foreign.add(_storage_key(p.grad))
    for b in model.buffers():
        foreign.add(_storage_key(b))
    for state in optimizer.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                foreign.add(_storage_key(v))
    seen_objects, seen_storages = set(), set(foreign)
    out: Dict[str, int] = {}

    def visit(obj, path: str, depth: int) -> None:
        if depth > 6 or id(obj) in seen_objects:
            return
        if isinstance(obj, torch.Tensor):
            key = _storage_key(obj)
            if key in seen_storages:
                return
            seen_storages.add(key)
            nbytes = obj.untyped_storage().nbytes()
            if nbytes:
                head = re.sub(r"\[\d+\]", "[]", path)
                out[head] = out.get(head, 0) + nbytes
            return
        seen_objects.add(id(obj))
        if isinstance(obj, (nn.Module, torch.optim.Optimizer, str, bytes, int, float, bool, type(None))):
            return
        if isinstance(obj, dict):
            for k, v in obj.items():
                visit(v, f"{path}[{k!r}]" if not isinstance(k, int) else f"{path}[{k}]", depth + 1)
        elif isinstance(obj, tuple) and hasattr(obj, "_fields"):  # NamedTuple (EigenResult)
            for k in obj._fields:
                visit(getattr(obj, k), f"{path}.{k}", depth + 1)
        elif isinstance(obj, (list, tuple, set)):
            for i, v in enumerate(obj):
                visit(v, f"{path}[{i}]", depth + 1)
        elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("moxco"):
            for k, v in vars(obj).items():
                if k not in SKIP_ATTRS:
                    visit(v, f"{path}.{k}", depth + 1)

    for k, v in vars(agent).items():
        if k not in SKIP_ATTRS:
            visit(v, k, 1)
    return out


# --- one timed run ------------------------------------------------------------------------------


@dataclass
class RunResult:
    step_s: float  # wall time per step
    cpu_s: float = math.nan  # process CPU time (user + sys, all threads: the writer's too) per step
    faults: float = math.nan  # minor page faults per step
    floor_s: float = math.nan  # the extra forward+backward at x_{t−1} (a twin model), per pass
    floor_live_s: float = math.nan  # the same at x_t (the live model), per pass
    reeval_alone_s: float = math.nan  # interleave: the agent's re-evaluation on the steps without a floor pass
    optimizer_s: float = math.nan  # the optimizer's own step() (no agent: nothing else runs in it)
    retained: Dict[str, int] = field(default_factory=dict)
    close_s: float = math.nan
    errors: Dict[str, str] = field(default_factory=dict)
    points: int = 0
    reeval_s: float = math.nan  # the agent's re-evaluation per step, timed directly (Agent.overhead)
    free_s: float = math.nan  # the agent's free metrics per step, timed directly (Agent.overhead)
    bytes_s: float = math.nan  # the bytes floor's pass per step, timed directly
    decision_wait_s: float = math.nan  # the training thread's waits for the policy's answers, per step
    decision_waits: int = 0  # boundaries it waited at (the answer to a probe had not come yet)


def run_config(work: Workload, config: Config, steps: int, warmup: int, tmpdir: str, seed: int = 0,
               profiler: Optional[Callable[[], contextlib.AbstractContextManager]] = None) -> RunResult:
    import moxco.agent

    torch.manual_seed(seed)
    model, optimizer, criterion = work.build()
    params = [p for p in model.parameters() if p.requires_grad]
    if config.floor or config.interleave:  # copied before attach: the twin carries no agent hooks
        twin = copy.deepcopy(model)  # holds x_{t−1}: the point inst_smooth's gradient is taken at
        twin_params = [p for p in twin.parameters() if p.requires_grad]
    agent = None
    if config.agent is not None:
        url = f"sqlite:///{tmpdir}/{work.name}-{config.key}-{uuid.uuid4().hex[:8]}.db"
        agent = moxco.agent.attach(model, optimizer, url=url, run=f"{work.name}-{config.key}",
                                   **work.attach_options(criterion), **config.agent)
    extra, in_step, moved, reeval_alone = [0.0, 0.0], [0.0], [0.0], [0.0]
    if config.bytes_floor:
        previous, origin = [p.detach().clone() for p in params], [p.detach().clone() for p in params]

    def step(i: int) -> None:
        batch = work.batches[i % len(work.batches)]
        if config.interleave and i % 2 == 0:
            # x_i, which is x_{t−1} at the next (odd) step's floor pass; copied here, before the
            # step's forward, so that the copy's traffic does not sit just before the agent's work
            with torch.no_grad():
                torch._foreach_copy_(twin_params, params)
        loss = work.loss(model, criterion, batch)
        loss.backward()
        if config.bytes_floor:
            t0 = time.perf_counter()
            move_free_metric_bytes(params, previous, origin)
            moved[0] += time.perf_counter() - t0
        # floor: even steps at x_{t−1} (the twin), odd steps at x_t (the live model); interleaved
        # with the agent: odd steps at x_{t−1}, and the agent's re-evaluation timed on even steps
        if config.floor or (config.interleave and i % 2 == 1):
            at_previous = config.interleave or i % 2 == 0
            evaluated, wrt = (twin, twin_params) if at_previous else (model, params)
            t0 = time.perf_counter()
            again = work.loss(evaluated, criterion, batch)
            torch.autograd.grad(again, wrt)
            extra[0 if at_previous else 1] += time.perf_counter() - t0
        if config.floor:
            with torch.no_grad():
                torch._foreach_copy_(twin_params, params)  # x_t, which is x_{t−1} at the next step
        before = agent.overhead().get("reeval", 0.0) if config.interleave and i % 2 == 0 else None
        t0 = time.perf_counter()
        optimizer.step()
        in_step[0] += time.perf_counter() - t0
        if before is not None:
            reeval_alone[0] += agent.overhead().get("reeval", 0.0) - before
        optimizer.zero_grad(set_to_none=True)

    for i in range(warmup):
        step(i)
    extra[0] = extra[1] = in_step[0] = moved[0] = reeval_alone[0] = 0.0
    gc.collect()
    spent0 = agent.overhead() if agent is not None else {}
    waits0 = (agent.inbox.stats.waited_seconds, agent.inbox.stats.waits) if agent is not None else (0.0, 0)
    with (profiler() if profiler is not None else contextlib.nullcontext()):
        faults0, c0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time(), time.perf_counter()
        for i in range(warmup, warmup + steps):
            step(i)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
    spent1 = agent.overhead() if agent is not None else {}
    result = RunResult(elapsed / steps, cpu_s=cpu / steps, faults=faults / steps,
                       optimizer_s=in_step[0] / steps if config.agent is None else math.nan)
    even = len([i for i in range(warmup, warmup + steps) if i % 2 == 0])
    if config.floor:
        result.floor_s = extra[0] / even
        result.floor_live_s = extra[1] / (steps - even)
    if config.interleave:
        result.floor_s = extra[0] / (steps - even)
        result.reeval_alone_s = reeval_alone[0] / even
    if config.bytes_floor:
        result.bytes_s = moved[0] / steps
    if agent is not None:
        if "reeval" in spent1:
            result.reeval_s = (spent1["reeval"] - spent0.get("reeval", 0.0)) / steps
        if "free" in spent1:
            result.free_s = (spent1["free"] - spent0.get("free", 0.0)) / steps
        result.decision_wait_s = (agent.inbox.stats.waited_seconds - waits0[0]) / steps
        result.decision_waits = agent.inbox.stats.waits - waits0[1]
        result.retained = retained_tensors(agent, model, optimizer)
        t0 = time.perf_counter()
        agent.close()
        result.close_s = time.perf_counter() - t0
        result.errors = dict(agent.errors)
        result.points = agent.writer.written
        agent.store.close()
    return result


@torch.no_grad()
def move_free_metric_bytes(params: List[torch.Tensor], previous: List[torch.Tensor],
                           origin: List[torch.Tensor]) -> None:
    """The least memory traffic of any implementation of the free metrics with ``track_distance``:
    read ``x_t``, ``x_{t−1}``, ``g_t`` and ``x_0`` once and write ``x_{t−1}`` once (five parameter
    sizes), in two multi-tensor calls whatever the number of tensors. What it computes is garbage,
    never read: the step-time cost of this pass is the floor under the free metrics on the machine
    and workload."""
    with_grad = [(p.detach(), prev, p.grad) for p, prev in zip(params, previous) if p.grad is not None]
    if with_grad:
        xs, prevs, grads = (list(t) for t in zip(*with_grad))
        torch._foreach_addcmul_(prevs, xs, grads)  # reads x_t, x_{t−1}, g_t; writes x_{t−1}
    torch._foreach_norm(origin)  # reads x_0


# --- Cockpit ------------------------------------------------------------------------------------

COCKPIT_INSTALL = ('pip install "setuptools<81" json-tricks einops unfoldNd pandas seaborn matplotlib scipy && '
                   "pip install --no-deps backpack-for-pytorch cockpit-for-pytorch")


def cockpit_available() -> Optional[str]:
    """None when Cockpit imports, else why not (one line)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import backpack  # noqa: F401
            import cockpit  # noqa: F401
            from cockpit.utils.configuration import configuration  # noqa: F401
    except Exception as exc:  # ImportError, or pkg_resources missing with setuptools ≥ 81
        return f"`{type(exc).__name__}: {exc}` (install: `{COCKPIT_INSTALL}`)"
    return None


def run_cockpit(work: Workload, interval: int, steps: int, warmup: int, seed: int = 0) -> float:
    """Mean step time of the MLP loop with Cockpit's ``economy`` configuration tracked every
    ``interval`` steps: the loop of Cockpit's README (BackPACK-extended model and loss, per-sample
    losses, ``with cockpit(step, info=...): loss.backward(create_graph=...)``)."""
    from backpack import extend
    from cockpit import Cockpit
    from cockpit.utils import schedules
    from cockpit.utils.configuration import configuration

    torch.manual_seed(seed)
    model, optimizer, _ = work.build()
    model = extend(model)
    loss_fn = extend(nn.CrossEntropyLoss(reduction="mean"))
    individual_loss_fn = nn.CrossEntropyLoss(reduction="none")
    cp = Cockpit(model.parameters(), quantities=configuration("economy", track_schedule=schedules.linear(interval)))

    def step(i: int) -> None:
        x, y = work.batches[i % len(work.batches)]
        outputs = model(x)
        loss = loss_fn(outputs, y)
        losses = individual_loss_fn(outputs, y)
        with cp(i, info={"batch_size": x.shape[0], "individual_losses": losses, "loss": loss,
                         "optimizer": optimizer}):
            loss.backward(create_graph=cp.create_graph(i))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with warnings.catch_warnings():
        # economy's Alpha warns that AdamW has no closed-form update (it then projects itself)
        warnings.simplefilter("ignore")
        for i in range(warmup):
            step(i)
        gc.collect()
        t0 = time.perf_counter()
        for i in range(warmup, warmup + steps):
            step(i)
        elapsed = time.perf_counter() - t0
    return elapsed / steps


def cockpit_window(args, interval: int) -> int:
    """Timed Cockpit steps: ``--cockpit-steps`` when tracking every step; whole 10-step periods
    (economy tracks two steps per period: ``Alpha`` also needs the step after) when every 10."""
    return args.cockpit_steps if interval == 1 else 10 * max(1, args.cockpit_steps // 3)


# --- peak RSS (one subprocess per configuration) ------------------------------------------------


def _status_kib(field_name: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field_name}:\s+(\d+)", text).group(1))


def rss_child(work: Workload, key: str, steps: int) -> None:
    """Runs in a subprocess: prints JSON with the peak RSS growth (KiB) over ``steps`` steps."""
    import moxco.agent
    from moxco.collector.store import open_store

    config = config_by_key(key)
    with tempfile.TemporaryDirectory() as tmp:
        # every configuration opens (and migrates) one store first, so SQLAlchemy/Alembic are loaded
        # in all of them and the figures differ only by what the agent adds
        open_store(f"sqlite:///{tmp}/warm.db").close()
        torch.manual_seed(0)
        model, optimizer, criterion = work.build()
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
        before = _status_kib("VmRSS")
        agent = None
        if config.agent is not None:
            agent = moxco.agent.attach(model, optimizer, url=f"sqlite:///{tmp}/run.db", run="rss",
                                       **work.attach_options(criterion), **config.agent)
        for i in range(steps):
            loss = work.loss(model, criterion, work.batches[i % len(work.batches)])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        peak = _status_kib("VmHWM")
        if agent is not None:
            agent.close()
    print(json.dumps({"growth_kib": peak - before, "param_bytes": param_bytes(model)}))


def measure_rss(model_name: str, args) -> Dict[str, Optional[float]]:
    """Peak RSS growth per configuration, KiB, each in a fresh interpreter."""
    out: Dict[str, Optional[float]] = {}
    for key in RSS_CONFIGS:
        cmd = [sys.executable, __file__, "--_rss-child", model_name, key, "--rss-steps", str(args.rss_steps),
               "--threads", str(torch.get_num_threads()), "--malloc", args.malloc]
        if args.gpt2_batch:
            cmd += ["--gpt2-batch", str(args.gpt2_batch)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        try:
            out[key] = json.loads(proc.stdout.strip().splitlines()[-1])["growth_kib"]
        except Exception:
            sys.stderr.write(f"rss child {model_name}/{key} failed:\n{proc.stderr[-2000:]}\n")
            out[key] = None
    return out


# --- profiles -----------------------------------------------------------------------------------


def profile_config(work: Workload, key: str, steps: int, warmup: int, tmpdir: str, top: int = 15) -> str:
    """Top costs of one configuration, as markdown: torch.profiler (operators by self CPU time) and
    cProfile (functions by own time, then moxco's functions by cumulative time)."""
    config = config_by_key(key)
    holder: Dict[str, Any] = {}

    @contextlib.contextmanager
    def torch_prof():
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            yield
        holder["torch"] = prof

    @contextlib.contextmanager
    def c_prof():
        prof = cProfile.Profile()
        prof.enable()
        try:
            yield
        finally:
            prof.disable()
            holder["cprofile"] = prof

    base = run_config(work, config_by_key("base"), steps, warmup, tmpdir)
    plain = run_config(work, config, steps, warmup, tmpdir)
    run_config(work, config, steps, warmup, tmpdir, profiler=torch_prof)
    run_config(work, config, steps, warmup, tmpdir, profiler=c_prof)
    table = holder["torch"].key_averages().table(sort_by="self_cpu_time_total", row_limit=top,
                                                  max_name_column_width=40)

    def stats_text(sort: str, restrict: tuple) -> str:
        buf = io.StringIO()
        pstats.Stats(holder["cprofile"], stream=buf).sort_stats(sort).print_stats(*restrict)
        text = buf.getvalue()
        text = text[text.find("   ncalls"):] if "   ncalls" in text else text
        return re.sub(r"/\S*/site-packages/", "", text).replace(str(ROOT) + "/", "").strip()

    return "\n".join([
        f"#### {work.name}, {config.label}",
        "",
        f"Unprofiled in this process: {fmt_ms(plain.step_s)} ms/step vs {fmt_ms(base.step_s)} ms without the agent "
        f"({plain.step_s / base.step_s:.2f}×); minor page faults per step {plain.faults:.0f} vs {base.faults:.0f}. "
        f"{steps} profiled steps.",
        "",
        "torch.profiler, operators by self CPU time:",
        "",
        "```", table.strip(), "```",
        "",
        "cProfile, functions by own time:",
        "",
        "```", stats_text("tottime", (top,)), "```",
        "",
        "cProfile, moxco's functions by cumulative time:",
        "",
        "```", stats_text("cumulative", (r"(moxco|agent)/", top)), "```",
        "",
    ])


# --- the report ---------------------------------------------------------------------------------


def median(xs: List[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.median(xs) if xs else math.nan


def spread(xs: List[float], fmt: str = ".3f") -> str:
    xs = [x for x in xs if not math.isnan(x)]
    return f"{min(xs):{fmt}}–{max(xs):{fmt}}" if len(xs) > 1 else "one repeat"


def fmt_ms(s: float) -> str:
    return f"{s * 1e3:.2f}" if not math.isnan(s) else "–"


def verdict(ok: bool, text: str) -> str:
    return ("meets" if ok else "**misses**") + f" ({text})"


def plan(name: str, args) -> tuple:
    steps = args.steps or DEFAULT_STEPS[name]
    repeats = args.repeats or DEFAULT_REPEATS[name]
    if args.quick:
        steps, repeats = min(steps, 100), min(repeats, 3 if name == "mlp" else 2)
    return steps, repeats


def bench_model(name: str, args, tmpdir: str) -> Dict[str, Any]:
    work = make_workload(name, args)
    steps, repeats = plan(name, args)
    torch.manual_seed(0)
    pbytes = param_bytes(work.build()[0])
    results: Dict[str, List[RunResult]] = {c.key: [] for c in CONFIGS}
    # untimed first runs: first-call costs (allocator arenas, kernels, the store's imports/migrations)
    for key in ("base", "free"):
        run_config(work, config_by_key(key), 3, 2, tmpdir)
    for r in range(repeats):
        order = CONFIGS[r % len(CONFIGS):] + CONFIGS[: r % len(CONFIGS)]
        for config in order:
            results[config.key].append(run_config(work, config, steps, args.warmup, tmpdir))
        base = results["base"][-1].step_s
        print(f"  [{name}] repeat {r + 1}/{repeats}, × no agent: "
              + ", ".join(f"{c.key} {results[c.key][-1].step_s / base:.3f}" for c in CONFIGS[1:]),
              file=sys.stderr, flush=True)
    cockpit: Dict[Any, Any] = {}
    if name == "mlp" and not args.no_cockpit:
        why = cockpit_available()
        if why is not None:
            cockpit["error"] = why
        else:
            cockpit_repeats = 1 if args.quick else args.cockpit_repeats
            for interval in (1, 10):
                ratios, times = [], []
                for r in range(cockpit_repeats):
                    base = run_config(work, CONFIGS[0], steps, args.warmup, tmpdir).step_s
                    try:
                        t = run_cockpit(work, interval, cockpit_window(args, interval), args.cockpit_warmup)
                    except Exception as exc:  # reported as it is, never a made-up number
                        cockpit[interval] = {"error": f"{type(exc).__name__}: {exc}"}
                        break
                    times.append(t)
                    ratios.append(t / base)
                    print(f"  [cockpit] every {interval}: repeat {r + 1}: {t / base:.1f}× no agent",
                          file=sys.stderr, flush=True)
                else:
                    cockpit[interval] = {"step_s": median(times), "ratio": median(ratios), "ratios": ratios,
                                         "repeats": cockpit_repeats}
    rss = measure_rss(name, args) if not args.no_rss else {}
    return {"work": work, "param_bytes": pbytes, "results": results, "cockpit": cockpit, "rss": rss,
            "steps": steps, "repeats": repeats}


def report_model(data: Dict[str, Any], args) -> str:
    work, pbytes, results = data["work"], data["param_bytes"], data["results"]
    base = [r.step_s for r in results["base"]]
    base_cpu = [r.cpu_s for r in results["base"]]
    ratio = {k: [r.step_s / b for r, b in zip(v, base)] for k, v in results.items()}
    cpu_ratio = {k: [r.cpu_s / b for r, b in zip(v, base_cpu)] for k, v in results.items()}
    floor = [r.floor_s for r in results["floor"]]
    floor_live = [r.floor_live_s for r in results["floor"]]
    reeval_cost = [a.step_s - f.step_s for a, f in zip(results["reeval1"], results["free"])]
    reeval_ratio = [c / fl for c, fl in zip(reeval_cost, floor)]
    # like for like: the agent's re-evaluation and the floor, both timed directly where they run
    reeval_direct = [r.reeval_s for r in results["reeval1"]]
    direct_ratio = [c / fl for c, fl in zip(reeval_direct, floor)]
    live_ratio = [c / fl for c, fl in zip(reeval_direct, floor_live)]
    # the verdict's measure: both in one run, a step each, so the machine's drift cancels
    together = results["reeval1_floor"]
    together_ratio = [r.reeval_alone_s / r.floor_s for r in together]
    floor_diff = [f.step_s - b for f, b in zip(results["floor"], base)]
    rss = data.get("rss") or {}
    rss_base = rss.get("base")

    def rss_cell(key: str) -> str:
        if key == "base":
            return f"0 (growth {rss_base / 1024:.1f} MiB)" if rss_base is not None else ""
        if rss.get(key) is None or rss_base is None:
            return ""
        return f"{(rss[key] - rss_base) * 1024 / pbytes:+.2f}"

    def retained_cell(rs: List[RunResult]) -> str:
        parts: Dict[str, List[float]] = {}
        for r in rs:
            for k, v in r.retained.items():
                parts.setdefault(k, []).append(v)
        total = median([sum(r.retained.values()) for r in rs]) / pbytes
        detail = ", ".join(f"`{k}` {median(v) / pbytes:.2f}"
                           for k, v in sorted(parts.items(), key=lambda kv: -median(kv[1])))
        return f"{total:.2f}" + (f" ({detail})" if detail else "")

    lines = [f"### {work.name}: {work.description}",
             "",
             f"{pbytes / 2**20:.2f} MiB of parameters ({pbytes // 4:,} float32). {data['repeats']} repeats × "
             f"{data['steps']} timed steps after {args.warmup} warm-up steps. Ratios: medians over repeats of the "
             "ratio to the same repeat's no-agent run, [min–max]; CPU time is the process's user + system time "
             "(every thread, the writer's too), less sensitive than wall time to other jobs on the machine.",
             "",
             "| configuration | ms/step | × no agent (wall) | × no agent (CPU time) | page faults/step | "
             "retained by the agent, parameter copies | peak RSS growth vs no agent, copies |",
             "| --- | ---: | ---: | ---: | ---: | --- | ---: |"]
    for config in CONFIGS:
        rs = results[config.key]
        lines.append(f"| {config.label} | {fmt_ms(median([r.step_s for r in rs]))} | "
                     f"{median(ratio[config.key]):.3f} [{spread(ratio[config.key])}] | "
                     f"{median(cpu_ratio[config.key]):.3f} | {median([r.faults for r in rs]):.0f} | "
                     f"{retained_cell(rs) if config.agent is not None else ''} | {rss_cell(config.key)} |")
    if rss.get("defaults_nodist") is not None:
        lines.append(f"| defaults, `track_distance=False` (peak RSS only) | | | | | | {rss_cell('defaults_nodist')} |")
    cockpit = data.get("cockpit") or {}
    if "error" in cockpit:
        lines.append(f"| Cockpit `economy` | not run: {cockpit['error']} | | | | | |")
    for interval in (1, 10):
        c = cockpit.get(interval)
        if c is None:
            continue
        label = f"Cockpit `economy`, tracked every {interval} step{'s' if interval > 1 else ''}"
        if "error" in c:
            lines.append(f"| {label} | failed: `{c['error']}` | | | | | |")
        else:
            lines.append(f"| {label} ({c['repeats']} × {cockpit_window(args, interval)} steps) | "
                         f"{fmt_ms(c['step_s'])} | {c['ratio']:.1f} [{spread(c['ratios'], '.1f')}] | | | | |")
    errors = sorted({f"{k}/{g}: {m}" for k, rs in results.items() for r in rs for g, m in r.errors.items()})
    free = median(ratio["free"]) - 1
    free_nodist = median(ratio["free_nodist"]) - 1
    free_cpu = median(cpu_ratio["free"]) - 1
    optimizer_step = median([r.optimizer_s for r in results["base"]])
    free_added = [f.step_s - b for f, b in zip(results["free"], base)]
    bytes_added = [f.step_s - b for f, b in zip(results["bytes"], base)]
    bytes_over = median(ratio["bytes"]) - 1
    bytes_direct = [r.bytes_s for r in results["bytes"]]
    bytes_direct_share = [d / b for d, b in zip(bytes_direct, base)]
    free_direct = [r.free_s for r in results["free"]]
    free_direct_share = [d / b for d, b in zip(free_direct, base)]
    rr = median(together_ratio)
    rr_steps = median(reeval_ratio)
    retained_free = median([sum(r.retained.values()) for r in results["free"]]) / pbytes
    retained_free_nd = median([sum(r.retained.values()) for r in results["free_nodist"]]) / pbytes
    retained_defaults = median([sum(r.retained.values()) for r in results["defaults"]]) / pbytes
    lines += [
        "",
        f"* Floor (one extra forward+backward of the same batch, timed directly) at `x_{{t−1}}`, a twin model's "
        f"parameters, where `inst_smooth` needs the gradient: **{fmt_ms(median(floor))} ms**; at `x_t`, the live "
        f"parameters the backward has just read: {fmt_ms(median(floor_live))} ms "
        f"(× {median([a / b for a, b in zip(floor, floor_live)]):.3f}). Cross-check, floor step − no-agent step: "
        f"{fmt_ms(median(floor_diff))} ms (one pass a step, and the twin's untimed copy).",
        f"* Re-evaluation against its floor in one run (the `reeval_every=1`, floor every other step row: the "
        f"agent's own account of its re-evaluation, `agent.overhead()['reeval']`, on the steps without a floor pass "
        f"— the replay at `x_{{t−1}}` and `loss_diff`, `inst_gap`, `inst_smooth` — against the floor's pass at "
        f"`x_{{t−1}}` on the others, so that both see the same process and the same minutes of a noisy machine): "
        f"{fmt_ms(median([r.reeval_alone_s for r in together]))} ms against "
        f"{fmt_ms(median([r.floor_s for r in together]))} ms = **{rr:.2f} × the floor** "
        f"[{spread(together_ratio, '.2f')}]: "
        + verdict(rr <= REEVAL_TARGET, f"target ≤ {REEVAL_TARGET}×"
                  + ("" if rr <= REEVAL_TARGET else f"; {rr / REEVAL_TARGET - 1:.0%} over")) + ". "
        f"From separate runs (`reeval_every=1` against the floor row): {fmt_ms(median(reeval_direct))} ms = "
        f"{median(direct_ratio):.2f} × the floor at `x_{{t−1}}` [{spread(direct_ratio, '.2f')}], "
        f"{median(live_ratio):.2f} × the pass at `x_t` [{spread(live_ratio, '.2f')}]. "
        f"Cross-check by step times, `step[reeval_every=1] − step[free]` = {fmt_ms(median(reeval_cost))} ms = "
        f"{rr_steps:.2f} × the floor [{spread(reeval_ratio, '.2f')}] (a difference of two noisy step means, "
        "which also carries the writer thread storing the three extra metrics a step).",
        f"* Free metrics: **{free:+.1%}** wall time ({free_cpu:+.1%} CPU time) with `track_distance=True` (the "
        f"default), {free_nodist:+.1%} without: "
        + verdict(free <= FREE_TARGET, f"target ≤ {FREE_TARGET:.0%}"
                  + ("" if free <= FREE_TARGET else f"; {(free - FREE_TARGET) * 100:.1f} points over")) + ".",
        f"* The free metrics' bytes floor (no agent; `x_t`, `x_{{t−1}}`, `g_t`, `x_0` read and `x_{{t−1}}` "
        "written once each, two multi-tensor calls, nothing computed: the least memory traffic of any "
        f"implementation): **{bytes_over:+.1%}** [{spread([r - 1 for r in ratio['bytes']], '+.1%')}], "
        f"{fmt_ms(median(bytes_added))} ms a step; its pass timed directly: {fmt_ms(median(bytes_direct))} ms "
        f"({median(bytes_direct_share):.1%} of the no-agent step [{spread(bytes_direct_share, '.1%')}]). "
        f"The agent's free metrics timed directly (`agent.overhead()['free']`: the pre-step work and the "
        f"end-of-backward gradient norms; not the hooks' bookkeeping, nor what their traffic costs the model's "
        f"own work through the cache): {fmt_ms(median(free_direct))} ms ({median(free_direct_share):.1%} "
        f"[{spread(free_direct_share, '.1%')}]), {median(free_direct) / median(bytes_direct):.1f} × the bytes pass. "
        + ("The bytes pass alone, timed directly, takes more than 3 % of the step here: no implementation that "
           "keeps `x_{t−1}` (`update_corr` needs it) meets the target on this workload and machine."
           if median(bytes_direct_share) > FREE_TARGET else
           "The bytes pass alone, timed directly, is within 3 % of the step here."),
        f"* For scale: the free metrics add {fmt_ms(median(free_added))} ms a step, "
        f"**{median(free_added) / optimizer_step:.1f} × the optimizer's own `step()`** ({fmt_ms(optimizer_step)} ms, "
        "no agent); both are O(P) passes over the parameters, so the free metrics stay within 3 % wherever the "
        "optimizer's step is a fraction of a percent of the training step.",
        f"* Retained with free metrics: {retained_free:.2f} parameter copies with `track_distance=True` (`x_{{t−1}}`, "
        f"`x_0`), {retained_free_nd:.2f} without: "
        + verdict(retained_free_nd <= FREE_COPIES + 0.01, f"target ≤ {FREE_COPIES} copy without `x_0`; the default "
                  f"`track_distance=True` keeps `x_0` too: {retained_free:.0f}") + ". "
        f"Defaults (probe on): {retained_defaults:.2f} copies, "
        + verdict(retained_defaults <= REEVAL_REF_COPIES + 0.01,
                  f"≤ {REEVAL_REF_COPIES} copies with `x*`, and this run has no `x*`") + ".",
    ]
    defaults = results["defaults"]
    wait_share = [r.decision_wait_s / r.step_s for r in defaults]
    lines.append(
        f"* Decision waits, defaults (`decisions=\"sync\"`, the embedded default: at the boundary a probe's "
        f"decision is due at, the policy's lag after the probe, the training thread waits for the answer if it has "
        f"not come): {median([r.decision_waits for r in defaults]):.0f} waits in {data['steps']} steps, "
        f"{fmt_ms(median([r.decision_wait_s for r in defaults]))} ms a step on average: "
        f"**{median(wait_share):.2%} of the defaults' step** [{spread(wait_share, '.2%')}].")
    if errors:
        lines.append("* Agent errors (those metric groups were disabled, their timings are not valid): "
                     + "; ".join(errors) + ".")
    points = {c.key: median([r.points for r in results[c.key]]) for c in CONFIGS if c.agent is not None}
    lines.append("* Points stored per run (sanity: the metrics were computed): "
                 + ", ".join(f"{k} {v:.0f}" for k, v in points.items()) + ".")
    return "\n".join(lines) + "\n"


def chunking_table(sizes=(100_000, 1_000_000, 4_000_000, 16_000_000), repeats: int = 5) -> str:
    """``moxco.tensors.step_sums(..., grad_norm_sq=True)`` (the free metrics' four sums, what the
    agent computes every step) on one float32 tensor of each size (g, x, x_{t−1}, x_0), four ways:
    the eager paths (``moxco.native.disabled()``) with whole-tensor temporaries (``CHUNKED_ABOVE``
    raised past every size), chunked through cached buffers above ``CHUNKED_ABOVE`` (for copies
    that cannot share one buffer), and ``advance=True`` on ``FlatCopy`` buffers (the differences
    formed in the copy itself); and the fused kernel (``moxco.native``, ``advance=True`` on the
    same buffers: what the agent runs on the CPU). Median wall time of ``repeats`` calls, and the
    relative error of ``⟨g, x − x_{t−1}⟩`` against float64 for the eager in-buffer path and the
    fused one."""
    from moxco import native, tensors

    gen = torch.Generator().manual_seed(0)
    rows = ["| elements | eager, whole-tensor temporaries, ms | eager, chunked, ms | eager, in the copy's buffer, ms | "
            "fused kernel (the agent's), ms | fused vs the best eager | ⟨g, x − x_{t−1}⟩ rel. error, eager / fused |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    limit = tensors.CHUNKED_ABOVE
    fused_ok = native.warm()
    for n in sizes:
        g, x, x0 = (torch.randn(n, generator=gen) for _ in range(3))
        prev = x - 1e-3 * torch.randn(n, generator=gen)
        exact = float((g.double() * (x - prev).double()).sum())
        flat_prev, flat_origin = tensors.FlatCopy([prev]), tensors.FlatCopy([x0])
        timings, errors = {}, {}
        for label, above in (("whole", 1 << 62), ("chunked", min(limit, n - 1)), ("flat", limit), ("fused", limit)):
            if label == "fused" and not fused_ok:
                continue
            tensors.CHUNKED_ABOVE = above
            if label in ("flat", "fused"):
                call = lambda: (tensors.copy_(flat_prev, [prev]),  # untimed: back to x_{t−1}
                                time.perf_counter(), tensors.step_sums([g], [x], flat_prev, flat_origin, advance=True,
                                                                       grad_norm_sq=True))
            else:
                call = lambda: (None, time.perf_counter(), tensors.step_sums([g], [x], [prev], [x0], grad_norm_sq=True))
            try:
                with (contextlib.nullcontext() if label == "fused" else native.disabled()):
                    call()  # warm
                    times = []
                    for _ in range(repeats):
                        _, t0, sums = call()
                        times.append(time.perf_counter() - t0)
            finally:
                tensors.CHUNKED_ABOVE = limit
            timings[label] = statistics.median(times)
            errors[label] = abs(float(sums[1]) - exact) / abs(exact)
        best_eager = min(timings[k] for k in ("whole", "chunked", "flat"))
        fused = (f"{timings['fused'] * 1e3:.2f} | {best_eager / timings['fused']:.1f}× faster | "
                 f"{errors['flat']:.0e} / {errors['fused']:.0e}") if "fused" in timings else \
            f"unavailable ({native.status()}) | | {errors['flat']:.0e} / –"
        rows.append(f"| {n:,} | {timings['whole'] * 1e3:.2f} | {timings['chunked'] * 1e3:.2f} | "
                    f"{timings['flat'] * 1e3:.2f} | {fused} |")
    return "\n".join(["### The free metrics' pass over one large tensor", "",
                      "`moxco.tensors.step_sums` with `grad_norm_sq=True` (`‖g‖²`, `⟨g, x − x_{t−1}⟩`, "
                      "`‖x − x_{t−1}‖²`, `‖x − x_0‖²`) on one float32 tensor, median of "
                      f"{repeats} calls. Eager (`moxco.native.disabled()`): whole-tensor temporaries page-fault "
                      f"in on every call; chunked: tensors above {limit:,} elements walked in chunks of "
                      f"{tensors.CHUNK:,} through two reused buffers (the path for copies that cannot share "
                      "one buffer, forced at every size here); in the copy's buffer: `advance=True` on "
                      "`FlatCopy` buffers, the differences formed in the copy of x_{t−1} itself, which then "
                      "holds x. Fused: `moxco.native`'s one pass over the same buffers, float64 accumulators "
                      "(what the agent runs on the CPU). The copy back to x_{t−1} between calls is not timed.",
                      "", *rows, ""])


# --- the free metrics' overhead against the work per step (--sweep) ------------------------------

SWEEP = {"mlp": ("samples", [32, 128, 512, 2048]), "gpt2": ("tokens", [1, 2, 8, 32])}  # batch sizes
SWEEP_SECONDS = 1.0  # timed wall time per run, whatever the step's length
SWEEP_IMAGE = ROOT / "docs" / "img" / "agent-free-overhead.png"


def sweep_point(model: str, batch: int, repeats: int, warmup: int, tmpdir: str) -> Dict[str, Any]:
    """No agent, the free metrics and the bytes floor at one batch size, ``repeats`` rotated
    rounds: medians of the per-round step-time ratios, and of the directly timed passes (the
    agent's ``overhead()['free']`` and the bytes floor's pass) over the round's no-agent step."""
    work = mlp_workload(batch=batch) if model == "mlp" else gpt2_workload(batch=batch)
    pilot = run_config(work, config_by_key("base"), 5, 2, tmpdir)
    steps = max(20, min(300, int(SWEEP_SECONDS / pilot.step_s)))
    keys = ["base", "free", "bytes"]
    runs: Dict[str, List[RunResult]] = {k: [] for k in keys}
    for r in range(repeats):
        for key in keys[r % 3:] + keys[:r % 3]:
            runs[key].append(run_config(work, config_by_key(key), steps, warmup, tmpdir, seed=r))
    base = [x.step_s for x in runs["base"]]
    per_step = 128 * batch if model == "gpt2" else batch
    free = [f.step_s / b - 1 for f, b in zip(runs["free"], base)]
    return {"batch": batch, "work": per_step, "steps": steps, "base_ms": median(base) * 1e3,
            "free": median(free), "free_low": min(free), "free_high": max(free),
            "free_direct": median([f.free_s / b for f, b in zip(runs["free"], base)]),
            "bytes": median([f.step_s / b - 1 for f, b in zip(runs["bytes"], base)]),
            "bytes_direct": median([f.bytes_s / b for f, b in zip(runs["bytes"], base)])}


def sweep_plot(results: Dict[str, List[Dict[str, Any]]], path: Path) -> None:
    """The passes timed directly against the work per step, log-log, with the budget's line (the
    step-time ratios carry the host's noise, several %: they are in the table)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 3.8), squeeze=False)
    for ax, (model, points) in zip(axes[0], results.items()):
        unit = SWEEP[model][0]
        x = [p["work"] for p in points]
        pct = lambda key: [100 * p[key] for p in points]
        ax.plot(x, pct("free_direct"), "o-", color="C0", label="free metrics (the agent's pre-step work)")
        ax.plot(x, pct("bytes_direct"), "s:", color="C3", label="bytes floor (moves their bytes, computes nothing)")
        ax.axhline(3, color="k", lw=1, ls="-.", label="budget, 3 %")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(
            lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "235" else ""))
        ax.set_xticks(x, [f"{v:,}" for v in x])
        ax.set_xlabel(f"{unit} per step")
        ax.set_ylabel("time a step, % of the step without the agent")
        ax.set_title(f"{'MLP 784→512→512→10' if model == 'mlp' else 'tiny GPT-2, 128-token sequences'}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep(models: List[str], repeats: int, warmup: int, tmpdir: str, image: Optional[Path]) -> str:
    results: Dict[str, List[Dict[str, Any]]] = {}
    lines = ["### The free metrics' overhead against the work per step", "",
             "The free metrics cost a fixed number of passes over the parameters; the step grows with the "
             "batch. Each point: no agent, the free metrics (`reeval_every=0, probe_every=0`, "
             "`track_distance=True`) and the bytes floor, "
             f"{repeats} rotated rounds of about {SWEEP_SECONDS:g} s each; step-time ratios, and the passes timed "
             "directly (`agent.overhead()['free']`; the bytes floor's pass) over the no-agent step, medians "
             "over rounds. Timed directly, the passes leave out the hooks' bookkeeping and what their memory "
             "traffic costs the model's own work; the step-time ratios hold everything, and the host's noise, "
             "which on these machines reaches several % between runs of the same loop.", ""]
    for model in models:
        unit, batches = SWEEP[model]
        results[model] = []
        for batch in batches:
            print(f"sweep {model} batch {batch} …", file=sys.stderr, flush=True)
            results[model].append(sweep_point(model, batch, repeats, warmup, tmpdir))
        lines += [f"| {model}: {unit} per step | no-agent step, ms | free metrics, step time [min–max] | free "
                  "metrics, their pass timed | bytes floor, its pass timed | within 3 %: step time / pass timed |",
                  "| ---: | ---: | ---: | ---: | ---: | --- |"]
        for p in results[model]:
            lines.append(f"| {p['work']:,} | {p['base_ms']:.2f} | {100 * p['free']:+.1f}% "
                         f"[{100 * p['free_low']:+.1f}%–{100 * p['free_high']:+.1f}%] | {100 * p['free_direct']:.2f}% | "
                         f"{100 * p['bytes_direct']:.2f}% | {'yes' if p['free'] <= 0.03 else 'no'} / "
                         f"{'yes' if p['free_direct'] <= 0.03 else 'no'} |")
        lines.append("")
    if image is not None:
        sweep_plot(results, image)
        lines += [f"![free-metric overhead against work per step]({image.relative_to(DOC.parent).as_posix()})", ""]
    return "\n".join(lines)


@functools.lru_cache(maxsize=1)
def source_state() -> str:
    """The commit benchmarked and whether agent/ or moxco/ had uncommitted changes (read-only git),
    taken once when the run starts (``main``): the code it imported, not what the tree holds by
    the end of a run."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "agent", "moxco"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return "source: unknown"
    if not head:
        return "source: unknown"
    return f"source: commit {head}" + (" with uncommitted changes in agent/ or moxco/" if dirty else "")


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()} CPU cores ({cpu}), no GPU, shared with other jobs; torch {torch.__version__}, "
            f"{torch.get_num_threads()} intra-op thread(s); Python {platform.python_version()}; {source_state()}")


def tune_malloc() -> None:
    """``--malloc tuned``: glibc keeps the memory it frees instead of giving it back to the kernel
    (``mallopt``: ``M_MMAP_THRESHOLD`` 32 MiB, its maximum, so tensor-sized blocks come from the
    heap, not from a fresh ``mmap`` each; ``M_TRIM_THRESHOLD`` 2 GiB, so the heap's top is not
    trimmed; ``M_TOP_PAD`` 64 MiB). Every allocation is then served from memory already mapped:
    no page faults after warm-up, in every configuration alike. Setting these also turns off
    glibc's dynamic thresholds, whose state depends on the order of past allocations and made
    fault counts, and the step times that carry them, differ between identical processes. It is
    what the PyTorch CPU tuning advice (jemalloc or tcmalloc) achieves, without a new library."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    for option, value in ((m_mmap_threshold, 32 << 20), (m_trim_threshold, (1 << 31) - 1), (m_top_pad, 64 << 20)):
        if libc.mallopt(option, value) != 1:
            raise RuntimeError(f"mallopt({option}, {value}) failed: is this glibc?")


def doc_markers(args) -> tuple[str, str]:
    """Where a run's markdown goes in the doc: the profile, the batch-size sweep, a run with more
    GPT-2 tokens a step (``--gpt2-batch``), a tuned-allocator run, or the main results."""
    if args.profile:
        return PROFILE_BEGIN, PROFILE_END
    if args.sweep:
        return "<!-- bench:agent-sweep:begin -->", "<!-- bench:agent-sweep:end -->"
    if args.gpt2_batch:
        return "<!-- bench:agent-gpt2-batch:begin -->", "<!-- bench:agent-gpt2-batch:end -->"
    return (TUNED_BEGIN, TUNED_END) if args.malloc == "tuned" else (BEGIN, END)


def write_doc(markdown: str, begin: str, end: str) -> None:
    block = f"{begin}\n{markdown.strip()}\n{end}"
    text = DOC.read_text() if DOC.exists() else "# Agent overhead benchmark\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        DOC.write_text(head + block + tail)
    else:
        DOC.write_text(text.rstrip() + "\n\n" + block + "\n")


PROFILE_BEGIN, PROFILE_END = "<!-- bench:agent-profile:begin -->", "<!-- bench:agent-profile:end -->"


def main(argv: Optional[List[str]] = None) -> None:
    source_state()  # the code this run imports
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mlp,gpt2", help="comma-separated, from: mlp, gpt2 (default both)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per run (default: mlp 200, gpt2 100; keep a multiple of 100)")
    parser.add_argument("--repeats", type=int, default=None, help="repeats of every configuration (default: mlp 5, gpt2 4)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (default 10; the cold probe is step 0)")
    parser.add_argument("--quick", action="store_true", help="100 steps, 3 (mlp) / 2 (gpt2) repeats, one Cockpit repeat")
    parser.add_argument("--gpt2-batch", type=int, default=None, help="GPT-2 sequences per batch (default 2, of 128 tokens)")
    parser.add_argument("--cockpit-steps", type=int, default=3,
                        help="timed Cockpit steps when tracking every step (every 10 steps: 10 per 3 of these; default 3)")
    parser.add_argument("--cockpit-warmup", type=int, default=2)
    parser.add_argument("--cockpit-repeats", type=int, default=2)
    parser.add_argument("--no-cockpit", action="store_true")
    parser.add_argument("--rss-steps", type=int, default=15,
                        help="steps per peak-RSS subprocess (default 15: the cold probe at step 0, a re-evaluation at 10)")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: on 2 shared cores, 2 OpenMP threads stall for "
                             "100s of ms whenever another job holds a core; 0 keeps torch's default)")
    parser.add_argument("--malloc", choices=("default", "tuned"), default="default",
                        help="glibc's allocator as it comes (default), or tuned to keep freed memory mapped "
                             "(see tune_malloc; results go to their own section of the doc)")
    parser.add_argument("--profile", action="store_true",
                        help="instead of the benchmark: profile the free and reeval_every=1 configurations "
                             "(torch.profiler and cProfile) and write the profile section of the doc")
    parser.add_argument("--sweep", action="store_true",
                        help="instead of the benchmark: the free metrics' overhead at several batch sizes "
                             f"(the sweep section of the doc, and {SWEEP_IMAGE.relative_to(ROOT)})")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown to this file")
    parser.add_argument("--no-doc", action="store_true", help=f"do not update {DOC.relative_to(ROOT)}")
    parser.add_argument("--_rss-child", nargs=2, metavar=("MODEL", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.malloc == "tuned":
        tune_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._rss_child:
        rss_child(make_workload(args._rss_child[0], args), args._rss_child[1], args.rss_steps)
        return
    if args.quick:
        args.cockpit_steps, args.rss_steps = 1, min(args.rss_steps, 12)
    import logging

    logging.getLogger("moxco").setLevel(logging.ERROR)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in WORKLOADS:
            parser.error(f"unknown model {m!r} (choose from {', '.join(WORKLOADS)})")
    command = " ".join(["python bench/agent_overhead.py", *(argv if argv is not None else sys.argv[1:])])
    started = time.perf_counter()
    sections = []
    with tempfile.TemporaryDirectory(prefix="moxco-bench-") as tmpdir:
        if args.sweep:
            sections.append(sweep(models, args.repeats or 5, args.warmup, tmpdir, None if args.no_doc else SWEEP_IMAGE))
            models = []
        for m in models:
            print(f"{'profiling' if args.profile else 'benchmarking'} {m} …", file=sys.stderr, flush=True)
            if args.profile:
                work = make_workload(m, args)
                steps = min(plan(m, args)[0], 100)
                sections += [profile_config(work, key, steps, args.warmup, tmpdir) for key in ("free", "reeval1")]
            else:
                sections.append(report_model(bench_model(m, args, tmpdir), args))
        if not (args.profile or args.sweep):
            print("benchmarking the chunked reduction …", file=sys.stderr, flush=True)
            sections.append(chunking_table())
    elapsed = time.perf_counter() - started
    markdown = "\n".join([f"Command: `{command}` ({elapsed / 60:.1f} min, {time.strftime('%Y-%m-%d')}). "
                          f"Machine: {machine_line()}.", "", *sections])
    print(markdown)
    if args.out:
        args.out.write_text(markdown)
    if not args.no_doc:
        write_doc(markdown, *doc_markers(args))


if __name__ == "__main__":
    main()
