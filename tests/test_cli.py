"""The README's main-job command: `moxco demo` trains, stores, summarises and self-checks."""

from __future__ import annotations

import subprocess
import sys

from moxco.cli import build_parser
from moxco.collector import open_store


def test_moxco_demo_runs_stores_and_passes_its_self_check(tmp_path):
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    result = subprocess.run(
        [sys.executable, "-m", "moxco.cli", "demo", "--steps", "200", "--url", url, "--run", "ci-demo"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAIL" not in result.stdout and result.stdout.count("[PASS]") == 5
    assert "200/200" in result.stderr  # the progress bar reached the end
    store = open_store(url)
    (run,) = store.list_runs()[1]
    assert run.name == "ci-demo" and run.status == "finished"
    assert store.series("ci-demo", "loss")[0].size == 200
    assert len(store.decisions("ci-demo")) == 1


def test_demo_rejects_bad_arguments(capsys):
    from moxco.cli import main

    assert main(["demo", "--steps", "1"]) == 2
    assert "--steps must be at least 2" in capsys.readouterr().err
    assert build_parser().parse_args(["demo"]).steps == 300
