"""The collector's pages (`/`, `/runs/{run}`) in a real browser.

A short embedded MoXCo run (moxco.agent.attach, a policy that fires, so a decision exists) writes a
SQLite store; `moxco serve` serves it (a subprocess); headless Chromium (the Debian `chromium`
package at /usr/bin/chromium, driven by Playwright's Python package; no browser download) opens the
pages. What the charts hold is read through the page's `window.moxcoCharts` hook and compared
with the store's series; the tests wait on conditions, never on time.

Screenshots go to the test's temporary folder (their paths are printed and recorded as test
properties); with MOXCO_UPDATE_DOC_IMAGES=1 the run page's is also copied to docs/img/pages-run.png.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import torch
from torch import nn

import moxco.agent
from moxco.collector.store import Store
from moxco.dashboards import build
from moxco.dashboards.validate import promql_metric_names
from moxco.optim import MoXCo
from tests.collector.pagekit import browser, page, run_url, screenshot, wait_loaded  # noqa: F401 (fixtures)
from tests.servers import CollectorProcess, serving

REPO = Path(__file__).resolve().parents[2]
RUN = "pages-demo"
FINISHED_RUN = "pages-finished"
# Markup, quotes, an ampersand and the URL-special characters % # ? (no "/": run names cannot hold it).
XSS_RUN = '<img src=x onerror="window.__xss=1"> "quoted" & 50% #1 ?q'
XSS_CONFIG = {"note": "</pre><script>window.__xss=2</script><b>bold</b>", "lr": 0.1}
# the runs list's columns
COLUMNS = ("select", "run", "status", "step", "optimizer", "lr", "alpha", "beta", "C", "phase", "goodness", "labels",
           "last data", "actions")


# --- servers ---------------------------------------------------------------------------------


def _feed(url: str, run: str, steps: int = 16) -> None:
    """A short MoXCo run with every metric group on and a policy that decides early; left running."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    reference = {k: v.detach().clone() + 0.01 for k, v in model.state_dict().items()}
    opt = MoXCo(model.parameters(), torch.optim.SGD, lr=0.05, alpha=0.9, beta=0.5, seed=0)
    criterion = nn.MSELoss()
    agent = moxco.agent.attach(model, opt, url=url, run=run, reeval_every=1, probe_every=2, criterion=criterion,
                               reference=reference, seed=0, goodness={"tau": 1.0, "form": "eos"},
                               policy={"threshold": 0.05, "consecutive": 1, "min_step": 4})
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    for _ in range(steps):
        loss = criterion(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    agent.close(status="running")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A store with the fed run, a finished run and a run whose name and config are markup,
    served without auth. Yields ``(collector, store)``."""
    url = f"sqlite:///{tmp_path_factory.mktemp('pages-store') / 'runs.db'}"
    _feed(url, RUN)
    store = Store(url)
    store.put_run(FINISHED_RUN, config={"optimizer": "SGD"})
    store.ingest(FINISHED_RUN, [(s, "loss", 1.0 / (s + 1), time.time()) for s in range(5)])
    store.set_status(FINISHED_RUN, "finished")
    store.put_run(XSS_RUN, config=XSS_CONFIG)
    store.ingest(XSS_RUN, [(s, "loss", 2.0 - 0.1 * s, time.time()) for s in range(4)])
    yield from serving(url, store)


# --- the pages ---------------------------------------------------------------------------------


def test_pages_and_static_files_are_served(served):
    collector, _ = served
    index = httpx.get(collector.url + "/")
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in index.headers["content-security-policy"]
    run = httpx.get(run_url(collector.url, XSS_RUN))
    assert run.status_code == 200 and 'id="panels"' in run.text
    assert "<img" not in run.text  # the server never writes the run name into markup
    vendor = httpx.get(collector.url + "/static/vendor/uPlot.iife.min.js")
    assert vendor.status_code == 200 and "v1.6.32" in vendor.text[:200]
    assert httpx.get(collector.url + "/runs", follow_redirects=True).url.path == "/"


def test_runs_page_lists_runs_with_status_step_phase_and_goodness(served, page, tmp_path, record_property):
    collector, store = served
    page.goto(collector.url + "/?refresh=1")
    row = page.locator("#runs tbody tr", has=page.get_by_role("link", name=RUN, exact=True))
    row.wait_for()
    latest = store.latest(RUN)
    detail = store.run(RUN)
    cells = dict(zip(COLUMNS, row.locator("td").all_inner_texts()))
    assert cells["run"] == RUN
    assert cells["status"].startswith("running")
    assert cells["step"] == f"{detail.last_step:,}"
    assert cells["phase"] == {1: "1 · explore", 2: "2 · commit"}[int(latest["phase"][1])]
    # the key hyper-parameters: the optimizer's class, lr, α, β and the policy's threshold C
    assert cells["optimizer"] == "MoXCo" and float(cells["lr"]) == 0.05
    assert float(cells["alpha"]) == 0.9 and float(cells["beta"]) == 0.5 and float(cells["C"]) == 0.05
    # the goodness cell fills in once /latest answered
    page.wait_for_function("([run, k]) => { const r = [...document.querySelectorAll('#runs tbody tr')]"
                           ".find(tr => tr.dataset.run === run); return r && r.cells[k].textContent !== '–'; }",
                           arg=[RUN, COLUMNS.index("goodness")])
    goodness = float(row.locator("td").nth(COLUMNS.index("goodness")).inner_text())
    assert goodness == pytest.approx(latest["goodness"][1], rel=5e-3)
    expected = {RUN, FINISHED_RUN, XSS_RUN}
    assert set(page.locator("#runs tbody td.name a").all_inner_texts()) == expected
    screenshot(page, tmp_path, "runs", record_property)

    # filters: by status, then by name (a substring), both kept in the URL
    page.select_option("#f-status", "finished")
    page.wait_for_function("() => [...document.querySelectorAll('#runs tbody td.name a')].map(a => a.textContent)"
                           ".join('|') === 'pages-finished'")
    assert "status=finished" in page.url
    page.select_option("#f-status", "")
    page.fill("#f-search", "demo")
    page.wait_for_function("() => [...document.querySelectorAll('#runs tbody td.name a')].map(a => a.textContent)"
                           ".join('|') === 'pages-demo'")
    page.fill("#f-search", "no-such-run-*")
    page.locator("#empty").wait_for()
    assert "No runs match" in page.locator("#empty").inner_text()


def _live_dashboard_metrics() -> set:
    """Run-level metrics the Grafana live-run dashboard charts (its Prometheus time-series panels)."""
    out = set()
    for panel in build.to_dict(build.live_run())["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            if inner.get("type") != "timeseries" or inner.get("datasource", {}).get("uid") != build.PROMETHEUS_UID:
                continue
            for target in inner.get("targets", []):
                out |= {name.removeprefix("moxco_") for name in promql_metric_names(target.get("expr", ""))}
    return out


def test_run_page_charts_hold_the_stored_points(served, page, tmp_path, record_property):
    collector, store = served
    page.goto(run_url(collector.url, RUN))
    wait_loaded(page)
    charts = page.evaluate("() => Object.values(window.moxcoCharts).map(c => ({id: c.id, metrics: c.metrics}))")
    charted = {m for c in charts for m in c["metrics"]}
    # the same panels as the Grafana dashboard: every metric it charts, and nothing else
    assert charted == _live_dashboard_metrics()
    stored_metrics = set(store.metrics(RUN))
    checked = 0
    for chart in charts:
        for metric in chart["metrics"]:
            steps, values, _ = store.series_columns(RUN, metric)
            held = page.evaluate("([id, m]) => window.moxcoCharts[id].plotted(m)", [chart["id"], metric])
            assert held["steps"] == steps.tolist(), f"{chart['id']}/{metric}"
            for got, want in zip(held["values"], values.tolist()):
                if math.isfinite(want):
                    assert got == pytest.approx(want, rel=1e-12, abs=1e-300), f"{chart['id']}/{metric}"
                else:
                    assert got is None, f"{chart['id']}/{metric}: a non-finite value is a gap"
            checked += metric in stored_metrics
    assert checked >= 20  # the fed run records (almost) every charted metric
    assert page.evaluate("() => window.moxcoCharts.loss.plotted('loss').steps.length") > 10

    # the goodness chart draws the policy's threshold C
    run = store.run(RUN)
    assert page.evaluate("() => window.moxcoCharts.goodness.threshold()") == [run.config["policy"]["threshold"]]

    # decisions: a marker on every chart at the decision's step, a tooltip, a table row
    decisions = [d.to_json() for d in store.decisions(RUN)]
    assert decisions, "the policy should have decided during the fed run"
    steps = [d["step"] for d in decisions]
    drawn = 0
    for chart in charts:  # (a chart with no point has no x axis to place them on)
        if not any(page.evaluate("([id, m]) => window.moxcoCharts[id].plotted(m).steps.length", [chart["id"], m])
                   for m in chart["metrics"]):
            continue
        assert page.evaluate("([id]) => window.moxcoCharts[id].decisionMarkers()", [chart["id"]]) == steps, chart["id"]
        drawn += 1
    assert drawn >= 10
    # a viewport as tall as the page: the hover needs no scrolling and the full-page screenshot
    # below shows the tooltip with the sticky top bar where it belongs
    page.set_viewport_size({"width": 1400, "height": page.evaluate("() => document.documentElement.scrollHeight")})
    marker = page.locator("[data-chart=goodness] .decision-marker").first
    marker.hover()
    tip = page.locator("[data-chart=goodness] .decision-tip")
    tip.wait_for(state="visible")
    text = tip.inner_text()
    first = decisions[0]
    assert f"Decision at step {first['step']:,}" in text
    shown_goodness = re.search(r"goodness ([-+.\de]+)", text)
    assert shown_goodness and float(shown_goodness.group(1)) == pytest.approx(first["goodness"], rel=1e-3)
    assert "phase 2" in text
    assert (f"applied at step {first['applied_step']:,}" if first["applied_step"] is not None else "not applied") in text
    assert page.locator("#decisions tbody tr").count() == len(decisions)

    # tiles and the configuration
    assert page.locator("[data-tile=Step] .tile-value").inner_text() == f"{run.last_step:,}"
    shown = json.loads(page.locator("pre[data-config=config]").inner_text())
    assert shown == run.config
    assert page.locator("#run-name").inner_text() == RUN
    path = screenshot(page, tmp_path, "run", record_property)
    if os.environ.get("MOXCO_UPDATE_DOC_IMAGES"):  # the suite never writes into the repository by default
        docs_image = REPO / "docs" / "img" / "pages-run.png"
        shutil.copyfile(path, docs_image)
        print(f"screenshot copied to {docs_image}")


def test_new_points_appear_without_reload_and_non_finite_values_are_gaps(served, page, tmp_path, record_property):
    collector, store = served
    page.goto(run_url(collector.url, RUN))
    wait_loaded(page)
    page.evaluate("() => { window.__sameDocument = true; }")
    last = store.run(RUN).last_step
    new = [last + 1, last + 2, last + 3, last + 4]
    now = time.time()
    body = {"batch_id": f"pages-test-{now}", "points": [
        ["loss", new[0], 0.5, now], ["loss", new[1], "NaN", now], ["loss", new[2], "Infinity", now],
        ["loss", new[3], "-Infinity", now], ["goodness", new[0], 0.42, now]]}
    response = httpx.post(f"{collector.url}/api/v1/runs/{quote(RUN, safe='')}/batches", json=body, timeout=30)
    assert response.status_code == 200, response.text
    page.wait_for_function("([s]) => window.moxcoCharts.loss.plotted('loss').steps.includes(s)", arg=[new[3]])
    assert page.evaluate("() => window.__sameDocument") is True  # appended live, not reloaded

    held = page.evaluate("() => window.moxcoCharts.loss.plotted('loss')")
    steps, _, _ = store.series_columns(RUN, "loss")
    assert held["steps"] == steps.tolist()
    tail = dict(zip(held["steps"], held["values"]))
    assert tail[new[0]] == 0.5
    assert tail[new[1]] is None and tail[new[2]] is None and tail[new[3]] is None  # gaps in the line
    raw = page.evaluate("() => window.moxcoCharts.loss.raw('loss')")
    assert raw["values"][-3:] == ["NaN", "Infinity", "-Infinity"]
    page.wait_for_function("() => window.moxcoCharts.loss.nonFiniteMarkers() === 3")
    assert "3 non-finite" in page.locator("[data-chart=loss] .note").inner_text()
    # the legend, off the chart, shows the latest value as text; the Loss tile too
    assert "−Inf" in page.evaluate("() => window.moxcoCharts.loss.legend('loss')")
    page.wait_for_function("() => document.querySelector('[data-tile=Loss] .tile-value').textContent === '−Inf'")
    page.wait_for_function("([s]) => window.moxcoCharts.goodness.plotted('goodness').steps.includes(s)", arg=[new[0]])
    screenshot(page, tmp_path, "run-after-new-points", record_property)


def test_markup_in_run_names_and_configs_is_shown_as_text(served, page, tmp_path, record_property):
    collector, store = served
    page.goto(collector.url + "/")
    link = page.get_by_role("link", name=XSS_RUN, exact=True)
    link.wait_for()
    assert page.evaluate("() => document.querySelectorAll('#runs img').length") == 0
    link.click()
    wait_loaded(page)
    assert page.locator("#run-name").inner_text() == XSS_RUN
    assert page.title() == f"{XSS_RUN} · moxco"
    assert json.loads(page.locator("pre[data-config=config]").inner_text()) == XSS_CONFIG
    page.wait_for_function("() => window.moxcoCharts.loss.plotted('loss').steps.length === 4")
    assert page.evaluate("() => [window.__xss, document.querySelectorAll('main img, main script, main b').length]") \
        == [None, 0]
    screenshot(page, tmp_path, "run-markup-name", record_property)


def test_a_run_that_does_not_exist_is_reported_not_crashed(served, page):
    collector, _ = served
    page.goto(run_url(collector.url, "no-such-run"))
    page.locator("#error").wait_for(state="visible")
    assert "No run named “no-such-run”" in page.locator("#error").inner_text()
    assert page.evaluate("() => window.moxcoPage.loaded") is False


def test_with_auth_the_page_asks_for_a_read_token_once(tmp_path, page):
    url = f"sqlite:///{tmp_path / 'auth.db'}"
    with Store(url) as store:
        store.put_run("secured", config={"optimizer": "SGD"})
        store.ingest("secured", [(s, "loss", 1.0 / (s + 1), time.time()) for s in range(7)])

    def token(*scopes: str) -> str:
        args = [sys.executable, "-m", "moxco.cli", "token", "create", "--store", url, "--name", "-".join(scopes)]
        for scope in scopes:
            args += ["--scope", scope]
        done = subprocess.run(args, capture_output=True, text=True, cwd=REPO, check=True)
        return done.stdout.strip()

    reader, ingester = token("read"), token("ingest")
    collector = CollectorProcess(url).start()
    try:
        page.goto(collector.url + "/?refresh=1")
        dialog = page.locator("#token-dialog")
        dialog.wait_for(state="visible")
        assert "requires an API token" in page.locator("#token-message").inner_text()
        page.fill("#token-input", "not-a-token")
        page.click("#token-submit")
        page.wait_for_function("() => (document.querySelector('#token-message') || {}).textContent?.includes('refused')")
        page.fill("#token-input", ingester)
        page.click("#token-submit")
        page.wait_for_function("() => (document.querySelector('#token-message') || {}).textContent?.includes('may not read')")
        page.fill("#token-input", reader)
        page.click("#token-submit")
        page.get_by_role("link", name="secured", exact=True).wait_for()
        assert page.evaluate("() => sessionStorage.getItem('moxco.token')") == reader
        assert page.locator("#forget-token").is_visible()

        # kept for the tab: a reload and the run page read without asking again
        page.reload()
        page.get_by_role("link", name="secured", exact=True).wait_for()
        page.get_by_role("link", name="secured", exact=True).click()
        wait_loaded(page)
        assert page.evaluate("() => window.moxcoCharts.loss.plotted('loss').steps") == list(range(7))
        assert page.locator("#token-dialog").count() == 0
    finally:
        collector.stop()
