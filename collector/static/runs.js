/* moxco pages: the runs list (served at /).
 *
 * GET /api/v1/runs (newest first, 50 a page), filtered by status and a search box whose words are
 * read as: `tag:NAME` (runs with that tag), `status:NAME`, `KEY=VALUE` (a value in the run's config
 * at a dotted path: optimizer=SGD, hyperparameters.lr=0.1, policy.threshold=0.85), and anything
 * else as the run's name (contained, or a glob: gpt2-*). For each run shown, GET …/latest for its
 * phase and goodness (only again when the run was updated). Each row shows the key
 * hyper-parameters (optimizer, lr, α, β, the policy's C), the tags and the note.
 *
 * Select runs (the check boxes) to compare them (/compare?run=…); delete a run from its row (an
 * admin token, and the run's name typed again to confirm). Refreshed every few seconds; the
 * filters live in the URL so a view can be shared.
 */
"use strict";

(() => {
  const { h, api, apiWrite, fmt, fmtInt, agoEl, phaseText, statusBadge, thresholdC, runHref, compareHref, hyper,
          showError } = moxco;
  const PAGE = 50;
  const MAX_COMPARE = 8;
  const latestCache = new Map(); // run name -> {updated_at, latest}
  const selected = new Set();

  const hook = (window.moxcoRuns = { loaded: false, polls: 0, runs: [], query: {} });

  let timer = null;
  let generation = 0; // a newer load supersedes an older one still in flight

  function params() {
    const q = new URLSearchParams(location.search);
    return { q: q.get("q") || q.get("name") || "", status: q.get("status") || "", page: Math.max(0, Number(q.get("page")) || 0) };
  }

  function setParams(p) {
    const q = new URLSearchParams(location.search);
    q.delete("name");
    for (const [k, v] of Object.entries(p)) {
      if (v === "" || v === 0 || v === null) q.delete(k); else q.set(k, String(v));
    }
    const search = q.toString();
    history.replaceState(null, "", search ? `?${search}` : location.pathname);
  }

  /** The search box's words (quotes group words) as the API's filters. */
  function parseSearch(text, status) {
    const words = (text.match(/(?:[^\s"]+|"[^"]*")+/g) || []).map((w) => w.replace(/"/g, ""));
    const out = { name: [], tag: [], config: [], status };
    for (const word of words) {
      const lower = word.toLowerCase();
      if (lower.startsWith("tag:") && word.length > 4) out.tag.push(word.slice(4));
      else if (lower.startsWith("status:") && word.length > 7) out.status = word.slice(7);
      else if (/^[^=\s]+=.+$/.test(word)) out.config.push(word);
      else out.name.push(word);
    }
    const name = out.name.join(" ");
    return { name: name ? (/[*?[]/.test(name) ? name : `*${name}*`) : "", tag: out.tag, config: out.config,
             status: out.status };
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

  function hpCell(value, key, title) {
    return h("td", { class: "hp num", dataset: { hp: key }, title, text: value === null || value === undefined ? "–" : fmt(value, 3) });
  }

  function row(run) {
    const cached = latestCache.get(run.name);
    const latest = cached ? cached.latest : null;
    const phasePoint = latest && latest.metrics && latest.metrics.phase;
    const hp = hyper(run);
    const check = h("input", { type: "checkbox", "aria-label": `select ${run.name}`, checked: selected.has(run.name) });
    check.addEventListener("change", () => {
      if (check.checked) selected.add(run.name); else selected.delete(run.name);
      renderSelection();
    });
    return h("tr", { dataset: { run: run.name } },
      h("td", { class: "check" }, check),
      h("td", { class: "name" }, h("a", { href: runHref(run.name), text: run.name })),
      h("td", {}, statusBadge(run)),
      h("td", { class: "num step", text: fmtInt(run.last_step) }),
      h("td", { class: "hp", dataset: { hp: "optimizer" }, text: hp.optimizer || "–" }),
      hpCell(hp.lr, "lr", "learning rate"), hpCell(hp.alpha, "alpha", "MoXCo inertia α"),
      hpCell(hp.beta, "beta", "MoXCo gradient extrapolation β"), hpCell(hp.C, "C", "the decision policy's threshold C"),
      h("td", { class: "phase", text: phasePoint ? phaseText(moxco.num(phasePoint.value)) : "–" }),
      goodnessCell(run, latest),
      h("td", { class: "labels-cell" },
        h("span", { class: "tags" }, ...(run.tags || []).map((t) => h("span", { class: "tag", text: t }))),
        run.note ? h("span", { class: "note-text", title: run.note, text: run.note }) : null),
      h("td", {}, agoEl(run.last_ingest_at)),
      h("td", { class: "actions" }, h("button", { type: "button", class: "link danger", text: "delete",
        "aria-label": `delete ${run.name}`, onclick: () => confirmDelete(run) })));
  }

  function renderSelection() {
    const names = [...selected];
    const link = document.getElementById("compare");
    link.href = compareHref(names.slice(0, MAX_COMPARE));
    link.setAttribute("aria-disabled", names.length < 1 ? "true" : "false");
    link.textContent = names.length ? `Compare ${names.length} run${names.length > 1 ? "s" : ""}` : "Compare";
    document.getElementById("clear-selection").hidden = !names.length;
    hook.selected = names;
  }

  /** Delete after the run's name is typed again; the API asks for an admin token if needed. */
  function confirmDelete(run) {
    const input = h("input", { id: "delete-confirm-name", autocomplete: "off", spellcheck: "false",
      "aria-label": "the run's name, to confirm" });
    const go = h("button", { type: "submit", class: "danger-button", id: "delete-confirm", text: "Delete", disabled: true });
    const status = h("p", { class: "muted", id: "delete-status" });
    const dialog = h("dialog", { class: "confirm-dialog", id: "delete-dialog" },
      h("form", { method: "dialog" },
        h("h2", {}, "Delete run ", h("code", { text: run.name }), "?"),
        h("p", { text: `Every point (last step ${fmtInt(run.last_step)}), decision and setting of this run is deleted ` +
          "from the store. This cannot be undone. Type the run's name to confirm:" }),
        input, status,
        h("div", { class: "dialog-actions" },
          h("button", { type: "button", id: "delete-cancel", text: "Cancel", onclick: () => dialog.close() }), go)));
    input.addEventListener("input", () => { go.disabled = input.value !== run.name; });
    dialog.addEventListener("close", () => dialog.remove());
    go.addEventListener("click", async (e) => {
      e.preventDefault();
      if (input.value !== run.name) return;
      go.disabled = true;
      status.textContent = "deleting…";
      try {
        const done = await apiWrite("DELETE", `runs/${encodeURIComponent(run.name)}`, undefined, "admin", "Deleting a run");
        selected.delete(run.name);
        latestCache.delete(run.name);
        hook.deleted = done;
        dialog.close();
        load();
      } catch (err) {
        status.textContent = `Not deleted: ${err.message}`;
        go.disabled = false;
      }
    });
    document.body.append(dialog);
    dialog.showModal();
    input.focus();
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
    const query = parseSearch(p.q, p.status);
    const error = document.getElementById("error");
    try {
      const page = await api("runs", { limit: PAGE, offset: p.page * PAGE, name: query.name, status: query.status,
                                       tag: query.tag, config: query.config });
      await fetchLatest(page.runs);
      if (mine !== generation) return;
      render(page, p);
      showError(error, "");
      hook.runs = page.runs;
      hook.total = page.total;
      hook.query = query;
      hook.loaded = true;
      hook.polls += 1;
      document.getElementById("live").textContent = moxco.refreshMs() ? "live" : "";
    } catch (e) {
      if (mine !== generation) return;
      showError(error, e.status === 422 ? `This search cannot be run: ${e.message}` : `Could not load runs: ${e.message}. Retrying…`);
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
    empty.textContent = p.q || p.status ? "No runs match these filters." :
      "No runs yet. Attach an agent (moxco.agent.attach(model, optimizer, url=…)) and its run appears here.";
    document.getElementById("prev").disabled = p.page === 0;
    document.getElementById("next").disabled = last >= page.total;
    document.getElementById("pager").hidden = page.total <= PAGE;
    renderSelection();
  }

  document.addEventListener("DOMContentLoaded", () => {
    const p = params();
    const search = document.getElementById("f-search");
    const status = document.getElementById("f-status");
    search.value = p.q;
    status.value = p.status;
    let debounce = null;
    search.addEventListener("input", () => {
      clearTimeout(debounce);
      debounce = setTimeout(() => { setParams({ q: search.value.trim(), page: 0 }); load(); }, 250);
    });
    status.addEventListener("change", () => { setParams({ status: status.value, page: 0 }); load(); });
    document.getElementById("filters").addEventListener("submit", (e) => {
      e.preventDefault();
      setParams({ q: search.value.trim(), page: 0 });
      load();
    });
    document.getElementById("clear-selection").addEventListener("click", () => {
      selected.clear();
      for (const box of document.querySelectorAll("#runs td.check input")) box.checked = false;
      renderSelection();
    });
    document.getElementById("prev").addEventListener("click", () => { setParams({ page: Math.max(0, params().page - 1) }); load(); });
    document.getElementById("next").addEventListener("click", () => { setParams({ page: params().page + 1 }); load(); });
    document.addEventListener("visibilitychange", () => { if (!document.hidden) load(); });
    renderSelection();
    load();
  });
})();
