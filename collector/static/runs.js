/* moxco pages: the runs list (served at /).
 *
 * GET /api/v1/runs (filtered by status and name glob, newest first, 50 a page) and, for each run
 * shown, GET /api/v1/runs/{run}/latest for its phase and goodness (only again when the run was
 * updated). Refreshed every few seconds; the filters live in the URL so a view can be shared.
 */
"use strict";

(() => {
  const { h, api, fmt, fmtInt, agoEl, phaseText, statusBadge, thresholdC, runHref, showError } = moxco;
  const PAGE = 50;
  const latestCache = new Map(); // run name -> {updated_at, latest}

  const hook = (window.moxcoRuns = { loaded: false, polls: 0, runs: [] });

  let timer = null;
  let generation = 0; // a newer load supersedes an older one still in flight

  function params() {
    const q = new URLSearchParams(location.search);
    return { name: q.get("name") || "", status: q.get("status") || "", page: Math.max(0, Number(q.get("page")) || 0) };
  }

  function setParams(p) {
    const q = new URLSearchParams(location.search);
    for (const [k, v] of Object.entries(p)) {
      if (v === "" || v === 0 || v === null) q.delete(k); else q.set(k, String(v));
    }
    const search = q.toString();
    history.replaceState(null, "", search ? `?${search}` : location.pathname);
  }

  /** The API's name filter is a glob; plain text means "contains". */
  function glob(text) {
    return /[*?[]/.test(text) ? text : `*${text}*`;
  }

  function goodnessCell(run, latest) {
    const td = h("td", { class: "num" });
    const point = latest && latest.metrics && latest.metrics.goodness;
    if (!point) { td.textContent = "–"; return td; }
    const value = moxco.num(point.value);
    const c = thresholdC(run);
    td.textContent = fmt(value, 3);
    td.title = `step ${fmtInt(point.step)}` + (c === null ? "; no decision policy" : `; threshold C = ${fmt(c)}`);
    if (c !== null && Number.isFinite(value)) td.classList.add(value >= c ? "good" : "below");
    return td;
  }

  function row(run) {
    const cached = latestCache.get(run.name);
    const latest = cached ? cached.latest : null;
    const phasePoint = latest && latest.metrics && latest.metrics.phase;
    return h("tr", { dataset: { run: run.name } },
      h("td", { class: "name" }, h("a", { href: runHref(run.name), text: run.name })),
      h("td", {}, statusBadge(run)),
      h("td", { class: "num step", text: fmtInt(run.last_step) }),
      h("td", { class: "phase", text: phasePoint ? phaseText(moxco.num(phasePoint.value)) : "–" }),
      goodnessCell(run, latest),
      h("td", {}, agoEl(run.last_ingest_at)),
      h("td", {}, agoEl(run.updated_at)));
  }

  async function fetchLatest(runs) {
    const todo = runs.filter((r) => {
      const cached = latestCache.get(r.name);
      return !cached || cached.updated_at !== r.updated_at;
    });
    await Promise.all(todo.map(async (r) => {
      try {
        const latest = await api(`runs/${encodeURIComponent(r.name)}/latest`);
        latestCache.set(r.name, { updated_at: r.updated_at, latest });
      } catch (e) {
        if (e.status !== 404) throw e; // deleted meanwhile: show it without latest values
      }
    }));
  }

  async function load() {
    const mine = ++generation;
    clearTimeout(timer);
    const p = params();
    const error = document.getElementById("error");
    try {
      const page = await api("runs", {
        name: p.name ? glob(p.name) : "", status: p.status, limit: PAGE, offset: p.page * PAGE,
      });
      await fetchLatest(page.runs);
      if (mine !== generation) return;
      render(page, p);
      showError(error, "");
      hook.runs = page.runs;
      hook.total = page.total;
      hook.loaded = true;
      hook.polls += 1;
      document.getElementById("live").textContent = moxco.refreshMs() ? "live" : "";
    } catch (e) {
      if (mine !== generation) return;
      showError(error, `Could not load runs: ${e.message}. Retrying…`);
    }
    const every = moxco.refreshMs();
    if (every && mine === generation) timer = setTimeout(load, every);
  }

  function render(page, p) {
    const tbody = document.querySelector("#runs tbody");
    tbody.replaceChildren(...page.runs.map(row));
    const first = page.total ? p.page * PAGE + 1 : 0;
    const last = p.page * PAGE + page.runs.length;
    document.getElementById("count").textContent =
      page.total <= PAGE ? (page.total ? `${fmtInt(page.total)} run${page.total === 1 ? "" : "s"}` : "")
        : `${fmtInt(first)}–${fmtInt(last)} of ${fmtInt(page.total)} runs`;
    const empty = document.getElementById("empty");
    empty.hidden = page.total > 0;
    empty.textContent = p.name || p.status ? "No runs match these filters." :
      "No runs yet. Attach an agent (moxco.agent.attach(model, optimizer, url=…)) and its run appears here.";
    document.getElementById("prev").disabled = p.page === 0;
    document.getElementById("next").disabled = last >= page.total;
    document.getElementById("pager").hidden = page.total <= PAGE;
  }

  document.addEventListener("DOMContentLoaded", () => {
    const p = params();
    const name = document.getElementById("f-name");
    const status = document.getElementById("f-status");
    name.value = p.name;
    status.value = p.status;
    let debounce = null;
    name.addEventListener("input", () => {
      clearTimeout(debounce);
      debounce = setTimeout(() => { setParams({ name: name.value.trim(), page: 0 }); load(); }, 250);
    });
    status.addEventListener("change", () => { setParams({ status: status.value, page: 0 }); load(); });
    document.getElementById("filters").addEventListener("submit", (e) => {
      e.preventDefault();
      setParams({ name: name.value.trim(), page: 0 });
      load();
    });
    document.getElementById("prev").addEventListener("click", () => { setParams({ page: Math.max(0, params().page - 1) }); load(); });
    document.getElementById("next").addEventListener("click", () => { setParams({ page: params().page + 1 }); load(); });
    document.addEventListener("visibilitychange", () => { if (!document.hidden) load(); });
    load();
  });
})();
