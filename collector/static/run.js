/* moxco pages: one run (served at /runs/{run}).
 *
 * The panels are the Grafana live-run dashboard's (dashboards/build.py): loss, gradient norm,
 * update norm and distance; sharpness against λ_target, goodness against the policy's threshold C,
 * the three goodness terms, phase, optimizer state; the audit metrics. Data comes from the query
 * API: the run (status, last step, metric names, config), each metric's series (downsampled by the
 * collector to MAX_POINTS with minmax, so extremes survive), /latest for the tiles, /decisions.
 *
 * Live: every few seconds the page re-reads the run; when its last_ingest_at moved, it asks each
 * series only for the steps after the last one it holds and appends them (no reload, zoom kept).
 *
 * Non-finite values (the API's "NaN", "Infinity", "-Infinity") are gaps in the line, with a small
 * triangle at the top (NaN, +Inf) or bottom (−Inf) edge of the plot at their step; the legend
 * shows the value as text. Decisions are dashed vertical lines with a tooltip.
 *
 * Test hooks: window.moxcoPage (load state) and window.moxcoCharts[id] (what each chart holds).
 */
"use strict";

(() => {
  const { h, api, num, fmt, fmtInt, dateTime, agoEl, phaseText, statusBadge, thresholdC, actionText, showError } = moxco;

  const MAX_POINTS = 2000; // per series and request; the collector downsamples beyond it
  const REFETCH_ABOVE = 3 * MAX_POINTS; // a live series grown past this is fetched again, downsampled
  const HEIGHT = 220;
  const C1 = "#2563eb", C2 = "#ea580c", C3 = "#16a34a", RED = "#dc2626", GREEN = "#16a34a", GREY = "#64748b";

  // --- the panels (same as the Grafana live-run dashboard) ----------------------------------

  const SECTIONS = [
    { title: "Training", panels: [
      { id: "loss", title: "Loss", help: "Minibatch loss f(x_t, z_t).",
        series: [{ metric: "loss", label: "loss" }] },
      { id: "grad_norm_sq", title: "Squared gradient norm", log: true,
        help: "‖g_t‖², the raw minibatch value (biased up by gradient noise; goodness uses the ALIGATOR estimate).",
        series: [{ metric: "grad_norm_sq", label: "‖g‖²" }] },
      { id: "update", title: "Update norm and distance", log: true,
        help: "‖x_{t+1} − x_t‖ and how far the run has travelled, ‖x_t − x_0‖.",
        series: [{ metric: "update_norm", label: "update ‖Δx‖" }, { metric: "distance", label: "distance ‖x − x₀‖" }] },
    ] },
    { title: "MoXCo: sharpness, goodness, phase", panels: [
      { id: "sharpness", title: "Sharpness vs λ_target (EOS)", wide: true,
        help: "Top Hessian eigenvalue λ̂ (power iteration) against the target k·λ_EOS, λ_EOS = 2(1+α)/(η(1+2β)) (dashed).",
        series: [{ metric: "sharpness", label: "λ̂ sharpness" },
                 { metric: "sharpness_target", label: "λ_target", color: RED, dash: [8, 5] }] },
      { id: "goodness", title: "Goodness vs threshold C", range: [0, 1], threshold: true,
        help: "MoXCo goodness score in [0, 1]; the policy decides when it stays at or above C (dashed) for `consecutive` probes.",
        series: [{ metric: "goodness", label: "goodness" }] },
      { id: "goodness_terms", title: "Goodness terms", log: true,
        help: "The three bracketed terms of eq. 6; goodness = exp(−τ · their sum).",
        series: [{ metric: "goodness_grad_term", label: "gradient ĝ²" },
                 { metric: "goodness_sharpness_term", label: "sharpness |λ̂/λ_target − 1|" },
                 { metric: "goodness_loss_term", label: "loss |f̂ − f_target|" }] },
      { id: "phase", title: "Phase", phase: true, stepped: true, help: "1 explore, 2 commit (after a decision is applied).",
        series: [{ metric: "phase", label: "phase" }] },
      { id: "optimizer", title: "Optimizer state", log: true, stepped: true,
        help: "The moxco.optim optimizer's lr, α and β (they change when a decision is applied).",
        series: [{ metric: "lr", label: "lr" }, { metric: "alpha", label: "α" }, { metric: "beta", label: "β" }] },
    ] },
    { title: "Audit: convexity and smoothness along the path", panels: [
      { id: "gap", title: "Convexity gap", log: true,
        help: "inst_gap = f(x_t) − f(x_{t−1}) − ⟨g_t, x_t − x_{t−1}⟩ (≤ 0 when convex along the step), its running mean and EMA.",
        series: [{ metric: "inst_gap", label: "inst_gap" }, { metric: "avg_gap", label: "avg_gap" },
                 { metric: "exp_gap", label: "exp_gap" }] },
      { id: "smoothness", title: "Smoothness", log: true,
        help: "inst_smooth = ‖g_t − ∇f(x_{t−1})‖ / ‖x_t − x_{t−1}‖, its running max and EMA.",
        series: [{ metric: "inst_smooth", label: "inst_smooth" }, { metric: "max_smooth", label: "max_smooth" },
                 { metric: "exp_smooth", label: "exp_smooth" }] },
      { id: "update_corr", title: "Update correlation and progress", log: true,
        help: "update_corr = ⟨g_{t+1}, x_{t+1} − x_t⟩ (the descent lemma predicts < 0), update_corr_rs = ⟨g_{t+1}, Δ_t⟩, and loss_diff.",
        series: [{ metric: "update_corr", label: "update_corr" }, { metric: "update_corr_rs", label: "update_corr_rs" },
                 { metric: "loss_diff", label: "loss_diff" }] },
      { id: "convexity_ratio", title: "Convexity ratio", refs: [{ value: 1, label: "1", color: GREEN }, { value: 0, label: "0", color: RED }],
        help: "Σ⟨∇F(x_t), x_t − x*⟩ / Σ(F(x_t) − F(x*)): > 1 convex-like, (0, 1] convex analysis applies with a 1/K slow-down, ≤ 0 strongly non-convex. Needs a reference x*.",
        series: [{ metric: "convexity_ratio", label: "convexity_ratio" }] },
    ] },
  ];
  const PALETTE = [C1, C2, C3];
  // x ticks fall on whole steps: 1, 2, 5, 10, 20, 25, 50, 100, …
  const STEP_INCRS = [];
  for (let e = 1; e <= 1e15; e *= 10) STEP_INCRS.push(e, 2 * e, ...(e >= 10 ? [2.5 * e] : []), 5 * e);
  const ALL_METRICS = [...new Set(SECTIONS.flatMap((s) => s.panels.flatMap((p) => p.series.map((x) => x.metric))))];

  // --- state --------------------------------------------------------------------------------

  const name = (() => {
    const q = new URLSearchParams(location.search).get("name");
    if (q !== null) return q;
    const segment = location.pathname.replace(/^.*\/runs\//, "");
    try { return decodeURIComponent(segment); } catch (e) { return segment; }
  })();
  const runPath = `runs/${encodeURIComponent(name)}`;

  const state = {
    detail: null, latest: null, decisions: [], data: {}, lastIngest: undefined, zoom: null, extent: null,
    paused: false, timer: null, configKey: "", decisionsKey: "",
  };
  const charts = [];
  const page = (window.moxcoPage = { run: name, loaded: false, polls: 0, error: null, decisions: [] });
  window.moxcoCharts = {};

  // --- charts -------------------------------------------------------------------------------

  function fmtAxis(v) {
    return Number.isInteger(v) && Math.abs(v) < 1e6 ? fmtInt(v) : fmt(v, 3);
  }

  /** The linear threshold of the symlog (asinh) axis: the order of magnitude of the smallest
   *  non-zero |value|, so small values spread over decades instead of hugging zero. */
  function linthresh(plotted) {
    let min = Infinity;
    for (const ys of plotted) {
      for (const v of ys) {
        if (v !== null && v !== undefined && v !== 0) min = Math.min(min, Math.abs(v));
      }
    }
    return Number.isFinite(min) ? Math.pow(10, Math.floor(Math.log10(min))) : 1;
  }

  class Chart {
    constructor(spec, container) {
      this.spec = spec;
      this.metrics = spec.series.map((s) => s.metric);
      this.log = !!spec.log;
      this.aligned = { xs: [], plotted: this.metrics.map(() => []), raw: this.metrics.map(() => []) };
      this.nonFiniteDrawn = 0;
      this.decisions = [];
      this.markers = [];
      this.note = h("span", { class: "note" });
      this.scaleButton = spec.log ? h("button", { type: "button", class: "link scale", text: "symlog",
        title: "y axis: symmetric log (asinh) or linear; click to switch", onclick: () => this.toggleScale() }) : null;
      this.body = h("div", { class: "plot" });
      this.empty = h("div", { class: "nodata", text: "no points yet" });
      this.tip = h("div", { class: "decision-tip", role: "tooltip", hidden: true });
      this.el = h("section", { class: `panel${spec.wide ? " wide" : ""}`, dataset: { chart: spec.id } },
        h("header", {}, h("h3", { text: spec.title, title: spec.help }), this.note, this.scaleButton),
        h("div", { class: "plot-wrap" }, this.body, this.empty, this.tip));
      container.append(this.el);
      this.plot = new uPlot(this.options(), [[], ...this.metrics.map(() => [])], this.body);
      this.plot.over.addEventListener("dblclick", () => setZoom(null, true));
      new ResizeObserver(() => {
        const width = Math.floor(this.body.clientWidth);
        if (width > 0 && width !== this.plot.width) this.plot.setSize({ width, height: HEIGHT });
      }).observe(this.body);
      window.moxcoCharts[spec.id] = this.hook();
    }

    options() {
      const spec = this.spec;
      const axis = { stroke: GREY, grid: { stroke: "#e5e7eb", width: 1 }, ticks: { stroke: "#e5e7eb", width: 1 },
                     font: "11px system-ui, sans-serif" };
      const series = [{ label: "step", value: (u, v) => (v === null || v === undefined ? "latest" : fmtInt(v)) }];
      spec.series.forEach((s, i) => series.push({
        label: s.label, stroke: s.color || PALETTE[i % PALETTE.length], width: 1.5, dash: s.dash, spanGaps: false,
        paths: spec.stepped ? uPlot.paths.stepped({ align: 1 }) : undefined,
        value: (u, v, si, idx) => this.rawText(si, idx === null || idx === undefined ? this.lastIndex(si) : idx),
      }));
      const y = { distr: this.log ? 4 : 1, log: 10, asinh: 1 };
      if (spec.range) y.range = spec.range;
      if (spec.phase) y.range = [0.5, 2.5];
      return {
        width: Math.max(300, Math.floor(this.body.clientWidth) || 600), height: HEIGHT,
        scales: { x: { time: false }, y },
        series,
        axes: [
          { ...axis, incrs: STEP_INCRS, values: (u, splits) => splits.map((v) => (v === null ? "" : fmtAxis(v))) },
          { ...axis, size: spec.phase ? 78 : 64,
            splits: spec.phase ? () => [1, 2] : undefined,
            values: spec.phase ? (u, splits) => splits.map((v) => (v === 1 ? "1 explore" : v === 2 ? "2 commit" : ""))
                               : (u, splits) => splits.map((v) => (v === null ? "" : fmtAxis(v))) },
        ],
        cursor: { sync: { key: "moxco-run" }, drag: { x: true, y: false, setScale: false } },
        legend: { live: true },
        hooks: {
          draw: [(u) => this.drawOverlay(u)],
          setSelect: [(u) => this.onSelect(u)],
          setSize: [(u) => this.placeMarkers(u)],
        },
      };
    }

    /** The legend's text for series si at aligned index idx: the stored value, NaN/±Inf included.
     *  With the cursor off the chart the legend shows each series' latest value. */
    rawText(si, idx) {
      const v = idx < 0 ? undefined : this.aligned.raw[si - 1][idx];
      if (v === undefined) return "–";
      return this.spec.phase ? phaseText(v) : fmt(v);
    }

    lastIndex(si) {
      const raw = this.aligned.raw[si - 1];
      for (let j = raw.length - 1; j >= 0; j--) if (raw[j] !== undefined) return j;
      return -1;
    }

    /** Join the chart's series on the union of their steps: uPlot wants one x array. A step a
     *  series has no point at is `undefined` (the line spans it); a non-finite value is `null`
     *  (a gap in the line). */
    align() {
      const columns = this.metrics.map((m) => state.data[m] || { steps: [], values: [] });
      let xs;
      if (columns.length === 1) {
        xs = columns[0].steps.slice();
      } else {
        const all = new Set();
        for (const c of columns) for (const s of c.steps) all.add(s);
        xs = Array.from(all).sort((a, b) => a - b);
      }
      const plotted = [], raw = [];
      for (const c of columns) {
        const p = new Array(xs.length), r = new Array(xs.length);
        let k = 0;
        for (let j = 0; j < xs.length; j++) {
          if (k < c.steps.length && c.steps[k] === xs[j]) {
            const v = c.values[k++];
            r[j] = v;
            p[j] = Number.isFinite(v) ? v : null;
          }
        }
        plotted.push(p);
        raw.push(r);
      }
      return { xs, plotted, raw };
    }

    update() {
      this.aligned = this.align();
      if (this.log) this.plot.scales.y.asinh = linthresh(this.aligned.plotted);
      this.plot.setData([this.aligned.xs, ...this.aligned.plotted], state.zoom === null);
      this.fitX();
      if (this.plot.cursor.idx === null || this.plot.cursor.idx === undefined) this.plot.setLegend({ idx: null });
      this.empty.hidden = this.aligned.xs.length > 0;
      this.updateNote();
    }

    /** One step range on every chart (the zoom, else the run's whole extent), so they line up. */
    fitX() {
      const range = state.zoom || state.extent;
      if (!range || !this.aligned.xs.length) return;
      const x = this.plot.scales.x;
      if (x.min !== range.min || x.max !== range.max) this.plot.setScale("x", range);
    }

    updateNote() {
      const parts = [];
      let bad = 0;
      for (const r of this.aligned.raw) for (const v of r) if (v !== undefined && !Number.isFinite(v)) bad += 1;
      if (bad) parts.push(`${fmtInt(bad)} non-finite (▲)`);
      const down = this.metrics.map((m) => state.data[m]).filter((d) => d && d.downsampled);
      if (down.length) {
        const total = down.reduce((n, d) => n + d.total, 0);
        parts.push(`downsampled from ${fmtInt(total)} points`);
      }
      this.note.textContent = parts.join(" · ");
      this.note.classList.toggle("warn", bad > 0);
    }

    toggleScale() {
      this.log = !this.log;
      this.scaleButton.textContent = this.log ? "symlog" : "linear";
      this.plot.destroy();
      this.plot = new uPlot(this.options(), [this.aligned.xs, ...this.aligned.plotted], this.body);
      if (this.log) this.plot.scales.y.asinh = linthresh(this.aligned.plotted);
      this.plot.over.addEventListener("dblclick", () => setZoom(null, true));
      this.markers = [];
      this.plot.redraw();
      this.fitX();
    }

    onSelect(u) {
      if (u.select.width < 3) return;
      const min = u.posToVal(u.select.left, "x"), max = u.posToVal(u.select.left + u.select.width, "x");
      u.setSelect({ left: 0, top: 0, width: 0, height: 0 }, false);
      setZoom({ min, max }, true);
    }

    /** Horizontal reference lines (C, 0 and 1 of the convexity ratio) and non-finite markers. */
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
        ctx.fillStyle = this.spec.series[si - 1].color || PALETTE[(si - 1) % PALETTE.length];
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
      if (this.spec.refs) return this.spec.refs;
      if (this.spec.threshold) {
        const c = state.detail ? thresholdC(state.detail) : null;
        return c === null ? [] : [{ value: c, label: `C = ${fmt(c)}`, color: GREEN }];
      }
      return [];
    }

    setDecisions(decisions) {
      this.decisions = decisions;
      this.placeMarkers(this.plot);
    }

    /** Decision markers: DOM elements over the plot (hoverable, countable), one per decision. */
    placeMarkers(u) {
      if (!u || !u.over) return;
      while (this.markers.length > this.decisions.length) this.markers.pop().remove();
      while (this.markers.length < this.decisions.length) {
        const marker = h("div", { class: "decision-marker" });
        marker.addEventListener("mouseenter", () => this.showTip(marker));
        marker.addEventListener("mouseleave", () => { this.tip.hidden = true; });
        u.over.append(marker);
        this.markers.push(marker);
      }
      const xs = u.data[0];
      this.decisions.forEach((d, i) => {
        const marker = this.markers[i];
        marker.dataset.step = String(d.step);
        marker.dataset.index = String(i);
        const x = xs.length ? u.valToPos(d.step, "x") : NaN;
        const visible = Number.isFinite(x) && x >= -1 && x <= u.over.clientWidth + 1;
        marker.hidden = !visible;
        if (visible) marker.style.left = `${x}px`;
      });
    }

    showTip(marker) {
      const d = this.decisions[Number(marker.dataset.index)];
      if (!d) return;
      const c = state.detail ? thresholdC(state.detail) : null;
      const g = num(d.goodness);
      const goodness = d.goodness === null ? "not measured" :
        fmt(g) + (c === null || !Number.isFinite(g) ? "" : g >= c ? ` (≥ C = ${fmt(c)})` : ` (< C = ${fmt(c)})`);
      this.tip.replaceChildren(...[
        h("strong", { text: `Decision at step ${fmtInt(d.step)}` }), h("span", { class: "muted", text: ` (${d.source})` }),
        h("div", { text: `goodness ${goodness}` }),
        d.goodness === null ? null : h("div", { class: "muted",
          text: `terms: ĝ² ${fmt(num(d.grad_term))} · sharpness ${fmt(num(d.sharpness_term))} · loss ${fmt(num(d.loss_term))}` }),
        h("div", { text: `action: ${actionText(d.action)}` }),
        h("div", { text: d.applied_step === null ? "not applied yet" : `applied at step ${fmtInt(d.applied_step)}` }),
        d.reason ? h("div", { class: "muted", text: d.reason }) : null,
      ].filter(Boolean));
      const wrap = this.tip.parentElement.getBoundingClientRect();
      const at = marker.getBoundingClientRect();
      this.tip.hidden = false;
      const left = Math.min(at.left - wrap.left + 10, wrap.width - this.tip.offsetWidth - 4);
      this.tip.style.left = `${Math.max(4, left)}px`;
      this.tip.style.top = `${Math.max(0, at.top - wrap.top + 8)}px`;
    }

    /** What the chart holds, for tests and for the curious (browser console). */
    hook() {
      const chart = this;
      const index = (metric) => {
        const i = chart.metrics.indexOf(metric);
        if (i < 0) throw new Error(`chart ${chart.spec.id} has no series ${metric}`);
        return i;
      };
      const text = (v) => (Number.isFinite(v) ? v : Number.isNaN(v) ? "NaN" : v > 0 ? "Infinity" : "-Infinity");
      return {
        id: this.spec.id, title: this.spec.title, metrics: this.metrics.slice(),
        get plot() { return chart.plot; },
        /** The points the uPlot instance plots for `metric`: {steps, values}, null for NaN/±Inf. */
        plotted(metric) {
          const si = index(metric) + 1, xs = chart.plot.data[0], ys = chart.plot.data[si];
          const steps = [], values = [];
          for (let j = 0; j < xs.length; j++) {
            if (ys[j] !== undefined) { steps.push(xs[j]); values.push(ys[j]); }
          }
          return { steps, values };
        },
        /** The values behind them as the API wrote them ("NaN", "Infinity", "-Infinity" as strings). */
        raw(metric) {
          const i = index(metric), steps = [], values = [];
          chart.aligned.raw[i].forEach((v, j) => { if (v !== undefined) { steps.push(chart.aligned.xs[j]); values.push(text(v)); } });
          return { steps, values };
        },
        legend(metric) { return chart.plot.root.querySelectorAll(".u-series")[index(metric) + 1].textContent; },
        nonFiniteMarkers() { return chart.nonFiniteDrawn; },
        decisionMarkers() { return chart.markers.filter((m) => !m.hidden).map((m) => Number(m.dataset.step)); },
        threshold() { return chart.refs().map((r) => r.value); },
        xRange() { return [chart.plot.scales.x.min, chart.plot.scales.x.max]; },
      };
    }
  }

  function setZoom(zoom, apply) {
    state.zoom = zoom;
    document.getElementById("reset-zoom").hidden = zoom === null;
    if (!apply) return;
    for (const chart of charts) {
      if (zoom === null) chart.plot.setData(chart.plot.data, true);
      chart.fitX();
    }
  }

  // --- the rest of the page -----------------------------------------------------------------

  function tile(label, value, sub, cls) {
    return h("div", { class: `tile${cls ? " " + cls : ""}`, dataset: { tile: label } },
      h("div", { class: "tile-label", text: label }),
      h("div", { class: "tile-value" }, value),
      h("div", { class: "tile-sub" }, sub || "\u00a0"));
  }

  function latestValue(metric) {
    const p = state.latest && state.latest.metrics && state.latest.metrics[metric];
    return p ? num(p.value) : undefined;
  }

  function renderTiles() {
    const d = state.detail;
    const c = thresholdC(d);
    const goodness = latestValue("goodness");
    const sharpness = latestValue("sharpness"), target = latestValue("sharpness_target");
    const ratio = sharpness !== undefined && target !== undefined ? sharpness / target : undefined;
    const applied = state.decisions.filter((x) => x.applied_step !== null).length;
    const silent = d.last_ingest_at ? Date.now() / 1000 - d.last_ingest_at : null;
    const phase = latestValue("phase");
    document.getElementById("tiles").replaceChildren(
      tile("Step", fmtInt(d.last_step), `created ${dateTime(d.created_at)}`),
      tile("Phase", phaseText(phase ?? d.phase), phase === 2 ? "committed" : phase === 1 ? "exploring" : ""),
      tile("Loss", fmt(latestValue("loss")), "", Number.isFinite(latestValue("loss") ?? 0) ? "" : "bad"),
      tile("Goodness", goodness === undefined ? "–" : fmt(goodness, 3), c === null ? "no decision policy" : `threshold C = ${fmt(c)}`,
        goodness === undefined || c === null ? "" : goodness >= c ? "good" : "below"),
      tile("Sharpness / λ_target", ratio === undefined || !Number.isFinite(ratio) ? "–" : `${fmt(100 * ratio, 3)} %`,
        sharpness === undefined ? "" : `λ̂ ${fmt(sharpness)} · λ_target ${fmt(target)}`,
        ratio === undefined ? "" : ratio >= 1 ? "bad" : ratio >= 0.9 ? "warn" : ""),
      tile("Decisions", fmtInt(state.decisions.length),
        state.decisions.length ? `${applied} applied, ${state.decisions.length - applied} pending` : ""),
      tile("Last data", agoEl(d.last_ingest_at), d.last_ingest_at ? dateTime(d.last_ingest_at) : "",
        d.status === "running" && silent !== null ? (silent > 600 ? "bad" : silent > 120 ? "warn" : "") : ""));
  }

  function renderHeader() {
    const d = state.detail;
    document.getElementById("run-status").replaceChildren(statusBadge(d));
  }

  function renderDecisions() {
    const key = JSON.stringify(state.decisions);
    if (key === state.decisionsKey) return;
    state.decisionsKey = key;
    const table = document.getElementById("decisions");
    table.hidden = state.decisions.length === 0;
    document.getElementById("decisions-empty").hidden = state.decisions.length > 0;
    table.querySelector("tbody").replaceChildren(...state.decisions.map((d) => h("tr", { dataset: { decision: d.id } },
      h("td", { class: "num", text: fmtInt(d.step) }),
      h("td", { text: d.source }),
      h("td", { class: "num", text: d.goodness === null ? "–" : fmt(num(d.goodness)) }),
      h("td", { class: "num", text: d.grad_term === null ? "–" : fmt(num(d.grad_term)) }),
      h("td", { class: "num", text: d.sharpness_term === null ? "–" : fmt(num(d.sharpness_term)) }),
      h("td", { class: "num", text: d.loss_term === null ? "–" : fmt(num(d.loss_term)) }),
      h("td", { text: actionText(d.action) }),
      h("td", { text: d.applied_step === null ? "pending" : `step ${fmtInt(d.applied_step)}` }),
      h("td", { title: dateTime(d.created_at), text: dateTime(d.created_at) }),
      h("td", { class: "muted", text: d.reason || "" }))));
    for (const chart of charts) chart.setDecisions(state.decisions);
  }

  /** JSON, indented, with keys/strings/numbers coloured: built from text nodes only. */
  function jsonTree(value, indent = "") {
    const inner = indent + "  ";
    if (value === null) return [h("span", { class: "j-null", text: "null" })];
    if (typeof value === "string") return [h("span", { class: "j-str", text: JSON.stringify(value) })];
    if (typeof value === "number") return [h("span", { class: "j-num", text: String(value) })];
    if (typeof value === "boolean") return [h("span", { class: "j-bool", text: String(value) })];
    if (Array.isArray(value)) {
      if (!value.length) return ["[]"];
      const out = ["[\n"];
      value.forEach((v, i) => { out.push(inner, ...jsonTree(v, inner), i < value.length - 1 ? ",\n" : "\n"); });
      out.push(indent, "]");
      return out;
    }
    const keys = Object.keys(value);
    if (!keys.length) return ["{}"];
    const out = ["{\n"];
    keys.forEach((k, i) => {
      out.push(inner, h("span", { class: "j-key", text: JSON.stringify(k) }), ": ", ...jsonTree(value[k], inner),
        i < keys.length - 1 ? ",\n" : "\n");
    });
    out.push(indent, "}");
    return out;
  }

  function renderConfig() {
    const d = state.detail;
    const parts = { config: d.config, optimizer: d.optimizer, policy: d.policy };
    const key = JSON.stringify(parts);
    if (key === state.configKey) return;
    state.configKey = key;
    const blocks = Object.entries(parts).filter(([, v]) => v !== null && v !== undefined).map(([label, v]) =>
      h("div", { class: "config-block" }, h("h3", { text: label }),
        h("pre", { class: "json", dataset: { config: label } }, ...jsonTree(v))));
    document.getElementById("config").replaceChildren(...blocks);
  }

  // --- loading ------------------------------------------------------------------------------

  async function fetchSeries(metric, full) {
    const held = state.data[metric];
    const params = { max_points: MAX_POINTS, method: "minmax" };
    if (!full && held && held.steps.length) params.start_step = held.steps[held.steps.length - 1] + 1;
    const r = await api(`${runPath}/series/${encodeURIComponent(metric)}`, params);
    const values = r.values.map(num);
    if (full || !held) {
      state.data[metric] = { steps: r.steps, values, total: r.total, downsampled: r.downsampled };
      return true;
    }
    if (!r.steps.length) return false;
    held.steps = held.steps.concat(r.steps);
    held.values = held.values.concat(values);
    held.total += r.total;
    held.downsampled = held.downsampled || r.downsampled;
    return true;
  }

  /** The smallest and largest step any series holds (null until two distinct steps exist). */
  function extent() {
    let min = Infinity, max = -Infinity;
    for (const d of Object.values(state.data)) {
      if (!d.steps.length) continue;
      min = Math.min(min, d.steps[0]);
      max = Math.max(max, d.steps[d.steps.length - 1]);
    }
    return max > min ? { min, max } : null;
  }

  async function refresh() {
    const detail = await api(runPath);
    const present = new Set(detail.metrics || []);
    const moved = detail.last_ingest_at !== state.lastIngest;
    const jobs = [];
    for (const metric of ALL_METRICS) {
      if (!present.has(metric)) continue;
      const held = state.data[metric];
      if (!held) jobs.push([metric, true]);
      else if (moved) jobs.push([metric, held.steps.length > REFETCH_ABOVE]);
    }
    const [decisions, latest, changed] = await Promise.all([
      api(`${runPath}/decisions`),
      moved || !state.latest ? api(`${runPath}/latest`) : Promise.resolve(state.latest),
      Promise.all(jobs.map(([metric, full]) => fetchSeries(metric, full).then((c) => (c ? metric : null)))),
    ]);
    const thresholdChanged = !state.detail || thresholdC(state.detail) !== thresholdC(detail);
    state.detail = detail;
    state.latest = latest;
    state.decisions = decisions.decisions;
    state.lastIngest = detail.last_ingest_at;
    document.title = `${name} · moxco`;
    renderHeader();
    renderTiles();
    renderDecisions();
    renderConfig();
    const updated = new Set(changed.filter(Boolean));
    state.extent = extent();
    for (const chart of charts) {
      if (thresholdChanged || chart.metrics.some((m) => updated.has(m))) chart.update();
      else chart.fitX();
    }
    page.decisions = state.decisions;
  }

  async function poll() {
    clearTimeout(state.timer);
    const error = document.getElementById("error");
    try {
      await refresh();
      showError(error, "");
      page.error = null;
      page.loaded = true;
      page.polls += 1;
      const every = moxco.refreshMs();
      document.getElementById("live").textContent = state.paused || !every ? `updated ${dateTime(Date.now() / 1000).slice(11)}`
        : `live · every ${every / 1000} s · updated ${dateTime(Date.now() / 1000).slice(11)}`;
    } catch (e) {
      page.error = e.message;
      showError(error, e.status === 404 ? `No run named “${name}” on this collector (${e.message}). Waiting for it…`
        : `Could not load the run: ${e.message}. Retrying…`);
    }
    const every = moxco.refreshMs();
    if (every && !state.paused) state.timer = setTimeout(poll, every);
  }

  document.addEventListener("DOMContentLoaded", () => {
    document.getElementById("run-name").textContent = name;
    document.title = `${name} · moxco`;
    const container = document.getElementById("panels");
    for (const section of SECTIONS) {
      const grid = h("div", { class: "grid" });
      container.append(h("section", { class: "section" }, h("h2", { text: section.title }), grid));
      for (const spec of section.panels) charts.push(new Chart(spec, grid));
    }
    const pause = document.getElementById("pause");
    pause.hidden = !moxco.refreshMs();
    pause.addEventListener("click", () => {
      state.paused = !state.paused;
      pause.textContent = state.paused ? "resume" : "pause";
      if (state.paused) { clearTimeout(state.timer); document.getElementById("live").textContent = "paused"; } else poll();
    });
    document.getElementById("reset-zoom").addEventListener("click", () => setZoom(null, true));
    poll();
  });
})();
