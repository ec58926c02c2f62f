"""``moxco dashboards``: build the Grafana dashboards' JSON, push them to a Grafana.

* ``moxco dashboards build [--check]``: regenerate ``dashboards/json/`` (and the Kubernetes
  ConfigMap); ``--check`` writes nothing and exits 1 when the committed files are stale.
* ``moxco dashboards push --grafana URL [--grafana-token TOKEN] [--folder moxco] [--prometheus-url URL]
  [--store URL] [--overwrite] [--update-secrets]``: create or update the folder, the datasources
  and the dashboards through the Grafana HTTP API; prints one line per object (``created``,
  ``updated`` or ``unchanged``). The token may come from ``MOXCO_GRAFANA_TOKEN`` (or
  ``GRAFANA_TOKEN``) instead, which keeps it out of the process list. ``--store`` is the moxco
  store (PostgreSQL) as Grafana reaches it, the ``moxco-postgres`` datasource; it defaults to
  ``$MOXCO_STORE_URL`` when that is a PostgreSQL URL, like every command's ``--store``.

The heavy imports (the Grafana SDK and client) happen when a command runs.
"""

from __future__ import annotations

import argparse
import os
import sys

from moxco.cli import STORE_ENV


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``dashboards`` and its subcommands to the ``moxco`` parser."""
    parser = commands.add_parser("dashboards", help="Grafana dashboards as code: build the JSON, push to Grafana",
                                 description="Grafana dashboards as code: build their JSON, push them to a Grafana.")
    sub = parser.add_subparsers(dest="dashboards_command", metavar="SUBCOMMAND")
    sub.required = True

    b = sub.add_parser("build", help="regenerate dashboards/json (and the Kubernetes ConfigMap)",
                       description="Regenerate dashboards/json/ and the Kubernetes ConfigMaps from dashboards/build.py.")
    b.add_argument("--check", action="store_true", help="write nothing; exit 1 if the committed JSON is stale")
    b.set_defaults(func=_build)

    p = sub.add_parser("push", help="create or update the dashboards and datasources in a Grafana",
                       description="Create or update the moxco folder, datasources and dashboards in a Grafana "
                                   "through its HTTP API (idempotent: unchanged objects are not written).")
    p.add_argument("--grafana", required=True, metavar="URL",
                   help="Grafana's base URL, e.g. http://localhost:3000 (required)")
    p.add_argument("--grafana-token", default=None, metavar="SECRET",
                   help="Grafana service-account token (default: $MOXCO_GRAFANA_TOKEN, else $GRAFANA_TOKEN)")
    p.add_argument("--folder", default="moxco", help="folder title for the dashboards (default: moxco)")
    p.add_argument("--prometheus-url", metavar="URL",
                   help="create/update the moxco-prometheus datasource pointing here, as Grafana reaches it "
                        "(default: none, the datasource is left as it is)")
    p.add_argument("--store", metavar="URL",
                   help="the moxco store (PostgreSQL) as Grafana reaches it, for the moxco-postgres datasource: "
                        f"postgresql://user:password@host:5432/db (default: ${STORE_ENV} when it is a PostgreSQL URL, "
                        "else none, the datasource is left as it is)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace dashboards even when they changed in Grafana while pushing")
    p.add_argument("--update-secrets", action="store_true",
                   help="send the datasource password again (Grafana never returns it, so push cannot compare)")
    p.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                   help="seconds per HTTP request (default: 10)")
    p.set_defaults(func=_push)


def _build(args: argparse.Namespace) -> int:
    from moxco.dashboards import build

    return build.run(check=args.check)


def _push(args: argparse.Namespace) -> int:
    from moxco.dashboards.push import PushError, missing_datasources, push

    token = args.grafana_token or os.environ.get("MOXCO_GRAFANA_TOKEN") or os.environ.get("GRAFANA_TOKEN") or ""
    store = args.store
    if store is None and os.environ.get(STORE_ENV, "").startswith(("postgresql", "postgres:")):
        store = os.environ[STORE_ENV]
    try:
        outcomes = push(args.grafana, token, folder=args.folder, prometheus_url=args.prometheus_url,
                        postgres_url=store, overwrite=args.overwrite,
                        update_secrets=args.update_secrets, timeout=args.timeout)
        for outcome in outcomes:
            print(outcome)
        if not (args.prometheus_url and store):
            for uid in missing_datasources(args.grafana, token, timeout=args.timeout):
                print(f"warning: Grafana has no datasource {uid!r}; the dashboards' panels on it stay empty "
                      f"until it exists (pass --{'prometheus-url' if 'prometheus' in uid else 'store'})",
                      file=sys.stderr)
    except PushError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
