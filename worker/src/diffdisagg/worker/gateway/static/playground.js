// diffdisagg playground: drives the gateway's public API (the same calls a client makes) and draws the
// per-request stage timings the gateway returns in its `diffdisagg.timings` extension field.
// No framework, no network beyond this origin (the page is served with a Content-Security-Policy).
"use strict";

const KEY_NAME = "diffdisagg.apiKey";
const POLL_MS = 300;
const VIDEO_TIMEOUT_MS = 10 * 60 * 1000;
// Which form field shows an error whose `param` is this (the gateway names the request field).
const PARAM_FIELD = {
  prompt: "prompt", negative_prompt: "negative_prompt", model: "model",
  size: "size", width: "size", height: "size",
  num_inference_steps: "num_inference_steps", guidance_scale: "guidance_scale", seed: "seed",
  num_frames: "num_frames", seconds: "num_frames", fps: "num_frames",
};
const $ = (id) => document.getElementById(id);

function apiKey() {
  return sessionStorage.getItem(KEY_NAME) || localStorage.getItem(KEY_NAME) || "";
}

function saveKey() {
  const key = $("api-key").value.trim();
  sessionStorage.removeItem(KEY_NAME);
  localStorage.removeItem(KEY_NAME);
  if (key) ($("remember-key").checked ? localStorage : sessionStorage).setItem(KEY_NAME, key);
  clearErrors();
  loadModels();
}

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = apiKey();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

class ApiError extends Error {
  constructor(status, body) {
    const e = (body && body.error) || {};
    super(e.message || `HTTP ${status}`);
    this.status = status;
    this.param = e.param || null;
    this.code = e.code || null;
  }
}

async function api(method, path, body) {
  let resp;
  try {
    resp = await fetch(path, { method, headers: headers(body !== undefined), body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (err) {
    throw new ApiError(0, { error: { message: `cannot reach the gateway: ${err.message}` } });
  }
  if (!resp.ok) {
    let parsed = null;
    try { parsed = await resp.json(); } catch (_) { parsed = { error: { message: `HTTP ${resp.status} ${resp.statusText}` } }; }
    throw new ApiError(resp.status, parsed);
  }
  return resp;
}

function clearErrors() {
  for (const el of document.querySelectorAll(".field-error")) el.textContent = "";
  for (const el of document.querySelectorAll(".invalid")) el.classList.remove("invalid");
}

function showError(err) {
  let field = "general";
  if (err.status === 401) field = "api_key";
  else if (err.param && PARAM_FIELD[err.param]) field = PARAM_FIELD[err.param];
  const box = $("err-" + field) || $("err-general");
  const prefix = err.status ? `${err.status}: ` : "";
  box.textContent = prefix + err.message;
  const input = document.querySelector(`[name="${field}"]`) || (field === "api_key" ? $("api-key") : null);
  if (input) { input.classList.add("invalid"); input.focus(); }
  setStatus("");
}

function setStatus(text) { $("status").textContent = text; }

async function loadModels() {
  const select = $("model");
  try {
    const data = await (await api("GET", "/v1/models")).json();
    select.replaceChildren(...data.data.map((m) => new Option(m.id, m.id)));
    // A video family serves videos: preselect the mode the model makes.
    if (data.data.length && /wan|video/i.test(data.data[0].id)) setMode("video");
  } catch (err) {
    showError(err);
  }
}

function mode() { return document.querySelector('input[name="mode"]:checked').value; }

function setMode(m) {
  document.querySelector(`input[name="mode"][value="${m}"]`).checked = true;
  document.body.classList.toggle("video", m === "video");
}

function numberField(id, parse) {
  const raw = $(id).value.trim();
  if (raw === "") return undefined;
  const v = parse(raw);
  return Number.isFinite(v) ? v : raw; // a non-number goes to the gateway, whose message says why
}

function requestBody() {
  const body = { prompt: $("prompt").value };
  const model = $("model").value;
  if (model) body.model = model;
  const neg = $("negative_prompt").value.trim();
  if (neg) body.negative_prompt = neg;
  const size = $("size").value.trim();
  if (size) body.size = size;
  const fields = [["steps", "num_inference_steps", parseInt], ["guidance", "guidance_scale", parseFloat], ["seed", "seed", parseInt]];
  if (mode() === "video") fields.push(["num_frames", "num_frames", parseInt]);
  for (const [id, name, parse] of fields) {
    const v = numberField(id, parse);
    if (v !== undefined) body[name] = v;
  }
  return body;
}

function fmtBytes(n) {
  if (n >= 1 << 20) return (n / (1 << 20)).toFixed(2) + " MiB";
  if (n >= 1 << 10) return (n / (1 << 10)).toFixed(1) + " KiB";
  return n + " B";
}

function segLabel(s) {
  if (s.kind === "handover") return `hand-over ${s.from}\u2192${s.to}`;
  if (s.kind === "queue") return `queue ${s.role}`;
  if (s.kind === "compute") return s.role;
  return "other";
}

function segDetail(s) {
  const parts = [];
  if (s.kind === "handover") {
    const rate = s.ms > 0 ? ` (${(s.bytes / (1 << 20) / (s.ms / 1000)).toFixed(1)} MiB/s)` : "";
    parts.push(fmtBytes(s.bytes) + rate);
    if (s.write_ms !== undefined) parts.push(`write ${s.write_ms.toFixed(1)} ms`);
    if (s.attempts > 1) parts.push(`${s.attempts} receivers tried`);
  } else if (s.kind === "queue") {
    if (s.receiver_wait_ms !== undefined) parts.push(`${s.receiver_wait_ms.toFixed(1)} ms finding a receiver`);
    if (s.worker_queue_ms !== undefined) parts.push(`${s.worker_queue_ms.toFixed(1)} ms in the worker's queue`);
  } else if (s.kind === "compute") {
    if (s.batch_size > 1) parts.push(`batched with ${s.batch_size - 1} other request(s)`);
    if (s.encode_ms !== undefined) parts.push(`${s.encode_ms.toFixed(1)} ms of it encoding the media`);
  } else if (s.kind === "other") {
    parts.push("before the last attempt (a restart) or unexplained");
  }
  return parts.join("; ");
}

function renderTimings(t) {
  const bar = $("stage-bar");
  const tbody = $("stage-table").querySelector("tbody");
  bar.replaceChildren();
  tbody.replaceChildren();
  if (!t || !t.segments) { $("total-ms").textContent = "\u2013"; return; }
  const total = t.total_ms || t.segments.reduce((a, s) => a + s.ms, 0) || 1;
  for (const s of t.segments) {
    const seg = document.createElement("div");
    seg.className = `seg ${s.kind} ${s.role || ""}`.trim();
    seg.dataset.kind = s.kind;
    if (s.role) seg.dataset.role = s.role;
    if (s.kind === "handover") { seg.dataset.from = s.from; seg.dataset.to = s.to; seg.dataset.bytes = s.bytes; }
    seg.dataset.ms = s.ms;
    seg.style.flexGrow = String(Math.max(s.ms, 0));
    seg.style.flexBasis = "0";
    seg.title = `${segLabel(s)}: ${s.ms.toFixed(1)} ms ${segDetail(s)}`;
    if (s.ms / total > 0.06) seg.textContent = segLabel(s);
    bar.appendChild(seg);
    const row = tbody.insertRow();
    const swatch = document.createElement("span");
    swatch.className = `swatch seg ${s.kind} ${s.role || ""}`;
    const name = row.insertCell();
    name.append(swatch, segLabel(s));
    row.insertCell().textContent = s.ms.toFixed(1);
    row.insertCell().textContent = segDetail(s);
  }
  $("total-ms").textContent = t.total_ms !== undefined ? `${t.total_ms.toFixed(1)} ms` + (t.restarts ? ` (${t.restarts} restart)` : "") : "\u2013";
}

function showResult({ element, seed, size, requestId, timings }) {
  $("result").hidden = false;
  $("media").replaceChildren(element);
  $("seed-used").textContent = seed ?? "\u2013";
  $("size-used").textContent = size ?? "\u2013";
  $("request-id").textContent = requestId ?? "\u2013";
  renderTimings(timings);
}

async function generateImage(body) {
  setStatus("generating\u2026");
  const t0 = performance.now();
  const data = await (await api("POST", "/v1/images/generations", { ...body, response_format: "b64_json" })).json();
  const img = new Image();
  img.id = "result-image";
  img.alt = body.prompt;
  const loaded = new Promise((ok, fail) => { img.onload = ok; img.onerror = () => fail(new Error("the image did not decode")); });
  img.src = "data:image/png;base64," + data.data[0].b64_json;
  await loaded;
  const ext = data.diffdisagg || {};
  showResult({
    element: img,
    seed: ext.seeds ? ext.seeds[0] : body.seed,
    size: `${img.naturalWidth}x${img.naturalHeight}`,
    requestId: ext.request_ids ? ext.request_ids[0] : null,
    timings: ext.timings ? ext.timings[0] : null,
  });
  setStatus(`done in ${((performance.now() - t0) / 1000).toFixed(2)} s`);
}

async function generateVideo(body) {
  const wrap = $("progress-wrap");
  let job = await (await api("POST", "/v1/videos", body)).json();
  $("result").hidden = false;
  $("media").replaceChildren();
  renderTimings(null);
  wrap.hidden = false;
  const deadline = Date.now() + VIDEO_TIMEOUT_MS;
  const ext0 = job.diffdisagg || {};
  $("seed-used").textContent = ext0.seed ?? body.seed ?? "\u2013";
  $("request-id").textContent = ext0.request_id ?? "\u2013";
  $("size-used").textContent = job.size ?? "\u2013";
  while (job.status === "queued" || job.status === "in_progress") {
    $("progress").value = job.progress || 0;
    $("progress-text").textContent = `${job.status} ${job.progress || 0}%`;
    setStatus(`video job ${job.id}: ${job.status}`);
    if (Date.now() > deadline) throw new ApiError(0, { error: { message: `video job ${job.id} still ${job.status}; gave up waiting` } });
    await new Promise((r) => setTimeout(r, POLL_MS));
    job = await (await api("GET", `/v1/videos/${encodeURIComponent(job.id)}`)).json();
  }
  $("progress").value = job.progress || 0;
  $("progress-text").textContent = `${job.status} ${job.progress || 0}%`;
  if (job.status !== "completed") {
    const e = job.error || {};
    throw new ApiError(0, { error: { message: `video job failed: ${e.message || job.status}`, param: e.param } });
  }
  const blob = await (await api("GET", `/v1/videos/${encodeURIComponent(job.id)}/content`)).blob();
  const video = document.createElement("video");
  video.id = "result-video";
  video.controls = true;
  video.loop = true;
  video.muted = true;
  video.playsInline = true;
  video.preload = "auto";
  video.src = URL.createObjectURL(blob);
  const ext = job.diffdisagg || {};
  showResult({ element: video, seed: ext.seed ?? body.seed, size: job.size, requestId: ext.request_id, timings: ext.timings });
  setStatus(`video job ${job.id}: completed (${fmtBytes(blob.size)})`);
}

async function onSubmit(ev) {
  ev.preventDefault();
  clearErrors();
  const button = $("generate");
  button.disabled = true;
  try {
    const body = requestBody();
    if (mode() === "video") await generateVideo(body);
    else await generateImage(body);
  } catch (err) {
    showError(err instanceof ApiError ? err : new ApiError(0, { error: { message: String(err.message || err) } }));
  } finally {
    button.disabled = false;
  }
}

function init() {
  $("api-key").value = apiKey();
  $("remember-key").checked = !!localStorage.getItem(KEY_NAME);
  $("save-key").addEventListener("click", saveKey);
  $("api-key").addEventListener("keydown", (e) => { if (e.key === "Enter") { e.preventDefault(); saveKey(); } });
  for (const r of document.querySelectorAll('input[name="mode"]')) r.addEventListener("change", () => setMode(mode()));
  $("gen").addEventListener("submit", onSubmit);
  setMode(mode());
  loadModels();
}

document.addEventListener("DOMContentLoaded", init);
