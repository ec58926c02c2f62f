"""Overhead of the moxco agent against its budgets: step time, memory, re-evaluation cost.

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
    python bench/agent_overhead.py --write-docs    # the same, and its section of docs/benchmarks-agent.md rewritten
    python bench/agent_overhead.py --quick         # ~4 min
    python bench/agent_overhead.py --profile       # top costs of free and reeval_every=1 instead
    python bench/agent_overhead.py --malloc tuned  # glibc kept from returning memory (tune_malloc)
    python bench/agent_overhead.py --models gpt2 --gpt2-batch 8 --malloc tuned   # 1,024 tokens a step
    python bench/agent_overhead.py --sweep --malloc tuned   # free metrics vs batch size: table and plot, ~5 min

Every run but ``--profile`` and ``--sweep`` ends with the table of ``moxco.tensors.step_sums`` on
one large tensor: the eager paths (whole-tensor temporaries, chunked, in the copy's own buffer) and
the fused kernel of ``moxco.native`` (what the agent runs on the CPU), with their precision.

The markdown is printed; ``--out FILE`` writes it to FILE too, and ``--write-docs`` into
docs/benchmarks-agent.md between the ``bench:agent`` markers (``--malloc tuned``:
``bench:agent-tuned``; ``--gpt2-batch``: ``bench:agent-gpt2-batch``; ``--profile``:
``bench:agent-profile``; ``--sweep``: ``bench:agent-sweep``, and the plot
docs/img/agent-free-overhead.png). Never a timed test: the numbers are reported, not asserted.

The code: the loops and configurations in ``overhead_workloads``, the measurements in
``overhead_measure``, the tables and the doc's sections in ``overhead_report``; what every
benchmark shares in ``benchkit``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

import torch

from benchkit import ROOT, add_write_docs, machine_line, source_state, write_between_markers
from overhead_measure import bench_model, plan, profile_config, rss_child, tune_malloc
from overhead_report import DOC, DOC_TITLE, SWEEP_IMAGE, chunking_table, doc_markers, report_model, sweep
from overhead_workloads import WORKLOADS, make_workload


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
    add_write_docs(parser, DOC, "the markdown (and the sweep's plot)")
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
            sections.append(sweep(models, args.repeats or 5, args.warmup, tmpdir, SWEEP_IMAGE if args.write_docs else None))
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
    if args.write_docs:
        write_between_markers(DOC, markdown, *doc_markers(args), DOC_TITLE)


if __name__ == "__main__":
    main()
