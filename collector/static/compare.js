/* moxco pages: runs compared panel by panel (served at /compare?run=a&run=b…).
 *
 * The same catalogue panels as the run page (charts.js), then "Your metrics" (a chart per series a
 * compared run logs with agent.log), each with every run's lines overlaid: one
 * colour per run (a line's dash tells the panel's series apart), a legend naming run and series.
 * Runs are added (a name, with suggestions from the runs list) and removed (×) in place; the URL
 * follows, so a comparison can be shared. Every few seconds each run is re-read and new points are
 * appended, as on the run page. The x axis (step, wall time, time since each run's start) and the
 * smoothing are the toolbar's; each panel switches its own y scale.
 *
 * Test hooks: window.moxcoPage ({runs, loaded, polls}) and window.moxcoCharts[id] (charts.js).
 */
"use strict";

(() => {
  const { h, api, fmt, showError, statusBadge, thresholdC, runHref } = moxco;
  const { Source, View, build, controls, panelMetrics, loadCatalogue, PALETTE, DASHES } = moxcoPlot;

  const MAX_POINTS = 2000;
  const MAX_RUNS = PALETTE.length;
  const view = new View();
  const sources = [];
  const state = { cat: null, metrics: [], layout: null, timer: null, generation: 0, suggested: 0 };
  const page = (window.moxcoPage = { runs: [], loaded: false, polls: 0, error: null });

  const chartOptions = {
    syncKey: "moxco-compare",
    lines: (panel) => sources.flatMap((source) => panel.series.map((s, i) => ({
      source, metric: s.metric, color: source.color, dash: s.dash || DASHES[i % DASHES.length],
      label: panel.series.length > 1 ? `${source.name} · ${s.label}` : source.name,
    }))),
    refs: (panel) => {
      if (!panel.threshold) return [];
      const seen = new Map();
      for (const source of sources) {
        const c = source.detail ? thresholdC(source.detail) : null;
        if (c !== null && !seen.has(c)) seen.set(c, source);
      }
      return [...seen].map(([c, source]) => ({ value: c, label: seen.size > 1 ? `C = ${fmt(c)} (${source.name})` : `C = ${fmt(c)}`,
                                               color: seen.size > 1 ? source.color : "#16a34a" }));
    },
    emptyText: (panel) => (sources.length ? (panel.requires && panel.requires.length ?
      `no points in these runs: ${panel.requires.join("; ")}` : "no points in these runs") : "add a run to compare"),
  };

  function colorFor() {
    const used = new Set(sources.map((s) => s.color));
    return PALETTE.find((c) => !used.has(c)) || PALETTE[sources.length % PALETTE.length];
  }

  function names() {
    return new URLSearchParams(location.search).getAll("run").filter((n, i, all) => n && all.indexOf(n) === i);
  }

  function setNames(list) {
    const q = new URLSearchParams(location.search);
    q.delete("run");
    for (const n of list) q.append("run", n);
    history.replaceState(null, "", `?${q.toString()}`);
  }

  function renderChips() {
    const bar = document.getElementById("run-chips");
    bar.replaceChildren(...sources.map((source) => {
      const chip = h("span", { class: "run-chip", dataset: { run: source.name } },
        h("span", { class: "swatch" }),
        h("a", { href: runHref(source.name), text: source.name }),
        source.detail ? statusBadge(source.detail) : null,
        h("button", { type: "button", title: `remove ${source.name}`, "aria-label": `remove ${source.name}`, text: "×",
          onclick: () => removeRun(source.name) }));
      chip.style.setProperty("--chip", source.color);
      return chip;
    }));
    document.getElementById("add-run").disabled = sources.length >= MAX_RUNS;
    document.title = `${sources.map((s) => s.name).join(" vs ") || "compare"} · moxco`;
    page.runs = sources.map((s) => s.name);
  }

  /** The user series of the runs compared: a chart each (charts.js). */
  function userCharts() {
    return state.layout.setUser(sources.flatMap((s) => (s.detail && s.detail.metrics) || []));
  }

  function redraw() {
    userCharts();
    view.refresh(false);
    renderChips();
  }

  function addRun(name) {
    name = name.trim();
    const error = document.getElementById("error");
    if (!name || sources.some((s) => s.name === name)) return;
    if (sources.length >= MAX_RUNS) { showError(error, `At most ${MAX_RUNS} runs side by side.`); return; }
    sources.push(new Source(name, colorFor()));
    setNames(sources.map((s) => s.name));
    redraw();
    poll();
  }

  function removeRun(name) {
    const i = sources.findIndex((s) => s.name === name);
    if (i < 0) return;
    sources.splice(i, 1);
    setNames(sources.map((s) => s.name));
    redraw();
  }

  async function refreshSource(source) {
    const detail = await api(`runs/${encodeURIComponent(source.name)}`);
    const present = new Set(detail.metrics || []);
    const moved = !source.detail || detail.last_ingest_at !== source.detail.last_ingest_at;
    source.detail = detail;
    userCharts();
    const jobs = [];
    for (const metric of state.metrics.concat(state.layout.user)) {
      if (!present.has(metric)) continue;
      const held = source.data[metric];
      if (!held) jobs.push(source.fetch(metric, true, MAX_POINTS));
      else if (moved) jobs.push(source.fetch(metric, held.steps.length > 3 * MAX_POINTS, MAX_POINTS));
    }
    const changed = await Promise.all(jobs);
    return changed.some(Boolean) || moved;
  }

  async function suggest() {
    if (Date.now() - state.suggested < 30_000) return;
    state.suggested = Date.now();
    const listed = await api("runs", { limit: 200 });
    document.getElementById("run-suggestions").replaceChildren(...listed.runs.map((r) => h("option", { value: r.name })));
  }

  async function poll() {
    clearTimeout(state.timer);
    const mine = ++state.generation;
    const error = document.getElementById("error");
    const problems = [];
    const results = await Promise.all(sources.map((s) => refreshSource(s).catch((e) => {
      problems.push(e.status === 404 ? `no run named “${s.name}”` : `${s.name}: ${e.message}`);
      return false;
    })));
    suggest().catch(() => {});
    if (mine !== state.generation) return;
    if (results.some(Boolean) || !page.loaded) redraw();
    showError(error, problems.length ? `Could not load ${problems.join("; ")}. Retrying…` : "");
    page.error = problems.length ? problems.join("; ") : null;
    page.loaded = true;
    page.polls += 1;
    const every = moxco.refreshMs();
    document.getElementById("live").textContent = every ? `live · every ${every / 1000} s` : "";
    if (every) state.timer = setTimeout(poll, every);
  }

  document.addEventListener("DOMContentLoaded", async () => {
    document.getElementById("toolbar").prepend(controls(view));
    view.onZoom = (zoom) => { document.getElementById("reset-zoom").hidden = zoom === null; };
    document.getElementById("reset-zoom").addEventListener("click", () => view.setZoom(null));
    const form = document.getElementById("add-form");
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      addRun(form.elements.run.value);
      form.elements.run.value = "";
    });
    state.cat = await loadCatalogue();
    if (!state.cat) return;
    state.metrics = panelMetrics(state.cat);
    for (const name of names().slice(0, MAX_RUNS)) sources.push(new Source(name, colorFor()));
    state.layout = build(state.cat, document.getElementById("panels"), view, chartOptions);
    renderChips();
    poll();
  });
})();
