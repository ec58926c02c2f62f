"""``moxco spool``: what agents left in their spools, and sending it later (``agent.spool``).

* ``moxco spool list``: the spool directories under ``$MOXCO_SPOOL`` (default
  ``~/.cache/moxco/spool``) that hold data, with their run and how many points are left;
* ``moxco spool push DIR… (--url COLLECTOR [--token T] | --store URL)``: replay each directory, in
  order, to a collector (``http(s)://``) or a store (``sqlite:…``, ``postgresql://…``), as the agent
  would have: each envelope goes to the run its session opened, a batch sent twice is stored once,
  what was delivered is removed from the spool. Exits 1 when something is left (the store still unreachable, a wrong
  token), saying how much.

A directory a live agent holds is refused (that agent is sending it).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from moxco.cli import add_store_option, add_token_option, add_url_option


def register(commands: "argparse._SubParsersAction") -> None:
    spool = commands.add_parser("spool", help="list or send what agents left in their spools",
                                description="What agents could not deliver stays on disk in a spool directory, "
                                            "one per run name; `push` sends it to a collector or a store.")
    sub = spool.add_subparsers(dest="spool_command", metavar="SUBCOMMAND")
    sub.required = True
    listing = sub.add_parser("list", help="spool directories that hold data")
    listing.add_argument("--root", help="where the spools are (default: $MOXCO_SPOOL, else ~/.cache/moxco/spool)")
    listing.set_defaults(func=list_spools)
    push = sub.add_parser("push", help="send spool directories to a collector or a store")
    push.add_argument("dirs", nargs="+", metavar="DIR", help="a spool directory (moxco spool list shows them)")
    add_url_option(push, "the collector to send to")
    add_store_option(push, "the store to write to when no collector is given")
    add_token_option(push, "ingest")
    push.add_argument("--timeout", type=float, default=300.0, help="seconds to wait per directory (default: "
                                                                     "%(default)s)")
    push.set_defaults(func=push_spools)


def list_spools(args: argparse.Namespace) -> int:
    from moxco.agent.spool import count_points, has_segments, run_of_spool_dir, segment_paths, spool_root

    root = Path(args.root).expanduser() if args.root else spool_root()
    found = 0
    for directory in sorted(p for p in root.glob("*") if p.is_dir()) if root.is_dir() else []:
        if not has_segments(directory):
            continue
        found += 1
        paths = segment_paths(directory)
        size = sum(p.stat().st_size for p in paths)
        print(f"{directory}\trun {run_of_spool_dir(directory)!r}\t{count_points(paths)} points\t{size} bytes")
    if not found:
        print(f"no spooled data under {root}")
    return 0


def push_spools(args: argparse.Namespace) -> int:
    from moxco.agent.options import check_url
    from moxco.agent.spool import has_segments, lock_spool_dir, run_of_spool_dir

    from moxco.cli import api_token, collector_url, store_url

    try:
        collector = collector_url(args.url) if args.store is None else None
        args.url = collector or check_url(store_url(args.store))
        args.token = api_token(args.token)
    except ValueError as exc:
        print(f"moxco spool push: {exc}", file=sys.stderr)
        return 2
    left_total = 0
    for name in args.dirs:
        directory = Path(name).expanduser()
        if not has_segments(directory):
            print(f"{directory}: nothing to send")
            continue
        run = run_of_spool_dir(directory)
        try:
            _, handle = lock_spool_dir(directory, run, exclusive=True)
        except RuntimeError as exc:
            print(f"moxco spool push: {exc}", file=sys.stderr)
            left_total += 1
            continue
        if handle is not None:
            handle.close()  # the sink takes the lock itself
        stats = _push(directory, run, args)
        left_total += stats.points_left
        print(f"{directory}: {stats.points_sent} points sent to {args.url}, {stats.points_rejected} refused, "
              f"{stats.points_left} left" + ("" if not stats.points_left else " (run it again when the store answers)"))
    return 1 if left_total else 0


def _push(directory: Path, run: str, args: argparse.Namespace):
    from moxco.agent.sink import is_http_url
    from moxco.agent.transport import HttpSink

    if is_http_url(args.url):
        sink = HttpSink(args.url, run, token=args.token, spool_dir=directory, max_backoff=2.0)
        deadline = time.monotonic() + args.timeout
        failing_since = None
        while not sink.flush(min(2.0, max(0.0, deadline - time.monotonic()))) and time.monotonic() < deadline:
            if sink.failing:  # unreachable, or the token refused: give up after a while, keep the rest
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since > 10.0:
                    break
            else:
                failing_since = None
        sink.close(timeout=1.0)
        return sink.stats
    from moxco.agent.sink import EmbeddedSink

    sink = EmbeddedSink(url=args.url, run=run, spool_dir=directory)
    sink.close()
    return sink.stats
