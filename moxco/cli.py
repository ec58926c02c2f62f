"""The ``moxco`` command line.

Each area of the product registers its own subcommands from its own module, so the parser is
assembled here and nothing heavy is imported until a command runs (``moxco demo`` never imports
FastAPI). A command module exposes ``register(subparsers)``; each subparser it adds sets
``func=callable(args) -> int`` through ``set_defaults``. Modules whose optional dependencies are
missing (an install without the ``collector`` extra, say) still register their commands: the
import error is reported when such a command runs, with the extra to install.

* ``moxco demo``: the main job (``moxco.agent.demo``).
* ``moxco spool``: what agents left in their spools, sent later (``moxco.agent.spool_cli``).
* ``moxco serve``, ``db``, ``token``, ``decide``, ``export``: the collector service and its data
  (``moxco.collector.cli``).
* ``moxco audit``: post-hoc assumption audits (``moxco.collector.audit.cli``).
* ``moxco dashboards``: Grafana dashboards as code (``moxco.dashboards.cli``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional, Sequence

from moxco import __version__

# --- the flags every subcommand shares -----------------------------------------------------------
#
# A store (a database: SQLite file or PostgreSQL) is always --store, defaulting to $MOXCO_STORE_URL;
# a collector (moxco serve's HTTP API) is always --url, defaulting to $MOXCO_URL; its token is always
# --token, defaulting to $MOXCO_TOKEN. $MOXCO_URL is also where attach() writes, which may be a
# database: then it is the store's default too (after $MOXCO_STORE_URL), never a collector.

STORE_ENV, URL_ENV, TOKEN_ENV = "MOXCO_STORE_URL", "MOXCO_URL", "MOXCO_TOKEN"
DEFAULT_STORE = "sqlite:///moxco.db"  # in the working directory: what attach() writes by default
STORE_DEFAULT_TEXT = (f"${STORE_ENV}, else ${URL_ENV} when it names a database, else {DEFAULT_STORE} in the "
                      "working directory")


def is_collector_url(url: Optional[str]) -> bool:
    """Whether ``url`` names a collector (``http://`` or ``https://``) rather than a store."""
    return bool(url) and url.lower().startswith(("http://", "https://"))


def add_store_option(parser: argparse.ArgumentParser, what: str = "the store to use", **kwargs) -> None:
    """``--store URL``: a SQLAlchemy URL (``sqlite:///runs.db``, ``postgresql://…``) or a SQLite file path."""
    parser.add_argument("--store", metavar="URL", default=None,
                        help=f"{what}: sqlite:///file.db, a file path or postgresql://user@host/db "
                             f"(default: {STORE_DEFAULT_TEXT})", **kwargs)


def add_url_option(parser: argparse.ArgumentParser, what: str = "the collector", **kwargs) -> None:
    """``--url URL``: a collector's base URL (``http(s)://host:port``)."""
    parser.add_argument("--url", metavar="URL", default=None,
                        help=f"{what}'s base URL, e.g. http://127.0.0.1:8000 (default: ${URL_ENV} when it is "
                             "an http(s):// URL)", **kwargs)


def add_token_option(parser: argparse.ArgumentParser, scope: str) -> None:
    """``--token SECRET``: the collector's API token."""
    parser.add_argument("--token", metavar="SECRET", default=None,
                        help=f"the collector's API token, with the {scope} scope (default: ${TOKEN_ENV}; "
                             "none when the collector runs without auth)")


def store_url(value: Optional[str]) -> str:
    """The store a command uses: ``--store``, else ``$MOXCO_STORE_URL``, else ``$MOXCO_URL`` when it
    names a database, else ``sqlite:///moxco.db`` in the working directory. ``ValueError`` when the
    value given is a collector's URL (that is ``--url``)."""
    if value is not None:
        if is_collector_url(value):
            raise ValueError(f"--store is a database (sqlite:///… or postgresql://…), not a collector ({value}): "
                             "give a collector with --url")
        return value
    agent = os.environ.get(URL_ENV, "")
    return os.environ.get(STORE_ENV) or ("" if is_collector_url(agent) else agent) or DEFAULT_STORE


def collector_url(value: Optional[str]) -> Optional[str]:
    """The collector a command talks to: ``--url``, else ``$MOXCO_URL`` when it is an
    ``http(s)://`` URL, else None. ``ValueError`` when the value given is not an ``http(s)://`` URL
    (a database is ``--store``)."""
    if value is not None:
        if not is_collector_url(value):
            raise ValueError(f"--url is a collector (http://host:port), got {value!r}: give a database with --store")
        return value.rstrip("/")
    agent = os.environ.get(URL_ENV, "")
    return agent.rstrip("/") if is_collector_url(agent) else None


def api_token(value: Optional[str]) -> Optional[str]:
    """``--token``, else ``$MOXCO_TOKEN``."""
    return value or os.environ.get(TOKEN_ENV) or None

# (module, the extra that provides its dependencies)
COMMAND_MODULES = (
    ("moxco.agent.demo_cli", None),
    ("moxco.agent.spool_cli", None),
    ("moxco.collector.cli", "collector"),
    ("moxco.collector.audit.cli", None),
    ("moxco.dashboards.cli", "dashboards"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moxco", description="Training diagnostics for PyTorch.",
        epilog=f"Stores and collectors: every command takes a store (a database) as --store, default "
               f"{STORE_DEFAULT_TEXT}, and a collector (moxco serve) as --url, default ${URL_ENV}, with "
               f"--token, default ${TOKEN_ENV}.")
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
