// imgsim web page: plain JavaScript over the JSON API (no build step, no external scripts).
"use strict";

const FINAL = new Set(["succeeded", "failed", "canceled"]);
const KEY_STORAGE = "imgsim.apiKey";
const THUMB_SIZE = 256;
const $ = (id) => document.getElementById(id);

// Jobs started from this page, newest first: shown when the server has no job list.
const pageJobs = [];
let queryToken = 0;

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function apiKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// fetch + JSON; every error the API sends is {"error": {"code", "message"}}.
async function api(path, options = {}) {
  const init = { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } };
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    throw new ApiError(0, "network_error", `cannot reach the server (${err.message})`);
  }
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    body = null;
  }
  if (!response.ok) {
    const error = (body && body.error) || {};
    throw new ApiError(response.status, error.code || "http_error",
      error.message || `${response.status} ${response.statusText}`);
  }
  return body;
}

function postJson(path, body) {
  return api(path, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
}

// Long-poll a job (GET /jobs/<id>?wait=N) until it ends, reporting each record seen.
async function pollJob(jobId, onUpdate, wait) {
  for (;;) {
    const asked = Date.now();
    const job = await api(`/jobs/${jobId}?wait=${wait}`);
    onUpdate(job);
    if (FINAL.has(job.status)) return job;
    // An early answer for a job still running means the server declined to hold the request
    // (every long-poll slot busy, Retry-After: 1): ask again a second later, not at once.
    if (Date.now() - asked < (wait * 1000) / 2) {
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  }
}

// <img> cannot send a bearer header: with a key set, images are fetched and shown as blobs.
async function setImage(img, url) {
  if (!apiKey()) {
    img.src = url;
    return;
  }
  try {
    const response = await fetch(url, { headers: authHeaders() });
    if (response.ok) img.src = URL.createObjectURL(await response.blob());
  } catch (_) {
    /* leave the placeholder background */
  }
}

function thumbUrl(imageId) {
  return `/images/${encodeURIComponent(imageId)}?size=${THUMB_SIZE}`;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

function show(node, visible) {
  node.hidden = !visible;
}

function setError(node, err) {
  if (!err) {
    show(node, false);
    node.textContent = "";
    return;
  }
  node.textContent = err.code && err.code !== "http_error" ? `${err.message} (${err.code})`
    : err.message;
  show(node, true);
}

function basename(path) {
  const parts = String(path).split("/");
  return { name: parts.pop(), folder: parts.join("/") };
}

function fmt(value, digits = 3) {
  return value == null || Number.isNaN(Number(value)) ? "–" : Number(value).toFixed(digits);
}

function rememberJob(job, detail) {
  pageJobs.unshift({ ...job, detail });
  pageJobs.splice(20);
}

function updatePageJob(job) {
  const known = pageJobs.find((j) => j.job_id === job.job_id);
  if (known) Object.assign(known, job, { detail: known.detail });
}

// ---- search ----------------------------------------------------------------------------------

function setQueryProgress(status, text) {
  const bar = $("query-bar");
  const width = { queued: 15, running: 60, succeeded: 100, failed: 100, canceled: 100 }[status];
  bar.style.width = `${width || 5}%`;
  bar.classList.toggle("done", status === "succeeded");
  bar.classList.toggle("failed", status === "failed" || status === "canceled");
  $("query-status").textContent = text || status;
}

// Start a query job: an uploaded file, or an indexed image (by id, or by its bytes).
async function startQuery(source, k) {
  if (source.file) {
    const form = new FormData();
    form.append("image", source.file, source.file.name || "upload");
    form.append("k", String(k));
    return api("/jobs/query", { method: "POST", body: form });
  }
  try {
    return await postJson("/jobs/query", { image_id: source.imageId, k });
  } catch (err) {
    // Servers without query-by-id answer missing_image (they expect an upload): send the
    // indexed image's own bytes instead.
    if (err.code !== "missing_image" && err.status !== 415) throw err;
  }
  const response = await fetch(`/images/${encodeURIComponent(source.imageId)}`,
    { headers: authHeaders() });
  if (!response.ok) throw new ApiError(response.status, "image_not_found", "image unavailable");
  const form = new FormData();
  form.append("image", await response.blob(), basename(source.label).name);
  form.append("k", String(k));
  return api("/jobs/query", { method: "POST", body: form });
}

async function runQuery(source) {
  const token = ++queryToken;
  const k = Number($("k-input").value);
  const img = $("query-image");
  if (source.file) img.src = URL.createObjectURL(source.file);
  else setImage(img, thumbUrl(source.imageId));
  $("query-title").textContent = source.label;
  show($("query"), true);
  setError($("query-error"), null);
  $("hits").replaceChildren();
  $("hits").dataset.state = "running";
  setQueryProgress("queued", "submitting…");
  const started = performance.now();
  try {
    const accepted = await startQuery(source, k);
    rememberJob({ ...accepted, type: "query" }, source.label);
    renderJobs();
    const job = await pollJob(accepted.job_id, (record) => {
      if (token === queryToken) setQueryProgress(record.status, record.status);
      updatePageJob(record);
    }, 10);
    if (token !== queryToken) return;
    if (job.status !== "succeeded") {
      const error = job.error || { code: job.status, message: `query ${job.status}` };
      throw new ApiError(0, error.code, error.message);
    }
    const ms = Math.round(performance.now() - started);
    const result = job.result;
    const method = result.search && result.search.method ? ` · ${result.search.method}` : "";
    setQueryProgress("succeeded",
      `${result.hits.length} hits in ${ms} ms · model ${result.model_version}${method}`);
    renderHits(result.hits);
  } catch (err) {
    if (token !== queryToken) return;
    setQueryProgress("failed", "failed");
    setError($("query-error"), err);
    $("hits").dataset.state = "failed";
  } finally {
    refreshJobs();
  }
}

function renderHits(hits) {
  const grid = $("hits");
  grid.replaceChildren();
  hits.forEach((hit, i) => {
    const split = basename(hit.path);
    // An uploaded image is stored under its content id; "name" is its own file name.
    const name = hit.name || split.name;
    const folder = hit.name ? "uploaded" : split.folder;
    const img = el("img", { alt: hit.path, loading: "lazy", width: "256", height: "256" });
    setImage(img, thumbUrl(hit.image_id));
    const figure = el("figure", {
      class: "hit", tabindex: "0", title: `${hit.path}\nclick to search with this image`,
      "data-image-id": hit.image_id,
    },
    el("div", { class: "hit-frame" }, el("span", { class: "rank", text: `#${i + 1}` }), img),
    el("figcaption", {},
      el("div", { class: "name", text: name }),
      el("div", { class: "folder", text: folder || "\u00a0" }),
      el("div", { class: "scores" },
        el("span", { class: "score", text: `score ${fmt(hit.score)}` }),
        el("span", { class: "distance", text: `d ${fmt(hit.distance)}` }))));
    const search = () => runQuery({ imageId: hit.image_id, label: hit.path });
    figure.addEventListener("click", search);
    figure.addEventListener("keydown", (event) => {
      if (event.key === "Enter") search();
    });
    grid.append(figure);
  });
  grid.dataset.state = "done";
}

function setupDropzone() {
  const zone = $("dropzone");
  const input = $("file-input");
  const pick = (file) => {
    if (file) runQuery({ file, label: file.name || "uploaded image" });
  };
  zone.addEventListener("click", (event) => {
    // The "choose a file" label opens the picker itself; the results selector is no trigger.
    if (event.target.closest("select, label")) return;
    input.click();
  });
  zone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") input.click();
  });
  input.addEventListener("click", (event) => event.stopPropagation());
  input.addEventListener("change", () => {
    pick(input.files[0]);
    input.value = "";
  });
  for (const name of ["dragenter", "dragover"]) {
    zone.addEventListener(name, (event) => {
      event.preventDefault();
      zone.classList.add("over");
    });
  }
  for (const name of ["dragleave", "drop"]) {
    zone.addEventListener(name, () => zone.classList.remove("over"));
  }
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    pick(event.dataTransfer.files[0]);
  });
  // Dropping next to the zone must not navigate away from the page.
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());
}

// ---- model panel -----------------------------------------------------------------------------

function qualityText(quality) {
  if (!quality) return "not evaluated";
  const parts = [];
  const k = quality.k ? `@${quality.k}` : "";
  if (quality.lsh && quality.lsh.precision_at_k != null) {
    parts.push(`P${k} ${fmt(quality.lsh.precision_at_k)} (LSH)`);
  }
  if (quality.exact && quality.exact.precision_at_k != null) {
    parts.push(`${fmt(quality.exact.precision_at_k)} exact`);
  }
  if (quality.lsh && quality.lsh.map_at_k != null) parts.push(`mAP ${fmt(quality.lsh.map_at_k)}`);
  // The baselines say whether the trained model is worth having on this collection.
  const baselines = quality.baselines || {};
  for (const [name, label] of [["random", "random"], ["tiny_image", "tiny image"],
                               ["colour_histogram", "colour histogram"]]) {
    const figures = baselines[name];
    if (figures && figures.precision_at_k != null) {
      parts.push(`${label} ${fmt(figures.precision_at_k)}`);
    }
  }
  return parts.length ? parts.join(" · ") : JSON.stringify(quality);
}

async function refreshModels() {
  let listing;
  try {
    listing = await api("/models");
  } catch (err) {
    $("model-version").textContent = err.status === 401 ? "API key needed" : "unavailable";
    return;
  }
  const active = listing.models.find((m) => m.active);
  const panel = $("model-panel");
  panel.dataset.active = listing.active || "";
  $("model-version").textContent = listing.active || "none yet: train a model";
  $("model-images").textContent = active && active.images != null
    ? `${Number(active.images).toLocaleString()} images` : "–";
  $("model-dim").textContent = active && active.embedding_dim ? String(active.embedding_dim) : "–";
  $("model-arch").textContent = active && active.architecture
    ? `${active.architecture}${active.dataset ? ` · on ${active.dataset}` : ""}` : "–";
  $("model-created").textContent = active && active.created_at ? active.created_at : "–";
  $("model-quality").textContent = active ? qualityText(active.quality) : "–";
  $("versions-count").textContent = `(${listing.models.length})`;
  const list = $("versions-list");
  list.replaceChildren(...listing.models.map((model) => {
    const label = el("span", {},
      el("code", { text: model.version }), " ",
      el("span", { class: "muted", text: `${model.images ?? "?"} img` }));
    const action = model.active ? el("span", { class: "badge", text: "active" })
      : el("button", { class: "small ghost", type: "button", text: "activate" });
    if (!model.active) {
      action.addEventListener("click", async () => {
        action.disabled = true;
        try {
          await api(`/models/${encodeURIComponent(model.version)}/activate`, { method: "POST" });
        } catch (err) {
          alert(`cannot activate ${model.version}: ${err.message}`);
        }
        refreshModels();
      });
    }
    return el("li", {}, label, action);
  }));
}

// ---- training --------------------------------------------------------------------------------

// Overall completion of a training job: scan 0-10 %, train 10-90 %, embed 90-95 %, index 95-100 %.
function trainingPercent(job) {
  if (job.status === "succeeded") return 100;
  const p = job.progress || {};
  const frac = p.images_total ? Math.min(1, (p.images_done || 0) / p.images_total) : 0;
  const span = { scan: [0, 10], train: [10, 90], embed: [90, 95], index: [95, 100],
    done: [100, 100] }[p.phase];
  if (!span) return 0;
  return Math.floor(span[0] + (span[1] - span[0]) * frac);
}

function trainingText(job) {
  const p = job.progress || {};
  const parts = [job.status];
  if (p.phase) parts.push(`phase ${p.phase}`);
  if (p.epoch) parts.push(`epoch ${p.epoch}/${p.epochs ?? "?"}`);
  if (p.loss != null) parts.push(`loss ${fmt(p.loss, 4)}`);
  if (p.images_total) {
    // Training counts each photo once per epoch: say so, or the total reads as a photo count.
    const unit = p.phase === "train" && p.epochs ? "photos × epochs" : "images";
    parts.push(`${unit} ${p.images_done ?? 0}/${p.images_total}`);
  }
  if (job.status === "succeeded" && job.result) {
    parts.push(`→ ${job.result.version} (${job.result.images_indexed} images)`);
  }
  if (job.status === "failed" && job.error) parts.push(job.error.message);
  return parts.join(" · ");
}

function drawLossChart(history) {
  const svg = $("loss-chart");
  const ns = "http://www.w3.org/2000/svg";
  const node = (tag, attrs, text) => {
    const child = document.createElementNS(ns, tag);
    for (const [name, value] of Object.entries(attrs)) child.setAttribute(name, value);
    if (text != null) child.textContent = text;
    return child;
  };
  svg.replaceChildren();
  const W = 320, H = 140, L = 40, R = 10, T = 14, B = 22;
  svg.append(node("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }));
  svg.append(node("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }));
  const rows = (history || []).filter((h) => h && h.train_loss != null);
  if (!rows.length) {
    svg.append(node("text", { x: W / 2, y: H / 2, "text-anchor": "middle" },
      "loss per epoch appears after the first epoch"));
    svg.dataset.points = "0";
    return;
  }
  const values = rows.flatMap((h) => [h.train_loss, h.val_loss].filter((v) => v != null));
  let lo = Math.min(...values), hi = Math.max(...values);
  if (hi - lo < 1e-9) { hi += 1e-3; lo = Math.max(0, lo - 1e-3); }
  const maxEpoch = Math.max(...rows.map((h) => h.epoch), 2);
  const x = (epoch) => L + (W - L - R) * (epoch - 1) / (maxEpoch - 1);
  const y = (v) => T + (H - T - B) * (1 - (v - lo) / (hi - lo));
  const line = (key, cls) => {
    const pts = rows.filter((h) => h[key] != null).map((h) => `${x(h.epoch)},${y(h[key])}`);
    if (pts.length) svg.append(node("polyline", { class: cls, points: pts.join(" ") }));
    for (const h of rows.filter((r) => r[key] != null)) {
      svg.append(node("circle", { class: cls, cx: x(h.epoch), cy: y(h[key]), r: 2 }));
    }
  };
  line("train_loss", "train");
  line("val_loss", "val");
  svg.append(node("text", { x: L - 4, y: T + 4, "text-anchor": "end" }, hi.toPrecision(3)));
  svg.append(node("text", { x: L - 4, y: H - B, "text-anchor": "end" }, lo.toPrecision(3)));
  svg.append(node("text", { x: L, y: H - 6 }, "epoch 1"));
  svg.append(node("text", { x: W - R, y: H - 6, "text-anchor": "end" }, `epoch ${maxEpoch}`));
  svg.append(node("text", { x: W - R, y: T - 3, "text-anchor": "end" }, "— train  - - val"));
  svg.dataset.points = String(rows.length);
}

function showTraining(job) {
  const percent = trainingPercent(job);
  const bar = $("train-bar");
  bar.style.width = `${percent}%`;
  bar.classList.toggle("done", job.status === "succeeded");
  bar.classList.toggle("failed", job.status === "failed" || job.status === "canceled");
  $("train-percent").textContent = `${percent}%`;
  $("train-progress").dataset.status = job.status;
  $("train-status").textContent = trainingText(job);
  const history = (job.result && job.result.history) || (job.progress || {}).history;
  drawLossChart(history);
}

function setupTraining() {
  const form = $("train-form");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const submit = $("train-submit");
    setError($("train-error"), null);
    const body = {
      dataset: $("train-dataset").value.trim(),
      epochs: Number($("train-epochs").value),
      image_size: Number($("train-size").value),
      architecture: $("train-arch").value,
    };
    submit.disabled = true;
    try {
      const accepted = await postJson("/jobs/train", body);
      rememberJob({ ...accepted, type: "train" }, body.dataset);
      show($("train-progress"), true);
      showTraining({ status: accepted.status, progress: {} });
      renderJobs();
      const job = await pollJob(accepted.job_id, (record) => {
        showTraining(record);
        updatePageJob(record);
      }, 1);
      if (job.status === "failed" && job.error) setError($("train-error"), job.error);
    } catch (err) {
      setError($("train-error"), err);
    } finally {
      submit.disabled = false;
      refreshModels();
      refreshJobs();
    }
  });
}

// ---- recent jobs -----------------------------------------------------------------------------

function jobDetail(job) {
  if (job.detail) return job.detail;
  const params = job.params || {};
  if (job.type === "train" || job.type === "index" || job.type === "evaluate") {
    return params.dataset || "";
  }
  if (job.result && job.result.hits) return `${job.result.hits.length} hits`;
  return "";
}

function renderJobs(jobs = pageJobs) {
  const list = $("jobs-list");
  if (!jobs.length) {
    list.replaceChildren(el("li", { class: "muted" }, "no jobs yet"));
    return;
  }
  list.replaceChildren(...jobs.slice(0, 8).map((job) => el("li", { "data-job-id": job.job_id },
    el("span", { class: "type", text: job.type || "job" }),
    el("span", { class: "detail", title: job.job_id, text: jobDetail(job) || job.job_id }),
    el("span", { class: `status ${job.status}`, text: job.status }))));
}

// GET /jobs lists every job; servers without it get this page's own jobs instead.
async function refreshJobs() {
  try {
    const listing = await api("/jobs?limit=8");
    show($("jobs-note"), false);
    renderJobs(listing.jobs || []);
  } catch (err) {
    const note = $("jobs-note");
    note.textContent = err.status === 404 || err.status === 405
      ? "This server has no job list; showing jobs started from this page."
      : `Job list unavailable: ${err.message}`;
    show(note, true);
    renderJobs();
  }
}

// ---- readiness and API key -------------------------------------------------------------------

async function refreshReady() {
  const badge = $("ready");
  let body;
  try {
    const response = await fetch("/readyz", { headers: authHeaders() });
    body = await response.json();
  } catch (_) {
    badge.className = "ready bad";
    badge.textContent = "server unreachable";
    return;
  }
  const checks = body.checks || {};
  const ok = body.status === "ready";
  badge.className = `ready ${ok ? "ok" : "bad"}`;
  badge.textContent = ok ? `ready · ${checks.workers} worker${checks.workers === 1 ? "" : "s"}`
    : !checks.redis ? "Redis unreachable" : !checks.workers ? "no worker running"
      : "no model yet";
}

function setupKey() {
  const form = $("key-form");
  $("key-button").addEventListener("click", () => {
    form.hidden = !form.hidden;
    $("key-input").value = apiKey();
  });
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("key-input").value.trim();
    if (value) localStorage.setItem(KEY_STORAGE, value);
    else localStorage.removeItem(KEY_STORAGE);
    form.hidden = true;
    refreshAll();
  });
}

function refreshAll() {
  refreshReady();
  refreshModels();
  refreshJobs();
}

document.addEventListener("DOMContentLoaded", () => {
  setupKey();
  setupDropzone();
  setupTraining();
  drawLossChart([]);
  refreshAll();
  setInterval(refreshReady, 15000);
  setInterval(refreshJobs, 10000);
  setInterval(refreshModels, 30000);
});
