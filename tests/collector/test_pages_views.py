"""The run page in headless Chromium: drag-to-zoom, smoothing, log scales, the x axis (step, wall
time, relative time), the agent's failures (a banner, and empty panels that say why), the download
button, tags and notes, and panels drawn from the served catalogue (one added at run time shows up
with no change to the page)."""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import pandas as pd
import pytest
import uvicorn

from moxco import catalogue
from moxco.collector.api import create_app
from moxco.collector.store import Store
from tests.collector.pagekit import browser, page, run_url, screenshot, synthetic_run, wait_loaded  # noqa: F401
from tests.servers import free_port, serving, wait_until

PARTIAL = "partial"  # loss and goodness only: most panels stay empty
SIGNED = "signed"  # every synthetic metric, update correlations of both signs
BROKEN = "broken"  # an agent that failed: stored errors, status failed
ERRORS = {"reference": "RuntimeError: the reference state_dict has no key 'fc.weight'",
          "gradient": "ValueError: gradient record failed"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('views') / 'runs.db'}"
    store = Store(url)
    synthetic_run(store, PARTIAL, steps=1316, metrics={"loss", "goodness"}, status="running")
    synthetic_run(store, SIGNED, steps=300, seed=1)
    synthetic_run(store, BROKEN, steps=50, metrics={"loss", "update_norm", "distance"}, status="running",
                  config={"reeval_every": 0, "reference": True})
    store.put_run(BROKEN, config={"errors": ERRORS}, status="failed")
    yield from serving(url, store)


def _drag(page, chart: str, start: float, end: float) -> None:
    box = page.locator(f"[data-chart={chart}] .u-over").bounding_box()
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] * start, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * (start + end) / 2, y, steps=6)
    page.mouse.move(box["x"] + box["width"] * end, y, steps=6)
    page.mouse.up()


def _ranges(page) -> dict:
    return page.evaluate("() => Object.fromEntries(Object.entries(window.moxcoCharts).map(([k, c]) => [k, c.xRange()]))")


@pytest.mark.parametrize("refresh", [0, 1])
def test_drag_zooms_every_chart_to_the_dragged_steps_even_with_empty_panels(served, page, refresh):
    """Dragging across the loss chart of a run whose other panels are empty zooms every chart with
    points to the dragged steps (the empty charts' mirrored selection is NaN steps: ignored); the
    zoom survives live updates; double-click resets it."""
    collector, store = served
    page.goto(run_url(collector.url, PARTIAL, refresh=refresh))
    wait_loaded(page)
    last = store.run(PARTIAL).last_step
    assert page.evaluate("() => window.moxcoCharts.loss.xRange()") == [0, last]
    _drag(page, "loss", 0.25, 0.75)
    page.wait_for_function("() => !document.getElementById('reset-zoom').hidden")
    ranges = _ranges(page)
    lo, hi = ranges["loss"]
    assert 0 < lo < hi < last and hi - lo < 0.75 * last, ranges
    assert ranges["goodness"] == [lo, hi]  # the other chart with points follows
    for chart, (a, b) in ranges.items():
        assert (a is None and b is None) or (math.isfinite(a) and math.isfinite(b)), (chart, a, b)
    ticks = page.evaluate("() => window.moxcoCharts.loss.plot.axes[0]._values")
    assert ticks and all(t for t in ticks)  # x tick labels, not empty
    if refresh:  # a live update (new points) keeps the zoom
        store.ingest(PARTIAL, [(last + 1, "loss", 0.1, time.time())])
        page.wait_for_function("([s]) => window.moxcoCharts.loss.raw('loss').steps.includes(s)", arg=[last + 1])
        assert page.evaluate("() => window.moxcoCharts.loss.xRange()") == [lo, hi]
    page.dblclick("[data-chart=loss] .u-over")
    page.wait_for_function("() => document.getElementById('reset-zoom').hidden")
    end = store.run(PARTIAL).last_step
    assert page.evaluate("() => window.moxcoCharts.loss.xRange()") == [0, end]


def _ema(values, w):
    out, last, n = [], 0.0, 0
    for v in values:
        if not math.isfinite(v):
            out.append(None)
            continue
        last = last * w + (1 - w) * v
        n += 1
        out.append(last / (1 - w ** n))
    return out


def test_smoothing_draws_the_ema_and_keeps_the_raw_line_faint(served, page, tmp_path, record_property):
    collector, store = served
    page.goto(run_url(collector.url, SIGNED, refresh=0))
    wait_loaded(page)
    raw = page.evaluate("() => window.moxcoCharts.loss.plotted('loss').values")
    steps, values = store.series(SIGNED, "loss")
    assert raw == pytest.approx(values.tolist(), rel=1e-12)
    assert page.evaluate("() => window.moxcoCharts.loss.rawLinesDrawn()") == 0
    page.locator("#smoothing").fill("0.9")
    page.wait_for_function("() => window.moxcoCharts.loss.rawLinesDrawn() === 1")
    smoothed = page.evaluate("() => window.moxcoCharts.loss.plotted('loss').values")
    assert smoothed == pytest.approx(_ema(values.tolist(), 0.9), rel=1e-9)
    assert np.std(np.diff(smoothed)) < 0.5 * np.std(np.diff(values))  # smoother
    assert "EMA 0.9" in page.locator("[data-chart=loss] .note").inner_text()
    # the raw values stay in the data, the legend shows both
    assert page.evaluate("() => window.moxcoCharts.loss.raw('loss').values.length") == steps.size
    assert "raw" in page.evaluate("() => window.moxcoCharts.loss.legend('loss')")
    # stepped panels (phase, optimizer state) are never smoothed
    phase = store.series(SIGNED, "phase")[1].tolist()
    assert page.evaluate("() => window.moxcoCharts.phase.plotted('phase').values") == phase
    assert page.evaluate("() => window.moxcoCharts.phase.rawLinesDrawn()") == 0
    screenshot(page, tmp_path, "run-smoothed", record_property)
    page.locator("#smoothing").fill("0")
    page.wait_for_function("() => window.moxcoCharts.loss.rawLinesDrawn() === 0")
    assert page.evaluate("() => window.moxcoCharts.loss.plotted('loss').values") == pytest.approx(values.tolist())


def test_every_panel_switches_between_linear_and_log_and_symlog_ticks_cover_both_signs(served, page):
    collector, store = served
    page.goto(run_url(collector.url, SIGNED, refresh=0))
    wait_loaded(page)
    assert page.evaluate("() => window.moxcoCharts.loss.scale()") == {"log": False, "distr": 1}
    page.click("[data-chart=loss] button.scale")
    page.wait_for_function("() => window.moxcoCharts.loss.scale().distr === 4")
    assert page.locator("[data-chart=loss] button.scale").inner_text() == "log"
    values = store.series(SIGNED, "loss")[1].tolist()
    assert page.evaluate("() => window.moxcoCharts.loss.plotted('loss').values") == pytest.approx(values)
    ticks = page.evaluate("() => window.moxcoCharts.loss.yTicks()")
    assert ticks and all(t > 0 for t in ticks)
    # update_corr (log by default) spans both signs: ticks, with labels, on both halves
    corr = store.series(SIGNED, "update_corr")[1]
    assert corr.min() < -10 and corr.max() > 10
    assert page.evaluate("() => window.moxcoCharts.update_corr.scale()") == {"log": True, "distr": 4}
    ticks = page.evaluate("() => window.moxcoCharts.update_corr.yTicks()")
    labels = page.evaluate("() => window.moxcoCharts.update_corr.plot.axes[1]._values")
    negative = [label for t, label in zip(ticks, labels) if t < 0]
    assert len(negative) >= 2 and all(negative) and any(t > 0 for t in ticks) and 0 in ticks, (ticks, labels)
    # update_corr_rs is dashed, so update_corr stays visible under it
    dashes = page.evaluate("() => window.moxcoCharts.update_corr.plot.series.map(s => s.dash || null)")
    assert dashes[1] is None and dashes[2]
    page.click("[data-chart=update_corr] button.scale")
    page.wait_for_function("() => window.moxcoCharts.update_corr.scale().distr === 1")
    assert page.locator("[data-chart=phase] button.scale").count() == 0  # the phase panel has fixed ticks


def test_the_x_axis_shows_steps_wall_time_or_time_since_the_start(served, page):
    collector, store = served
    page.goto(run_url(collector.url, SIGNED, refresh=0))
    wait_loaded(page)
    steps, _, walls = store.series_columns(SIGNED, "loss")
    assert page.evaluate("() => window.moxcoCharts.loss.plotted('loss').steps") == steps.tolist()
    page.select_option("#x-mode", "relative")
    page.wait_for_function("() => window.moxcoCharts.loss.plotted('loss').steps[0] === 0")
    assert page.evaluate("() => window.moxcoCharts.loss.plotted('loss').steps") == pytest.approx((walls - walls[0]).tolist())
    assert page.evaluate("() => window.moxcoCharts.loss.plot.scales.x.time") is False
    ticks = page.evaluate("() => window.moxcoCharts.loss.plot.axes[0]._values")
    assert any(t.endswith((" s", " min")) for t in ticks if t), ticks
    page.select_option("#x-mode", "wall")
    page.wait_for_function("() => window.moxcoCharts.loss.plot.scales.x.time === true")
    assert page.evaluate("() => window.moxcoCharts.loss.plotted('loss').steps") == pytest.approx(walls.tolist())
    # decision markers follow the axis: at the wall time of their step
    decided = [d.step for d in store.decisions(SIGNED)]
    assert decided and page.evaluate("() => window.moxcoCharts.goodness.decisionMarkers()") == decided
    # the raw values are still by step
    assert page.evaluate("() => window.moxcoCharts.loss.raw('loss').steps") == steps.tolist()
    page.select_option("#x-mode", "step")
    page.wait_for_function("() => window.moxcoCharts.loss.plotted('loss').steps[1] === 1")


def test_an_agent_that_failed_shows_its_errors_and_empty_panels_say_why(served, page, tmp_path, record_property):
    collector, _ = served
    page.goto(run_url(collector.url, BROKEN, refresh=0.5))
    wait_loaded(page)
    page.wait_for_function("() => window.moxcoPage.polls >= 2")
    banner = page.locator("#run-errors")
    assert banner.is_visible()
    text = banner.inner_text()
    assert "The run failed." in text and "2 failures" in text
    for part, message in ERRORS.items():
        assert f"{part}: {message}" in text
    assert "drops" in banner.locator("li[data-part=gradient]").inner_text()
    live = page.locator("#live").inner_text()
    assert live.startswith("failed") and "live" not in live
    empty = page.evaluate("() => Object.fromEntries(Object.entries(window.moxcoCharts).map(([k, c]) => [k, c.empty()]))")
    assert empty["loss"] is None and empty["update"] is None  # these have points
    assert empty["convexity_ratio"].startswith("no points: the agent's reference failed")
    assert empty["grad_norm_sq"].startswith("no points: the agent's gradient failed")
    assert empty["gap"].startswith("no points: the agent's gradient failed") or "reeval_every > 0" in empty["gap"]
    assert "needs probe_every > 0" in empty["sharpness"]  # nothing failed there: what the run needs
    assert not any(v == "no points yet" for v in empty.values())
    screenshot(page, tmp_path, "run-failed", record_property)


def test_the_download_button_saves_the_whole_run_as_csv_or_parquet(served, page, tmp_path):
    collector, store = served
    page.goto(run_url(collector.url, SIGNED, refresh=0))
    wait_loaded(page)
    with page.expect_download() as info:
        page.click("#download")
    download = info.value
    assert download.suggested_filename == f"{SIGNED}.csv"
    frame = pd.read_csv(download.path(), index_col="step")
    want = store.frame(SIGNED)
    assert frame.index.tolist() == want.index.tolist() and list(frame.columns) == list(want.columns)
    for column in want.columns:
        assert np.array_equal(frame[column].to_numpy(), want[column].to_numpy(), equal_nan=True), column
    page.select_option("#download-format", "parquet")
    with page.expect_download() as info:
        page.click("#download")
    assert info.value.suggested_filename == f"{SIGNED}.parquet"
    import pyarrow.parquet as pq

    table = pq.read_table(info.value.path(), use_threads=False)
    assert table["step"].to_pylist() == want.index.tolist()
    assert page.locator("#download-status").inner_text().startswith(f"{SIGNED}.parquet")


def test_tags_and_note_are_edited_on_the_run_page(served, page):
    collector, store = served
    page.goto(run_url(collector.url, SIGNED, refresh=0))
    wait_loaded(page)
    page.click("#edit-labels")
    page.fill("#labels-form input[name=tags]", "baseline, lr 0.05 ,baseline")
    page.fill("#labels-form textarea[name=note]", "the <b>reference</b> run")
    page.click("#labels-save")
    page.wait_for_function("() => document.querySelectorAll('#run-tags .tag').length === 2")
    assert page.locator("#run-tags .tag").all_inner_texts() == ["baseline", "lr 0.05"]
    assert page.locator("#run-note").inner_text() == "the <b>reference</b> run"  # text, not markup
    run = store.run(SIGNED)
    assert run.tags == ["baseline", "lr 0.05"] and run.note == "the <b>reference</b> run"


@pytest.fixture
def in_process(tmp_path):
    """A collector app served by uvicorn in this process (so the test can change the catalogue it
    serves), without auth."""
    store = Store(f"sqlite:///{tmp_path / 'runs.db'}")
    app = create_app(store=store, auth=False, migrate=False, stale_after=0)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, what="the in-process collector")
    try:
        yield f"http://127.0.0.1:{server.config.port}", store
    finally:
        server.should_exit = True
        thread.join(30)
        store.close()


def test_a_metric_added_to_the_catalogue_is_drawn_with_no_change_to_the_page(in_process, page, monkeypatch):
    base, store = in_process
    metric = catalogue.Metric("my_metric", "user", "a user's own series", panel="mine", label="mine")
    panel = catalogue.Panel("mine", "training", "My own panel", "Logged with agent.log.", log=True)
    monkeypatch.setattr(catalogue, "METRICS", catalogue.METRICS + (metric,))
    monkeypatch.setattr(catalogue, "PANELS", catalogue.PANELS + (panel,))
    store.put_run("user-run")
    store.ingest("user-run", [(s, "my_metric", s * s - 50.0, 1.7e9 + s) for s in range(20)])
    page.goto(run_url(base, "user-run", refresh=0))
    wait_loaded(page)
    assert page.locator("[data-section=training] [data-chart=mine] h3").inner_text() == "My own panel"
    got = page.evaluate("() => window.moxcoCharts.mine.plotted('my_metric')")
    assert got == {"steps": list(range(20)), "values": [s * s - 50.0 for s in range(20)]}
    assert page.evaluate("() => window.moxcoCharts.mine.scale()") == {"log": True, "distr": 4}
    # and the empty panels of a run with only a user series say what they need
    assert page.evaluate("() => window.moxcoCharts.convexity_ratio.empty()").startswith("no points: needs a reference")
