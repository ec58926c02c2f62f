"""A real Prometheus scrapes a real ``moxco serve`` after a hostile ingest: names with newlines,
carriage returns, NEL, line separators, braces, quotes and ``# HELP`` in them are refused or left
out of the exposition, run names with quotes, backslashes and braces are escaped as label values,
and Prometheus keeps reading every sample (``up`` stays 1, no scrape error)."""

from __future__ import annotations

import time
from urllib.parse import quote

import httpx

from tests.figures import figure
from tests.servers import PrometheusServer, wait_until

RUNS = ['plain', 'quote"d', 'back\\slash', 'br{ace}s', '# HELP moxco_loss x', 'line\u2028separator', '🚀' * 50]
METRICS = ["loss\n", "loss\r", "loss\x85", "loss\x00", "loss\u2028", "lo ss", 'loss{run="x"}', "# HELP x y", "é",
           "Loss", "a-b", "9lives", "collector_store_up", "run_step", "decisions_total", "good_metric"]


def test_prometheus_keeps_scraping_after_a_hostile_ingest(tmp_path, serve):
    server = serve(f"sqlite:///{tmp_path / 'runs.db'}", "--no-auth")
    prometheus = PrometheusServer([f"127.0.0.1:{server.port}"])
    refused = stored = 0
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            for run in RUNS:
                path = "/api/v1/runs/" + quote(run, safe="")
                assert c.put(path, json={}).status_code == 200, run
                for i, metric in enumerate(METRICS):
                    r = c.post(path + "/batches", json={"batch_id": f"b{i}", "points": [[metric, 1, 0.5, 1.0]]})
                    assert r.status_code in (200, 422), (run, metric, r.text)
                    refused += r.status_code == 422
                    stored += r.status_code == 200
                c.post(path + "/batches", json={"batch_id": "loss", "points": [["loss", 1, 0.25, 1.0]]})
                for metric in ("lo%0Ass", "loss%0D", "x%00"):  # a metric named in a query: the same rule
                    assert c.get(f"{path}/series/{metric}").status_code == 422
        text = httpx.get(f"{server.url}/metrics").text
        for line in text.split("\n"):  # the format's only line break (U+2028 in a label value is data)
            if line and not line.startswith("#"):
                name = line.split("{", 1)[0].split(" ", 1)[0]
                assert name.startswith(("moxco_",)) and name.replace("_", "a").isalnum() and name.isascii(), line
        start = time.time()
        wait_until(lambda: len(prometheus.query(f'moxco_loss{{run=~".+"}}')) == len(RUNS), 60, "the runs' losses in Prometheus")
        wait_until(lambda: time.time() - start > 3, 10, "three more scrapes")
        up = prometheus.query('up{job="moxco-collector"}')
        (target,) = prometheus.api("targets")["activeTargets"]
        losses = {r["metric"]["run"]: float(r["value"][1]) for r in prometheus.query("moxco_loss")}
        left_out = {r["metric"]["run"]: float(r["value"][1]) for r in prometheus.query("moxco_run_metrics_left_out")}
        figure("a real Prometheus scraping after a hostile ingest (7 run names × 16 metric names)",
               batches_refused=refused, batches_stored=stored, up=up[0]["value"][1], scrape_error=target["lastError"] or "none")
        assert up[0]["value"][1] == "1" and target["health"] == "up" and target["lastError"] == ""
        assert losses == {run: 0.25 for run in RUNS}  # every run name came through as its label value
        assert all(v > 0 for v in left_out.values())  # the names not exposed are counted
        assert refused == len(RUNS) * 4  # \n, \r, NEL, NUL: control characters, refused everywhere
    finally:
        prometheus.close()
