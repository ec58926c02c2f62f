"""Real processes: `moxco serve` (uvicorn, several workers on PostgreSQL), tokens made with the
CLI, a real Prometheus scraping a collector fed by a training job, `promtool check metrics`."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from moxco.collector.store import Store
from tests.servers import free_port


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moxco.cli", *args], capture_output=True, text=True, timeout=120)


def test_no_auth_is_refused_on_a_non_loopback_bind(tmp_path):
    r = cli("serve", "--store", f"sqlite:///{tmp_path / 'x.db'}", "--host", "0.0.0.0", "--no-auth")
    assert r.returncode == 2 and "only allowed on a loopback address" in r.stderr


def test_tokens_scopes_and_decide_cli_against_a_served_store(tmp_path, serve):
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    assert "revision 0009" in cli("db", "upgrade", "--store", url).stdout
    ingest = cli("token", "create", "--store", url, "--name", "trainer", "--scope", "ingest").stdout.strip()
    reader = cli("token", "create", "--store", url, "--name", "grafana", "--scope", "read").stdout.strip()
    operator = cli("token", "create", "--store", url, "--name", "ops", "--scope", "decide").stdout.strip()
    assert ingest.startswith("mox_") and len({ingest, reader, operator}) == 3
    with Store(url) as store:
        assert all(ingest not in str(row) for row in store.tokens())  # only hashes are stored
    server = serve(url)
    auth = lambda token: {"Authorization": f"Bearer {token}"}
    base = server.url + "/api/v1/runs"
    r = httpx.put(base + "/job", json={})
    assert r.status_code == 401 and "missing token" in r.json()["error"]["message"]
    assert httpx.put(base + "/job", json={}, headers=auth("mox_wrong")).status_code == 401
    assert httpx.put(base + "/job", json={}, headers=auth(ingest)).status_code == 200
    r = httpx.get(base + "/job", headers=auth(ingest))
    assert r.status_code == 403 and "lacks the 'read' scope" in r.json()["error"]["message"]
    assert httpx.get(base + "/job", headers=auth(reader)).status_code == 200
    assert httpx.post(base + "/job/batches", json={"batch_id": "1", "points": [["loss", 5, 1.0, 1.0]]},
                      headers=auth(reader)).status_code == 403
    assert httpx.post(base + "/job/batches", json={"batch_id": "1", "points": [["loss", 5, 1.0, 1.0]]},
                      headers=auth(ingest)).status_code == 200

    r = cli("decide", "job", "--phase", "2", "--alpha", "0.2", "--url", server.url, "--token", reader)
    assert r.returncode == 2 and "decide" in r.stderr
    r = cli("decide", "job", "--phase", "2", "--alpha", "0.2", "--url", server.url, "--token", operator)
    assert r.returncode == 0, r.stderr
    assert '"id": "job:operator:5"' in r.stdout
    (pending,) = httpx.get(base + "/job/decisions/pending", headers=auth(ingest)).json()["decisions"]
    assert pending["action"] == {"phase": 2, "alpha": 0.2}
    assert cli("decide", "job", "--phase", "1", "--step", "9", "--store", url).returncode == 0
    assert len(httpx.get(base + "/job/decisions", headers=auth(reader)).json()["decisions"]) == 2

    assert "revoked 1" in cli("token", "revoke", "grafana", "--store", url).stdout
    listed = cli("token", "list", "--store", url).stdout
    assert "grafana" in listed and "revoked" in listed and reader not in listed


def test_several_workers_on_postgresql_share_one_policy_and_store_batches_once(pg_url, serve):
    server = serve(pg_url, "--workers", "2", "--no-auth")
    base = server.url + "/api/v1/runs/shared"
    policy = {"threshold": 0.5, "consecutive": 1, "max_decisions": 1}
    assert httpx.put(base, json={"policy": policy}).status_code == 200

    def send(i: int):
        body = {"batch_id": f"b{i % 20}", "points": [["goodness", 10 + i % 20, 0.9, 1.0]] +
                [["loss", (i % 20) * 100 + k, float(k), 1.0] for k in range(100)]}
        with httpx.Client(base_url=server.url, timeout=30) as c:
            return c.post("/api/v1/runs/shared/batches", json=body).json()

    with ThreadPoolExecutor(16) as pool:  # every batch id sent three times, concurrently
        answers = list(pool.map(send, range(60)))
    assert all("error" not in a for a in answers), answers
    by_id = {}
    for a in answers:
        by_id.setdefault(a["batch_id"], []).append(a["duplicate"])
    assert all(sorted(v) == [False, True, True] for v in by_id.values())
    decisions = httpx.get(base + "/decisions").json()["decisions"]
    assert len(decisions) == 1  # max_decisions=1, whatever worker took which batch
    loss = httpx.get(base + "/series/loss", params={"method": "none", "max_points": 5000}).json()
    assert loss["total"] == 2000 and loss["steps"] == list(range(2000))
    metrics = httpx.get(server.url + "/metrics").text
    assert 'moxco_collector_ingest_batches_total{outcome="duplicate"} 40.0' in metrics  # summed over workers
    assert 'moxco_collector_ingest_batches_total{outcome="stored"} 20.0' in metrics
    assert 'moxco_decisions_total{run="shared"} 1.0' in metrics


def _need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.fail(f"{binary} is not installed: install the Debian package `prometheus` "
                    "(`apt-get install -y prometheus` or `bash scripts/setup.sh dev`)", pytrace=False)
    return path


def test_prometheus_scrapes_a_collector_fed_by_a_training_job(tmp_path, serve):
    import torch
    from torch import nn

    import moxco.agent

    promtool, prometheus = _need("promtool"), _need("prometheus")
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    server = serve(url, "--no-auth")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(256, 4), torch.randn(256, 1)
    criterion = nn.MSELoss()
    agent = moxco.agent.attach(model, opt, url=url, run='job "α"', probe_every=5, reeval_every=1,
                               criterion=criterion, policy={"threshold": 0.99, "consecutive": 1000})
    for step in range(40):
        loss = criterion(model(x[step % 8 * 32:][:32]), y[step % 8 * 32:][:32])
        loss.backward()
        opt.step()
        opt.zero_grad()
    deadline = time.monotonic() + 30
    while "moxco_goodness{" not in (text := httpx.get(server.url + "/metrics").text):
        assert time.monotonic() < deadline, text
        time.sleep(0.5)
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr

    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(f"global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: moxco\n"
                      f"    static_configs:\n      - targets: ['127.0.0.1:{server.port}']\n")
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                result = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": "moxco_goodness"}).json()
                if result["data"]["result"]:
                    break
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            if time.monotonic() > deadline:
                log.seek(0)
                pytest.fail("Prometheus never returned moxco_goodness:\n" + log.read().decode(errors="replace")[-3000:])
            time.sleep(0.5)
        (series,) = result["data"]["result"]
        assert series["metric"]["run"] == 'job "α"'
        stored = Store(url).latest('job "α"')["goodness"][1]
        assert float(series["value"][1]) == pytest.approx(stored)
    finally:
        proc.terminate()
        proc.wait(20)
        agent.close()
    # a finished run drops out of the exposition
    time.sleep(1.2)
    assert "moxco_goodness{" not in httpx.get(server.url + "/metrics").text
