"""Audit reports rendered in headless Chromium (the system browser, driven by playwright-core):
what the page shows, and whether every plot is readable.

``render(html, screenshot)`` loads a report, saves a full-page screenshot, and returns the plots
(``figure.plot``), the verdict lines, the configuration rows of a comparison, any external
resource, and for every plot its axes: the on-screen boxes of the tick labels of each axis of each
panel (Matplotlib's SVG groups ``…-panel``; colorbars and twin axes as ``…-axes_N``).
``unreadable(info)`` lists what a reader could not read: a panel without two tick labels on an
axis, or two tick labels of one axis that overlap on screen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

CHROMIUM = "/usr/bin/chromium"

SCRIPT = """() => {
  const box = e => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
  const labels = axis => axis ? Array.from(axis.querySelectorAll('g[id*="tick_"] > g[id*="text_"]'))
      .map(box).filter(r => r[2] - r[0] > 0.5 && r[3] - r[1] > 0.5) : null;
  return {
    plots: Array.from(document.querySelectorAll('figure.plot')).map(f => {
      const svg = f.querySelector('svg');
      const axes = svg ? Array.from(svg.querySelectorAll('g[id]'))
          .filter(g => /-(panel|axes_[0-9]+)$/.test(g.id)).map(ax => {
            const axis = Array.from(ax.children).filter(c => /matplotlib[.]axis_[0-9]+$/.test(c.id || ''));
            return {id: ax.id, panel: ax.id.endsWith('-panel'), x: labels(axis[0]), y: labels(axis[1])};
          }) : [];
      const r = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
      return {plot: f.dataset.plot, width: r.width, height: r.height, axes: axes};
    }),
    verdicts: Object.fromEntries(Array.from(document.querySelectorAll('div.verdict'))
        .map(v => [v.dataset.verdict, v.textContent])),
    config: Array.from(document.querySelectorAll('table.config tr[data-config]')).map(tr => ({
        key: tr.dataset.config, differs: tr.classList.contains('differs'),
        cells: Array.from(tr.querySelectorAll('td')).map(td => td.textContent)})),
    errors: Array.from(document.querySelectorAll('#agent-errors li')).map(li => li.textContent),
    text: document.body.innerText,
    external: Array.from(document.querySelectorAll('[src],[href]'))
        .map(e => e.getAttribute('src') || e.getAttribute('href'))
        .filter(u => !u.startsWith('data:') && !u.startsWith('#')),
  };
}"""


def render(html: Path, screenshot: Path) -> Dict:
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "install Debian's chromium (scripts/setup.sh dev does)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 900})
            page.goto(Path(html).resolve().as_uri())
            page.wait_for_load_state("load")
            info = page.evaluate(SCRIPT)
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return info


def _overlap(a: List[float], b: List[float]) -> bool:
    return min(a[2], b[2]) - max(a[0], b[0]) > 0.5 and min(a[3], b[3]) - max(a[1], b[1]) > 0.5


def unreadable(info: Dict) -> List[str]:
    """What a reader could not read in the rendered plots (empty when every plot is readable)."""
    problems = []
    for plot in info["plots"]:
        name = plot["plot"]
        if plot["width"] < 300 or plot["height"] < 150:
            problems.append(f"{name}: drawn at {plot['width']:.0f}×{plot['height']:.0f} px")
        panels = [a for a in plot["axes"] if a["panel"]]
        if not panels:
            problems.append(f"{name}: no panel")
        for axes in plot["axes"]:
            for which in ("x", "y"):
                boxes = axes[which]
                if axes["panel"] and (boxes is None or len(boxes) < 2):
                    problems.append(f"{name} {axes['id']}: {0 if boxes is None else len(boxes)} {which} tick label(s)")
                for i, a in enumerate(boxes or []):
                    for b in (boxes or [])[i + 1:]:
                        if _overlap(a, b):
                            problems.append(f"{name} {axes['id']}: overlapping {which} tick labels at {a} and {b}")
    return problems
