"""The ``moxco`` command line.

Each area of the product registers its own subcommands from its own module, so the parser is
assembled here and nothing heavy is imported until a command runs (``moxco demo`` never imports
FastAPI). A command module exposes ``register(subparsers)``; each subparser it adds sets
``func=callable(args) -> int`` through ``set_defaults``. Modules whose optional dependencies are
missing (an install without the ``collector`` extra, say) still register their commands: the
import error is reported when such a command runs, with the extra to install.

* ``moxco demo``: the main job (``moxco.agent.demo``).
* ``moxco spool``: what agents left in their spools, sent later (``moxco.agent.spool_cli``).
* ``moxco serve``, ``db``, ``token``, ``decide``: the collector service (``moxco.collector.cli``).
* ``moxco audit``: post-hoc assumption audits (``moxco.collector.audit.cli``).
* ``moxco dashboards``: Grafana dashboards as code (``moxco.dashboards.cli``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from moxco import __version__

# (module, the extra that provides its dependencies)
COMMAND_MODULES = (
    ("moxco.agent.demo_cli", None),
    ("moxco.agent.spool_cli", None),
    ("moxco.collector.cli", "collector"),
    ("moxco.collector.audit.cli", None),
    ("moxco.dashboards.cli", "dashboards"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moxco", description="Training diagnostics for PyTorch.")
    parser.add_argument("--version", action="version", version=f"moxco {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    for module_name, _extra in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and (exc.name == module_name or module_name.startswith(exc.name + ".")):
                continue  # that area does not exist (yet) in this install
            raise
        module.register(commands)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
