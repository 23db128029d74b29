// dyvte chat page: plain JS, no build step. Streams answers from POST /v1/chat/completions (server-sent events) and
// shows the dyvte block of the response: exit layer, each head's exit probability, prefill FLOPs and KV saved.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { imageUrl: null, question: "", modelId: null, last: null };

function setStatus(text) { $("status").textContent = text; }

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

// ---------------------------------------------------------------------------------------------------- the image

function readImage(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) { showError(`${file.name} is not an image (${file.type || "unknown type"})`); return; }
  const reader = new FileReader();
  reader.onload = () => {
    state.imageUrl = reader.result;  // a data: URL, sent as the image_url part
    const preview = $("preview");
    preview.src = state.imageUrl;
    preview.hidden = false;
    $("drop-hint").textContent = file.name;
    showError("");
  };
  reader.onerror = () => showError(`could not read ${file.name}`);
  reader.readAsDataURL(file);
}

function setupImageInput() {
  $("image-input").addEventListener("change", (event) => readImage(event.target.files[0]));
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    readImage(event.dataTransfer.files[0]);
  });
}

// --------------------------------------------------------------------------------------------------- requesting

// static:K when a K is typed, heads:P when a P is, else the select's method ("" = the server's default)
function chosenMethod() {
  const layer = $("static-layer").value.trim();
  if (layer !== "") return `static:${layer}`;
  const threshold = $("threshold").value.trim();
  if (threshold !== "") return `heads:${threshold}`;
  return $("method").value;
}

function requestBody(method) {
  const content = [];
  if (state.imageUrl) content.push({ type: "image_url", image_url: { url: state.imageUrl } });
  content.push({ type: "text", text: state.question });
  const body = { messages: [{ role: "user", content }], stream: true, temperature: 0 };
  if (state.modelId) body.model = state.modelId;
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (Number.isFinite(maxTokens)) body.max_tokens = maxTokens;
  if (method) body.dyvte = { method };
  return body;
}

async function errorMessage(response) {
  try {
    const payload = await response.json();
    if (payload && payload.error && payload.error.message) return `${response.status}: ${payload.error.message}`;
  } catch (_) { /* not JSON */ }
  return `${response.status} ${response.statusText}`;
}

// Posts one streamed request; calls onDelta(text) per content delta and onBlock(dyvte) per chunk that carries the
// dyvte block. Resolves with {text, dyvte, ttft, seconds, finish} once "data: [DONE]" arrives.
async function streamChat(body, onDelta, onBlock) {
  const started = performance.now();
  const response = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
    body: JSON.stringify(body),
  });
  if (!response.ok) throw new Error(await errorMessage(response));
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  const result = { text: "", dyvte: null, ttft: null, seconds: null, finish: null, done: false };
  let buffer = "";
  const handleEvent = (event) => {
    for (const line of event.split("\n")) {
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") { result.done = true; continue; }
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
      if (chunk.dyvte) { result.dyvte = chunk.dyvte; onBlock(chunk.dyvte); }
      for (const choice of chunk.choices || []) {
        const text = choice.delta && choice.delta.content;
        if (text) {
          if (result.ttft === null) result.ttft = (performance.now() - started) / 1000;
          result.text += text;
          onDelta(result.text);
        }
        if (choice.finish_reason) result.finish = choice.finish_reason;
      }
    }
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      handleEvent(buffer.slice(0, cut));
      buffer = buffer.slice(cut + 2);
    }
  }
  if (buffer.trim()) handleEvent(buffer);
  if (!result.done) throw new Error("the stream ended before data: [DONE]");
  result.seconds = (performance.now() - started) / 1000;
  return result;
}

// ---------------------------------------------------------------------------------------------------- rendering

function percent(fraction) { return `${(100 * fraction).toFixed(1)}%`; }

function bytes(n) {
  if (n >= 1 << 20) return `${(n / (1 << 20)).toFixed(1)} MiB`;
  if (n >= 1 << 10) return `${(n / (1 << 10)).toFixed(1)} KiB`;
  return `${n} B`;
}

function renderChart(block) {
  const chart = $("exit-chart");
  chart.replaceChildren();
  const probs = block.exit_probabilities;
  if (!probs || probs.length === 0) {
    const note = document.createElement("p");
    note.className = "muted";
    note.textContent = `no exit heads in this request (method ${block.method})`;
    chart.append(note);
    return;
  }
  probs.forEach((p, head) => {
    const layer = head + 1;  // head j decides on exiting at layer j + 1 (after layers 0..j)
    const bar = document.createElement("div");
    bar.className = "bar" + (layer === block.exit_layer ? " exit" : "");
    bar.dataset.layer = String(layer);
    bar.dataset.probability = p === null ? "" : String(p);
    bar.title = p === null ? `head ${head} (exit at layer ${layer}): not run` :
      `head ${head} (exit at layer ${layer}): P(exit) = ${p.toFixed(3)}`;
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = p === null ? "–" : p.toFixed(2);
    const fill = document.createElement("div");
    fill.className = "fill";
    fill.style.height = p === null ? "0" : `${Math.max(0, Math.min(1, p)) * 80}%`;
    const label = document.createElement("span");
    label.textContent = String(layer);
    bar.append(value, fill, label);
    chart.append(bar);
  });
}

function renderBlock(block) {
  $("exit-layer").textContent = String(block.exit_layer);
  $("num-layers").textContent = String(block.num_layers);
  $("visual-tokens").textContent = String(block.visual_tokens);
  $("visual-withdrawn").textContent = String(block.visual_tokens_withdrawn);
  $("flops-saved").textContent = percent(1 - block.relative_prefill_flops);
  const saved = block.kv_bytes_full - block.kv_bytes;
  $("kv-saved").textContent = block.kv_bytes_full > 0 ?
    `${percent(saved / block.kv_bytes_full)} (${bytes(saved)} of ${bytes(block.kv_bytes_full)})` : "–";
  renderChart(block);
}

function timing(result) {
  const first = result.ttft === null ? "–" : `${(1000 * result.ttft).toFixed(0)} ms`;
  return `first token ${first}, total ${(1000 * result.seconds).toFixed(0)} ms, finish: ${result.finish || "–"}`;
}

// ------------------------------------------------------------------------------------------------------ actions

function busy(on) {
  $("ask").disabled = on;
  $("ask-full").disabled = on || !state.last;
}

// Streams the answer of a request with `method` into the element `target` (its data-done: "false" while streaming,
// then "true" or "error"), with the buttons busy and `status` on the status line meanwhile. onBlock(dyvte) gets each
// dyvte block as it arrives; onDone(result) shows the rest of streamChat's result once the stream has ended.
async function streamAnswer(target, method, status, onBlock, onDone) {
  target.textContent = "";
  target.dataset.done = "false";
  busy(true);
  setStatus(status);
  try {
    const result = await streamChat(requestBody(method), (text) => { target.textContent = text; }, onBlock);
    target.textContent = result.text;
    onDone(result);
    target.dataset.done = "true";
    setStatus("done");
  } catch (error) {
    target.dataset.done = "error";
    showError(String(error.message || error));
    setStatus("failed");
  } finally {
    busy(false);
  }
}

async function ask() {
  showError("");
  const question = $("question").value.trim();
  if (!question) { showError("type a question first"); return; }
  if (!state.imageUrl) { showError("pick or drop an image first"); return; }
  state.question = question;
  state.last = null;
  $("answer-method").textContent = "";
  $("answer-timing").textContent = "";
  $("full-box").hidden = true;
  await streamAnswer($("answer"), chosenMethod(), "asking…", renderBlock, (result) => {
    $("answer-method").textContent = result.dyvte ? `(${result.dyvte.method})` : "";
    $("answer-timing").textContent = timing(result);
    state.last = result;
  });
}

async function askFull() {
  if (!state.last) return;
  showError("");
  $("full-box").hidden = false;
  $("full-timing").textContent = "";
  $("answers-agree").textContent = "–";
  await streamAnswer($("full-answer"), "full", "asking the full model…", () => {}, (result) => {
    $("full-method").textContent = result.dyvte ? `(${result.dyvte.method})` : "";
    $("full-exit-layer").textContent = result.dyvte ? String(result.dyvte.exit_layer) : "–";
    $("full-timing").textContent = timing(result);
    $("answers-agree").textContent = result.text === state.last.text ? "agree" : "differ";
  });
}

async function loadServerInfo() {
  try {
    const models = await (await fetch("/v1/models")).json();
    if (models.data && models.data.length) {
      state.modelId = models.data[0].id;
      $("model-name").textContent = `model: ${state.modelId}`;
    }
  } catch (_) {
    $("model-name").textContent = "model: unknown";
  }
  try {
    const health = await fetch("/health");
    $("health").textContent = health.ok ? "ready" : `not ready (${health.status})`;
  } catch (_) {
    $("health").textContent = "unreachable";
  }
}

setupImageInput();
$("ask").addEventListener("click", ask);
$("ask-full").addEventListener("click", askFull);
$("question").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); ask(); }
});
loadServerInfo();
