"""The ``moxco`` command line.

``moxco demo`` runs the main job: a small training run watched end to end (today a self-check of
the math library on a real training loop; the agent issue grows it into the attached, stored run).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from moxco import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moxco", description="Training diagnostics for PyTorch.")
    parser.add_argument("--version", action="version", version=f"moxco {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    demo = commands.add_parser(
        "demo",
        help="train a small model and watch it with every moxco metric",
        description="Train a small MLP on a synthetic regression task and compute every DESIGN §3 "
        "metric, sharpness, the denoised goodness score and the phase-switch decision; then check "
        "the numbers against independent ground truth (explicit Hessian, identities).",
    )
    demo.add_argument("--steps", type=int, default=300, help="optimizer steps (default: %(default)s)")
    demo.add_argument("--probe-every", type=int, default=10, help="steps between probes (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    demo.add_argument("--csv", metavar="PATH", help="also write every metric point to this CSV file")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from moxco.demo import run_demo

        if args.steps < 2:
            print("moxco demo: --steps must be at least 2", file=sys.stderr)
            return 2
        if args.probe_every < 1:
            print("moxco demo: --probe-every must be at least 1", file=sys.stderr)
            return 2
        return run_demo(steps=args.steps, probe_every=args.probe_every, seed=args.seed, csv_path=args.csv, quiet=args.quiet)
    return 2  # unreachable: argparse requires a command


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
