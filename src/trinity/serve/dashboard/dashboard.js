// The dashboard's client: one EventSource on /dashboard/events, one snapshot (JSON) about once a second,
// written into elements with stable ids and two canvases (tokens/s history, expert-load heatmap).
"use strict";

const HISTORY = 120;            // tokens/s points kept for the chart (two minutes at one a second)
const STALE_MS = 5000;          // no snapshot for this long: say so instead of showing old numbers as live
const tpsHistory = [];
let lastMessage = 0;
let lastExperts = null;         // the heatmap's data, kept for the hover tooltip

const $ = (id) => document.getElementById(id);

function setText(id, text) {
  const el = $(id);
  if (el && el.textContent !== text) el.textContent = text;
}

function fmtNum(v, digits = 1) {
  return v === null || v === undefined ? "–" : Number(v).toFixed(digits);
}

function fmtSeconds(v) {
  if (v === null || v === undefined) return "–";
  return v >= 1 ? v.toFixed(2) + " s" : (v * 1000).toFixed(v < 0.01 ? 2 : 1) + " ms";
}

function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  const gib = n / 2 ** 30;
  return gib >= 1 ? gib.toFixed(1) + " GiB" : (n / 2 ** 20).toFixed(0) + " MiB";
}

function fmtDuration(s) {
  s = Math.floor(s);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  return h ? `${h}h ${m}m` : m ? `${m}m ${sec}s` : `${sec}s`;
}

// ------------------------------------------------------------------ cards
function renderLatency(prefix, stats) {
  setText(prefix + "-mean", fmtSeconds(stats.mean));
  setText(prefix + "-p50", fmtSeconds(stats.p50));
  setText(prefix + "-p90", fmtSeconds(stats.p90));
  setText(prefix + "-count", String(stats.count));
}

function renderKv(kv) {
  setText("kv-block-size", kv.block_size ? `(${kv.block_size}-token blocks)` : "");
  const box = $("kv-pools");
  for (const [pool, p] of Object.entries(kv.pools)) {
    let row = $("kv-" + pool);
    if (!row) {
      if (box.querySelector("p")) box.textContent = "";
      row = document.createElement("div");
      row.className = "pool";
      row.innerHTML = '<div class="label"><span class="name"></span><span class="value"></span></div>' +
        '<div class="bar"><div></div></div>';
      row.id = "kv-" + pool;
      row.querySelector(".name").textContent = pool;
      box.appendChild(row);
    }
    const pct = 100 * p.usage;
    row.querySelector(".value").textContent = `${p.used_blocks} / ${p.total_blocks} blocks (${pct.toFixed(1)}%)`;
    const bar = row.querySelector(".bar > div");
    bar.style.width = pct.toFixed(1) + "%";
    bar.className = pct >= 95 ? "full" : pct >= 75 ? "high" : "";
  }
}

function renderGpus(gpus) {
  // Each row keeps its label cell; the value cells are rebuilt: one per GPU, or one saying "no GPU".
  const rows = {
    "gpu-names": (g) => g.name,
    "gpu-util": (g) => g.util_percent === null ? "–" : g.util_percent.toFixed(0) + " %",
    "gpu-memory": (g) => `${fmtBytes(g.memory_used_bytes)} / ${fmtBytes(g.memory_total_bytes)}`,
    "gpu-power": (g) => g.power_watts === null ? "–" :
      g.power_watts.toFixed(0) + " W" + (g.power_limit_watts ? ` / ${g.power_limit_watts.toFixed(0)} W` : ""),
    "gpu-temp": (g) => g.temperature_c === null ? "–" : g.temperature_c.toFixed(0) + " °C",
  };
  for (const [id, cell] of Object.entries(rows)) {
    const tr = $(id);
    const values = gpus ? gpus.map(cell) : [id === "gpu-names" ? "" : "no GPU"];
    const cells = [...tr.querySelectorAll("td")];
    if (cells.length !== values.length) {
      cells.forEach((td) => td.remove());
      values.forEach(() => tr.appendChild(document.createElement("td")));
    }
    [...tr.querySelectorAll("td")].forEach((td, i) => { if (td.textContent !== values[i]) td.textContent = values[i]; });
  }
}

// ------------------------------------------------------------------ canvases
function fitCanvas(canvas, cssHeight) {
  const dpr = window.devicePixelRatio || 1;
  const width = Math.max(100, Math.floor(canvas.clientWidth * dpr));
  const height = Math.floor(cssHeight * dpr);
  if (canvas.width !== width || canvas.height !== height) {
    canvas.width = width;
    canvas.height = height;
  }
  canvas.style.height = cssHeight + "px";
  return dpr;
}

function drawTpsChart() {
  const canvas = $("tps-chart");
  fitCanvas(canvas, 70);
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height;
  ctx.clearRect(0, 0, w, h);
  const values = tpsHistory.map((v) => v || 0);
  const max = Math.max(1, ...values);
  ctx.strokeStyle = "#58a6ff";
  ctx.lineWidth = 2;
  ctx.beginPath();
  values.forEach((v, i) => {
    const x = (w * (i + HISTORY - values.length)) / (HISTORY - 1);
    const y = h - 2 - (h - 4) * (v / max);
    if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
  });
  ctx.stroke();
}

// Diverging ramp, the same stops as the legend: 0 → dark blue, 1 (an even share) → light, 2+ → red.
const RAMP = [[13, 27, 62], [44, 111, 187], [240, 240, 240], [240, 138, 75], [178, 24, 43]];

function colour(ratio) {
  const t = Math.min(Math.max(ratio, 0), 2) * 2;          // 0..4 along the ramp
  const i = Math.min(Math.floor(t), RAMP.length - 2), f = t - i;
  const c = RAMP[i].map((a, k) => Math.round(a + (RAMP[i + 1][k] - a) * f));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

const LABEL_W = 44;              // css px for the layer labels

function heatmapGeometry(canvas, experts) {
  const layers = experts.tokens.length, n = experts.num_experts;
  const cellH = Math.max(6, Math.min(22, Math.floor(360 / Math.max(1, layers))));
  const dpr = fitCanvas(canvas, layers * cellH + 2);
  const left = LABEL_W * dpr;
  return { layers, n, dpr, left, cellW: (canvas.width - left) / Math.max(1, n), cellH: cellH * dpr };
}

function drawHeatmap(experts) {
  const canvas = $("expert-heatmap");
  const ctx = canvas.getContext("2d");
  if (!experts || !experts.tokens.length) {
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    canvas.dataset.cells = "0";
    setText("heatmap-note", "no routing yet");
    setText("heatmap-basis", "");
    return;
  }
  const g = heatmapGeometry(canvas, experts);
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.font = `${Math.round(11 * g.dpr)}px system-ui, sans-serif`;
  ctx.textBaseline = "middle";
  let cells = 0;
  experts.tokens.forEach((row, r) => {
    const total = row.reduce((a, b) => a + b, 0);
    const even = total / Math.max(1, g.n);
    const y = r * g.cellH;
    ctx.fillStyle = "#8b98a8";
    if (g.cellH >= 9 * g.dpr || r % Math.ceil(9 * g.dpr / g.cellH) === 0) {
      ctx.fillText("L" + experts.layers[r], 2 * g.dpr, y + g.cellH / 2);
    }
    row.forEach((count, e) => {
      ctx.fillStyle = total > 0 ? colour(count / even) : "#2b3440";
      // a one-pixel gap between cells while they are wide enough to keep it
      const gap = g.cellW > 4 * g.dpr ? g.dpr : 0;
      ctx.fillRect(g.left + e * g.cellW, y, Math.max(1, g.cellW - gap), Math.max(1, g.cellH - gap));
      cells += 1;
    });
  });
  canvas.dataset.cells = String(cells);
  canvas.dataset.layers = String(g.layers);
  canvas.dataset.experts = String(g.n);
  const basis = experts.basis === "recent" ? `last ${experts.window_s.toFixed(0)} s` : "since start (idle now)";
  setText("heatmap-basis", `(${g.layers} layers × ${g.n} experts, ${basis})`);
  const worst = Math.max(...experts.imbalance.filter((x) => x !== null), 0);
  setText("heatmap-note", worst ? `worst layer max/mean ${worst.toFixed(2)}` : "");
}

function heatmapTip(event) {
  const tip = $("heatmap-tip");
  const canvas = $("expert-heatmap");
  if (!lastExperts || !lastExperts.tokens.length) { tip.hidden = true; return; }
  const dpr = window.devicePixelRatio || 1;
  const layers = lastExperts.tokens.length, n = lastExperts.num_experts;
  const cellH = canvas.height / layers;
  const cellW = (canvas.width - LABEL_W * dpr) / n;
  const rect = canvas.getBoundingClientRect();
  const x = (event.clientX - rect.left) * dpr - LABEL_W * dpr, y = (event.clientY - rect.top) * dpr;
  const r = Math.floor(y / cellH), e = Math.floor(x / cellW);
  if (x < 0 || r < 0 || r >= layers || e < 0 || e >= n) { tip.hidden = true; return; }
  const row = lastExperts.tokens[r];
  const total = row.reduce((a, b) => a + b, 0);
  const ratio = total ? row[e] / (total / n) : 0;
  tip.textContent = `layer ${lastExperts.layers[r]}, expert ${e}: ${row[e]} tokens (${ratio.toFixed(2)}× even)`;
  tip.style.left = (event.clientX - rect.left + 12) + "px";
  tip.style.top = (event.clientY - rect.top + 12) + "px";
  tip.hidden = false;
}

// ------------------------------------------------------------------ the stream
function render(s) {
  const status = $("status");
  status.textContent = s.status;
  status.className = "pill " + s.status.replace(/\s+/g, "-");
  setText("model", s.model || "–");
  setText("uptime", fmtDuration(s.uptime_s));
  setText("tokens-per-s", fmtNum(s.tokens_per_s));
  setText("prompt-tokens-per-s", fmtNum(s.prompt_tokens_per_s));
  setText("total-tokens", String(s.total_generated_tokens));
  setText("total-prompt-tokens", String(s.total_prompt_tokens));
  setText("steps", String(s.steps));
  setText("running", String(s.running));
  setText("waiting", String(s.waiting));
  setText("in-flight", String(s.in_flight_http));
  setText("preemptions", String(s.preemptions));
  setText("latency-window", `(last ${s.ttft.window_s.toFixed(0)} s)`);
  renderLatency("ttft", s.ttft);
  renderLatency("itl", s.itl);
  renderKv(s.kv);
  const pc = s.prefix_cache;  // tokens of admitted sequences found in the cache, since start
  setText("prefix-hits", !pc ? "–" : !pc.enabled ? "off"
    : `${(100 * pc.hit_rate).toFixed(1)}% of ${pc.queried_tokens} tokens`);
  renderGpus(s.gpus);
  tpsHistory.push(s.tokens_per_s);
  if (tpsHistory.length > HISTORY) tpsHistory.shift();
  drawTpsChart();
  lastExperts = s.experts;
  drawHeatmap(s.experts);
  setText("updated", new Date(s.time * 1000).toLocaleTimeString());
}

function connect() {
  const key = new URLSearchParams(location.search).get("key");
  if (key) history.replaceState(null, "", location.pathname);   // the server's cookie stands in for it now
  const source = new EventSource("/dashboard/events" + (key ? "?key=" + encodeURIComponent(key) : ""));
  source.onopen = () => setText("connection", "live");
  source.onmessage = (event) => {
    lastMessage = Date.now();
    setText("connection", "live");
    render(JSON.parse(event.data));
  };
  source.addEventListener("problem", (event) => setText("connection", "server error: " +
    JSON.parse(event.data).message));
  source.addEventListener("end", () => {
    source.close();
    setText("connection", "server stopped");
    $("status").className = "pill disconnected";
  });
  source.onerror = () => {
    // CLOSED: the browser gave up (a 401, say); otherwise it reconnects by itself
    setText("connection", source.readyState === EventSource.CLOSED ? "disconnected (reload to retry)" :
      "reconnecting");
  };
  setInterval(() => {
    if (lastMessage && Date.now() - lastMessage > STALE_MS && source.readyState !== EventSource.CLOSED) {
      setText("connection", "stale");
    }
  }, 1000);
  $("expert-heatmap").addEventListener("mousemove", heatmapTip);
  $("expert-heatmap").addEventListener("mouseleave", () => { $("heatmap-tip").hidden = true; });
  window.addEventListener("resize", () => { drawTpsChart(); drawHeatmap(lastExperts); });
}

connect();
