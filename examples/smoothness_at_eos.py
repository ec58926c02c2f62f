"""The audit paper's fig. 5 in miniature: full-batch gradient descent on a small tanh network at
four learning rates; where the sharpness rises to the edge of stability 2/η and hovers there (Cohen
et al. 2021), do the paper's smoothness measures (max_smooth, exp_smooth) follow it?

    python examples/smoothness_at_eos.py --out DIR [--etas 0.2 0.3 0.4 0.5] [--steps 4000] [--quick]

The task (the one of the curvature example of the edge of stability): the first 256 of
scikit-learn's digits (pixels scaled to [0, 1] and centred, one-hot targets), a 64-32-32-10 tanh
network under seed 0, the squared loss ½‖f(x) − y‖² averaged over the samples, plain GD
(``torch.optim.SGD`` without momentum) on all of them every step. The moxco agent records every step (``reeval_every=1``: inst_smooth,
max_smooth, exp_smooth) and the sharpness every 10 steps (warm power iteration, 5 iterations per
probe); ``moxco audit`` then judges smoothness against sharpness. Prints the table of
docs/audit.md ("Smoothness tracks sharpness at the edge of stability") and writes ``DIR/eos.db``,
``DIR/eos.json``, ``DIR/eos.md`` and ``DIR/eos.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from edge_of_stability import digits, network  # noqa: E402  the same data and network as that reproduction

ETAS = (0.2, 0.3, 0.4, 0.5)
STEPS = 4000


class HalfSquaredLoss(nn.Module):
    """``½‖f(x) − y‖²`` averaged over the batch (Cohen et al.'s squared loss)."""

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((output - target) ** 2).sum(1).mean()


def train(eta: float, steps: int, url: str, run: str, *, probe_every: int = 10, sharpness_iters: int = 5,
          seed: int = 0) -> float:
    """Full-batch GD with the agent attached; returns the wall time in seconds."""
    import moxco.agent

    x, y = digits()
    model, criterion = network(seed=seed), HalfSquaredLoss()
    opt = torch.optim.SGD(model.parameters(), lr=eta)
    started = time.perf_counter()
    agent = moxco.agent.attach(model, opt, url=url, run=run, reeval_every=1, probe_every=probe_every,
                               sharpness_iters=sharpness_iters, criterion=criterion, seed=seed,
                               config={"example": "smoothness_at_eos", "dtype": "float32", "eta": eta})
    for _ in range(steps):
        criterion(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    agent.close()
    if agent.errors:
        raise RuntimeError(f"moxco agent errors in {run}: {agent.errors}")
    return time.perf_counter() - started


def from_step(run_data, start: int):
    """The same run with only its points at steps ≥ ``start``."""
    from moxco.collector.audit.source import RunData

    series = {}
    for metric in run_data.series:
        steps, values = run_data.get(metric)
        series[metric] = (steps[steps >= start], values[steps >= start])
    return RunData(run_data.name, series, config=run_data.config, status=run_data.status)


def summarize(run_data, eta: float) -> Dict[str, float]:
    """The table row of one run: the plateau (median sharpness over the second half of the steps)
    against 2/η, and the audit's smoothness numbers and verdict, over the whole run and over the
    second half (the plateau) alone."""
    from moxco.collector.audit.analysis import audit, audit_smoothness

    section = audit(run_data).section("smoothness")
    steps, sharp = run_data.finite("sharpness")
    late = steps >= steps[-1] / 2
    plateau_section = audit_smoothness(from_step(run_data, int(steps[-1] // 2)))
    plateau = float(np.median(sharp[late]))
    _, max_smooth = run_data.finite("max_smooth")
    exp_steps, exp_smooth = run_data.finite("exp_smooth")
    inst_steps, inst = run_data.finite("inst_smooth")
    n = section.numbers
    return {"eta": eta, "two_over_eta": 2 / eta, "initial_sharpness": float(sharp[0]), "plateau_sharpness": plateau,
            "plateau_over_two_over_eta": plateau * eta / 2,
            "median_inst_smooth_late_over_plateau": float(np.median(inst[inst_steps >= steps[-1] / 2])) / plateau,
            "final_max_smooth_over_plateau": float(max_smooth[-1]) / plateau,
            "final_exp_smooth_over_plateau": float(exp_smooth[-1]) / plateau,
            "median_smooth_over_sharpness": n.get("median_smooth_over_sharpness", math.nan),
            "rank_correlation": n.get("rank_correlation", math.nan),
            "rank_correlation_low": n.get("rank_correlation_low", math.nan),
            "rank_correlation_high": n.get("rank_correlation_high", math.nan),
            "pairs": n.get("pairs", 0), "verdict": section.verdict, "verdict_line": section.verdict_line,
            "plateau_verdict": plateau_section.verdict, "plateau_verdict_line": plateau_section.verdict_line,
            "plateau_median_smooth_over_sharpness": plateau_section.numbers.get("median_smooth_over_sharpness",
                                                                                math.nan),
            "plateau_sharpness_range": plateau_section.numbers.get("sharpness_range", math.nan)}


def table(rows: Sequence[Dict[str, float]], times: Dict[str, float]) -> str:
    lines = ["| η | 2/η | sharpness at step 0 | plateau sharpness (median, 2nd half) | plateau / (2/η) | "
             "median inst_smooth / plateau (2nd half) | final max_smooth / plateau | final exp_smooth / plateau | "
             "audit, whole run: median inst_smooth/sharpness | Spearman ρ (2-SE interval), pairs | verdict | "
             "audit, 2nd half: median ratio, sharpness range | verdict | wall time |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(
            f"| {r['eta']:g} | {r['two_over_eta']:.3g} | {r['initial_sharpness']:.3g} | {r['plateau_sharpness']:.3g} | "
            f"{r['plateau_over_two_over_eta']:.3f} | {r['median_inst_smooth_late_over_plateau']:.3g} | "
            f"{r['final_max_smooth_over_plateau']:.3g} | {r['final_exp_smooth_over_plateau']:.3g} | "
            f"{r['median_smooth_over_sharpness']:.3g} | {r['rank_correlation']:.2f} ({r['rank_correlation_low']:.2f} … "
            f"{r['rank_correlation_high']:.2f}), {r['pairs']} | {r['verdict']} | "
            f"{r['plateau_median_smooth_over_sharpness']:.3g}, ×{r['plateau_sharpness_range']:.2f} | "
            f"{r['plateau_verdict']} | {times[str(r['eta'])]:.0f} s |")
    return "\n".join(lines)


def plot(runs: List, etas: Sequence[float], out: Path) -> None:
    from moxco.collector.audit.plots import figure, finish

    fig, axes = figure(len(runs), height=2.6)
    for ax, run_data, eta in zip(axes, runs, etas):
        s, v = run_data.finite("inst_smooth")
        ax.scatter(s, v, s=2, color="#1f77b4", alpha=0.25, label="inst_smooth", rasterized=True)
        for metric, color in (("max_smooth", "#d62728"), ("exp_smooth", "#2ca02c")):
            ax.plot(*run_data.finite(metric), color=color, lw=1.4, label=metric)
        ax.plot(*run_data.finite("sharpness"), color="#333", lw=1.2, label="sharpness λ_max")
        ax.axhline(2 / eta, color="#333", ls="--", lw=1, label="2/η")
        ax.set_yscale("log"), ax.set_ylabel(f"η = {eta:g}"), ax.set_xlabel("step")
    axes[0].legend(fontsize=7, ncol=5, loc="lower right")
    fig.suptitle("full-batch GD, tanh network on digits: smoothness and sharpness (audit paper fig. 5)", fontsize=10)
    finish(fig)
    fig.savefig(out, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--etas", type=float, nargs="+", default=list(ETAS))
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--quick", action="store_true", help="1,000 steps at η = 0.5 only (what the test suite runs)")
    p.add_argument("--reuse", action="store_true", help="tabulate the runs already in DIR/eos.db (no training)")
    args = p.parse_args(argv)
    if args.quick:
        args.etas, args.steps = [0.5], 1000
    torch.set_num_threads(1)  # a tiny network: threads only contend
    args.out.mkdir(parents=True, exist_ok=True)
    from moxco.collector.audit.source import open_source

    url = f"sqlite:///{args.out / 'eos.db'}"
    times = {}
    if args.reuse:
        times = json.loads((args.out / "eos.json").read_text())["seconds"]
    for eta in [] if args.reuse else args.etas:
        times[str(eta)] = train(eta, args.steps, url, f"eos-eta{eta:g}")
        print(f"η = {eta:g}: {times[str(eta)]:.0f} s", file=sys.stderr, flush=True)
    with open_source(url) as source:
        runs = [source.load(f"eos-eta{eta:g}") for eta in args.etas]
    rows = [summarize(r, eta) for r, eta in zip(runs, args.etas)]
    text = table(rows, times)
    print(text)
    (args.out / "eos.md").write_text(text + "\n")
    (args.out / "eos.json").write_text(json.dumps({"steps": args.steps, "rows": rows, "seconds": times}, indent=1))
    plot(runs, args.etas, args.out / "eos.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
