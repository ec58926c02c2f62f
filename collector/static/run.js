/* moxco pages: one run (served at /runs/{run}).
 *
 * The panels are the metric catalogue's (GET /api/v1/catalogue, drawn by charts.js), the same ones
 * Grafana's live-run dashboard draws, then "Your metrics": a chart per series the run logs with
 * agent.log (added as they appear). Data comes from the query API: the run (status, last step,
 * metric names, config, tags, note), each metric's series (downsampled by the collector to
 * MAX_POINTS with minmax, so extremes survive), /latest for the tiles, /decisions.
 *
 * Live: every few seconds the page re-reads the run; when its last_ingest_at moved, it asks each
 * series only for the steps after the last one it holds and appends them (no reload, zoom kept).
 * A run that is not running says so instead of "live".
 *
 * The agent's failures (config.errors: {failed part: message}) are a banner at the top, and a
 * panel with no points says why: the failed part that dropped its metrics, or what a run needs for
 * them (the catalogue's `requires`: a reference point, reeval_every > 0, …).
 *
 * Test hooks: window.moxcoPage (load state) and window.moxcoCharts[id] (charts.js).
 */
"use strict";

(() => {
  const { h, api, apiWrite, download, num, fmt, fmtInt, dateTime, agoEl, phaseText, statusBadge, thresholdC,
          actionText, runErrors, showError } = moxco;
  const { Source, View, build, controls, panelMetrics, droppedBy, loadCatalogue } = moxcoPlot;

  const MAX_POINTS = 2000; // per series and request; the collector downsamples beyond it
  const REFETCH_ABOVE = 3 * MAX_POINTS; // a live series grown past this is fetched again, downsampled
  const GREEN = "#16a34a";

  const name = (() => {
    const q = new URLSearchParams(location.search).get("name");
    if (q !== null) return q;
    const segment = location.pathname.replace(/^.*\/runs\//, "");
    try { return decodeURIComponent(segment); } catch (e) { return segment; }
  })();
  const runPath = `runs/${encodeURIComponent(name)}`;

  const source = new Source(name, null);
  const view = new View();
  const state = { cat: null, metrics: [], layout: null, latest: null, lastIngest: undefined, paused: false, timer: null,
                  configKey: "", decisionsKey: "", labelsKey: "", errorsKey: "" };
  const page = (window.moxcoPage = { run: name, loaded: false, polls: 0, error: null, decisions: [], errors: {} });

  // --- what the charts draw for this run ------------------------------------------------------------

  const chartOptions = {
    syncKey: "moxco-run",
    lines: (panel) => panel.series.map((s, i) => ({
      source, metric: s.metric, label: s.label, color: s.color || moxcoPlot.PALETTE[i % 3], dash: s.dash,
    })),
    refs: (panel) => {
      if (!panel.threshold || !source.detail) return [];
      const c = thresholdC(source.detail);
      return c === null ? [] : [{ value: c, label: `C = ${fmt(c)}`, color: GREEN }];
    },
    emptyText: (panel) => emptyReason(panel),
  };

  /** Why a panel has no points: the agent part whose failure dropped them, else what the run
   *  needs for them (the catalogue's requires), else that none have arrived yet. */
  function emptyReason(panel) {
    const metrics = panel.series.map((s) => s.metric);
    const errors = runErrors(source.detail);
    for (const [part, message] of Object.entries(errors)) {
      if (droppedBy(state.cat, part).some((m) => metrics.includes(m))) return `no points: the agent's ${part} failed (${message})`;
    }
    const anything = source.detail && (source.detail.metrics || []).length > 0;
    if (anything && panel.requires && panel.requires.length) return `no points: ${panel.requires.join("; ")}`;
    return anything ? "no points for these metrics" : "no points yet";
  }

  function decisionMarkers() {
    const c = source.detail ? thresholdC(source.detail) : null;
    return source.decisions.map((d) => ({ source, step: d.step, tip: () => {
      const g = num(d.goodness);
      const goodness = d.goodness === null ? "not measured" :
        fmt(g) + (c === null || !Number.isFinite(g) ? "" : g >= c ? ` (≥ C = ${fmt(c)})` : ` (< C = ${fmt(c)})`);
      return [
        h("strong", { text: `Decision at step ${fmtInt(d.step)}` }), h("span", { class: "muted", text: ` (${d.source})` }),
        h("div", { text: `goodness ${goodness}` }),
        d.goodness === null ? null : h("div", { class: "muted",
          text: `terms: ĝ² ${fmt(num(d.grad_term))} · sharpness ${fmt(num(d.sharpness_term))} · loss ${fmt(num(d.loss_term))}` }),
        h("div", { text: `action: ${actionText(d.action)}` }),
        h("div", { text: d.applied_step === null ? "not applied yet" : `applied at step ${fmtInt(d.applied_step)}` }),
        d.reason ? h("div", { class: "muted", text: d.reason }) : null,
      ].filter(Boolean);
    } }));
  }

  // --- the rest of the page ------------------------------------------------------------------------

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
    const d = source.detail;
    const c = thresholdC(d);
    const goodness = latestValue("goodness");
    const sharpness = latestValue("sharpness"), target = latestValue("sharpness_target");
    const ratio = sharpness !== undefined && target !== undefined ? sharpness / target : undefined;
    const applied = source.decisions.filter((x) => x.applied_step !== null).length;
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
      tile("Decisions", fmtInt(source.decisions.length),
        source.decisions.length ? `${applied} applied, ${source.decisions.length - applied} pending` : ""),
      tile("Last data", agoEl(d.last_ingest_at), d.last_ingest_at ? dateTime(d.last_ingest_at) : "",
        d.status === "running" && silent !== null ? (silent > 600 ? "bad" : silent > 120 ? "warn" : "") : ""));
  }

  /** The agent's failures, and a failed or interrupted run, as a banner above everything. */
  function renderErrors() {
    const d = source.detail;
    const errors = runErrors(d);
    const key = JSON.stringify([d.status, errors]);
    if (key === state.errorsKey) return;
    state.errorsKey = key;
    page.errors = errors;
    const banner = document.getElementById("run-errors");
    const parts = Object.entries(errors);
    const status = d.status === "failed" ? "The run failed." : d.status === "interrupted" ?
      "The run was interrupted: no data for a while (it resumes as running when points arrive)." : "";
    banner.hidden = !parts.length && !status;
    banner.replaceChildren(
      status ? h("strong", { text: status + " " }) : null,
      parts.length ? h("span", { text: `The agent recorded ${parts.length} failure${parts.length > 1 ? "s" : ""} ` +
        "(training went on; the metrics they feed are missing):" }) : null,
      parts.length ? h("ul", {}, ...parts.map(([part, message]) => {
        const dropped = droppedBy(state.cat, part);
        return h("li", { dataset: { part } }, h("code", { text: part }), `: ${message}`,
          dropped.length ? h("span", { class: "muted", text: ` — drops ${dropped.join(", ")}` }) : null);
      })) : null);
  }

  function renderLabels() {
    const d = source.detail;
    const key = JSON.stringify([d.tags, d.note]);
    if (key === state.labelsKey) return;
    state.labelsKey = key;
    document.getElementById("run-tags").replaceChildren(...(d.tags || []).map((t) => h("span", { class: "tag", text: t })));
    document.getElementById("run-note").textContent = d.note || "";
    document.getElementById("run-note").hidden = !d.note;
  }

  function renderDecisions() {
    const key = JSON.stringify(source.decisions);
    if (key === state.decisionsKey) return;
    state.decisionsKey = key;
    const table = document.getElementById("decisions");
    table.hidden = source.decisions.length === 0;
    document.getElementById("decisions-empty").hidden = source.decisions.length > 0;
    table.querySelector("tbody").replaceChildren(...source.decisions.map((d) => h("tr", { dataset: { decision: d.id } },
      h("td", { class: "num", text: fmtInt(d.step) }),
      h("td", { text: d.source }),
      h("td", { class: "num", text: d.goodness === null ? "–" : fmt(num(d.goodness)) }),
      h("td", { class: "num", text: d.grad_term === null ? "–" : fmt(num(d.grad_term)) }),
      h("td", { class: "num", text: d.sharpness_term === null ? "–" : fmt(num(d.sharpness_term)) }),
      h("td", { class: "num", text: d.loss_term === null ? "–" : fmt(num(d.loss_term)) }),
      h("td", { text: actionText(d.action) }),
      h("td", { text: d.applied_step === null ? (d.rejected ? `rejected: ${d.rejected}` : "pending") : `step ${fmtInt(d.applied_step)}` }),
      h("td", { title: dateTime(d.created_at), text: dateTime(d.created_at) }),
      h("td", { class: "muted", text: d.reason || "" }))));
    const markers = decisionMarkers();
    for (const chart of view.charts) chart.setMarkers(markers);
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
    const d = source.detail;
    const parts = { config: d.config, optimizer: d.optimizer, policy: d.policy };
    const key = JSON.stringify(parts);
    if (key === state.configKey) return;
    state.configKey = key;
    const blocks = Object.entries(parts).filter(([, v]) => v !== null && v !== undefined).map(([label, v]) =>
      h("div", { class: "config-block" }, h("h3", { text: label }),
        h("pre", { class: "json", dataset: { config: label } }, ...jsonTree(v))));
    document.getElementById("config").replaceChildren(...blocks);
  }

  function renderLive() {
    const every = moxco.refreshMs();
    const at = dateTime(Date.now() / 1000).slice(11);
    const status = source.detail.status;
    let text;
    if (state.paused) text = `paused · updated ${at}`;
    else if (status !== "running") text = `${status} · checked ${at}`;
    else if (!every) text = `updated ${at}`;
    else text = `live · every ${every / 1000} s · updated ${at}`;
    document.getElementById("live").textContent = text;
  }

  // --- loading ------------------------------------------------------------------------------------

  async function refresh() {
    const detail = await api(runPath);
    const present = new Set(detail.metrics || []);
    const moved = detail.last_ingest_at !== state.lastIngest;
    if (state.layout.setUser(present).length) state.decisionsKey = ""; // new charts get the decision markers
    const jobs = [];
    for (const metric of state.metrics.concat(state.layout.user)) {
      if (!present.has(metric)) continue;
      const held = source.data[metric];
      if (!held) jobs.push([metric, true]);
      else if (moved) jobs.push([metric, held.steps.length > REFETCH_ABOVE]);
    }
    const [decisions, latest, changed] = await Promise.all([
      api(`${runPath}/decisions`),
      moved || !state.latest ? api(`${runPath}/latest`) : Promise.resolve(state.latest),
      Promise.all(jobs.map(([metric, full]) => source.fetch(metric, full, MAX_POINTS).then((c) => (c ? metric : null)))),
    ]);
    const first = !source.detail;
    const thresholdChanged = first || thresholdC(source.detail) !== thresholdC(detail);
    const errorsChanged = first || JSON.stringify(runErrors(source.detail)) !== JSON.stringify(runErrors(detail));
    source.detail = detail;
    state.latest = latest;
    source.decisions = decisions.decisions;
    state.lastIngest = detail.last_ingest_at;
    document.title = `${name} · moxco`;
    document.getElementById("run-status").replaceChildren(statusBadge(detail));
    renderErrors();
    renderLabels();
    renderTiles();
    renderDecisions();
    renderConfig();
    const updated = new Set(changed.filter(Boolean));
    for (const chart of view.charts) {
      if (thresholdChanged || errorsChanged || chart.lines.some((l) => updated.has(l.metric))) chart.align();
    }
    view.extent = view.computeExtent();
    for (const chart of view.charts) {
      if (thresholdChanged || errorsChanged || chart.lines.some((l) => updated.has(l.metric))) chart.draw();
      else chart.fitX(false);
    }
    page.decisions = source.decisions;
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
      renderLive();
    } catch (e) {
      page.error = e.message;
      showError(error, e.status === 404 ? `No run named “${name}” on this collector (${e.message}). Waiting for it…`
        : `Could not load the run: ${e.message}. Retrying…`);
    }
    const every = moxco.refreshMs();
    if (every && !state.paused) state.timer = setTimeout(poll, every);
  }

  // --- tags, note, downloads --------------------------------------------------------------------------

  function openLabels() {
    const d = source.detail;
    if (!d) return;
    const form = document.getElementById("labels-form");
    form.elements.tags.value = (d.tags || []).join(", ");
    form.elements.note.value = d.note || "";
    form.hidden = false;
    form.elements.tags.focus();
  }

  async function saveLabels(e) {
    e.preventDefault();
    const form = document.getElementById("labels-form");
    const tags = form.elements.tags.value.split(",").map((t) => t.trim()).filter(Boolean);
    const note = form.elements.note.value.trim();
    const status = document.getElementById("labels-status");
    try {
      source.detail = { ...source.detail, ...(await apiWrite("PATCH", runPath, { tags, note: note || null }, "ingest",
        "Changing a run's tags and note")) };
      form.hidden = true;
      status.textContent = "";
      state.labelsKey = "";
      renderLabels();
    } catch (err) {
      status.textContent = `Not saved: ${err.message}`;
    }
  }

  async function downloadRun() {
    const format = document.getElementById("download-format").value;
    const status = document.getElementById("download-status");
    status.textContent = "preparing…";
    try {
      const got = await download(`${runPath}/export`, { format }, `${name}.${format}`);
      status.textContent = `${got.name} (${fmtInt(got.size)} bytes)`;
      page.downloaded = got;
    } catch (err) {
      status.textContent = `Download failed: ${err.message}`;
    }
  }

  document.addEventListener("DOMContentLoaded", async () => {
    document.getElementById("run-name").textContent = name;
    document.title = `${name} · moxco`;
    document.getElementById("toolbar").prepend(controls(view));
    view.onZoom = (zoom) => { document.getElementById("reset-zoom").hidden = zoom === null; };
    const pause = document.getElementById("pause");
    pause.hidden = !moxco.refreshMs();
    pause.addEventListener("click", () => {
      state.paused = !state.paused;
      pause.textContent = state.paused ? "resume" : "pause";
      if (state.paused) { clearTimeout(state.timer); renderLive(); } else poll();
    });
    document.getElementById("reset-zoom").addEventListener("click", () => view.setZoom(null));
    document.getElementById("edit-labels").addEventListener("click", openLabels);
    document.getElementById("labels-form").addEventListener("submit", saveLabels);
    document.getElementById("labels-cancel").addEventListener("click", () => { document.getElementById("labels-form").hidden = true; });
    document.getElementById("download").addEventListener("click", downloadRun);
    document.getElementById("compare-link").href = `../${moxco.compareHref([name])}`;
    state.cat = await loadCatalogue();
    if (!state.cat) return;
    state.metrics = panelMetrics(state.cat);
    state.layout = build(state.cat, document.getElementById("panels"), view, chartOptions);
    poll();
  });
})();
