// mlxkt chat page: plain JavaScript, no dependencies, works offline.
// Streams /v1/chat/completions (SSE) and shows reasoning_content apart from the answer.
"use strict";

const $ = (id) => document.getElementById(id);
const chat = { messages: [], model: null, controller: null };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function setBusy(busy) {
  document.body.dataset.busy = busy ? "1" : "0";
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  if (role === "assistant") {
    const think = document.createElement("details");
    think.className = "thinking";
    think.open = true;
    think.hidden = true;
    const summary = document.createElement("summary");
    summary.textContent = "Thinking…";
    const thinkText = document.createElement("div");
    thinkText.className = "thinking-text";
    think.append(summary, thinkText);
    const content = document.createElement("div");
    content.className = "content";
    const stats = document.createElement("div");
    stats.className = "stats";
    div.append(think, content, stats);
  } else {
    div.textContent = text; // never innerHTML: model and user text stay text
  }
  $("messages").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function showError(div, message) {
  const e = document.createElement("div");
  e.className = "error";
  e.textContent = message;
  div.append(e);
}

async function errorText(res) {
  try {
    const body = await res.json();
    const err = body.error;
    return typeof err === "string" ? err : (err && err.message) || res.statusText;
  } catch (_) {
    return res.status + " " + res.statusText;
  }
}

async function loadModel() {
  try {
    const res = await fetch("/v1/models", { headers: headers() });
    if (!res.ok) {
      $("status").textContent = res.status === 401 ? "API key required" : await errorText(res);
      return;
    }
    const body = await res.json();
    chat.model = body.data[0].id;
    $("model-name").textContent = chat.model;
    $("status").textContent = "ready";
  } catch (e) {
    $("status").textContent = "server unreachable";
  }
}

// Parse an SSE byte stream into the JSON payloads of its `data:` lines.
async function* sseEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function send(text) {
  if (!chat.model) await loadModel();
  if (!chat.model) return;
  const system = $("system").value.trim();
  chat.messages.push({ role: "user", content: text });
  addMessage("user", text);
  const div = addMessage("assistant");
  const think = div.querySelector(".thinking");
  const thinkText = div.querySelector(".thinking-text");
  const content = div.querySelector(".content");
  const stats = div.querySelector(".stats");
  const request = {
    model: chat.model,
    messages: (system ? [{ role: "system", content: system }] : []).concat(chat.messages),
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number($("temperature").value),
    max_tokens: Math.max(1, Math.floor(Number($("max-tokens").value))),
  };
  chat.controller = new AbortController();
  setBusy(true);
  const started = performance.now();
  let answer = "";
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(request), signal: chat.controller.signal,
    });
    if (!res.ok) {
      showError(div, await errorText(res));
      chat.messages.pop();
      return;
    }
    for await (const ev of sseEvents(res.body)) {
      if (ev.error) { showError(div, ev.error.message); break; }
      if (ev.usage) {
        const secs = (performance.now() - started) / 1000;
        stats.textContent = `${ev.usage.prompt_tokens} prompt tokens (${ev.usage.prompt_tokens_details.cached_tokens} cached) · `
          + `${ev.usage.completion_tokens} tokens · ${(ev.usage.completion_tokens / secs).toFixed(1)} tok/s`;
      }
      const choice = ev.choices && ev.choices[0];
      if (!choice) continue;
      const delta = choice.delta || {};
      if (delta.reasoning_content) {
        think.hidden = false;
        thinkText.textContent += delta.reasoning_content;
      }
      if (delta.content) {
        answer += delta.content;
        content.textContent = answer;
      }
      div.scrollIntoView({ block: "end" });
    }
    chat.messages.push({ role: "assistant", content: answer });
  } catch (e) {
    if (e.name === "AbortError") {
      chat.messages.push({ role: "assistant", content: answer });
      stats.textContent = "stopped";
    } else {
      showError(div, String(e));
      chat.messages.pop();
    }
  } finally {
    think.querySelector("summary").textContent = "Thought";
    chat.controller = null;
    setBusy(false);
  }
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || chat.controller) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => chat.controller && chat.controller.abort());
$("new-chat").addEventListener("click", () => {
  if (chat.controller) chat.controller.abort();
  chat.messages = [];
  $("messages").replaceChildren();
});
$("api-key").value = localStorage.getItem("mlxkt-api-key") || "";
$("api-key").addEventListener("change", () => {
  localStorage.setItem("mlxkt-api-key", $("api-key").value.trim());
  loadModel();
});
loadModel();
