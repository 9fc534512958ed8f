// Evaluations through Atoll's /v1/evaluations: a form (a held-out dataset, the models to
// compare), the caller's evaluations, and the selected one's figures side by side with a few
// rows' answers, refreshed while it runs.
import { cell, formatTime } from "./format.js";
import { RunsTab, checkboxes, datasetOptions } from "./tab.js";

const $ = (id) => document.getElementById(id);
const FIGURES = ["exact_match", "contains", "rouge_l", "mean_logprob"];

export class Evaluations extends RunsTab {
  constructor(api) {
    super(api, {
      path: "/v1/evaluations",
      noun: "evaluations",
      table: $("eval-table"),
      error: $("eval-error"),
    });
    $("eval-form").onsubmit = (e) => {
      e.preventDefault();
      this.create();
    };
  }

  async fillForm() {
    try {
      const [files, models] = await Promise.all([
        this.api.get("/v1/files"),
        this.api.get("/v1/models"),
      ]);
      $("eval-dataset").replaceChildren(...datasetOptions(files));
      const ids = models.data
        .filter((m) => m.kind !== "embedding" && m.kind !== "transcription")
        .map((m) => m.id);
      $("eval-models").replaceChildren(...checkboxes(ids));
    } catch (err) {
      $("eval-error").textContent = `Could not load datasets and models: ${err.message}`;
    }
  }

  create() {
    const models = [...$("eval-models").querySelectorAll("input:checked")].map((b) => b.value);
    const body = {
      file_id: $("eval-dataset").value,
      models,
      max_tokens: Number($("eval-max-tokens").value),
    };
    this.start(body);
  }

  row(e) {
    const tr = document.createElement("tr");
    tr.dataset.id = e.id;
    const done = `${e.rows_done}/${e.rows}`;
    tr.append(...[e.id, e.status, e.models.join(", "), done, formatTime(e.created_at)].map(cell));
    tr.onclick = () => {
      this.selected = e;
      this.detail(e);
    };
    return tr;
  }

  detail(e) {
    $("eval-detail").hidden = false;
    $("eval-title").textContent = e.id;
    const why = e.error ? `: ${e.error.message}` : "";
    $("eval-status").textContent = `${e.status}, ${e.rows_done} of ${e.rows} rows${why}`;
    $("eval-results").tBodies[0].replaceChildren(
      ...e.results.map((r) => {
        const tr = document.createElement("tr");
        tr.append(cell(r.model), ...FIGURES.map((f) => cell(r[f].toFixed(3))));
        return tr;
      }),
    );
    $("eval-examples").replaceChildren(
      ...e.examples.map((x) => {
        const div = document.createElement("div");
        div.className = "example";
        const question = document.createElement("p");
        question.textContent = x.messages.map((m) => `${m.role}: ${m.content}`).join("\n");
        const reference = document.createElement("p");
        reference.textContent = `reference: ${x.reference}`;
        const answers = document.createElement("ul");
        for (const [model, text] of Object.entries(x.answers)) {
          const li = document.createElement("li");
          li.textContent = `${model}: ${text}`;
          answers.append(li);
        }
        div.append(question, reference, answers);
        return div;
      }),
    );
  }
}
