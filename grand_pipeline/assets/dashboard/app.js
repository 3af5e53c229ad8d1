// grand dashboard: polls /api/status and renders it. DOM nodes are built with textContent only,
// so shard ids, stage names and errors from the store can never inject markup.
"use strict";

const COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"];
const SVG = "http://www.w3.org/2000/svg";

function el(tag, text, attrs) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "unknown";
  if (seconds <= 0) return "done";
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  return h ? `${h}h ${m}m` : m ? `${m}m ${r}s` : `${r}s`;
}

function rate(value) {
  return value === null || value === undefined ? "n/a" : Number(value).toFixed(2);
}

function cell(row, field, value, text) {
  const td = el("td", text === undefined ? value : text, {"data-field": field});
  if (value !== null && value !== undefined) td.setAttribute("data-value", String(value));
  row.appendChild(td);
  return td;
}

function renderLevels(levels) {
  const body = document.querySelector("#levels tbody");
  body.replaceChildren();
  for (const lv of levels) {
    const tr = el("tr", null, {"data-level": String(lv.level)});
    cell(tr, "level", lv.level);
    cell(tr, "units_committed", lv.units_committed);
    cell(tr, "units_total", lv.units_total);
    cell(tr, "shards_committed", lv.shards_committed);
    cell(tr, "shards_total", lv.shards_total);
    const frac = lv.units_total ? lv.units_committed / lv.units_total : 0;
    const bar = el("span", null, {class: "bar", title: `${Math.round(frac * 100)}%`});
    const fill = el("span");
    fill.style.width = `${Math.round(frac * 100)}%`;
    bar.appendChild(fill);
    cell(tr, "progress", frac, "").appendChild(bar);
    cell(tr, "images_ok", lv.images_ok);
    cell(tr, "images_failed", lv.images_failed);
    cell(tr, "images_per_second", lv.images_per_second, rate(lv.images_per_second));
    cell(tr, "wall_images_per_second", lv.wall_images_per_second, rate(lv.wall_images_per_second));
    cell(tr, "eta_seconds", lv.eta_seconds, duration(lv.eta_seconds));
    const llm = lv.llm_attempts || {};
    const total = Object.values(llm).reduce((a, b) => a + b, 0);
    cell(tr, "llm_attempts", total, total ? `${total} (${llm.failed || 0} failed)` : "0");
    body.appendChild(tr);
  }
}

function renderPairs(selector, levels, key) {
  const body = document.querySelector(`${selector} tbody`);
  body.replaceChildren();
  for (const lv of levels) {
    for (const [name, count] of Object.entries(lv[key] || {})) {
      const tr = el("tr", null, {"data-level": String(lv.level), "data-name": name});
      cell(tr, "level", lv.level);
      cell(tr, "name", name);
      cell(tr, "count", count);
      body.appendChild(tr);
    }
  }
  if (!body.children.length) body.appendChild(el("tr")).appendChild(el("td", "none", {colspan: "3"}));
}

function renderChart(levels) {
  const box = document.getElementById("chart");
  const W = 720, H = 220, P = 40;
  const series = levels.filter((lv) => (lv.timeline || []).length);
  box.replaceChildren();
  if (!series.length) { box.appendChild(el("p", "no timed shards yet", {class: "muted"})); return; }
  const pts = series.flatMap((lv) => lv.timeline);
  const t0 = Math.min(...pts.map((p) => p.t)), t1 = Math.max(...pts.map((p) => p.t));
  const ymax = Math.max(...pts.map((p) => p.images_per_second), 1e-9);
  const x = (t) => P + (t1 > t0 ? (t - t0) / (t1 - t0) : 0.5) * (W - 2 * P);
  const y = (v) => H - P + 10 - (v / ymax) * (H - P - 10);
  const root = svg("svg", {width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img"});
  root.appendChild(svg("line", {x1: P, y1: H - P + 10, x2: W - P, y2: H - P + 10, stroke: "#999"}));
  const top = svg("text", {x: 4, y: 14}); top.textContent = `${ymax.toFixed(2)} img/s`;
  root.appendChild(top);
  const span = svg("text", {x: P, y: H - 8});
  span.textContent = `${new Date(t0 * 1000).toLocaleTimeString()} to ${new Date(t1 * 1000).toLocaleTimeString()}`;
  root.appendChild(span);
  series.forEach((lv, i) => {
    const colour = COLOURS[i % COLOURS.length];
    const line = lv.timeline.map((p) => `${x(p.t).toFixed(1)},${y(p.images_per_second).toFixed(1)}`);
    root.appendChild(svg("polyline", {points: line.join(" "), fill: "none", stroke: colour,
      "stroke-width": 2, "data-level": String(lv.level)}));
    const key = svg("text", {x: W - P - 70, y: 16 + 14 * i});
    key.style.fill = colour;  // the stylesheet's text colour would win over a fill attribute
    key.textContent = `level ${lv.level}`;
    root.appendChild(key);
  });
  box.appendChild(root);
}

function renderMatrix(matrix) {
  const table = document.getElementById("matrix");
  const shards = Object.keys(matrix).sort();
  const levels = [...new Set(shards.flatMap((s) => Object.keys(matrix[s])))].sort((a, b) => a - b);
  const head = el("tr");
  head.appendChild(el("th", "shard"));
  levels.forEach((lv) => head.appendChild(el("th", `L${lv}`)));
  table.tHead.replaceChildren(head);
  const body = table.tBodies[0];
  body.replaceChildren();
  for (const shard of shards) {
    const tr = el("tr", null, {"data-shard": shard});
    tr.appendChild(el("td", shard));
    for (const lv of levels) {
      const state = matrix[shard][lv] || "missing";
      const mark = {committed: "\u2713", partial: "~"}[state] || "\u00b7";
      tr.appendChild(el("td", mark,
        {class: state === "committed" ? "done" : state, "data-level": lv, "data-state": state}));
    }
    body.appendChild(tr);
  }
}

function renderTraining(training) {
  const section = document.getElementById("training");
  section.hidden = !training;
  if (!training) return;
  const body = document.querySelector("#train tbody");
  body.replaceChildren();
  const tr = el("tr");
  const last = training.last;
  for (const key of ["step", "loss", "ce", "bce", "dice", "lr", "samples_per_s"]) {
    const value = last[key];
    cell(tr, key, value, typeof value === "number" && key !== "step" ? value.toPrecision(4) : String(value));
  }
  body.appendChild(tr);
}

async function refresh() {
  const error = document.getElementById("error");
  try {
    const response = await fetch("/api/status", {cache: "no-store"});
    const data = await response.json();
    if (!response.ok) throw new Error(data.error || response.statusText);
    const run = data.run || {};
    document.getElementById("run").textContent =
      `${data.output} \u2014 profile ${run.profile || "?"}, config ${run.config_hash || "?"}, ` +
      `code ${run.code_version || "?"}, ${data.shards.length} shard(s)`;
    renderLevels(data.levels);
    renderChart(data.levels);
    renderPairs("#failures", data.levels, "failures_by_stage");
    renderPairs("#checks", data.levels, "verify_failures");
    renderMatrix(data.matrix || {});
    renderTraining(data.training);
    error.hidden = true;
    document.body.setAttribute("data-loaded", String(data.generated_at));
  } catch (exc) {
    error.textContent = `could not load status: ${exc.message}`;
    error.hidden = false;
  }
}

refresh();
setInterval(refresh, 5000);
