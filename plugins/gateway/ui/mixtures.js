// Optimised mixtures through Atoll's /v1/mixture_searches: a form (a base model, its adapters to
// mix, a labelled dataset, the metric, how many trials, a name to save the winner under), the
// caller's searches, and the selected one's curve (each trial's score and the best so far) and
// trials, refreshed while it runs.
import { LineChart } from "./charts.js";
import { cell, formatTime } from "./format.js";
import { RunsTab, checkboxes, datasetOptions } from "./tab.js";

const $ = (id) => document.getElementById(id);

export class Mixtures extends RunsTab {
  constructor(api) {
    super(api, {
      path: "/v1/mixture_searches",
      noun: "mixture searches",
      table: $("mix-table"),
      error: $("mix-error"),
    });
    this.models = [];
    $("mix-form").onsubmit = (e) => {
      e.preventDefault();
      this.create();
    };
    $("mix-base").onchange = () => this.adapterBoxes();
  }

  async fillForm() {
    try {
      const [files, models] = await Promise.all([
        this.api.get("/v1/files"),
        this.api.get("/v1/models"),
      ]);
      this.models = models.data;
      $("mix-dataset").replaceChildren(...datasetOptions(files));
      const bases = this.models.filter((m) => m.kind === "chat").map((m) => new Option(m.id));
      $("mix-base").replaceChildren(...bases);
      this.adapterBoxes();
    } catch (err) {
      $("mix-error").textContent = `Could not load datasets and models: ${err.message}`;
    }
  }

  // The chosen base model's adapters, each a checkbox.
  adapterBoxes() {
    const base = $("mix-base").value;
    const ids = this.models
      .filter((m) => m.kind === "adapter" && m.parent === base)
      .map((m) => m.id);
    $("mix-adapters").replaceChildren(...checkboxes(ids));
  }

  create() {
    const adapters = [...$("mix-adapters").querySelectorAll("input:checked")].map((b) => b.value);
    const body = {
      model: $("mix-base").value,
      adapters,
      file_id: $("mix-dataset").value,
      metric: $("mix-metric").value,
      trials: Number($("mix-trials").value),
    };
    const name = $("mix-name").value.trim();
    if (name) body.name = name;
    this.start(body);
  }

  row(s) {
    const tr = document.createElement("tr");
    tr.dataset.id = s.id;
    const trials = `${s.trials.length}/${s.max_trials}`;
    const when = formatTime(s.created_at);
    tr.append(...[s.id, s.status, s.adapters.join(", "), trials, s.mixture, when].map(cell));
    tr.onclick = () => {
      this.selected = s;
      this.detail(s);
    };
    return tr;
  }

  detail(s) {
    $("mix-detail").hidden = false;
    $("mix-title").textContent = s.id;
    const why = s.error ? `: ${s.error.message}` : "";
    const saved = s.mixture ? `, saved as ${s.mixture}` : "";
    const done = `${s.trials.length} of at most ${s.max_trials} trials`;
    $("mix-status").textContent = `${s.status}, ${done} (${s.metric})${saved}${why}`;
    const chart = new LineChart($("mix-curve"), { title: `${s.metric} by trial` });
    const points = (key) =>
      s.trials.map((t, i) => [i + 1, t[key]]).filter(([, y]) => y !== null);
    chart.set("trial", points("score"));
    chart.set("best so far", points("best_score"));
    chart.draw();
    $("mix-trials-table").tBodies[0].replaceChildren(
      ...s.trials.map((t, i) => {
        const tr = document.createElement("tr");
        const weights = s.adapters.map((a) => `${a} ${t.weights[a].toFixed(3)}`).join(", ");
        const score = t.score === null ? `refused: ${t.error}` : t.score.toFixed(4);
        tr.append(...[i + 1, weights, t.merge_strategy, score].map(cell));
        return tr;
      }),
    );
  }
}
