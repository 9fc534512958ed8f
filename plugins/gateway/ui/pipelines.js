// The admins' Pipelines tab: every declarative pipeline as the active controller reports it
// (/admin/pipelines): each service's desired and actual replicas, where it runs, which agents
// are on an older config, its state; and the pipeline's latest events. Polled while shown.
import { cell, formatTime } from "./format.js";

const $ = (id) => document.getElementById(id);
const POLL_MS = 2000;
const EVENTS_SHOWN = 20; // per pipeline, newest first

export class Pipelines {
  constructor(api) {
    this.api = api;
    this.timer = null;
  }

  show() {
    this.poll();
  }

  hide() {
    clearTimeout(this.timer);
    this.timer = null;
  }

  async poll() {
    clearTimeout(this.timer);
    try {
      const { controller, pipelines } = await this.api.get("/admin/pipelines");
      this.update(pipelines);
      $("pipelines-controller").textContent = controller
        ? `active controller: ${controller}`
        : "no controller is online";
      $("pipelines-error").textContent = "";
    } catch (err) {
      $("pipelines-error").textContent = `Could not read the pipelines: ${err.message}`;
    }
    this.timer = setTimeout(() => this.poll(), POLL_MS);
  }

  update(pipelines) {
    const services = pipelines.flatMap((p) =>
      p.services.map((s) => {
        const tr = document.createElement("tr");
        tr.dataset.service = `${p.name}/${s.name}`;
        const state = p.deleting ? `${s.state} (deleting)` : s.state;
        tr.append(
          ...[p.name, p.revision, s.name, s.plugin, s.desired, s.actual, state].map(cell),
          cell(s.agents.join(", ") || "–"),
          cell(s.out_of_date.join(", ") || "–"),
        );
        tr.classList.toggle("warn", s.state === "degraded" || s.state === "halted");
        return tr;
      }),
    );
    $("pipelines-table").tBodies[0].replaceChildren(...services);
    const events = pipelines.flatMap((p) =>
      p.events
        .slice(-EVENTS_SHOWN)
        .reverse()
        .map((e) => {
          const tr = document.createElement("tr");
          tr.append(...[formatTime(e.at), p.name, e.service, e.agent, e.kind, e.message].map(cell));
          return tr;
        }),
    );
    $("pipeline-events").tBodies[0].replaceChildren(...events);
    $("pipelines-empty").hidden = pipelines.length > 0;
  }
}
