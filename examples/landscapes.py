"""Pictures of the optimizers of the MoXCo and Adam+CM papers on their toy problems.

    python examples/landscapes.py --out DIR [--quick] [--seeds N] [--seed S]

Writes into ``DIR``:

* ``beale.png``, ``ackley.png``, ``goldstein_price.png``: trajectories of GD, Adam, MoXCo-GD,
  MoXCo-Adam and Adam+CM from one start on a contour plot of the landscape, with the start, the
  global minimum, every end point and the Phase-2 switch of the MoXCo runs marked.
* ``relu_cdf.png``: the 2-layer ReLU regression "hit-rate" CDFs of MoXCo §4(iii) / Fig. 3
  (N initialisations, m = 5 hidden units, n = 30 samples, label noise σ = 0.8), GD vs MoXCo-GD.
* ``summary.json``: the numbers behind the pictures (also printed as tables on stdout): per
  landscape and method the trajectory's end point, final loss and switch step, and over ``N``
  random starts in the landscape's "poor initialisation" box the hit rate (final θ within 0.1 of
  the global minimiser), divergence rate, mean final loss and the switch steps; for the
  regression the four metrics per initialisation and their CDF "hit rates".

The MoXCo runs are the product's Algorithm 1, run by :func:`moxco.optim.studies.run_moxco`: the
goodness score (:func:`moxco.goodness.goodness`, the full paper's eq. 6 (relative form), ``τ = 0.2``,
``λ_target`` the optimizer's own edge-of-stability bound) is evaluated at ``θ`` every 10 steps and fed to a
:class:`moxco.policy.DecisionPolicy` (``C = 0.85``); its decision is applied with
``MoXCo.commit(alpha=0.1, beta=0.1)`` (Phase 2: hypergradient step size). A run the policy never
switches is committed at the Phase-1 budget ``T₁`` = 70 % of the steps (Algorithm 1's ``T₁``);
the pictures mark the two cases differently. Trajectories are recorded with a torch optimizer
step post-hook around the unchanged study runners, so the plotted paths are exactly the runs the
studies (and ``bench/optim_claims.py``) measure.

Settings (the ``SCENES`` table below): Beale and Ackley use the best stable step sizes of
``bench/optim_claims.py``'s grids (docs/optimizers.md, "The papers' toy claims") and the MoXCo
paper's 1000 steps; Goldstein-Price is Adam+CM's log form (eq. 12) with Adam+CM table 11's
protocol (500 steps, lr ÷ 10 half way for the non-MoXCo methods; MoXCo keeps its step size, the
paper pairs it with no schedule). ``--quick`` shortens everything (for the test suite); its
numbers are not the ones to quote.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

os.environ.setdefault("MPLBACKEND", "Agg")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_post_hook  # noqa: E402
from tqdm import tqdm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moxco import landscapes  # noqa: E402
from moxco.optim import AdamCM, MoXCo  # noqa: E402
from moxco.optim.studies import (  # noqa: E402
    MoXCoSetting,
    run_independent,
    run_moxco,
    sample_box,
    top_hessian_eigenvalue,
)

DT = torch.float64
HIT_RADIUS = 0.1  # hit = final θ within this distance of the global minimiser (MoXCo §4(i) study)

# --------------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One optimizer of a picture: a torch / moxco optimizer at a fixed step size."""

    label: str
    kind: str  # "gd", "adam", "adamcm" or "moxco"
    lr: float
    alpha: float = 0.9  # MoXCo only
    base: str = "gd"  # MoXCo only: "gd" or "adam"

    @property
    def is_moxco(self) -> bool:
        return self.kind == "moxco"

    def setting(self) -> MoXCoSetting:
        """The study's MoXCo setting (τ = 0.2, C = 0.85, probes every 10 steps, T₁ = 70 %, restart
        α = β = 0.1, multiplicative hypergradient β_hg = 1e-2: the defaults of MoXCoSetting)."""
        return MoXCoSetting(self.base, self.lr, self.alpha)

    def make(self, params: List[torch.Tensor]) -> torch.optim.Optimizer:
        """The optimizer of a non-MoXCo method over independent parameter tensors."""
        if self.kind == "gd":
            return torch.optim.SGD(params, lr=self.lr, foreach=True)
        if self.kind == "adam":
            return torch.optim.Adam(params, lr=self.lr, betas=(0.9, 0.99), foreach=True)
        if self.kind == "adamcm":  # Adam+CM table 11: β₂ = 0.999, C = 20, λ = 0.99
            return AdamCM(params, lr=self.lr, betas=(0.9, 0.999), buffer_capacity=20, buffer_decay=0.99,
                          buffer_scope="tensor", foreach=True)
        raise ValueError(f"{self.label}: MoXCo runs go through run_moxco")

    def to_dict(self) -> Dict[str, Any]:
        out = {"label": self.label, "kind": self.kind, "lr": self.lr}
        if self.is_moxco:
            s = self.setting()
            out.update(base=self.base, alpha=self.alpha, beta="random", tau=s.tau, threshold=s.threshold,
                       check_every=s.check_every, phase1_fraction=s.phase1_fraction, restart=list(s.restart),
                       hypergrad_lr=s.hypergrad_lr, hypergrad_rule=s.hypergrad_rule)
        return out


@dataclass(frozen=True)
class Scene:
    """A landscape picture: the function, one start, the box of random starts, the methods."""

    key: str  # output file stem
    landscape: str  # moxco.landscapes registry name
    title: str
    start: Tuple[float, float]
    box: Tuple[Tuple[float, float], Tuple[float, float]]  # random starts for the hit rates
    view: Tuple[Tuple[float, float], Tuple[float, float]]  # plotted window (x range, y range)
    steps: int
    methods: Tuple[Method, ...]
    log_contour: bool  # contour levels of log10(f − f_min + offset)
    lr_drop: bool = False  # non-MoXCo methods: lr ÷ 10 at steps // 2 (Adam+CM §4 protocol)
    source: str = ""

    @property
    def info(self) -> landscapes.Landscape:
        return landscapes.LANDSCAPES[self.landscape]

    @property
    def fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.info.fn

    @property
    def minimiser(self) -> Tuple[float, float]:
        return tuple(self.info.global_minima[0])  # type: ignore[return-value]

    @property
    def f_min(self) -> float:
        return float(self.info.global_min_value)


SCENES: Tuple[Scene, ...] = (
    Scene(
        key="beale", landscape="beale", title="Beale, start on the far right (MoXCo Fig. 2 / Fig. 8)",
        start=(4.0, -0.6), box=((3.5, -1.0), (4.5, 1.0)), view=((-1.0, 4.6), (-1.6, 1.6)), steps=1000,
        methods=(
            Method("GD", "gd", 0.005),
            Method("Adam", "adam", 0.1),
            Method("MoXCo-GD", "moxco", 0.002, alpha=0.9, base="gd"),
            Method("MoXCo-Adam", "moxco", 0.01, alpha=0.9, base="adam"),
            Method("Adam+CM", "adamcm", 0.1),
        ),
        log_contour=True,
        source="best stable lr of bench/optim_claims.py's grids (GD 0.005, Adam 0.1, MoXCo-GD 0.002/α 0.9, "
               "MoXCo-Adam 0.01/α 0.9); Adam+CM at Adam's lr",
    ),
    Scene(
        key="ackley", landscape="ackley", title="Ackley, start top-left (MoXCo Fig. 1 / Fig. 10)",
        start=(-3.2, 2.8), box=((-4.0, -4.0), (4.0, 4.0)), view=((-4.5, 4.5), (-4.5, 4.5)), steps=1000,
        methods=(
            Method("GD", "gd", 0.05),
            Method("Adam", "adam", 0.05),
            Method("MoXCo-GD", "moxco", 0.002, alpha=0.99, base="gd"),
            Method("MoXCo-Adam", "moxco", 0.005, alpha=0.9, base="adam"),
            Method("Adam+CM", "adamcm", 0.05),
        ),
        log_contour=False,
        source="GD / Adam η = 0.05 (MoXCo Fig. 10); MoXCo-GD best stable of the bench grid (0.002, α 0.99); "
               "MoXCo-Adam 0.005/α 0.9 (the bench's paper setting); Adam+CM at Adam's lr",
    ),
    Scene(
        key="goldstein_price", landscape="log_goldstein_price",
        title="Goldstein-Price (log form, Adam+CM eq. 12 / Fig. 1)",
        start=(1.5, 1.5), box=((-2.0, -2.0), (2.0, 2.0)), view=((-2.0, 2.0), (-2.0, 2.0)), steps=500,
        methods=(
            Method("GD", "gd", 0.01),
            Method("Adam", "adam", 0.1),
            Method("MoXCo-GD", "moxco", 0.01, alpha=0.9, base="gd"),
            Method("MoXCo-Adam", "moxco", 0.005, alpha=0.9, base="adam"),
            Method("Adam+CM", "adamcm", 0.1),
        ),
        log_contour=False,  # eq. 12 is already the log of Goldstein-Price
        lr_drop=True,
        source="Adam / Adam+CM lr 0.1 ÷ 10 at half (Adam+CM table 11); GD 0.01 and MoXCo-GD 0.01/α 0.9 (best of a "
               "small grid, 50 starts); MoXCo-Adam 0.005/α 0.9 (the MoXCo papers' value)",
    ),
)

COLORS = {"GD": "#e377c2", "Adam": "#1f77b4", "MoXCo-GD": "#d62728", "MoXCo-Adam": "#ff7f0e", "Adam+CM": "#2ca02c"}


# --------------------------------------------------------------------------------------------
# runs
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def recording(keep: Callable[[torch.optim.Optimizer], Optional[torch.Tensor]]) -> Iterator[List[torch.Tensor]]:
    """Record ``keep(optimizer)`` after every optimizer step taken inside the block (a global torch
    step post-hook; ``keep`` returns None for optimizers it is not interested in)."""
    points: List[torch.Tensor] = []

    def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        point = keep(optimizer)
        if point is not None:
            points.append(point.detach().clone())

    handle = register_optimizer_step_post_hook(hook)
    try:
        yield points
    finally:
        handle.remove()


def _moxco_theta(optimizer: torch.optim.Optimizer) -> Optional[torch.Tensor]:
    # the MoXCo wrapper only (its base optimizer steps too); the model holds v_t, θ_t is what moves
    return optimizer.theta_tensors()[0] if isinstance(optimizer, MoXCo) else None


def _first_param(optimizer: torch.optim.Optimizer) -> Optional[torch.Tensor]:
    return optimizer.param_groups[0]["params"][0]


@dataclass
class Trajectory:
    path: np.ndarray  # (steps + 1, 2): the start, then θ after every step
    switch_step: Optional[int] = None  # step of the Phase-2 commit (MoXCo only)
    switch_by: Optional[str] = None  # "policy" or "budget"


def trajectory(scene: Scene, method: Method, steps: int, seed: int) -> Trajectory:
    """One run from ``scene.start`` through the study runners, with every iterate recorded."""
    x0 = torch.tensor([scene.start], dtype=DT)
    if method.is_moxco:
        with recording(_moxco_theta) as points:
            final, committed = run_moxco(scene.fn, x0, method.setting(), steps, loss_target=scene.f_min, seed=seed)
        c = committed[0]
        switch, by = (None, None) if c is None else (abs(c), "policy" if c > 0 else "budget")
    else:
        with recording(_first_param) as points:
            final = run_independent(scene.fn, x0, method.make, steps,
                                    lr_drop_at=steps // 2 if scene.lr_drop else None)
        switch, by = None, None
    path = torch.cat([x0, torch.stack(points)]).numpy()
    if len(points) != steps:
        raise RuntimeError(f"{method.label}: recorded {len(points)} steps, expected {steps}")
    if not torch.allclose(torch.from_numpy(path[-1:]), final, equal_nan=True):  # the recording is the run
        raise RuntimeError(f"{method.label}: recorded end point {path[-1]} differs from the run's {final[0]}")
    return Trajectory(path, switch, by)


def hit_rates(scene: Scene, method: Method, n: int, steps: int, seed: int) -> Dict[str, Any]:
    """Final points of ``n`` runs from ``U(scene.box)`` (the study's sample_box) and their statistics."""
    x0 = sample_box(*scene.box, n=n, seed=seed)
    committed: List[Optional[int]] = [None] * n
    if method.is_moxco:
        X, committed = run_moxco(scene.fn, x0, method.setting(), steps, loss_target=scene.f_min, seed=seed)
    else:
        X = run_independent(scene.fn, x0, method.make, steps, lr_drop_at=steps // 2 if scene.lr_drop else None)
    finite = torch.isfinite(X).all(dim=1)
    dist = (X - torch.tensor(scene.minimiser, dtype=DT)).norm(dim=1)
    with torch.no_grad():
        loss = scene.fn(X)
    out: Dict[str, Any] = {
        "n": n,
        "hit_rate": float((finite & (dist < HIT_RADIUS)).to(DT).mean()),
        "diverged": float((~finite).to(DT).mean()),
        "final_loss_mean": float(loss[finite].mean()) if finite.any() else math.nan,
        "final_loss_median": float(loss[finite].median()) if finite.any() else math.nan,
    }
    if method.is_moxco:
        by_policy = [c for c in committed if c is not None and c > 0]
        out.update(
            committed_by_policy=len(by_policy) / n,
            committed_by_budget=sum(1 for c in committed if c is not None and c < 0) / n,
            switch_step_median=float(np.median([abs(c) for c in committed if c is not None])) if any(
                c is not None for c in committed) else None,
            policy_switch_step_median=float(np.median(by_policy)) if by_policy else None,
        )
    return out


# --------------------------------------------------------------------------------------------
# 2-layer ReLU regression (MoXCo §4(iii), Fig. 3, A.4.2-A.4.4, A.5.4)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReluSetup:
    """MoXCo §4(iii), under-parameterised case: ``ŷᵢ = f(xᵢ) + εᵢ``, ``xᵢ ~ U[0, 1]``,
    ``εᵢ ~ N(0, σ²)``, ``f`` the tent of A.4.2 (``2x`` below 0.5, ``2 − 2x`` above), a two-layer
    ReLU network with ``m`` hidden units in the NTK parameterisation
    ``h(x) = m^{-1/2} Σⱼ aⱼ relu(wⱼx + bⱼ) + c`` (all weights ~ N(0, 1) at initialisation), mean
    squared loss on the ``n`` samples. GD and MoXCo-GD at η = 0.1; MoXCo α = 0.6 with random β (the
    paper: α = β = 0.6, "we can replace constant β with its randomized version"), τ = 0.2, C = 0.85,
    β_hg = 1e-3 (A.5.4), ``f_target = σ²`` (the loss of the true function)."""

    m: int = 5
    n: int = 30
    noise: float = 0.8
    lr: float = 0.1
    alpha: float = 0.6
    hypergrad_lr: float = 1e-3
    steps: int = 2000
    n_val: int = 2000  # fresh noisy samples for the validation MSE
    n_grid: int = 1000  # midpoint Riemann sum on [0, 1] for the L² distance to f
    data_seed: int = 0

    @property
    def dim(self) -> int:
        return 3 * self.m + 1

    def setting(self) -> MoXCoSetting:
        return MoXCoSetting("gd", self.lr, self.alpha, hypergrad_lr=self.hypergrad_lr)


def tent(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x < 0.5, 2.0 * x, 2.0 - 2.0 * x)


def relu_net(theta: torch.Tensor, x: torch.Tensor, m: int) -> torch.Tensor:
    """``h(x; θ)`` for ``θ`` of shape (..., 3m + 1) = [w, b, a, c] and inputs ``x`` (k,) → (..., k)."""
    w, b, a, c = theta[..., :m], theta[..., m:2 * m], theta[..., 2 * m:3 * m], theta[..., 3 * m]
    hidden = torch.relu(w[..., None, :] * x[:, None] + b[..., None, :])
    return (hidden * a[..., None, :]).sum(-1) / math.sqrt(m) + c[..., None]


def relu_problem(setup: ReluSetup) -> Dict[str, Any]:
    gen = torch.Generator().manual_seed(setup.data_seed)
    x = torch.rand(setup.n, generator=gen, dtype=DT)
    y = tent(x) + setup.noise * torch.randn(setup.n, generator=gen, dtype=DT)
    x_val = torch.rand(setup.n_val, generator=gen, dtype=DT)
    y_val = tent(x_val) + setup.noise * torch.randn(setup.n_val, generator=gen, dtype=DT)
    grid = (torch.arange(setup.n_grid, dtype=DT) + 0.5) / setup.n_grid

    def loss(theta: torch.Tensor) -> torch.Tensor:
        return ((relu_net(theta, x, setup.m) - y) ** 2).mean(-1)

    return {"x": x, "y": y, "x_val": x_val, "y_val": y_val, "grid": grid, "loss": loss}


def relu_inits(setup: ReluSetup, n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, setup.dim, generator=torch.Generator().manual_seed(1000 + seed), dtype=DT)


def relu_metrics(setup: ReluSetup, problem: Dict[str, Any], theta: torch.Tensor) -> Dict[str, List[float]]:
    """MoXCo §4(iii)'s four metrics per run (NaN where a run diverged), plus train loss and sharpness."""
    loss = problem["loss"]
    finite = torch.isfinite(theta).all(dim=1)
    safe = torch.where(finite[:, None], theta, torch.zeros_like(theta))
    with torch.no_grad():
        out = {
            "val_mse": ((relu_net(safe, problem["x_val"], setup.m) - problem["y_val"]) ** 2).mean(-1),
            "truth_mse": ((relu_net(safe, problem["x_val"], setup.m) - tent(problem["x_val"])) ** 2).mean(-1),
            "l2_distance": ((relu_net(safe, problem["grid"], setup.m) - tent(problem["grid"])) ** 2).mean(-1).sqrt(),
            "train_mse": loss(safe),
        }
    out["grad_norm"] = torch.func.vmap(torch.func.grad(loss))(safe).norm(dim=-1)
    out["sharpness"] = top_hessian_eigenvalue(loss, safe)
    return {k: [float(v) if bool(finite[i]) else math.nan for i, v in enumerate(t)] for k, t in out.items()}


RELU_METRICS = (
    ("val_mse", "validation MSE (noisy labels)"),
    ("truth_mse", "MSE against the true f"),
    ("grad_norm", "gradient norm ‖∇f(θ)‖"),
    ("l2_distance", "L² distance ‖f_θ − f‖ on [0, 1]"),
)


def relu_study(setup: ReluSetup, n_inits: int, seed: int, progress: tqdm) -> Dict[str, Any]:
    problem = relu_problem(setup)
    x0 = relu_inits(setup, n_inits, seed)
    progress.set_postfix_str("ReLU regression: GD")
    X_gd = run_independent(problem["loss"], x0, lambda ps: torch.optim.SGD(ps, lr=setup.lr, foreach=True), setup.steps)
    progress.update()
    progress.set_postfix_str("ReLU regression: MoXCo-GD")
    X_mx, committed = run_moxco(problem["loss"], x0, setup.setting(), setup.steps, loss_target=setup.noise**2,
                                seed=seed)
    progress.update()
    runs = {"GD": relu_metrics(setup, problem, X_gd), "MoXCo-GD": relu_metrics(setup, problem, X_mx)}
    # "hit rate" (A.4.3): the CDF at a threshold T = fraction of initialisations with metric ≤ T.
    # The neutral threshold reported here is the median of both methods' values pooled.
    hit = {}
    for key, _ in RELU_METRICS:
        pooled = np.array(runs["GD"][key] + runs["MoXCo-GD"][key])
        threshold = float(np.nanmedian(pooled))
        hit[key] = {"threshold": threshold,
                    **{name: float(np.mean(np.array(r[key]) <= threshold)) for name, r in runs.items()}}
    return {
        "setup": {**setup.__dict__, "n_inits": n_inits, "seed": seed, "loss": "mean squared error",
                  "moxco": {**Method("MoXCo-GD", "moxco", setup.lr, setup.alpha).to_dict(),
                            "hypergrad_lr": setup.hypergrad_lr, "loss_target": setup.noise**2}},
        "runs": runs,
        "switch_steps": [None if c is None else abs(c) for c in committed],
        "committed_by_policy": sum(1 for c in committed if c is not None and c > 0) / n_inits,
        "hit_rate_at_pooled_median": hit,
        "medians": {name: {k: float(np.nanmedian(r[k])) for k in r} for name, r in runs.items()},
    }


# --------------------------------------------------------------------------------------------
# pictures
# --------------------------------------------------------------------------------------------


def plot_scene(scene: Scene, trajectories: Dict[str, Trajectory], stats: Dict[str, Dict[str, Any]], path: Path) -> None:
    (x_lo, x_hi), (y_lo, y_hi) = scene.view
    xs, ys = np.linspace(x_lo, x_hi, 400), np.linspace(y_lo, y_hi, 400)
    XX, YY = np.meshgrid(xs, ys)
    with torch.no_grad():
        Z = scene.fn(torch.from_numpy(np.stack([XX, YY], axis=-1))).numpy()
    fig, ax = plt.subplots(figsize=(8.4, 6.6), dpi=100)
    if scene.log_contour:
        Zp, zlabel = np.log10(Z - scene.f_min + 1e-2), f"log₁₀(f − f* + 0.01)"
    else:
        Zp, zlabel = Z, "f" if scene.landscape != "log_goldstein_price" else "log-Goldstein-Price (eq. 12)"
    cf = ax.contourf(XX, YY, Zp, levels=40, cmap="viridis_r", alpha=0.85)
    ax.contour(XX, YY, Zp, levels=20, colors="k", linewidths=0.3, alpha=0.35)
    fig.colorbar(cf, ax=ax, label=zlabel, shrink=0.9)
    handles = []
    for method in scene.methods:
        traj = trajectories[method.label]
        color = COLORS[method.label]
        p = traj.path
        ok = np.isfinite(p).all(axis=1)
        p = p[ok]
        rate = stats[method.label]["hit_rate"]
        label = f"{method.label} (η={method.lr:g}{f', α={method.alpha:g}' if method.is_moxco else ''}; " \
                f"hits {100 * rate:.0f}%)"
        if method.is_moxco and traj.switch_step is not None:
            s = min(traj.switch_step, len(p) - 1)
            ax.plot(p[: s + 1, 0], p[: s + 1, 1], "-", color=color, lw=1.4, alpha=0.9)
            ax.plot(p[s:, 0], p[s:, 1], "-", color=color, lw=2.6, alpha=0.95)
            marker = "D" if traj.switch_by == "policy" else "s"
            ax.plot(p[s, 0], p[s, 1], marker, ms=10, mfc=color, mec="k", mew=1.5, zorder=6)
        else:
            ax.plot(p[:, 0], p[:, 1], "-", color=color, lw=1.8, alpha=0.9)
        ax.plot(p[-1, 0], p[-1, 1], "X", ms=9, color=color, mec="k", mew=0.8, zorder=6)
        handles.append(Line2D([], [], color=color, lw=2, marker="X", mec="k", mew=0.8, ms=8, label=label))
    ax.plot(*scene.start, "o", ms=10, color="k", mfc="white", mew=2, zorder=7)
    ax.plot(*scene.minimiser, "*", ms=18, color="gold", mec="k", mew=1.2, zorder=5, alpha=0.9)
    handles += [
        Line2D([], [], ls="", marker="o", ms=9, color="k", mfc="white", mew=2, label=f"start {scene.start}"),
        Line2D([], [], ls="", marker="*", ms=15, color="gold", mec="k", label=f"global minimum {scene.minimiser}"),
        Line2D([], [], ls="", marker="D", ms=8, mfc="0.7", mec="k", mew=1.5,
               label="MoXCo Phase-2 switch (policy); thick line = Phase 2"),
        Line2D([], [], ls="", marker="s", ms=8, mfc="0.7", mec="k", mew=1.5, label="MoXCo Phase-2 switch (budget T₁)"),
    ]
    ax.set_xlim(x_lo, x_hi)
    ax.set_ylim(y_lo, y_hi)
    ax.set_xlabel("x₁")
    ax.set_ylabel("x₂")
    n = next(iter(stats.values()))["n"]
    ax.set_title(f"{scene.title}\n{scene.steps} steps; hit rate over {n} starts in the box "
                 f"[{scene.box[0][0]:g}, {scene.box[1][0]:g}]×[{scene.box[0][1]:g}, {scene.box[1][1]:g}]", fontsize=10)
    # legend below the axes: never on top of the paths
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.subplots_adjust(bottom=0.25, top=0.9, left=0.08, right=0.98)
    fig.savefig(path)
    plt.close(fig)


def plot_relu(relu: Dict[str, Any], path: Path) -> None:
    setup = relu["setup"]
    fig, axes = plt.subplots(2, 2, figsize=(9.5, 7.2), dpi=100)
    for ax, (key, title) in zip(axes.flat, RELU_METRICS):
        for name, color in (("GD", COLORS["GD"]), ("MoXCo-GD", COLORS["MoXCo-GD"])):
            values = np.sort(np.array(relu["runs"][name][key]))
            values = values[np.isfinite(values)]
            n = len(relu["runs"][name][key])
            if values.size:
                ax.step(np.concatenate([[values[0]], values]), np.arange(values.size + 1) / n, where="post",
                        color=color, lw=2, label=f"{name} (median {np.median(values):.3g})")
        if key == "grad_norm":
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("threshold T")
        ax.set_ylabel("fraction of initialisations ≤ T")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"2-layer ReLU regression, MoXCo §4(iii): CDFs over {setup['n_inits']} initialisations\n"
                 f"m = {setup['m']}, n = {setup['n']}, label noise σ = {setup['noise']}, η = {setup['lr']}, "
                 f"{setup['steps']} steps; MoXCo α = {setup['alpha']}, random β", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def _fmt(v: Any, spec: str = ".3g") -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return format(v, spec)


def print_summary(summary: Dict[str, Any]) -> None:
    print(f"\n# examples/landscapes.py ({'quick' if summary['quick'] else 'full'}, seed {summary['seed']}, "
          f"{summary['n_starts']} starts / initialisations, {summary['seconds']:.0f} s)\n")
    print("## Landscapes: the drawn trajectory, and hit rates over random starts in the box\n")
    print("| landscape | method | lr | end point | final loss | switch step | hit rate | diverged | "
          "mean final loss | switched by policy | median switch step |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for key, scene in summary["landscapes"].items():
        for label, row in scene["methods"].items():
            t, s = row["trajectory"], row["hit_rates"]
            end = "diverged" if t["end"] is None else f"({t['end'][0]:.3f}, {t['end'][1]:.3f})"
            switch = "–" if t["switch_step"] is None else f"{t['switch_step']} ({t['switch_by']})"
            print(f"| {key} | {label} | {row['method']['lr']:g} | {end} | {_fmt(t['final_loss'], '.4g')} | {switch} | "
                  f"{100 * s['hit_rate']:.0f}% | {100 * s['diverged']:.0f}% | {_fmt(s['final_loss_mean'], '.4g')} | "
                  f"{_fmt(s.get('committed_by_policy') and 100 * s['committed_by_policy'], '.0f')}"
                  f"{'%' if 'committed_by_policy' in s else ''} | {_fmt(s.get('switch_step_median'), '.0f')} |")
    relu = summary["relu"]
    print(f"\n## 2-layer ReLU regression (MoXCo §4(iii)): {relu['setup']['n_inits']} initialisations, "
          f"{relu['setup']['steps']} steps\n")
    print("hit rate = CDF at T = fraction of initialisations with metric ≤ T; T = median of both methods pooled.\n")
    print("| metric | T | GD hit rate | MoXCo-GD hit rate | GD median | MoXCo-GD median |")
    print("| --- | --- | --- | --- | --- | --- |")
    for key, _ in RELU_METRICS:
        h = relu["hit_rate_at_pooled_median"][key]
        print(f"| {key} | {h['threshold']:.4g} | {100 * h['GD']:.0f}% | {100 * h['MoXCo-GD']:.0f}% | "
              f"{relu['medians']['GD'][key]:.4g} | {relu['medians']['MoXCo-GD'][key]:.4g} |")
    for key in ("train_mse", "sharpness"):
        print(f"| {key} (not in the paper) | – | – | – | {relu['medians']['GD'][key]:.4g} | "
              f"{relu['medians']['MoXCo-GD'][key]:.4g} |")
    steps = [s for s in relu["switch_steps"] if s is not None]
    print(f"\nMoXCo-GD switched by the policy in {100 * relu['committed_by_policy']:.0f}% of the runs; "
          f"switch steps: median {_fmt(float(np.median(steps)) if steps else None, '.0f')}, "
          f"range {min(steps) if steps else '–'}-{max(steps) if steps else '–'}.")
    print(f"\nPictures and summary.json in {summary['out']}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="output folder (created)")
    parser.add_argument("--quick", action="store_true", help="a short run (fewer steps and starts), for the tests")
    parser.add_argument("--seeds", type=int, default=None,
                        help="random starts per landscape method and ReLU initialisations (default 50; 4 with --quick)")
    parser.add_argument("--seed", type=int, default=0, help="base seed (starts, β draws, initialisations)")
    args = parser.parse_args(argv)
    n = args.seeds if args.seeds is not None else (4 if args.quick else 50)
    if n < 1:
        parser.error("--seeds must be ≥ 1")
    torch.set_num_threads(1)  # many tiny ops: threads only add overhead
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    scale = 0.2 if args.quick else 1.0
    relu_setup = ReluSetup(steps=200 if args.quick else ReluSetup.steps)

    started = time.time()
    total = sum(2 * len(s.methods) for s in SCENES) + 2
    summary: Dict[str, Any] = {"quick": args.quick, "seed": args.seed, "n_starts": n, "out": str(out),
                               "hit_radius": HIT_RADIUS, "landscapes": {}}
    with tqdm(total=total, desc="examples/landscapes", unit="run", file=sys.stderr, dynamic_ncols=True) as progress:
        for scene in SCENES:
            steps = max(10, int(round(scene.steps * scale)))
            scene = dataclasses.replace(scene, steps=steps)
            trajectories, stats = {}, {}
            rows: Dict[str, Any] = {}
            for method in scene.methods:
                progress.set_postfix_str(f"{scene.key}: {method.label}")
                traj = trajectory(scene, method, steps, args.seed)
                progress.update()
                st = hit_rates(scene, method, n, steps, args.seed)
                progress.update()
                trajectories[method.label], stats[method.label] = traj, st
                end = traj.path[-1]
                finite = bool(np.isfinite(end).all())
                with torch.no_grad():
                    final_loss = float(scene.fn(torch.from_numpy(end))) if finite else math.nan
                rows[method.label] = {
                    "method": method.to_dict(),
                    "trajectory": {"start": list(scene.start), "end": end.tolist() if finite else None,
                                   "final_loss": final_loss, "switch_step": traj.switch_step,
                                   "switch_by": traj.switch_by,
                                   "switch_point": traj.path[traj.switch_step].tolist()
                                   if traj.switch_step is not None else None,
                                   "distance_to_minimum": float(np.linalg.norm(end - np.array(scene.minimiser)))
                                   if finite else None},
                    "hit_rates": st,
                }
            png = out / f"{scene.key}.png"
            plot_scene(scene, trajectories, stats, png)
            summary["landscapes"][scene.key] = {
                "landscape": scene.landscape, "png": png.name, "steps": steps, "start": list(scene.start),
                "box": [list(b) for b in scene.box], "minimiser": list(scene.minimiser), "f_min": scene.f_min,
                "lr_drop_at": steps // 2 if scene.lr_drop else None, "settings_source": scene.source, "methods": rows,
            }
        relu = relu_study(relu_setup, n, args.seed, progress)
        plot_relu(relu, out / "relu_cdf.png")
        relu["png"] = "relu_cdf.png"
        summary["relu"] = relu
    summary["seconds"] = time.time() - started
    summary["torch"] = torch.__version__
    (out / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=True))
    print_summary(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
