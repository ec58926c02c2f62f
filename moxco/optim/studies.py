"""Seeded toy studies behind the papers' qualitative optimizer claims.

The test suite runs them at reduced scale (``tests/moxco/optim/test_optim_claims.py``) and
``bench/optim_claims.py`` at full scale; both report the numbers these functions return.

* :func:`hit_rate_study` — MoXCo §4(i) / A.5.3: from poor initialisations on Beale and Ackley,
  how often do GD, Adam (each at its best stable step size on a grid) and MoXCo with GD / Adam bases
  end at the global minimum? MoXCo runs Algorithm 1: Phase 1 (inertial exploration, random β) with
  the goodness score checked every ``check_every`` steps at ``θ`` by the project's
  :class:`~moxco.policy.DecisionPolicy`, Phase 2 (:meth:`MoXCo.commit`, hypergradient step size,
  multiplicative rule) when the policy fires or after the Phase-1 budget ``T₁``.
* :func:`escape_study` — Adam+CM fig. 6-7: on the sharp/flat family (eq. 9), the fraction of runs
  from ``U[−5, 5]^D`` that end at the flat minimum (the origin) for Adam, Adam+CG, Adam+CM.
* :func:`loss_sharpness_study` — Adam+CM table 1: final loss and sharpness (top Hessian eigenvalue)
  of Adam vs Adam+CM (and Adam+CG) on Goldstein-Price and Levy.
* :func:`escape_count_study` — the short MoXCo paper's Fig. 2: on a 1-D function with a flat and a
  sharp minimum (the sharp/flat family, eq. 9 of Adam+CM, D = 1), how many of the runs of GD, Adam,
  MoXCo-GD and MoXCo-Adam end at the flat minimum.

Goodness is scored in the form of the paper whose experiment a study reproduces: the full paper's
eq. 6 (relative, ``|λ/λ_target − 1|``) for the hit rates on Beale and Ackley (and the 2-layer ReLU
regression of ``examples/landscapes.py``), the short paper's hinge ``(λ − 1/η̃)_+`` for its escape
count (``MoXCoSetting.form``).

Runs are independent: each initialisation is its own parameter tensor (shape ``(d,)``), every
optimizer used here acts per tensor (coordinate-wise, or ``buffer_scope="tensor"`` for the CM/CG
buffers), and the losses of all runs are summed before ``backward`` (so one backward pass serves
all runs). MoXCo runs have one optimizer per run (their phase switches are per run).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from moxco import landscapes
from moxco.goodness import GOODNESS_FORMS, eos_sharpness, goodness
from moxco.optim.critical import AdamCG, AdamCM
from moxco.optim.moxco_wrapper import PHASE_COMMIT, MoXCo
from moxco.policy import DecisionPolicy, PolicyConfig

LossFn = Callable[[Tensor], Tensor]
DT = torch.float64

__all__ = [
    "sample_box",
    "run_independent",
    "run_moxco",
    "top_hessian_eigenvalue",
    "hit_rate_study",
    "escape_study",
    "loss_sharpness_study",
    "escape_count_study",
    "MoXCoSetting",
]


# --------------------------------------------------------------------------------------------
# runners
# --------------------------------------------------------------------------------------------


def sample_box(low: Sequence[float], high: Sequence[float], n: int, seed: int) -> Tensor:
    """``n`` points uniform in the box ``[low, high]`` (float64), from a seeded generator."""
    lo = torch.tensor(low, dtype=DT)
    hi = torch.tensor(high, dtype=DT)
    u = torch.rand(n, lo.numel(), generator=torch.Generator().manual_seed(int(seed)), dtype=DT)
    return lo + u * (hi - lo)


def run_independent(fn: LossFn, x0: Tensor, make_optimizer: Callable[[List[Tensor]], torch.optim.Optimizer], steps: int,
                    *, lr_drop_at: Optional[int] = None, lr_drop: float = 0.1) -> Tensor:
    """Run one optimizer over ``len(x0)`` independent parameter tensors for ``steps`` steps and
    return the final points ``(n, d)`` (NaN rows for runs that blew up). ``lr_drop_at``: multiply
    every group's lr by ``lr_drop`` once at that step (Adam+CM §4's protocol)."""
    params = [torch.nn.Parameter(row.clone()) for row in x0]
    opt = make_optimizer(params)
    for t in range(steps):
        if lr_drop_at is not None and t == lr_drop_at:
            for g in opt.param_groups:
                g["lr"] *= lr_drop
        opt.zero_grad(set_to_none=False)
        fn(torch.stack(params)).sum().backward()
        opt.step()
    with torch.no_grad():
        out = torch.stack([p.detach() for p in params])
        bad = ~torch.isfinite(out).all(dim=1) | (out.abs().amax(dim=1) > 1e12)
        out[bad] = math.nan
    return out


def top_hessian_eigenvalue(fn: LossFn, X: Tensor) -> Tensor:
    """Exact ``λ_max(∇²f(x))`` for each row of ``X`` (small ``d``: the full Hessian by ``torch.func``)."""
    out = torch.full(X.shape[:1], math.nan, dtype=X.dtype)
    finite = torch.isfinite(X).all(dim=1)
    if finite.any():
        # reverse-over-reverse: torch.func.hessian's forward mode loads deprecated jit decompositions
        H = torch.func.vmap(torch.func.jacrev(torch.func.jacrev(fn)))(X[finite])
        ok = torch.isfinite(H).flatten(1).all(dim=1)
        lam = torch.full(H.shape[:1], math.nan, dtype=X.dtype)
        if ok.any():
            lam[ok] = torch.linalg.eigvalsh(H[ok])[..., -1]
        out[finite] = lam
    return out


@dataclass(frozen=True)
class MoXCoSetting:
    """One MoXCo configuration of the hit-rate study (Algorithm 1 with a black-box base)."""

    base: str  # "gd" or "adam"
    lr: float
    alpha: float = 0.9
    tau: float = 0.2
    threshold: float = 0.85
    check_every: int = 10
    phase1_fraction: float = 0.7  # Phase-1 budget T₁ = fraction · steps (Algorithm 1's T₁)
    restart: Tuple[float, float] = (0.1, 0.1)
    hypergrad_lr: float = 1e-2  # MoXCo A.4: β_hypergradient = 1e-2 in §4
    hypergrad_rule: str = "multiplicative"
    form: str = "relative"  # goodness: MoXCo eq. 6 (full paper); "eos": the short paper's hinge

    def __post_init__(self) -> None:
        if self.form not in GOODNESS_FORMS:
            raise ValueError(f"form must be one of {GOODNESS_FORMS}, got {self.form!r}")

    def label(self) -> str:
        return f"MoXCo-{'GD' if self.base == 'gd' else 'Adam'}"


def run_moxco(fn: LossFn, x0: Tensor, setting: MoXCoSetting, steps: int, *, loss_target: float = 0.0,
              seed: int = 0) -> Tuple[Tensor, List[Optional[int]]]:
    """MoXCo (Algorithm 1) from every row of ``x0``: one optimizer per run, goodness (``setting.form``:
    MoXCo eq. 6 by default, or the short paper's hinge; ``λ_target`` resp. the bound
    ``1/η̃ = eos_sharpness(η, α, E[β])``) at ``θ`` every ``check_every`` steps fed to a
    :class:`DecisionPolicy` (threshold ``C``, one probe), commit on its decision or at ``T₁``.
    Returns final ``θ`` (n, d) and the step each run committed at."""
    base = torch.optim.SGD if setting.base == "gd" else torch.optim.Adam
    params = [torch.nn.Parameter(row.clone()) for row in x0]
    opts = [MoXCo([p], base, lr=setting.lr, alpha=setting.alpha, beta="random", hypergrad_lr=setting.hypergrad_lr,
                  hypergrad_rule=setting.hypergrad_rule, seed=seed * 100003 + i) for i, p in enumerate(params)]
    action = {"phase": 2, "alpha": setting.restart[0], "beta": setting.restart[1]}
    policies = [DecisionPolicy(PolicyConfig(threshold=setting.threshold, consecutive=1, action=action)) for _ in params]
    target = eos_sharpness(setting.lr, setting.alpha, 0.5)
    budget = max(1, int(round(setting.phase1_fraction * steps)))
    grad_fn = torch.func.vmap(torch.func.grad(fn))
    committed: List[Optional[int]] = [None] * len(params)
    for t in range(1, steps + 1):
        for o in opts:
            o.zero_grad(set_to_none=False)
        fn(torch.stack(params)).sum().backward()
        for o in opts:
            o.step()
        exploring = [i for i, o in enumerate(opts) if o.phase != PHASE_COMMIT]
        if not exploring:
            continue
        if t % setting.check_every == 0:
            theta = torch.stack([opts[i].theta_tensors()[0] for i in exploring])
            with torch.no_grad():
                f = fn(theta)
            g2 = (grad_fn(theta) ** 2).sum(dim=-1)
            lam = top_hessian_eigenvalue(fn, theta)
            for j, i in enumerate(exploring):
                score = goodness(float(g2[j]), float(lam[j]), float(f[j]), tau=setting.tau, sharpness_target=target,
                                 loss_target=loss_target, form=setting.form)
                decision = policies[i].observe(t, score)
                if decision is not None:
                    opts[i].commit(alpha=decision.action["alpha"], beta=decision.action["beta"])
                    committed[i] = t
        if t == budget:
            for i in exploring:
                if opts[i].phase != PHASE_COMMIT:
                    opts[i].commit(alpha=setting.restart[0], beta=setting.restart[1])
                    committed[i] = -t  # negative: committed by the Phase-1 budget, not by the policy
    with torch.no_grad():
        out = torch.stack([o.theta_tensors()[0].clone() for o in opts])
        bad = ~torch.isfinite(out).all(dim=1) | (out.abs().amax(dim=1) > 1e12)
        out[bad] = math.nan
    return out, committed


# --------------------------------------------------------------------------------------------
# studies
# --------------------------------------------------------------------------------------------


def _fraction(mask: Tensor) -> float:
    return float(mask.to(DT).mean()) if mask.numel() else math.nan


def _rates(X: Tensor, minimiser: Tensor, radius: float) -> Dict[str, float]:
    finite = torch.isfinite(X).all(dim=1)
    dist = torch.where(finite, (X - minimiser).norm(dim=1), torch.full_like(X[:, 0], math.inf))
    return {"hit_rate": _fraction(dist < radius), "diverged": _fraction(~finite)}


HIT_RATE_SETUPS: Dict[str, Dict[str, Any]] = {
    # "far right" of Beale (MoXCo Fig. 2 starts there); minimum (3, 0.5)
    "beale": {"box": ((3.5, -1.0), (4.5, 1.0)), "minimiser": (3.0, 0.5), "radius": 0.1},
    # Ackley away from the central hole (MoXCo Fig. 1 starts top-left); minimum (0, 0)
    "ackley": {"box": ((-4.0, -4.0), (4.0, 4.0)), "minimiser": (0.0, 0.0), "radius": 0.1},
}


def hit_rate_study(landscape: str, *, n_inits: int, steps: int, seed: int, baseline_lrs: Sequence[float],
                   moxco_settings: Sequence[MoXCoSetting]) -> Dict[str, Any]:
    """Hit rates of GD and Adam at every lr of ``baseline_lrs`` (and the best *stable* one: the
    highest hit rate among lrs where no run diverged) and of each MoXCo setting."""
    setup = HIT_RATE_SETUPS[landscape]
    fn = getattr(landscapes, landscape)
    x0 = sample_box(*setup["box"], n=n_inits, seed=seed)
    minimiser = torch.tensor(setup["minimiser"], dtype=DT)
    out: Dict[str, Any] = {"landscape": landscape, "n_inits": n_inits, "steps": steps, "seed": seed, "baselines": {}, "moxco": []}
    for name, cls in (("GD", torch.optim.SGD), ("Adam", torch.optim.Adam)):
        per_lr = {}
        for lr in baseline_lrs:
            X = run_independent(fn, x0, lambda ps: cls(ps, lr=lr, foreach=True), steps)
            per_lr[lr] = _rates(X, minimiser, setup["radius"])
        stable = {lr: r for lr, r in per_lr.items() if r["diverged"] == 0.0}
        pool = stable if stable else per_lr
        best_lr = max(pool, key=lambda lr: (pool[lr]["hit_rate"], lr))
        out["baselines"][name] = {"per_lr": per_lr, "best_lr": best_lr, "best": per_lr[best_lr]}
    for setting in moxco_settings:
        X, committed = run_moxco(fn, x0, setting, steps, seed=seed)
        rates = _rates(X, minimiser, setup["radius"])
        rates.update({"setting": setting, "label": setting.label(),
                      "committed_by_policy": _fraction(torch.tensor([c is not None and c > 0 for c in committed])),
                      "committed_by_budget": _fraction(torch.tensor([c is not None and c < 0 for c in committed]))})
        out["moxco"].append(rates)
    return out


def escape_study(dim: int, s_values: Sequence[float], *, n_inits: int, steps: int, seed: int, lr: float = 0.05,
                 betas: Tuple[float, float] = (0.9, 0.99), capacity: int = 20, decay: float = 0.99,
                 tol: float = 0.1) -> Dict[str, Any]:
    """Escape ratio on ``sharp_flat`` (Adam+CM eq. 9): fraction of runs from ``U[−5, 5]^D`` whose
    final point is the flat minimum (every coordinate within ``tol`` of 0); also the fraction of
    coordinates at 0. Adam+CM's setting: lr 0.05, C = 20, λ = 0.99 (A.2.2)."""
    sharp_flat = landscapes.sharp_flat
    x0 = sample_box([-5.0] * dim, [5.0] * dim, n=n_inits, seed=seed)
    makers = {
        "Adam": lambda ps: torch.optim.Adam(ps, lr=lr, betas=betas, foreach=True),
        "Adam+CG": lambda ps: AdamCG(ps, lr=lr, betas=betas, buffer_capacity=capacity, buffer_decay=decay,
                                     buffer_scope="tensor", foreach=True),
        "Adam+CM": lambda ps: AdamCM(ps, lr=lr, betas=betas, buffer_capacity=capacity, buffer_decay=decay,
                                     buffer_scope="tensor", foreach=True),
    }
    out: Dict[str, Any] = {"dim": dim, "n_inits": n_inits, "steps": steps, "seed": seed, "rows": []}
    for s in s_values:
        row: Dict[str, Any] = {"s": float(s)}
        for name, make in makers.items():
            X = run_independent(lambda x: sharp_flat(x, s), x0, make, steps)
            at_zero = X.abs() < tol
            row[name] = {"escape": _fraction(at_zero.all(dim=1)), "coords_flat": _fraction(at_zero)}
        out["rows"].append(row)
    return out


LOSS_SHARPNESS_SETUPS: Dict[str, Dict[str, Any]] = {
    "levy": {"fn": "levy", "box": ((-10.0, -10.0), (10.0, 10.0))},
    "log_goldstein_price": {"fn": "log_goldstein_price", "box": ((-2.0, -2.0), (2.0, 2.0))},
}


def loss_sharpness_study(landscape: str, *, n_inits: int, steps: int, seed: int, lr: float = 0.1) -> Dict[str, Any]:
    """Adam+CM table 1: mean final loss and sharpness over ``n_inits`` starts (uniform in the usual
    box) for Adam (β₂ = 0.99), Adam+CG (C = 5, λ = 0.7) and Adam+CM (β₂ = 0.999, C = 20, λ = 0.99),
    the table 11 settings, lr 0.1 divided by 10 half way (the §4 Ackley protocol)."""
    setup = LOSS_SHARPNESS_SETUPS[landscape]
    fn = getattr(landscapes, setup["fn"])
    x0 = sample_box(*setup["box"], n=n_inits, seed=seed)
    makers = {
        "Adam": lambda ps: torch.optim.Adam(ps, lr=lr, betas=(0.9, 0.99), foreach=True),
        "Adam+CG": lambda ps: AdamCG(ps, lr=lr, betas=(0.9, 0.99), buffer_capacity=5, buffer_decay=0.7,
                                     buffer_scope="tensor", foreach=True),
        "Adam+CM": lambda ps: AdamCM(ps, lr=lr, betas=(0.9, 0.999), buffer_capacity=20, buffer_decay=0.99,
                                     buffer_scope="tensor", foreach=True),
    }
    out: Dict[str, Any] = {"landscape": landscape, "n_inits": n_inits, "steps": steps, "seed": seed}
    for name, make in makers.items():
        X = run_independent(fn, x0, make, steps, lr_drop_at=steps // 2)
        with torch.no_grad():
            loss = fn(X)
        sharp = top_hessian_eigenvalue(fn, X)
        out[name] = {"loss": float(loss.mean()), "sharpness": float(sharp.mean()),
                     "loss_median": float(loss.median()), "sharpness_median": float(sharp.median())}
    return out


def escape_count_study(s: float, *, n_inits: int, steps: int, seed: int, lr: float = 0.05,
                       moxco_settings: Optional[Sequence[MoXCoSetting]] = None, tol: float = 0.1) -> Dict[str, Any]:
    """The short MoXCo paper's escape count (its Fig. 2): ``n_inits`` starts uniform in ``[−5, 5]`` on the
    1-D sharp/flat function ``min(x², s(x − 1)²)`` (flat minimum 0, curvature 2; sharp minimum 1,
    curvature 2s), GD and Adam at ``lr`` and MoXCo over GD and Adam bases (default: α = 0.9, random β,
    τ = 0.15, C = 0.85, restart α = β = 0.1 as the short paper's A.2, goodness in the short paper's
    hinge form against ``1/η̃ = eos_sharpness(lr, α, ½)``). Counts the runs ending within ``tol`` of the
    flat minimum (``flat``) and of the sharp one (``sharp``)."""
    fn = lambda x: landscapes.sharp_flat(x, s)  # noqa: E731
    x0 = sample_box([-5.0], [5.0], n=n_inits, seed=seed)
    if moxco_settings is None:
        moxco_settings = [MoXCoSetting(base, lr, 0.9, tau=0.15, threshold=0.85, form="eos") for base in ("gd", "adam")]
    out: Dict[str, Any] = {"s": float(s), "n_inits": n_inits, "steps": steps, "seed": seed, "lr": lr, "rows": {}}

    def counts(X: Tensor) -> Dict[str, float]:
        x = X[:, 0]
        return {"flat": int(((x - 0.0).abs() < tol).sum()), "sharp": int(((x - 1.0).abs() < tol).sum()),
                "diverged": int((~torch.isfinite(x)).sum())}

    for name, cls in (("GD", torch.optim.SGD), ("Adam", torch.optim.Adam)):
        out["rows"][name] = counts(run_independent(fn, x0, lambda ps: cls(ps, lr=lr, foreach=True), steps))
    for setting in moxco_settings:
        X, committed = run_moxco(fn, x0, setting, steps, seed=seed)
        row = counts(X)
        row["committed_by_policy"] = sum(1 for c in committed if c is not None and c > 0)
        out["rows"][setting.label()] = row
    return out
