"""Prometheus side of deploy/: the alert rules fire in their unit tests on the series they are
meant for and stay silent on healthy ones (`promtool test rules`), the configurations pass
`promtool check config`, and the rules only use metric names the collector exposes."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from moxco.dashboards import build
from moxco.dashboards.validate import promql_metric_names
from tests.dashboards.conftest import documented_exposition

REPO = Path(__file__).resolve().parents[2]
PROM = REPO / "deploy" / "prometheus"
RULES = PROM / "rules" / "moxco-alerts.yml"
RULE_TESTS = PROM / "tests" / "moxco-alerts.test.yml"


def promtool(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    assert shutil.which("promtool"), "promtool missing: scripts/setup.sh dev installs the Debian package prometheus"
    return subprocess.run(["promtool", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def _alerts() -> dict:
    return {rule["alert"]: rule for group in yaml.safe_load(RULES.read_text("utf-8"))["groups"]
            for rule in group["rules"] if "alert" in rule}


def test_rules_pass_promtool_check():
    done = promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in done.stdout


def test_rule_unit_tests_pass():
    done = promtool("test", "rules", str(RULE_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_required_alert_exists_and_is_unit_tested():
    alerts = _alerts()
    required = {"MoxcoLossNotFinite", "MoxcoSharpnessAboveEOS", "MoxcoGoodnessStuckBelowThreshold",
                "MoxcoAgentSilent", "MoxcoCollectorDown", "MoxcoCollectorStoreDown", "MoxcoCollectorServerErrors"}
    assert required <= set(alerts)
    tests = yaml.safe_load(RULE_TESTS.read_text("utf-8"))["tests"]
    fired = {case["alertname"] for t in tests for case in t.get("alert_rule_test", []) if case["exp_alerts"]}
    silent = {case["alertname"] for t in tests for case in t.get("alert_rule_test", []) if not case["exp_alerts"]}
    assert set(alerts) <= fired, f"alerts never shown firing: {set(alerts) - fired}"
    for rule in alerts.values():
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    assert {"MoxcoLossNotFinite", "MoxcoSharpnessAboveEOS", "MoxcoGoodnessStuckBelowThreshold",
            "MoxcoAgentSilent", "MoxcoCollectorDown"} <= silent


def _mutated_rule_tests(tmp_path: Path, old: str, new: str) -> subprocess.CompletedProcess:
    rules_dir = tmp_path / "rules"
    tests_dir = tmp_path / "tests"
    rules_dir.mkdir()
    tests_dir.mkdir()
    text = RULES.read_text("utf-8")
    assert old in text
    (rules_dir / RULES.name).write_text(text.replace(old, new), "utf-8")
    shutil.copy(RULE_TESTS, tests_dir / RULE_TESTS.name)
    return promtool("test", "rules", str(tests_dir / RULE_TESTS.name))


@pytest.mark.parametrize("old, new, alert", [
    # a NaN check that never matches: the diverged run must be missed
    ("(max by (run) (moxco_loss) != max by (run) (moxco_loss))", "(max by (run) (moxco_loss) > 1e300)",
     "MoxcoLossNotFinite"),
    # no `for`: the short excursion above the EOS bound would fire
    ("        for: 15m\n", "        for: 1m\n", "MoxcoSharpnessAboveEOS"),
    # forgetting phase 2: the committed run would fire
    ("          unless on (run) (max by (run) (moxco_phase) >= 2)", "", "MoxcoGoodnessStuckBelowThreshold"),
    # a threshold of 4 minutes: the network blip would fire
    ("> 600", "> 240", "MoxcoAgentSilent"),
])
def test_the_unit_tests_catch_a_broken_rule(tmp_path, old, new, alert):
    """The unit tests are not vacuous: breaking a rule the obvious way makes them fail."""
    done = _mutated_rule_tests(tmp_path, old, new)
    assert done.returncode != 0
    assert f"alertname: {alert}" in done.stdout + done.stderr


def test_rules_use_only_exposed_metrics():
    exposed = documented_exposition() | {"up"}
    for name, rule in _alerts().items():
        unknown = promql_metric_names(rule["expr"]) - exposed
        assert not unknown, f"{name} uses {unknown}"


def test_compose_prometheus_config_passes_promtool():
    done = promtool("check", "config", str(PROM / "prometheus.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 1 rule files found" in done.stdout
    config = yaml.safe_load((PROM / "prometheus.yml").read_text("utf-8"))
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["moxco-collector"]["static_configs"][0]["targets"] == ["collector-1:8000", "collector-2:8000"]


def test_kubernetes_prometheus_config_passes_promtool(tmp_path):
    """The in-cluster config (ConfigMap) with the rules ConfigMap laid out as the pod mounts them."""
    docs = {d["metadata"]["name"]: d for d in yaml.safe_load_all((REPO / "deploy" / "k8s" / "prometheus.yaml")
                                                                 .read_text("utf-8"))}
    (tmp_path / "prometheus.yml").write_text(docs["prometheus-config"]["data"]["prometheus.yml"], "utf-8")
    rules = yaml.safe_load((REPO / "deploy" / "k8s" / "prometheus-rules.yaml").read_text("utf-8"))
    (tmp_path / "rules").mkdir()
    for name, text in rules["data"].items():
        (tmp_path / "rules" / name).write_text(text, "utf-8")
    done = promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in done.stdout


def test_kubernetes_rules_configmap_is_the_rules_file():
    rules = yaml.safe_load(build.K8S_RULES_CONFIGMAP.read_text("utf-8"))
    assert rules["data"] == {RULES.name: RULES.read_text("utf-8")}
