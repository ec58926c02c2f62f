"""What the page tests share: headless Chromium (the Debian `chromium` package at /usr/bin/chromium,
driven by Playwright's Python package; no browser download), a fresh context per test, and small
helpers. The tests wait on conditions, never on time."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import pytest

CHROMIUM = "/usr/bin/chromium"
WAIT_MS = 30_000  # how long a condition may take to hold (an upper bound, not a measurement)


@pytest.fixture(scope="module")
def browser():
    from playwright import sync_api  # the dev extra installs it; the browser is Debian's chromium

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install the Debian package `chromium` (scripts/setup.sh dev does)",
                    pytrace=False)
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser):
    """A fresh browser context (own sessionStorage, downloads accepted). The pages'
    Content-Security-Policy forbids eval, which Playwright's wait_for_function needs, so the context
    bypasses CSP: the escaping tests then show the pages are safe without relying on CSP. Uncaught
    page errors fail the test."""
    context = browser.new_context(viewport={"width": 1400, "height": 900}, bypass_csp=True, accept_downloads=True)
    p = context.new_page()
    p.set_default_timeout(WAIT_MS)
    errors: list = []
    p.on("pageerror", lambda exc: errors.append(str(exc)))
    yield p
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def screenshot(page, tmp_path: Path, name: str, record_property) -> Path:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    record_property(f"screenshot-{name}", str(path))
    print(f"screenshot: {path}")
    return path


def run_url(base: str, run: str, refresh: float = 1) -> str:
    return f"{base}/runs/{quote(run, safe='')}?refresh={refresh}"


def compare_url(base: str, runs, refresh: float = 1) -> str:
    return f"{base}/compare?" + "&".join(f"run={quote(r, safe='')}" for r in runs) + f"&refresh={refresh}"


def wait_loaded(page) -> None:
    page.wait_for_function("() => window.moxcoPage && window.moxcoPage.loaded")


def synthetic_run(store, name: str, *, lr: float = 0.05, steps: int = 400, seed: int = 0, metrics=None,
                  config=None, tags=(), note=None, status: str = "finished", start: float = 1.7e9, dt: float = 0.5):
    """A run written straight into ``store``: a noisy decreasing loss, the free metrics, goodness and
    its terms on every 10th step, phase, lr/α/β, and update correlations of both signs (so the symlog
    axes have a negative half). ``metrics`` keeps only those names. Wall times are ``start + dt·step``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    s = np.arange(steps)
    series = {
        "loss": 2.0 * np.exp(-lr * s / 20) + 0.05 * rng.standard_normal(steps) + 0.1,
        "grad_norm_sq": np.exp(-lr * s / 30) * (1 + 0.3 * rng.random(steps)),
        "update_norm": lr * (1 + 0.1 * rng.random(steps)),
        "distance": np.sqrt(s + 1.0) * lr,
        "update_corr": -40 * np.cos(s / 25) + 5 * rng.standard_normal(steps),
        "update_corr_rs": -30 * np.cos(s / 25) + 5 * rng.standard_normal(steps),
        "phase": np.where(s >= steps * 0.6, 2.0, 1.0),
        "lr": np.full(steps, lr),
        "alpha": np.where(s >= steps * 0.6, 0.1, 0.9),
        "beta": np.where(s >= steps * 0.6, 0.1, 0.5),
    }
    probe = s[s % 10 == 0]
    sparse = {
        "goodness": 1 - np.exp(-probe / (steps / 3)),
        "goodness_grad_term": np.exp(-probe / 100) + 1e-3,
        "goodness_sharpness_term": 0.5 * np.exp(-probe / 150) + 1e-3,
        "goodness_loss_term": 0.2 * np.exp(-probe / 80) + 1e-3,
        "sharpness": 20 + 5 * np.sin(probe / 30),
        "sharpness_target": np.full(probe.size, 30.0),
    }
    store.put_run(name, config={"optimizer": "MoXCo", "hyperparameters": {"lr": lr, "alpha": 0.9, "beta": 0.5},
                                "reeval_every": 0, "probe_every": 10, "reference": False, **dict(config or {})},
                  optimizer={"class": "MoXCo", "lr": lr, "alpha": 0.9, "beta": 0.5},
                  policy={"threshold": 0.8, "consecutive": 2}, tags=list(tags), note=note)
    names, steps_, values, walls = [], [], [], []
    for metric, (at, ys) in {**{m: (s, v) for m, v in series.items()}, **{m: (probe, v) for m, v in sparse.items()}}.items():
        if metrics is not None and metric not in metrics:
            continue
        names += [metric] * at.size
        steps_ += at.tolist()
        values += ys.tolist()
        walls += (start + dt * at).tolist()
    store.ingest(name, (names, steps_, values, walls, [-1] * len(names)), batch_id=f"{name}-all")
    store.set_status(name, status)
