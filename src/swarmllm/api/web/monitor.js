"use strict";
// The swarm monitor: polls GET /api/swarm every 2 s and draws, per model, a map of blocks by servers (blocks
// no server holds in red), then tables of servers, adapters and points accounts. Text goes in as text nodes.

const POLL_MS = 2000;
const TIMEOUT_MS = 15000; // the snapshot pings every server, so it may take a few seconds
const $ = (id) => document.getElementById(id);

let lastGood = null; // Date.now() when the snapshot on screen arrived
let lastError = null; // message of the last failed poll, null once one succeeds

/** Creates an element; attributes whose value is null, undefined or false are left out. */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else node.setAttribute(name, value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined).map((c) => (c instanceof Node ? c : String(c))));
  return node;
}

const range = (n) => Array.from({ length: n }, (_, i) => i);
const shortId = (id) => (id.length > 15 ? `${id.slice(0, 6)}…${id.slice(-6)}` : id);

function num(value, digits = 0) {
  if (value === null || value === undefined) return "—";
  return Number(value).toLocaleString("en-US", { maximumFractionDigits: digits });
}

const rate = (value) => num(value, value !== null && value < 100 ? 1 : 0);

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  const s = Math.floor(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} m ${s % 60} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} m`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  for (; n >= 1024 && i < units.length - 1; i++) n /= 1024;
  return `${num(n, i ? 1 : 0)} ${units[i]}`;
}

function errorText(body, response) {
  const error = body && body.error;
  if (error) return error.code ? `${error.message} (${error.code})` : String(error.message);
  return response ? `HTTP ${response.status} ${response.statusText}`.trim() : "unknown error";
}

function peerCell(id, extra = "") {
  return el("span", { class: "mono", title: `${id}${extra}` }, shortId(id));
}

/** "30/30 blocks covered", or which blocks no online server holds. */
function coverageSummary(model) {
  const n = model.num_blocks;
  if (n === 0) return el("span", { class: "coverage-summary bad" }, "no servers");
  const covered = model.coverage.filter((c) => c > 0).length;
  if (!model.gaps.length) return el("span", { class: "coverage-summary ok" }, `${covered}/${n} blocks covered`);
  const runs = model.gaps.map(([a, b]) => (b - a === 1 ? `${a}` : `${a}:${b}`));
  const one = model.gaps.length === 1 && model.gaps[0][1] - model.gaps[0][0] === 1;
  const text = one ? `block ${runs[0]} has no server` : `blocks ${runs.join(", ")} have no server`;
  return el("span", { class: "coverage-summary bad" }, `${text} (${covered}/${n} covered)`);
}

function blockMap(model) {
  const n = model.num_blocks;
  if (n === 0) return el("p", { class: "empty-state" }, "No blocks known for this model.");
  const grid = el("div", { class: "map-grid" });
  grid.style.setProperty("--blocks", n);
  grid.append(el("div", { class: "map-header" }, el("div", { class: "map-label muted" }, "block"),
    ...range(n).map((b) => el("div", { class: "tick" }, b % 5 === 0 ? b : ""))));
  for (const s of model.servers) {
    const title = `${s.peer_id}\nblocks ${s.start}:${s.end}, ${s.state}${s.reported ? ", reported" : ""}`;
    grid.append(el("div", { class: `map-row${s.reported ? " reported" : ""}`, "data-peer-id": s.peer_id },
      el("div", { class: "map-label", title }, shortId(s.peer_id)),
      ...range(n).map((b) => (b >= s.start && b < s.end
        ? el("div", { class: `cell held ${s.state}`, title: `block ${b} · ${shortId(s.peer_id)} · ${s.state}` })
        : el("div", { class: "cell" })))));
  }
  grid.append(el("div", { class: "map-coverage" }, el("div", { class: "map-label" }, "coverage"),
    ...model.coverage.map((c, b) => el("div", { class: c ? "count" : "count gap", title: `block ${b}: ${c} online` }, c))));
  const legend = el("div", { class: "legend" },
    ...[["sw-online", "online"], ["sw-busy", "joining / draining"], ["sw-offline", "offline"],
      ["sw-reported", "reported for wrong results"], ["sw-gap", "no online server"]]
      .map(([cls, label]) => el("span", {}, el("i", { class: cls }), label)));
  return el("div", { class: "block-map" }, grid, legend);
}

function table(headers, rows, empty) {
  if (!rows.length) return el("p", { class: "empty-state" }, empty);
  const head = el("tr", {}, ...headers.map(([label, cls]) => el("th", { class: cls }, label)));
  return el("table", {}, el("thead", {}, head), el("tbody", {}, ...rows));
}

const td = (content, cls) => el("td", { class: cls }, content);

function serverTable(model) {
  const rows = model.servers.map((s) => el("tr", { class: "server-row", "data-peer-id": s.peer_id },
    td(el("span", {}, peerCell(s.peer_id, `\nversion ${s.software_version}`),
      s.reported ? el("span", { class: "badge" }, "reported") : null)),
    td(`${s.start}:${s.end}`, "mono"),
    td(el("span", { class: `state ${s.state}` }, s.state)),
    td(s.quant && s.quant !== "none" ? `${s.dtype} · ${s.quant}` : s.dtype),
    td(rate(s.inference_tps), "num"),
    td(rate(s.forward_tps), "num"),
    td(num(s.rtt_ms, 1), "num"),
    td(num(s.active_sessions), "num"),
    td(num(s.tokens_served), "num"),
    td(num(s.cache_tokens_left), "num"),
    td(duration(s.uptime), "num"),
    td(s.adapters.length ? s.adapters.join(", ") : "—")));
  const headers = [["Peer"], ["Blocks"], ["State"], ["Precision"], ["Inference tok/s", "num"],
    ["Forward tok/s per block", "num"], ["RTT ms", "num"], ["Sessions", "num"], ["Tokens served", "num"],
    ["Cache tokens left", "num"], ["Uptime", "num"], ["Adapters"]];
  return el("div", { class: "table-wrap" }, table(headers, rows, "No servers announce this model."));
}

function renderModel(model) {
  const online = model.servers.filter((s) => s.state === "online").length;
  return el("section", { class: "model", "data-model": model.name, "data-complete": String(model.complete) },
    el("div", { class: "model-head" }, el("h2", {}, model.name), coverageSummary(model),
      el("span", { class: "muted" }, `${model.servers.length} servers, ${online} online`)),
    el("h3", {}, "Blocks by server"), blockMap(model),
    el("h3", {}, "Servers"), serverTable(model));
}

function render(snapshot) {
  const models = snapshot.models.map(renderModel);
  $("models").replaceChildren(...(models.length ? models
    : [el("section", {}, el("p", { class: "empty-state" }, "No models announced in the swarm yet."))]));
  $("adapters").replaceChildren(table([["Name"], ["Model"], ["Kind"], ["Size", "num"], ["Publisher"]],
    snapshot.adapters.map((a) => el("tr", {}, td(a.name), td(a.model), td(a.kind), td(bytes(a.size), "num"),
      td(peerCell(a.publisher)))),
    "No adapters published."));
  $("points").replaceChildren(table([["Account"], ["Balance", "num"], ["Served", "num"], ["Used", "num"]],
    snapshot.points.map((p) => el("tr", {}, td(peerCell(p.account)), td(num(p.balance, 2), "num"),
      td(num(p.served), "num"), td(num(p.used), "num"))),
    "No points receipts yet."));
  $("updated").title = `snapshot taken ${new Date(snapshot.at * 1000).toLocaleString()}`;
}

function showStatus() {
  const updated = $("updated");
  const ago = lastGood === null ? null : Math.round((Date.now() - lastGood) / 1000);
  updated.textContent = ago === null ? "waiting for the first snapshot…" : `updated ${ago}s ago`;
  updated.classList.toggle("bad", lastError !== null);
  $("models").classList.toggle("stale", lastError !== null && lastGood !== null);
  const banner = $("error");
  banner.hidden = lastError === null;
  banner.textContent = lastError === null ? "" : `Cannot read the swarm: ${lastError}. Retrying every ${POLL_MS / 1000} s.`;
}

async function poll() {
  try {
    const response = await apiKey.fetch("/api/swarm", { cache: "no-store", signal: AbortSignal.timeout(TIMEOUT_MS) });
    let body = null;
    try {
      body = await response.json();
    } catch {
      // not JSON: reported below from the status line
    }
    if (!response.ok || !body || body.error) throw new Error(errorText(body, response));
    render(body);
    lastGood = Date.now();
    lastError = null;
  } catch (err) {
    lastError = err.name === "TimeoutError" ? "no answer in 15 s" : err.message;
  }
  showStatus();
  setTimeout(poll, POLL_MS);
}

setInterval(showStatus, 1000);
poll();
