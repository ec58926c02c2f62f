/* moxco pages: the charts the run page and the compare page share (uPlot, vendored).
 *
 * The panels are the metric catalogue's (GET /api/v1/catalogue: sections → panels → series with
 * labels, colours, dashes, log, stepped, range, threshold, refs, requires), so a metric added to the
 * catalogue is drawn here with no change to this file. After them, "Your metrics": one chart per
 * stored series the catalogue does not know (the run's own, from agent.log), drawn the same way.
 *
 * A chart draws "lines": one per (run, series of the panel). Each run is a source holding the points
 * the page has read for each metric ({steps, values, walls, total, downsampled}). What every chart
 * of a page shares is a View: the x axis (step, wall time, or time since the run's first point), the
 * EMA smoothing weight, the zoom (an x range, in the axis' units) and the x extent of all the data.
 *
 * - Non-finite values (the API's "NaN", "Infinity", "-Infinity") are gaps in the line, with a small
 *   triangle at the top (NaN, +Inf) or bottom (−Inf) of the plot; the legend shows them as text.
 * - Smoothing (TensorBoard's debiased EMA, weight w in [0, 0.99]) replaces each line by its EMA over
 *   the points the page holds; the raw line stays, faint, underneath. Stepped panels (phase,
 *   optimizer state) are never smoothed.
 * - Every panel has its own y scale switch: linear, or symmetric log (asinh, so zero and negative
 *   values have a place; ticks at ±1, 2, 5 × 10^k on both sides of zero).
 * - Drag across a chart to zoom every chart to that x range; double-click or "reset zoom" to undo.
 *   Only the chart dragged on decides the range (uPlot mirrors a selection onto the charts it syncs
 *   the cursor with, in pixels, whatever their scales: an empty chart's pixels are NaN steps).
 *
 * Test hooks: window.moxcoCharts[panel id] (what each chart holds and draws).
 */
"use strict";

const moxcoPlot = (() => {
  const { h, api, num, fmt, fmtInt, dateTime, phaseText } = moxco;

  const HEIGHT = 220;
  const PALETTE = ["#2563eb", "#ea580c", "#16a34a", "#9333ea", "#db2777", "#0891b2", "#ca8a04", "#4b5563"];
  const DASHES = [undefined, [6, 4], [2, 3], [10, 3, 2, 3]];
  const GREY = "#64748b", GREEN = "#16a34a";
  const RAW_ALPHA = 0.25;
  // x ticks fall on whole steps: 1, 2, 5, 10, 20, 25, 50, 100, …
  const STEP_INCRS = [];
  for (let e = 1; e <= 1e15; e *= 10) STEP_INCRS.push(e, 2 * e, ...(e >= 10 ? [2.5 * e] : []), 5 * e);
  const X_MODES = { step: "step", wall: "wall time", relative: "time since start" };

  let catalogueCache = null;
  /** The metric catalogue (one request per page). */
  function catalogue() {
    if (!catalogueCache) catalogueCache = api("catalogue").catch((e) => { catalogueCache = null; throw e; });
    return catalogueCache;
  }

  /** The catalogue, or null after saying on the page (its #error banner) why it could not be loaded. */
  async function loadCatalogue() {
    try {
      return await catalogue();
    } catch (e) {
      moxco.showError(document.getElementById("error"), `Could not load the metric catalogue: ${e.message}. Reload to retry.`);
      return null;
    }
  }

  // --- numbers ---------------------------------------------------------------------------------

  /** TensorBoard's smoothing: the debiased exponential moving average with weight w; non-finite
   *  values are skipped (their place stays a gap). */
  function ema(values, w) {
    const out = new Array(values.length);
    let last = 0, n = 0;
    for (let i = 0; i < values.length; i++) {
      const v = values[i];
      if (v === undefined) { out[i] = undefined; continue; }
      if (!Number.isFinite(v)) { out[i] = null; continue; }
      last = last * w + (1 - w) * v;
      n += 1;
      out[i] = last / (1 - Math.pow(w, n));
    }
    return out;
  }

  /** The symlog axis' linear threshold: the order of magnitude of the smallest non-zero |value|. */
  function linthresh(columns) {
    let min = Infinity;
    for (const ys of columns) for (const v of ys) if (v !== null && v !== undefined && v !== 0) min = Math.min(min, Math.abs(v));
    return Number.isFinite(min) ? Math.pow(10, Math.floor(Math.log10(min))) : 1;
  }

  /** Ticks of a symlog axis over [min, max]: 0 when in range, and ±{1, 2, 5}·10^k on each side
   *  (thinned to decades, then to every other decade, when there are too many). */
  function symlogSplits(min, max, lin) {
    if (!(Number.isFinite(min) && Number.isFinite(max)) || max <= min) return [];
    const side = (lo, hi) => { // magnitudes in [lo, hi], lo > 0
      const all = [], decades = [];
      for (let k = Math.floor(Math.log10(Math.max(lo, lin / 10))); k <= Math.ceil(Math.log10(hi)); k++) {
        for (const m of [1, 2, 5]) {
          const v = m * Math.pow(10, k);
          if (v >= lo && v <= hi) { all.push(v); if (m === 1) decades.push(v); }
        }
      }
      if (all.length <= 6) return all;
      if (decades.length <= 6) return decades;
      return decades.filter((_, i) => i % 2 === 0);
    };
    const out = [];
    if (min < 0) out.push(...side(Math.max(-max, 0) || lin / 10, -min).map((v) => -v).filter((v) => v >= min && v <= max));
    if (min <= 0 && max >= 0) out.push(0);
    if (max > 0) out.push(...side(Math.max(min, 0) || lin / 10, max).filter((v) => v >= min && v <= max));
    const ticks = [...new Set(out)].sort((a, b) => a - b);
    if (ticks.length < 2) return [min, max];
    return ticks;
  }

  /** Of `ticks`, those at least `gap` CSS pixels apart on u's y axis: zero first, then the largest
   *  magnitudes (near zero a symlog axis packs decades together). */
  function spaced(u, ticks, gap) {
    const pos = (v) => u.valToPos(v, "y");
    const order = [...ticks].sort((a, b) => (a === 0 ? -1 : b === 0 ? 1 : Math.abs(b) - Math.abs(a)));
    const kept = [];
    for (const v of order) {
      const p = pos(v);
      if (!Number.isFinite(p)) return ticks; // not laid out yet
      if (kept.every((k) => Math.abs(pos(k) - p) >= gap)) kept.push(v);
    }
    return kept.sort((a, b) => a - b);
  }

  function fmtAxis(v) {
    return Number.isInteger(v) && Math.abs(v) < 1e6 ? fmtInt(v) : fmt(v, 3);
  }

  /** Seconds as "45 s", "12 min", "3.5 h", "2 d". */
  function fmtDuration(s) {
    if (!Number.isFinite(s)) return "";
    const a = Math.abs(s), sign = s < 0 ? "−" : "";
    if (a < 120) return `${sign}${fmt(a, 3)} s`;
    if (a < 7200) return `${sign}${fmt(a / 60, 3)} min`;
    if (a < 172800) return `${sign}${fmt(a / 3600, 3)} h`;
    return `${sign}${fmt(a / 86400, 3)} d`;
  }

  // --- sources and the view ------------------------------------------------------------------------

  /** A run's points as the page holds them: data[metric] = {steps, values, walls, total, downsampled}. */
  class Source {
    constructor(name, color) {
      this.name = name;
      this.color = color;
      this.data = {};
      this.detail = null;
      this.decisions = [];
    }

    /** The earliest wall time of any point held (relative time counts from it). */
    get t0() {
      let t = Infinity;
      for (const d of Object.values(this.data)) if (d.walls.length) t = Math.min(t, d.walls[0]);
      return t;
    }

    /** The wall time at `step` (a decision's): of the longest series' point at or before it. */
    wallAt(step) {
      let best = null;
      for (const d of Object.values(this.data)) if (!best || d.steps.length > best.steps.length) best = d;
      if (!best || !best.steps.length) return NaN;
      let lo = 0, hi = best.steps.length - 1;
      if (step <= best.steps[0]) return best.walls[0];
      while (lo < hi) { const mid = (lo + hi + 1) >> 1; if (best.steps[mid] <= step) lo = mid; else hi = mid - 1; }
      return best.walls[lo];
    }

    /** Read `metric`'s points: all of them (`full`), or those after the last one held (appended). */
    async fetch(metric, full, maxPoints) {
      const held = this.data[metric];
      const params = { max_points: maxPoints, method: "minmax" };
      if (!full && held && held.steps.length) params.start_step = held.steps[held.steps.length - 1] + 1;
      const r = await api(`runs/${encodeURIComponent(this.name)}/series/${encodeURIComponent(metric)}`, params);
      const values = r.values.map(num);
      if (full || !held) {
        this.data[metric] = { steps: r.steps, values, walls: r.wall_times, total: r.total, downsampled: r.downsampled };
        return true;
      }
      if (!r.steps.length) return false;
      held.steps = held.steps.concat(r.steps);
      held.values = held.values.concat(values);
      held.walls = held.walls.concat(r.wall_times);
      held.total += r.total;
      held.downsampled = held.downsampled || r.downsampled;
      return true;
    }
  }

  /** What a page's charts share: x axis, smoothing, zoom, extent. */
  class View {
    constructor() {
      this.xMode = "step";
      this.smoothing = 0;
      this.zoom = null;
      this.extent = null;
      this.charts = [];
      this.onZoom = () => {};
      this.dragging = null; // the chart a drag started on
    }

    /** x of a point of `source` at `step` with wall time `wall`, in the view's axis (`t0`: the
     *  source's, when the caller has it at hand). */
    x(source, step, wall, t0) {
      if (this.xMode === "step") return step;
      if (this.xMode === "wall") return wall;
      return wall - (t0 === undefined ? source.t0 : t0);
    }

    setZoom(zoom) {
      if (zoom && !(Number.isFinite(zoom.min) && Number.isFinite(zoom.max) && zoom.max > zoom.min)) return;
      this.zoom = zoom;
      for (const chart of this.charts) chart.fitX(true);
      this.onZoom(zoom);
    }

    setXMode(mode) {
      if (!(mode in X_MODES) || mode === this.xMode) return;
      this.xMode = mode;
      this.zoom = null;
      this.onZoom(null);
      this.refresh(true);
    }

    setSmoothing(w) {
      const value = Math.min(0.99, Math.max(0, Number(w) || 0));
      if (value === this.smoothing) return;
      this.smoothing = value;
      this.refresh(false);
    }

    /** Realign every chart (and recompute the extent); `rebuild`: new uPlot instances (axis type). */
    refresh(rebuild) {
      for (const chart of this.charts) chart.align();
      this.extent = this.computeExtent();
      for (const chart of this.charts) (rebuild ? chart.rebuild() : chart.draw());
    }

    computeExtent() {
      let min = Infinity, max = -Infinity;
      for (const chart of this.charts) {
        const xs = chart.aligned.xs;
        if (!xs.length) continue;
        min = Math.min(min, xs[0]);
        max = Math.max(max, xs[xs.length - 1]);
      }
      return max > min ? { min, max } : null;
    }
  }

  // --- a chart ---------------------------------------------------------------------------------

  /**
   * One catalogue panel. `options`:
   *   lines(panel) → [{source, metric, label, color, dash}]
   *   refs(panel) → [{value, label, color}] (reference lines: the catalogue's, the threshold C)
   *   markers() → [{source, step, color, tip: [Node]}] (decisions)
   *   emptyText(panel) → why the panel has no points
   */
  class Chart {
    constructor(panel, container, view, options) {
      this.panel = panel;
      this.view = view;
      this.options = options;
      this.log = !!panel.log;
      this.lines = [];
      this.aligned = { xs: [], steps: [], raw: [], finite: [], plotted: [], smoothed: false };
      this.nonFiniteDrawn = 0;
      this.rawDrawn = 0;
      this.markers = [];
      this.markerEls = [];
      this.note = h("span", { class: "note" });
      this.scaleButton = panel.phase ? null : h("button", { type: "button", class: "link scale",
        title: "y axis: linear or symmetric log (asinh); click to switch", onclick: () => this.setLog(!this.log) });
      this.body = h("div", { class: "plot" });
      this.empty = h("div", { class: "nodata", text: "no points yet" });
      this.tip = h("div", { class: "decision-tip", role: "tooltip", hidden: true });
      this.el = h("section", { class: `panel${panel.wide ? " wide" : ""}`, dataset: { chart: panel.id } },
        h("header", {}, h("h3", { text: panel.title, title: panel.help }), this.note, this.scaleButton),
        h("div", { class: "plot-wrap" }, this.body, this.empty, this.tip));
      container.append(this.el);
      this.updateScaleButton();
      this.plot = null;
      this.align();
      this.create();
      this.resize = new ResizeObserver(() => {
        const width = Math.floor(this.body.clientWidth);
        if (width > 0 && this.plot && width !== this.plot.width) this.plot.setSize({ width, height: HEIGHT });
      });
      this.resize.observe(this.body);
      view.charts.push(this);
      window.moxcoCharts[panel.id] = this.hook();
    }

    /** Take the chart off the page (a series that is gone). */
    remove() {
      this.resize.disconnect();
      this.plot.destroy();
      this.el.remove();
      this.view.charts.splice(this.view.charts.indexOf(this), 1);
      delete window.moxcoCharts[this.panel.id];
    }

    get smoothed() { return this.view.smoothing > 0 && !this.panel.stepped; }

    // --- data ----------------------------------------------------------------------------------

    /** Join the chart's lines on the union of their x values (uPlot wants one x array). A line
     *  with no point at an x is `undefined` there (spanned); a non-finite value is `null` (a gap). */
    align() {
      this.lines = this.options.lines(this.panel);
      const view = this.view;
      const columns = this.lines.map((line) => {
        const d = line.source.data[line.metric] || { steps: [], values: [], walls: [] };
        const t0 = view.xMode === "relative" ? line.source.t0 : 0;
        const xs = view.xMode === "step" ? d.steps : d.steps.map((s, i) => view.x(line.source, s, d.walls[i], t0));
        return { xs, steps: d.steps, values: d.values };
      });
      let xs;
      if (columns.length === 1) xs = columns[0].xs.slice();
      else {
        const all = new Set();
        for (const c of columns) for (const x of c.xs) all.add(x);
        xs = Array.from(all).sort((a, b) => a - b);
      }
      const index = new Map(xs.map((x, j) => [x, j]));
      const raw = [], steps = [], finite = [], plotted = [];
      for (const c of columns) {
        const r = new Array(xs.length), s = new Array(xs.length);
        for (let k = 0; k < c.xs.length; k++) {
          const j = index.get(c.xs[k]);
          r[j] = c.values[k];
          s[j] = c.steps[k];
        }
        const f = r.map((v) => (v === undefined ? undefined : Number.isFinite(v) ? v : null));
        raw.push(r);
        steps.push(s);
        finite.push(f);
        plotted.push(this.smoothed ? ema(r, this.view.smoothing) : f);
      }
      this.aligned = { xs, raw, steps, finite, plotted, smoothed: this.smoothed };
    }

    /** Realign and redraw (new points, smoothing). */
    update() {
      this.align();
      this.draw();
    }

    draw() {
      if (this.plot.series.length !== this.lines.length + 1) { this.rebuild(); return; }
      if (this.log) this.plot.scales.y.asinh = linthresh(this.aligned.finite);
      this.plot.setData([this.aligned.xs, ...this.aligned.plotted], this.view.zoom === null);
      this.fitX(false);
      if (this.plot.cursor.idx === null || this.plot.cursor.idx === undefined) this.plot.setLegend({ idx: null });
      const empty = this.aligned.xs.length === 0;
      this.empty.hidden = !empty;
      this.empty.textContent = empty ? this.options.emptyText(this.panel) : "";
      this.el.classList.toggle("is-empty", empty);
      this.updateNote();
    }

    /** One x range on every chart (the zoom, else the extent of all the page's data). */
    fitX(force) {
      const range = this.view.zoom || this.view.extent;
      if (!range || !this.aligned.xs.length) return;
      const x = this.plot.scales.x;
      if (force || x.min !== range.min || x.max !== range.max) this.plot.setScale("x", { min: range.min, max: range.max });
    }

    updateNote() {
      const parts = [];
      let bad = 0;
      for (const r of this.aligned.raw) for (const v of r) if (v !== undefined && !Number.isFinite(v)) bad += 1;
      if (bad) parts.push(`${fmtInt(bad)} non-finite (▲)`);
      const down = this.lines.map((l) => l.source.data[l.metric]).filter((d) => d && d.downsampled);
      if (down.length) parts.push(`downsampled from ${fmtInt(down.reduce((n, d) => n + d.total, 0))} points`);
      if (this.aligned.smoothed && this.aligned.xs.length) parts.push(`EMA ${fmt(this.view.smoothing, 2)}`);
      this.note.textContent = parts.join(" · ");
      this.note.classList.toggle("warn", bad > 0);
    }

    // --- the uPlot instance --------------------------------------------------------------------

    setLog(on) {
      if (this.panel.phase || on === this.log) return;
      this.log = on;
      this.updateScaleButton();
      this.rebuild();
    }

    updateScaleButton() {
      if (this.scaleButton) this.scaleButton.textContent = this.log ? "log" : "linear";
    }

    rebuild() {
      if (this.plot) this.plot.destroy();
      this.markerEls = [];
      this.create();
      this.draw();
    }

    create() {
      this.plot = new uPlot(this.uplotOptions(), [this.aligned.xs, ...this.aligned.plotted], this.body);
      this.plot.over.addEventListener("mousedown", () => { this.view.dragging = this; });
      this.plot.over.addEventListener("dblclick", () => this.view.setZoom(null));
    }

    uplotOptions() {
      const panel = this.panel, view = this.view;
      const axis = { stroke: GREY, grid: { stroke: "#e5e7eb", width: 1 }, ticks: { stroke: "#e5e7eb", width: 1 },
                     font: "11px system-ui, sans-serif" };
      const xLabel = view.xMode === "step" ? "step" : view.xMode === "wall" ? "time" : "since start";
      const series = [{ label: xLabel, value: (u, v) => (v === null || v === undefined ? "latest" : this.xText(v)) }];
      this.lines.forEach((line, i) => series.push({
        label: line.label, stroke: line.color, width: 1.5, dash: line.dash || undefined, spanGaps: false,
        paths: panel.stepped ? uPlot.paths.stepped({ align: 1 }) : undefined,
        value: (u, v, si, idx) => this.rawText(si, idx === null || idx === undefined ? this.lastIndex(si) : idx),
      }));
      const y = { distr: this.log ? 4 : 1, log: 10, asinh: 1 };
      if (panel.range) y.range = panel.phase ? [panel.range[0] - 0.5, panel.range[1] + 0.5] : panel.range;
      const xAxis = { ...axis };
      if (view.xMode === "step") {
        xAxis.incrs = STEP_INCRS;
        xAxis.values = (u, splits) => splits.map((v) => (v === null ? "" : fmtAxis(v)));
      } else if (view.xMode === "relative") {
        xAxis.values = (u, splits) => splits.map((v) => (v === null ? "" : fmtDuration(v)));
      }
      const yAxis = { ...axis, size: panel.phase ? 78 : 64 };
      if (panel.phase) {
        yAxis.splits = () => [1, 2];
        yAxis.values = (u, splits) => splits.map((v) => (v === 1 ? "1 explore" : v === 2 ? "2 commit" : ""));
      } else {
        yAxis.values = (u, splits) => splits.map((v) => (v === null ? "" : fmtAxis(v)));
        if (this.log) {
          yAxis.splits = (u, ai, min, max) => spaced(u, symlogSplits(min, max, u.scales.y.asinh || 1), 14);
          yAxis.filter = (u, splits) => splits; // label every tick symlogSplits chose (uPlot keeps only 10^k)
        }
      }
      return {
        width: Math.max(300, Math.floor(this.body.clientWidth) || 600), height: HEIGHT,
        scales: { x: { time: view.xMode === "wall" }, y },
        series,
        axes: [xAxis, yAxis],
        cursor: { sync: { key: this.options.syncKey || "moxco" }, drag: { x: true, y: false, setScale: false } },
        legend: { live: true },
        hooks: {
          drawAxes: [(u) => this.drawRaw(u)],
          draw: [(u) => this.drawOverlay(u)],
          setSelect: [(u) => this.onSelect(u)],
          setSize: [(u) => this.placeMarkers(u)],
        },
      };
    }

    xText(x) {
      const mode = this.view.xMode;
      if (mode === "step") return fmtInt(x);
      if (mode === "wall") return dateTime(x);
      return fmtDuration(x);
    }

    /** The legend's text for series si at index idx: the stored value, NaN/±Inf included; with the
     *  cursor off the chart, each line's latest value. */
    rawText(si, idx) {
      const v = idx < 0 ? undefined : this.aligned.raw[si - 1][idx];
      if (v === undefined) return "–";
      const shown = this.panel.phase ? phaseText(v) : fmt(v);
      const s = this.aligned.plotted[si - 1][idx];
      return this.aligned.smoothed && Number.isFinite(v) && s !== null ? `${fmt(s)} (raw ${shown})` : shown;
    }

    lastIndex(si) {
      const raw = this.aligned.raw[si - 1];
      for (let j = raw.length - 1; j >= 0; j--) if (raw[j] !== undefined) return j;
      return -1;
    }

    /** Only the chart the drag started on turns its selection into the zoom (module comment). */
    onSelect(u) {
      const { left, width } = u.select;
      if (!(width > 0)) return;
      const min = u.posToVal(left, "x"), max = u.posToVal(left + width, "x");
      u.setSelect({ left: 0, top: 0, width: 0, height: 0 }, false);
      if (this.view.dragging !== this || width < 3) return;
      this.view.setZoom({ min, max });
    }

    /** Faint raw lines under the smoothed ones. */
    drawRaw(u) {
      this.rawDrawn = 0;
      if (!this.aligned.smoothed) return;
      const ctx = u.ctx, { left, top, width, height } = u.bbox, xs = u.data[0];
      ctx.save();
      ctx.beginPath();
      ctx.rect(left, top, width, height);
      ctx.clip();
      ctx.globalAlpha = RAW_ALPHA;
      ctx.lineWidth = uPlot.pxRatio;
      this.lines.forEach((line, i) => {
        if (!u.series[i + 1].show) return;
        const ys = this.aligned.finite[i];
        ctx.strokeStyle = line.color;
        ctx.beginPath();
        let pen = false;
        for (let j = 0; j < xs.length; j++) {
          const v = ys[j];
          if (v === undefined) continue;
          if (v === null) { pen = false; continue; }
          const x = u.valToPos(xs[j], "x", true), y = u.valToPos(v, "y", true);
          if (pen) ctx.lineTo(x, y); else { ctx.moveTo(x, y); pen = true; }
        }
        ctx.stroke();
        this.rawDrawn += 1;
      });
      ctx.restore();
    }

    /** Reference lines (the threshold C, the catalogue's refs) and non-finite markers. */
    drawOverlay(u) {
      const ctx = u.ctx, { left, top, width, height } = u.bbox, px = uPlot.pxRatio;
      ctx.save();
      ctx.beginPath();
      ctx.rect(left, top, width, height);
      ctx.clip();
      for (const ref of this.refs()) {
        const y = Math.round(u.valToPos(ref.value, "y", true));
        if (!(y >= top && y <= top + height)) continue;
        ctx.strokeStyle = ref.color;
        ctx.fillStyle = ref.color;
        ctx.lineWidth = 1.5 * px;
        ctx.setLineDash([8 * px, 5 * px]);
        ctx.beginPath();
        ctx.moveTo(left, y);
        ctx.lineTo(left + width, y);
        ctx.stroke();
        ctx.setLineDash([]);
        ctx.font = `${11 * px}px system-ui, sans-serif`;
        ctx.textAlign = "right";
        ctx.fillText(ref.label, left + width - 4 * px, y - 4 * px);
      }
      let drawn = 0;
      const xs = u.data[0];
      for (let si = 1; si < u.series.length; si++) {
        if (!u.series[si].show) continue;
        const raw = this.aligned.raw[si - 1];
        if (!raw || raw.length !== xs.length) continue;
        ctx.fillStyle = this.lines[si - 1].color;
        for (let j = 0; j < xs.length; j++) {
          const v = raw[j];
          if (v === undefined || Number.isFinite(v)) continue;
          const x = u.valToPos(xs[j], "x", true);
          if (x < left || x > left + width) continue;
          const s = 5 * px, atTop = v !== -Infinity;
          const y = atTop ? top + 1 * px : top + height - 1 * px;
          ctx.beginPath();
          ctx.moveTo(x, y);
          ctx.lineTo(x - s, atTop ? y + 1.6 * s : y - 1.6 * s);
          ctx.lineTo(x + s, atTop ? y + 1.6 * s : y - 1.6 * s);
          ctx.closePath();
          ctx.fill();
          drawn += 1;
        }
      }
      this.nonFiniteDrawn = drawn;
      ctx.restore();
      this.placeMarkers(u);
    }

    refs() {
      const out = (this.panel.refs || []).map((r) => ({ value: r.value, label: r.label, color: r.color || GREEN }));
      return out.concat(this.options.refs(this.panel));
    }

    // --- decision markers ------------------------------------------------------------------------

    setMarkers(markers) {
      this.markers = markers;
      this.placeMarkers(this.plot);
    }

    /** Decision markers: DOM elements over the plot (hoverable, countable), one per decision. */
    placeMarkers(u) {
      if (!u || !u.over) return;
      while (this.markerEls.length > this.markers.length) this.markerEls.pop().remove();
      while (this.markerEls.length < this.markers.length) {
        const el = h("div", { class: "decision-marker" });
        el.addEventListener("mouseenter", () => this.showTip(el));
        el.addEventListener("mouseleave", () => { this.tip.hidden = true; });
        u.over.append(el);
        this.markerEls.push(el);
      }
      const ready = u.data[0].length > 0;
      this.markers.forEach((m, i) => {
        const el = this.markerEls[i];
        el.dataset.step = String(m.step);
        el.dataset.index = String(i);
        el.style.setProperty("--marker", m.color || "var(--decision)");
        const xv = this.view.xMode === "step" ? m.step : this.view.x(m.source, m.step, m.source.wallAt(m.step));
        const x = ready ? u.valToPos(xv, "x") : NaN;
        const visible = Number.isFinite(x) && x >= -1 && x <= u.over.clientWidth + 1;
        el.hidden = !visible;
        if (visible) el.style.left = `${x}px`;
      });
    }

    showTip(el) {
      const m = this.markers[Number(el.dataset.index)];
      if (!m) return;
      this.tip.replaceChildren(...m.tip());
      const wrap = this.tip.parentElement.getBoundingClientRect();
      const at = el.getBoundingClientRect();
      this.tip.hidden = false;
      const left = Math.min(at.left - wrap.left + 10, wrap.width - this.tip.offsetWidth - 4);
      this.tip.style.left = `${Math.max(4, left)}px`;
      this.tip.style.top = `${Math.max(0, at.top - wrap.top + 8)}px`;
    }

    // --- what the chart holds, for tests and the browser console -----------------------------------

    hook() {
      const chart = this;
      const line = (metric, run) => {
        const i = chart.lines.findIndex((l) => l.metric === metric && (run === undefined || l.source.name === run));
        if (i < 0) throw new Error(`chart ${chart.panel.id} has no line ${metric}${run === undefined ? "" : " of " + run}`);
        return i;
      };
      const text = (v) => (Number.isFinite(v) ? v : Number.isNaN(v) ? "NaN" : v > 0 ? "Infinity" : "-Infinity");
      return {
        id: this.panel.id, title: this.panel.title,
        get metrics() { return [...new Set(chart.lines.map((l) => l.metric))]; },
        get plot() { return chart.plot; },
        lines() { return chart.lines.map((l) => ({ run: l.source.name, metric: l.metric, label: l.label, color: l.color })); },
        /** What uPlot plots for a line: {steps, values} (x in the axis' units; null: a gap). */
        plotted(metric, run) {
          const si = line(metric, run) + 1, xs = chart.plot.data[0], ys = chart.plot.data[si];
          const steps = [], values = [];
          for (let j = 0; j < xs.length; j++) if (ys[j] !== undefined) { steps.push(xs[j]); values.push(ys[j]); }
          return { steps, values };
        },
        /** The stored values behind a line ("NaN", "Infinity", "-Infinity" as strings), by step. */
        raw(metric, run) {
          const i = line(metric, run), steps = [], values = [];
          chart.aligned.raw[i].forEach((v, j) => { if (v !== undefined) { steps.push(chart.aligned.steps[i][j]); values.push(text(v)); } });
          return { steps, values };
        },
        legend(metric, run) { return chart.plot.root.querySelectorAll(".u-series")[line(metric, run) + 1].textContent; },
        nonFiniteMarkers() { return chart.nonFiniteDrawn; },
        rawLinesDrawn() { return chart.rawDrawn; },
        decisionMarkers() { return chart.markerEls.filter((m) => !m.hidden).map((m) => Number(m.dataset.step)); },
        threshold() { return chart.options.refs(chart.panel).map((r) => r.value); },
        xRange() { return [chart.plot.scales.x.min, chart.plot.scales.x.max]; },
        scale() { return { log: chart.log, distr: chart.plot.scales.y.distr }; },
        yTicks() { return [...chart.plot.axes[1]._splits || []]; },
        empty() { return chart.empty.hidden ? null : chart.empty.textContent; },
      };
    }
  }

  // --- page controls -------------------------------------------------------------------------------

  /** The x-axis and smoothing controls (they live in the page's toolbar). */
  function controls(view) {
    const select = h("select", { id: "x-mode", "aria-label": "x axis" },
      ...Object.entries(X_MODES).map(([value, label]) => h("option", { value, text: label })));
    select.addEventListener("change", () => view.setXMode(select.value));
    const slider = h("input", { id: "smoothing", type: "range", min: "0", max: "0.99", step: "0.01", value: "0",
      "aria-label": "smoothing" });
    const shown = h("span", { class: "smoothing-value", text: "0" });
    slider.addEventListener("input", () => { shown.textContent = fmt(Number(slider.value), 2); view.setSmoothing(slider.value); });
    return h("div", { class: "controls" },
      h("label", {}, "x axis ", select),
      h("label", { title: "exponential moving average of each line (TensorBoard's, debiased); the raw line stays faint" },
        "smoothing ", slider, shown));
  }

  /** The chart id of a user's own series (`window.moxcoCharts[userChartId(name)]`): apart from the
   *  catalogue's panel ids, whatever the series is called. */
  const userChartId = (metric) => `user:${metric}`;

  /** A panel for one of the user's own series (agent.log): the shape of a catalogue panel. */
  function userPanel(metric) {
    return { id: userChartId(metric), title: metric, help: `${metric}: your own series, logged with agent.log({...})`,
             log: false, stepped: false, range: null, threshold: false, wide: false, phase: false, refs: [],
             requires: [], series: [{ metric, label: metric, color: null, dash: null }] };
  }

  /**
   * Build a page's sections and charts from the catalogue, then the "Your metrics" section: one
   * chart per series the catalogue does not know (what a run logs with agent.log), hidden while
   * there is none. Returns {charts, user, setUser(names)}: `setUser` takes the stored metric names
   * (the run's, or the union of the compared runs'), adds a chart for each new user series and
   * takes off those no longer there; `user` is the user series charted, by name.
   */
  function build(cat, container, view, options) {
    const charts = [];
    const section = (id, title) => {
      const grid = h("div", { class: "grid" });
      const el = h("section", { class: "section", dataset: { section: id } }, h("h2", { text: title }), grid);
      container.append(el);
      return { el, grid };
    };
    for (const s of cat.sections) {
      const { grid } = section(s.id, s.title);
      for (const panel of s.panels) charts.push(new Chart(panel, grid, view, options));
    }
    const known = new Set(cat.metrics.map((m) => m.name));
    const mine = section("user", "Your metrics");
    mine.el.hidden = true;
    const user = new Map();
    return {
      charts,
      get user() { return [...user.keys()]; },
      setUser(names) {
        const wanted = [...new Set(names)].filter((n) => !known.has(n)).sort();
        for (const [name, chart] of user) if (!wanted.includes(name)) { chart.remove(); user.delete(name); }
        mine.el.hidden = wanted.length === 0; // shown before a chart is made, so it is made at its width
        const added = wanted.filter((n) => !user.has(n));
        for (const name of added) user.set(name, new Chart(userPanel(name), mine.grid, view, options));
        if (added.length) mine.grid.append(...wanted.map((n) => user.get(n).el)); // in name order
        return added;
      },
    };
  }

  /** Metric names the catalogue's panels draw. */
  function panelMetrics(cat) {
    return [...new Set(cat.sections.flatMap((s) => s.panels.flatMap((p) => p.series.map((x) => x.metric))))];
  }

  /** The metrics a failed agent part drops: the part names a need (gradient, loss, …), a group
   *  (reeval, reference, …) or a metric (sharpness, …) of the catalogue. */
  function droppedBy(cat, part) {
    return cat.metrics.filter((m) => m.needs.includes(part) || m.group === part || m.name === part).map((m) => m.name);
  }

  window.moxcoCharts = window.moxcoCharts || {};
  return { PALETTE, DASHES, X_MODES, catalogue, loadCatalogue, ema, symlogSplits, Source, View, Chart, controls, build, panelMetrics,
           droppedBy, fmtDuration, userChartId };
})();
