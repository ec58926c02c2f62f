"""The folder layout installs as one ``moxco`` namespace, from a wheel and editable (DESIGN §1)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDER_OF_PACKAGE = {"moxco": "moxco", "moxco.agent": "agent", "moxco.collector": "collector", "moxco.dashboards": "dashboards"}


def packages_on_disk() -> set[str]:
    """Every folder with an ``__init__.py`` under the mapped top-level folders, as a dotted name."""
    found = set()
    for package, folder in FOLDER_OF_PACKAGE.items():
        root = REPO / folder
        for init in root.rglob("__init__.py"):
            relative = init.parent.relative_to(root).parts
            if relative and relative[0] in {"agent", "collector", "dashboards"} and folder == "moxco":
                continue
            found.add(".".join((package, *relative)))
    return found


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("moxco-*.whl")
    return built


def test_pyproject_lists_every_package_folder():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert set(config["tool"]["setuptools"]["packages"]) == packages_on_disk()


def test_wheel_maps_folders_into_the_moxco_namespace(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in packages_on_disk():
        assert package.replace(".", "/") + "/__init__.py" in names, package
    assert not any(n.startswith(("agent/", "collector/", "dashboards/", "tests/")) for n in names)


def test_import_moxco_agent_from_a_regular_install(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    # run from an unrelated folder with only the installed copy (plus torch & co.) importable
    # and the wheel carries the kernels' source: they build from the installed copy
    code = ("import moxco, moxco.agent, moxco.collector, moxco.metrics, moxco.native; "
            "print(moxco.native.status()); print(moxco.agent.__file__)")
    env = {**os.environ, "PYTHONPATH": str(target), "MOXCO_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    status, agent_file = result.stdout.strip().splitlines()[-2:]
    assert status == "loaded"
    assert Path(agent_file).is_relative_to(target)
    assert Path(agent_file).parent.name == "agent"


def test_import_moxco_agent_from_the_editable_install(tmp_path):
    code = "import moxco.agent, moxco.optim; print(moxco.agent.__file__)"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == REPO / "agent" / "__init__.py"


def test_agent_does_not_import_the_web_stack(tmp_path):
    code = "import sys, moxco.agent; print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_command_line_and_the_collector_do_not_import_torch():
    """``moxco --help`` and the collector's processes (which only need the decision policy from
    ``moxco``) start without importing torch: the package exports resolve lazily."""
    code = ("import sys, moxco, moxco.cli, moxco.collector.api; moxco.cli.build_parser(); "
            "assert moxco.goodness.__module__ == 'moxco.goodness'; "
            "assert 'torch' not in sys.modules, 'torch was imported'; "
            "moxco.top_eigenvalue; import moxco.agent; moxco.agent.attach; "
            "assert 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
