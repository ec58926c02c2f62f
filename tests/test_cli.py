"""The README's main-job command (`moxco demo` trains, stores, summarises and self-checks), and the
one convention of every command's flags: --store, --url, --token, help with defaults, plain text,
no store created by a command that only reads one."""

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


# --- one convention for every command's flags --------------------------------------------------------


def _parsers(parser, path=("moxco",)):
    """Every (command path, parser) of the moxco CLI, subcommands included."""
    import argparse

    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, path + (name,))


def _options(parser):
    import argparse

    return [a for a in parser._actions if a.option_strings and not isinstance(a, (argparse._HelpAction,
                                                                                    argparse._VersionAction))]


def test_every_flag_has_help_that_states_its_default_in_plain_text():
    checked = 0
    for path, parser in _parsers(build_parser()):
        for text in (parser.description or "", parser.epilog or ""):
            assert "``" not in text and ":func:" not in text, (path, text)  # plain text, not reStructuredText
        for action in _options(parser):
            where = (" ".join(path), action.option_strings)
            assert action.help and "``" not in action.help, where
            takes_value = action.nargs != 0
            if takes_value and not action.required:
                assert "default" in action.help, where  # what happens when the flag is left out
            checked += 1
    assert checked > 50


def test_store_and_collector_flags_mean_the_same_in_every_command():
    """``--store`` is always a store (default $MOXCO_STORE_URL), ``--url`` always a collector (default
    $MOXCO_URL), ``--token`` always the collector's API token (default $MOXCO_TOKEN)."""
    commands = {}
    for path, parser in _parsers(build_parser()):
        for action in _options(parser):
            for flag in ("--store", "--url", "--token"):
                if flag in action.option_strings:
                    commands.setdefault(flag, []).append(" ".join(path[1:]))
                    env = {"--store": "$MOXCO_STORE_URL", "--url": "$MOXCO_URL", "--token": "$MOXCO_TOKEN"}[flag]
                    assert env in action.help, (path, flag, action.help)
            assert "--postgres-url" not in action.option_strings
    assert {"serve", "db upgrade", "token create", "token list", "token revoke", "decide", "audit", "export",
            "dashboards push"} <= set(commands["--store"])
    assert {"decide", "audit", "export"} <= set(commands["--url"])
    assert {"decide", "export"} <= set(commands["--token"])


def test_a_store_url_given_as_url_or_a_collector_given_as_store_is_refused(tmp_path, capsys, monkeypatch):
    from moxco.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["decide", "r", "--phase", "2", "--url", "sqlite:///x.db"]) == 2
    assert "--url is a collector" in capsys.readouterr().err
    assert main(["token", "list", "--store", "http://127.0.0.1:8000"]) == 2
    assert "--store is a database" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_commands_that_read_a_store_never_create_one(tmp_path, capsys, monkeypatch):
    from moxco.cli import main

    monkeypatch.chdir(tmp_path)
    for name in ("MOXCO_STORE_URL", "MOXCO_URL"):
        monkeypatch.delenv(name, raising=False)
    missing = tmp_path / "missing.db"
    for argv in (["token", "list"], ["token", "revoke", "x"], ["decide", "r", "--phase", "2"],
                 ["export", "r"], ["token", "list", "--store", str(missing)],
                 ["export", "r", "--store", f"sqlite:///{missing}", "--format", "parquet"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "no moxco store at" in err and "does not exist" in err, (argv, err)
    assert list(tmp_path.iterdir()) == []  # neither ./moxco.db nor missing.db
    # the commands that set a store up do create it
    assert main(["token", "create", "--store", str(missing), "--name", "t", "--scope", "read"]) == 0
    assert missing.exists()
    capsys.readouterr()
    assert main(["token", "list", "--store", str(missing)]) == 0
    assert " t " in capsys.readouterr().out


def test_latest_unpacks_as_step_and_value_and_prints_named(tmp_path):
    from moxco.collector.store import Latest

    with open_store(f"sqlite:///{tmp_path / 'r.db'}") as store:
        store.put_run("r")
        store.ingest("r", [(3, "loss", 0.25, 1.0), (4, "loss", float("nan"), 2.0)])
        step, value = store.latest("r")["loss"]
        assert step == 4 and value != value  # NaN as a float
        assert store.latest("r")["loss"] == Latest(4, value) and store.latest("r")["loss"].step == 4
        assert repr(store.latest("r")["loss"]) == "Latest(step=4, value=nan)"
