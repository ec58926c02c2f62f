"""The audit's figures: Matplotlib (Agg, no pyplot) rendered as inline SVG, readable by construction.

* Data (lines, markers, bands) is rasterised inside the SVG, so a million-point series costs one
  image, while axes, ticks and text stay vector: sharp at any zoom, and checkable in a browser.
* ``finish`` makes every axis readable before the figure is written: an axis with fewer than two
  tick labels in view gets five ticks evenly spaced in its own (log, symlog or linear) scale, and
  labels that would overlap their neighbours are hidden, zero first kept (symmetric log scales put
  ±ε labels right next to it).
* ``svg`` returns the ``<svg>`` element with every id prefixed by the figure's key, so several
  figures live in one page.

``DRAW`` maps each ``Plot.kind`` of the analysis to its drawing function.
"""

from __future__ import annotations

import io
import re
from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np

COLORS = {"update_corr": "#1f77b4", "update_corr_rs": "#ff7f0e", "loss_diff": "#2ca02c"}
RUN_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
#: pixels (at the figure's dpi) kept free between two tick labels
LABEL_GAP = 4.0


def figure(nrows: int = 1, height: float = 3.2, width: float = 7.2):
    """A figure with ``nrows`` axes stacked, each labelled on both axes, and an Agg canvas."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ModuleNotFoundError as exc:  # pragma: no cover - depends on the install
        raise ModuleNotFoundError("moxco audit draws its plots with matplotlib: pip install 'moxco[audit]'",
                                  name=exc.name) from None
    fig = Figure(figsize=(width, height * nrows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, 1, sharex=True, squeeze=False)[:, 0]
    for ax in axes:
        ax.set_gid("panel")  # the SVG group of a data panel (colorbars and twin axes keep Matplotlib's ids)
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelbottom=True)  # shared x: every panel keeps its step labels
    return fig, axes


def symlog(ax, values: Sequence[np.ndarray]) -> None:
    """Symmetric log scale with the linear range at the 10th percentile of the non-zero magnitudes."""
    finite = np.concatenate([np.abs(v[np.isfinite(v)]) for v in values if len(v)] or [np.zeros(0)])
    finite = finite[finite > 0]
    if finite.size:
        ax.set_yscale("symlog", linthresh=float(np.quantile(finite, 0.1)))


def positive(steps: np.ndarray, values: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    steps, values = np.asarray(steps), np.asarray(values, dtype=np.float64)
    keep = np.isfinite(values) & (values > 0)
    return steps[keep], values[keep]


# --- readable axes ---------------------------------------------------------------------------------


def _labels(axis, renderer) -> List[Tuple[float, bool, Any, Any]]:
    """``(position in data units, is minor, tick, label extent)`` of the visible labels (major and
    minor: log axes label minor ticks over a short range) within the view."""
    lo, hi = sorted(axis.get_view_interval())
    out = []
    majors = axis.get_major_ticks()
    for tick in majors + axis.get_minor_ticks():
        label = tick.label1 if tick.label1.get_visible() else tick.label2
        if not (tick.get_visible() and label.get_visible() and label.get_text()):
            continue
        position = tick.get_loc()
        if position is None or not lo - 1e-12 * max(1.0, abs(lo)) <= position <= hi + 1e-12 * max(1.0, abs(hi)):
            continue
        out.append((position, tick not in majors, tick, label.get_window_extent(renderer)))
    return out


def _even_ticks(axis, is_x: bool) -> None:
    """Five ticks evenly spaced on screen (so in the axis's own scale), rounded to the fewest
    significant digits that keep them distinct."""
    from matplotlib.ticker import FixedLocator, FuncFormatter

    ax = axis.axes
    transform = ax.transData
    lo, hi = axis.get_view_interval()
    a, b = (transform.transform((lo, 0))[0], transform.transform((hi, 0))[0]) if is_x else \
        (transform.transform((0, lo))[1], transform.transform((0, hi))[1])
    screen = np.linspace(a, b, 7)[1:-1]
    inverse = transform.inverted()
    values = [inverse.transform((s, 0))[0] if is_x else inverse.transform((0, s))[1] for s in screen]
    for digits in range(2, 8):
        rounded = [float(f"{v:.{digits}g}") for v in values]
        if len(set(rounded)) == len(rounded):
            break
    axis.set_major_locator(FixedLocator(rounded))
    axis.set_major_formatter(FuncFormatter(lambda v, _pos, d=digits: f"{v:.{d}g}"))


def _hiding(base, hidden: List[float]):
    """``base`` (a Matplotlib formatter) with the labels at ``hidden`` positions left empty; a
    formatter, not a label's visibility, so every later draw keeps them hidden."""
    from matplotlib.ticker import Formatter

    class Hiding(Formatter):
        def __init__(self) -> None:
            self.base, self.hidden = base, list(hidden)

        def set_axis(self, axis) -> None:
            super().set_axis(axis)
            self.base.set_axis(axis)

        def set_locs(self, locs) -> None:
            self.base.set_locs(locs)

        def get_offset(self) -> str:
            return self.base.get_offset()

        def __call__(self, x, pos=None) -> str:
            if any(abs(x - h) <= 1e-9 * max(1.0, abs(h)) for h in self.hidden):
                return ""
            return self.base(x, pos)

    return Hiding()


def _declutter(axis, labels: List[Tuple[float, bool, Any, Any]]) -> int:
    """Hide labels that overlap an already kept one (0 first, then major ticks, then minor ones, each
    in axis order); returns how many were hidden."""
    order = sorted(range(len(labels)), key=lambda i: (labels[i][0] != 0, labels[i][1], i))
    kept: List[Any] = []
    hidden: Dict[bool, List[float]] = {False: [], True: []}
    for i in order:
        position, minor, _, box = labels[i]
        grown = box.padded(LABEL_GAP)
        if any(grown.overlaps(other) for other in kept):
            hidden[minor].append(position)
        else:
            kept.append(box)
    if hidden[False]:
        axis.set_major_formatter(_hiding(axis.get_major_formatter(), hidden[False]))
    if hidden[True]:
        axis.set_minor_formatter(_hiding(axis.get_minor_formatter(), hidden[True]))
    return len(hidden[False]) + len(hidden[True])


def finish(fig) -> None:
    """Make every axis of ``fig`` readable: at least two tick labels in view, none overlapping."""
    for _ in range(3):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        changed = False
        for ax in fig.axes:
            for axis, is_x in ((ax.xaxis, True), (ax.yaxis, False)):
                if not axis.get_visible() or not any(t.label1.get_visible() or t.label2.get_visible()
                                                     for t in axis.get_major_ticks() + axis.get_minor_ticks()):
                    continue
                if len(_labels(axis, renderer)) < 2:
                    _even_ticks(axis, is_x)
                    changed = True
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        for ax in fig.axes:
            for axis in (ax.xaxis, ax.yaxis):
                changed |= _declutter(axis, _labels(axis, renderer)) > 0
        if not changed:
            return


def svg(fig, key: str) -> str:
    """``fig`` as an inline ``<svg>`` element: data rasterised, text as glyph paths (the same fonts
    everywhere), ids prefixed with ``key``."""
    for ax in fig.axes:
        for artist in list(ax.lines) + list(ax.collections) + list(ax.patches) + list(ax.images):
            artist.set_rasterized(True)
    finish(fig)
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", dpi=150, metadata={"Date": None})
    text = buffer.getvalue()
    text = text[text.index("<svg"):]
    prefix = re.sub(r"[^A-Za-z0-9_-]", "_", key) + "-"
    text = re.sub(r'\bid="', f'id="{prefix}', text)
    text = re.sub(r"url\(#", f"url(#{prefix}", text)
    return re.sub(r'xlink:href="#', f'xlink:href="#{prefix}', text)


# --- single-run plots (kinds named by analysis.Plot.kind) -----------------------------------------


def draw_loss(d: Dict[str, Any]):
    fig, (ax,) = figure()
    ax.plot(d["steps"], d["loss"], lw=1.2, color="#333")
    ax.set_xlabel("step"), ax.set_ylabel("loss")
    return fig


def draw_gaps(d: Dict[str, Any]):
    fig, (ax,) = figure(height=3.6)
    steps, gaps, tol = d["inst_steps"], d["inst"], d["tolerance"]
    over = gaps > tol
    ax.fill_between(steps, -tol, tol, color="#999", alpha=0.3, lw=0, label="float-error tolerance")
    ax.scatter(steps[~over], gaps[~over], s=8, color="#1f77b4", label="inst_gap ≤ tolerance")
    ax.scatter(steps[over], gaps[over], s=10, color="#d62728", label="inst_gap > tolerance")
    ax.plot(d["avg_steps"], d["avg"], color="#2ca02c", lw=1.8, label="avg_gap")
    ax.plot(d["exp_steps"], d["exp"], color="#9467bd", lw=1.8, label="exp_gap")
    ax.axhline(0, color="black", lw=0.8)
    symlog(ax, [gaps, d["avg"], d["exp"]])
    ax.set_xlabel("step"), ax.set_ylabel("convexity gap"), ax.legend(fontsize=8)
    return fig


def draw_ratio(d: Dict[str, Any]):
    fig, (ax,) = figure()
    steps, ratio = d["steps"], d["ratio"]
    ax.plot(steps, ratio, marker="o", ms=3, color="#333")
    finite = ratio[np.isfinite(ratio)]
    lo = min(-0.5, float(finite.min()) if finite.size else 0.0)
    hi = max(1.5, float(finite.max()) if finite.size else 1.0)
    ax.axhspan(1, hi * 1.1, color="#2ca02c", alpha=0.12)
    ax.axhspan(0, 1, color="#ff9f1c", alpha=0.15)
    ax.axhspan(lo * 1.1, 0, color="#d62728", alpha=0.12)
    ax.set_ylim(lo * 1.1, hi * 1.1)
    ax.set_xlabel("step"), ax.set_ylabel("convexity_ratio")
    return fig


def draw_smoothness(d: Dict[str, Any]):
    fig, (ax,) = figure(height=3.6)
    s, v = positive(d["inst_steps"], d["inst"])
    ax.scatter(s, v, s=6, color="#1f77b4", alpha=0.35, label="inst_smooth")
    for key, color in (("max", "#d62728"), ("exp", "#2ca02c")):
        s, v = positive(d[f"{key}_steps"], d[key])
        ax.plot(s, v, color=color, lw=1.6, label=f"{key}_smooth")
    s, v = positive(d["sharp_steps"], d["sharp"])
    ax.plot(s, v, "s-", color="#333", ms=4, lw=1, label="sharpness λ_max")
    ax.set_yscale("log"), ax.set_xlabel("step"), ax.set_ylabel("smoothness, sharpness"), ax.legend(fontsize=8)
    return fig


def draw_pairs(d: Dict[str, Any]):
    fig, (ax,) = figure(height=3.6)
    smooth, sharp = d["smooth"], d["sharpness"]
    points = ax.scatter(sharp, smooth, c=d["steps"], cmap="viridis", s=18)
    fig.colorbar(points, ax=ax, label="step")
    lo = float(min(smooth.min(), sharp.min())) / 2
    hi = float(max(smooth.max(), sharp.max())) * 2
    grid = np.geomspace(lo, hi, 50)
    ax.plot(grid, grid, color="black", lw=1)
    ax.fill_between(grid, grid / 2, grid * 2, color="#999", alpha=0.2, lw=0)
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_xlabel("sharpness λ_max"), ax.set_ylabel("median inst_smooth since the previous probe")
    return fig


def draw_eos(d: Dict[str, Any]):
    """One panel per pair: the sharpness at each probe and its edge of stability (dashed), log scale."""
    panels = d["panels"]
    fig, axes = figure(len(panels), height=2.8)
    for ax, panel in zip(axes, panels):
        s, v = positive(panel["steps"], panel["sharpness"])
        ax.plot(s, v, "s-", color="#333", ms=3, lw=1, label=panel["label"])
        s, v = positive(panel["steps"], panel["edge"])
        ax.plot(s, v, color="#d62728", ls="--", lw=1.4, label=panel["edge_label"])
        if ax.lines:
            ax.set_yscale("log")
        ax.set_ylabel("sharpness"), ax.legend(fontsize=8)
    axes[-1].set_xlabel("step")
    return fig


def running_mean(values: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """``(mean of the first t values, its standard error s_t/√t)`` for every t (NaN error at t = 1)."""
    values = np.asarray(values, dtype=np.float64)
    t = np.arange(1, values.size + 1)
    mean = np.cumsum(values) / t
    second = np.cumsum(values * values) / t
    variance = np.maximum(second - mean * mean, 0.0) * t / np.maximum(t - 1, 1)
    se = np.sqrt(variance / t)
    se[0] = np.nan
    return mean, se


def draw_corr(d: Dict[str, Any]):
    fig, (ax, ax2) = figure(2, height=2.8)
    steps, corr = d["steps"], d["corr"]
    mean, se = running_mean(corr)
    ax.plot(steps, corr, color="#1f77b4", alpha=0.35, lw=0.8, label="update_corr")
    ax.plot(steps, mean, color="#1f77b4", lw=2, label="running mean")
    ax.axhline(0, color="black", lw=0.8)
    symlog(ax, [corr])
    ax.set_ylabel("update_corr"), ax.legend(fontsize=8)
    ax2.fill_between(steps, mean - 2 * se, mean + 2 * se, color="#1f77b4", alpha=0.2, lw=0, label="± 2 SE")
    ax2.plot(steps, mean, color="#1f77b4", lw=1.8, label="running mean of update_corr")
    ax2.axhline(0, color="black", lw=0.8)
    ax2.set_xlabel("step"), ax2.set_ylabel("running mean"), ax2.legend(fontsize=8)
    return fig


def draw_cumsum(d: Dict[str, Any]):
    fig, (ax,) = figure(height=3.6)
    for key in ("update_corr", "update_corr_rs", "loss_diff"):
        ax.plot(d["steps"], d[key], lw=1.6, color=COLORS[key], label=f"Σ {key}",
                ls="--" if key == "update_corr_rs" else "-")
    ax.axhline(0, color="black", lw=0.8)
    symlog(ax, [d["update_corr"], d["update_corr_rs"], d["loss_diff"]])
    ax.set_xlabel("step"), ax.set_ylabel("cumulative sum"), ax.legend(fontsize=8)
    return fig


def draw_moxco(d: Dict[str, Any]):
    fig, (ax, ax2) = figure(2, height=2.8)
    ax.plot(d["steps"], d["goodness"], marker="o", ms=3, color="#333", label="goodness")
    ax.axhline(d["threshold"], color="#d62728", ls="--", lw=1, label=f"C = {d['threshold']:g}")
    for step, source in d["decisions"]:
        ax.axvline(step, color="#2ca02c", lw=1.5, ls="-" if source == "policy" else ":")
    ax.set_ylim(-0.02, 1.02), ax.set_ylabel("goodness"), ax.legend(fontsize=8)
    for name, (steps, values) in d["terms"].items():
        s, v = positive(np.asarray(steps), np.asarray(values))
        if s.size:
            ax2.plot(s, v, lw=1.4, label=name.replace("goodness_", ""))
    if ax2.lines:
        ax2.set_yscale("log")
    ax2.set_ylabel("terms"), ax2.set_xlabel("step")
    if len(d["phase"]):
        twin = ax2.twinx()
        twin.step(d["phase_steps"], d["phase"], where="post", color="#9467bd", lw=1.2, label="phase")
        twin.set_ylim(0.5, 2.5), twin.set_yticks([1, 2]), twin.set_ylabel("phase")
    if ax2.lines:
        ax2.legend(fontsize=8, loc="upper left")
    return fig


DRAW: Dict[str, Callable[[Dict[str, Any]], Any]] = {
    "loss": draw_loss, "gaps": draw_gaps, "ratio": draw_ratio, "smoothness": draw_smoothness, "pairs": draw_pairs,
    "eos": draw_eos,
    "corr": draw_corr, "cumsum": draw_cumsum, "moxco": draw_moxco,
}


def render(plot) -> str:
    """A ``Plot`` of the analysis as inline SVG."""
    fig = DRAW[plot.kind](plot.data)
    fig.suptitle(plot.title, fontsize=10)
    return svg(fig, plot.key)
