"""Full-scale reproductions of the audit paper's and MoXCo's claims that ``moxco audit`` checks;
prints markdown tables (docs/audit.md, "Reproductions", shows them with these commands).

    python bench/audit_claims.py eos       --out DIR   # audit paper fig. 5: smoothness vs sharpness at the EOS
    python bench/audit_claims.py first50   --out DIR   # the first 50 steps of GPT-2 / BERT, with x* (8 runs)
    python bench/audit_claims.py pretrain  --out DIR   # 2,000-step GPT-2 / BERT audits (8 runs, CPU-heavy)
    python bench/audit_claims.py proxquant --out DIR   # MoXCo Table 2 in miniature (ProxQuant on digits)

Each writes its store (``DIR/*.db``), its table (``DIR/*.md``), its numbers (``DIR/*.json``) and
its plot (``DIR/*.png``), and records the wall time of every run. ``--quick`` runs the same
protocol at the reduced scale the test suite uses (tests/audit/test_reproductions.py); its
numbers are not the ones to quote.

The protocols live with the examples they run (``examples/smoothness_at_eos.py``,
``examples/pretrain_gpt2.py`` / ``pretrain_bert.py``, ``examples/proxquant_digits.py``); this file
only sizes, times and tabulates them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

# --- 2,000-step pretraining audits --------------------------------------------------------------------

#: (run name, example script, optimizer, random scaling)
PRETRAIN_RUNS = [
    (f"{model}-{opt}{'-rs' if rs else ''}", f"pretrain_{model}.py", opt, rs)
    for model in ("gpt2", "bert") for opt in ("adamw", "sgdm") for rs in (False, True)
]
#: a tiny model (2 layers, width 32, 1,024-token vocabulary, batches of 8 × 32 tokens) so that 2,000 steps with
#: the re-evaluation at every step take minutes on a CPU; one thread (a tiny model's threads only contend)
PRETRAIN_ARGS = ["--hidden", "32", "--seq-len", "32", "--batch-size", "8", "--vocab-size", "1024",
                 "--corpus-bytes", "500000", "--reeval-every", "1", "--probe-every", "25", "--device", "cpu", "--quiet"]
PRETRAIN_ENV = {"OMP_NUM_THREADS": "1"}


def _run_example(command: list, what: str) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **PRETRAIN_ENV})
    if result.returncode != 0:
        raise SystemExit(f"{what} failed:\n{result.stdout}\n{result.stderr}")
    return round(time.perf_counter() - started, 1)


def pretrain(out: Path, steps: int, extra: list) -> None:
    """Run the eight example runs one after the other into ``out/pretrain.db``; wall times to
    ``out/pretrain-times.json`` (kept between invocations, so an interrupted sweep resumes)."""
    db = f"sqlite:///{out / 'pretrain.db'}"
    times_path = out / "pretrain-times.json"
    times = json.loads(times_path.read_text()) if times_path.exists() else {}
    for run, script, opt, rs in PRETRAIN_RUNS:
        if run in times:
            continue
        command = [sys.executable, str(ROOT / "examples" / script), "--optimizer", opt, "--steps", str(steps),
                   *PRETRAIN_ARGS, *extra, "--url", db, "--run", run] + (["--random-scaling"] if rs else [])
        times[run] = {"seconds": _run_example(command, run),
                      "command": " ".join([*(f"{k}={v}" for k, v in PRETRAIN_ENV.items()), "python",
                                           f"examples/{script}", *command[2:]])}
        times_path.write_text(json.dumps(times, indent=1))
        print(f"{run}: {times[run]['seconds']} s", file=sys.stderr, flush=True)


# --- the first 50 steps, with a reference x* ------------------------------------------------------

#: the examples' defaults (2 layers of width 64, 2,048-token vocabulary, batches of 16 × 64 tokens)
FIRST_ARGS = ["--reeval-every", "1", "--probe-every", "5", "--device", "cpu", "--quiet"]
#: (run name, model, optimizer, random scaling, x*): x* "seed 1" is the final weights of a 50-step run
#: with --seed 1 (another initialisation and data order), "same seed" those of a 100-step run with the
#: audited run's seed 0 (the continuation of the audited path)
FIRST_RUNS = [(f"{model}-{opt}{suffix}", model, opt, rs, ref)
              for model in ("gpt2", "bert")
              for opt, suffix, rs, ref in (("adamw", "", False, "seed 1"), ("adamw", "-xsame", False, "same seed"),
                                           ("sgdm", "", False, "seed 1"), ("sgdm", "-rs", True, "seed 1"))]
FIRST_REFERENCES = {"seed 1": ["--seed", "1", "--steps", "50"], "same seed": ["--seed", "0", "--steps", "100"]}


def first50(out: Path, steps: int) -> None:
    """The references x* (no agent), then the eight 50-step runs into ``out/first50.db``."""
    db = f"sqlite:///{out / 'first50.db'}"
    for run, model, opt, rs, ref in FIRST_RUNS:
        script = str(ROOT / "examples" / f"pretrain_{model}.py")
        xstar = out / f"xstar-{model}-{opt}-{ref.replace(' ', '')}.pt"
        ref_args = [*FIRST_REFERENCES[ref][:-1], str(steps * int(FIRST_REFERENCES[ref][-1]) // 50)]  # --quick scales them
        if not xstar.exists():
            _run_example([sys.executable, script, "--optimizer", opt, *ref_args, *FIRST_ARGS, "--no-agent",
                          "--save-final", str(xstar)], f"x* of {run}")
        seconds = _run_example([sys.executable, script, "--optimizer", opt, "--steps", str(steps), *FIRST_ARGS,
                                "--reference", str(xstar), "--url", db, "--run", run]
                               + (["--random-scaling"] if rs else []), run)
        print(f"{run}: {seconds} s", file=sys.stderr, flush=True)


def first50_table(out: Path, steps: int) -> str:
    """Audit the eight 50-step runs: docs/audit.md's table "the first 50 steps"."""
    from moxco.collector.audit.analysis import audit
    from moxco.collector.audit.source import open_source

    with open_source(f"sqlite:///{out / 'first50.db'}") as source:
        results = [(audit(source.load(run)), ref) for run, _, _, _, ref in FIRST_RUNS]
    lines = ["| run | x* | non-convex steps (path) | final avg_gap | convexity_ratio → verdict | "
             "mean update_corr (± s/√n) | Σ update_corr_rs vs Σ loss_diff (eq. 12) | smooth/sharpness (ρ) | "
             "sharpness: first → last probe |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r, ref in results:
        path, ratio = r.section("path_convexity").numbers, r.section("global_convexity")
        d = r.section("descent_lemma")
        rs = d.extra_verdicts["random_scaling_identity"]
        smooth = r.section("smoothness").numbers
        _, sharp = r.run.finite("sharpness")
        sums = (f"{rs['sum_update_corr_rs']:.2f} vs {rs['sum_loss_diff']:.2f}" if rs.get("random_scaling")
                else "(no random scaling)")
        lines.append(
            f"| `{r.run.name}` | {ref}, {steps * int(FIRST_REFERENCES[ref][-1]) // 50} steps | {path.get('nonconvex_steps')}/"
            f"{path.get('measured_steps')} | {r.run.last('avg_gap'):.1e} | "
            f"{ratio.numbers.get('convexity_ratio', float('nan')):.3g} → {ratio.verdict} | "
            f"{d.numbers['mean_update_corr']:+.3f} ± {d.numbers['standard_error']:.1e} | {sums} | "
            f"{smooth.get('median_smooth_over_sharpness', float('nan')):.2g} "
            f"({smooth.get('rank_correlation', float('nan')):+.2f}) | "
            f"{sharp[0]:.3g} → {sharp[-1]:.3g} |")
    return "\n".join(lines)


def _se(mean: float, se: float, z: float) -> str:
    return f"{mean:+.2e} ± {se:.1e} ({z:+.1f} SE)"


def pretrain_table(out: Path) -> str:
    """Audit the eight runs; the table of docs/audit.md, the comparison report and the running-mean plot."""
    from moxco.collector.audit.analysis import audit
    from moxco.collector.audit.plots import figure, finish, running_mean
    from moxco.collector.audit.report import write_compare
    from moxco.collector.audit.source import open_source

    times = json.loads((out / "pretrain-times.json").read_text())
    with open_source(f"sqlite:///{out / 'pretrain.db'}") as source:
        results = [audit(source.load(run)) for run, *_ in PRETRAIN_RUNS if run in times]
    write_compare(results, out / "pretrain-compare.html")
    lines = ["| run | lr | steps | loss first → last | mean update_corr ± SE (z), all steps | verdict | "
             "second half: mean ± SE (z) | steps with running mean > 0 | RS identity (eq. 12) | path: non-convex steps | "
             "smoothness | wall time |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        d = r.section("descent_lemma").numbers
        rs = r.section("descent_lemma").extra_verdicts["random_scaling_identity"]
        path = r.section("path_convexity").numbers
        lines.append(
            f"| `{r.run.name}` | {r.run.hyperparameters.get('lr')} | {r.overview['steps']} | "
            f"{r.overview['first_loss']:.2f} → {r.overview['last_loss']:.2f} | "
            f"{_se(d['mean_update_corr'], d['standard_error'], d['mean_over_standard_error'])} | "
            f"{r.section('descent_lemma').verdict} | "
            f"{_se(d['mean_update_corr_second_half'], d['second_half_standard_error'], d['second_half_z'])} | "
            f"{100 * d['fraction_of_steps_running_mean_positive']:.0f} % | {rs['verdict']} | "
            f"{path.get('nonconvex_steps')}/{path.get('measured_steps')} | {r.section('smoothness').verdict} | "
            f"{times[r.run.name]['seconds'] / 60:.0f} min |")
    fig, axes = figure(2, height=2.8)
    for ax, model in zip(axes, ("gpt2", "bert")):
        for r in results:
            if r.run.name.startswith(model):
                steps, corr = r.run.finite("update_corr")
                ax.plot(steps, running_mean(corr)[0], lw=1.4, label=r.run.name,
                        ls="--" if r.run.name.endswith("-rs") else "-")
        ax.axhline(0, color="black", lw=0.8)
        ax.set_ylabel(f"{model}: running mean"), ax.set_xlabel("step"), ax.legend(fontsize=7)
        ax.set_yscale("symlog", linthresh=1e-4)
    fig.suptitle("running mean of update_corr (audit paper fig. 7): 2,000-step tiny pretraining runs", fontsize=10)
    finish(fig)
    fig.savefig(out / "pretrain-running-mean.png", dpi=110)
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("claim", choices=("eos", "first50", "pretrain", "proxquant"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.claim == "pretrain":
        pretrain(args.out, 200 if args.quick else 2000, [])
        text = pretrain_table(args.out)
        print(text)
        (args.out / "pretrain.md").write_text(text + "\n")
    elif args.claim == "first50":
        first50(args.out, 10 if args.quick else 50)
        text = first50_table(args.out, 10 if args.quick else 50)
        print(text)
        (args.out / "first50.md").write_text(text + "\n")
    elif args.claim == "eos":
        import smoothness_at_eos

        smoothness_at_eos.main(["--out", str(args.out)] + (["--quick"] if args.quick else []))
    else:
        import proxquant_digits

        proxquant_digits.main(["--out", str(args.out)] + (["--quick"] if args.quick else []))
    return 0


if __name__ == "__main__":
    sys.exit(main())
