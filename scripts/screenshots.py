"""Screenshots of the collector's pages for the docs, taken from real runs, so they can be refreshed.

    .venv/bin/python scripts/screenshots.py                 # writes docs/img/pages-{runs,run,compare}.png
    .venv/bin/python scripts/screenshots.py --out /tmp/img --steps 60

Three short embedded runs of a small MLP (moxco.agent.attach with every metric group on: re-evaluation,
a reference point, Hessian probes, goodness and a decision policy; MoXCo at two step sizes and plain
SGD with momentum) are written to a fresh SQLite store, `moxco serve` serves it, and headless
Chromium (/usr/bin/chromium through Playwright) photographs the runs list, one run's page and the
three runs compared with smoothing on. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from urllib.parse import quote

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHROMIUM = "/usr/bin/chromium"
RUNS = (("moxco-lr0.05", "moxco", 0.05), ("moxco-lr0.1", "moxco", 0.1), ("sgdm-lr0.05", "sgd", 0.05))


def train(url: str, name: str, kind: str, lr: float, steps: int, seed: int) -> None:
    """One run: an MLP fitting a noisy function, every metric group on, a policy that decides."""
    import torch
    from torch import nn

    import moxco.agent
    from moxco.optim import MoXCo

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    reference = {k: v.detach().clone() + 0.01 for k, v in model.state_dict().items()}
    if kind == "moxco":
        opt = MoXCo(model.parameters(), torch.optim.SGD, lr=lr, alpha=0.9, beta=0.5, seed=seed)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    criterion = nn.MSELoss()
    agent = moxco.agent.attach(model, opt, url=url, run=name, reeval_every=1, probe_every=5, criterion=criterion,
                               reference=reference, seed=seed, goodness={"tau": 1.0, "form": "eos"},
                               policy={"threshold": 0.3, "consecutive": 2, "min_step": steps // 3})
    x = torch.randn(256, 8)
    y = (x.sum(1, keepdim=True)).sin() + 0.1 * torch.randn(256, 1)
    for step in range(steps):
        batch = torch.randint(0, 256, (32,))
        loss = criterion(model(x[batch]), y[batch])
        loss.backward()
        opt.step()
        opt.zero_grad()
    agent.close(status="finished")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Screenshots of the collector's pages for the docs.")
    parser.add_argument("--out", default=str(REPO / "docs" / "img"), help="folder for the PNGs (default: docs/img)")
    parser.add_argument("--steps", type=int, default=300, help="training steps per run (default: 300)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from playwright import sync_api

    from moxco.collector.store import Store
    from tests.servers import CollectorProcess

    url = f"sqlite:///{Path(tempfile.mkdtemp(prefix='moxco-shots-')) / 'runs.db'}"
    for seed, (name, kind, lr) in enumerate(RUNS):
        train(url, name, kind, lr, args.steps, seed)
    with Store(url) as store:
        store.put_run(RUNS[0][0], tags=["sweep", "baseline"], note="MoXCo at the default step size")
        store.put_run(RUNS[1][0], tags=["sweep"])
        store.put_run(RUNS[2][0], tags=["sweep", "no-moxco"], note="SGD with momentum 0.9, for comparison")
    collector = CollectorProcess(url, "--no-auth").start()
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM)
            context = browser.new_context(viewport={"width": 1400, "height": 900}, bypass_csp=True)
            page = context.new_page()
            page.set_default_timeout(60_000)

            page.set_viewport_size({"width": 1400, "height": 360})
            page.goto(f"{collector.url}/?refresh=0")
            page.wait_for_function("() => window.moxcoRuns && window.moxcoRuns.loaded")
            for name, _, _ in RUNS:
                page.check(f"#runs tbody tr[data-run='{name}'] td.check input")
            page.screenshot(path=str(out / "pages-runs.png"), full_page=True)

            page.goto(f"{collector.url}/runs/{quote(RUNS[0][0], safe='')}?refresh=0")
            page.wait_for_function("() => window.moxcoPage && window.moxcoPage.loaded")
            page.set_viewport_size({"width": 1400, "height": page.evaluate("() => document.documentElement.scrollHeight")})
            page.screenshot(path=str(out / "pages-run.png"), full_page=True)

            page.set_viewport_size({"width": 1400, "height": 900})
            runs = "&".join(f"run={quote(name, safe='')}" for name, _, _ in RUNS)
            page.goto(f"{collector.url}/compare?{runs}&refresh=0")
            page.wait_for_function("() => window.moxcoPage && window.moxcoPage.loaded && "
                                   "window.moxcoCharts.loss.lines().length === 3")
            page.locator("#smoothing").fill("0.6")
            page.wait_for_function("() => window.moxcoCharts.loss.rawLinesDrawn() === 3")
            page.set_viewport_size({"width": 1400, "height": page.evaluate("() => document.documentElement.scrollHeight")})
            page.screenshot(path=str(out / "pages-compare.png"), full_page=True)
            browser.close()
    finally:
        collector.stop()
    for name in ("pages-runs.png", "pages-run.png", "pages-compare.png"):
        print(out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
