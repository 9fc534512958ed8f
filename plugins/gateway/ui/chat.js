// The chat playground. Conversations are kept per user in this browser's localStorage (the
// gateway keeps no prompt text unless a project opted in); replies stream from
// /v1/chat/completions; "compare" asks the base model the same thing side by side.
import { ApiError } from "./api.js";

const $ = (id) => document.getElementById(id);
const MAX_CONVERSATIONS = 100;

export class Chat {
  constructor(api, session) {
    this.api = api;
    this.storeKey = `atoll.chats.${session.user}`;
    this.conversations = this.load();
    this.models = [];
    this.abort = null;
    $("new-chat").onclick = () => this.open(this.create());
    $("chat-form").onsubmit = (e) => {
      e.preventDefault();
      this.send();
    };
    $("prompt").onkeydown = (e) => {
      if (e.key === "Enter" && !e.shiftKey) {
        e.preventDefault();
        this.send();
      }
    };
    $("stop").onclick = () => this.abort?.abort();
    $("add-adapter").onclick = () => {
      this.addMixtureRow();
      this.saveSettings();
    };
    $("model").onchange = () => {
      this.saveSettings();
      this.updateCompare();
    };
    for (const id of ["merge-strategy", "compare", "system", "temperature", "max-tokens"]) {
      $(id).onchange = () => this.saveSettings();
    }
    this.open(this.conversations[0] ?? this.create());
  }

  // --- conversations -----------------------------------------------------------------------

  load() {
    try {
      const list = JSON.parse(localStorage.getItem(this.storeKey) || "[]");
      return Array.isArray(list) ? list : [];
    } catch {
      return [];
    }
  }

  save() {
    this.conversations = this.conversations.slice(0, MAX_CONVERSATIONS);
    localStorage.setItem(this.storeKey, JSON.stringify(this.conversations));
    this.renderList();
  }

  create(settings = {}) {
    const c = {
      id: crypto.randomUUID(),
      title: "New chat",
      created: Date.now(),
      settings: {
        model: this.conversation?.settings.model ?? "",
        adapters: [],
        merge_strategy: "linear",
        compare: false,
        system: "",
        temperature: 0.7,
        max_tokens: 256,
        ...settings,
      },
      messages: [],
    };
    this.conversations.unshift(c);
    this.save();
    return c;
  }

  open(c) {
    this.conversation = c;
    $("chat-error").textContent = "";
    this.renderList();
    this.applySettings();
    this.renderMessages();
  }

  remove(c) {
    this.conversations = this.conversations.filter((x) => x.id !== c.id);
    this.save();
    if (this.conversation.id === c.id) this.open(this.conversations[0] ?? this.create());
  }

  renderList() {
    const list = $("chat-list");
    list.replaceChildren(
      ...this.conversations.map((c) => {
        const li = document.createElement("li");
        li.classList.toggle("active", c.id === this.conversation?.id);
        const title = document.createElement("span");
        title.textContent = c.title;
        title.onclick = () => this.open(c);
        const del = document.createElement("button");
        del.className = "quiet small";
        del.textContent = "×";
        del.title = "Delete this conversation";
        del.onclick = () => this.remove(c);
        li.append(title, del);
        return li;
      }),
    );
  }

  // --- settings ----------------------------------------------------------------------------

  async show() {
    try {
      this.models = (await this.api.get("/v1/models")).data;
    } catch (err) {
      $("chat-error").textContent = `Could not list models: ${err.message}`;
    }
    this.applySettings();
  }

  // Starts a conversation with `model` (e.g. a freshly trained adapter).
  startWith(model) {
    this.open(this.create({ model, adapters: [] }));
  }

  applySettings() {
    const s = this.conversation.settings;
    const select = $("model");
    const base = this.models.filter((m) => !m.parent);
    const adapters = this.models.filter((m) => m.parent);
    const group = (label, models) => {
      const g = document.createElement("optgroup");
      g.label = label;
      g.append(...models.map((m) => new Option(m.parent ? `${m.id} (${m.parent})` : m.id, m.id)));
      return g;
    };
    select.replaceChildren(group("Base models", base), group("Adapters", adapters));
    if (s.model && !this.models.some((m) => m.id === s.model)) {
      select.append(new Option(`${s.model} (unavailable)`, s.model));
    }
    select.value = s.model || base[0]?.id || "";
    $("mixture").replaceChildren();
    for (const a of s.adapters) this.addMixtureRow(a);
    $("merge-strategy").value = s.merge_strategy;
    $("compare").checked = s.compare;
    $("system").value = s.system;
    $("temperature").value = s.temperature;
    $("max-tokens").value = s.max_tokens;
    this.updateCompare();
  }

  addMixtureRow(value = { id: "", weight: 1 }) {
    const row = document.createElement("div");
    row.className = "mix-row";
    const pick = document.createElement("select");
    pick.className = "mix-adapter";
    pick.append(...this.models.filter((m) => m.parent).map((m) => new Option(m.id, m.id)));
    if (value.id) pick.value = value.id;
    const weight = document.createElement("input");
    weight.type = "number";
    weight.className = "mix-weight";
    weight.step = "0.1";
    weight.value = value.weight;
    const del = document.createElement("button");
    del.type = "button";
    del.className = "quiet small";
    del.textContent = "×";
    del.onclick = () => {
      row.remove();
      this.saveSettings();
    };
    pick.onchange = weight.onchange = () => this.saveSettings();
    row.append(pick, weight, del);
    $("mixture").append(row);
  }

  saveSettings() {
    const s = this.conversation.settings;
    s.model = $("model").value;
    s.adapters = [...document.querySelectorAll("#mixture .mix-row")]
      .map((row) => ({
        id: row.querySelector(".mix-adapter").value,
        weight: Number(row.querySelector(".mix-weight").value),
      }))
      .filter((a) => a.id);
    s.merge_strategy = $("merge-strategy").value;
    s.compare = $("compare").checked;
    s.system = $("system").value;
    s.temperature = Number($("temperature").value);
    s.max_tokens = Number($("max-tokens").value);
    this.save();
    this.updateCompare();
  }

  // Comparing needs something to compare: an adapter or a mixture.
  updateCompare() {
    const box = $("compare");
    box.disabled = !this.baseOf(this.conversation.settings);
    if (box.disabled) box.checked = this.conversation.settings.compare = false;
    box.parentElement.title = box.disabled ? "Pick an adapter or mix adapters to compare" : "";
  }

  // The base model of what the settings pick, when they pick adapters (else null).
  baseOf(s) {
    const picked = this.models.find((m) => m.id === s.model);
    if (picked?.parent) return picked.parent;
    if (s.adapters.length) return picked ? picked.id : s.model;
    if (s.model.includes(":")) return s.model.split(":")[0];
    return null;
  }

  // --- messages ----------------------------------------------------------------------------

  renderMessages() {
    $("messages").replaceChildren(...this.conversation.messages.map((m) => this.bubble(m)));
  }

  bubble(m) {
    const div = document.createElement("div");
    div.className = `message ${m.role}`;
    if (m.role === "assistant" && m.compare) {
      div.classList.add("compare");
      div.append(this.column(m.model, m.content, m.usage), this.column(m.compare.model, m.compare.content, m.compare.usage));
    } else {
      div.append(this.column(m.role === "assistant" ? m.model : null, m.content, m.usage));
    }
    return div;
  }

  column(label, content, usage) {
    const col = document.createElement("div");
    col.className = "column";
    if (label) {
      const head = document.createElement("div");
      head.className = "label";
      head.textContent = label;
      col.append(head);
    }
    const body = document.createElement("div");
    body.className = "content";
    body.textContent = content; // model output is text, never HTML
    const foot = document.createElement("div");
    foot.className = "usage";
    if (usage) foot.textContent = `${usage.prompt_tokens} + ${usage.completion_tokens} tokens`;
    col.append(body, foot);
    return col;
  }

  history() {
    const s = this.conversation.settings;
    const turns = s.system ? [{ role: "system", content: s.system }] : [];
    for (const m of this.conversation.messages) turns.push({ role: m.role, content: m.content });
    return turns;
  }

  async send() {
    const text = $("prompt").value.trim();
    if (!text || this.abort) return;
    this.saveSettings();
    const s = this.conversation.settings;
    const c = this.conversation;
    $("prompt").value = "";
    $("chat-error").textContent = "";
    c.messages.push({ role: "user", content: text });
    if (c.title === "New chat") c.title = text.slice(0, 40);
    const messages = this.history();
    const reply = { role: "assistant", content: "", model: s.model };
    const base = s.compare ? this.baseOf(s) : null;
    if (base) reply.compare = { model: base, content: "" };
    c.messages.push(reply);
    this.renderMessages();
    const columns = $("messages").lastElementChild.querySelectorAll(".column");
    this.abort = new AbortController();
    $("send").hidden = true;
    $("stop").hidden = false;
    const body = {
      model: s.model,
      messages,
      temperature: s.temperature,
      max_tokens: s.max_tokens,
      stream: true,
      stream_options: { include_usage: true },
    };
    if (s.adapters.length) {
      body.model = this.baseOf(s); // a mixture goes on its base model
      body.adapters = s.adapters;
      body.merge_strategy = s.merge_strategy;
    }
    const runs = [this.stream(body, reply, columns[0])];
    if (base) runs.push(this.stream({ ...body, model: base, adapters: undefined, merge_strategy: undefined }, reply.compare, columns[1]));
    const results = await Promise.allSettled(runs);
    const failed = results.find((r) => r.status === "rejected");
    if (failed && failed.reason?.name !== "AbortError") {
      $("chat-error").textContent = failed.reason instanceof ApiError ? failed.reason.message : String(failed.reason);
      if (!reply.content) c.messages.splice(-2, 2); // nothing came back: the turn never happened
      if (!reply.content) $("prompt").value = text;
    }
    this.abort = null;
    $("send").hidden = false;
    $("stop").hidden = true;
    this.save();
    this.renderMessages();
  }

  async stream(body, target, column) {
    const content = column.querySelector(".content");
    const usage = column.querySelector(".usage");
    column.classList.add("streaming");
    try {
      for await (const chunk of this.api.events("POST", "/v1/chat/completions", { json: body, signal: this.abort.signal })) {
        const delta = chunk.choices?.[0]?.delta?.content;
        if (delta) {
          target.content += delta;
          content.textContent = target.content;
        }
        if (chunk.usage) {
          target.usage = chunk.usage;
          usage.textContent = `${chunk.usage.prompt_tokens} + ${chunk.usage.completion_tokens} tokens`;
        }
      }
    } finally {
      column.classList.remove("streaming");
    }
  }
}
