"""The agent-overhead benchmark's measurements (``bench/agent_overhead.py``): one timed run of a
configuration, the tensors the agent retains, Cockpit for reference, peak RSS in subprocesses,
profiles, the repeats of one model, one point of the batch-size sweep, and the allocator setting.
"""

from __future__ import annotations

import contextlib
import copy
import cProfile
import gc
import io
import json
import math
import pstats
import re
import resource
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

from benchkit import ROOT, fmt_ms, median
from overhead_workloads import (CONFIGS, DEFAULT_REPEATS, DEFAULT_STEPS, RSS_CONFIGS, SWEEP_SECONDS, Config, Workload,
                                config_by_key, gpt2_workload, make_workload, mlp_workload, param_bytes)

SCRIPT = Path(__file__).resolve().parent / "agent_overhead.py"  # the RSS children run it


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
        cmd = [sys.executable, str(SCRIPT), "--_rss-child", model_name, key, "--rss-steps", str(args.rss_steps),
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


# --- one model: every configuration, repeated -----------------------------------------------------


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
