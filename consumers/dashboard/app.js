// The built-in dashboard: plain JavaScript over the consumer's JSON API (/api/..., docs/dashboard.md).
// Chart.js is served from the package itself, so the page works on machines without internet.
"use strict";

const $ = (sel) => document.querySelector(sel);
const charts = {};
let breakdownBy = "model";
let feedbackBy = "model";
let detailId = "";
let refreshTimer = null;

// Whole hours from 24 hours up: those charts read the hourly rollups (docs/storage.md, "Reading fast").
const STEP_FOR_RANGE = { "15m": 60, "1h": 60, "6h": 300, "24h": 3600, "7d": 3600, "30d": 21600 };
const fmtInt = new Intl.NumberFormat("en-US");
const fmtUsd = (v) => (v == null ? "–" : "$" + Number(v).toFixed(v >= 1 ? 2 : 6));
const fmtMs = (v) => (v == null ? "–" : Number(v).toFixed(v >= 100 ? 0 : 1));
const fmtPct = (v) => (v == null ? "–" : (100 * v).toFixed(1) + "%");
// A cost with unpriced requests in it is a lower bound: say so instead of passing it off as the total.
const fmtCost = (r) => {
  if (!r.unpriced_requests) return fmtUsd(r.cost_usd);
  return r.cost_usd == null ? "unknown" : `≥ ${fmtUsd(r.cost_usd)}`;
};
// The units Cohere bills besides input/output tokens, where any were used.
function fmtUnits(r) {
  const parts = [
    ["cached", r.cached_tokens ?? r.usage_cached_tokens],
    ["search units", r.search_units ?? r.usage_search_units],
    ["images", r.images ?? r.usage_images],
    ["image tokens", r.image_tokens ?? r.usage_image_tokens],
  ];
  const used = parts.filter(([, v]) => v).map(([name, v]) => `${fmtInt.format(v)} ${name}`);
  return used.length ? used.join(", ") : "–";
}

function scope() {
  const p = new URLSearchParams({ since: $("#range").value });
  if ($("#account").value) p.set("account_id", $("#account").value);
  if ($("#gateway").value) p.set("gateway_id", $("#gateway").value);
  return p;
}

// One refresh asks each distinct question once (the breakdown by model and the model filter's options
// are the same totals): requests of a refresh share their answers.
let refreshAnswers = null;

async function api(name, extra = {}) {
  const p = scope();
  for (const [k, v] of Object.entries(extra)) if (v !== "" && v != null) p.set(k, v);
  const url = `/api/${name}?${p}`;
  if (!refreshAnswers) return getJson(name, url);
  if (!refreshAnswers.has(url)) refreshAnswers.set(url, getJson(name, url));
  return refreshAnswers.get(url);
}

async function getJson(name, url) {
  const resp = await fetch(url);
  const body = await resp.json();
  if (!resp.ok) throw new Error(body.error || `${name}: HTTP ${resp.status}`);
  return body;
}

function setOptions(select, values) {
  const current = select.value;
  const first = select.options[0];
  select.replaceChildren(first, ...values.filter((v) => v).map((v) => new Option(v, v)));
  if (values.includes(current)) select.value = current;
}

function lineChart(id, datasets) {
  const ctx = $(`#${id}`);
  if (!charts[id]) {
    charts[id] = new Chart(ctx, {
      type: "line",
      data: { labels: [], datasets: datasets.map((d) => ({ label: d.label, data: [], borderColor: d.color,
        backgroundColor: d.color + "33", fill: d.fill ?? false, tension: 0.25, pointRadius: 0 })) },
      options: { animation: false, maintainAspectRatio: false, interaction: { mode: "index", intersect: false },
        scales: { y: { beginAtZero: true } }, plugins: { legend: { position: "bottom" } } },
    });
  }
  return charts[id];
}

function label(bucket) {
  const d = new Date(bucket.replace(" ", "T") + (bucket.endsWith("Z") ? "" : "Z"));
  const range = $("#range").value;
  return range === "7d" || range === "30d"
    ? d.toISOString().slice(5, 13).replace("T", " ") + "h"
    : d.toISOString().slice(11, 16);
}

const RANGE_SECONDS = { "15m": 900, "1h": 3600, "6h": 21600, "24h": 86400, "7d": 604800, "30d": 2592000 };

// Every bucket of the range, with zeros where nothing happened, so a quiet minute shows as a dip.
function fillBuckets(rows, stepS) {
  const toMs = (b) => Date.parse(b.replace(" ", "T") + (b.endsWith("Z") ? "" : "Z"));
  const byTime = new Map(rows.map((r) => [toMs(r.bucket), r]));
  const stepMs = stepS * 1000;
  const end = Math.floor(Date.now() / stepMs) * stepMs;
  const start = end - Math.floor((RANGE_SECONDS[$("#range").value] || 3600) / stepS) * stepMs + stepMs;
  const out = [];
  for (let t = start; t <= end; t += stepMs) {
    out.push(byTime.get(t) || { bucket: new Date(t).toISOString(), requests: 0, errors: 0, input_tokens: 0,
      output_tokens: 0, cost_usd: 0, latency_ms_p50: null, latency_ms_p95: null });
  }
  return out;
}

function drawSeries(rows) {
  const labels = rows.map((r) => label(r.bucket));
  const set = (id, series) => {
    const chart = charts[id];
    chart.data.labels = labels;
    series.forEach((pick, i) => (chart.data.datasets[i].data = rows.map(pick)));
    chart.update();
  };
  lineChart("chart-requests", [{ label: "requests", color: "#39594d", fill: true }, { label: "errors", color: "#c0392b" }]);
  lineChart("chart-tokens", [{ label: "input", color: "#2c6fbb" }, { label: "output", color: "#d4862a" }]);
  lineChart("chart-cost", [{ label: "USD", color: "#7b4fa0", fill: true }]);
  lineChart("chart-latency", [{ label: "p50", color: "#39594d" }, { label: "p95", color: "#c0392b" }]);
  set("chart-requests", [(r) => r.requests, (r) => r.errors]);
  set("chart-tokens", [(r) => r.input_tokens, (r) => r.output_tokens]);
  set("chart-cost", [(r) => r.cost_usd]);
  set("chart-latency", [(r) => r.latency_ms_p50, (r) => r.latency_ms_p95]);
}

function drawCards(total, cache) {
  const c = cache || { hit_rate: 0, saved_cost_usd: 0 };
  $("#c-cache").textContent = `${fmtPct(c.hit_rate)} / ${fmtUsd(c.saved_cost_usd)}`;
  const t = total || {};
  $("#c-requests").textContent = fmtInt.format(t.requests || 0);
  $("#c-tokens").textContent = `${fmtInt.format(t.input_tokens || 0)} / ${fmtInt.format(t.output_tokens || 0)}`;
  $("#c-cost").textContent = t.requests ? fmtCost(t) : fmtUsd(0);
  $("#c-cost-note").textContent = t.unpriced_requests
    ? `cost incomplete: ${fmtInt.format(t.unpriced_requests)} of ${fmtInt.format(t.requests)} requests ` +
      `(${fmtPct(t.unpriced_requests / t.requests)}) unpriced, ` +
      `${fmtInt.format((t.unpriced_input_tokens || 0) + (t.unpriced_output_tokens || 0))} tokens`
    : t.implied_model_requests
      ? `${fmtInt.format(t.implied_model_requests)} priced at Cohere's default model`
      : "";
  $("#c-cost-note").className = t.unpriced_requests ? "note incomplete" : "note";
  $("#c-units").textContent = fmtUnits(t);
  $("#c-errors").textContent = fmtPct(t.error_rate ?? 0);
  $("#c-latency").textContent = `${fmtMs(t.latency_ms_p50)} / ${fmtMs(t.latency_ms_p95)} ms`;
}

function fillTable(table, columns, rows, onClick) {
  table.querySelector("thead").replaceChildren(
    Object.assign(document.createElement("tr"), {
      innerHTML: columns.map((c) => `<th>${c.title}</th>`).join(""),
    }),
  );
  const body = table.querySelector("tbody");
  if (!rows.length) {
    body.innerHTML = `<tr><td class="empty" colspan="${columns.length}">no requests in this range</td></tr>`;
    return;
  }
  body.replaceChildren(
    ...rows.map((row) => {
      const tr = document.createElement("tr");
      for (const c of columns) {
        const td = document.createElement("td");
        td.textContent = c.value(row);
        if (c.cls) td.className = c.cls(row);
        tr.appendChild(td);
      }
      if (onClick) tr.addEventListener("click", () => onClick(row));
      return tr;
    }),
  );
}

const BREAKDOWN_COLUMNS = [
  { title: "requests", value: (r) => fmtInt.format(r.requests) },
  { title: "tokens in", value: (r) => fmtInt.format(r.input_tokens) },
  { title: "tokens out", value: (r) => fmtInt.format(r.output_tokens) },
  { title: "other units", value: fmtUnits },
  { title: "cost USD", value: fmtCost },
  { title: "unpriced", value: (r) => (r.unpriced_requests ? fmtInt.format(r.unpriced_requests) : "–") },
  { title: "errors", value: (r) => fmtInt.format(r.errors) },
];

async function drawBreakdown() {
  const table = $("#breakdown");
  if (breakdownBy === "cache") {
    const rows = await api("cache", { by: "model" });
    fillTable(table, [
      { title: "model", value: (r) => r.key || "(none)" },
      { title: "lookups", value: (r) => fmtInt.format(r.lookups) },
      { title: "hits", value: (r) => fmtInt.format(r.hits) },
      { title: "hit rate", value: (r) => fmtPct(r.hit_rate) },
      { title: "saved tokens in", value: (r) => fmtInt.format(r.saved_input_tokens) },
      { title: "saved tokens out", value: (r) => fmtInt.format(r.saved_output_tokens) },
      { title: "saved USD", value: (r) => fmtUsd(r.saved_cost_usd) },
      { title: "hits of unknown cost", value: (r) => fmtInt.format(r.saved_cost_unknown) },
    ], rows);
    return;
  }
  if (breakdownBy === "api_key") {
    const rows = await api("top_api_keys", { limit: 20 });
    fillTable(table, [{ title: "API key fingerprint", value: (r) => r.api_key_fingerprint || "(none)" },
      ...BREAKDOWN_COLUMNS], rows);
    return;
  }
  const rows = await api("totals", { by: breakdownBy });
  fillTable(table, [
    { title: breakdownBy.replace("_id", ""), value: (r) => r.key || "(none)" },
    ...BREAKDOWN_COLUMNS,
    { title: "error rate", value: (r) => fmtPct(r.error_rate) },
    { title: "p50 / p95 ms", value: (r) => `${fmtMs(r.latency_ms_p50)} / ${fmtMs(r.latency_ms_p95)}` },
  ], rows);
}

function recentFilters() {
  const form = new FormData($("#filters"));
  const out = {};
  for (const [k, v] of form.entries()) {
    if (k === "metadata") {
      const [key, ...rest] = String(v).split("=");
      if (key.trim()) { out.metadata_key = key.trim(); out.metadata_value = rest.join("=").trim(); }
    } else out[k] = v;
  }
  return out;
}

async function drawRecent() {
  const rows = await api("recent", { limit: 100, ...recentFilters() });
  fillTable($("#recent"), [
    { title: "time (UTC)", value: (r) => String(r.start_time).slice(0, 19).replace("T", " ") },
    { title: "account / gateway", value: (r) => `${r.account_id} / ${r.gateway_id}` },
    { title: "endpoint", value: (r) => `${r.api_version} ${r.endpoint}${r.stream ? " (stream)" : ""}` },
    { title: "model", value: (r) => r.model || "" },
    { title: "status", value: (r) => r.status_code },
    { title: "outcome", value: (r) => r.outcome, cls: (r) => (r.outcome === "ok" ? "outcome-ok" : "outcome-bad") },
    { title: "tokens in / out", value: (r) => `${r.usage_input_tokens ?? "–"} / ${r.usage_output_tokens ?? "–"}` },
    { title: "units", value: fmtUnits },
    { title: "latency ms", value: (r) => fmtMs(r.latency_total_ms) },
    { title: "cost USD", value: (r) => (r.cost_usd == null ? "unknown" : fmtUsd(r.cost_usd) +
      (r.model_implied ? " (default model)" : "")) },
  ], rows, showDetail);
}

// Each budget's use now (its own window, whatever the range), from the gateway configuration file the
// consumer was given; hidden when it was given none. Unknown cost is shown as such, never as $0.
async function drawBudgets() {
  const p = scope();
  p.delete("since");
  const resp = await fetch(`/api/budgets?${p}`);
  const body = await resp.json();
  if (!resp.ok) throw new Error(body.error || `budgets: HTTP ${resp.status}`);
  $("#budgets-section").hidden = body.source == null;
  if (body.source == null) return;
  $("#budgets-source").textContent = `from ${body.source}`;
  const who = (r) => (r.gateway_id ? `${r.account_id} / ${r.gateway_id}` : `${r.account_id} (account)`);
  fillTable($("#budgets"), [
    { title: "account / gateway", value: who },
    { title: "per", value: (r) => (r.value == null ? r.key : `${r.key} = ${r.value || "(none)"}`) },
    { title: "window", value: (r) => r.window },
    { title: "used USD", value: (r) => (r.cost_complete ? fmtUsd(r.used_usd) : `≥ ${fmtUsd(r.used_usd)}`) },
    { title: "budget USD", value: (r) => fmtUsd(r.limit_usd) },
    { title: "used", value: (r) => fmtPct(r.used_share), cls: (r) => (r.used_share >= 1 ? "outcome-bad" : "") },
    { title: "unknown cost", value: (r) => (r.unpriced_requests ? `${fmtInt.format(r.unpriced_requests)} requests` : "–") },
    { title: "requests", value: (r) => fmtInt.format(r.requests) },
  ], body.budgets);
}

async function drawFeedback() {
  const rows = await api("feedback", { by: feedbackBy });
  fillTable($("#feedback"), [
    { title: feedbackBy.replace("_id", ""), value: (r) => r.key || "(none)" },
    { title: "👍", value: (r) => fmtInt.format(r.positive) },
    { title: "👎", value: (r) => fmtInt.format(r.negative) },
    { title: "positive share", value: (r) => (r.positive + r.negative ? fmtPct(r.positive / (r.positive + r.negative)) : "–") },
    { title: "scored", value: (r) => fmtInt.format(r.scored) },
    { title: "mean score", value: (r) => (r.scored ? Number(r.mean_score).toFixed(1) : "–") },
  ], rows);
}

function showFeedback(f) {
  const given = (f && f.feedback) || 0;
  for (const b of $("#detail-feedback").querySelectorAll("[data-feedback]")) {
    b.classList.toggle("active", Number(b.dataset.feedback) === given);
  }
  $("#detail-feedback [name=score]").value = f && f.score != null ? f.score : "";
}

async function loadDetail() {
  const resp = await fetch(`/api/logs/${encodeURIComponent(detailId)}`);
  const body = await resp.json();
  if (!resp.ok) throw new Error(body.error || `HTTP ${resp.status}`);
  showFeedback(body.feedback);
  $("#detail-body").textContent = JSON.stringify(body, null, 2);
}

// Writes need the API token: the browser sends the credentials it logged in with (HTTP Basic).
async function sendFeedback(change) {
  const status = $("#detail-feedback-status");
  status.textContent = "saving…";
  try {
    const resp = await fetch(`/api/logs/${encodeURIComponent(detailId)}`, {
      method: "PATCH", headers: { "Content-Type": "application/json" }, body: JSON.stringify(change),
    });
    const body = await resp.json();
    if (!resp.ok) throw new Error(body.error || `HTTP ${resp.status}`);
    showFeedback(body);
    status.textContent = "saved";
    drawFeedback();
  } catch (err) {
    status.textContent = `not saved: ${err.message}`;
  }
}

async function showDetail(row) {
  detailId = row.event_id;
  $("#detail-id").textContent = row.event_id;
  $("#detail-body").textContent = "loading…";
  $("#detail-feedback-status").textContent = "";
  showFeedback(null);
  $("#detail").showModal();
  try {
    await loadDetail();
  } catch (err) {
    $("#detail-body").textContent = String(err);
  }
}

async function refreshOptions() {
  const [accounts, gateways, models, endpoints] = await Promise.all(
    ["account_id", "gateway_id", "model", "endpoint"].map((by) => api("totals", { by })),
  );
  setOptions($("#account"), accounts.map((r) => r.key));
  setOptions($("#gateway"), gateways.map((r) => r.key));
  setOptions($("#filters [name=model]"), models.map((r) => r.key));
  setOptions($("#filters [name=endpoint]"), endpoints.map((r) => r.key));
}

async function refresh() {
  const status = $("#status");
  const answers = new Map();
  refreshAnswers = answers;
  try {
    const step = STEP_FOR_RANGE[$("#range").value] || 60;
    const [summary, series] = await Promise.all([
      api("summary", { by: "none" }),
      api("timeseries", { by: "none", step_s: step }),
    ]);
    drawCards(summary.total, summary.cache);
    drawSeries(fillBuckets(series, step));
    await Promise.all([drawBreakdown(), drawRecent(), refreshOptions(), drawFeedback(), drawBudgets()]);
    status.textContent = `updated ${new Date().toLocaleTimeString()}`;
    document.body.dataset.loaded = "true";
  } catch (err) {
    status.textContent = `error: ${err.message}`;
  } finally {
    if (refreshAnswers === answers) refreshAnswers = null;
  }
}

function schedule() {
  clearInterval(refreshTimer);
  if ($("#autorefresh").checked) refreshTimer = setInterval(refresh, 5000);
}

document.addEventListener("DOMContentLoaded", () => {
  for (const id of ["#range", "#account", "#gateway"]) $(id).addEventListener("change", refresh);
  $("#filters").addEventListener("change", drawRecent);
  $("#filters").addEventListener("submit", (e) => { e.preventDefault(); drawRecent(); });
  $("#autorefresh").addEventListener("change", schedule);
  $("#breakdown-tabs").addEventListener("click", (e) => {
    const by = e.target.dataset.by;
    if (!by) return;
    breakdownBy = by;
    for (const b of $("#breakdown-tabs").children) b.classList.toggle("active", b === e.target);
    drawBreakdown();
  });
  $("#feedback-tabs").addEventListener("click", (e) => {
    const by = e.target.dataset.by;
    if (!by) return;
    feedbackBy = by;
    for (const b of $("#feedback-tabs").children) b.classList.toggle("active", b === e.target);
    drawFeedback();
  });
  $("#detail-feedback").addEventListener("click", (e) => {
    const value = e.target.dataset.feedback;
    if (value) sendFeedback({ feedback: Number(value) });
  });
  $("#detail-feedback").addEventListener("submit", (e) => {
    e.preventDefault();
    const score = $("#detail-feedback [name=score]").value;
    sendFeedback({ score: score === "" ? null : Number(score) });
  });
  refresh();
  schedule();
});
