"""``moxco demo``: the README's main-job command (see ``moxco.agent.demo``)."""

from __future__ import annotations

import argparse
import os
import sys


def register(commands: "argparse._SubParsersAction") -> None:
    demo = commands.add_parser(
        "demo",
        help="train a small model and watch it with every moxco metric",
        description="Train a small MLP on a synthetic regression task with the moxco agent attached "
        "(every DESIGN §3 metric, sharpness, goodness, the phase-switch decision on the MoXCo "
        "optimizer), store the run, print a summary and check the numbers against independent "
        "ground truth.",
    )
    demo.add_argument("--steps", type=int, default=300, help="optimizer steps (default: %(default)s)")
    demo.add_argument("--probe-every", type=int, default=10, help="steps between probes (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    demo.add_argument("--url", help="store URL (default: $MOXCO_URL, else sqlite:///moxco.db in the working dir)")
    demo.add_argument("--run", help="run name (default: demo-<timestamp>)")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moxco.agent.demo import run_demo

    if args.steps < 2:
        print("moxco demo: --steps must be at least 2", file=sys.stderr)
        return 2
    if args.probe_every < 1:
        print("moxco demo: --probe-every must be at least 1", file=sys.stderr)
        return 2
    return run_demo(steps=args.steps, probe_every=args.probe_every, seed=args.seed,
                    url=args.url or os.environ.get("MOXCO_URL"), run=args.run, quiet=args.quiet)
