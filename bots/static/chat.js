// attune web chat: plain JavaScript, served by attune itself. User text is only ever
// put on the page with textContent, never as HTML.
"use strict";

const state = { csrf: "", commands: [], quick: [], more: [], busy: false, shown: new Set(), waiting: 0, watch: null };
const LATE_POLL_MS = 3000;  // while a deferred message waits for its answer
const LATE_WATCH_MS = 15 * 60 * 1000;
const $ = (id) => document.getElementById(id);

async function api(path, body) {
  const options = body === undefined ? {} : {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": state.csrf },
    body: JSON.stringify(body),
  };
  const response = await fetch(path, { credentials: "same-origin", ...options });
  if (!response.ok) {
    let message = response.statusText;
    try { message = (await response.json()).error || message; } catch (_) { /* not JSON */ }
    throw new Error(`${response.status}: ${message}`);
  }
  return response;
}

function status(text) { $("status").textContent = text; }

function addBubble(role, text) {
  const item = document.createElement("li");
  item.className = `message ${role}`;
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  item.appendChild(body);
  $("messages").appendChild(item);
  item.scrollIntoView({ block: "end" });
  return item;
}

function reactionBar(item, messageId, current) {
  const bar = document.createElement("div");
  bar.className = "reactions";
  bar.dataset.messageId = messageId;
  let chosen = current || null;

  const render = () => {
    for (const button of bar.querySelectorAll("button.emoji")) {
      button.setAttribute("aria-pressed", String(button.dataset.emoji === chosen));
    }
  };
  const react = async (emoji) => {
    try {
      if (chosen !== null) {  // a change or a take-back first removes the standing one
        await api("/api/reactions", { message_id: messageId, emoji: chosen, added: false });
      }
      if (chosen === emoji) {
        chosen = null;
      } else {
        const outcome = await (await api("/api/reactions", { message_id: messageId, emoji, added: true })).json();
        chosen = emoji;
        status(`Noted ${emoji} (reward ${outcome.reward >= 0 ? "+" : ""}${outcome.reward.toFixed(2)})`);
      }
      render();
    } catch (error) { status(`Could not react: ${error.message}`); }
  };
  const button = (emoji) => {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "emoji";
    b.dataset.emoji = emoji;
    b.textContent = emoji;
    b.title = `React with ${emoji}`;
    b.addEventListener("click", () => react(emoji));
    return b;
  };
  for (const emoji of state.quick) bar.appendChild(button(emoji));
  const picker = document.createElement("details");
  picker.className = "picker";
  const summary = document.createElement("summary");
  summary.textContent = "+";
  summary.title = "More reactions";
  picker.appendChild(summary);
  const grid = document.createElement("div");
  for (const emoji of state.more) {
    const b = button(emoji);
    b.addEventListener("click", () => { picker.open = false; });
    grid.appendChild(b);
  }
  picker.appendChild(grid);
  bar.appendChild(picker);
  if (chosen && !state.quick.includes(chosen) && !state.more.includes(chosen)) grid.appendChild(button(chosen));
  render();
  item.appendChild(bar);
}

function showReply(item, reply) {
  if (!reply) return;
  if (reply.id) state.shown.add(String(reply.id));
  if (reply.deferred) watchLate();
  item.querySelector(".text").textContent = reply.text;
  item.classList.toggle("notice", reply.kind !== "answer");
  if (reply.kind === "answer" && reply.id) reactionBar(item, reply.id, null);
  if (reply.attachment) {
    const link = document.createElement("a");
    const blob = new Blob([reply.attachment.content], { type: reply.attachment.mime });
    link.href = URL.createObjectURL(blob);
    link.download = reply.attachment.filename;
    link.textContent = `Download ${reply.attachment.filename}`;
    link.className = "attachment";
    item.appendChild(link);
  }
}

// A message whose answer was deferred (the model could not answer) is answered later by
// the server: poll the history until that answer is in, and show it under the messages.
function watchLate() {
  state.waiting += 1;
  const until = Date.now() + LATE_WATCH_MS;
  if (state.watch !== null) return;
  state.watch = setInterval(async () => {
    if (state.busy) return;  // a reply being streamed is shown by its own stream
    if (state.waiting <= 0 || Date.now() > until) { clearInterval(state.watch); state.watch = null; return; }
    try {
      const { messages } = await (await api("/api/history")).json();
      for (const message of messages) {
        if (message.role !== "assistant" || !message.id || state.shown.has(String(message.id))) continue;
        state.shown.add(String(message.id));
        const item = addBubble("bot", message.text);
        item.classList.add("late");
        reactionBar(item, message.id, message.reactions[0] || null);
        state.waiting -= 1;
      }
    } catch (_) { /* the server is away: the next poll tries again */ }
  }, LATE_POLL_MS);
}

async function sendMessage(text) {
  addBubble("user", text);
  const item = addBubble("bot", "");
  item.classList.add("streaming");
  const response = await api("/api/messages", { text, stream: true });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", streamed = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let newline;
    while ((newline = buffer.indexOf("\n")) >= 0) {
      const event = JSON.parse(buffer.slice(0, newline));
      buffer = buffer.slice(newline + 1);
      if (event.type === "token") {
        streamed += event.text;
        item.querySelector(".text").textContent = streamed;
        item.scrollIntoView({ block: "end" });
      } else if (event.type === "reply") {
        showReply(item, event.reply);
      }
    }
  }
  item.classList.remove("streaming");
}

async function runCommand(text) {
  addBubble("user", text);
  const { reply } = await (await api("/api/commands", { text })).json();
  const item = addBubble("bot", "");
  showReply(item, reply);
  item.classList.add("command");
}

function suggest() {
  const list = $("suggestions");
  const text = $("input").value;
  list.replaceChildren();
  if (!text.startsWith("/") || text.includes(" ")) { list.hidden = true; return; }
  const typed = text.slice(1).toLowerCase();
  for (const command of state.commands.filter((c) => c.name.startsWith(typed))) {
    const option = document.createElement("li");
    option.setAttribute("role", "option");
    option.className = "suggestion";
    const usage = document.createElement("code");
    usage.textContent = command.usage;
    const summary = document.createElement("span");
    summary.textContent = ` ${command.summary}`;
    option.append(usage, summary);
    option.addEventListener("mousedown", (event) => {
      event.preventDefault();
      $("input").value = `/${command.name} `;
      suggest();
      $("input").focus();
    });
    list.appendChild(option);
  }
  list.hidden = list.children.length === 0;
}

async function submit(event) {
  event.preventDefault();
  const text = $("input").value.trim();
  if (!text || state.busy) return;
  state.busy = true;
  $("send").disabled = true;
  $("input").value = "";
  suggest();
  try {
    if (text.startsWith("/")) await runCommand(text);
    else await sendMessage(text);
    status("");
  } catch (error) {
    status(`Something went wrong: ${error.message}`);
  } finally {
    state.busy = false;
    $("send").disabled = false;
    $("input").focus();
  }
}

async function start() {
  const session = await (await api("/api/session")).json();
  Object.assign(state, { csrf: session.csrf, commands: session.commands, quick: session.reactions,
                         more: session.more_reactions });
  $("name").value = session.name || "";
  const { messages } = await (await api("/api/history")).json();
  for (const message of messages) {
    const item = addBubble(message.role === "user" ? "user" : "bot", message.text);
    if (message.role === "assistant" && message.id) {
      state.shown.add(String(message.id));
      reactionBar(item, message.id, message.reactions[0] || null);
    }
  }
  $("composer").addEventListener("submit", submit);
  $("input").addEventListener("input", suggest);
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) submit(event);
  });
  $("name-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      const { name } = await (await api("/api/name", { name: $("name").value })).json();
      $("name").value = name;
      status(`Hello, ${name}.`);
    } catch (error) { status(`Could not save the name: ${error.message}`); }
  });
  document.body.dataset.ready = "true";
}

start().catch((error) => status(`Could not start: ${error.message}`));
