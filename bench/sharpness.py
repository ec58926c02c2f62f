"""Sharpness probes (moxco.curvature) vs. PyHessian and hessian-eigenthings: time and error against the
explicit Hessian.

One small float32 MLP (20→64→64→1, tanh, 5 569 parameters) on one fixed probe batch of 256
samples of ``y = sin(2x·w)``, trained by minibatch SGD on a separate training set, in two
scenarios (``--pretrain-steps``): from initialisation, and after 2 000 SGD steps (mid-training, where
the top of the spectrum is more crowded and a cold start needs more iterations). After a few
warm-up probes, at each measured probe point (every ``--steps-between`` SGD steps) the script
times, interleaved, each of:

* PyHessian: ``hessian(model, criterion, data=(x, y), cuda=False).eigenvalues(top_n=1, tol=1e-3)``
  (``maxIter=100``, construction included: it runs the forward/backward it reuses);
* the two references **at the budget's tolerance** (1 % of ``λ_max``), each with the fewest iterations
  that reach it at that point and start vector (found untimed beforehand, so they get an oracle
  stopping rule no real run has): PyHessian's power iteration (``maxIter=m, tol=0``) and
  hessian-eigenthings 1.0's Lanczos (``lanczos(HessianOperator(...), k=1, max_iter=m, which="LA")``);
* ``moxco.curvature.extreme_eigenvalues`` cold (Lanczos from a random vector, ``tol=1e-3``) and
  ``power_iteration`` cold with ``reuse_graph=True`` (PyHessian's trick);
* the warm ``Sharpness`` tracker: the agent's (one HVP, the shifted power step, continued as Lanczos
  while the estimate's residual exceeds ``sharpness_refine`` of it, its gradient graph kept for the
  probe's products as the agent keeps a one-batch probe's), one HVP always, and up to 3
  (Lanczos from the kept vector, ``tol=1e-3``), each warm-started from its previous probe's vector;
* the floor of any exact one-product probe: one bare autograd HVP on the 1-HVP tracker's kept vector
  (``S``: forward and backward with ``create_graph``; ``D``: the double backward; no solver), whose
  Rayleigh quotient is that probe's estimate.

Each method is timed ``--repeats`` times at each point (trackers re-run from the same saved state
through ``state_dict``, so they repeat identical work); the table gives medians over points and
repeats, and times as ratios to the faster reference at 1 % in the same process (machines are
noisy). The budget: the agent's warm tracker within 1 % of ``λ_max`` in ≤ 1/5 of that time.

Clock: by default the CPU time of this process (``time.process_time``) with one intra-op thread
(``--threads 1``). On a shared machine wall time also counts other processes' time slices, and
with several OpenMP threads a descheduled thread stalls every barrier: single HVPs of ~1 ms were
seen taking 50-120 ms. With one thread the CPU time is the wall time an idle machine would show.
``--clock wall --threads N`` measures wall time instead (use it on a dedicated machine).
Errors are relative to ``torch.linalg.eigvalsh(...)[-1]`` (the algebraic top eigenvalue) of the
explicit Hessian of a float64 copy (``torch.func.jacrev`` twice) at that point. HVP counts for
PyHessian are read by wrapping its ``hessian_vector_product``; for hessian-eigenthings they are its
``max_iter`` (one operator product per Lanczos step).

    python bench/sharpness.py --seed 0 --repeats 5 --out bench-sharpness.md

The table is printed; ``--write-docs`` writes it into docs/sharpness.md between the
``bench:sharpness`` markers.
Needs the ``dev`` extra (``pyhessian``, ``hessian-eigenthings``).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from moxco.agent.groups.probe import COLD_ITERS, COLD_TOL
from moxco.agent.options import AgentOptions
from moxco.curvature import Sharpness, extreme_eigenvalues, power_iteration

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchkit import add_write_docs, write_between_markers  # noqa: E402  (same folder)

DOC = Path(__file__).resolve().parent.parent / "docs" / "sharpness.md"
BEGIN, END = "<!-- bench:sharpness:begin -->", "<!-- bench:sharpness:end -->"
TOL = 1e-3
TARGET_ERROR, TARGET_RATIO = 0.01, 0.2  # the budget: within 1 % of λ_max, ≤ 1/5 of the faster reference
MAX_ORACLE_ITERS = 60


def make_problem(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(20, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)
    )
    w = torch.randn(20, 1) / math.sqrt(20)

    def sample(n):
        x = torch.randn(n, 20)
        return x, torch.sin(2.0 * x @ w)

    probe = sample(256)
    train = sample(4096)
    return model, probe, train


def explicit_top_eigenvalue(model, x, y) -> float:
    """``λ_max`` of the explicit Hessian of a float64 copy (ground truth)."""
    model64 = copy.deepcopy(model).double()
    x64, y64 = x.double(), y.double()
    names = [name for name, _ in model64.named_parameters()]
    shapes = [p.shape for p in model64.parameters()]

    def loss(theta):
        named, i = {}, 0
        for name, shape in zip(names, shapes):
            n = math.prod(shape)
            named[name] = theta[i : i + n].reshape(shape)
            i += n
        return torch.nn.functional.mse_loss(torch.func.functional_call(model64, named, (x64,)), y64)

    theta = torch.cat([p.detach().reshape(-1) for p in model64.parameters()])
    hessian = torch.func.jacrev(torch.func.jacrev(loss), chunk_size=256)(theta)
    return float(torch.linalg.eigvalsh(hessian)[-1])


class PyHessianRunner:
    """Times PyHessian's top eigenvalue and counts its HVPs."""

    def __init__(self):
        import importlib

        ph = importlib.import_module("pyhessian.hessian")  # the module (the package re-exports the class)
        self.module = ph
        self.hvps = 0
        original = ph.hessian_vector_product

        def counted(*args, **kwargs):
            self.hvps += 1
            return original(*args, **kwargs)

        ph.hessian_vector_product = counted

    def __call__(self, model, x, y, seed: int, max_iter: int = 100, tol: float = TOL):
        torch.manual_seed(seed)  # PyHessian draws its start vector from the global generator
        self.hvps = 0
        start = clock()
        eigenvalues, _ = self.module.hessian(model, torch.nn.functional.mse_loss, data=(x, y), cuda=False).eigenvalues(
            maxIter=max_iter, tol=tol, top_n=1
        )
        elapsed = clock() - start
        for p in model.parameters():  # it left graph-carrying .grad behind (a reference cycle)
            p.grad = None
        model.train()
        return float(eigenvalues[0]), elapsed, self.hvps


class EigenthingsRunner:
    """Times hessian-eigenthings 1.0's Lanczos (``which="LA"``: the algebraic top) on the same batch."""

    def __init__(self):
        import hessian_eigenthings

        self.module = hessian_eigenthings

    def __call__(self, model, x, y, seed: int, max_iter: int):
        he = self.module
        start = clock()
        operator = he.HessianOperator(model, [(x, y)], lambda m, batch: torch.nn.functional.mse_loss(m(batch[0]), batch[1]))
        result = he.lanczos(operator, k=1, max_iter=max_iter, which="LA", seed=seed)
        elapsed = clock() - start
        return float(result.eigenvalues[0]), elapsed, max_iter


def bare_hvp(loss_fn, params, v) -> tuple[float, float, float]:
    """``(vᵀHv, S, D)``: one exact Hessian-vector product and nothing else, timed in its two parts."""
    start = clock()
    grads = torch.autograd.grad(loss_fn(), params, create_graph=True)
    middle = clock()
    hv = torch.autograd.grad(grads, params, grad_outputs=v)
    end = clock()
    return float(sum((a.double() * b.double()).sum() for a, b in zip(v, hv))), middle - start, end - middle


def oracle_iterations(run_with, exact: float, target: float = TARGET_ERROR) -> int:
    """The fewest iterations ``m`` for which ``run_with(m)`` is within ``target`` of ``exact`` (untimed)."""
    for m in range(1, MAX_ORACLE_ITERS + 1):
        if abs(run_with(m) - exact) <= target * abs(exact):
            return m
    return MAX_ORACLE_ITERS


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
clock = time.process_time


def timed(fn):
    start = clock()
    out = fn()
    return out, clock() - start


class all_threads:
    """Run the (untimed) ground truth with every core, then restore the timed thread count."""

    def __enter__(self):
        self.saved = torch.get_num_threads()
        torch.set_num_threads(os.cpu_count() or 1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.saved)


def sgd_steps(model, optimizer, x_train, y_train, batches, steps: int) -> None:
    for _ in range(steps):
        idx = torch.randint(0, len(x_train), (64,), generator=batches)
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x_train[idx]), y_train[idx]).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def run(args, pretrain: int, pyhessian: PyHessianRunner, eigenthings: EigenthingsRunner) -> str:
    """One scenario: the model after ``pretrain`` SGD steps, then warm-up and measured probes."""
    model, (x, y), (x_train, y_train) = make_problem(args.seed)
    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)
    optimizer = torch.optim.SGD(params, lr=args.lr)
    batches = torch.Generator().manual_seed(args.seed + 1)
    sgd_steps(model, optimizer, x_train, y_train, batches, pretrain)
    start_loss = float(torch.nn.functional.mse_loss(model(x), y).detach())

    def probe_loss():
        return torch.nn.functional.mse_loss(model(x), y)

    def tracker(iters_per_call: int) -> Sharpness:
        generator = torch.Generator().manual_seed(args.seed)
        return Sharpness(params, iters_per_call=iters_per_call, tol=TOL, cold_iters=100, generator=generator)

    # the agent's: one product, continued where its residual says the kept vector no longer fits; a
    # one-batch probe keeps its gradient graph for the probe's products, as the agent's does
    default = Sharpness(params, iters_per_call=1, cold_iters=COLD_ITERS, cold_tol=COLD_TOL, reuse_graph=True,
                        refine=AgentOptions.sharpness_refine, generator=torch.Generator().manual_seed(args.seed))
    trackers = {"1 HVP": tracker(1), "3 HVPs": tracker(3), "default": default}

    rows = ["PyHessian", "PyHessian at 1 %", "eigenthings at 1 %", "cold Lanczos", "cold power, reuse_graph",
            "warm default", "warm 1 HVP", "warm 3 HVPs", "bare HVP"]
    references = ("PyHessian at 1 %", "eigenthings at 1 %")
    times = {r: [] for r in rows}
    errors = {r: [] for r in rows}
    hvps = {r: [] for r in rows}
    exact_values = []
    parts = {"S": [], "D": []}  # the bare HVP's two parts

    for probe in range(args.warmup + args.probes):
        sgd_steps(model, optimizer, x_train, y_train, batches, args.steps_between)
        if probe < args.warmup:
            for warm in trackers.values():
                warm(probe_loss)
            continue
        with all_threads():
            exact = explicit_top_eigenvalue(model, x, y)
        exact_values.append(exact)
        saved = {name: t.state_dict() for name, t in trackers.items()}
        for rep in range(args.repeats):
            seed = 1000 * probe + rep
            with all_threads():  # the references' oracle iteration counts, untimed
                m_ph = oracle_iterations(lambda m: pyhessian(model, x, y, seed, max_iter=m, tol=0.0)[0], exact)
                m_he = oracle_iterations(lambda m: eigenthings(model, x, y, seed, max_iter=m)[0], exact)
            measured = {"PyHessian": pyhessian(model, x, y, seed),
                        "PyHessian at 1 %": pyhessian(model, x, y, seed, max_iter=m_ph, tol=0.0),
                        "eigenthings at 1 %": eigenthings(model, x, y, seed, max_iter=m_he)}
            generator = torch.Generator().manual_seed(seed)
            result, seconds = timed(lambda: extreme_eigenvalues(probe_loss, params, iters=100, tol=TOL,
                                                                generator=generator))
            measured["cold Lanczos"] = (result.eigenvalue, seconds, result.hvps)
            generator = torch.Generator().manual_seed(seed)
            result, seconds = timed(lambda: power_iteration(probe_loss, params, iters=100, tol=TOL, reuse_graph=True,
                                                            generator=generator))
            measured["cold power, reuse_graph"] = (result.eigenvalue, seconds, result.hvps)
            for name, warm in trackers.items():
                warm.load_state_dict(saved[name])  # every repeat redoes the same probe
                before = warm.hvps
                value, seconds = timed(lambda: warm(probe_loss))
                measured[f"warm {name}"] = (value, seconds, warm.hvps - before)
            kept = saved["1 HVP"]["eigenvector"]
            value, s_time, d_time = bare_hvp(probe_loss, params, kept)
            measured["bare HVP"] = (value, s_time + d_time, 1)
            parts["S"].append(s_time)
            parts["D"].append(d_time)
            for row, (value, seconds, count) in measured.items():
                times[row].append(seconds)
                errors[row].append(abs(value - exact) / abs(exact))
                hvps[row].append(count)
        recent = {r: statistics.median(times[r][-args.repeats:]) for r in references}
        print(f"[pretrain {pretrain}] probe {probe}: λ_max = {exact:.6f}, "
              + ", ".join(f"{r} {t * 1e3:.2f} ms" for r, t in recent.items()), file=sys.stderr)

    medians = {r: statistics.median(times[r]) for r in rows}
    faster = min(references, key=lambda r: medians[r])
    reference = medians[faster]
    lines = [
        f"| method | HVPs / probe | time / probe (ms) | time ÷ {faster} | rel. error, median | rel. error, max |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    labels = {
        "PyHessian": "PyHessian `eigenvalues(top_n=1, tol=1e-3)`, cold",
        "PyHessian at 1 %": "PyHessian power iteration, fewest iterations within 1 % (oracle), cold",
        "eigenthings at 1 %": "hessian-eigenthings `lanczos(which=\"LA\")`, fewest iterations within 1 % (oracle), cold",
        "cold Lanczos": "`extreme_eigenvalues(tol=1e-3)` (Lanczos), cold",
        "cold power, reuse_graph": "`power_iteration(tol=1e-3, reuse_graph=True)`, cold",
        "warm default": (f"the agent's tracker: 1 HVP, continued while its residual > "
                         f"{AgentOptions.sharpness_refine:g}·λ̂ (`refine`; graph kept), warm"),
        "warm 1 HVP": "`Sharpness(iters_per_call=1)`, warm: one HVP always",
        "warm 3 HVPs": "`Sharpness(iters_per_call=3, tol=1e-3)`, warm",
        "bare HVP": "one bare autograd HVP on the 1-HVP probe's vector (`S + D`, no solver): the floor",
    }
    for row in rows:
        t = medians[row]
        lines.append(
            f"| {labels[row]} | {statistics.median(hvps[row]):g} | {t * 1e3:.2f} | {t / reference:.3f} | "
            f"{statistics.median(errors[row]):.2e} | {max(errors[row]):.2e} |"
        )
    def budget(row: str, what: str) -> str:
        tracked, worst = medians[row] / reference, max(errors[row])
        return (f"{what} within {TARGET_ERROR:.0%} of λ_max: {'met' if worst <= TARGET_ERROR else 'NOT met'} "
                f"(worst {worst:.2e}); in ≤ {TARGET_RATIO:g} × the faster reference at 1 % ({faster}): "
                f"{'met' if tracked <= TARGET_RATIO else 'NOT met'} ({tracked:.3f}; HVPs a probe "
                f"{min(hvps[row]):g}-{max(hvps[row]):g}).")

    verdict = (budget("warm default", "Budget: the agent's warm tracker") + "\n\n"
               + budget("warm 1 HVP", "One HVP always:"))
    s_time, d_time = statistics.median(parts["S"]), statistics.median(parts["D"])
    n_ph = statistics.median(hvps["PyHessian at 1 %"])
    floor = medians["bare HVP"] / reference
    verdict += (
        f"\n\nFloor: one bare exact HVP (S + D = {s_time * 1e3:.2f} + {d_time * 1e3:.2f} ms) takes {floor:.3f} × the "
        f"reference, the least any exact one-product probe can take; the probe's bookkeeping (start, reductions, "
        f"next vector, shift) adds {medians['warm 1 HVP'] / medians['bare HVP'] - 1:.0%} to it. PyHessian reuses "
        f"one graph for its {n_ph:g} products at 1 %: (S + D)/(S + {n_ph:g}·D) = "
        f"{(s_time + d_time) / (s_time + n_ph * d_time):.3f}."
    )
    heading = (
        f"**After {pretrain} SGD steps** (probe-batch loss {start_loss:.4f} before the warm-up probes; "
        f"λ_max over the measured probes {min(exact_values):.4f} … {max(exact_values):.4f}; {n_params} parameters)"
    )
    return heading + "\n\n" + "\n".join(lines) + "\n\n" + verdict + "\n"


def describe(args) -> str:
    setup = (
        f"Setup: MLP 20→64→64→1 tanh, float32; probe batch 256 samples of y = sin(2x·w); training by SGD "
        f"(lr {args.lr}, batch 64, from a 4 096-sample training set), {args.steps_between} steps between probes; "
        f"{args.warmup} warm-up probes (the first one cold: up to 100 iterations), then {args.probes} measured "
        f"probes × {args.repeats} repeats, medians. Clock: "
        f"{'process CPU time' if args.clock == 'cpu' else 'wall time'}, {args.threads} intra-op thread(s). "
        f"seed {args.seed}; torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs."
    )
    command = (
        f"`python bench/sharpness.py --seed {args.seed} --repeats {args.repeats} --probes {args.probes} "
        f"--warmup {args.warmup} --steps-between {args.steps_between} --lr {args.lr} "
        f"--pretrain-steps {' '.join(map(str, args.pretrain_steps))} --clock {args.clock} --threads {args.threads}`"
    )
    return setup + "\n\nReproduce: " + command + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per method and probe (default 5)")
    parser.add_argument("--probes", type=int, default=5, help="measured probe points (default 5)")
    parser.add_argument("--warmup", type=int, default=3, help="tracker probes before measuring (default 3)")
    parser.add_argument("--steps-between", type=int, default=10, help="SGD steps between probes (default 10)")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (default 0.05)")
    parser.add_argument(
        "--pretrain-steps", type=int, nargs="+", default=[0, 2000],
        help="scenarios: SGD steps before the first probe (default 0 2000: at initialisation, mid-training)",
    )
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu", help="cpu (process time, default) or wall")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads while timing (default 1)")
    parser.add_argument("--out", default=None, help="also write the table to this markdown file")
    add_write_docs(parser, DOC, "the table")
    args = parser.parse_args(argv)
    for name in ("repeats", "probes", "steps_between", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(args, name)}")
    if any(n < 0 for n in args.pretrain_steps):
        parser.error(f"--pretrain-steps must be ≥ 0, got {args.pretrain_steps}")
    if args.warmup < 1:
        parser.error(f"--warmup must be ≥ 1 (the first probe is the cold start), got {args.warmup}")
    global clock
    clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    pyhessian = PyHessianRunner()
    eigenthings = EigenthingsRunner()
    table = ("\n".join(run(args, pretrain, pyhessian, eigenthings) for pretrain in args.pretrain_steps) + "\n"
             + describe(args))
    print(table)
    if args.write_docs:
        write_between_markers(DOC, table, BEGIN, END, "# Sharpness")
    if args.out:
        Path(args.out).write_text(table)


if __name__ == "__main__":
    main()
