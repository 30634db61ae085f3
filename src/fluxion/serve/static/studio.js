// fluxion studio: talks to this server's BFL-style API (POST /v1/{model}, GET /v1/jobs/{id}/events, GET /v1/jobs,
// DELETE /v1/jobs/{id}). No framework, no build step. State: the reference list and the mask canvas.
"use strict";

const $ = (id) => document.getElementById(id);
const MAX_SEED = 4294967295;
const state = { config: null, refs: [], maskDirty: false, running: new Map() };

function headers(json = true) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = $("apikey").value.trim();
  if (key) h["x-key"] = key;
  return h;
}

async function api(path, options = {}) {
  const r = await fetch(path, { ...options, headers: { ...headers(!!options.body), ...(options.headers || {}) } });
  const text = await r.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch { body = { detail: text }; }
  if (!r.ok) throw new Error((body && (body.detail || (body.error && body.error.message))) || `HTTP ${r.status}`);
  return body;
}

function setStatus(text) { $("status").textContent = text; }
function el(tag, attrs = {}, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined) e.setAttribute(k, v);
  }
  for (const k of kids) e.append(k);
  return e;
}

// ---- configuration --------------------------------------------------------------------------------------------
async function loadConfig() {
  $("apikey").value = localStorage.getItem("fluxion-key") || "";
  const cfg = await api("/v1/studio");
  state.config = cfg;
  $("keybox").hidden = !cfg.auth;
  const sel = $("model");
  sel.replaceChildren(...cfg.models.map((m) => el("option", { value: m.id }, m.id)));
  applyModel();
  if (cfg.loras.length) {
    $("lorabox").hidden = false;
    $("loras").replaceChildren(...cfg.loras.map((name, i) => el("div", { class: "row" },
      el("div", { class: "check" },
        el("input", { type: "checkbox", id: `lora${i}`, "data-name": name }),
        el("label", { for: `lora${i}` }, name)),
      el("div", {},
        el("label", { for: `lorascale${i}` }, `Scale of ${name}`),
        el("input", { type: "number", id: `lorascale${i}`, min: "-4", max: "4", step: "0.05", value: "1" })))));
  }
  $("upbox").hidden = !cfg.upsampling;
}

function currentModel() {
  return state.config.models.find((m) => m.id === $("model").value) || state.config.models[0];
}

function applyModel() {
  const m = currentModel();
  $("steps").value = m.default_steps;
  $("guidance").value = m.default_guidance;
  $("guidance").disabled = m.guidance_mode === "distilled";
  $("maxrefs").textContent = m.max_references;
  const [w, h] = m.default_size;
  const preset = `${w}x${h}`;
  if ([...$("preset").options].some((o) => o.value === preset)) $("preset").value = preset;
  else { $("preset").value = "custom"; $("width").value = w; $("height").value = h; }
  $("customsize").hidden = $("preset").value !== "custom";
}

// ---- references: drop, choose, reorder (drag or buttons), remove -----------------------------------------------
function readFile(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result);
    r.onerror = () => reject(new Error(`cannot read ${file.name}`));
    r.readAsDataURL(file);
  });
}

async function addFiles(files) {
  const max = currentModel().max_references;
  for (const f of files) {
    if (!f.type.startsWith("image/")) { $("formerror").textContent = `${f.name} is not an image`; continue; }
    if (state.refs.length >= max) { $("formerror").textContent = `at most ${max} references`; break; }
    state.refs.push({ name: f.name, url: await readFile(f) });
  }
  renderRefs();
}

function moveRef(from, to) {
  if (to < 0 || to >= state.refs.length) return;
  const [r] = state.refs.splice(from, 1);
  state.refs.splice(to, 0, r);
  renderRefs();
  const item = $("refs").children[to];
  if (item) item.querySelector(from < to ? ".down" : ".up")?.focus();
}

function renderRefs() {
  const list = $("refs");
  list.replaceChildren(...state.refs.map((r, i) => {
    const li = el("li", { draggable: "true", "data-index": i },
      el("img", { src: r.url, alt: `Reference ${i + 1}: ${r.name}` }),
      el("span", {}, `${i + 1}. `),
      el("button", { type: "button", class: "up", "aria-label": `Move reference ${i + 1} earlier`, onclick: () => moveRef(i, i - 1) }, "←"),
      el("button", { type: "button", class: "down", "aria-label": `Move reference ${i + 1} later`, onclick: () => moveRef(i, i + 1) }, "→"),
      el("button", { type: "button", class: "danger", "aria-label": `Remove reference ${i + 1}`, onclick: () => { state.refs.splice(i, 1); renderRefs(); } }, "×"));
    li.addEventListener("dragstart", (e) => { e.dataTransfer.setData("text/x-ref", String(i)); li.classList.add("dragging"); });
    li.addEventListener("dragend", () => li.classList.remove("dragging"));
    li.addEventListener("dragover", (e) => { if (e.dataTransfer.types.includes("text/x-ref")) e.preventDefault(); });
    li.addEventListener("drop", (e) => {
      const from = e.dataTransfer.getData("text/x-ref");
      if (from !== "") { e.preventDefault(); e.stopPropagation(); moveRef(Number(from), i); }
    });
    return li;
  }));
  if ($("inpaint").checked) setupMask();
}

function setupDrop() {
  const drop = $("drop");
  ["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => {
    if (e.dataTransfer.types.includes("Files")) { e.preventDefault(); drop.classList.add("over"); }
  }));
  ["dragleave", "drop"].forEach((t) => drop.addEventListener(t, () => drop.classList.remove("over")));
  drop.addEventListener("drop", (e) => {
    if (!e.dataTransfer.files.length) return;
    e.preventDefault();
    addFiles([...e.dataTransfer.files]);
  });
  $("files").addEventListener("change", (e) => { addFiles([...e.target.files]); e.target.value = ""; });
}

// ---- mask: white strokes on black, the size of reference 1 --------------------------------------------------------
function setupMask() {
  const box = $("maskbox"), canvas = $("maskcanvas");
  box.hidden = !$("inpaint").checked || !state.refs.length;
  if (box.hidden) return;
  const img = new Image();
  img.onload = () => {
    if (canvas.width !== img.naturalWidth || canvas.height !== img.naturalHeight || canvas.dataset.src !== state.refs[0].url) {
      canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
      canvas.dataset.src = state.refs[0].url;
      clearMask();
    }
    canvas.style.backgroundImage = `url(${state.refs[0].url})`;
  };
  img.src = state.refs[0].url;
}

function clearMask() {
  const canvas = $("maskcanvas"), ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  state.maskDirty = false;
}

function paintAt(e) {
  const canvas = $("maskcanvas"), rect = canvas.getBoundingClientRect();
  const x = (e.clientX - rect.left) * canvas.width / rect.width;
  const y = (e.clientY - rect.top) * canvas.height / rect.height;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "rgba(255,255,255,0.85)";
  ctx.beginPath();
  ctx.arc(x, y, Number($("brush").value) * canvas.width / Math.max(rect.width, 1) / 2, 0, 2 * Math.PI);
  ctx.fill();
  state.maskDirty = true;
}

function setupMaskPainting() {
  const canvas = $("maskcanvas");
  let down = false;
  canvas.addEventListener("pointerdown", (e) => { down = true; canvas.setPointerCapture(e.pointerId); paintAt(e); });
  canvas.addEventListener("pointermove", (e) => { if (down) paintAt(e); });
  canvas.addEventListener("pointerup", () => { down = false; });
  $("clearmask").addEventListener("click", clearMask);
  $("inpaint").addEventListener("change", setupMask);
}

function maskDataURL() {
  // Painted strokes -> a black/white PNG (white = repaint), the size of reference 1.
  const src = $("maskcanvas"), out = document.createElement("canvas");
  out.width = src.width; out.height = src.height;
  const ctx = out.getContext("2d");
  ctx.fillStyle = "#000"; ctx.fillRect(0, 0, out.width, out.height);
  const data = src.getContext("2d").getImageData(0, 0, src.width, src.height);
  const o = ctx.getImageData(0, 0, out.width, out.height);
  for (let i = 0; i < data.data.length; i += 4) {
    const v = data.data[i + 3] > 0 ? 255 : 0;
    o.data[i] = o.data[i + 1] = o.data[i + 2] = v;
  }
  ctx.putImageData(o, 0, 0);
  return out.toDataURL("image/png");
}

// ---- submit ---------------------------------------------------------------------------------------------------------
function requestBody(seed) {
  const m = currentModel();
  const body = { prompt: $("prompt").value, seed, output_format: "png", steps: Number($("steps").value) };
  if (m.guidance_mode !== "distilled") body.guidance = Number($("guidance").value);
  const preset = $("preset").value;
  if (preset === "custom") { body.width = Number($("width").value); body.height = Number($("height").value); }
  else if (preset !== "match") { const [w, h] = preset.split("x").map(Number); body.width = w; body.height = h; }
  else if (!state.refs.length) { const [w, h] = m.default_size; body.width = w; body.height = h; }
  state.refs.forEach((r, i) => { body[i === 0 ? "input_image" : `input_image_${i + 1}`] = r.url; });
  if ($("inpaint").checked && state.refs.length) {
    if (!state.maskDirty) throw new Error("paint the area to repaint on the mask first (or untick Inpaint)");
    body.mask_image = maskDataURL();
    delete body.width; delete body.height;
  }
  const loras = [...document.querySelectorAll("#loras input[type=checkbox]")].filter((c) => c.checked)
    .map((c) => ({ name: c.dataset.name, scale: Number($(c.id.replace("lora", "lorascale")).value) }));
  if (loras.length) body.loras = loras;
  if ($("upsample").checked) body.prompt_upsampling = true;
  return body;
}

async function submit(e) {
  e.preventDefault();
  $("formerror").textContent = "";
  if (!$("prompt").value.trim()) { $("formerror").textContent = "Write a prompt first."; $("prompt").focus(); return; }
  localStorage.setItem("fluxion-key", $("apikey").value.trim());
  if (!$("seedlock").checked) $("seed").value = Math.floor(Math.random() * MAX_SEED);
  const seed0 = Number($("seed").value), n = Math.max(1, Number($("count").value));
  $("go").disabled = true;
  try {
    for (let i = 0; i < n; i++) {
      const body = requestBody((seed0 + i) % (MAX_SEED + 1));
      const job = await api(`/v1/${encodeURIComponent($("model").value)}`, { method: "POST", body: JSON.stringify(body) });
      track(job.id, body);
    }
  } catch (err) {
    $("formerror").textContent = err.message;
  } finally {
    $("go").disabled = false;
  }
}

// ---- running jobs: events stream (fetch, so the key header goes along), preview, progress, ETA, cancel ------------
function track(id, body) {
  const img = el("img", { class: "preview", alt: "Live preview (updates every step)", "data-job": id });
  const bar = el("progress", { max: "1", value: "0", "aria-label": "Progress" });
  const info = el("p", { class: "meta", "aria-live": "off" }, "queued…");
  const cancel = el("button", { type: "button", class: "danger", onclick: () => cancelJob(id, cancel) }, "Cancel");
  const card = el("li", { class: "card", "data-job": id }, img, bar, info,
    el("p", { class: "meta" }, `${body.prompt.slice(0, 80)} · seed ${body.seed}`), el("div", { class: "buttons" }, cancel));
  $("running").prepend(card);
  state.running.set(id, card);
  setStatus(`${state.running.size} running`);
  follow(id, { img, bar, info, card }).catch((err) => { info.textContent = `lost the event stream: ${err.message}`; });
}

async function follow(id, ui) {
  const r = await fetch(`/v1/jobs/${id}/events`, { headers: headers(false) });
  if (!r.ok || !r.body) throw new Error(`HTTP ${r.status}`);
  const reader = r.body.getReader(), dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const chunk = buf.slice(0, cut); buf = buf.slice(cut + 2);
      const event = /^event: (.*)$/m.exec(chunk)?.[1];
      const data = /^data: (.*)$/m.exec(chunk)?.[1];
      if (!data) continue;
      const body = JSON.parse(data);
      if (event === "progress") onProgress(ui, body);
      else if (event === "result") { onResult(id, ui, body); return; }
    }
  }
}

function onProgress(ui, body) {
  const p = body.progress || 0;
  ui.bar.value = p;
  if (body.preview && body.preview.image) { ui.img.src = body.preview.image; ui.img.dataset.previews = String(Number(ui.img.dataset.previews || 0) + 1); }
  const eta = body.eta_s == null ? "" : ` · about ${body.eta_s < 1 ? "<1" : Math.round(body.eta_s)} s left`;
  ui.info.textContent = p > 0 ? `${Math.round(p * 100)} %${eta}` : "queued…";
}

function onResult(id, ui, body) {
  state.running.delete(id);
  ui.card.remove();
  const cancelled = body.details && body.details.error === "cancelled by the client";
  setStatus(state.running.size ? `${state.running.size} running` : `Last job: ${cancelled ? "cancelled" : body.status}.`);
  loadHistory();
}

async function cancelJob(id, button) {
  button.disabled = true;
  try { await api(`/v1/jobs/${id}`, { method: "DELETE" }); setStatus("Cancel requested."); }
  catch (err) { setStatus(`Cancel failed: ${err.message}`); button.disabled = false; }
}

// ---- history ----------------------------------------------------------------------------------------------------------
async function loadHistory() {
  let data;
  try { data = await api("/v1/jobs?limit=30"); } catch (err) { setStatus(`History: ${err.message}`); return; }
  $("history").replaceChildren(...data.jobs.filter((j) => !state.running.has(j.id)).map(historyCard));
}

function historyCard(job) {
  const p = job.params, ready = job.status === "Ready";
  const sample = ready ? job.result.sample : null;
  const kids = [];
  if (sample) kids.push(el("img", { src: sample, alt: `Result: ${p.prompt.slice(0, 100)}`, loading: "lazy" }));
  const what = p.prompt_original ? `${p.prompt} (rewritten from: ${p.prompt_original})` : p.prompt;
  const reason = job.details && (job.details.error || (job.details["Moderation Reasons"] || []).join("; "));
  kids.push(el("p", { class: "meta" }, `${job.status}${reason ? ` (${reason})` : ""} · ${job.model} · ${p.width}×${p.height} · ${p.steps} steps · seed ${p.seed}${p.inputs ? ` · ${p.inputs} input(s)` : ""}${p.mask ? " · inpaint" : ""}`));
  kids.push(el("p", { class: "meta" }, what));
  const buttons = el("div", { class: "buttons" },
    el("button", { type: "button", onclick: () => rerun(job) }, "Re-run"));
  if (sample) {
    buttons.append(
      el("button", { type: "button", onclick: () => useAsReference(sample, job) }, "Use as reference"),
      el("a", { class: "button", href: sample, download: `fluxion-${p.seed}.png` }, "Download"));
  }
  kids.push(buttons);
  return el("li", { class: "card", "data-job": job.id, "data-status": job.status }, ...kids);
}

function rerun(job) {
  const p = job.params;
  $("prompt").value = p.prompt_original || p.prompt;
  if ([...$("model").options].some((o) => o.value === job.model)) $("model").value = job.model;
  $("steps").value = p.steps;
  $("guidance").value = p.guidance;
  $("seed").value = p.seed;
  $("seedlock").checked = true;
  const preset = `${p.width}x${p.height}`;
  if ([...$("preset").options].some((o) => o.value === preset)) $("preset").value = preset;
  else { $("preset").value = "custom"; $("width").value = p.width; $("height").value = p.height; }
  $("customsize").hidden = $("preset").value !== "custom";
  $("prompt").focus();
  setStatus("Parameters loaded into the form (seed locked). Press Generate.");
}

async function useAsReference(url, job) {
  const r = await fetch(url);
  const blob = await r.blob();
  await addFiles([new File([blob], `job-${job.id.slice(0, 8)}.png`, { type: blob.type || "image/png" })]);
  setStatus("Added to the references.");
}

// ---- start ---------------------------------------------------------------------------------------------------------------
document.addEventListener("DOMContentLoaded", async () => {
  $("form").addEventListener("submit", submit);
  $("model").addEventListener("change", applyModel);
  $("preset").addEventListener("change", () => { $("customsize").hidden = $("preset").value !== "custom"; });
  $("refresh").addEventListener("click", loadHistory);
  $("apikey").addEventListener("change", () => { localStorage.setItem("fluxion-key", $("apikey").value.trim()); loadHistory(); });
  setupDrop();
  setupMaskPainting();
  try { await loadConfig(); await loadHistory(); document.body.dataset.ready = "1"; }
  catch (err) { $("formerror").textContent = `Cannot reach the server: ${err.message}`; }
});
