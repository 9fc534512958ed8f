// My keys & usage: the logged-in user's own keys (create, shown once; revoke), the budgets their
// requests are checked against, and their usage per model and adapter, all through /me.
import { cell, formatTime } from "./format.js";

const $ = (id) => document.getElementById(id);
const DAY = 86400;

export class Account {
  constructor(api, session) {
    this.api = api;
    this.session = session;
    $("key-form").onsubmit = (e) => {
      e.preventDefault();
      this.create();
    };
    $("usage-period").onchange = () => this.usage();
  }

  show() {
    this.projects();
    this.refresh();
  }

  async refresh() {
    await Promise.all([this.keys(), this.budgets(), this.usage()]);
  }

  async projects() {
    try {
      const me = await this.api.get("/me");
      const select = $("key-project");
      const options = Object.keys(me.projects).map((name) => new Option(name, name));
      // A project-scoped key makes keys of its project only.
      const personal = me.project ? [] : [new Option("none (personal)", "")];
      select.replaceChildren(...personal, ...options);
    } catch (err) {
      $("key-error").textContent = err.message;
    }
  }

  async keys() {
    try {
      const keys = await this.api.get("/me/keys");
      $("keys-table").tBodies[0].replaceChildren(...keys.map((k) => this.keyRow(k)));
    } catch (err) {
      $("key-error").textContent = `Could not list keys: ${err.message}`;
    }
  }

  keyRow(k) {
    const tr = document.createElement("tr");
    tr.dataset.id = k.key_id;
    const mark = k.key_id === this.session.key_id ? " (this one)" : "";
    tr.append(
      ...[
        k.key_id + mark,
        k.name || "–",
        k.project,
        k.state,
        formatTime(k.created),
        formatTime(k.expires_at),
        formatTime(k.last_used),
      ].map(cell),
    );
    const td = document.createElement("td");
    if (k.state === "active") {
      const revoke = document.createElement("button");
      revoke.className = "quiet small";
      revoke.textContent = "Revoke";
      revoke.onclick = () => this.revoke(k);
      td.append(revoke);
    }
    tr.append(td);
    return tr;
  }

  async create() {
    $("key-error").textContent = "";
    const days = Number($("key-days").value);
    const body = {
      name: $("key-name").value,
      project: $("key-project").value || null,
      ttl_s: days ? days * DAY : null,
    };
    try {
      const made = await this.api.post("/me/keys", body);
      $("new-key-text").textContent = made.key;
      $("new-key").hidden = false;
      $("key-form").reset();
    } catch (err) {
      $("key-error").textContent = err.message;
    }
    this.keys();
  }

  async revoke(k) {
    const self = k.key_id === this.session.key_id;
    const warning = self ? " This is the key you are logged in with: you will be logged out." : "";
    if (!confirm(`Revoke ${k.key_id}${k.name ? ` (${k.name})` : ""}?${warning}`)) return;
    try {
      await this.api.post("/me/keys/revoke", { key_id: k.key_id });
    } catch (err) {
      $("key-error").textContent = err.message;
    }
    if (!self) this.keys();
    else this.api.get("/me").catch(() => {}); // refused now: the shell logs out
  }

  async budgets() {
    try {
      const budgets = await this.api.get("/me/budgets");
      $("no-budgets").hidden = budgets.length > 0;
      $("budgets-table").tBodies[0].replaceChildren(
        ...budgets.map((b) => {
          const tr = document.createElement("tr");
          const unit = b.metric === "tokens" ? " tokens" : "";
          const amount = (v) => `${Number(v.toFixed(6))}${unit}`;
          tr.append(
            ...[
              `${b.scope} ${b.subject}: ${b.metric}`,
              b.period,
              amount(b.limit),
              amount(b.spent),
              amount(b.reserved),
              amount(b.remaining),
              b.resets_at ? formatTime(b.resets_at) : "never",
            ].map(cell),
          );
          return tr;
        }),
      );
    } catch (err) {
      $("usage-error").textContent = `Could not read budgets: ${err.message}`;
    }
  }

  async usage() {
    $("usage-error").textContent = "";
    const days = $("usage-period").value;
    const query = days ? `?since=${Date.now() / 1000 - Number(days) * DAY}` : "";
    try {
      const report = await this.api.get(`/me/usage${query}`);
      $("usage-total").textContent =
        `${report.requests} requests, ${report.prompt_tokens} prompt and ` +
        `${report.completion_tokens} completion tokens, cost ${Number(report.cost.toFixed(6))}`;
      $("usage-table").tBodies[0].replaceChildren(
        ...report.groups.map((g) => {
          const tr = document.createElement("tr");
          const cost = Number(g.cost.toFixed(6));
          const values = [g.model, g.adapter, g.requests, g.prompt_tokens, g.completion_tokens];
          tr.append(...[...values, cost].map(cell));
          return tr;
        }),
      );
    } catch (err) {
      $("usage-error").textContent = `Could not read usage: ${err.message}`;
    }
  }
}
