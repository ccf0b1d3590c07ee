"use strict";
// Chat with the swarm through the OpenAI-compatible API. The whole conversation is sent with every turn
// and the answer streams back as server-sent events. Model output is only ever set with textContent.

const $ = (id) => document.getElementById(id);
const ui = {
  messages: $("messages"), form: $("composer"), prompt: $("prompt"), send: $("send"), stop: $("stop"),
  clear: $("clear"), temperature: $("temperature"), maxTokens: $("max-tokens"), model: $("model"),
};

let modelId = null;
let history = []; // [{role, content}]: the conversation sent with each request
let controller = null; // AbortController of the request in flight; aborting it cancels generation

async function readJson(response) {
  try {
    return await response.json();
  } catch {
    return {};
  }
}

/** The message of an OpenAI-style error object, else the HTTP status. */
function errorText(body, response) {
  const error = body && body.error;
  if (error) {
    const code = error.code ?? error.type;
    return code ? `${error.message} (${code})` : String(error.message);
  }
  return response ? `HTTP ${response.status} ${response.statusText}`.trim() : "unknown error";
}

async function loadModel() {
  try {
    const response = await apiKey.fetch("/v1/models");
    const body = await readJson(response);
    if (!response.ok || body.error) throw new Error(errorText(body, response));
    if (!body.data || !body.data.length) throw new Error("the API serves no model");
    modelId = body.data[0].id;
    ui.model.textContent = modelId;
    ui.model.classList.remove("bad");
    return modelId;
  } catch (err) {
    ui.model.textContent = "no model";
    ui.model.classList.add("bad");
    ui.model.title = err.message;
    throw err;
  }
}

/** Appends a turn (a message bubble, later a footer) and returns its elements. */
function addTurn(kind, text = "") {
  ui.messages.querySelector(".empty")?.remove();
  const turn = document.createElement("div");
  turn.className = `turn ${kind}`;
  const message = document.createElement("div");
  message.className = `message ${kind}`;
  message.textContent = text;
  turn.append(message);
  ui.messages.append(turn);
  scrollToEnd(true);
  return { turn, message };
}

function addMeta(turn, text) {
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.textContent = text;
  turn.append(meta);
}

/** Follows the stream unless the reader scrolled up to read something. */
function scrollToEnd(force = false) {
  const box = ui.messages;
  if (force || box.scrollHeight - box.scrollTop - box.clientHeight < 80) box.scrollTop = box.scrollHeight;
}

/** Yields the JSON payload of each `data:` line until `data: [DONE]` or the end of the body. */
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
    const lines = buffer.split(/\r?\n/);
    buffer = done ? "" : lines.pop(); // keep a line cut between two network reads
    for (const line of lines) {
      if (!line.startsWith("data:")) continue; // blank separators, comments, other fields
      const data = line.slice(5).trim();
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
    if (done) return;
  }
}

function numberFrom(input, fallback, parse) {
  const value = parse(input.value);
  return Number.isFinite(value) ? value : fallback;
}

function setBusy(busy) {
  ui.send.disabled = busy;
  ui.stop.disabled = !busy;
}

/** Streams one answer into `bubble`; returns an error message, or null when it ended normally. */
async function streamAnswer(messages, bubble, stats) {
  if (!modelId) await loadModel();
  const response = await apiKey.fetch("/v1/chat/completions", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({
      model: modelId,
      messages,
      stream: true,
      temperature: numberFrom(ui.temperature, 0, parseFloat),
      max_tokens: numberFrom(ui.maxTokens, 128, (v) => parseInt(v, 10)),
    }),
    signal: controller.signal,
  });
  if (!response.ok) return errorText(await readJson(response), response);
  for await (const event of sseEvents(response)) {
    if (event.error) return errorText(event);
    const choice = event.choices && event.choices[0];
    const delta = choice && choice.delta && choice.delta.content;
    if (delta) {
      stats.first ??= performance.now();
      stats.chunks += 1;
      bubble.textContent += delta;
      scrollToEnd();
    }
    if (choice && choice.finish_reason) stats.finish = choice.finish_reason;
    if (event.usage) stats.usage = event.usage;
  }
  return null;
}

function summary(stats, stopped) {
  const seconds = (performance.now() - stats.start) / 1000;
  const tokens = (stats.usage && stats.usage.completion_tokens) ?? stats.chunks;
  const parts = [`${tokens} tokens`, `${(tokens / seconds).toFixed(1)} tok/s`];
  if (stats.first !== null) parts.push(`first token ${((stats.first - stats.start) / 1000).toFixed(2)} s`);
  if (stopped) parts.push("stopped");
  else if (stats.finish === "length") parts.push("cut at max tokens");
  return parts.join(" · ");
}

async function send() {
  const text = ui.prompt.value.trim();
  if (!text || controller) return;
  ui.prompt.value = "";
  const conversation = history; // "New chat" mid-stream starts a fresh array; this turn stays with the old one
  conversation.push({ role: "user", content: text });
  const user = addTurn("user", text).message;
  const { turn, message: bubble } = addTurn("assistant");
  bubble.dataset.streaming = "true";
  controller = new AbortController();
  setBusy(true);
  const stats = { start: performance.now(), first: null, chunks: 0, finish: null, usage: null };
  let failure = null;
  let stopped = false;
  try {
    failure = await streamAnswer(conversation, bubble, stats);
  } catch (err) {
    stopped = err.name === "AbortError";
    if (!stopped) failure = err.message;
  }
  controller = null;
  setBusy(false);
  const answer = bubble.textContent;
  bubble.dataset.streaming = "false";
  if (answer) {
    conversation.push({ role: "assistant", content: answer });
    addMeta(turn, summary(stats, stopped));
  } else {
    // No answer: drop the question from the conversation so the next request does not repeat it.
    turn.remove();
    conversation.pop();
    user.classList.add("unsent");
    user.title = "not sent with later messages: no answer came back";
  }
  if (failure) addTurn("error", `Error: ${failure}`);
  ui.prompt.focus();
}

function newChat() {
  controller?.abort();
  history = [];
  const hint = document.createElement("p");
  hint.className = "empty";
  hint.textContent = "New conversation.";
  ui.messages.replaceChildren(hint);
  ui.prompt.focus();
}

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  send();
});
ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  } else if (event.key === "Escape") {
    controller?.abort();
  }
});
ui.stop.addEventListener("click", () => controller?.abort());
ui.clear.addEventListener("click", newChat);

loadModel().catch((err) => addTurn("error", `Error: cannot list models: ${err.message}`));
window.addEventListener("apikey", () => loadModel().catch((err) => addTurn("error", `Error: cannot list models: ${err.message}`)));
