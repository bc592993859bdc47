// recserve demo page: a catalog grid whose buttons post real events, the recommendations refreshed
// after each one (with "explain": true), heat maps of the user vector and per-stage latency.
// Vanilla JS, no build step; every call goes to the public API of the Ingress that served this page.
"use strict";

const K = 10;
const PAGE = 60; // catalog items per grid page
const state = {
  user: null,
  items: new Map(), // item_id -> {title, category, price}: only items shown so far, never the catalog
  catalogOffset: 0,
  last: null, // last recommendations response
  previousDelta: null,
  roundtrips: [], // ms, event POST start -> recommendations rendered
  busy: false,
};
window.recserveDemo = state; // read by tests and by the round-trip measurement

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else if (key === "onclick") node.addEventListener("click", value);
    else node[key] = value;
  }
  for (const child of children) {
    if (child !== null && child !== undefined) {
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }
  return node;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: body ? { "Content-Type": "application/json" } : {},
    body: body ? JSON.stringify(body) : undefined,
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = data.error || {};
    throw new Error(`${method} ${path}: ${response.status} ${error.code || ""} ${error.message || ""}`
      + (error.field ? ` (field ${error.field})` : ""));
  }
  return data;
}

// --- users ---------------------------------------------------------------------------------------

function newUserId() {
  const bytes = new Uint8Array(6);
  crypto.getRandomValues(bytes);
  return "new-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

async function loadUsers() {
  const select = $("user-select");
  const { users } = await api("GET", "/v1/demo/users");
  for (const user of users) {
    const label = `${user.user_id} (${user.event_count} events`
      + (user.top_category ? `, mostly ${user.top_category})` : ")");
    select.append(el("option", { value: user.user_id, textContent: label }));
  }
  select.append(el("option", { value: "__new__", textContent: "a new user (cold start)" }));
  select.addEventListener("change", () => pickUser(select.value));
  if (users.length) await pickUser(users[0].user_id);
  else await pickUser("__new__");
}

async function pickUser(value) {
  state.user = value === "__new__" ? newUserId() : value;
  state.previousDelta = null;
  $("last-event").textContent = "no event yet";
  $("recs-for").textContent = `for ${state.user}`;
  await refresh();
}

// --- catalog -------------------------------------------------------------------------------------

function remember(items) {
  for (const item of items) state.items.set(item.item_id, item);
}

// Titles of recommended items the page has not shown yet, in one bounded lookup.
async function ensureItems(itemIds) {
  const unknown = [...new Set(itemIds)].filter((id) => !state.items.has(id));
  if (!unknown.length) return;
  const found = await api("GET", `/v1/demo/items?${new URLSearchParams({ ids: unknown.join(",") })}`);
  remember(found.items);
  // Not in the catalog: named by id, and not asked again.
  for (const id of found.missing) state.items.set(id, { item_id: id, title: id });
}

async function loadCatalog(offset = 0) {
  const q = $("search").value;
  const category = $("category").value;
  const params = new URLSearchParams({ q, limit: String(PAGE), offset: String(offset) });
  if (category) params.set("category", category);
  const page = await api("GET", `/v1/demo/catalog?${params}`);
  state.catalogOffset = offset;
  remember(page.items);
  const select = $("category");
  if (select.options.length === 1) {
    for (const name of page.categories) select.append(el("option", { value: name, textContent: name }));
  }
  const total = page.total.toLocaleString();
  $("catalog-total").textContent = page.items.length
    ? `${(offset + 1).toLocaleString()}-${(offset + page.items.length).toLocaleString()} of ${total}`
    : `0 of ${total}`;
  $("catalog-total").dataset.total = String(page.total);
  $("page-prev").disabled = offset === 0;
  $("page-next").disabled = offset + page.items.length >= page.total;
  const grid = $("catalog");
  grid.dataset.offset = String(offset);
  grid.replaceChildren(...page.items.map(productCard));
}

const EVENTS = [["view", "view"], ["click", "click"], ["add_to_cart", "cart"], ["purchase", "buy"]];

function productCard(item) {
  const actions = EVENTS.map(([type, label]) => el("button", {
    type: "button", textContent: label, "data-event": type,
    onclick: () => sendEvent(item.item_id, type),
  }));
  return el("div", { class: "product", "data-item-id": item.item_id, "data-category": item.category },
    el("div", { class: "title" }, item.title),
    el("div", { class: "meta" }, `${item.category} · ${item.price.toFixed(2)} · ${item.item_id}`),
    el("div", { class: "actions" }, ...actions));
}

// --- events and refresh --------------------------------------------------------------------------

async function sendEvent(itemId, eventType) {
  if (state.busy) return;
  state.busy = true;
  const start = performance.now();
  try {
    const event = { user_id: state.user, item_id: itemId, event_type: eventType };
    const position = state.last ? state.last.items.findIndex((i) => i.item_id === itemId) : -1;
    if (position >= 0) Object.assign(event, { request_id: state.last.request_id, position });
    await api("POST", "/v1/events", { events: [event] });
    const before = state.last && state.last.explain ? state.last.explain.user.delta : null;
    await refresh();
    const ms = performance.now() - start;
    state.roundtrips.push(ms);
    const box = $("roundtrip");
    box.textContent = `${ms.toFixed(0)} ms`;
    box.dataset.count = String(state.roundtrips.length);
    box.dataset.ms = ms.toFixed(1);
    state.previousDelta = before;
    renderVectors(state.last);
    const title = (state.items.get(itemId) || {}).title || itemId;
    $("last-event").textContent = `last event: ${eventType} on ${title} (${itemId})`;
  } catch (error) {
    showError(String(error.message || error));
  } finally {
    state.busy = false;
  }
}

async function refresh() {
  const body = { user_id: state.user, k: K, explain: true };
  const result = await api("POST", "/v1/recommendations?debug=true", body);
  // Titles are a nicety: without them the list still shows, by id.
  await ensureItems(result.items.map((i) => i.item_id)).catch((e) => console.warn(e));
  showError("");
  const previous = new Set(state.last && state.last.user_id === result.user_id
    ? state.last.items.map((i) => i.item_id) : []);
  state.last = result;
  renderRecommendations(result, previous);
  renderLatency(result.debug || {});
  renderVectors(result);
  $("variant").textContent = result.variant;
  $("model-version").textContent = result.model_version;
  const fallback = $("fallback");
  fallback.hidden = !result.fallback;
  fallback.textContent = result.fallback ? `fallback: ${result.fallback}` : "";
  const list = $("recs");
  list.dataset.refreshes = String(Number(list.dataset.refreshes) + 1);
}

function renderRecommendations(result, previous) {
  const explained = new Map(((result.explain || {}).items || []).map((i) => [i.item_id, i]));
  const cards = result.items.map((item) => {
    const info = state.items.get(item.item_id) || {};
    const why = explained.get(item.item_id) || {};
    const category = why.category || info.category || "?";
    const similarity = why.similarity === undefined ? "-" : why.similarity.toFixed(3);
    return el("li", {
      class: "rec" + (previous.size && !previous.has(item.item_id) ? " new" : ""),
      "data-item-id": item.item_id, "data-category": category,
    },
      el("span", { class: "rank" }, item.rank),
      el("div", {},
        el("div", { class: "title" }, info.title || item.item_id),
        el("div", { class: "meta" },
          `${category} · score ${item.score.toFixed(3)} · `,
          el("span", { class: `source-${item.source}` }, item.source),
          ` · similarity ${similarity}`)),
      el("button", { type: "button", class: "why", textContent: "why this?",
        onclick: () => openExplain(item.item_id) }));
  });
  $("recs").replaceChildren(...cards);
}

function renderLatency(debug) {
  const timings = Object.entries(debug.timings_ms || {});
  if (debug.ingress_total_ms !== undefined) timings.push(["ingress total", debug.ingress_total_ms]);
  const top = Math.max(1, ...timings.map(([, ms]) => ms));
  $("latency").replaceChildren(...timings.map(([stage, ms]) => el("div", { class: "bar-row", "data-stage": stage },
    el("span", {}, stage),
    el("div", { class: "bar", style: `width: ${(100 * ms / top).toFixed(1)}%` }),
    el("span", {}, ms.toFixed(1)))));
}

// --- heat maps -----------------------------------------------------------------------------------

function color(value, scale) {
  const t = Math.max(-1, Math.min(1, scale > 0 ? value / scale : 0));
  const fade = Math.round(255 * (1 - Math.abs(t)));
  return t >= 0 ? `rgb(255, ${fade}, ${fade})` : `rgb(${fade}, ${fade}, 255)`;
}

function heat(id, values) {
  const box = $(id);
  if (!values) {
    box.replaceChildren(el("span", { class: "muted" }, "none (cold start: popularity)"));
    box.dataset.values = "";
    return;
  }
  const scale = Math.max(...values.map(Math.abs));
  box.replaceChildren(...values.map((v, i) => el("span", {
    class: "cell", title: `dim ${i}: ${v.toFixed(4)}`, style: `background: ${color(v, scale)}`,
  })));
  box.dataset.values = values.map((v) => v.toFixed(4)).join(",");
}

function renderVectors(result) {
  const user = result && result.explain ? result.explain.user : null;
  if (!user) return;
  heat("heat-base", user.base);
  heat("heat-delta", user.delta);
  heat("heat-combined", user.combined);
  const before = state.previousDelta;
  const change = user.delta && before ? user.delta.map((v, i) => v - (before[i] || 0)) : null;
  if (change) heat("heat-delta-change", change);
  else {
    $("heat-delta-change").replaceChildren(el("span", { class: "muted" }, "after the next event"));
    $("heat-delta-change").dataset.values = "";
  }
}

// --- explain panel -------------------------------------------------------------------------------

function table(headers, rows) {
  return el("table", {},
    el("tr", {}, ...headers.map((h) => el("th", {}, h))),
    ...rows.map((row) => el("tr", {}, ...row.map((cell) => el("td", {}, cell)))));
}

function title(itemId) {
  const info = state.items.get(itemId);
  return info ? `${info.title} (${itemId})` : itemId;
}

function openExplain(itemId) {
  const trace = state.last && state.last.explain;
  const body = $("explain-body");
  if (!trace) return;
  const item = trace.items.find((i) => i.item_id === itemId);
  const parts = [el("h2", {}, `Why ${title(itemId)}?`)];
  if (item) {
    parts.push(el("p", {},
      `Rank ${item.rank} from the ${item.source} source; ${item.relevance_rank === item.rank
        ? "the same rank as its relevance" : `rank ${item.relevance_rank} by relevance`}. `
      + `Similarity to the user vector ${item.similarity.toFixed(3)}; ranker score `
      + `${item.ranker_score === undefined ? "none (not ranked)" : item.ranker_score.toFixed(3)}; `
      + `final score ${item.score.toFixed(3)}.`));
    if (item.features.length) {
      const top = Math.max(...item.features.map((f) => Math.abs(f.contribution)), 1e-9);
      parts.push(el("h3", {}, "Strongest ranker features"), table(["feature", "value", "contribution"],
        item.features.map((f) => [f.name, f.value.toFixed(3), el("span", {},
          el("span", { class: "contrib " + (f.contribution >= 0 ? "pos" : "neg"),
            style: `width: ${(60 * Math.abs(f.contribution) / top).toFixed(0)}px` }),
          ` ${f.contribution.toFixed(3)}`)])));
    }
  }
  parts.push(el("h3", {}, "Candidates per source"), table(["source", "count", "best (score)"],
    trace.candidates.map((s) => [s.source, s.count,
      s.top.slice(0, 5).map((c) => `${c.item_id} (${c.score.toFixed(3)})`).join(", ") || "-"])));
  parts.push(el("h3", {}, "Removed by the rules"),
    el("p", { class: "muted" }, "kept out of the list; the retriever never searches seen or "
      + "filtered items, the re-ranker drops what still reaches it"),
    table(["rule", "kept out", "at re-rank", "items"],
      trace.removed.map((r) => [r.rule, r.count, r.at_rerank, r.item_ids.join(", ") || "-"])));
  const mmr = trace.mmr;
  parts.push(el("h3", {}, "Diversity (MMR)"), el("p", {},
    `lambda ${mmr.mmr_lambda}, category cap ${mmr.category_cap === undefined ? "none" : mmr.category_cap}: `
    + `${mmr.moved} items moved against the relevance order; promoted `
    + `${mmr.promoted.join(", ") || "none"}; displaced ${mmr.displaced.join(", ") || "none"}.`));
  body.replaceChildren(...parts);
  const panel = $("explain-panel");
  panel.hidden = false;
  panel.dataset.itemId = itemId;
}

// --- start ---------------------------------------------------------------------------------------

function debounce(fn, ms) {
  let timer = null;
  return (...args) => { clearTimeout(timer); timer = setTimeout(() => fn(...args), ms); };
}

async function start() {
  $("explain-close").addEventListener("click", () => { $("explain-panel").hidden = true; });
  const reload = (offset) => loadCatalog(offset).catch((e) => showError(e.message));
  $("search").addEventListener("input", debounce(() => reload(0), 200));
  $("category").addEventListener("change", () => reload(0));
  $("page-prev").addEventListener("click", () => reload(Math.max(0, state.catalogOffset - PAGE)));
  $("page-next").addEventListener("click", () => reload(state.catalogOffset + PAGE));
  try {
    await loadCatalog();
    await loadUsers();
    document.body.dataset.ready = "true";
  } catch (error) {
    showError(String(error.message || error));
  }
}

start();
