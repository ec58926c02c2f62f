"""``moxco dashboards``: build the Grafana dashboards' JSON, push them to a Grafana.

* ``moxco dashboards build [--check]``: regenerate ``dashboards/json/`` (and the Kubernetes
  ConfigMap); ``--check`` writes nothing and exits 1 when the committed files are stale.
* ``moxco dashboards push --grafana URL --token TOKEN [--folder moxco] [--prometheus-url URL]
  [--postgres-url URL] [--overwrite] [--update-secrets]``: create or update the folder, the
  datasources and the dashboards through the Grafana HTTP API; prints one line per object
  (``created``, ``updated`` or ``unchanged``). The token may come from ``MOXCO_GRAFANA_TOKEN``
  (or ``GRAFANA_TOKEN``) instead, which keeps it out of the process list.

The heavy imports (the Grafana SDK and client) happen when a command runs.
"""

from __future__ import annotations

import argparse
import os
import sys


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``dashboards`` and its subcommands to the ``moxco`` parser."""
    parser = commands.add_parser("dashboards", help="Grafana dashboards as code: build the JSON, push to Grafana",
                                 description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="dashboards_command", metavar="SUBCOMMAND")
    sub.required = True

    b = sub.add_parser("build", help="regenerate dashboards/json (and the Kubernetes ConfigMap)")
    b.add_argument("--check", action="store_true", help="write nothing; exit 1 if the committed JSON is stale")
    b.set_defaults(func=_build)

    p = sub.add_parser("push", help="create or update the dashboards and datasources in a Grafana")
    p.add_argument("--grafana", required=True, metavar="URL", help="Grafana's base URL, e.g. http://localhost:3000")
    p.add_argument("--token", default=None,
                   help="service-account token (default: $MOXCO_GRAFANA_TOKEN or $GRAFANA_TOKEN)")
    p.add_argument("--folder", default="moxco", help="folder title for the dashboards (default: moxco)")
    p.add_argument("--prometheus-url", metavar="URL",
                   help="create/update the moxco-prometheus datasource pointing here (as Grafana reaches it)")
    p.add_argument("--postgres-url", metavar="URL",
                   help="create/update the moxco-postgres datasource: postgresql://user:password@host:5432/db")
    p.add_argument("--overwrite", action="store_true",
                   help="replace dashboards even when they changed in Grafana while pushing")
    p.add_argument("--update-secrets", action="store_true",
                   help="send the datasource password again (Grafana never returns it, so push cannot compare)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per HTTP request (default: 10)")
    p.set_defaults(func=_push)


def _build(args: argparse.Namespace) -> int:
    from moxco.dashboards import build

    return build.run(check=args.check)


def _push(args: argparse.Namespace) -> int:
    from moxco.dashboards.push import PushError, missing_datasources, push

    token = args.token or os.environ.get("MOXCO_GRAFANA_TOKEN") or os.environ.get("GRAFANA_TOKEN") or ""
    try:
        outcomes = push(args.grafana, token, folder=args.folder, prometheus_url=args.prometheus_url,
                        postgres_url=args.postgres_url, overwrite=args.overwrite,
                        update_secrets=args.update_secrets, timeout=args.timeout)
        for outcome in outcomes:
            print(outcome)
        if not (args.prometheus_url and args.postgres_url):
            for uid in missing_datasources(args.grafana, token, timeout=args.timeout):
                print(f"warning: Grafana has no datasource {uid!r}; the dashboards' panels on it stay empty "
                      f"until it exists (pass --{'prometheus' if 'prometheus' in uid else 'postgres'}-url)",
                      file=sys.stderr)
    except PushError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
