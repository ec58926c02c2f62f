"""Full-scale reproductions of the optimizer papers' qualitative toy claims; prints markdown tables.

    python bench/optim_claims.py            # full scale (about 10 min on 2 CPU cores)
    python bench/optim_claims.py --quick    # a smaller run, same protocol

Claims (the test suite checks them at reduced scale, tests/moxco/optim/test_optim_claims.py):

1. MoXCo §4(i), A.5.3: from poor initialisations on Beale and Ackley, MoXCo with GD and Adam bases
   reaches the global minimum more often than GD and Adam at their best stable step sizes.
2. Adam+CM fig. 6-7: on the sharp/flat family (eq. 9), D = 1 and D = 10, 50 initialisations, Adam+CM's
   escape ratio exceeds Adam's and Adam+CG's as the sharpness s grows.
3. Adam+CM table 1: on Goldstein-Price and Levy, Adam+CM's final loss and sharpness are lower than
   Adam's.
4. Short MoXCo paper, Fig. 2: on a 1-D function with a flat and a sharp minimum, MoXCo over GD and
   Adam ends at the flat minimum more often than GD and Adam (escape count).

Goodness is scored in each paper's own form: MoXCo eq. 6 (relative) for claim 1, the short paper's
hinge for claim 4.

Protocols are those of ``moxco.optim.studies`` (see docs/optimizers.md, "The papers' toy claims").
Everything is seeded; the numbers are reproducible on the same torch build.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moxco.optim.studies import (  # noqa: E402
    MoXCoSetting, escape_count_study, escape_study, hit_rate_study, loss_sharpness_study,
)

BASELINE_LRS = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1]
MOXCO_LRS = [0.0005, 0.002, 0.005, 0.01, 0.05]
MOXCO_ALPHAS = [0.9, 0.99]
# the papers' own MoXCo settings: Beale Fig. 2 / Fig. 8 (η = 0.005, α = 0.9), Ackley Fig. 10 (GD base,
# η = 0.0005, α = 0.99); the paper gives none for MoXCo-Adam on Ackley: Beale's is reused.
PAPER_SETTINGS = {
    "beale": [MoXCoSetting("gd", 0.005, 0.9), MoXCoSetting("adam", 0.005, 0.9)],
    "ackley": [MoXCoSetting("gd", 0.0005, 0.99), MoXCoSetting("adam", 0.005, 0.9)],
}


def pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.0f}%"


def hit_rates(n_inits: int, steps: int, seed: int) -> None:
    print("## 1. Hit rates from poor initialisations (MoXCo §4(i), A.5.3)\n")
    print(f"{n_inits} initialisations, {steps} steps, seed {seed}; hit = final θ within 0.1 of the global minimiser. "
          "Baselines: best stable lr of the grid (no run diverged). MoXCo: best stable (lr, α) of its grid, and the "
          "papers' setting; Phase 2 by the goodness policy (MoXCo eq. 6, relative form, λ_target = "
          "2(1+α)/(η(1+2·½)), C = 0.85, τ = 0.2) or at T₁ = 70 % of the steps, "
          "restart α = β = 0.1, multiplicative hypergradient β_hg = 0.01.\n")
    print("| landscape | method | lr | α | hit rate | diverged | committed by policy |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for landscape in ("beale", "ackley"):
        grid = [MoXCoSetting(base, lr, a) for base in ("gd", "adam") for lr in MOXCO_LRS for a in MOXCO_ALPHAS]
        paper = PAPER_SETTINGS[landscape]
        r = hit_rate_study(landscape, n_inits=n_inits, steps=steps, seed=seed, baseline_lrs=BASELINE_LRS,
                           moxco_settings=grid + [p for p in paper if p not in grid])
        for name in ("GD", "Adam"):
            b = r["baselines"][name]
            print(f"| {landscape} | {name} (best stable) | {b['best_lr']} | – | {pct(b['best']['hit_rate'])} | "
                  f"{pct(b['best']['diverged'])} | – |")
            unstable = max(b["per_lr"].items(), key=lambda kv: kv[1]["hit_rate"])
            if unstable[1]["hit_rate"] > b["best"]["hit_rate"]:  # an unstable lr that hits more often
                print(f"| {landscape} | {name} (best, any) | {unstable[0]} | – | {pct(unstable[1]['hit_rate'])} | "
                      f"{pct(unstable[1]['diverged'])} | – |")
        for base in ("gd", "adam"):
            rows = [m for m in r["moxco"] if m["setting"].base == base]
            stable = [m for m in rows if m["diverged"] == 0.0] or rows
            best = max(stable, key=lambda m: (m["hit_rate"], m["setting"].lr))
            for tag, m in (("best stable", best), ("paper setting", next(m for m in rows if m["setting"] in paper))):
                s = m["setting"]
                print(f"| {landscape} | {m['label']} ({tag}) | {s.lr} | {s.alpha} | {pct(m['hit_rate'])} | "
                      f"{pct(m['diverged'])} | {pct(m['committed_by_policy'])} |")
    print()


def escapes(n_inits: int, steps_1d: int, steps_10d: int, seed: int) -> None:
    print("## 2. Escape ratio on the sharp/flat family (Adam+CM eq. 9, fig. 6-7)\n")
    print(f"{n_inits} starts in U[−5, 5]^D, lr 0.05, β = (0.9, 0.99), λ = 0.99; escape = final point at the flat "
          "minimum (every coordinate within 0.1 of 0); in brackets the fraction of coordinates at 0.\n")
    s_values = [2.0, 5.0, 10.0, 20.0, 50.0, 100.0]
    for dim, steps, capacity in ((1, steps_1d, 10), (10, steps_10d, 20)):
        r = escape_study(dim, s_values, n_inits=n_inits, steps=steps, seed=seed, capacity=capacity)
        print(f"D = {dim}, C = {capacity}, {steps} steps\n")
        print("| s | Adam | Adam+CG | Adam+CM |")
        print("| --- | --- | --- | --- |")
        for row in r["rows"]:
            cells = [f"{pct(row[k]['escape'])} ({pct(row[k]['coords_flat'])})" for k in ("Adam", "Adam+CG", "Adam+CM")]
            print(f"| {row['s']:g} | " + " | ".join(cells) + " |")
        print()


def loss_sharpness(n_inits: int, steps: int, seeds: int) -> None:
    print("## 3. Final loss and sharpness (Adam+CM table 1)\n")
    print(f"{n_inits} starts × {seeds} seeds, {steps} steps, lr 0.1 (÷10 half way); means (medians).\n")
    print("| function | optimizer | loss | sharpness |")
    print("| --- | --- | --- | --- |")
    for landscape in ("log_goldstein_price", "levy"):
        acc = {}
        for seed in range(seeds):
            r = loss_sharpness_study(landscape, n_inits=n_inits, steps=steps, seed=seed)
            for name in ("Adam", "Adam+CG", "Adam+CM"):
                for key, value in r[name].items():
                    acc.setdefault(name, {}).setdefault(key, []).append(value)
        for name, values in acc.items():
            mean = {k: sum(v) / len(v) for k, v in values.items()}
            print(f"| {landscape} | {name} | {mean['loss']:.3f} ({mean['loss_median']:.3f}) | "
                  f"{mean['sharpness']:.2f} ({mean['sharpness_median']:.2f}) |")
    print()


def escape_counts(n_inits: int, steps: int, seed: int) -> None:
    print("## 4. Escape count on a 1-D flat/sharp function (short MoXCo paper, Fig. 2)\n")
    print(f"{n_inits} starts in U[−5, 5], {steps} steps, lr 0.05; f = min(x², s(x − 1)²): flat minimum 0 "
          "(curvature 2), sharp minimum 1 (curvature 2s). MoXCo: α = 0.9, random β, goodness in the short "
          "paper's hinge form (λ bound 2(1+α)/(η(1+2·½)) = 38), τ = 0.15, C = 0.85, restart α = β = 0.1. "
          "Cells: runs ending at the flat / sharp minimum (within 0.1).\n")
    print("| s | GD | Adam | MoXCo-GD | MoXCo-Adam |")
    print("| --- | --- | --- | --- | --- |")
    for s in (10.0, 100.0):
        r = escape_count_study(s, n_inits=n_inits, steps=steps, seed=seed)
        cells = [f"{r['rows'][k]['flat']} / {r['rows'][k]['sharp']}" for k in ("GD", "Adam", "MoXCo-GD", "MoXCo-Adam")]
        print(f"| {s:g} | " + " | ".join(cells) + " |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller run (fewer initialisations and steps)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=["hit", "escape", "table1", "escape_count"], default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.time()
    print(f"# Optimizer claims (torch {torch.__version__}{', quick' if args.quick else ''})\n")
    if args.only in (None, "hit"):
        hit_rates(n_inits=16 if args.quick else 50, steps=600 if args.quick else 1000, seed=args.seed)
    if args.only in (None, "escape"):
        escapes(n_inits=20 if args.quick else 50, steps_1d=300 if args.quick else 500,
                steps_10d=500 if args.quick else 1500, seed=args.seed)
    if args.only in (None, "table1"):
        loss_sharpness(n_inits=20, steps=500, seeds=2 if args.quick else 5)
    if args.only in (None, "escape_count"):
        escape_counts(n_inits=20 if args.quick else 50, steps=500 if args.quick else 1000, seed=args.seed)
    print(f"_total {time.time() - start:.0f} s_")


if __name__ == "__main__":
    main()
