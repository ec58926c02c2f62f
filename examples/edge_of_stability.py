"""Edge of stability, plain and adaptive: full-batch GD and Adam on a small tanh network.

* Full-batch GD with step size η: the sharpness ``λ_max(∇²f)`` rises (progressive sharpening) to
  ``2/η`` and then hovers there (Cohen et al. 2021, "Gradient descent on neural networks typically
  occurs at the edge of stability").
* Full-batch Adam with step size η and ``β₁``: the *preconditioned* sharpness ``λ_max(P⁻¹∇²f)``,
  ``P = diag(√v̂ + ε)`` from Adam's own second moments, rises to ``2(1+β₁)/((1−β₁)η)`` (``38/η`` for
  ``β₁ = 0.9``) and hovers there (Cohen et al. 2022, "Adaptive gradient methods at the edge of
  stability"), while its plain sharpness means nothing against ``2/η``.

Data: the first 256 of scikit-learn's 8×8 digits (shipped with the package), pixels scaled to [0, 1]
and centred, one-hot targets, loss ``½‖h(x) − y‖²`` averaged over the samples (the square loss of
Cohen et al.). Network 64→32→32→10 with tanh, torch's default initialisation under seed 0, float32.
The curvature is measured with ``moxco.curvature.Sharpness`` every ``--probe-every`` steps (cold
Lanczos first, then three Hessian-vector products per probe from the kept vector; the Adam run
passes ``preconditioner=optimizer``).

    python examples/edge_of_stability.py --out docs/img/sharpness_eos.png

prints a markdown table (the ratio of the measured sharpness to its edge of stability over windows
of steps) and draws the two curves. ``--quick`` runs half the steps (the test suite uses it).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moxco.curvature import Sharpness  # noqa: E402
from moxco.goodness import adaptive_eos_sharpness, eos_sharpness  # noqa: E402


def digits(n: int = 256):
    """The first ``n`` scikit-learn digits: centred pixels in [0, 1] and one-hot targets (float32)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data[:n], dtype=torch.float32) / 16.0
    x = x - x.mean(dim=0)
    y = torch.nn.functional.one_hot(torch.tensor(data.target[:n]), 10).float()
    return x, y


def network(width: int = 32, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.Tanh(), torch.nn.Linear(width, width),
                               torch.nn.Tanh(), torch.nn.Linear(width, 10))


@dataclass
class Run:
    """One training run: the probe steps, the loss and the measured sharpness there, and its edge."""

    optimizer: str
    lr: float
    edge: float
    steps: List[int] = field(default_factory=list)
    loss: List[float] = field(default_factory=list)
    sharpness: List[float] = field(default_factory=list)  # plain (GD) or preconditioned (Adam)
    plain: List[float] = field(default_factory=list)  # plain sharpness (Adam run: for contrast)

    def ratios(self) -> List[float]:
        return [s / self.edge for s in self.sharpness]


def train(optimizer: str, lr: float, steps: int, probe_every: int, beta1: float = 0.9, seed: int = 0) -> Run:
    """Full-batch ``optimizer`` ("gd" or "adam") for ``steps`` steps, measuring every ``probe_every``."""
    x, y = digits()
    model = network(seed=seed)
    params = list(model.parameters())

    def loss_fn():
        return 0.5 * ((model(x) - y) ** 2).sum(dim=1).mean()

    if optimizer == "gd":
        opt = torch.optim.SGD(params, lr=lr)
        edge = eos_sharpness(lr)
        tracker = Sharpness(params, iters_per_call=3, cold_iters=30, tol=1e-4, generator=torch.Generator().manual_seed(0))
        plain = None
    elif optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr, betas=(beta1, 0.999))
        edge = adaptive_eos_sharpness(lr, beta1)
        tracker = Sharpness(params, iters_per_call=3, cold_iters=30, tol=1e-4, generator=torch.Generator().manual_seed(0),
                            preconditioner=opt)
        plain = Sharpness(params, iters_per_call=3, cold_iters=30, tol=1e-4, generator=torch.Generator().manual_seed(1))
    else:
        raise ValueError(f"optimizer must be 'gd' or 'adam', got {optimizer!r}")
    run = Run(optimizer, lr, edge)
    for t in range(steps + 1):
        if t % probe_every == 0 and t > 0:  # Adam's P exists from its first step on
            run.steps.append(t)
            run.loss.append(float(loss_fn().detach()))
            run.sharpness.append(tracker(loss_fn))
            if plain is not None:
                run.plain.append(plain(loss_fn))
        if t == steps:
            break
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()
    return run


def windows(run: Run, size: int) -> List[Dict[str, float]]:
    """Per window of ``size`` steps: the min, median and max of sharpness / edge."""
    out = []
    for start in range(0, run.steps[-1], size):
        r = [q for t, q in zip(run.steps, run.ratios()) if start < t <= start + size]
        if r:
            out.append({"from": start + 1, "to": start + size, "min": min(r), "median": statistics.median(r),
                        "max": max(r)})
    return out


def table(gd: Run, adam: Run, size: int) -> str:
    lines = [f"| steps | GD: λ_max / (2/η), η = {gd.lr:g} (min · median · max) | "
             f"Adam: λ_max(P⁻¹H) / (2(1+β₁)/((1−β₁)η)), η = {adam.lr:g} | Adam: plain λ_max / (2/η) |",
             "| --- | --- | --- | --- |"]
    adam_plain = Run("adam", adam.lr, eos_sharpness(adam.lr), adam.steps, adam.loss, adam.plain)
    for a, b, c in zip(windows(gd, size), windows(adam, size), windows(adam_plain, size)):
        lines.append(f"| {a['from']}-{a['to']} | {a['min']:.2f} · {a['median']:.2f} · {a['max']:.2f} | "
                     f"{b['min']:.2f} · {b['median']:.2f} · {b['max']:.2f} | {c['median']:.3f} |")
    return "\n".join(lines)


def plot(gd: Run, adam: Run, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 6.5), sharex="col")
    for col, (run, title, label) in enumerate((
            (gd, f"Full-batch GD, η = {gd.lr:g}", "λ_max(∇²f)"),
            (adam, f"Full-batch Adam, η = {adam.lr:g}, β₁ = 0.9", "λ_max(P⁻¹∇²f)"))):
        ax = axes[0, col]
        ax.plot(run.steps, run.sharpness, color="#2563eb", label=label)
        ax.axhline(run.edge, color="#dc2626", ls="--",
                   label="2/η" if run.optimizer == "gd" else "2(1+β₁)/((1−β₁)η) = 38/η")
        ax.set_title(title)
        ax.set_ylabel("sharpness")
        ax.set_ylim(0, 1.4 * run.edge)
        ax.legend(loc="lower right")
        ax = axes[1, col]
        ax.semilogy(run.steps, run.loss, color="#111827")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
    fig.suptitle("Edge of stability on 256 digits, tanh MLP 64→32→32→10, square loss")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gd-lr", type=float, default=0.6, help="GD step size (default 0.6: 2/η ≈ 3.3)")
    parser.add_argument("--adam-lr", type=float, default=0.01, help="Adam step size (default 0.01: 38/η = 3800)")
    parser.add_argument("--steps", type=int, default=600, help="steps per run (default 600)")
    parser.add_argument("--probe-every", type=int, default=10, help="steps between probes (default 10)")
    parser.add_argument("--window", type=int, default=100, help="steps per table row (default 100)")
    parser.add_argument("--quick", action="store_true", help="half the steps, a probe every 20 (for the tests)")
    parser.add_argument("--out", default=None, help="write the plot here (PNG)")
    parser.add_argument("--json", default=None, help="write the measured series here")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.probe_every = args.steps // 2, 20
    torch.set_num_threads(1)
    gd = train("gd", args.gd_lr, args.steps, args.probe_every)
    adam = train("adam", args.adam_lr, args.steps, args.probe_every)
    print(table(gd, adam, args.window))
    if args.out:
        plot(gd, adam, Path(args.out))
    if args.json:
        Path(args.json).write_text(json.dumps({"gd": asdict(gd), "adam": asdict(adam)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
