// recserve ops view: polls /v1/demo/stats and /v1/experiments; no Grafana needed.
"use strict";

const INTERVAL_MS = 2000;
const $ = (id) => document.getElementById(id);
const pct = (x) => (x === null || x === undefined ? "-" : `${(100 * x).toFixed(1)}%`);
const num = (x, digits = 1) => (x === null || x === undefined ? "-" : Number(x).toFixed(digits));

async function get(path) {
  const response = await fetch(path);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = data.error || {};
    throw new Error(`GET ${path}: ${response.status} ${error.code || ""} ${error.message || ""}`);
  }
  return data;
}

function row(variant) {
  const counts = variant.counts || { impressions: 0, clicked_requests: 0, ctr: 0, ctr_ci95: [0, 0] };
  const [low, high] = counts.ctr_ci95;
  const div = document.createElement("div");
  div.className = "bar-row";
  div.dataset.variant = variant.name;
  div.style.gridTemplateColumns = "220px 1fr 220px";
  const label = document.createElement("span");
  label.textContent = `${variant.name} (v${variant.version ?? "-"}, ${pct(variant.share)} of users)`;
  const track = document.createElement("div");
  track.style.position = "relative";
  track.style.height = "12px";
  track.style.background = "#e5e8ee";
  const interval = document.createElement("div");
  interval.className = "bar";
  interval.style.position = "absolute";
  interval.style.opacity = "0.35";
  interval.style.left = `${100 * low}%`;
  interval.style.width = `${Math.max(0.5, 100 * (high - low))}%`;
  interval.style.height = "12px";
  const point = document.createElement("div");
  point.style.position = "absolute";
  point.style.left = `${100 * counts.ctr}%`;
  point.style.width = "2px";
  point.style.height = "12px";
  point.style.background = "#1d2430";
  track.append(interval, point);
  const text = document.createElement("span");
  text.className = "ctr";
  text.textContent = `${pct(counts.ctr)} [${pct(low)}, ${pct(high)}] of ${counts.impressions} lists`;
  div.append(label, track, text);
  return div;
}

async function poll() {
  try {
    const [stats, experiments] = await Promise.all([get("/v1/demo/stats"), get("/v1/experiments")]);
    $("window").textContent = stats.window_seconds;
    $("rps").textContent = num(stats.requests_per_second, 2);
    $("latency").textContent = `${num(stats.p50_ms)} / ${num(stats.p99_ms)}`;
    $("fallback-share").textContent = pct(stats.fallback_share);
    $("fallbacks").textContent = Object.entries(stats.fallbacks)
      .map(([kind, n]) => `${kind}: ${n}`).join(", ") || `none of ${stats.served} lists`;
    const shadow = stats.shadow;
    $("shadow").textContent = shadow.mirrored
      ? `${num(shadow.mean_jaccard, 2)} / ${num(shadow.mean_rbo, 2)}` : "-";
    $("shadow-detail").textContent = shadow.error
      || `${shadow.mirrored} mirrored (shadow ${experiments.shadow.model ?? "off"}, `
      + `v${experiments.shadow.version ?? "-"}, share ${pct(experiments.shadow.share)})`;
    $("variants").replaceChildren(...experiments.variants.map(row));
    $("comparisons").textContent = (experiments.comparisons || []).map((c) =>
      `${c.treatment} - ${c.control}: ${pct(c.ctr_difference)} [${pct(c.ctr_difference_ci95[0])}, `
      + `${pct(c.ctr_difference_ci95[1])}]${c.significant ? " significant" : ""}`).join("; ");
    $("updated").textContent = new Date().toLocaleTimeString();
    document.body.dataset.polls = String(Number(document.body.dataset.polls || 0) + 1);
    $("error").hidden = true;
  } catch (error) {
    $("error").textContent = String(error.message || error);
    $("error").hidden = false;
  }
}

$("interval").textContent = String(INTERVAL_MS / 1000);
poll();
setInterval(poll, INTERVAL_MS);
