"""The run's own series (``agent.log``) on the run and compare pages, in headless Chromium: a "Your
metrics" section after the catalogue's, one chart per stored series the catalogue does not know,
drawn by the same chart code (zoom, smoothing, log scale, x-axis modes, decision markers), absent
for a run that logs none, and grown live when a new series arrives."""

from __future__ import annotations

import math
import time

import pytest
import torch
from torch import nn

import moxco.agent
from moxco import catalogue
from moxco.collector.store import Store
from moxco.decision import Decision
from tests.collector.pagekit import browser, compare_url, page, run_url, wait_loaded  # noqa: F401 (fixtures)
from tests.servers import serving

OWN = "own-series"  # val_loss every 5th step, accuracy every step (one NaN), through agent.log
PLAIN = "no-own-series"  # the same loop, nothing logged by the user
STEPS = 40
USER = ["accuracy", "val_loss"]  # the charts' order: by name


def _feed(url: str, run: str, log: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    criterion = nn.MSELoss()
    agent = moxco.agent.attach(model, opt, url=url, run=run, criterion=criterion, reeval_every=0, probe_every=0,
                               seed=0)
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    for step in range(STEPS):
        loss = criterion(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if log:
            if step % 5 == 0:
                agent.log({"val_loss": 1.0 / (step + 1)})
            agent.log({"accuracy": math.nan if step == 17 else torch.tensor(0.5 + step / 100)})
    agent.close(status="running")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('user-series') / 'runs.db'}"
    _feed(url, OWN, log=True)
    _feed(url, PLAIN, log=False)
    store = Store(url)
    store.add_decision(OWN, Decision(20, {"phase": 2}, source="operator"))
    yield from serving(url, store)


def _chart(metric: str) -> str:
    return f"window.moxcoCharts[moxcoPlot.userChartId({metric!r})]"


def _user_charts(page) -> list:
    return page.evaluate("() => [...document.querySelectorAll('[data-section=user] [data-chart]')]"
                         ".map(el => el.dataset.chart)")


def test_the_run_page_charts_each_own_series_with_exactly_the_stored_points(served, page):
    collector, store = served
    assert {"val_loss", "accuracy"} <= set(store.metrics(OWN)) and not set(USER) & set(catalogue.ALL)
    page.goto(run_url(collector.url, OWN, refresh=0))
    wait_loaded(page)
    section = page.locator("[data-section=user]")
    assert section.is_visible() and section.locator("h2").inner_text() == "Your metrics"
    # after the catalogue's sections, one chart per user series, titled with its name
    sections = page.evaluate("() => [...document.querySelectorAll('#panels > [data-section]')].map(s => s.dataset.section)")
    assert sections[-1] == "user" and len(sections) == len(catalogue.SECTIONS) + 1
    assert _user_charts(page) == [f"user:{m}" for m in USER]
    assert section.locator("[data-chart] h3").all_inner_texts() == USER
    for metric in USER:
        steps, values, _walls = store.series_columns(OWN, metric)
        held = page.evaluate(f"() => {_chart(metric)}.plotted({metric!r})")
        assert held["steps"] == steps.tolist(), metric
        assert len(held["values"]) == values.size
        for got, want in zip(held["values"], values.tolist()):
            if math.isfinite(want):
                assert got == pytest.approx(want, rel=1e-12, abs=1e-300), metric
            else:
                assert got is None, f"{metric}: a non-finite value is a gap"
    assert store.series(OWN, "val_loss")[0].tolist() == list(range(1, STEPS + 1, 5))  # every 5th step
    assert page.evaluate(f"() => {_chart('accuracy')}.raw('accuracy').values").count("NaN") == 1
    assert page.evaluate(f"() => {_chart('accuracy')}.nonFiniteMarkers()") == 1
    # the decision's marker, as on every chart of the run
    assert page.evaluate(f"() => {_chart('val_loss')}.decisionMarkers()") == [20]
    assert page.evaluate("() => window.moxcoCharts.loss.decisionMarkers()") == [20]


def test_own_series_zoom_smooth_switch_scale_and_x_axis_with_the_rest(served, page):
    collector, store = served
    page.goto(run_url(collector.url, OWN, refresh=0))
    wait_loaded(page)
    chart = _chart("val_loss")
    # drag across the loss chart: the user charts zoom to the same steps
    box = page.locator("[data-chart=loss] .u-over").bounding_box()
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] * 0.2, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.5, y, steps=8)
    page.mouse.up()
    page.wait_for_function(f"() => {chart}.xRange()[1] - {chart}.xRange()[0] < 20")
    assert page.evaluate(f"() => {chart}.xRange()") == page.evaluate("() => window.moxcoCharts.loss.xRange()")
    page.click("#reset-zoom")
    # smoothing: the EMA drawn, the raw line faint underneath
    page.locator("#smoothing").fill("0.5")
    page.wait_for_function(f"() => {chart}.rawLinesDrawn() === 1")
    values = store.series(OWN, "val_loss")[1].tolist()
    smoothed = page.evaluate(f"() => {chart}.plotted('val_loss').values")
    ema, last = [], 0.0
    for n, v in enumerate(values, 1):
        last = 0.5 * last + 0.5 * v
        ema.append(last / (1 - 0.5 ** n))
    assert smoothed == pytest.approx(ema, rel=1e-12)
    page.locator("#smoothing").fill("0")
    # the y scale switch
    page.locator("[data-section=user] [data-chart='user:val_loss'] button.scale").click()
    page.wait_for_function(f"() => {chart}.scale().distr === 4")
    # wall time on the x axis: the points' stored wall times
    page.select_option("#x-mode", "wall")
    walls = store.series_columns(OWN, "val_loss")[2].tolist()
    page.wait_for_function(f"() => {chart}.plotted('val_loss').steps[0] > 1e9")
    assert page.evaluate(f"() => {chart}.plotted('val_loss').steps") == pytest.approx(walls, rel=1e-12)


def test_a_run_without_own_series_has_no_your_metrics_section(served, page):
    collector, store = served
    assert not set(store.metrics(PLAIN)) - set(catalogue.ALL)
    page.goto(run_url(collector.url, PLAIN, refresh=0))
    wait_loaded(page)
    page.wait_for_function("() => window.moxcoCharts.loss.plotted('loss').steps.length > 0")
    assert page.locator("[data-section=user]").is_hidden()
    assert _user_charts(page) == []
    assert not [k for k in page.evaluate("() => Object.keys(window.moxcoCharts)") if k.startswith("user:")]


def test_an_own_series_that_appears_while_the_page_is_open_gets_its_chart(served, page):
    collector, store = served
    run = "grows-live"
    store.put_run(run)
    store.ingest(run, [(s, "loss", 1.0 / (s + 1), time.time()) for s in range(5)])
    page.goto(run_url(collector.url, run, refresh=1))
    wait_loaded(page)
    assert page.locator("[data-section=user]").is_hidden()
    store.ingest(run, [(s, "eval/bleu", 10.0 + s, time.time()) for s in range(0, 5, 2)])
    page.wait_for_function(f"() => {_chart('eval/bleu')} && {_chart('eval/bleu')}.plotted('eval/bleu').steps.length === 3")
    assert page.locator("[data-section=user]").is_visible()
    assert page.evaluate(f"() => {_chart('eval/bleu')}.plotted('eval/bleu')") == {"steps": [0, 2, 4],
                                                                                   "values": [10.0, 12.0, 14.0]}
    # and its new points are appended
    store.ingest(run, [(6, "eval/bleu", 16.0, time.time())])
    page.wait_for_function(f"() => {_chart('eval/bleu')}.plotted('eval/bleu').steps.includes(6)")


def test_the_compare_page_overlays_the_runs_own_series_and_drops_them_with_the_run(served, page):
    collector, store = served
    page.goto(compare_url(collector.url, [OWN, PLAIN], refresh=0))
    wait_loaded(page)
    page.wait_for_function(f"() => {_chart('val_loss')} && {_chart('val_loss')}.plotted('val_loss', {OWN!r}).steps.length > 0")
    assert _user_charts(page) == [f"user:{m}" for m in USER]
    lines = page.evaluate(f"() => {_chart('val_loss')}.lines()")
    assert [line["run"] for line in lines] == [OWN, PLAIN]  # one line per run; the plain run's is empty
    steps, values = store.series(OWN, "val_loss")
    got = page.evaluate(f"() => {_chart('val_loss')}.plotted('val_loss', {OWN!r})")
    assert got["steps"] == steps.tolist() and got["values"] == pytest.approx(values.tolist(), rel=1e-12)
    assert page.evaluate(f"() => {_chart('val_loss')}.plotted('val_loss', {PLAIN!r}).steps") == []
    # removing the run that logged them takes the section away
    page.click(f".run-chip[data-run='{OWN}'] button")
    page.wait_for_function("() => window.moxcoPage.runs.length === 1")
    assert page.locator("[data-section=user]").is_hidden() and _user_charts(page) == []
