"""The runs list and the compare page in headless Chromium: hyper-parameter columns, tags and
notes, search by name, tag, status and config value, selecting runs to compare, three runs
overlaid on every catalogue panel (one colour each, a legend), runs added and removed in place,
smoothing and log scale on the overlay, and deleting a run (confirmed, with an admin token)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from moxco.collector.store import Store
from tests.collector.pagekit import (browser, compare_url, page, screenshot, synthetic_run,  # noqa: F401 (fixtures)
                                     wait_loaded)
from tests.servers import CollectorProcess, serving

REPO = Path(__file__).resolve().parents[2]
RUNS = {"sgd-lr0.1": 0.1, "moxco-lr0.05": 0.05, "moxco-lr0.02": 0.02}
ROWS = "() => [...document.querySelectorAll('#runs tbody tr')].map(tr => tr.dataset.run).join('|')"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('compare') / 'runs.db'}"
    store = Store(url)
    for k, (name, lr) in enumerate(RUNS.items()):
        synthetic_run(store, name, lr=lr, steps=200 + 100 * k, seed=k, tags=["sweep"] + (["baseline"] if k == 0 else []),
                      note="plain SGD baseline" if k == 0 else None, start=1.7e9 + 3600 * k,
                      status="running" if k == 2 else "finished")
    store.put_run("sgd-lr0.1", config={"optimizer": "SGD"})
    yield from serving(url, store)


def test_the_runs_list_shows_hyperparameters_tags_and_notes_and_searches_them(served, page):
    collector, _ = served
    page.goto(collector.url + "/?refresh=1")
    page.wait_for_function(f"() => ({ROWS})() === 'moxco-lr0.02|moxco-lr0.05|sgd-lr0.1'")
    row = page.locator("#runs tbody tr[data-run='sgd-lr0.1']")
    assert row.locator("td[data-hp=optimizer]").inner_text() == "MoXCo"  # the registered optimizer's class
    assert float(row.locator("td[data-hp=lr]").inner_text()) == 0.1
    assert float(row.locator("td[data-hp=alpha]").inner_text()) == 0.9
    assert float(row.locator("td[data-hp=C]").inner_text()) == 0.8
    assert row.locator(".tag").all_inner_texts() == ["sweep", "baseline"]
    assert row.locator(".note-text").inner_text() == "plain SGD baseline"
    searches = {
        "tag:baseline": "sgd-lr0.1",
        "tag:sweep status:running": "moxco-lr0.02",
        "optimizer=SGD": "sgd-lr0.1",  # a value in the config
        "hyperparameters.lr=0.05": "moxco-lr0.05",
        "moxco tag:sweep": "moxco-lr0.02|moxco-lr0.05",  # a name and a tag
        "*-lr0.0?": "moxco-lr0.02|moxco-lr0.05",  # a glob
    }
    for query, expected in searches.items():
        page.fill("#f-search", query)
        page.wait_for_function(f"([want]) => ({ROWS})() === want", arg=[expected])
        assert "q=" in page.url
    page.fill("#f-search", "hyperparameters.lr=0.05 tag:nope")
    page.locator("#empty").wait_for()
    page.fill("#f-search", "")
    page.select_option("#f-status", "finished")
    page.wait_for_function(f"() => ({ROWS})() === 'moxco-lr0.05|sgd-lr0.1'")


def test_selected_runs_open_the_compare_page_with_every_panel_overlaid(served, page, tmp_path, record_property):
    collector, store = served
    page.goto(collector.url + "/?refresh=0")
    page.wait_for_function("() => window.moxcoRuns && window.moxcoRuns.loaded")
    for name in RUNS:
        page.check(f"#runs tbody tr[data-run='{name}'] td.check input")
    assert page.locator("#compare").inner_text() == "Compare 3 runs"
    page.click("#compare")
    page.wait_for_url("**/compare?*")
    wait_loaded(page)
    page.wait_for_function("() => window.moxcoCharts.loss.lines().length === 3")
    assert page.evaluate("() => window.moxcoPage.runs") == list(RUNS)
    lines = page.evaluate("() => window.moxcoCharts.loss.lines()")
    assert [line["run"] for line in lines] == list(RUNS)
    assert len({line["color"] for line in lines}) == 3  # one colour per run
    for name in RUNS:
        steps, values = store.series(name, "loss")
        got = page.evaluate("([r]) => window.moxcoCharts.loss.plotted('loss', r)", [name])
        assert got["steps"] == steps.tolist() and got["values"] == pytest.approx(values.tolist(), rel=1e-12)
        assert name in page.evaluate("([r]) => window.moxcoCharts.loss.legend('loss', r)", [name])
    # a panel with several series: each run's lines, labelled run · series, the run's colour
    update = page.evaluate("() => window.moxcoCharts.update.lines()")
    assert len(update) == 6 and update[1]["label"] == "sgd-lr0.1 · distance ‖x − x₀‖"
    assert update[0]["color"] == update[1]["color"] == lines[0]["color"]
    # every catalogue panel is there, the same as on the run page
    charts = page.evaluate("() => Object.keys(window.moxcoCharts)")
    assert {"loss", "goodness", "sharpness", "phase", "update_corr", "convexity_ratio"} <= set(charts)
    # the threshold C of the runs' policies (the same for all three: one line)
    assert page.evaluate("() => window.moxcoCharts.goodness.threshold()") == [0.8]
    # relative time: the three runs (started an hour apart) start together
    page.select_option("#x-mode", "relative")
    page.wait_for_function("() => window.moxcoCharts.loss.plotted('loss', 'moxco-lr0.02').steps[0] === 0")
    firsts = [page.evaluate("([r]) => window.moxcoCharts.loss.plotted('loss', r).steps[0]", [n]) for n in RUNS]
    assert firsts == [0, 0, 0]
    page.select_option("#x-mode", "step")
    # smoothing and a log scale on the overlay
    page.locator("#smoothing").fill("0.8")
    page.wait_for_function("() => window.moxcoCharts.loss.rawLinesDrawn() === 3")
    page.click("[data-chart=loss] button.scale")
    page.wait_for_function("() => window.moxcoCharts.loss.scale().distr === 4")
    page.set_viewport_size({"width": 1400, "height": page.evaluate("() => document.documentElement.scrollHeight")})
    screenshot(page, tmp_path, "compare", record_property)


def test_runs_are_added_and_removed_on_the_compare_page_and_new_points_arrive_live(served, page):
    collector, store = served
    names = list(RUNS)
    page.goto(compare_url(collector.url, names[:2], refresh=1))
    wait_loaded(page)
    page.wait_for_function("() => window.moxcoCharts.loss.lines().length === 2")
    page.fill("#add-run-name", names[2])
    page.click("#add-run")
    page.wait_for_function("([r]) => window.moxcoCharts.loss.lines().map(l => l.run).includes(r) && "
                           "window.moxcoCharts.loss.plotted('loss', r).steps.length > 0", arg=[names[2]])
    assert page.url.count("run=") == 3
    page.click(f".run-chip[data-run='{names[0]}'] button")
    page.wait_for_function("() => window.moxcoCharts.loss.lines().length === 2")
    assert [line["run"] for line in page.evaluate("() => window.moxcoCharts.loss.lines()")] == names[1:]
    assert names[0] not in page.url and page.evaluate("() => window.moxcoPage.runs") == names[1:]
    # the running run's new points are appended while the page is open
    last = store.run(names[2]).last_step
    store.ingest(names[2], [(last + 1, "loss", 0.01, time.time())])
    page.wait_for_function("([r, s]) => window.moxcoCharts.loss.plotted('loss', r).steps.includes(s)",
                           arg=[names[2], last + 1])
    # a run that does not exist is reported, not drawn
    page.fill("#add-run-name", "no-such-run")
    page.click("#add-run")
    page.locator("#error").wait_for(state="visible")
    assert "no run named “no-such-run”" in page.locator("#error").inner_text()


def test_a_run_is_deleted_from_the_list_after_confirmation(served, page):
    collector, store = served
    synthetic_run(store, "scratch", steps=30)
    points = int(sum(store.block_summaries("scratch", m)["count"].sum() for m in store.metrics("scratch")))
    decisions = len(store.decisions("scratch"))
    page.goto(collector.url + "/?refresh=0")
    page.wait_for_function("() => window.moxcoRuns && window.moxcoRuns.loaded")
    page.click("#runs tbody tr[data-run='scratch'] td.actions button")
    confirm = page.locator("#delete-confirm")
    assert confirm.is_disabled()
    page.fill("#delete-confirm-name", "scratc")
    assert confirm.is_disabled()  # the name typed again, exactly
    page.fill("#delete-confirm-name", "scratch")
    confirm.click()
    page.wait_for_function("() => window.moxcoRuns.deleted && window.moxcoRuns.runs.every(r => r.name !== 'scratch')")
    assert points == 30 * 10 + 3 * 6
    assert page.evaluate("() => window.moxcoRuns.deleted") == {"run": "scratch", "deleted": {"points": points,
                                                                                             "decisions": decisions}}
    assert "scratch" not in [r.name for r in store.list_runs(limit=None)[1]]


def test_with_auth_deleting_asks_for_an_admin_token_and_a_read_token_cannot(tmp_path, page):
    url = f"sqlite:///{tmp_path / 'auth.db'}"
    with Store(url) as store:
        synthetic_run(store, "doomed", steps=20)

    def token(*scopes: str) -> str:
        args = [sys.executable, "-m", "moxco.cli", "token", "create", "--store", url, "--name", "-".join(scopes)]
        for scope in scopes:
            args += ["--scope", scope]
        return subprocess.run(args, capture_output=True, text=True, cwd=REPO, check=True).stdout.strip()

    reader, admin = token("read"), token("admin")
    collector = CollectorProcess(url).start()
    try:
        page.goto(collector.url + "/?refresh=0")
        page.locator("#token-dialog").wait_for(state="visible")
        page.fill("#token-input", reader)
        page.click("#token-submit")
        page.locator("#runs tbody tr[data-run='doomed']").wait_for()
        page.click("#runs tbody tr[data-run='doomed'] td.actions button")
        page.fill("#delete-confirm-name", "doomed")
        page.click("#delete-confirm")
        page.wait_for_function("() => (document.querySelector('#token-message') || {}).textContent?.includes('admin scope')")
        page.click("#token-cancel")  # no admin token at hand: nothing is deleted
        page.wait_for_function("() => document.querySelector('#delete-status').textContent.startsWith('Not deleted')")
        assert Store(url).run("doomed").name == "doomed"
        page.click("#delete-confirm")
        page.locator("#token-dialog").wait_for(state="visible")
        page.fill("#token-input", admin)
        page.click("#token-submit")
        page.wait_for_function("() => window.moxcoRuns.deleted !== undefined")
        assert page.evaluate("() => window.moxcoRuns.deleted.run") == "doomed"
        assert [r.name for r in Store(url).list_runs()[1]] == []
        # the read token is still the tab's for reading
        assert page.evaluate("() => sessionStorage.getItem('moxco.token')") == reader
    finally:
        collector.stop()


def test_the_screenshot_script_renders_the_run_and_compare_pages(tmp_path):
    done = subprocess.run([sys.executable, "scripts/screenshots.py", "--out", str(tmp_path), "--steps", "40"],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("pages-runs.png", "pages-run.png", "pages-compare.png"):
        image = tmp_path / name
        assert image.stat().st_size > 20_000, name
        assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
