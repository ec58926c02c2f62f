"""The README's commands and example are the ones that work."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def test_readme_python_examples_run(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks, "README has no python example"
    for block in blocks:
        result = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"README example failed:\n{block}\n{result.stderr}"


def test_ci_runs_exactly_the_readme_test_command():
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.strip().startswith(("#", "set ", "cd "))]
    assert ci_lines == ["bash scripts/test.sh"]
    assert "bash scripts/test.sh" in README and "bash scripts/demo.sh" in README


def _heading_anchors(markdown: str) -> set:
    """GitHub's anchors for a document's headings: lower case, punctuation dropped, spaces → '-'."""
    headings = re.findall(r"^#+ (.+)$", markdown, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_readme_links_point_to_existing_docs():
    for target in re.findall(r"\]\((docs/[^)]+)\)", README):
        path, _, anchor = target.partition("#")
        assert (REPO / path).is_file(), target
        if anchor:
            assert anchor in _heading_anchors((REPO / path).read_text()), target
