"""Every metric name the dashboards and the alert rules query is one a live collector exposes:
an embedded agent run writes a SQLite store, `moxco serve` serves it (a subprocess), and its
`/metrics` is scraped over HTTP."""

from __future__ import annotations

import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

import moxco.agent
from moxco.dashboards import build
from moxco.dashboards.validate import iter_queries, promql_metric_names
from moxco.optim import MoXCo
from tests.servers import CollectorProcess

REPO = Path(__file__).resolve().parents[2]
RUN = "live-check"


def _feed_store(url: str) -> None:
    """A short MoXCo-over-Adam run with every metric group on (re-evaluation, a reference x*, probes
    with the preconditioned pair, the Hessian trace and Lanczos long enough to bound λ_min, a policy
    that decides), left `running` so
    /metrics exposes it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    reference = {k: v.detach().clone() + 0.01 for k, v in model.state_dict().items()}
    opt = MoXCo(model.parameters(), torch.optim.Adam, lr=0.05, alpha=0.9, beta=0.5, seed=0)
    criterion = nn.MSELoss()
    agent = moxco.agent.attach(model, opt, url=url, run=RUN, reeval_every=1, probe_every=2, criterion=criterion,
                               reference=reference, seed=0, hessian_trace=True, sharpness_iters=60, goodness={"tau": 1.0, "form": "eos"},
                               policy={"threshold": 1e-9, "consecutive": 1, "min_step": 0})
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    for _ in range(12):
        loss = criterion(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    agent.close(status="running")
    # a token model (integer batch × sequence inputs): tokens_per_second
    tokens = nn.Sequential(nn.Embedding(16, 4), nn.Flatten(), nn.Linear(4 * 6, 1))
    opt = torch.optim.SGD(tokens.parameters(), lr=0.05)
    agent = moxco.agent.attach(tokens, opt, url=url, run=f"{RUN}-tokens", reeval_every=0, probe_every=0,
                               criterion=criterion, seed=0)
    ids, y = torch.randint(0, 16, (8, 6)), torch.randn(8, 1)
    for _ in range(3):
        criterion(tokens(ids), y).backward()
        opt.step()
        opt.zero_grad()
    agent.close(status="running")


@pytest.fixture(scope="module")
def exposed(tmp_path_factory) -> set:
    """Sample names on the live /metrics of `moxco serve` (the installed console script)."""
    url = f"sqlite:///{tmp_path_factory.mktemp('store') / 'runs.db'}"
    _feed_store(url)
    server = CollectorProcess(url, auth=False, program=[str(Path(sys.executable).parent / "moxco")]).start()
    try:
        # one refused request, so the labelled error counter and the latency histogram have samples
        try:
            urllib.request.urlopen(f"{server.url}/api/v1/runs/no-such-run", timeout=5)
        except urllib.error.HTTPError as exc:
            assert exc.code == 404
        with urllib.request.urlopen(f"{server.url}/metrics", timeout=5) as response:
            text = response.read().decode()
    finally:
        server.stop()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample.labels)
    assert any(labels.get("run") == RUN for labels in samples.get("moxco_loss", [])), sorted(samples)
    return set(samples)


def test_dashboard_queries_use_only_live_metrics(exposed):
    for factory in build.DASHBOARDS.values():
        for where, lang, text in iter_queries(build.to_dict(factory())):
            if lang == "promql":
                missing = promql_metric_names(text) - exposed
                assert not missing, f"{where} queries {missing}; the live /metrics has {sorted(exposed)}"


def test_alert_rules_use_only_live_metrics(exposed):
    rules = yaml.safe_load((REPO / "deploy/prometheus/rules/moxco-alerts.yml").read_text("utf-8"))
    for group in rules["groups"]:
        for rule in group["rules"]:
            missing = promql_metric_names(rule["expr"]) - exposed - {"up"}  # `up`: Prometheus's own
            assert not missing, f"{rule['alert']} uses {missing}"


def test_collector_health_families_are_live(exposed):
    assert {"moxco_collector_errors_total", "moxco_collector_request_duration_seconds_count",
            "moxco_collector_store_up", "moxco_run_step", "moxco_run_last_ingest_timestamp_seconds",
            "moxco_decisions_total"} <= exposed


def test_sharpness_target_is_exposed(exposed):
    # λ_target, recorded by the agent at every probe: the sharpness panels and MoxcoSharpnessAboveEOS use it
    assert "moxco_sharpness_target" in exposed
