// Sidecar console: detect, tasks and server views. Plain JS, no build step. Every name and label
// comes from uploads, so text is set as text nodes only, never parsed as HTML.
const $ = (id) => document.getElementById(id);
const KEY = "sidecar-api-key";  // sessionStorage: forgotten when the tab closes

function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

function say(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function api(path, options = {}) {
  const key = sessionStorage.getItem(KEY);
  const headers = key ? { Authorization: `Bearer ${key}` } : {};
  const response = await fetch(path, { ...options, headers });
  const type = response.headers.get("content-type") || "";
  const text = await response.text();  // empty for 204
  const body = text && type.includes("json") ? JSON.parse(text) : text || null;
  if (!response.ok) {
    const error = body && body.error ? body.error : { code: `http_${response.status}`, message: String(body) };
    throw Object.assign(new Error(`${error.code}: ${error.message}`), { code: error.code });
  }
  return body;
}

// A task's colour depends on its id only, never on which tasks are ticked.
function colour(taskId) {
  let hash = 0;
  for (const c of taskId) hash = (hash * 31 + c.codePointAt(0)) >>> 0;
  return `hsl(${hash % 360} 80% 42%)`;
}

// ---- views ----
const views = { detect: loadPicks, tasks: loadTable, server: loadServer };
for (const name of Object.keys(views)) {
  $(`tab-${name}`).addEventListener("click", () => show(name));
}
function show(name) {
  for (const other of Object.keys(views)) {
    $(`tab-${other}`).setAttribute("aria-selected", String(other === name));
    $(`view-${other}`).hidden = other !== name;
  }
  views[name]().catch((e) => say(e.message, true));
}

// ---- detect ----
const state = { file: null, shown: null, seq: 0, controller: null };

// At first every task is ticked, when there are this many or fewer: a request names at most 32 tasks
// (the server's default limit), and a server with hundreds of tasks would refuse them all at once.
const TICK_ALL = 8;

async function loadPicks() {
  const { tasks } = await api("/v1/tasks");
  const ticked = new Set([...document.querySelectorAll("#task-picks input:checked")].map((i) => i.value));
  const all = !$("task-picks").children.length && tasks.length <= TICK_ALL;
  $("task-picks").replaceChildren(...tasks.map((t) => {
    const box = el("input", { type: "checkbox", value: t.id, checked: all || ticked.has(t.id) });
    const swatch = el("span", { className: "swatch" });
    swatch.style.background = colour(t.id);
    return el("label", {}, box, swatch, ` ${t.id} (${t.method}, ${t.kind})`);
  }));
  filterPicks();
}

// Shows the tasks whose id, method or kind holds the filter's text; hidden ones stay ticked or not.
function filterPicks() {
  const text = $("task-filter").value.trim().toLowerCase();
  const labels = [...document.querySelectorAll("#task-picks label")];
  for (const label of labels) label.hidden = !label.textContent.toLowerCase().includes(text);
  const ticked = document.querySelectorAll("#task-picks input:checked").length;
  $("task-count").textContent = `${ticked} of ${labels.length} ticked`;
}

function clearBoxes() {
  document.querySelectorAll("#stage .box").forEach((b) => b.remove());
}

function clearImage() {
  clearBoxes();
  $("img").hidden = true;
  $("img").removeAttribute("src");
  state.shown = null;
}

async function showImage(file) {
  if (state.shown === file) return;
  const img = $("img");
  clearImage();
  img.src = URL.createObjectURL(file);
  await img.decode();  // throws for a file the browser cannot show
  img.hidden = false;
  state.shown = file;
}

function draw(body) {
  clearBoxes();
  const { width, height } = body.image;
  const found = body.results.flatMap((r) => r.detections.map((d) => ({ task: r.task, d })));
  found.sort((a, b) => a.d.score - b.d.score);  // the surest box is drawn last, on top
  for (const { task, d } of found) {
    const [x1, y1, x2, y2] = d.box;
    const box = el("div", { className: "box" }, el("span", { textContent: `${task}: ${d.label} ${d.score.toFixed(2)}` }));
    box.dataset.task = task;
    // Percentages of the image: the boxes follow the picture when the window resizes.
    Object.assign(box.style, {
      left: `${(100 * x1) / width}%`, top: `${(100 * y1) / height}%`,
      width: `${(100 * (x2 - x1)) / width}%`, height: `${(100 * (y2 - y1)) / height}%`,
      borderColor: colour(task),
    });
    box.firstChild.style.background = colour(task);
    $("stage").append(box);
  }
  const failed = body.results.filter((r) => r.error).map((r) => `${r.task} failed (${r.error.message})`);
  say(`${found.length} boxes from ${body.results.length} task(s), ${body.backbone_passes} backbone pass(es), ` +
      `${body.timing_ms.total.toFixed(0)} ms` + (failed.length ? `; ${failed.join("; ")}` : ""), failed.length > 0);
}

async function detect() {
  const file = state.file;
  if (!file) return;
  const seq = ++state.seq;  // only the latest request is drawn
  if (state.controller) state.controller.abort();
  const controller = (state.controller = new AbortController());
  if (!file.type.startsWith("image/")) {
    clearImage();
    say(`${file.name} is not an image (${file.type || "unknown type"}); pick a JPEG, PNG or WebP file.`, true);
    return;
  }
  const ids = [...document.querySelectorAll("#task-picks input:checked")].map((i) => i.value);
  $("stage").setAttribute("aria-busy", "true");
  say("Detecting…");
  try {
    await showImage(file);
    if (!ids.length) {
      clearBoxes();
      say("Tick at least one task.");
      return;
    }
    const form = new FormData();
    form.append("image", file);
    form.append("tasks", ids.join(","));
    const threshold = encodeURIComponent($("threshold").value);
    const body = await api(`/v1/detect?score_threshold=${threshold}`, { method: "POST", body: form, signal: controller.signal });
    if (seq === state.seq) draw(body);
  } catch (e) {
    if (e.name === "AbortError" || seq !== state.seq) return;
    if (e.name === "EncodingError") clearImage(); else clearBoxes();
    say(e.name === "EncodingError" ? `${file.name} cannot be read as an image.` : e.message, true);
  } finally {
    if (seq === state.seq) $("stage").setAttribute("aria-busy", "false");
  }
}

function pick(file) {
  state.file = file;
  detect();
}

$("file").addEventListener("change", () => $("file").files[0] && pick($("file").files[0]));
$("task-picks").addEventListener("change", () => { filterPicks(); detect(); });
$("task-filter").addEventListener("input", filterPicks);
$("threshold").addEventListener("change", detect);
for (const [zone, onFiles] of [[$("drop"), (files) => pick(files[0])], [$("upload"), (files) => upload(files)]]) {
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (e.dataTransfer.files.length) onFiles([...e.dataTransfer.files]);
  });
}

// ---- tasks ----
function size(bytes) {
  return bytes >= 1 << 20 ? `${(bytes / (1 << 20)).toFixed(1)} MiB` : `${(bytes / 1024).toFixed(0)} KiB`;
}

async function act(what, path, method) {
  const task = await api(path, { method });
  say(`${what}: ${task ? task.id : path}`);
  await loadTable();
}

async function loadTable() {
  const { tasks, quarantined } = await api("/v1/tasks");
  const rows = tasks.map((t) => {
    const metric = t.metrics.AP50 !== undefined ? `AP50 ${Number(t.metrics.AP50).toFixed(3)}` : "";
    const pin = el("button", { type: "button", textContent: t.pinned ? "Unpin" : "Pin" });
    pin.addEventListener("click", () => act(t.pinned ? "unpinned" : "pinned",
      `/v1/tasks/${t.id}/${t.pinned ? "unpin" : "pin"}`, "POST").catch((e) => say(e.message, true)));
    const remove = el("button", { type: "button", textContent: "Delete" });
    remove.addEventListener("click", () => {
      if (!confirm(`Delete task ${t.id} and every version of it?`)) return;
      api(`/v1/tasks/${t.id}`, { method: "DELETE" })
        .then(() => { say(`deleted ${t.id}`); return loadTable(); })
        .catch((e) => say(e.message, true));
    });
    const row = el("tr", {}, ...[t.id, t.method, t.kind, t.labels.join(", "), metric, `v${t.version}`, size(t.bytes),
      t.residency || "disk", t.pinned ? "yes" : "no"].map((v) => el("td", { textContent: v })), el("td", {}, pin, remove));
    row.dataset.task = t.id;
    return row;
  });
  const broken = quarantined.map((q) => el("tr", { className: "quarantined" },
    el("td", { textContent: q.id }), el("td", { colSpan: 9, textContent: `quarantined: ${q.reason}` })));
  $("task-table").tBodies[0].replaceChildren(...rows, ...broken);
  await loadPicks();
}

async function upload(files) {
  const id = $("upload-id").value.trim();
  const config = files.find((f) => f.name.endsWith(".json"));
  const weights = files.find((f) => f.name.endsWith(".safetensors"));
  if (!id || !config || !weights) {
    say("Give a task id and both files: tuner.json and tuner.safetensors.", true);
    return;
  }
  const form = new FormData();
  form.append("weights", weights, "tuner.safetensors");
  form.append("config", config, "tuner.json");
  say(`Uploading ${id}…`);
  const task = await api(`/v1/tasks/${encodeURIComponent(id)}`, { method: "PUT", body: form });
  say(`uploaded ${task.id} version ${task.version}`);
  await loadTable();
}

$("upload").addEventListener("submit", (e) => {
  e.preventDefault();
  upload([...$("upload-files").files]).catch((err) => say(err.message, true));
});

// ---- server ----
function sum(metrics, name, labels = "") {
  // Sums a metric over its samples (one per replica under Ray) whose labels include `labels`.
  let total = 0;
  for (const line of metrics.split("\n")) {
    if (line.startsWith(`${name}{`) || line.startsWith(`${name} `)) {
      if (!labels || line.includes(labels)) total += Number(line.trim().split(/\s+/).pop());
    }
  }
  return total;
}

async function loadServer() {
  const [backbone, metrics] = await Promise.all([api("/v1/backbone"), api("/metrics")]);
  const passes = sum(metrics, "sidecar_backbone_image_passes_total");
  const images = sum(metrics, "sidecar_images_served_total");
  const results = sum(metrics, "sidecar_task_results_total");
  const cache = (tier) => `${size(sum(metrics, "sidecar_tuner_cache_resident_bytes", `tier="${tier}"`))} of ` +
    size(sum(metrics, "sidecar_tuner_cache_budget_bytes", `tier="${tier}"`));
  const facts = [
    ["Backbone", `${backbone.name} (${backbone.weights_source})`],
    ["Runtime", `${backbone.runtime}, ${backbone.provider}, on ${backbone.device}`],
    ["Device cache", cache("device")], ["Host cache", cache("host")],
    ["Sharing", `${passes} backbone passes for ${images} images served and ${results} task results` +
      (passes ? ` (${(results / passes).toFixed(2)} task results per pass)` : "")],
    ["Queue depth", String(sum(metrics, "sidecar_queue_depth"))],
  ];
  $("server-facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", { textContent: k }), el("dd", { textContent: v })]));
}
$("refresh-server").addEventListener("click", () => loadServer().catch((e) => say(e.message, true)));

// ---- key ----
$("api-key").value = sessionStorage.getItem(KEY) || "";
$("api-key").addEventListener("change", () => {
  const key = $("api-key").value.trim();
  if (key) sessionStorage.setItem(KEY, key); else sessionStorage.removeItem(KEY);
});

show("detect");
