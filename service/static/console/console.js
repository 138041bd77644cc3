// The llmservice console: a same-origin client of the server's own API (/health, /v1/stats,
// /v1/models, /v1/cache/stats, chat, embeddings, rerank, batches, collections), like any other.
// The page's CSP allows no inline script or style: everything is built with DOM calls and textContent.

const $ = (selector) => document.querySelector(selector);
const params = new URLSearchParams(location.search);
const REFRESH_MS = Math.max(250, Number(params.get("refresh") || 2) * 1000);
const HISTORY = 150; // points per plot: five minutes at the default refresh
const GENERATION = new Set(["light", "medium", "heavy"]);
// The server says whether API_KEYS are set: then no data call goes out before a key is typed.
const KEYS_REQUIRED = document.querySelector('meta[name="llmservice-keys"]').content === "required";

// -- keys: typed by the user, kept for this tab only --------------------------------------------
const store = sessionStorage;
const keys = {
  get api() { return store.getItem("llmservice.apiKey") || ""; },
  get admin() { return store.getItem("llmservice.adminKey") || ""; },
  set(api, admin) {
    api ? store.setItem("llmservice.apiKey", api) : store.removeItem("llmservice.apiKey");
    admin ? store.setItem("llmservice.adminKey", admin) : store.removeItem("llmservice.adminKey");
  },
};

class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// Admin keys also work as user keys, so either one serves the data calls.
async function call(path, { method = "GET", body, admin = false, signal } = {}) {
  const key = admin ? keys.admin || keys.api : keys.api || keys.admin;
  const headers = {};
  if (key) headers.Authorization = `Bearer ${key}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(path, { method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body) });
  if (!res.ok) {
    const data = await res.json().catch(() => null);
    throw new ApiError(res.status, data?.error?.message || res.statusText, data?.error?.code);
  }
  return res;
}

const json = async (path, options) => (await call(path, options)).json();

function notice(text) {
  const box = $("#notice");
  box.textContent = text || "";
  box.hidden = !text;
}

// A 401 asks for a key; `focus` only after the user's own action, never from the refresh loop.
function keyNeeded(err, focus = true) {
  if (err instanceof ApiError && err.status === 401) {
    notice(`${err.message}. This server needs an API key: type it above.`);
    if (focus) $("#api-key").focus();
    return true;
  }
  return false;
}

// -- small DOM helpers ---------------------------------------------------------------------------
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (value !== undefined && value !== null && value !== false) node.setAttribute(name, value === true ? "" : value);
  }
  node.append(...children);
  return node;
}

function rows(table, list, cells) {
  const body = table.tBodies[0];
  body.replaceChildren(...list.map((item, i) => el("tr", {}, ...cells(item, i).map((c) => (c instanceof Node ? el("td", {}, c) : el("td", { text: c ?? "–" }))))));
}

const bytes = (n) => (n == null ? "–" : n >= 2 ** 30 ? `${(n / 2 ** 30).toFixed(2)} GiB` : `${(n / 2 ** 20).toFixed(1)} MiB`);
const when = (seconds) => (seconds ? new Date(seconds * 1000).toLocaleString() : "–");
const fixed = (n, digits = 1) => (n == null ? "–" : Number(n).toFixed(digits));

// -- tiers ---------------------------------------------------------------------------------------
// Rows come from the polled /health and /v1/stats (which are not counted as traffic); /v1/models
// (which is) adds pins and sizes, read again only when a tier's state changes.
let models = [];
let modelsFor = null; // the tiers' states when /v1/models was last read

function renderTiers(health, stats) {
  const byTier = new Map(models.map((m) => [m.tier, m]));
  rows($("#tiers"), Object.entries(health?.tiers || {}), ([tier, h]) => {
    const s = stats?.tiers?.[tier] || {};
    const m = byTier.get(tier) || {};
    const loaded = h.state === "loaded";
    const action = loaded ? "unload" : "load";
    const button = el("button", {
      type: "button",
      "data-tier": tier,
      "data-action": action,
      disabled: h.state === "loading" || (loaded && m.pinned),
      title: m.pinned ? "pinned: never unloaded" : undefined,
      text: loaded ? "Unload" : "Load",
      onclick: () => administer(tier, action),
    });
    const pin = el("button", {
      type: "button",
      "data-pin": tier,
      "aria-pressed": m.pinned ? "true" : "false",
      title: m.pinned ? "unpin: KEEP_ALIVE and unload apply again" : "pin: never unloaded",
      text: m.pinned ? "Unpin" : "Pin",
      onclick: () => setPin(tier, !m.pinned),
    });
    const state = el("span", { class: "badge", "data-state": h.state, text: m.pinned ? `${h.state} · pinned` : h.state });
    if (h.error) state.title = h.error;
    return [tier, h.model, state, h.engine, h.device, h.context_length, h.queued, s.in_flight,
      bytes(s.memory_bytes || m.size_bytes), s.usage_count, el("span", { class: "actions" }, button, pin)];
  });
}

// Pins change live through PATCH /v1/config (an admin route), not kept in .env.
async function setPin(tier, pinned) {
  await adminAction(pinned ? `Pinning ${tier}…` : `Unpinning ${tier}…`, `${tier}: ${pinned ? "pinned" : "unpinned"}`, () =>
    call("/v1/config", { method: "PATCH", admin: true, body: { tiers: { [tier]: { pin: pinned } } } }));
  modelsFor = null; // pins are read from /v1/models
  refresh();
}

async function administer(tier, action) {
  await adminAction(`${action === "load" ? "Loading" : "Unloading"} ${tier}…`, `${tier}: ${action}ed`, () =>
    call(`/v1/models/${encodeURIComponent(tier)}/${action}`, { method: "POST", admin: true }));
  refresh();
}

async function adminAction(pending, done, request) {
  const status = $("#admin-status");
  status.textContent = pending;
  delete status.dataset.outcome;
  try {
    await request();
    status.textContent = done;
    status.dataset.outcome = "done";
  } catch (err) {
    status.textContent = `Refused (${err.status ?? "network"}${err.code ? ` ${err.code}` : ""}): ${err.message}`;
    status.dataset.outcome = "refused";
    if (err.status === 401 || err.status === 403) $("#admin-key").focus();
  }
}

// -- plots: inline SVG polylines over the last HISTORY samples ---------------------------------------
const PLOTS = [
  { id: "tokens", title: "tokens/s", series: [["tokens/s", (s) => s.tokens_per_second]] },
  { id: "requests", title: "requests/s", series: [["req/s", (s) => s.requests_per_second]] },
  { id: "ttft", title: "TTFT ms", series: [["p50", (s) => s.ttft_ms?.p50], ["p95", (s) => s.ttft_ms?.p95]] },
  { id: "latency", title: "latency ms", series: [["p50", (s) => s.latency_ms?.p50], ["p95", (s) => s.latency_ms?.p95]] },
  { id: "queue", title: "queue / in flight", series: [["queued", (s) => s.requests?.queued], ["active", (s) => s.requests?.active]] },
  { id: "cache", title: "cache hit rate", series: [["response", (s, c) => c?.response?.hit_rate], ["prefix", (s, c) => c?.prefix?.hit_rate]] },
  { id: "memory", title: "memory MiB", series: [["RSS", (s) => (s.memory?.process_rss_bytes ?? 0) / 2 ** 20]] },
];
const SVG = "http://www.w3.org/2000/svg";
const W = 300;
const H = 80;
const samples = new Map(PLOTS.map((p) => [p.id, p.series.map(() => [])]));

function buildPlots() {
  $("#plots").replaceChildren(...PLOTS.map((p) => {
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    svg.setAttribute("preserveAspectRatio", "none");
    p.series.forEach((_, i) => {
      const line = document.createElementNS(SVG, "polyline");
      line.setAttribute("class", `series s${i}`);
      line.setAttribute("points", "");
      svg.append(line);
    });
    const legend = el("figcaption", {}, el("b", { text: p.title }), ...p.series.map(([name], i) => el("span", { class: `s${i}`, "data-series": name })));
    return el("figure", { class: "plot", "data-plot": p.id }, svg, legend);
  }));
}

function plot(stats, cache) {
  for (const p of PLOTS) {
    const figure = $(`figure[data-plot="${p.id}"]`);
    const series = samples.get(p.id);
    const values = p.series.map(([, read]) => read(stats, cache) ?? null);
    values.forEach((v, i) => {
      series[i].push(v);
      if (series[i].length > HISTORY) series[i].shift();
    });
    const max = Math.max(1e-9, ...series.flat().filter((v) => v != null));
    figure.querySelectorAll("polyline").forEach((line, i) => {
      const points = series[i].map((v, x) => (v == null ? null : `${((x + HISTORY - series[i].length) * W) / (HISTORY - 1)},${(H - 2 - (v / max) * (H - 4)).toFixed(1)}`));
      line.setAttribute("points", points.filter(Boolean).join(" "));
    });
    figure.querySelectorAll("figcaption span").forEach((span, i) => {
      span.textContent = `${p.series[i][0]} ${fixed(values[i], p.id === "cache" ? 2 : 1)}`;
    });
    figure.dataset.last = values.join(",");
  }
}

// -- the refresh loop ------------------------------------------------------------------------------
const NO_KEY = new ApiError(401, "No API key given", "missing_api_key");

async function refresh() {
  const locked = KEYS_REQUIRED && !keys.api && !keys.admin;
  const guarded = (path) => (locked ? Promise.reject(NO_KEY) : json(path));
  const [health, stats, cache] = await Promise.allSettled([
    json("/health").catch((err) => (err.status === 503 ? null : Promise.reject(err))),
    guarded("/v1/stats"),
    guarded("/v1/cache/stats"),
  ]);
  const status = $("#status");
  const h = health.status === "fulfilled" ? health.value : null;
  if (h) {
    status.textContent = h.status;
    status.dataset.state = h.status;
    $("#uptime").textContent = `up ${Math.round(h.uptime_seconds)} s`;
  } else {
    status.textContent = health.status === "fulfilled" ? "unhealthy" : "unreachable";
    status.dataset.state = "unhealthy";
  }
  const states = JSON.stringify(Object.entries(h?.tiers || {}).map(([tier, t]) => [tier, t.state]));
  let list = { status: "fulfilled" };
  if (!locked && states !== modelsFor) {
    [list] = await Promise.allSettled([json("/v1/models")]);
    if (list.status === "fulfilled") {
      models = list.value.data;
      modelsFor = states;
      fillPickers();
    }
  }
  const refused = [stats, list, cache].find((r) => r.status === "rejected");
  if (!(refused && keyNeeded(refused.reason, false))) notice(refused ? `Could not read the server: ${refused.reason.message}` : "");
  const s = stats.status === "fulfilled" ? stats.value : null;
  renderTiers(h, s);
  if (s) {
    $("#window").textContent = `(rates over the last ${s.window_seconds} s)`;
    plot(s, cache.status === "fulfilled" ? cache.value : null);
  }
  if (!locked && !jobsListed) listJobs();
}

async function loop() {
  await refresh().catch((err) => notice(err.message));
  setTimeout(loop, REFRESH_MS);
}

// -- batch jobs and collections --------------------------------------------------------------------
// Read once, then on the Refresh button: each read counts as a request in the plots above.
let jobsListed = false;

async function listJobs() {
  jobsListed = true;
  const [batches, collections] = await Promise.allSettled([json("/v1/batches?limit=20"), json("/v1/collections")]);
  if (batches.status === "fulfilled") {
    rows($("#batches"), batches.value.data, (b) => [b.id, b.endpoint, b.status,
      `${b.request_counts.completed + b.request_counts.failed} / ${b.request_counts.total}`, when(b.created_at)]);
  }
  if (collections.status === "fulfilled") {
    rows($("#collections"), collections.value.data, (c) => [c.id, c.model, c.chunks, c.hybrid ? "yes" : "no", when(c.created_at)]);
  } else {
    rows($("#collections"), [collections.reason], (err) => [`unavailable: ${err.message}`, "", "", "", ""]);
  }
}

// -- playground ------------------------------------------------------------------------------------
function fillPickers() {
  const pick = (select, wanted) => {
    const chosen = select.value;
    select.replaceChildren(...models.filter((m) => wanted(m.tier)).map((m) => el("option", { value: m.id, text: `${m.tier} · ${m.id}` })));
    if (chosen && [...select.options].some((o) => o.value === chosen)) select.value = chosen;
  };
  pick($("#chat-model"), (t) => GENERATION.has(t));
  pick($("#embed-model"), (t) => t === "embedding");
  pick($("#rerank-model"), (t) => t === "reranker");
  // Nothing to send to until a model is picked (the list comes with the key, when keys are on).
  $("#send").disabled = running !== null || !$("#chat-model").value;
  $("#embed").disabled = !$("#embed-model").value;
  $("#rerank").disabled = !$("#rerank-model").value;
}

let running = null; // the AbortController of the answer being streamed

// SSE over fetch: `data: <json>` events separated by blank lines, then `data: [DONE]`.
async function* events(res) {
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

async function send(event) {
  event.preventDefault();
  if (running) return;
  const messages = [];
  if ($("#system").value.trim()) messages.push({ role: "system", content: $("#system").value });
  messages.push({ role: "user", content: $("#prompt").value });
  let tools;
  try {
    tools = $("#tools").value.trim() ? JSON.parse($("#tools").value) : undefined;
  } catch (err) {
    $("#chat-stats").textContent = `Tools: not JSON (${err.message})`;
    return;
  }
  const body = {
    model: $("#chat-model").value,
    tools,
    messages,
    // Left empty, the tier's sampling defaults apply (its settings, else the model card's).
    temperature: $("#temperature").value === "" ? undefined : Number($("#temperature").value),
    max_tokens: Number($("#max-tokens").value),
    stream: true,
    stream_options: { include_usage: true },
  };
  const answer = $("#answer");
  const reasoning = $("#reasoning");
  const calls = $("#tool-calls");
  answer.textContent = "";
  answer.dataset.chunks = "0";
  answer.dataset.state = "streaming";
  reasoning.hidden = true;
  reasoning.open = false;
  reasoning.querySelector("pre").textContent = "";
  calls.replaceChildren();
  calls.hidden = true;
  const stats = $("#chat-stats");
  stats.textContent = "waiting…";
  running = new AbortController();
  $("#send").disabled = true;
  $("#stop").disabled = false;
  const started = performance.now();
  let first = null;
  let chunks = 0;
  let usage = null;
  const toolCalls = [];
  try {
    const res = await call("/v1/chat/completions", { method: "POST", body, signal: running.signal });
    for await (const chunk of events(res)) {
      if (chunk.error) throw new ApiError(undefined, chunk.error.message, chunk.error.code); // after the start
      if (chunk.usage) usage = chunk.usage;
      const delta = chunk.choices?.[0]?.delta;
      if (!delta) continue;
      if (first === null && (delta.content || delta.reasoning_content || delta.tool_calls)) first = performance.now() - started;
      if (delta.reasoning_content) {
        reasoning.hidden = false;
        reasoning.querySelector("pre").append(delta.reasoning_content);
      }
      if (delta.content) {
        answer.append(delta.content);
        answer.dataset.chunks = String(++chunks);
      }
      for (const part of delta.tool_calls || []) {
        const known = (toolCalls[part.index] ||= { name: "", args: "" });
        known.name += part.function?.name || "";
        known.args += part.function?.arguments || "";
        calls.hidden = false;
        calls.replaceChildren(...toolCalls.map((c) => el("li", {}, el("code", { text: `${c.name}(${c.args})` }))));
      }
      stats.textContent = `TTFT ${fixed(first, 0)} ms · ${chunks} chunks`;
    }
    answer.dataset.state = "done";
  } catch (err) {
    if (err.name === "AbortError") {
      answer.dataset.state = "stopped";
    } else {
      answer.dataset.state = "error";
      keyNeeded(err) || answer.append(el("p", { class: "error", text: `Error: ${err.message}` }));
    }
  } finally {
    const seconds = (performance.now() - started) / 1000;
    const tokens = usage ? `${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens` : `${chunks} chunks`;
    const rate = usage && first !== null ? ` · ${fixed(usage.completion_tokens / Math.max(1e-3, seconds - first / 1000))} tok/s` : "";
    stats.textContent = `${answer.dataset.state} · TTFT ${fixed(first, 0)} ms · ${tokens}${rate} · ${fixed(seconds, 2)} s`;
    running = null;
    $("#send").disabled = false;
    $("#stop").disabled = true;
  }
}

// -- embeddings and rerank ---------------------------------------------------------------------------
const texts = () => $("#texts").value.split("\n").map((t) => t.trim()).filter(Boolean);

function results(head, list, cells) {
  const table = $("#vector-results");
  table.tHead.replaceChildren(el("tr", {}, ...head.map((h) => el("th", { text: h }))));
  rows(table, list, cells);
}

function cosine(a, b) {
  let dot = 0, na = 0, nb = 0;
  for (let i = 0; i < a.length; i++) {
    dot += a[i] * b[i];
    na += a[i] * a[i];
    nb += b[i] * b[i];
  }
  return dot / Math.sqrt(na * nb || 1);
}

async function embed() {
  const input = texts();
  try {
    const res = await json("/v1/embeddings", { method: "POST", body: { model: $("#embed-model").value, input } });
    const vectors = res.data.map((d) => d.embedding);
    results(["Text", "Dimensions", "Cosine to the first"], vectors, (v, i) => [input[i], v.length, fixed(cosine(vectors[0], v), 3)]);
  } catch (err) {
    keyNeeded(err) || results(["Error"], [err], (e) => [e.message]);
  }
}

async function rerank() {
  const documents = texts();
  try {
    const res = await json("/v1/rerank", { method: "POST", body: { model: $("#rerank-model").value, query: $("#query").value, documents } });
    results(["Document", "Score"], res.results, (r) => [documents[r.index], fixed(r.relevance_score, 4)]);
  } catch (err) {
    keyNeeded(err) || results(["Error"], [err], (e) => [e.message]);
  }
}

// -- start -----------------------------------------------------------------------------------------
$("#keys").addEventListener("submit", (event) => {
  event.preventDefault();
  keys.set($("#api-key").value.trim(), $("#admin-key").value.trim());
  notice("");
  modelsFor = null;
  jobsListed = false;
  refresh();
});
$("#forget-keys").addEventListener("click", () => {
  keys.set("", "");
  $("#api-key").value = "";
  $("#admin-key").value = "";
});
$("#api-key").value = keys.api;
$("#admin-key").value = keys.admin;
$("#chat-form").addEventListener("submit", send);
$("#stop").addEventListener("click", () => running?.abort());
$("#embed").addEventListener("click", embed);
$("#rerank").addEventListener("click", rerank);
$("#list-jobs").addEventListener("click", listJobs);
buildPlots();
loop();
