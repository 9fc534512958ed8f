// The shell: log in with an API key, then the tabs (chat, datasets, jobs, evaluations, the user's
// own keys and usage, metrics for admins).
import { Account } from "./account.js";
import { Api, ApiError } from "./api.js";
import { Chat } from "./chat.js";
import { Datasets } from "./datasets.js";
import { Evaluations } from "./evaluations.js";
import { Jobs } from "./jobs.js";
import { Metrics } from "./metrics.js";

const KEY = "atoll.key"; // sessionStorage: the key lives as long as the tab, never on disk
const $ = (id) => document.getElementById(id);

class App {
  constructor() {
    this.tabs = {};
    this.current = null;
    $("login-form").addEventListener("submit", (e) => {
      e.preventDefault();
      this.login($("api-key").value.trim());
    });
    $("logout").addEventListener("click", () => this.logout());
    window.addEventListener("hashchange", () => this.show(location.hash.slice(1)));
    const saved = sessionStorage.getItem(KEY);
    if (saved) this.login(saved);
  }

  async login(key) {
    $("login-error").textContent = "";
    const api = new Api(key, (error) => this.refused(error));
    let session;
    try {
      session = await api.get("/ui/session");
    } catch (err) {
      sessionStorage.removeItem(KEY);
      $("login-error").textContent =
        err instanceof ApiError && err.status === 401 ? `Refused: ${err.message}` : String(err);
      return;
    }
    sessionStorage.setItem(KEY, key);
    this.api = api;
    this.session = session;
    $("api-key").value = "";
    $("login").hidden = true;
    $("nav").hidden = false;
    $("logout").hidden = false;
    const who = $("who");
    who.hidden = false;
    who.textContent = session.project ? `${session.user} · ${session.project}` : session.user;
    if (session.admin) who.textContent += " (admin)";
    for (const a of document.querySelectorAll("[data-admin]")) a.hidden = !session.admin;
    this.tabs = {
      chat: new Chat(api, session),
      datasets: new Datasets(api),
      jobs: new Jobs(api, (model) => this.chatWith(model)),
      evaluations: new Evaluations(api),
      account: new Account(api, session),
    };
    if (session.admin) this.tabs.metrics = new Metrics(api);
    this.show(location.hash.slice(1));
  }

  logout() {
    this.current?.hide?.();
    sessionStorage.removeItem(KEY);
    location.hash = "";
    location.reload();
  }

  // The key was refused mid-session: back to the login form, saying why.
  refused(error) {
    if (!this.api) return;
    for (const view of Object.values(this.tabs)) view.hide?.();
    this.tabs.chat?.abort?.abort(); // a reply still streaming
    this.api = null;
    this.tabs = {};
    this.current = null;
    sessionStorage.removeItem(KEY);
    for (const id of ["nav", "who", "logout"]) $(id).hidden = true;
    for (const tab of document.querySelectorAll(".tab")) tab.hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = `Logged out: ${error.message}`;
  }

  show(name) {
    if (!this.api) return;
    if (!this.tabs[name]) name = "chat";
    if (location.hash.slice(1) !== name) history.replaceState(null, "", `#${name}`);
    for (const [tab, view] of Object.entries(this.tabs)) {
      $(`tab-${tab}`).hidden = tab !== name;
      if (tab !== name && view === this.current) view.hide?.();
    }
    for (const a of document.querySelectorAll("#nav a")) {
      a.classList.toggle("active", a.dataset.tab === name);
    }
    this.current = this.tabs[name];
    this.current.show?.();
  }

  chatWith(model) {
    this.tabs.chat.startWith(model);
    location.hash = "chat";
  }
}

new App();
