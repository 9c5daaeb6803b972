// Stemflow's page: submit a song, follow it live over the WebSocket, then practise with its stems and export mixes.
// Same origin as the API (relative /v1 paths); the notifier's URL comes from /config.json or a job's links.events.
// Every job has its own address, /jobs/<id>, which the gateway answers with this page.
"use strict";

const API = "/v1";
const KEY_STORE = "stemflow.apiKey";
const OPTIONS_STORE = "stemflow.options";
const TERMINAL = new Set(["completed", "failed", "cancelled"]);
const STAGES = ["ingest", "separation", "analysis"];
const MODELS_REFRESH_MS = 30000; // what the workers serve changes as pools come and go
const QUEUE_REFRESH_MS = 5000; // no event says when the jobs ahead of a waiting one move
const MIX_POLL_MS = 1500; // a mix being rendered is also read now and then, in case its events are missed
const JOB_PATH = /^\/jobs\/([A-Za-z0-9_-]{1,64})\/?$/;
const FOUR = ["drums", "bass", "other", "vocals"];
// Offered when /v1/models cannot be read: the default model, which every deployment serves.
const FALLBACK_MODELS = {
  models: [{ name: "htdemucs", title: "HT-Demucs", description: "", sources: FOUR, stems: [2, 4], served: true }],
  default_model: "htdemucs",
};
// What a refused field means to the person at the page: the control to change and how.
const FIELD_FIXES = {
  source_url: "the URL: give the song's public http:// or https:// address, without a user name or password",
  source_urls: "the URLs: give each song's public http:// or https:// address, without a user name or password",
  file: "the file: choose a song file",
  stems: "Stems: choose one of the counts on offer",
  model: "Model: choose one of the models on offer",
  quality: "Quality: choose fast, balanced or best",
  output_format: "Format: choose WAV, FLAC or MP3",
  bit_depth: "Bit depth: 16 or 24 bits (32-bit float in WAV only), none for MP3",
  sample_rate: "Sample rate: 44.1, 48, 88.2 or 96 kHz, for WAV and FLAC only",
  trim_start: "Start: a number of seconds from 0, before End",
  trim_end: "End: a number of seconds after Start",
  tempo: "Tempo: from 50% to 150%",
  semitones: "Pitch: within 12 semitones up or down",
  cents: "Pitch: within 12 semitones up or down",
  start: "the section: it must start inside the song",
  end: "the section: it must end after it starts",
  loops: "Times in the export: from 1 to 16",
  gains: "a stem's volume: from 0% to 150%",
  format: "Export as: choose WAV, FLAC or MP3",
};
const FIELD_NAMES = { source_url: "the URL", trim_start: "Start", trim_end: "End" };
// Why a job failed, in words (its error.code; the message the service gave otherwise).
const FAILURES = {
  url_forbidden: "Stemflow may not fetch that address: local and private addresses are refused. Give a public URL.",
  fetch_failed: "The song could not be downloaded from its URL. Check that the address opens the audio file.",
  too_large: "The song is larger than Stemflow accepts.",
  upload_missing: "The upload was lost before it was read. Send the song again.",
  empty: "The file is empty.",
  not_audio: "The file is not audio.",
  corrupt: "The audio file is damaged and could not be read.",
  unsupported_format: "Stemflow cannot read this audio format. Send WAV, FLAC, MP3, Ogg/Opus or M4A.",
  too_many_channels: "The audio has more channels than Stemflow accepts.",
  bad_sample_rate: "The audio's sample rate is not supported.",
  too_short: "The song is too short to split.",
  too_long: "The song is longer than Stemflow accepts.",
  silent: "The song is silent.",
  bad_trim: "The start and end chosen do not fit the song.",
  trim_out_of_range: "The start chosen is past the end of the song.",
  samples_out_of_range: "The file's samples are far too loud to be audio at a usable scale.",
  model_unavailable: "No worker serves the model chosen. Run it again with a model on offer.",
  model_unknown: "The model chosen is unknown to the workers.",
  out_of_memory: "The separation ran out of memory. Try the fast quality, or a shorter section.",
  stage_timeout: "A step made no progress for too long, so Stemflow stopped the job.",
  separation_failed: "The separation failed.",
  analysis_error: "The analysis failed.",
};
const $ = (id) => document.getElementById(id);

const state = {
  key: localStorage.getItem(KEY_STORE) || "",
  eventsUrl: null,
  jobs: new Map(), // id -> job document, newest first by insertion
  rows: new Map(), // id -> the job's entry in the library, kept and updated in place
  batches: new Map(), // batch id -> its group in the library
  batchOrder: new Map(), // batch id -> its job ids in submission order (ids made in one millisecond do not sort)
  files: new Map(), // id -> the File uploaded from this page (to run it again without choosing it again)
  cursor: null,
  current: null, // the id of the job shown
  ws: null,
  wsFailures: 0,
  lastEventId: null,
  mixer: null,
  analysis: null, // the shown job's analysis (its energy curve, beats and chords)
  mixes: new Map(), // the shown job's exported mixes: id -> {doc, node, audio}
  models: FALLBACK_MODELS, // GET /v1/models: what the choices are built from
  prefs: { model: null, stems: null }, // the model and stem count last chosen, kept over model list changes
  modelsTimer: 0,
  queueTimer: 0,
  submitting: false,
  started: false,
};

// ---- HTTP

class ApiError extends Error {
  constructor(status, problem) {
    super(describeProblem(status, problem));
    this.status = status;
    this.code = problem.code || "";
  }
}

// A refused request in words: what to fix, never a bare field name.
function describeProblem(status, p) {
  const detail = humanize(p.detail || p.title || `HTTP ${status}`);
  switch (p.code) {
    case "unauthorized": return "The API key was refused. Check it, or ask whoever runs Stemflow for a new one.";
    case "validation_failed": return fixesFor(p.errors || [], detail);
    case "model_unavailable": return `${detail}. The models on offer were read again: choose one that is served.`;
    case "payload_too_large": return `The file is too large (${detail}).`;
    case "unsupported_media_type": return "This file type is not accepted. Send WAV, FLAC, MP3, OGG, Opus or M4A.";
    case "rate_limited": return `Too many requests; try again in ${p.retryAfter || 60} seconds.`;
    case "job_not_found": return "That song does not exist any more, or belongs to another API key.";
    case "job_not_completed": return "The song is not split yet: results appear when it has completed.";
    case "job_finished": return "The job has already ended; nothing to cancel.";
    case "section_out_of_range": return "The section starts past the end of the song: choose one inside it.";
    case "too_many_mixes": return "This song has as many exported mixes as it may keep: delete some first.";
    case "unknown_stem": return "The mix names a stem this song does not have.";
    case "database_unavailable": case "unavailable": case "internal_error":
      return "Stemflow is having trouble right now; try again shortly.";
    default: return detail;
  }
}

// "Please check <the control>: <how>", for the fields the page knows; the service's own words for the rest.
function fixesFor(errors, detail) {
  const known = new Set();
  const other = new Set();
  for (const e of errors) {
    const fix = FIELD_FIXES[String(e.field || "").split(".")[0]];
    if (fix) known.add(fix);
    else other.add(humanize(e.message || detail));
  }
  if (!known.size && !other.size) other.add(detail);
  return [known.size ? `Please check ${[...known].join("; ")}.` : "", other.size ? `Please fix this: ${[...other].join("; ")}.` : ""]
    .filter(Boolean).join(" ");
}

// Field names in the service's messages, as the page labels them.
const humanize = (text) => String(text).replace(/Value error, /g, "")
  .replace(/\b(source_url|trim_start|trim_end)\b/g, (name) => FIELD_NAMES[name] || name);

async function errorOf(response) {
  let problem = {};
  try { problem = await response.json(); } catch { /* not problem+json */ }
  problem.retryAfter = response.headers.get("Retry-After");
  if (response.status === 401) showKeyForm({ refused: true });
  return new ApiError(response.status, problem);
}

async function api(path, options = {}) {
  const headers = { Authorization: `Bearer ${state.key}`, ...(options.headers || {}) };
  const response = await fetch(API + path, { ...options, headers });
  if (!response.ok) throw await errorOf(response);
  return response;
}

const getJson = async (path) => (await api(path)).json();
const postJson = async (path, body) => (await api(path, {
  method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
})).json();

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

// What changed, for screen readers, politely (the status of a song, an export ready): not every progress tick.
function announce(message) {
  $("announcer").textContent = message;
}

function setText(element, text) {
  if (element.textContent !== text) element.textContent = text;
}

// ---- API key

function showKeyForm({ refused = false } = {}) {
  const saved = Boolean(localStorage.getItem(KEY_STORE));
  $("key-section").hidden = false;
  $("key-change").hidden = true;
  $("key-cancel").hidden = !saved || refused; // a refused key is nothing to go back to
  $("key-forget").hidden = !saved;
  $("key-input").focus();
}

function hideKeyForm() {
  $("key-section").hidden = true;
  $("key-change").hidden = !state.key;
  $("key-input").value = "";
}

async function saveKey(event) {
  event.preventDefault();
  const key = $("key-input").value.trim();
  if (!key) return alertUser("Enter the API key.");
  // Checked before it replaces the key in use: a mistyped key leaves everything as it was.
  const response = await fetch(`${API}/jobs?limit=1`, { headers: { Authorization: `Bearer ${key}` } });
  if (!response.ok) {
    const problem = await response.json().catch(() => ({}));
    return alertUser(describeProblem(response.status, problem));
  }
  const changed = key !== state.key;
  state.key = key;
  localStorage.setItem(KEY_STORE, key);
  alertUser("");
  hideKeyForm();
  if (changed) resetLibrary();
  try {
    await loadJobs(true);
    startApp();
    await route();
  } catch (error) {
    fail(error);
  }
}

function forgetKey() {
  localStorage.removeItem(KEY_STORE);
  state.key = "";
  if (state.ws) state.ws.close();
  location.assign("/");
}

// Another key sees other jobs: nothing of the previous one stays on the page.
function resetLibrary() {
  closeJob({ push: false });
  state.jobs = new Map();
  state.rows.clear();
  state.batches.clear();
  state.batchOrder.clear();
  state.files.clear();
  state.cursor = null;
  state.lastEventId = null;
  $("jobs").replaceChildren();
  if (state.ws) state.ws.close(); // reconnects with the new key
}

// ---- options: remembered in this browser across submits and visits

function jobOptions() {
  const options = {
    stems: Number($("opt-stems").value),
    model: $("opt-model").value,
    quality: $("opt-quality").value,
    output_format: $("opt-format").value,
    analyze: $("opt-analyze").checked,
  };
  // Bit depth and sample rate: WAV and FLAC only; left out, the service's defaults.
  if (options.output_format !== "mp3") {
    if ($("opt-depth").value) options.bit_depth = $("opt-depth").value;
    if ($("opt-rate").value) options.sample_rate = Number($("opt-rate").value);
  }
  for (const [field, id] of [["trim_start", "opt-trim-start"], ["trim_end", "opt-trim-end"]]) {
    if ($(id).value !== "") options[field] = Number($(id).value);
  }
  return options;
}

function rememberOptions(options) {
  const { model, stems, quality, output_format: format, analyze } = options;
  const depth = $("opt-depth").value, rate = $("opt-rate").value;
  localStorage.setItem(OPTIONS_STORE, JSON.stringify({ model, stems, quality, format, analyze, depth, rate }));
}

// What each format can hold: no bit depth or sample rate for MP3, no float in FLAC.
function fitFormatChoices(format, depth, rate) {
  const mp3 = format === "mp3";
  depth.disabled = mp3;
  if (rate) rate.disabled = mp3;
  const float = [...depth.options].find((o) => o.value === "float" || o.value === "32");
  float.disabled = format !== "wav";
  if (float.disabled && depth.value === float.value) depth.value = depth.options[0].value === "" ? "" : "24";
}

function restoreOptions() {
  let saved = {};
  try { saved = JSON.parse(localStorage.getItem(OPTIONS_STORE) || "{}"); } catch { /* a damaged entry: defaults */ }
  if (saved.quality) $("opt-quality").value = saved.quality;
  if (saved.format) $("opt-format").value = saved.format;
  if (typeof saved.depth === "string") $("opt-depth").value = saved.depth;
  if (typeof saved.rate === "string") $("opt-rate").value = saved.rate;
  fitFormatChoices($("opt-format").value, $("opt-depth"), $("opt-rate"));
  if (typeof saved.analyze === "boolean") $("opt-analyze").checked = saved.analyze;
  state.prefs = { model: saved.model || null, stems: saved.stems || null };
}

// The song's own start and end: not carried over to the next song.
function clearSongFields() {
  $("file").value = "";
  $("source-url").value = "";
  $("opt-trim-start").value = "";
  $("opt-trim-end").value = "";
}

// Said before anything is sent: what the service would refuse anyway.
function checkForm(files, url) {
  if (!files.length && !url) return "Choose or drop a song file, or paste its URL.";
  if (!files.length) {
    let parsed = null;
    try { parsed = new URL(url); } catch { /* not a URL */ }
    if (!parsed || !["http:", "https:"].includes(parsed.protocol) || !parsed.hostname) {
      return "Please check the URL: give the song's full address, starting with http:// or https://.";
    }
  }
  const start = $("opt-trim-start").value;
  const end = $("opt-trim-end").value;
  if (start !== "" && Number(start) < 0) return "Please check Start: a number of seconds from 0.";
  if (start !== "" && end !== "" && Number(end) <= Number(start)) return "Please check End: it must come after Start.";
  return "";
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

function modelOptions(select, chosen) {
  const { models, default_model: fallback } = state.models;
  const served = models.filter((m) => m.served);
  const keep = served.find((m) => m.name === chosen) || served.find((m) => m.name === fallback) || served[0];
  select.replaceChildren(...models.map((m) => {
    const label = m.served ? m.name : `${m.name} — no worker serves this model now`;
    const option = new Option(label, m.name, m.name === fallback);
    option.disabled = !m.served;
    option.title = m.served ? m.description || m.title || m.name : "No worker serves this model now";
    return option;
  }));
  if (keep) select.value = keep.name;
  return keep;
}

function renderModels() {
  const keep = modelOptions($("opt-model"), state.prefs.model || $("opt-model").value);
  $("submit").disabled = !keep || state.submitting;
  if (!keep) notice("No worker serves any model now: songs cannot be split until one does.");
  renderStems();
}

// The stem counts a model offers; the count wanted is kept where the model has it, else 4.
function stemOptions(select, modelName, wanted) {
  const model = state.models.models.find((m) => m.name === modelName);
  const counts = model && model.served ? model.stems : [];
  select.replaceChildren(...counts.map((n) => new Option(`${n} stems`, String(n), n === 4)));
  if (counts.length) select.value = String(counts.includes(wanted) ? wanted : counts.includes(4) ? 4 : counts[0]);
  return { model, counts };
}

function renderStems() {
  const { model, counts } = stemOptions($("opt-stems"), $("opt-model").value, Number(state.prefs.stems) || 4);
  const sources = (model && model.sources) || FOUR;
  const what = { 2: "vocals and accompaniment", 4: FOUR.join(", "), 6: sources.join(", ") };
  const help = counts.map((n) => `${n}: ${what[n] || `${n} sources`}`).join("; ");
  $("model-help").textContent = [model && model.description, help && `${help}.`].filter(Boolean).join(" ");
}

// ---- submitting

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

// Sends one song (a file or a URL) or a batch, then shows the first.
async function send(files, url, options) {
  const made = files.length ? await upload(files, options) : await postJson("/jobs", { source_url: url, ...options });
  // A batch answers with its jobs in the files' order; remembered oldest first, so the list shows that order.
  const jobs = made.jobs || [made];
  if (made.jobs) state.batchOrder.set(made.id, jobs.map((one) => one.id));
  jobs.forEach((one, i) => { if (files[i]) state.files.set(one.id, files[i]); });
  for (const one of [...jobs].reverse()) remember(one);
  renderJobs();
  await openJob(jobs[0]);
}

async function submitJob(event) {
  event.preventDefault();
  const files = [...$("file").files];
  const url = $("source-url").value.trim();
  const problem = checkForm(files, url);
  if (problem) return alertUser(problem);
  const options = jobOptions();
  $("submit").disabled = state.submitting = true;
  alertUser("");
  try {
    await send(files, url, options);
    rememberOptions(options);
    state.prefs = { model: options.model, stems: options.stems };
    clearSongFields();
    $("file-name").textContent = "";
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

// ---- the library: every song, updated in place (focus and selection survive live updates)

function remember(job) {
  const before = state.jobs.get(job.id);
  if (!before) state.jobs = new Map([[job.id, job], ...state.jobs]);
  else state.jobs.set(job.id, job);
  // New songs (from this page or another) and changes of status are announced; the first listing is not.
  if (before ? before.status !== job.status : state.started) announce(`${titleOf(job)}: ${statusWords(job)}`);
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

const stripExtension = (name) => name.replace(/\.[A-Za-z0-9]{1,5}$/, "") || name;

// A song's title: its file name without the extension, or the last part of its URL.
function titleOf(job) {
  const input = job.input || {};
  if (input.filename) return stripExtension(input.filename);
  if (input.source_url) {
    try {
      const url = new URL(input.source_url);
      const last = decodeURIComponent(url.pathname.split("/").filter(Boolean).pop() || "");
      return last ? stripExtension(last) : url.hostname;
    } catch { return input.source_url; }
  }
  return job.id;
}

const sourceOf = (job) => (job.input && (job.input.filename || job.input.source_url)) || "";
const durationOf = (job) => (job.input && job.input.duration_s) || (job.result && job.result.analysis && job.result.analysis.duration_s) || null;
const percent = (v) => `${Math.round(Number(v) || 0)}%`;

function separationOf(job) {
  const targets = job.options.targets;
  if (targets && targets.length > 1) return targets.map((t) => `${t.model} · ${t.stems} stems`).join(" + ");
  return `${job.options.stems} stems · ${job.options.model}`;
}

function failureWords(error) {
  if (!error) return "failed";
  const code = error.code || "";
  const stageCode = code.replace(/^(ingest|separation|analysis)_/, "");
  if (FAILURES[code] || FAILURES[stageCode]) return FAILURES[code] || FAILURES[stageCode];
  if (/_(delivery_limit|handler_error|dead_lettered)$/.test(code)) return "A Stemflow worker kept failing on this song. Try again later, or with another model.";
  return error.message || "failed";
}

function statusWords(job) {
  if (job.status === "failed") return `failed: ${failureWords(job.error)}`;
  if (job.status === "completed" && job.partial) return "completed, but some separations failed";
  return waiting(job) ? `${job.status} · ${queueText(job.queue)}` : job.status;
}

function matchesFilter(job) {
  const filter = $("filter").value;
  if (filter === "active" && TERMINAL.has(job.status)) return false;
  if (filter && filter !== "active" && job.status !== filter) return false;
  const words = $("search").value.trim().toLowerCase();
  if (!words) return true;
  const text = `${titleOf(job)} ${sourceOf(job)} ${job.id}`.toLowerCase();
  return words.split(/\s+/).every((word) => text.includes(word));
}

// Songs of one batch together, where its newest song falls, in the order they were sent.
function groupedEntries() {
  const entries = [];
  const seen = new Map();
  const members = new Map();
  for (const job of state.jobs.values()) {
    if (job.batch_id) members.set(job.batch_id, [...(members.get(job.batch_id) || []), job]);
  }
  for (const job of state.jobs.values()) {
    const group = job.batch_id && members.get(job.batch_id);
    if (!group || group.length < 2) { entries.push({ job }); continue; }
    if (seen.has(job.batch_id)) continue;
    const entry = { batch: job.batch_id, jobs: inBatchOrder(job.batch_id, group) };
    seen.set(job.batch_id, entry);
    entries.push(entry);
  }
  return entries;
}

// A batch's songs in the order they were sent: the batch document's, read once; by id until it is known.
function inBatchOrder(batchId, jobs) {
  const order = state.batchOrder.get(batchId);
  if (!order) {
    state.batchOrder.set(batchId, []);
    getJson(`/batches/${batchId}`)
      .then((batch) => { state.batchOrder.set(batchId, batch.jobs.map((j) => j.id)); renderJobs(); })
      .catch(() => {}); // the order by id stays
  }
  const place = (job) => {
    const i = (order || []).indexOf(job.id);
    return i < 0 ? Number.MAX_SAFE_INTEGER : i;
  };
  return [...jobs].sort((a, b) => place(a) - place(b) || (a.id < b.id ? -1 : 1));
}

function renderJobs() {
  const wanted = groupedEntries().map((entry) => (entry.batch ? batchNode(entry) : jobRow(entry.job)));
  placeChildren($("jobs"), wanted);
  for (const [id, row] of state.rows) if (!state.jobs.has(id)) { row.remove(); state.rows.delete(id); }
  for (const [id, group] of state.batches) if (!group.isConnected) state.batches.delete(id);
  applyFilter();
  $("more").hidden = !state.cursor;
}

// Puts `nodes` in `parent` in this order: what is gone is removed first, then only what is out of place moves
// (a moved node would lose focus).
function placeChildren(parent, nodes) {
  const wanted = new Set(nodes);
  for (const child of [...parent.children]) if (!wanted.has(child)) child.remove();
  nodes.forEach((node, i) => { if (parent.children[i] !== node) parent.insertBefore(node, parent.children[i] || null); });
}

function batchNode({ batch, jobs }) {
  let group = state.batches.get(batch);
  if (!group) {
    group = Object.assign(document.createElement("li"), { className: "batch" });
    group.dataset.batch = batch;
    group.append(Object.assign(document.createElement("p"), { className: "batch-head" }), document.createElement("ul"));
    group.lastElementChild.setAttribute("aria-label", "Songs of this batch");
    state.batches.set(batch, group);
  }
  const counts = new Map();
  for (const job of jobs) counts.set(job.status, (counts.get(job.status) || 0) + 1);
  const summary = [...counts].map(([status, n]) => `${n} ${status}`).join(", ");
  setText(group.firstElementChild, `Batch of ${jobs.length} songs · ${summary}`);
  placeChildren(group.lastElementChild, jobs.map(jobRow));
  return group;
}

function jobRow(job) {
  let li = state.rows.get(job.id);
  if (!li) {
    li = $("job-row").content.firstElementChild.cloneNode(true);
    li.dataset.id = job.id;
    li.querySelector(".open").addEventListener("click", () => openJob(state.jobs.get(job.id)).catch(fail));
    li.querySelector(".remove").addEventListener("click", () => deleteJobs([job.id]).catch(fail));
    li.querySelector(".again").addEventListener("click", () => openRerun(state.jobs.get(job.id)));
    li.querySelector(".pick").addEventListener("change", updateBulk);
    state.rows.set(job.id, li);
  }
  const title = titleOf(job);
  setText(li.querySelector(".open"), title);
  li.querySelector(".pick").setAttribute("aria-label", `Select ${title}`);
  li.querySelector(".remove").setAttribute("aria-label", `Delete ${title}`);
  li.querySelector(".again").setAttribute("aria-label", `Run ${title} again`);
  const duration = durationOf(job);
  const meta = [sourceOf(job) !== title ? sourceOf(job) : "", duration ? clock(duration) : "", separationOf(job),
    new Date(job.created_at).toLocaleString()].filter(Boolean).join(" · ");
  setText(li.querySelector(".meta"), meta);
  const status = li.querySelector(".state");
  status.className = `state s-${job.status}`;
  setText(status, statusWords(job));
  li.dataset.status = job.status;
  if (state.current === job.id) li.setAttribute("aria-current", "true");
  else li.removeAttribute("aria-current");
  let bar = li.querySelector("progress");
  if (TERMINAL.has(job.status)) bar?.remove();
  else {
    if (!bar) {
      bar = Object.assign(document.createElement("progress"), { max: 100 });
      li.append(bar);
    }
    bar.setAttribute("aria-label", `${title} progress`);
    bar.value = job.progress.overall || 0;
  }
  return li;
}

function applyFilter() {
  let shown = 0;
  for (const [id, li] of state.rows) {
    const visible = matchesFilter(state.jobs.get(id));
    li.hidden = !visible;
    if (!visible) li.querySelector(".pick").checked = false;
    shown += visible;
  }
  for (const group of state.batches.values()) group.hidden = ![...group.querySelectorAll("li.job")].some((li) => !li.hidden);
  const filtering = $("search").value.trim() || $("filter").value;
  $("jobs-empty").hidden = shown > 0;
  setText($("jobs-empty"), filtering ? "No song matches the search." : "No songs yet.");
  updateBulk();
}

function picked() {
  return [...state.rows.entries()].filter(([, li]) => !li.hidden && li.querySelector(".pick").checked).map(([id]) => id);
}

function updateBulk() {
  const ids = picked();
  const visible = [...state.rows.values()].filter((li) => !li.hidden);
  setText($("delete-selected"), ids.length ? `Delete selected (${ids.length})` : "Delete selected");
  $("delete-selected").disabled = !ids.length;
  $("select-all").checked = visible.length > 0 && ids.length === visible.length;
  $("select-all").indeterminate = ids.length > 0 && ids.length < visible.length;
}

function selectAllShown() {
  const on = $("select-all").checked;
  for (const li of state.rows.values()) if (!li.hidden) li.querySelector(".pick").checked = on;
  updateBulk();
}

async function deleteJobs(ids) {
  const jobs = ids.map((id) => state.jobs.get(id)).filter(Boolean);
  if (!jobs.length) return;
  const what = jobs.length === 1 ? `${titleOf(jobs[0])} and its stems` : `these ${jobs.length} songs and their stems`;
  if (!confirm(`Delete ${what}?`)) return;
  const results = await Promise.allSettled(jobs.map((job) => api(`/jobs/${job.id}`, { method: "DELETE" })));
  const gone = jobs.filter((job, i) => results[i].status === "fulfilled" || results[i].reason.status === 404);
  for (const job of gone) {
    state.jobs.delete(job.id);
    state.files.delete(job.id);
    if (state.current === job.id) closeJob();
  }
  renderJobs();
  announce(gone.length === 1 ? `Deleted ${titleOf(gone[0])}.` : `Deleted ${gone.length} songs.`);
  const refused = results.find((r) => r.status === "rejected" && r.reason.status !== 404);
  if (refused) fail(refused.reason);
}

// ---- run again with another model

function openRerun(job) {
  if (!job) return;
  const dialog = $("rerun-dialog");
  dialog.dataset.job = job.id;
  const other = state.models.models.find((m) => m.served && m.name !== job.options.model);
  modelOptions($("rerun-model"), other ? other.name : job.options.model);
  renderRerunStems(job.options.stems);
  const resend = job.input.source_url || state.files.has(job.id) ? ""
    : " Stemflow does not send uploads back: the page will ask you to choose the file again.";
  $("rerun-what").textContent = `${titleOf(job)} was split into ${separationOf(job)}.${resend}`;
  dialog.returnValue = "";
  dialog.showModal();
}

function renderRerunStems(wanted) {
  stemOptions($("rerun-stems"), $("rerun-model").value, Number(wanted || $("rerun-stems").value) || 4);
}

async function rerun() {
  const dialog = $("rerun-dialog");
  const job = state.jobs.get(dialog.dataset.job);
  if (dialog.returnValue !== "run" || !job) return;
  const kept = ["quality", "output_format", "bit_depth", "sample_rate", "analyze", "separate", "trim_start", "trim_end", "residual", "priority"];
  const options = Object.fromEntries(kept.filter((k) => job.options[k] != null).map((k) => [k, job.options[k]]));
  Object.assign(options, { model: $("rerun-model").value, stems: Number($("rerun-stems").value) });
  const file = state.files.get(job.id);
  if (job.input.source_url || file) return send(file ? [file] : [], job.input.source_url, options);
  // An upload from another visit: the same options in the form, and the file to choose again.
  state.prefs = { model: options.model, stems: options.stems };
  renderModels();
  $("opt-quality").value = options.quality;
  $("opt-format").value = options.output_format;
  $("opt-depth").value = options.bit_depth === 32 ? "float" : String(options.bit_depth || "");
  $("opt-rate").value = String(options.sample_rate || "");
  fitFormatChoices(options.output_format, $("opt-depth"), $("opt-rate"));
  $("file-name").textContent = `Choose ${job.input.filename || "the song"} again to split it with ${options.model} into ${options.stems} stems.`;
  $("submit-section").scrollIntoView({ block: "start" });
  $("file").focus();
}

// ---- live events: the API key travels as a WebSocket subprotocol, never in the URL

function connect() {
  if (!state.eventsUrl || !state.key || state.ws) return;
  const url = new URL(state.eventsUrl, location.href);
  url.search = "";
  url.protocol = url.protocol.replace("http", "ws");
  // Browsers cannot set headers on WebSockets; the notifier reads the key from the offered subprotocol
  // and answers with the plain one.
  const ws = new WebSocket(url, ["stemflow", `stemflow.bearer.${state.key}`]);
  state.ws = ws;
  let pinger = 0;
  ws.onopen = () => {
    state.wsFailures = 0;
    setLive(true);
    sendFrame({ type: "subscribe", ...(state.lastEventId ? { last_event_id: state.lastEventId } : {}) });
    if (state.current && !TERMINAL.has(state.jobs.get(state.current)?.status)) sendFrame({ type: "subscribe", job_id: state.current });
    pinger = setInterval(() => sendFrame({ type: "ping" }), 60000); // the notifier closes idle connections
  };
  ws.onmessage = (message) => onFrame(JSON.parse(message.data));
  ws.onclose = () => {
    clearInterval(pinger);
    if (state.ws === ws) state.ws = null;
    setLive(false);
    if (!state.key) return;
    const delay = Math.min(30000, 500 * 2 ** state.wsFailures++);
    setTimeout(connect, delay);
  };
}

function sendFrame(message) {
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
  if (type.startsWith("mix.")) return void onMixEvent(id, event.data.mix);
  if (type === "progress") {
    if (!job) return void refreshJob(id).catch(() => {}); // another tab's job, or one just deleted
    if (TERMINAL.has(job.status)) return;
    // The end of a job is shown from its document (result, error), never from a progress event alone.
    if (TERMINAL.has(event.data.status)) return void refreshJob(id).catch(() => {});
    if (job.status !== event.data.status) announce(`${titleOf(job)}: ${event.data.status}`);
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

// ---- addresses: /jobs/<id> opens that song; back and forward move between songs and the library

function go(id) {
  const path = id ? `/jobs/${id}` : "/";
  if (location.pathname !== path) history.pushState({ job: id }, "", path);
}

async function route() {
  const match = JOB_PATH.exec(location.pathname);
  if (!match) return closeJob({ push: false });
  const id = match[1];
  if (state.current === id) return;
  let job = state.jobs.get(id);
  try {
    if (!job) {
      job = await getJson(`/jobs/${id}`);
      remember(job);
      renderJobs();
    }
  } catch (error) {
    history.replaceState(null, "", "/");
    closeJob({ push: false });
    if (error instanceof ApiError && error.status === 404) {
      return alertUser("No song of this API key has that address: it was deleted, or it belongs to another key.");
    }
    return fail(error);
  }
  await openJob(job, { push: false });
}

async function copyLink() {
  try {
    await navigator.clipboard.writeText(location.href);
    announce("The link to this song was copied. Whoever opens it needs the API key too.");
    setText($("copy-link"), "Link copied");
  } catch {
    alertUser(`Copy this address: ${location.href}`);
  }
}

// ---- one job

async function openJob(job, { push = true } = {}) {
  if (!job) return;
  if (state.current !== job.id) {
    closeJob({ push: false });
    state.current = job.id;
    $("job-section").hidden = false;
    $("job-title").textContent = titleOf(job);
    setText($("copy-link"), "Copy link to this song");
    document.title = `${titleOf(job)} – Stemflow`;
    renderJobs(); // the open song is marked in the library
  }
  if (push) go(job.id);
  showJob(job);
  $("job-section").scrollIntoView({ block: "start" });
  if (push) $("job-title").focus({ preventScroll: true });
  if (!TERMINAL.has(job.status)) sendFrame({ type: "subscribe", job_id: job.id });
}

function closeJob({ push = true } = {}) {
  clearTimeout(state.queueTimer);
  if (state.mixer) state.mixer.close();
  state.mixer = null;
  const was = state.current;
  state.current = null;
  state.analysis = null;
  clearMixes();
  $("results").hidden = true;
  $("job-section").hidden = true;
  document.title = "Stemflow";
  if (was && state.rows.has(was)) state.rows.get(was).removeAttribute("aria-current");
  if (push) go(null);
}

function showProgress(job) {
  const p = job.progress;
  const ended = job.status === "failed" || job.status === "cancelled";
  // A finished job shows its results, not four full bars; a failed one does not claim 100%.
  $("stages").hidden = job.status === "completed";
  $("p-overall").hidden = ended;
  $("p-overall").value = p.overall || 0;
  setText($("p-overall-text"), ended ? job.status : percent(p.overall));
  for (const stage of STAGES) {
    const s = p[stage] || { status: "pending", percent: 0 };
    $(`p-${stage}`).value = s.status === "completed" ? 100 : s.percent || 0;
    setText($(`p-${stage}-text`), s.status === "running" ? percent(s.percent) : s.status);
  }
  const line = $("job-status");
  line.className = `status-line s-${job.status}`;
  setText(line, statusWords(job));
  line.dataset.code = (job.error && job.error.code) || "";
  const duration = durationOf(job);
  setText($("job-meta"), [sourceOf(job), duration ? clock(duration) : "", separationOf(job)].filter(Boolean).join(" · "));
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
        if (state.mixer && state.mixer.jobId === job.id) state.mixer.setAnalysis(analysis);
        showDoubt(analysis);
        showChords(analysis.chords || [], analysis.duration_s);
      })
      .catch(() => {});
  }
  loadMixes(job).catch(() => {}); // a gateway without practice mixes: no list
  await play(job, job.result.stems);
}

// A mixer of these stems of the job, in place of the one shown.
async function play(job, stems) {
  if (state.mixer) state.mixer.close();
  const mixer = new Mixer(job, stems);
  state.mixer = mixer;
  if (state.analysis) mixer.setAnalysis(state.analysis);
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
  if (!a) return showChords([], 0);
  const conf = (v) => `confidence ${Math.round(100 * v)}%`;
  $("bpm").textContent = a.tempo_bpm.toFixed(1);
  $("bpm-conf").textContent = conf(a.tempo_confidence);
  $("key").textContent = a.key;
  $("key-conf").textContent = conf(a.key_confidence);
  if (a.key_camelot) $("key-conf").textContent += ` · ${a.key_camelot} · ${a.key_open_key}`;
  $("lufs").textContent = a.loudness_lufs.toFixed(1);
  $("dur").textContent = `${clock(a.duration_s)} long`;
  showChords(a.chords || [], a.duration_s);
}

// The chord timeline under the waveform: each chord where it sounds; no-chord stretches left empty.
function showChords(chords, duration) {
  const lane = $("chords");
  const changes = chords.filter((c) => c.root);
  lane.hidden = !changes.length || !duration;
  if (lane.hidden) return lane.replaceChildren();
  lane.replaceChildren(...changes.map((c) => {
    const span = Object.assign(document.createElement("span"), { className: "chord", textContent: c.label });
    span.setAttribute("role", "listitem");
    span.setAttribute("aria-label", `${c.label} at ${clock(c.start)}`);
    span.title = `${c.label} · ${clock(c.start)}–${clock(c.end)}`;
    span.dataset.start = String(c.start);
    span.dataset.end = String(c.end);
    span.style.left = `${(100 * c.start) / duration}%`;
    span.style.width = `${(100 * (c.end - c.start)) / duration}%`;
    return span;
  }));
}

function markChord(position) {
  let now = "";
  for (const span of $("chords").children) {
    const on = Number(span.dataset.start) <= position && position < Number(span.dataset.end);
    span.classList.toggle("now", on);
    if (on) now = span.textContent;
  }
  setText($("now-chord"), now);
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

// ---- the mixer: one AudioBufferSourceNode per stem (and one for the click), all started at the same instant

class Mixer {
  constructor(job, stems = job.result.stems) {
    this.job = job;
    this.jobId = job.id;
    this.ctx = new AudioContext();
    this.master = this.ctx.createGain();
    this.master.connect(this.ctx.destination);
    this.clickGain = this.ctx.createGain();
    this.clickGain.gain.value = $("click").checked ? 1 : 0;
    this.clickGain.connect(this.master);
    this.clickBuffer = null;
    this.stems = stems.map((info) => this.row(info));
    this.sources = [];
    this.playing = false;
    this.offset = 0;
    this.startedAt = 0;
    this.section = null; // {start, end} in seconds: what loops and what is exported
    this.looping = null; // the section the sources loop now
    this.duration = Math.max(...stems.map((s) => s.duration), 0);
    this.peaks = null;
    this.energy = null;
    this.frame = 0;
    this.setState("loading");
    this.draw();
  }

  row(info) {
    const node = $("stem-row").content.firstElementChild.cloneNode(true);
    const stem = { info, node, gain: this.ctx.createGain(), buffer: null, peaks: null, volume: 1, mute: false, solo: false };
    stem.gain.connect(this.master);
    node.dataset.stem = info.name;
    node.querySelector(".stem-name").textContent = info.name;
    node.querySelector(".sr").textContent = `${info.name} volume`;
    const slider = node.querySelector("input");
    const value = node.querySelector("output");
    slider.addEventListener("input", () => {
      stem.volume = slider.value / 100;
      value.textContent = `${slider.value}%`;
      value.classList.toggle("unity", slider.value === "100");
      this.apply();
    });
    value.classList.add("unity");
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
    this.peaks = normalised(peaksOf(this.stems.map((s) => s.buffer), 1200));
    // Each stem's own waveform, on the scale of the loudest: a quiet stem looks quiet.
    const own = this.stems.map((s) => peaksOf([s.buffer], 400));
    const top = Math.max(1e-6, ...own.map((p) => Math.max(...p)));
    this.stems.forEach((s, i) => { s.peaks = own[i].map((p) => p / top); });
    $("load-state").textContent = "";
    $("play").disabled = $("stop").disabled = false;
    $("wave").setAttribute("aria-valuemax", String(Math.round(this.duration)));
    this.makeClick();
    this.apply();
    this.setState("ready");
    this.draw();
  }

  setAnalysis(analysis) {
    this.analysis = analysis;
    this.energy = analysis.energy && analysis.energy.length ? analysis.energy : null;
    this.makeClick();
    this.draw();
  }

  // The click as one more track: a buffer of ticks on the analysed beats (accented on downbeats), so it stays
  // in time through seeks and loops like the stems do.
  makeClick() {
    const beats = (this.analysis && this.analysis.beats) || [];
    if (!beats.length || !this.peaks || this.clickBuffer) return;
    const rate = 22050;
    const buffer = this.ctx.createBuffer(1, Math.ceil(this.duration * rate), rate);
    const data = buffer.getChannelData(0);
    const downbeats = this.analysis.downbeats || [];
    for (const beat of beats) {
      const accent = downbeats.some((d) => Math.abs(d - beat) < 0.02);
      const [pitch, level] = accent ? [1760, 0.8] : [1320, 0.5];
      const first = Math.round(beat * rate);
      for (let i = 0; i < 0.03 * rate && first + i < data.length; i++) {
        data[first + i] += level * Math.sin((2 * Math.PI * pitch * i) / rate) * Math.exp(-i / (0.006 * rate));
      }
    }
    this.clickBuffer = buffer;
    if (this.playing) this.seek(this.position());
  }

  setClick(on) {
    this.clickGain.gain.setTargetAtTime(on ? 1 : 0, this.ctx.currentTime, 0.01);
  }

  apply() {
    const soloing = this.stems.some((s) => s.solo);
    for (const s of this.stems) {
      const audible = soloing ? s.solo : !s.mute;
      const gain = audible ? s.volume : 0;
      s.gain.gain.setTargetAtTime(gain, this.ctx.currentTime, 0.015);
      s.node.dataset.gain = gain.toFixed(2);
      s.node.classList.toggle("silent", !audible);
      s.node.classList.toggle("soloed", s.solo);
    }
    this.draw();
  }

  position() {
    if (!this.playing) return this.offset;
    const t = Math.max(this.ctx.currentTime - this.startedAt, this.offset); // not before it starts
    const loop = this.looping;
    if (loop && t >= loop.end) return loop.start + ((t - loop.start) % (loop.end - loop.start));
    return Math.min(t, this.duration);
  }

  async play() {
    if (this.playing || !this.peaks) return;
    await this.ctx.resume();
    const when = this.ctx.currentTime + 0.05;
    const loop = $("loop").checked && this.section ? this.section : null;
    if (loop && (this.offset < loop.start || this.offset >= loop.end)) this.offset = loop.start;
    if (this.offset >= this.duration) this.offset = 0;
    const tracks = this.stems.map((s) => [s.buffer, s.gain]);
    if (this.clickBuffer) tracks.push([this.clickBuffer, this.clickGain]);
    this.sources = tracks.map(([buffer, gain]) => {
      const source = this.ctx.createBufferSource();
      source.buffer = buffer;
      if (loop) Object.assign(source, { loop: true, loopStart: loop.start, loopEnd: loop.end });
      source.connect(gain);
      source.start(when, this.offset);
      return source;
    });
    this.looping = loop;
    this.startedAt = when - this.offset;
    this.playing = true;
    this.setState("playing");
    const tick = () => {
      if (!this.playing) return;
      if (!this.looping && this.position() >= this.duration) return this.stop();
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

  // Back to the start, whether playing or paused: the time and the playhead say so.
  stop() {
    this.halt();
    this.offset = 0;
    this.setState("ready");
    this.draw();
  }

  halt() {
    for (const source of this.sources) { try { source.stop(); } catch { /* not started */ } }
    this.sources = [];
    this.playing = false;
    this.looping = null;
    cancelAnimationFrame(this.frame);
    this.draw();
  }

  seek(seconds) {
    const was = this.playing;
    if (was) this.halt();
    this.offset = Math.max(0, Math.min(seconds, this.duration));
    if (was) this.play(); else this.draw();
  }

  // A section from two times in any order (null clears it); a loop playing now follows it.
  setSection(a, b, { restart = true } = {}) {
    const [start, end] = a == null || b == null ? [null, null] : [Math.max(0, Math.min(a, b)), Math.min(this.duration, Math.max(a, b))];
    this.section = start != null && end - start >= 0.1 ? { start: round2(start), end: round2(end) } : null;
    $("sec-start").value = this.section ? this.section.start.toFixed(2) : "";
    $("sec-end").value = this.section ? this.section.end.toFixed(2) : "";
    $("wave").dataset.section = this.section ? `${this.section.start}-${this.section.end}` : "";
    if (restart) this.restartLoop();
    else this.draw();
  }

  // Playing sources loop what they were started with: a new section, or the loop switched, starts them again.
  restartLoop() {
    const wanted = $("loop").checked ? this.section : null;
    if (this.playing && wanted !== this.looping) this.seek(this.position());
    else this.draw();
  }

  setState(name) {
    $("player").dataset.state = name;
    $("play").textContent = name === "playing" ? "Pause" : "Play";
  }

  draw() {
    const pos = this.position();
    const at = this.duration ? pos / this.duration : 0;
    const canvas = $("wave");
    const section = this.section && this.duration ? [this.section.start / this.duration, this.section.end / this.duration] : null;
    drawWave(canvas, this.peaks || this.energy, at, section, true);
    for (const s of this.stems) drawWave(s.node.querySelector("canvas"), s.peaks, at, section, false);
    $("time").textContent = `${clock(pos)} / ${clock(this.duration)}`;
    canvas.setAttribute("aria-valuenow", String(Math.round(pos)));
    canvas.dataset.position = pos.toFixed(2);
    canvas.setAttribute("aria-valuetext", `${clock(pos)} of ${clock(this.duration)}`);
    markChord(pos);
  }

  close() {
    this.halt();
    this.ctx.close();
    $("mixer").replaceChildren();
    $("play").disabled = $("stop").disabled = true;
  }
}

const round2 = (v) => Math.round(v * 100) / 100;

// A waveform (values 0..1) on a canvas: played part in the accent colour, the section shaded, the playhead.
function drawWave(canvas, values, at, section, playhead) {
  const ratio = window.devicePixelRatio || 1;
  const width = Math.round(canvas.clientWidth * ratio);
  const height = Math.round(canvas.clientHeight * ratio);
  if (!width || !height) return;
  if (canvas.width !== width || canvas.height !== height) { canvas.width = width; canvas.height = height; }
  const g = canvas.getContext("2d");
  const style = getComputedStyle(document.documentElement);
  const color = (name) => style.getPropertyValue(name).trim();
  g.clearRect(0, 0, width, height);
  if (section) {
    g.fillStyle = color("--section");
    g.fillRect(section[0] * width, 0, (section[1] - section[0]) * width, height);
  }
  if (values) {
    const mid = height / 2;
    const played = color("--accent");
    const rest = color("--wave");
    for (let x = 0; x < width; x++) {
      const i0 = Math.floor((x / width) * values.length);
      const i1 = Math.max(i0 + 1, Math.floor(((x + 1) / width) * values.length));
      let v = 0;
      for (let i = i0; i < i1 && i < values.length; i++) v = Math.max(v, values[i]);
      g.fillStyle = x / width < at ? played : rest;
      const h = Math.max(ratio / 2, v * (mid - 2));
      g.fillRect(x, mid - h, 1, 2 * h);
    }
  }
  g.fillStyle = color("--fg");
  if (section) for (const edge of section) g.fillRect(Math.round(edge * width), 0, Math.max(1, ratio), height);
  if (playhead) g.fillRect(Math.round(at * width), 0, Math.max(2, 2 * ratio), height);
}

// The peak of the summed buffers in each of `columns` slices (not normalised).
function peaksOf(buffers, columns) {
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
  return peaks;
}

function normalised(peaks) {
  const top = Math.max(...peaks, 1e-6);
  return peaks.map((p) => p / top);
}

function setupPlayer() {
  const mixer = () => state.mixer;
  const toggle = (m) => Promise.resolve(m.playing ? m.pause() : m.play()).catch(fail);
  $("play").addEventListener("click", () => { if (mixer()) toggle(mixer()); });
  $("stop").addEventListener("click", () => mixer()?.stop());
  setupWave(mixer);
  $("wave").addEventListener("keydown", (e) => {
    const m = mixer();
    if (!m) return;
    const moves = { ArrowRight: 5, ArrowUp: 5, ArrowLeft: -5, ArrowDown: -5 };
    if (e.key in moves) m.seek(m.position() + moves[e.key]);
    else if (e.key === "Home") m.seek(0);
    else if (e.key === "End") m.seek(m.duration);
    else if (e.key === " ") toggle(m);
    else if (e.key === "[") m.setSection(m.position(), m.section ? m.section.end : m.duration);
    else if (e.key === "]") m.setSection(m.section ? m.section.start : 0, m.position());
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

// On the waveform a click seeks and a drag chooses the section to loop and export.
function setupWave(mixer) {
  const wave = $("wave");
  let drag = null;
  const timeAt = (e, m) => (Math.max(0, Math.min(e.offsetX, wave.clientWidth)) / wave.clientWidth) * m.duration;
  wave.addEventListener("pointerdown", (e) => {
    const m = mixer();
    if (!m || !m.duration) return;
    wave.setPointerCapture(e.pointerId);
    drag = { x: e.offsetX, from: timeAt(e, m), moved: false };
  });
  wave.addEventListener("pointermove", (e) => {
    const m = mixer();
    if (!drag || !m) return;
    if (Math.abs(e.offsetX - drag.x) > 4) drag.moved = true;
    if (drag.moved) m.setSection(drag.from, timeAt(e, m), { restart: false }); // the loop follows on release
  });
  wave.addEventListener("pointerup", (e) => {
    const m = mixer();
    if (drag && m && !drag.moved) m.seek(timeAt(e, m));
    else if (drag && m) {
      m.restartLoop();
      if (m.section) announce(`Section ${clock(m.section.start)} to ${clock(m.section.end)}`);
    }
    drag = null;
  });
  wave.addEventListener("pointercancel", () => { drag = null; });
}

function setupPractice() {
  const show = () => {
    const tempo = Number($("tempo").value);
    const pitch = Number($("pitch").value);
    $("tempo-out").textContent = `${tempo}%`;
    $("pitch-out").textContent = `${pitch > 0 ? "+" : pitch < 0 ? "−" : ""}${Math.abs(pitch)} semitone${Math.abs(pitch) === 1 ? "" : "s"}`;
  };
  $("tempo").addEventListener("input", show);
  $("pitch").addEventListener("input", show);
  show();
  const fromInputs = () => {
    const m = state.mixer;
    const [a, b] = [$("sec-start").value, $("sec-end").value];
    if (m && a !== "" && b !== "") m.setSection(Number(a), Number(b));
  };
  $("sec-start").addEventListener("change", fromInputs);
  $("sec-end").addEventListener("change", fromInputs);
  $("sec-clear").addEventListener("click", () => state.mixer?.setSection(null, null));
  $("loop").addEventListener("change", () => state.mixer?.restartLoop());
  $("click").addEventListener("change", () => state.mixer?.setClick($("click").checked));
  $("export").addEventListener("click", () => exportMix().catch(fail));
  const fitMix = () => {
    fitFormatChoices($("mix-format").value, $("mix-depth"), null);
    $("mix-depth-label").hidden = $("mix-rate").hidden = $("mix-format").value === "mp3";
  };
  $("mix-format").addEventListener("change", fitMix);
  fitMix();
}

// ---- exported mixes: rendered by Stemflow (POST /v1/jobs/{id}/mixes), followed live, played and downloaded here

function mixRequest(m) {
  const body = { format: $("mix-format").value };
  if (body.format !== "mp3") body.bit_depth = Number($("mix-depth").value);
  const gains = {};
  for (const s of m.stems) if (s.volume !== 1) gains[s.info.name] = round2(s.volume);
  if (Object.keys(gains).length) body.gains = gains;
  const mute = m.stems.filter((s) => s.mute).map((s) => s.info.name);
  const solo = m.stems.filter((s) => s.solo).map((s) => s.info.name);
  if (mute.length) body.mute = mute;
  if (solo.length) body.solo = solo;
  if (!$("target-pick").hidden) body.target = $("target").value;
  const tempo = Number($("tempo").value) / 100;
  const semitones = Number($("pitch").value);
  if (tempo !== 1) body.tempo = tempo;
  if (semitones) body.semitones = semitones;
  if (m.section) Object.assign(body, { start: m.section.start, end: m.section.end });
  if (m.section && $("loop").checked) body.loops = Math.max(1, Math.min(16, Math.round(Number($("loops").value) || 1)));
  if ($("click").checked) body.click = true;
  return body;
}

async function exportMix() {
  const m = state.mixer;
  if (!m || !m.peaks) return alertUser("The stems are still loading: export when the player is ready.");
  if ($("click").checked && !(state.analysis && (state.analysis.beats || []).length)) {
    return alertUser("The click follows the analysed beats, and this song has none: untick Click on the beats.");
  }
  alertUser("");
  const mix = await postJson(`/jobs/${m.jobId}/mixes`, mixRequest(m));
  showMix(mix);
  announce(`Exporting the mix: ${describeMix(mix)}`);
  followMix(m.jobId, mix.id);
}

async function loadMixes(job) {
  const { items } = await getJson(`/jobs/${job.id}/mixes`);
  if (state.current !== job.id) return;
  for (const mix of [...items].reverse()) {
    showMix(mix);
    if (!TERMINAL.has(mix.status)) followMix(job.id, mix.id);
  }
}

// Until it ends, a mix is read again now and then (its events may come first; whichever does, wins).
function followMix(jobId, mixId) {
  const poll = async () => {
    const shown = state.mixes.get(mixId);
    if (state.current !== jobId || !shown || TERMINAL.has(shown.doc.status)) return;
    try { showMix(await getJson(`/jobs/${jobId}/mixes/${mixId}`)); } catch { /* read again next time */ }
    shown.timer = setTimeout(poll, MIX_POLL_MS);
  };
  const shown = state.mixes.get(mixId);
  if (shown) { clearTimeout(shown.timer); shown.timer = setTimeout(poll, MIX_POLL_MS); }
}

function onMixEvent(jobId, mix) {
  const shown = mix && jobId === state.current && state.mixes.get(mix.id);
  if (!shown) return;
  if (mix.status === "completed") return void getJson(`/jobs/${jobId}/mixes/${mix.id}`).then(showMix).catch(() => {});
  showMix({ ...shown.doc, status: mix.status, percent: mix.percent, error: mix.error });
}

function describeMix(mix) {
  const o = mix.options || {};
  const parts = [];
  if (o.tempo && o.tempo !== 1) parts.push(`tempo ${Math.round(o.tempo * 100)}%`);
  const pitch = (o.semitones || 0) + (o.cents || 0) / 100;
  if (pitch) parts.push(`${pitch > 0 ? "+" : "−"}${Math.abs(pitch)} semitones`);
  if (o.start != null || o.end != null) parts.push(`${clock(o.start || 0)}–${o.end != null ? clock(o.end) : "end"}${o.loops > 1 ? ` ×${o.loops}` : ""}`);
  if (o.solo && o.solo.length) parts.push(`${o.solo.join(", ")} solo`);
  if (o.mute && o.mute.length) parts.push(`${o.mute.join(", ")} muted`);
  const changed = Object.entries(o.gains || {}).map(([name, gain]) => `${name} ${Math.round(gain * 100)}%`);
  if (changed.length) parts.push(changed.join(", "));
  if (o.click) parts.push("click");
  const file = mix.file || {};
  const depth = file.bit_depth || o.bit_depth || (o.format === "mp3" ? null : 24);
  const rate = file.sample_rate && `${file.sample_rate / 1000} kHz`;
  parts.push([(o.format || "wav").toUpperCase(), depth && (depth === 32 ? "32-bit float" : `${depth}-bit`), rate].filter(Boolean).join(" "));
  return parts.join(" · ");
}

function showMix(mix) {
  let shown = state.mixes.get(mix.id);
  if (!shown) {
    const li = document.createElement("li");
    li.dataset.mix = mix.id;
    const what = Object.assign(document.createElement("span"), { className: "what" });
    const status = Object.assign(document.createElement("span"), { className: "mix-status" });
    const get = Object.assign(document.createElement("button"), { type: "button", textContent: "Download", hidden: true });
    const remove = Object.assign(document.createElement("button"), { type: "button", textContent: "Delete" });
    li.append(what, status, get, remove);
    shown = { doc: mix, node: li, audio: null, timer: 0 };
    get.addEventListener("click", () => downloadMix(shown.doc).catch(fail));
    remove.addEventListener("click", () => deleteMix(shown.doc).catch(fail));
    state.mixes.set(mix.id, shown);
    $("mixes").prepend(li);
  }
  const before = shown.doc.status;
  shown.doc = mix;
  const li = shown.node;
  const label = describeMix(mix);
  setText(li.querySelector(".what"), label);
  li.querySelector("button").hidden = mix.status !== "completed";
  li.querySelector("button").setAttribute("aria-label", `Download the mix: ${label}`);
  li.querySelectorAll("button")[1].setAttribute("aria-label", `Delete the mix: ${label}`);
  li.dataset.status = mix.status;
  const status = li.querySelector(".mix-status");
  status.className = `mix-status s-${mix.status}`;
  const words = { queued: "waiting for a worker", running: `rendering · ${percent(mix.percent)}`, completed: "ready", failed: `failed: ${(mix.error && mix.error.message) || "the mix could not be rendered"}` };
  setText(status, words[mix.status] || mix.status);
  let bar = li.querySelector("progress");
  if (TERMINAL.has(mix.status)) bar?.remove();
  else {
    if (!bar) li.append(bar = Object.assign(document.createElement("progress"), { max: 100 }));
    bar.value = mix.percent || 0;
    bar.setAttribute("aria-label", `Mix progress: ${label}`);
  }
  if (mix.status === "completed" && !shown.audio) loadMixAudio(shown).catch(() => {});
  if (before !== mix.status && TERMINAL.has(mix.status)) announce(`The mix is ${mix.status === "completed" ? "ready" : "not rendered"}: ${label}`);
  $("mixes-section").hidden = state.mixes.size === 0;
}

async function loadMixAudio(shown) {
  shown.audio = document.createElement("audio");
  const blob = await (await api(`/jobs/${shown.doc.job_id}/mixes/${shown.doc.id}/file`)).blob();
  shown.url = URL.createObjectURL(blob);
  Object.assign(shown.audio, { controls: true, src: shown.url, preload: "metadata" });
  shown.audio.setAttribute("aria-label", `Play the mix: ${describeMix(shown.doc)}`);
  shown.node.append(shown.audio);
}

async function downloadMix(mix) {
  const job = state.jobs.get(mix.job_id);
  const name = `${job ? titleOf(job) : mix.job_id} – practice mix.${(mix.file && mix.file.format) || mix.options.format || "wav"}`;
  await download(`/v1/jobs/${mix.job_id}/mixes/${mix.id}/file`, name);
}

async function deleteMix(mix) {
  await api(`/jobs/${mix.job_id}/mixes/${mix.id}`, { method: "DELETE" });
  const shown = state.mixes.get(mix.id);
  if (shown) forgetMix(shown);
  state.mixes.delete(mix.id);
  $("mixes-section").hidden = state.mixes.size === 0;
  announce("The mix was deleted.");
}

function forgetMix(shown) {
  clearTimeout(shown.timer);
  if (shown.url) URL.revokeObjectURL(shown.url);
  shown.node.remove();
}

function clearMixes() {
  for (const shown of state.mixes.values()) forgetMix(shown);
  state.mixes.clear();
  $("mixes-section").hidden = true;
}

// ---- start

async function findEventsUrl() {
  try {
    const response = await fetch("/config.json");
    if (response.ok) state.eventsUrl = (await response.json()).events_url || null;
  } catch { /* optional: job documents carry links.events */ }
}

function startApp() {
  state.started = true;
  hideKeyForm();
  $("submit-section").hidden = false;
  $("jobs-section").hidden = false;
  connect();
  loadModels();
  clearInterval(state.modelsTimer);
  state.modelsTimer = setInterval(() => { if (!document.hidden) loadModels(); }, MODELS_REFRESH_MS);
}

function setupLibrary() {
  $("search").addEventListener("input", applyFilter);
  $("filter").addEventListener("change", applyFilter);
  $("select-all").addEventListener("change", selectAllShown);
  $("delete-selected").addEventListener("click", () => deleteJobs(picked()).catch(fail));
  $("more").addEventListener("click", () => loadJobs(false).catch(fail));
  $("rerun").addEventListener("click", () => openRerun(state.jobs.get(state.current)));
  $("rerun-model").addEventListener("change", () => renderRerunStems());
  $("rerun-dialog").addEventListener("close", () => rerun().catch(fail));
  $("close-job").addEventListener("click", () => { closeJob(); $("jobs-title").scrollIntoView(); $("search").focus(); });
  $("copy-link").addEventListener("click", () => copyLink());
  $("home").addEventListener("click", (e) => { e.preventDefault(); closeJob(); window.scrollTo(0, 0); });
  window.addEventListener("popstate", () => route().catch(fail));
}

async function main() {
  $("key-form").addEventListener("submit", (e) => saveKey(e).catch(fail));
  $("key-forget").addEventListener("click", forgetKey);
  $("key-change").addEventListener("click", () => showKeyForm());
  $("key-cancel").addEventListener("click", () => { hideKeyForm(); alertUser(""); });
  $("job-form").addEventListener("submit", submitJob);
  $("opt-model").addEventListener("change", () => { state.prefs.model = $("opt-model").value; renderStems(); });
  $("opt-stems").addEventListener("change", () => { state.prefs.stems = Number($("opt-stems").value); });
  $("opt-format").addEventListener("change", () => fitFormatChoices($("opt-format").value, $("opt-depth"), $("opt-rate")));
  restoreOptions();
  setupDrop();
  setupPlayer();
  setupPractice();
  setupLibrary();
  await findEventsUrl();
  if (!state.key) return showKeyForm();
  try {
    await loadJobs(true);
    startApp();
    await route();
  } catch (error) {
    fail(error);
  }
}

main();
