// Stemflow's page: submit a song, follow it live over the WebSocket, then hear and download its stems.
// Same origin as the API (relative /v1 paths); the notifier's URL comes from /config.json or a job's links.events.
"use strict";

const API = "/v1";
const KEY_STORE = "stemflow.apiKey";
const TERMINAL = new Set(["completed", "failed", "cancelled"]);
const STAGES = ["ingest", "separation", "analysis"];
const MODELS_REFRESH_MS = 30000; // what the workers serve changes as pools come and go
const QUEUE_REFRESH_MS = 5000; // no event says when the jobs ahead of a waiting one move
const FOUR = ["drums", "bass", "other", "vocals"];
// Offered when /v1/models cannot be read: the default model, which every deployment serves.
const FALLBACK_MODELS = {
  models: [{ name: "htdemucs", title: "HT-Demucs", description: "", sources: FOUR, stems: [2, 4], served: true }],
  default_model: "htdemucs",
};
const $ = (id) => document.getElementById(id);

const state = {
  key: localStorage.getItem(KEY_STORE) || "",
  eventsUrl: null,
  jobs: new Map(), // id -> job document, newest first by insertion
  cursor: null,
  current: null, // the id of the job shown
  ws: null,
  wsFailures: 0,
  lastEventId: null,
  mixer: null,
  analysis: null, // the shown job's analysis (its energy curve lights the waveform of every target)
  models: FALLBACK_MODELS, // GET /v1/models: what the choices are built from
  modelsTimer: 0,
  queueTimer: 0,
  submitting: false,
};

// ---- HTTP

class ApiError extends Error {
  constructor(status, problem) {
    super(describeProblem(status, problem));
    this.status = status;
    this.code = problem.code || "";
  }
}

function describeProblem(status, p) {
  const detail = p.detail || p.title || `HTTP ${status}`;
  switch (p.code) {
    case "unauthorized": return "The API key was refused. Enter a valid key.";
    case "validation_failed": {
      const fields = (p.errors || []).map((e) => (e.message ? `${e.field || "request"}: ${e.message}` : e.field));
      return `The options were refused: ${fields.join("; ") || detail}`;
    }
    case "model_unavailable": return `${detail}. The models on offer were read again: choose one that is served.`;
    case "payload_too_large": return `The file is too large (${detail}).`;
    case "unsupported_media_type": return `This file type is not accepted (${detail}). Send WAV, FLAC, MP3, OGG, Opus or M4A.`;
    case "rate_limited": return `Too many requests; try again in ${p.retryAfter || 60} seconds.`;
    case "job_not_found": return "That job does not exist (or belongs to another key).";
    case "job_not_completed": return `${detail}: results appear when it has completed.`;
    case "job_finished": return `${detail}; nothing to cancel.`;
    case "stem_not_found": case "analysis_not_ready": return detail;
    case "database_unavailable": case "unavailable": case "internal_error":
      return "Stemflow is having trouble right now; try again shortly.";
    default: return p.code ? `${detail} [${p.code}]` : detail;
  }
}

async function errorOf(response) {
  let problem = {};
  try { problem = await response.json(); } catch { /* not problem+json */ }
  problem.retryAfter = response.headers.get("Retry-After");
  if (response.status === 401) showKeyForm();
  return new ApiError(response.status, problem);
}

async function api(path, options = {}) {
  const headers = { Authorization: `Bearer ${state.key}`, ...(options.headers || {}) };
  const response = await fetch(API + path, { ...options, headers });
  if (!response.ok) throw await errorOf(response);
  return response;
}

const getJson = async (path) => (await api(path)).json();

// Job documents carry absolute links; the page stays on its own origin.
// A link's path and query (a target's stems are `?target=`), without the /v1 the api() helper adds.
const pathOf = (link) => {
  const url = new URL(link, location.href);
  return url.pathname.replace(/^\/v1/, "") + url.search;
};

// ---- messages

function alertUser(message) {
  const box = $("alert");
  box.textContent = message;
  box.hidden = !message;
}

function fail(error) {
  console.error(error);
  alertUser(error instanceof ApiError ? error.message : `Something went wrong: ${error.message || error}`);
}

// ---- API key

function showKeyForm() {
  $("key-section").hidden = false;
  $("key-change").hidden = true;
  $("key-input").focus();
}

async function saveKey(event) {
  event.preventDefault();
  const key = $("key-input").value.trim();
  if (!key) return;
  state.key = key;
  try {
    await loadJobs(true);
  } catch (error) {
    return fail(error);
  }
  localStorage.setItem(KEY_STORE, key);
  $("key-input").value = "";
  alertUser("");
  startApp();
}

function forgetKey() {
  localStorage.removeItem(KEY_STORE);
  state.key = "";
  if (state.ws) state.ws.close();
  location.reload();
}

// ---- submitting

function jobOptions() {
  const options = {
    stems: Number($("opt-stems").value),
    model: $("opt-model").value,
    quality: $("opt-quality").value,
    output_format: $("opt-format").value,
    analyze: $("opt-analyze").checked,
  };
  for (const [field, id] of [["trim_start", "opt-trim-start"], ["trim_end", "opt-trim-end"]]) {
    if ($(id).value !== "") options[field] = Number($(id).value);
  }
  return options;
}

// ---- models: the choices offered are what the workers serve now (GET /v1/models)

async function loadModels() {
  try {
    state.models = await getJson("/models");
    notice("");
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) return;
    state.models = FALLBACK_MODELS;
    notice(`The list of models could not be read (${error.message}); offering ${FALLBACK_MODELS.default_model} with 2 or 4 stems.`);
  }
  renderModels();
}

function notice(message) {
  $("models-notice").textContent = message;
  $("models-notice").hidden = !message;
}

function renderModels() {
  const { models, default_model: fallback } = state.models;
  const served = models.filter((m) => m.served);
  const select = $("opt-model");
  const keep = served.find((m) => m.name === select.value) || served.find((m) => m.name === fallback) || served[0];
  select.replaceChildren(...models.map((m) => {
    const label = m.served ? m.name : `${m.name} — no worker serves this model now`;
    const option = new Option(label, m.name, m.name === fallback); // the default is what a form reset picks
    option.disabled = !m.served;
    option.title = m.served ? m.description || m.title || m.name : "No worker serves this model now";
    return option;
  }));
  if (keep) select.value = keep.name;
  $("submit").disabled = !keep || state.submitting;
  if (!keep) notice("No worker serves any model now: songs cannot be split until one does.");
  renderStems();
}

// The stem counts of the chosen model only; the choice made is kept where the model gives it.
function renderStems() {
  const model = state.models.models.find((m) => m.name === $("opt-model").value);
  const counts = model && model.served ? model.stems : [];
  const select = $("opt-stems");
  const wanted = Number(select.value) || 4;
  select.replaceChildren(...counts.map((n) => new Option(`${n} stems`, String(n), n === 4)));
  if (counts.length) select.value = String(counts.includes(wanted) ? wanted : counts.includes(4) ? 4 : counts[0]);
  const sources = (model && model.sources) || FOUR;
  const what = { 2: "vocals and accompaniment", 4: FOUR.join(", "), 6: sources.join(", ") };
  const help = counts.map((n) => `${n}: ${what[n] || `${n} sources`}`).join("; ");
  $("model-help").textContent = [model && model.description, help && `${help}.`].filter(Boolean).join(" ");
}

function upload(files, options) {
  // XMLHttpRequest, not fetch: only it reports upload progress. One file is a job; several, a batch.
  return new Promise((resolve, reject) => {
    const form = new FormData();
    for (const [k, v] of Object.entries(options)) form.append(k, String(v));
    for (const file of files) form.append("file", file, file.name);
    const xhr = new XMLHttpRequest();
    const bar = $("upload");
    xhr.open("POST", `${API}/${files.length > 1 ? "batches" : "jobs"}`);
    xhr.setRequestHeader("Authorization", `Bearer ${state.key}`);
    xhr.upload.onprogress = (e) => { if (e.lengthComputable) bar.value = (100 * e.loaded) / e.total; };
    xhr.onload = () => {
      const response = new Response(xhr.response, { status: xhr.status, headers: { "Retry-After": xhr.getResponseHeader("Retry-After") || "" } });
      if (xhr.status === 202) resolve(response.json());
      else errorOf(response).then(reject);
    };
    xhr.onerror = () => reject(new Error("the upload failed (network)"));
    bar.value = 0;
    bar.hidden = false;
    xhr.send(form);
  });
}

async function submitJob(event) {
  event.preventDefault();
  const files = [...$("file").files];
  const url = $("source-url").value.trim();
  if (!files.length && !url) return alertUser("Choose or drop a song file, or paste its URL.");
  const options = jobOptions();
  $("submit").disabled = state.submitting = true;
  alertUser("");
  try {
    const made = files.length
      ? await upload(files, options)
      : await (await api("/jobs", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ source_url: url, ...options }) })).json();
    // A batch answers with its jobs; remembered oldest first, so the list shows them in the files' order.
    const jobs = made.jobs ? [...made.jobs].reverse() : [made];
    for (const one of jobs) remember(one);
    const job = jobs[jobs.length - 1];
    renderJobs();
    $("job-form").reset();
    $("file-name").textContent = "";
    renderModels(); // the reset put back the page's own first options
    await openJob(job);
  } catch (error) {
    fail(error);
    // A model that stopped being served since the list was read: read it again.
    if (error instanceof ApiError && error.code === "model_unavailable") await loadModels();
  } finally {
    state.submitting = false;
    $("submit").disabled = !state.models.models.some((m) => m.served);
    $("upload").hidden = true;
  }
}

function setupDrop() {
  const zone = $("drop");
  const input = $("file");
  const show = () => {
    const names = [...input.files].map((f) => f.name);
    $("file-name").textContent = names.length > 1 ? `Selected ${names.length} songs (one batch): ${names.join(", ")}` : names.length ? `Selected: ${names[0]}` : "";
  };
  input.addEventListener("change", show);
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (e.dataTransfer.files.length) { input.files = e.dataTransfer.files; show(); }
  });
}

// ---- jobs list

function remember(job) {
  if (!state.jobs.has(job.id)) state.jobs = new Map([[job.id, job], ...state.jobs]);
  else state.jobs.set(job.id, job);
  if (!state.eventsUrl && job.links && job.links.events) {
    state.eventsUrl = job.links.events;
    connect();
  }
}

async function loadJobs(first) {
  const query = first ? "?limit=20" : `?limit=20&cursor=${encodeURIComponent(state.cursor)}`;
  const page = await getJson(`/jobs${query}`);
  for (const job of page.items) if (!state.jobs.has(job.id)) state.jobs.set(job.id, job);
  state.cursor = page.next_cursor;
  if (page.items.length) remember(page.items[0]);
  renderJobs();
}

const nameOf = (job) => (job.input && (job.input.filename || job.input.source_url)) || job.id;
const percent = (v) => `${Math.round(Number(v) || 0)}%`;

function renderJobs() {
  const list = $("jobs");
  list.replaceChildren(...[...state.jobs.values()].map(jobItem));
  if (!state.jobs.size) list.append(Object.assign(document.createElement("li"), { textContent: "No jobs yet." }));
  $("more").hidden = !state.cursor;
}

function jobItem(job) {
  const li = document.createElement("li");
  li.dataset.id = job.id;
  const open = Object.assign(document.createElement("button"), { type: "button", className: "open", textContent: nameOf(job) });
  open.addEventListener("click", () => openJob(state.jobs.get(job.id) || job).catch(fail));
  const status = Object.assign(document.createElement("span"), { className: `s-${job.status}`, textContent: job.status });
  const remove = Object.assign(document.createElement("button"), { type: "button", textContent: "Delete" });
  remove.setAttribute("aria-label", `Delete ${nameOf(job)}`);
  remove.addEventListener("click", () => deleteJob(job).catch(fail));
  const waits = waiting(job) ? ` · ${queueText(job.queue)}` : "";
  const when = Object.assign(document.createElement("small"), { textContent: `${new Date(job.created_at).toLocaleString()} · ${job.id}${waits}` });
  li.append(open, status, remove, when);
  if (!TERMINAL.has(job.status)) {
    const bar = Object.assign(document.createElement("progress"), { max: 100, value: job.progress.overall || 0 });
    bar.setAttribute("aria-label", `${nameOf(job)} progress`);
    li.append(bar);
  }
  return li;
}

async function deleteJob(job) {
  if (!confirm(`Delete ${nameOf(job)} and its stems?`)) return;
  await api(`/jobs/${job.id}`, { method: "DELETE" });
  state.jobs.delete(job.id);
  if (state.current === job.id) closeJob();
  renderJobs();
}

// ---- live events

function connect() {
  if (!state.eventsUrl || !state.key || state.ws) return;
  const url = new URL(state.eventsUrl, location.href);
  url.search = "";
  url.protocol = url.protocol.replace("http", "ws");
  url.searchParams.set("token", state.key); // browsers cannot set headers on WebSockets
  const ws = new WebSocket(url);
  state.ws = ws;
  let pinger = 0;
  ws.onopen = () => {
    state.wsFailures = 0;
    setLive(true);
    send({ type: "subscribe", ...(state.lastEventId ? { last_event_id: state.lastEventId } : {}) });
    if (state.current && !TERMINAL.has(state.jobs.get(state.current)?.status)) send({ type: "subscribe", job_id: state.current });
    pinger = setInterval(() => send({ type: "ping" }), 60000); // the notifier closes idle connections
  };
  ws.onmessage = (message) => onFrame(JSON.parse(message.data));
  ws.onclose = () => {
    clearInterval(pinger);
    state.ws = null;
    setLive(false);
    if (!state.key) return;
    const delay = Math.min(30000, 500 * 2 ** state.wsFailures++);
    setTimeout(connect, delay);
  };
}

function send(message) {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify(message));
}

function setLive(on) {
  const live = $("live");
  live.textContent = on ? "live" : "reconnecting…";
  live.classList.toggle("on", on);
  document.body.dataset.live = on ? "on" : "off";
}

function onFrame(frame) {
  if (frame.type === "subscribed" && frame.job_id) {
    // Subscribed from now on; one read covers what happened before.
    refreshJob(frame.job_id).catch(fail);
  } else if (frame.type === "batch") {
    for (const event of frame.events) onEvent(event);
    renderJobs();
  }
}

function onEvent(event) {
  state.lastEventId = event.id;
  const id = event.subject;
  const job = state.jobs.get(id);
  const type = event.type.replace(/^stemflow\.job\.|\.v1$/g, "");
  if (type === "progress") {
    if (!job) return void refreshJob(id).catch(() => {}); // another tab's job, or one just deleted
    if (TERMINAL.has(job.status)) return;
    // The end of a job is shown from its document (result, error), never from a progress event alone.
    if (TERMINAL.has(event.data.status)) return void refreshJob(id).catch(() => {});
    job.status = event.data.status;
    job.progress = event.data.progress;
    // Progress events carry no queue: the one last read holds until the separation starts.
    if ("queue" in event.data) job.queue = event.data.queue;
    else if (!separationWaiting(job.progress)) delete job.queue;
    if (id === state.current) showProgress(job);
  } else {
    refreshJob(id).catch((error) => { if (id === state.current) fail(error); });
  }
}

async function refreshJob(id) {
  const job = await getJson(`/jobs/${id}`);
  remember(job);
  renderJobs();
  if (id === state.current) showJob(job);
}

// ---- one job

async function openJob(job) {
  if (state.current !== job.id) {
    closeJob();
    state.current = job.id;
    $("job-section").hidden = false;
    $("job-title").textContent = nameOf(job);
  }
  showJob(job);
  $("job-section").scrollIntoView({ block: "start" });
  if (!TERMINAL.has(job.status)) send({ type: "subscribe", job_id: job.id });
}

function closeJob() {
  clearTimeout(state.queueTimer);
  if (state.mixer) state.mixer.close();
  state.mixer = null;
  state.current = null;
  $("results").hidden = true;
  $("job-section").hidden = true;
}

function showProgress(job) {
  const p = job.progress;
  $("p-overall").value = p.overall || 0;
  $("p-overall-text").textContent = percent(p.overall);
  for (const stage of STAGES) {
    const s = p[stage] || { status: "pending", percent: 0 };
    $(`p-${stage}`).value = s.status === "completed" ? 100 : s.percent || 0;
    $(`p-${stage}-text`).textContent = s.status === "running" ? percent(s.percent) : s.status;
  }
  const line = $("job-status");
  line.className = `status-line s-${job.status}`;
  line.textContent = job.status === "failed" && job.error ? `failed: ${job.error.message} [${job.error.code}]`
    : waiting(job) ? `${job.status} · ${queueText(job.queue)}` : job.status;
  $("job-section").dataset.status = job.status;
  $("cancel").hidden = TERMINAL.has(job.status);
  watchQueue(job);
}

// ---- a job whose separation waits its turn: its place in the model's queue and an estimated start

const waiting = (job) => Boolean(job.queue) && !TERMINAL.has(job.status);

function separationWaiting(progress) {
  const stage = (progress && progress.separation) || {};
  return !stage.status || stage.status === "pending" || (stage.status === "running" && !stage.percent); // queued: running at 0%
}

// Seconds until it should start: `estimated_start_s`, or `estimated_start_at` (ISO time); NaN while the pace is unknown.
const startIn = (queue) => (queue.estimated_start_s != null ? Number(queue.estimated_start_s)
  : queue.estimated_start_at ? (Date.parse(queue.estimated_start_at) - Date.now()) / 1000 : NaN);

function queueText(queue) {
  const s = startIn(queue);
  const when = s < 90 ? `${Math.ceil(Math.max(s, 0))} s` : `${Math.round(s / 60)} min`;
  return `${queue.ahead || 0} ahead${Number.isFinite(s) ? ` · starts in ~${when}` : ""}`;
}

// While the shown job waits, its document is read again now and then (the estimate moves as the jobs ahead do).
function watchQueue(job) {
  clearTimeout(state.queueTimer);
  if (job.id === state.current && waiting(job)) {
    state.queueTimer = setTimeout(() => refreshJob(job.id).catch(() => {}), QUEUE_REFRESH_MS);
  }
}

function showJob(job) {
  showProgress(job);
  if (job.status === "completed" && !(state.mixer && state.mixer.jobId === job.id)) {
    showResults(job).catch(fail);
  }
}

async function showResults(job) {
  $("results").hidden = false;
  showFacts(job.result.analysis);
  showTargets(job);
  state.analysis = null;
  if (job.options.analyze !== false) {
    getJson(`/jobs/${job.id}/analysis`)
      .then((analysis) => {
        if (state.current !== job.id) return;
        state.analysis = analysis;
        // The mixer shown by then, whichever target it plays.
        if (state.mixer && state.mixer.jobId === job.id) state.mixer.setEnergy(analysis);
        showDoubt(analysis);
      })
      .catch(() => {});
  }
  await play(job, job.result.stems);
}

// A mixer of these stems of the job, in place of the one shown.
async function play(job, stems) {
  if (state.mixer) state.mixer.close();
  const mixer = new Mixer(job, stems);
  state.mixer = mixer;
  if (state.analysis) mixer.setEnergy(state.analysis);
  await mixer.load();
}

// One upload, several separations: a picker of the targets that made stems; the mixer plays the chosen one.
function showTargets(job) {
  const made = Object.entries(job.result.targets || {}).filter(([, t]) => t.stems.length);
  $("target-pick").hidden = made.length < 2;
  $("target").replaceChildren(...made.map(([name]) => new Option(name, name)));
  const primary = made.find(([, t]) => t.stems[0]?.url === job.result.stems[0]?.url);
  if (primary) $("target").value = primary[0];
}

async function switchTarget() {
  const job = state.jobs.get(state.current);
  const target = job && (job.result.targets || {})[$("target").value];
  if (target) await play(job, target.stems);
}

function zipLink(job) {
  const target = $("target-pick").hidden ? null : (job.result.targets || {})[$("target").value];
  return target ? [target.stems_zip, `${job.id}-${$("target").value}-stems.zip`] : [job.links.stems_zip, `${job.id}-stems.zip`];
}

function showFacts(a) {
  $("facts").hidden = !a;
  if (!a) return;
  const conf = (v) => `confidence ${Math.round(100 * v)}%`;
  $("bpm").textContent = a.tempo_bpm.toFixed(1);
  $("bpm-conf").textContent = conf(a.tempo_confidence);
  $("key").textContent = a.key;
  $("key-conf").textContent = conf(a.key_confidence);
  if (a.key_camelot) $("key-conf").textContent += ` · ${a.key_camelot} · ${a.key_open_key}`;
  $("lufs").textContent = a.loudness_lufs.toFixed(1);
  $("dur").textContent = `${clock(a.duration_s)} long`;
  showChords(a.chords || []);
}

// The chord timeline: each change with its time, no-chord stretches left out.
function showChords(chords) {
  let line = document.getElementById("chords");
  if (!line) {
    line = Object.assign(document.createElement("p"), { id: "chords", className: "conf" });
    $("facts").append(line);
  }
  const changes = chords.filter((c) => c.root);
  line.hidden = changes.length === 0;
  line.textContent = changes.map((c) => `${clock(c.start)} ${c.label}`).join("  ·  ");
}

// The analysis states its doubt: the runner-up key and the octave tempo, when it has them.
function showDoubt(a) {
  const key = (a.key_alternatives || [])[0];
  if (key) $("key-conf").textContent += ` · or ${key.key} (${Math.round(100 * key.confidence)}%)`;
  const tempo = (a.tempo_alternatives || [])[0];
  if (tempo) $("bpm-conf").textContent += ` · or ${tempo.bpm.toFixed(1)} BPM`;
}

const clock = (s) => `${Math.floor(s / 60)}:${String(Math.floor(s % 60)).padStart(2, "0")}`;

// ---- downloads: links need the Authorization header, so fetch, then hand the browser a blob URL

async function download(link, filename) {
  const blob = await (await api(pathOf(link))).blob();
  const url = URL.createObjectURL(blob);
  const a = Object.assign(document.createElement("a"), { href: url, download: filename });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
}

// ---- the mixer: one AudioBufferSourceNode per stem, all started at the same instant

class Mixer {
  constructor(job, stems = job.result.stems) {
    this.job = job;
    this.jobId = job.id;
    this.ctx = new AudioContext();
    this.master = this.ctx.createGain();
    this.master.connect(this.ctx.destination);
    this.stems = stems.map((info) => this.row(info));
    this.sources = [];
    this.playing = false;
    this.offset = 0;
    this.startedAt = 0;
    this.duration = Math.max(...stems.map((s) => s.duration), 0);
    this.peaks = null;
    this.energy = null;
    this.frame = 0;
    this.setState("loading");
    this.draw();
  }

  row(info) {
    const node = $("stem-row").content.firstElementChild.cloneNode(true);
    const stem = { info, node, gain: this.ctx.createGain(), buffer: null, volume: 1, mute: false, solo: false };
    stem.gain.connect(this.master);
    node.dataset.stem = info.name;
    node.querySelector(".stem-name").textContent = info.name;
    node.querySelector(".sr").textContent = `${info.name} volume`;
    const slider = node.querySelector("input");
    slider.addEventListener("input", () => { stem.volume = slider.value / 100; this.apply(); });
    for (const kind of ["mute", "solo"]) {
      const button = node.querySelector(`.${kind}`);
      button.setAttribute("aria-label", `${kind === "mute" ? "Mute" : "Solo"} ${info.name}`);
      button.addEventListener("click", () => {
        stem[kind] = !stem[kind];
        button.setAttribute("aria-pressed", String(stem[kind]));
        this.apply();
      });
    }
    const get = node.querySelector(".get");
    get.setAttribute("aria-label", `Download ${info.name}`);
    get.addEventListener("click", () => download(info.url, `${info.name}.${info.format}`).catch(fail));
    $("mixer").append(node);
    return stem;
  }

  async load() {
    $("load-state").textContent = `Loading ${this.stems.length} stems…`;
    await Promise.all(this.stems.map(async (stem) => {
      const bytes = await (await api(pathOf(stem.info.url))).arrayBuffer();
      stem.buffer = await this.ctx.decodeAudioData(bytes);
    }));
    if (state.mixer !== this) return;
    this.duration = Math.max(...this.stems.map((s) => s.buffer.duration));
    this.peaks = mixPeaks(this.stems.map((s) => s.buffer), 1200);
    $("load-state").textContent = "";
    $("play").disabled = $("stop").disabled = false;
    $("wave").setAttribute("aria-valuemax", String(Math.round(this.duration)));
    this.apply();
    this.setState("ready");
    this.draw();
  }

  setEnergy(analysis) {
    this.energy = analysis.energy && analysis.energy.length ? analysis.energy : null;
    this.draw();
  }

  apply() {
    const soloing = this.stems.some((s) => s.solo);
    for (const s of this.stems) {
      const audible = soloing ? s.solo : !s.mute;
      const gain = audible ? s.volume : 0;
      s.gain.gain.setTargetAtTime(gain, this.ctx.currentTime, 0.015);
      s.node.dataset.gain = gain.toFixed(2);
    }
  }

  position() {
    return this.playing ? Math.min(this.ctx.currentTime - this.startedAt, this.duration) : this.offset;
  }

  async play() {
    if (this.playing || !this.peaks) return;
    await this.ctx.resume();
    const when = this.ctx.currentTime + 0.05;
    if (this.offset >= this.duration) this.offset = 0;
    this.sources = this.stems.map((s) => {
      const source = this.ctx.createBufferSource();
      source.buffer = s.buffer;
      source.connect(s.gain);
      source.start(when, this.offset);
      return source;
    });
    this.startedAt = when - this.offset;
    this.playing = true;
    this.setState("playing");
    const tick = () => {
      if (!this.playing) return;
      if (this.position() >= this.duration) return this.stop();
      this.draw();
      this.frame = requestAnimationFrame(tick);
    };
    tick();
  }

  pause() {
    if (!this.playing) return;
    this.offset = this.position();
    this.halt();
    this.setState("paused");
  }

  stop() {
    this.halt();
    this.offset = 0;
    this.setState("ready");
  }

  halt() {
    for (const source of this.sources) { try { source.stop(); } catch { /* not started */ } }
    this.sources = [];
    this.playing = false;
    cancelAnimationFrame(this.frame);
    this.draw();
  }

  seek(seconds) {
    const was = this.playing;
    if (was) this.halt();
    this.offset = Math.max(0, Math.min(seconds, this.duration));
    if (was) this.play(); else this.draw();
  }

  setState(name) {
    $("player").dataset.state = name;
    $("play").textContent = name === "playing" ? "Pause" : "Play";
  }

  draw() {
    const canvas = $("wave");
    const ratio = window.devicePixelRatio || 1;
    const width = Math.round(canvas.clientWidth * ratio);
    const height = Math.round(canvas.clientHeight * ratio);
    if (!width) return;
    if (canvas.width !== width || canvas.height !== height) { canvas.width = width; canvas.height = height; }
    const g = canvas.getContext("2d");
    const style = getComputedStyle(document.documentElement);
    const color = (name) => style.getPropertyValue(name).trim();
    const played = color("--accent");
    const rest = color("--wave");
    g.clearRect(0, 0, width, height);
    const values = this.peaks || this.energy;
    const at = this.duration ? this.position() / this.duration : 0;
    if (values) {
      const mid = height / 2;
      for (let x = 0; x < width; x++) {
        const i0 = Math.floor((x / width) * values.length);
        const i1 = Math.max(i0 + 1, Math.floor(((x + 1) / width) * values.length));
        let v = 0;
        for (let i = i0; i < i1 && i < values.length; i++) v = Math.max(v, values[i]);
        g.fillStyle = x / width < at ? played : rest;
        const h = Math.max(1, v * (mid - 2));
        g.fillRect(x, mid - h, 1, 2 * h);
      }
    }
    g.fillStyle = color("--fg");
    g.fillRect(Math.round(at * width), 0, Math.max(1, ratio), height);
    const pos = this.position();
    $("time").textContent = `${clock(pos)} / ${clock(this.duration)}`;
    canvas.setAttribute("aria-valuenow", String(Math.round(pos)));
    canvas.setAttribute("aria-valuetext", `${clock(pos)} of ${clock(this.duration)}`);
  }

  close() {
    this.halt();
    this.ctx.close();
    $("mixer").replaceChildren();
    $("play").disabled = $("stop").disabled = true;
  }
}

function mixPeaks(buffers, columns) {
  // The mix's waveform: the peak of the summed stems in each of `columns` slices, 0..1.
  const length = Math.max(...buffers.map((b) => b.length));
  const channels = buffers.flatMap((b) => Array.from({ length: b.numberOfChannels }, (_, c) => b.getChannelData(c)));
  const scale = 1 / Math.max(1, ...buffers.map((b) => b.numberOfChannels));
  const peaks = new Float32Array(columns);
  const step = Math.max(1, Math.floor(length / columns / 64)); // sample sparsely: a waveform, not a meter
  for (let col = 0; col < columns; col++) {
    const end = Math.min(length, Math.floor(((col + 1) * length) / columns));
    let peak = 0;
    for (let i = Math.floor((col * length) / columns); i < end; i += step) {
      let sum = 0;
      for (const data of channels) sum += data[i] || 0;
      peak = Math.max(peak, Math.abs(sum * scale));
    }
    peaks[col] = peak;
  }
  const top = Math.max(...peaks, 1e-6);
  return peaks.map((p) => p / top);
}

function setupPlayer() {
  const mixer = () => state.mixer;
  const toggle = (m) => Promise.resolve(m.playing ? m.pause() : m.play()).catch(fail);
  $("play").addEventListener("click", () => { if (mixer()) toggle(mixer()); });
  $("stop").addEventListener("click", () => mixer()?.stop());
  const wave = $("wave");
  wave.addEventListener("pointerdown", (e) => {
    const m = mixer();
    if (m && m.duration) m.seek((e.offsetX / wave.clientWidth) * m.duration);
  });
  wave.addEventListener("keydown", (e) => {
    const m = mixer();
    if (!m) return;
    const moves = { ArrowRight: 5, ArrowUp: 5, ArrowLeft: -5, ArrowDown: -5 };
    if (e.key in moves) m.seek(m.position() + moves[e.key]);
    else if (e.key === "Home") m.seek(0);
    else if (e.key === "End") m.seek(m.duration);
    else if (e.key === " ") toggle(m);
    else return;
    e.preventDefault();
  });
  window.addEventListener("resize", () => mixer()?.draw());
  $("zip").addEventListener("click", () => {
    const job = state.jobs.get(state.current);
    if (job) download(...zipLink(job)).catch(fail);
  });
  $("target").addEventListener("change", () => switchTarget().catch(fail));
  $("cancel").addEventListener("click", () => {
    if (!state.current) return;
    api(`/jobs/${state.current}/cancel`, { method: "POST" }).then((r) => r.json()).then((job) => { remember(job); renderJobs(); showJob(job); }).catch(fail);
  });
}

// ---- start

async function findEventsUrl() {
  try {
    const response = await fetch("/config.json");
    if (response.ok) state.eventsUrl = (await response.json()).events_url || null;
  } catch { /* optional: job documents carry links.events */ }
}

function startApp() {
  $("key-section").hidden = true;
  $("key-change").hidden = false;
  $("submit-section").hidden = false;
  $("jobs-section").hidden = false;
  connect();
  loadModels();
  clearInterval(state.modelsTimer);
  state.modelsTimer = setInterval(() => { if (!document.hidden) loadModels(); }, MODELS_REFRESH_MS);
}

async function main() {
  $("key-form").addEventListener("submit", saveKey);
  $("key-forget").addEventListener("click", forgetKey);
  $("key-change").addEventListener("click", showKeyForm);
  $("job-form").addEventListener("submit", submitJob);
  $("opt-model").addEventListener("change", renderStems);
  $("more").addEventListener("click", () => loadJobs(false).catch(fail));
  setupDrop();
  setupPlayer();
  await findEventsUrl();
  if (!state.key) return showKeyForm();
  try {
    await loadJobs(true);
    startApp();
  } catch (error) {
    fail(error);
  }
}

main();
