"""``moxco audit``: post-hoc assumption audits of stored runs (docs/audit.md).

    moxco audit RUN [--store URL | --url COLLECTOR --token T] [--out report.html]  one run: report + JSON
    moxco audit --compare RUN1 RUN2 ... [--out compare.html]                       runs side by side
    moxco audit --checkpoints DIR --reference FINAL.pt --data module:function [--run NAME]
                                                               global metrics from saved checkpoints

Nothing heavy is imported until the command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moxco.cli import add_store_option, add_token_option, add_url_option


def register(commands: "argparse._SubParsersAction") -> None:
    p = commands.add_parser(
        "audit",
        help="audit a run against the convexity/smoothness analyses (HTML report + JSON)",
        description="Does the classical convexity/smoothness analysis describe a run? Reads a run from a store or "
        "from a collector's query API and writes a self-contained HTML report (plots embedded) and a JSON summary "
        "with one verdict per assumption (convexity along the path, global convexity, smoothness vs sharpness, the "
        "descent lemma, MoXCo), each stating its test and numbers. Verdict rules: docs/audit.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  moxco audit gpt2-adamw --store sqlite:///runs.db --out gpt2.html\n"
               "  moxco audit gpt2-adamw --url http://collector:8000 --token $READ_TOKEN\n"
               "  moxco audit --compare gpt2-adamw gpt2-sgdm --store sqlite:///runs.db\n"
               "  moxco audit --checkpoints ckpts/ --reference xstar.pt --data examples/pretrain_gpt2.py:probe_data "
               "--run gpt2-ckpt --store sqlite:///runs.db",
    )
    p.add_argument("runs", nargs="*", metavar="RUN", help="the run to audit (several with --compare)")
    add_store_option(p, "the store holding the run (checkpoint mode: the store to write it to)")
    add_url_option(p, "a collector holding the run (read through its query API)")
    add_token_option(p, "read")
    p.add_argument("--out", help="HTML report path (default: audit-RUN.html, audit-compare.html); the JSON summary "
                                 "is written beside it with the suffix .json")
    p.add_argument("--compare", action="store_true", help="put the given runs side by side")
    p.add_argument("--checkpoints", metavar="DIR", help="checkpoint mode: the directory of saved checkpoints (default: none, audit a stored run)")
    p.add_argument("--reference", metavar="FINAL.pt", help="checkpoint mode: x*, the reference weights (required there; default: none)")
    p.add_argument("--data", metavar="SPEC", help="checkpoint mode: 'module:function' or 'file.py:function' returning "
                                                  "(model_fn, probe batches[, loss_fn]); see docs/audit.md (required there; "
                                                  "default: none)")
    p.add_argument("--run", dest="run_name", metavar="NAME",
                   help="checkpoint mode: the run to write into (default: the checkpoint directory's name + '-ckpt')")
    p.add_argument("--device", help="checkpoint mode: torch device (default: cuda when available, else cpu)")
    p.add_argument("--dtype", help="the dtype the model computed its loss in, for the inst_gap float-error tolerance "
                                   "(default: the run's config['dtype'], else float32)")
    p.add_argument("--tolerance-factor", type=float, default=None,
                   help="multiplier of the inst_gap tolerance (default: 16; see docs/audit.md)")
    p.add_argument("--no-progress", action="store_true", help="checkpoint mode: no progress bar")
    p.add_argument("--quiet", action="store_true", help="print only the output paths")
    p.set_defaults(func=run)


def _fail(message: str, code: int = 1) -> int:
    print(f"moxco audit: {message}", file=sys.stderr)
    return code


def _source(args):
    """The run source: the collector of ``--url`` (or ``$MOXCO_URL`` when it is one) unless
    ``--store`` is given, else the store (``moxco.cli.store_url``)."""
    from moxco.cli import api_token, collector_url, store_url
    from moxco.collector.audit.analysis import AuditError
    from moxco.collector.audit.source import open_source

    try:
        collector = collector_url(args.url) if args.store is None else None
        if collector is not None:
            return open_source(collector, api_token(args.token))
        return open_source(store_url(args.store))
    except ValueError as exc:
        raise AuditError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    try:
        from moxco.collector.audit.analysis import TOLERANCE_FACTOR, AuditError, audit
    except ModuleNotFoundError as exc:  # pragma: no cover - depends on the install
        return _fail(f"{exc}; install the audit extra: pip install 'moxco[audit]'")

    factor = TOLERANCE_FACTOR if args.tolerance_factor is None else args.tolerance_factor
    if not factor > 0:
        return _fail("--tolerance-factor must be positive", 2)
    try:
        if args.checkpoints:
            return _checkpoint_mode(args, factor)
        if any((args.reference, args.data, args.run_name)):
            return _fail("--reference, --data and --run belong to checkpoint mode (--checkpoints DIR)", 2)
        if args.compare:
            if len(args.runs) < 2:
                return _fail("--compare needs at least two runs", 2)
            return _compare(args, factor)
        if len(args.runs) != 1:
            return _fail("give one RUN (or --compare RUN1 RUN2 …, or --checkpoints DIR)" if not args.runs else
                         f"give one RUN, got {len(args.runs)}; use --compare to put runs side by side", 2)
        from moxco.collector.audit.report import write_report

        with _source(args) as source:
            result = audit(source.load(args.runs[0]), dtype=args.dtype, tolerance_factor=factor)
        out = Path(args.out or f"audit-{_safe(args.runs[0])}.html")
        html_path, json_path = write_report(result, out)
        _print_summary(args, [result], html_path, json_path)
        return 0
    except AuditError as exc:
        return _fail(str(exc))


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _print_summary(args, results, html_path: Path, json_path: Path) -> None:
    if not args.quiet:
        for result in results:
            print(f"{result.run.name}:")
            for section in result.sections:
                print(f"  {section.title:<42} {section.verdict_line}")
    print(f"report: {html_path}")
    print(f"summary: {json_path}")


def _compare(args, factor: float) -> int:
    from moxco.collector.audit.analysis import audit
    from moxco.collector.audit.report import write_compare

    duplicates = sorted({r for r in args.runs if args.runs.count(r) > 1})
    if duplicates:
        return _fail(f"--compare: run(s) given twice: {', '.join(duplicates)}", 2)
    with _source(args) as source:
        results = [audit(source.load(name), dtype=args.dtype, tolerance_factor=factor) for name in args.runs]
    html_path, json_path = write_compare(results, Path(args.out or "audit-compare.html"))
    _print_summary(args, results, html_path, json_path)
    return 0


def _checkpoint_mode(args, factor: float) -> int:
    from moxco.collector.audit.analysis import audit
    from moxco.collector.audit.checkpoints import checkpoint_audit
    from moxco.collector.audit.report import write_report

    if not args.reference or not args.data:
        return _fail("checkpoint mode needs --reference FINAL.pt and --data module:function", 2)
    if args.compare or len(args.runs) > 1:
        return _fail("checkpoint mode audits one run; give its name with --run", 2)
    name = args.run_name or (args.runs[0] if args.runs else f"{Path(args.checkpoints).resolve().name}-ckpt")
    from moxco.cli import store_url
    from moxco.collector.audit.source import StoreSource
    from moxco.collector.store import open_store

    if args.url is not None:
        return _fail("checkpoint mode writes to a store (--store sqlite:///… or postgresql://…), not to a collector")
    try:
        url = store_url(args.store)
    except ValueError as exc:
        return _fail(str(exc), 2)
    with open_store(url) as store:
        summary = checkpoint_audit(store, name, Path(args.checkpoints), Path(args.reference), args.data,
                                   device=args.device, progress=not args.no_progress)
        result = audit(StoreSource(store).load(name), dtype=args.dtype, tolerance_factor=factor)
    out = Path(args.out or f"audit-{_safe(name)}.html")
    html_path, json_path = write_report(result, out)
    checkpoints_json = out.with_name(out.stem + "-checkpoints.json")
    checkpoints_json.write_text(json.dumps(summary, indent=1, default=float), encoding="utf-8")
    if not args.quiet:
        print(f"{name}: convexity_ratio = {summary['convexity_ratio']:.4g} over {len(summary['checkpoints'])} "
              f"checkpoints ({summary['reading']})")
    _print_summary(args, [result], html_path, json_path)
    print(f"checkpoints: {checkpoints_json}")
    return 0
