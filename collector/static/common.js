/* moxco pages: what the runs list and the run page share.
 *
 * - api(path, params): GET /api/v1/<path> with the tab's token; on 401/403 it asks for a token once
 *   (a dialog; kept in sessionStorage) and retries, so every caller simply awaits the data.
 * - apiWrite(method, path, body, scope, why): a change (tags and note, deleting a run) with a token
 *   of the scope it needs, asked for when the tab has none (cancellable); download(path, params):
 *   a file from the API (exports), with the token.
 * - h(tag, attrs, ...children): builds DOM with textContent only. Nothing from the API is ever
 *   parsed as HTML (run names and configs can hold markup), so there is no innerHTML here.
 * - formatting of numbers (NaN/±Inf as text), steps, times, phases, run statuses.
 */
"use strict";

const moxco = (() => {
  const TOKEN_KEY = "moxco.token";
  const WRITE_TOKEN_KEY = "moxco.token.write"; // a token that may change runs (ingest or admin)
  const STATUSES = ["running", "finished", "interrupted", "failed"];
  const SILENT_AFTER_S = 120; // a running run with no data for this long is flagged

  // The collector's root URL whatever prefix a proxy serves it under: the runs list is <root>,
  // a run <root>runs/<name>.
  const ROOT = (() => {
    const path = location.pathname;
    const m = path.match(/^(.*\/)runs\/[^/]*$/);
    return location.origin + (m ? m[1] : path.replace(/[^/]*$/, ""));
  })();

  // --- DOM ----------------------------------------------------------------------------------

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "text") el.textContent = String(value);
      else if (key === "class") el.className = value;
      else if (key === "dataset") Object.assign(el.dataset, value);
      else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
      else el.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return el;
  }

  // --- numbers and times --------------------------------------------------------------------

  /** An API value as a JS number: "NaN", "Infinity", "-Infinity" and null (read as NaN). */
  function num(v) {
    if (typeof v === "number") return v;
    if (v === "Infinity") return Infinity;
    if (v === "-Infinity") return -Infinity;
    return NaN;
  }

  /** A metric value for people: 4 significant digits, exponent form for very large/small. */
  function fmt(v, digits = 4) {
    if (v === undefined || v === null) return "–";
    if (Number.isNaN(v)) return "NaN";
    if (v === Infinity) return "+Inf";
    if (v === -Infinity) return "−Inf";
    if (v === 0) return "0";
    const a = Math.abs(v);
    if (a >= 1e5 || a < 1e-3) return v.toExponential(digits - 1).replace(/\.?0+e/, "e").replace("e+", "e");
    return String(Number(v.toPrecision(digits)));
  }

  const intFormat = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });
  function fmtInt(v) {
    return v === undefined || v === null || !Number.isFinite(v) ? "–" : intFormat.format(v);
  }

  function pad(n) { return String(n).padStart(2, "0"); }
  /** Epoch seconds as local "YYYY-MM-DD HH:MM:SS". */
  function dateTime(epoch) {
    if (epoch === null || epoch === undefined) return "–";
    const d = new Date(epoch * 1000);
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
      `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }
  /** "12 s ago", "3 min ago", "5 h ago", "2 d ago". */
  function ago(epoch) {
    if (epoch === null || epoch === undefined) return "never";
    const s = Math.max(0, Date.now() / 1000 - epoch);
    if (s < 60) return `${Math.floor(s)} s ago`;
    if (s < 3600) return `${Math.floor(s / 60)} min ago`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
    return `${Math.floor(s / 86400)} d ago`;
  }
  /** An element showing "… ago" that stays current (see tickAgo). */
  function agoEl(epoch, tag = "span") {
    const el = h(tag, { class: "ago", title: dateTime(epoch), text: ago(epoch) });
    if (epoch !== null && epoch !== undefined) el.dataset.epoch = String(epoch);
    return el;
  }
  setInterval(() => {
    for (const el of document.querySelectorAll(".ago[data-epoch]")) el.textContent = ago(Number(el.dataset.epoch));
  }, 1000);

  function phaseText(phase) {
    if (phase === 1) return "1 · explore";
    if (phase === 2) return "2 · commit";
    return phase === null || phase === undefined || Number.isNaN(phase) ? "–" : fmt(phase);
  }

  /** A run's status badge; a running run that has sent nothing for a while says so. */
  function statusBadge(run) {
    const status = STATUSES.includes(run.status) ? run.status : "unknown";
    const badge = h("span", { class: `badge status-${status}`, text: run.status });
    const last = run.last_ingest_at ?? run.updated_at;
    if (status === "running" && last && Date.now() / 1000 - last > SILENT_AFTER_S) {
      return h("span", { class: "status" }, badge,
        h("span", { class: "silent", title: `no data since ${dateTime(last)}`, text: `silent ${ago(last).replace(" ago", "")}` }));
    }
    return badge;
  }

  /** The goodness threshold C of a run's decision policy (collector-side policy, else the
   *  embedded agent's, recorded in the config), or null when the run has none. */
  function thresholdC(run) {
    const policy = run.policy || (run.config && run.config.policy);
    return policy && typeof policy.threshold === "number" ? policy.threshold : null;
  }

  /** A decision's action as text: "phase 2 · α 0.1 · β 0.1 · lr 0.01". */
  function actionText(action) {
    if (!action || typeof action !== "object") return String(action);
    const names = { alpha: "α", beta: "β" };
    return Object.entries(action).map(([k, v]) =>
      `${names[k] || k} ${typeof v === "number" ? fmt(v) : JSON.stringify(v)}`).join(" · ");
  }

  // --- API and token ------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  function token() {
    try { return sessionStorage.getItem(TOKEN_KEY); } catch (e) { return null; }
  }

  async function readError(resp) {
    try {
      const body = await resp.json();
      if (body && body.error) return body.error;
    } catch (e) { /* not our JSON */ }
    return { code: "http_error", message: `${resp.status} ${resp.statusText}` };
  }

  function writeToken() {
    try { return sessionStorage.getItem(WRITE_TOKEN_KEY); } catch (e) { return null; }
  }

  let pendingAsk = null; // one dialog for every request that needs a token

  /** Ask for a token (a modal dialog) and keep it under `key`. The read token's dialog cannot be
   *  dismissed (the page shows nothing without it); a write's can (resolves false). */
  function askToken(message, { key = TOKEN_KEY, scope = "read", cancellable = false } = {}) {
    if (pendingAsk) return pendingAsk;
    pendingAsk = new Promise((resolve) => {
      const input = h("input", { id: "token-input", type: "password", autocomplete: "off", spellcheck: "false",
        placeholder: "token secret", "aria-label": "API token" });
      let cancelled = false;
      const cancel = cancellable ? h("button", { type: "button", id: "token-cancel", class: "secondary", text: "Cancel",
        onclick: () => { cancelled = true; dialog.close(); } }) : null;
      const dialog = h("dialog", { id: "token-dialog", class: "token-dialog" },
        h("form", { method: "dialog" },
          h("h2", { text: "API token" }),
          h("p", { id: "token-message", text: message }),
          h("p", { class: "muted" }, "Create one with ", h("code", { text: `moxco token create --name NAME --scope ${scope}` }),
            ". It is kept in this tab only (sessionStorage) and sent as a Bearer token to this collector's API."),
          input,
          h("div", { class: "actions" }, cancel, h("button", { type: "submit", id: "token-submit", text: "Use token" }))));
      dialog.addEventListener("cancel", (e) => { if (cancellable) cancelled = true; else e.preventDefault(); });
      dialog.addEventListener("close", () => {
        const value = input.value.trim();
        if (!cancelled && !value) { dialog.showModal(); return; }
        if (!cancelled) { try { sessionStorage.setItem(key, value); } catch (e) { /* storage disabled */ } }
        dialog.remove();
        pendingAsk = null;
        updateTokenButton();
        resolve(!cancelled);
      });
      document.body.append(dialog);
      dialog.showModal();
      input.focus();
    });
    return pendingAsk;
  }

  function forgetToken() {
    try { sessionStorage.removeItem(TOKEN_KEY); sessionStorage.removeItem(WRITE_TOKEN_KEY); } catch (e) { /* storage disabled */ }
    location.reload();
  }

  function updateTokenButton() {
    const button = document.getElementById("forget-token");
    if (button) button.hidden = !token() && !writeToken();
  }
  document.addEventListener("DOMContentLoaded", () => {
    const button = document.getElementById("forget-token");
    if (button) button.addEventListener("click", forgetToken);
    updateTokenButton();
  });

  /** GET <root>api/v1/<path>?params: the parsed JSON, or an ApiError (network errors: status 0). */
  async function api(path, params) {
    const url = new URL("api/v1/" + path, ROOT);
    for (const [k, v] of Object.entries(params || {})) {
      if (Array.isArray(v)) for (const item of v) url.searchParams.append(k, String(item)); // repeated parameters
      else if (v !== undefined && v !== null && v !== "") url.searchParams.set(k, String(v));
    }
    for (;;) {
      const headers = { Accept: "application/json" };
      const secret = token();
      if (secret) headers.Authorization = `Bearer ${secret}`;
      let resp;
      try {
        resp = await fetch(url, { headers, cache: "no-store" });
      } catch (e) {
        throw new ApiError(0, "network", `cannot reach the collector (${e.message})`);
      }
      if (resp.status === 401 || resp.status === 403) {
        const err = await readError(resp);
        let message;
        if (resp.status === 403) message = `This token may not read runs: ${err.message}. Paste a token with the read scope.`;
        else if (secret) message = `The collector refused the token: ${err.message}`;
        else message = "This collector requires an API token with the read scope.";
        if (secret) { try { sessionStorage.removeItem(TOKEN_KEY); } catch (e) { /* storage disabled */ } }
        await askToken(message);
        continue;
      }
      if (!resp.ok) {
        const err = await readError(resp);
        throw new ApiError(resp.status, err.code, err.message);
      }
      return resp.json();
    }
  }

  /** A change through the API (PATCH, DELETE, …) needing `scope`: the write token of this tab is
   *  tried first, then the read token; on 401/403 the page asks once for a token with `scope` (the
   *  user may cancel: an ApiError 403). Returns the parsed JSON answer. */
  async function apiWrite(method, path, body, scope, why) {
    const url = new URL("api/v1/" + path, ROOT);
    for (;;) {
      const headers = { Accept: "application/json" };
      if (body !== undefined) headers["Content-Type"] = "application/json";
      const secret = writeToken() || token();
      if (secret) headers.Authorization = `Bearer ${secret}`;
      let resp;
      try {
        resp = await fetch(url, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), cache: "no-store" });
      } catch (e) {
        throw new ApiError(0, "network", `cannot reach the collector (${e.message})`);
      }
      if (resp.status === 401 || resp.status === 403) {
        const err = await readError(resp);
        if (writeToken()) { try { sessionStorage.removeItem(WRITE_TOKEN_KEY); } catch (e) { /* storage disabled */ } }
        const given = await askToken(`${why} needs a token with the ${scope} scope (${err.message}).`,
          { key: WRITE_TOKEN_KEY, scope, cancellable: true });
        if (!given) throw new ApiError(resp.status, err.code, err.message);
        continue;
      }
      if (!resp.ok) {
        const err = await readError(resp);
        throw new ApiError(resp.status, err.code, err.message);
      }
      return resp.json();
    }
  }

  /** Download GET <root>api/v1/<path>?params as a file (the page's token is sent, so a plain link
   *  cannot do it): fetched, then saved under the name the collector gives. */
  async function download(path, params, fallback) {
    const url = new URL("api/v1/" + path, ROOT);
    for (const [k, v] of Object.entries(params || {})) url.searchParams.set(k, String(v));
    for (;;) {
      const headers = {};
      const secret = token();
      if (secret) headers.Authorization = `Bearer ${secret}`;
      const resp = await fetch(url, { headers, cache: "no-store" });
      if (resp.status === 401 || resp.status === 403) {
        const err = await readError(resp);
        await askToken(`Downloading needs a token with the read scope: ${err.message}`);
        continue;
      }
      if (!resp.ok) {
        const err = await readError(resp);
        throw new ApiError(resp.status, err.code, err.message);
      }
      const disposition = resp.headers.get("Content-Disposition") || "";
      const exact = disposition.match(/filename\*=UTF-8''([^;]+)/);
      const name = exact ? decodeURIComponent(exact[1]) : fallback;
      const blob = await resp.blob();
      const link = h("a", { href: URL.createObjectURL(blob), download: name, hidden: true });
      document.body.append(link);
      link.click();
      setTimeout(() => { URL.revokeObjectURL(link.href); link.remove(); }, 60_000);
      return { name, size: blob.size };
    }
  }

  /** A run's key hyper-parameters: optimizer class, lr, α, β (from the run list's summary, the
   *  registered optimizer, or the config's hyperparameters) and the policy's threshold C. */
  function hyper(run) {
    const hp = run.hyperparameters || run.optimizer || (run.config && run.config.hyperparameters) || {};
    const cls = hp.class || (run.config && typeof run.config.optimizer === "string" ? run.config.optimizer : null);
    const value = (k) => (typeof hp[k] === "number" ? hp[k] : null);
    return { optimizer: cls, lr: value("lr"), alpha: value("alpha"), beta: value("beta"), C: thresholdC(run) };
  }

  /** The agent's stored failures: config.errors, {failed part: message}. */
  function runErrors(run) {
    const errors = run && run.config && run.config.errors;
    return errors && typeof errors === "object" && !Array.isArray(errors) ? errors : {};
  }

  /** The path of a run's page relative to the root (".", ".." cannot be path segments). */
  function runHref(name) {
    return name === "." || name === ".." ? `runs/?name=${encodeURIComponent(name)}` : `runs/${encodeURIComponent(name)}`;
  }

  function showError(el, message) {
    if (!el) return;
    el.hidden = !message;
    el.textContent = message || "";
  }

  /** ?refresh=SECONDS (default 5; 0 turns live updates off). */
  function refreshMs() {
    const value = new URLSearchParams(location.search).get("refresh");
    const s = value === null ? 5 : Number(value);
    if (!Number.isFinite(s) || s < 0) return 5000;
    return s === 0 ? 0 : Math.max(s, 0.5) * 1000;
  }

  /** The path of the compare page for `runs`, relative to the root. */
  function compareHref(runs) {
    return "compare?" + runs.map((r) => `run=${encodeURIComponent(r)}`).join("&");
  }

  return { ROOT, STATUSES, ApiError, h, num, fmt, fmtInt, dateTime, ago, agoEl, phaseText, statusBadge,
           thresholdC, actionText, api, apiWrite, download, hyper, runErrors, token, runHref, compareHref,
           showError, refreshMs };
})();
