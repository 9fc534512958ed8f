// The shell: log in with an API key or through single sign-on, then the tabs (chat, datasets,
// jobs, evaluations, mixture searches, the user's own keys and usage, metrics and pipelines for admins).
import { Account } from "./account.js";
import { Api, ApiError, errorOf } from "./api.js";
import { Chat } from "./chat.js";
import { Datasets } from "./datasets.js";
import { Evaluations } from "./evaluations.js";
import { Mixtures } from "./mixtures.js";
import { Jobs } from "./jobs.js";
import { Metrics } from "./metrics.js";
import { Pipelines } from "./pipelines.js";

const KEY = "atoll.key"; // sessionStorage: the key lives as long as the tab, never on disk
const SSO = "atoll.sso"; // set when the key is a single sign-on session's: revoked at log-out
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
    this.offerSso();
    const saved = sessionStorage.getItem(KEY);
    if (location.hash === "#claim") this.claim();
    else if (saved) this.login(saved);
  }

  async offerSso() {
    const response = await fetch("/ui/sso");
    if (!response.ok) return; // this gateway has no single sign-on
    const { name } = await response.json();
    $("sso-login").textContent = `Log in with ${name}`;
    $("sso").hidden = false;
  }

  // Back from the identity provider: the session's key waits in a cookie that only
  // POST /ui/claim reads, once.
  async claim() {
    history.replaceState(null, "", location.pathname);
    const response = await fetch("/ui/claim", { method: "POST" });
    if (!response.ok) {
      $("login-error").textContent = `Refused: ${(await errorOf(response)).message}`;
      return;
    }
    const { key } = await response.json();
    sessionStorage.setItem(SSO, "1");
    await this.login(key);
  }

  async login(key) {
    $("login-error").textContent = "";
    const api = new Api(key, (error) => this.refused(error));
    let session;
    try {
      session = await api.get("/ui/session");
    } catch (err) {
      sessionStorage.removeItem(KEY);
      sessionStorage.removeItem(SSO);
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
      mixtures: new Mixtures(api),
      account: new Account(api, session),
    };
    if (session.admin) {
      this.tabs.metrics = new Metrics(api);
      this.tabs.pipelines = new Pipelines(api);
    }
    this.show(location.hash.slice(1));
  }

  async logout() {
    this.current?.hide?.();
    const sso = sessionStorage.getItem(SSO);
    if (sso) {
      // The session's key was made for this tab alone: revoked, a copy of it stops working too.
      await this.api.post("/me/keys/revoke", { key_id: this.session.key_id }).catch(() => {});
    }
    sessionStorage.removeItem(KEY);
    sessionStorage.removeItem(SSO);
    if (sso) {
      location.assign("/ui/logout"); // and out of the identity provider, where it can
      return;
    }
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
    sessionStorage.removeItem(SSO);
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
