"""``moxco audit --url http://collector --token …``: the audit reads a run through the collector's
query API with a read-scope token, and produces the same report as from the store.

Two runs are trained with the agent sending to a real ``moxco serve`` (auth on, an ingest token);
an operator adds a decision through the API (a decide token); then each run is audited twice, once
through the API (a read token) and once from the store file the collector serves, and the JSON
summaries must be equal but for where they were read from. ``--compare`` too. The series are
read raw in pages (``method=none``): forcing pages of 7 points gives the store's series exactly.
"""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer
from torch import nn

from moxco.cli import main
from moxco.collector import open_store
from moxco.collector.audit import source as source_module
from moxco.collector.audit.source import HttpSource, StoreSource
from tests.servers import wait_until
from tests.training import full_batch

STEPS = 40


def train(url, token, run, optimizer, tmp_path):
    data = load_breast_cancer()
    x = torch.tensor((data.data - data.data.mean(0)) / data.data.std(0), dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.float32).unsqueeze(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = optimizer(model.parameters())
    criterion = nn.BCEWithLogitsLoss()
    full_batch(model, opt, criterion, x, y, STEPS, url=url, token=token, run=run, reeval_every=1, probe_every=5,
               seed=0, random_scaling=run.endswith("rs"), transport={"spool_dir": str(tmp_path / f"spool-{run}")})


def post(url, path, token, body):
    request = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def collector(tmp_path_factory):
    from tests.servers import CollectorProcess

    tmp = tmp_path_factory.mktemp("http-audit")
    db = f"sqlite:///{tmp / 'collector.db'}"
    with open_store(db) as store:
        tokens = {scope: store.create_token(f"{scope}-token", [scope])[1] for scope in ("ingest", "read", "decide")}
    server = CollectorProcess(db, log=tmp / "collector.log").start()
    try:
        train(server.url, tokens["ingest"], "sgdm-rs", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), tmp)
        train(server.url, tokens["ingest"], "adam", lambda p: torch.optim.Adam(p, lr=0.01), tmp)
        with open_store(db) as store:
            wait_until(lambda: all(store.series(r, "loss")[0].size == STEPS for r in ("sgdm-rs", "adam")),
                       what="every point to reach the collector")
        post(server.url, "/api/v1/runs/sgdm-rs/decisions", tokens["decide"],
             {"action": {"phase": 2, "alpha": 0.1, "beta": 0.1}, "step": 20, "reason": "manual switch for the test"})
        yield server, db, tokens, tmp
    finally:
        server.stop()


def audit_json(tmp, name, *args):
    out = tmp / f"{name}.html"
    assert main(["audit", *args, "--out", str(out), "--quiet"]) == 0
    return json.loads(out.with_suffix(".json").read_text())


def without_source(summary):
    if "audits" in summary:
        return {**summary, "audits": {k: without_source(v) for k, v in summary["audits"].items()}}
    return {k: v for k, v in summary.items() if k != "source"}


def test_an_audit_over_http_equals_the_audit_from_the_store(collector, capsys):
    server, db, tokens, tmp = collector
    for run in ("sgdm-rs", "adam"):
        over_http = audit_json(tmp, f"{run}-http", run, "--url", server.url, "--token", tokens["read"])
        from_store = audit_json(tmp, f"{run}-store", run, "--store", db)
        assert over_http["source"] == server.url and from_store["source"] == db
        assert without_source(over_http) == without_source(from_store)
        assert over_http["overview"]["steps"] == STEPS
    # what the HTTP audit read: the operator's decision, with its cause, and random scaling's sub-verdict
    summary = audit_json(tmp, "sgdm-rs-again", "sgdm-rs", "--url", server.url, "--token", tokens["read"])
    decision = summary["sections"]["moxco"]["numbers"]["decisions"][0]
    assert decision["source"] == "operator" and decision["step"] == 20
    assert "manual switch for the test" in decision["line"]
    assert summary["sections"]["descent_lemma"]["extra_verdicts"]["random_scaling_identity"]["verdict"] != \
        "not applicable"
    capsys.readouterr()


def test_compare_over_http_equals_compare_from_the_store(collector):
    server, db, tokens, tmp = collector
    over_http = audit_json(tmp, "cmp-http", "--compare", "sgdm-rs", "adam", "--url", server.url,
                           "--token", tokens["read"])
    from_store = audit_json(tmp, "cmp-store", "--compare", "sgdm-rs", "adam", "--store", db)
    assert without_source(over_http) == without_source(from_store)
    rows = {row["key"]: row for row in over_http["configuration"]}
    assert rows["optimizer"]["values"] == ["SGD", "Adam"] and rows["lr"]["values"] == [0.1, 0.01]


def test_series_read_in_pages_equal_the_stores(collector, monkeypatch):
    server, db, tokens, _ = collector
    monkeypatch.setattr(source_module, "PAGE_POINTS", 7)  # 40 points: the collector refuses, the range is split
    http = HttpSource(server.url, tokens["read"])
    with StoreSource(open_store(db)) as store:
        detail = store.detail("sgdm-rs")
        assert http.detail("sgdm-rs")["metrics"] == detail["metrics"]
        for metric in detail["metrics"]:
            steps, values = http.series("sgdm-rs", metric)
            expected_steps, expected = store.series("sgdm-rs", metric)
            np.testing.assert_array_equal(steps, expected_steps)
            np.testing.assert_array_equal(values, expected)  # NaN where the store has NaN
        assert [d.to_json() for d in http.decisions("sgdm-rs")] == [d.to_json() for d in store.decisions("sgdm-rs")]


def test_http_refusals_say_what_to_do(collector, capsys):
    server, _, tokens, tmp = collector
    out = str(tmp / "refused.html")
    assert main(["audit", "adam", "--url", server.url, "--token", tokens["ingest"], "--out", out]) == 1
    assert "needs the read scope" in capsys.readouterr().err
    assert main(["audit", "adam", "--url", server.url, "--token", "mox_wrong", "--out", out]) == 1
    assert "refused the token" in capsys.readouterr().err
    assert main(["audit", "gpt3", "--url", server.url, "--token", tokens["read"], "--out", out]) == 1
    assert f"no run named 'gpt3' in {server.url}; available runs: adam, sgdm-rs" in capsys.readouterr().err
