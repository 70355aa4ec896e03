// The chat page of `loraforge serve`: plain JS against the server's OpenAI-compatible API, no build step.
// GET v1/models fills the picker; POST v1/chat/completions with stream: true is read as server-sent
// events (`data: {chunk}` ... `data: [DONE]`) and each arriving delta is appended to #answer.
"use strict";

const $ = (id) => document.getElementById(id);
const form = $("ask"), picker = $("model"), question = $("question"), send = $("send"), stop = $("stop");
const answer = $("answer"), errorBox = $("error"), statusBox = $("status"), apiKey = $("api-key");
const KEY_STORE = "loraforge.apiKey";
let controller = null; // the AbortController of the answer being streamed, if any

function headers() {
  const h = { "Content-Type": "application/json" };
  if (apiKey.value) h.Authorization = `Bearer ${apiKey.value}`;
  return h;
}

function showError(message) {
  errorBox.textContent = message;
  errorBox.hidden = !message;
}

// The server's errors are OpenAI-shaped, {"error": {"message": ...}}; anything else is shown as text.
async function errorOf(resp) {
  const text = await resp.text();
  let message = text;
  try {
    message = JSON.parse(text).error.message || text;
  } catch (e) { /* not JSON: keep the text */ }
  return `${resp.status} ${resp.statusText}: ${message || "(no message)"}`;
}

async function loadModels() {
  const previous = picker.value;
  picker.disabled = send.disabled = true;
  try {
    const resp = await fetch("v1/models", { headers: headers() });
    if (resp.status === 401) $("settings").open = true; // show the API key field
    if (!resp.ok) throw new Error(await errorOf(resp) + (resp.status === 401 ? " (set the API key in Settings)" : ""));
    const models = (await resp.json()).data;
    // an adapter names its base as `parent`; the base model itself has none. Characters first.
    models.sort((a, b) => Boolean(a.parent) === Boolean(b.parent) ? 0 : a.parent ? -1 : 1);
    picker.replaceChildren(...models.map((m) => new Option(m.parent ? m.id : `${m.id} (base model, no adapter)`, m.id)));
    if (models.some((m) => m.id === previous)) picker.value = previous;
    picker.disabled = send.disabled = models.length === 0 || controller !== null;
    showError(models.length ? "" : "the server lists no models");
  } catch (e) {
    picker.replaceChildren(new Option("(no models)", ""));
    showError(`could not list the models: ${e.message}`);
  }
}

// Reads an SSE body and calls onEvent(data) for each event's data (its `data:` lines joined by "\n").
async function readEvents(body, onEvent) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "", data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) { // a last event without its blank line
      buffer = buffer.replace(/\r$/, "");
      if (buffer.startsWith("data:")) data.push(buffer.slice(buffer.startsWith("data: ") ? 6 : 5));
      if (data.length) onEvent(data.join("\n"));
      return;
    }
    buffer += value;
    // a CR at the end may be the first half of a CRLF: it waits with the incomplete last line
    const lines = buffer.split(/\r\n|\r(?!$)|\n/);
    buffer = lines.pop(); // an incomplete line waits for the next read
    for (const line of lines) {
      if (line === "") { // a blank line ends an event
        if (data.length && onEvent(data.join("\n")) === false) { reader.cancel(); return; }
        data = [];
      } else if (line.startsWith("data:")) {
        data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
      } // other fields (event:, id:, retry:) and comments (":") are not used by the API
    }
  }
}

async function ask(event) {
  event.preventDefault();
  const text = question.value.trim();
  if (controller || !text || !picker.value) return;
  controller = new AbortController();
  answer.textContent = "";
  answer.setAttribute("aria-busy", "true");
  showError("");
  statusBox.textContent = "answering…";
  send.disabled = picker.disabled = true;
  stop.disabled = false;
  let finish = null, done = false;
  try {
    const resp = await fetch("v1/chat/completions", {
      method: "POST",
      headers: headers(),
      signal: controller.signal,
      body: JSON.stringify({
        model: picker.value,
        messages: [{ role: "user", content: text }], // one turn: the demo's characters were trained on single turns
        stream: true,
        max_tokens: Number($("max-tokens").value) || 64,
        temperature: Number($("temperature").value) || 0,
      }),
    });
    if (!resp.ok) throw new Error(await errorOf(resp));
    await readEvents(resp.body, (data) => {
      if (data === "[DONE]") { done = true; return false; }
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
      const choice = (chunk.choices || [])[0] || {};
      if (choice.delta && choice.delta.content) answer.append(choice.delta.content);
      if (choice.finish_reason) finish = choice.finish_reason;
    });
    if (!done) throw new Error("the stream ended before data: [DONE]");
    statusBox.textContent = finish === "length" ? "done (stopped at the max new tokens)" : "done";
  } catch (e) {
    if (e.name === "AbortError") statusBox.textContent = "stopped";
    else { statusBox.textContent = ""; showError(e.message); }
  } finally {
    controller.abort(); // after an error mid-stream: close the connection, which frees the server's slot
    controller = null;
    answer.setAttribute("aria-busy", "false");
    send.disabled = picker.disabled = false;
    stop.disabled = true;
  }
}

form.addEventListener("submit", ask);
stop.addEventListener("click", () => controller && controller.abort());
question.addEventListener("keydown", (e) => { // Enter sends, Shift+Enter is a new line
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); form.requestSubmit(); }
});
apiKey.value = localStorage.getItem(KEY_STORE) || "";
apiKey.addEventListener("change", () => {
  if (apiKey.value) localStorage.setItem(KEY_STORE, apiKey.value);
  else localStorage.removeItem(KEY_STORE);
  loadModels();
});
loadModels();
