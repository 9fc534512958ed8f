// Fine-tuning jobs through OpenAI's /v1/fine_tuning API: a form to start one (supervised or
// preference (DPO); a field left empty is "auto"), the jobs in tables by state, and the selected
// job's loss / accuracy (token accuracy, or a DPO job's share of pairs whose preferred reply
// gains more reward; training and validation) / learning-rate / epoch charts, refreshed while it
// trains, what "auto" resolved to, its final statistics, and a way to chat with the adapter it
// made or any kept checkpoint.
import { LineChart, formatNumber } from "./charts.js";
import { cell, formatTime } from "./format.js";
import { PollingTab, datasetOptions } from "./tab.js";

const $ = (id) => document.getElementById(id);
const POLL_MS = 1500;
const GROUPS = [
  ["Created", ["validating_files"]],
  ["Queued", ["queued"]],
  ["Training", ["running"]],
  ["Completed", ["succeeded"]],
  ["Failed or cancelled", ["failed", "cancelled"]],
];
const FINISHED = ["succeeded", "failed", "cancelled"];
const HYPERPARAMETERS = {
  n_epochs: "Epochs",
  batch_size: "Batch size",
  learning_rate_multiplier: "Learning rate × 2e-4",
};
const STATS = {
  train_loss: "Final training loss",
  full_valid_loss: "Validation loss",
  full_valid_mean_token_accuracy: "Validation token accuracy",
  "full_valid_rewards/accuracies": "Validation preference accuracy",
  "full_valid_rewards/margins": "Validation reward margin",
  trained_tokens: "Trained tokens",
  train_runtime: "Training time (s)",
  train_samples_per_second: "Samples / s",
  train_steps_per_second: "Steps / s",
  epoch: "Epochs",
  total_flos: "FLOs",
};

export class Jobs extends PollingTab {
  constructor(api, chatWith) {
    super();
    this.api = api;
    this.chatWith = chatWith;
    this.selected = null;
    this.timer = null;
    this.charts = {
      loss: new LineChart($("chart-loss"), { title: "Loss" }),
      accuracy: new LineChart($("chart-accuracy"), { title: "Token accuracy" }),
      lr: new LineChart($("chart-lr"), { title: "Learning rate" }),
      epoch: new LineChart($("chart-epoch"), { title: "Epoch" }),
    };
    $("job-form").onsubmit = (e) => {
      e.preventDefault();
      this.create();
    };
    $("job-method").onchange = () => ($("job-beta-field").hidden = $("job-method").value !== "dpo");
    $("job-chat").onclick = () => this.selected && this.chatWith(this.selected.fine_tuned_model);
    $("job-cancel").onclick = () => this.cancel();
    $("job-download").onclick = () => this.download();
  }

  async fillForm() {
    try {
      const [models, files] = await Promise.all([
        this.api.get("/v1/models"),
        this.api.get("/v1/files"),
      ]);
      const keep = (select, options) => {
        const value = select.value;
        select.replaceChildren(...options);
        if ([...select.options].some((o) => o.value === value)) select.value = value;
      };
      keep($("job-model"), models.data.filter((m) => !m.parent).map((m) => new Option(m.id, m.id)));
      keep($("job-dataset"), datasetOptions(files));
      // OpenAI's validation_file: a dataset of its own, or none
      keep($("job-validation-file"), [new Option("none", ""), ...datasetOptions(files)]);
    } catch (err) {
      $("job-error").textContent = err.message;
    }
  }

  async create() {
    $("job-error").textContent = "";
    const given = (id) => ($(id).value === "" ? "auto" : Number($(id).value));
    const type = $("job-method").value;
    const hyperparameters = {
      n_epochs: given("job-epochs"),
      batch_size: given("job-batch"),
      learning_rate_multiplier: given("job-lr"),
    };
    if (type === "dpo") hyperparameters.beta = given("job-beta");
    const body = {
      model: $("job-model").value,
      training_file: $("job-dataset").value,
      method: { type, [type]: { hyperparameters } },
      options: {
        lora_rank: Number($("job-rank").value),
        logging_steps: Number($("job-logging").value),
      },
    };
    if ($("job-validation-file").value !== "") {
      body.validation_file = $("job-validation-file").value;
    }
    if ($("job-validation").value !== "") {
      body.options.validation_split = Number($("job-validation").value);
    }
    const suffix = $("job-suffix").value.trim();
    if (suffix) body.suffix = suffix;
    try {
      const job = await this.api.post("/v1/fine_tuning/jobs", body);
      this.select(job);
    } catch (err) {
      $("job-error").textContent = err.message;
    }
  }

  async cancel() {
    if (!this.selected) return;
    try {
      this.select(await this.api.post(`/v1/fine_tuning/jobs/${this.selected.id}/cancel`, {}));
    } catch (err) {
      $("job-error").textContent = err.message;
    }
  }

  // The adapter the job made, as the tar of its files /v1/adapters/{id}/content sends.
  async download() {
    const model = this.selected?.fine_tuned_model;
    if (!model) return;
    try {
      const path = `/v1/adapters/${model.split("/").map(encodeURIComponent).join("/")}/content`;
      await this.api.download(path, `${model.replaceAll("/", "--")}.tar`);
    } catch (err) {
      $("job-error").textContent = err.message;
    }
  }

  // Refreshes the tables and the selected job; again in POLL_MS while this tab is shown.
  async poll() {
    clearTimeout(this.timer);
    try {
      const jobs = (await this.api.get("/v1/fine_tuning/jobs?limit=100")).data;
      this.renderTables(jobs);
      if (this.selected) {
        const fresh = jobs.find((j) => j.id === this.selected.id) ?? this.selected;
        await this.renderDetail(fresh);
      }
    } catch (err) {
      $("job-error").textContent = err.message;
    }
    this.timer = setTimeout(() => this.poll(), POLL_MS);
  }

  select(job) {
    this.selected = job;
    for (const chart of Object.values(this.charts)) {
      chart.series.clear();
      chart.draw();
    }
    this.poll();
  }

  renderTables(jobs) {
    const tables = GROUPS.map(([title, states]) => {
      const rows = jobs.filter((j) => states.includes(j.status));
      const card = document.createElement("div");
      card.className = "card";
      card.dataset.group = title.toLowerCase().split(" ")[0];
      const h = document.createElement("h2");
      h.textContent = `${title} (${rows.length})`;
      const table = document.createElement("table");
      table.className = "jobs";
      const head = table.createTHead().insertRow();
      for (const t of ["Job", "Base model", "Dataset", "Created", "Progress", "Adapter"]) {
        const th = document.createElement("th");
        th.textContent = t;
        head.append(th);
      }
      const body = table.createTBody();
      for (const j of rows) {
        const tr = body.insertRow();
        tr.dataset.id = j.id;
        tr.classList.toggle("active", j.id === this.selected?.id);
        tr.onclick = () => this.select(j);
        tr.append(
          ...[j.id, j.model, j.training_file, formatTime(j.created_at), progress(j), j.fine_tuned_model].map(cell),
        );
      }
      card.append(h, table);
      return card;
    });
    $("job-tables").replaceChildren(...tables);
  }

  async renderDetail(job) {
    this.selected = job;
    $("job-detail").hidden = false;
    $("job-detail").dataset.status = job.status;
    $("job-title").textContent = job.fine_tuned_model ?? job.id;
    const error = job.error ? ` — ${job.error.message}` : "";
    $("job-status").textContent = `${job.id}: ${job.status} ${progress(job)}${error}`;
    $("job-chat").hidden = job.status !== "succeeded";
    $("job-download").hidden = job.status !== "succeeded";
    $("job-cancel").hidden = FINISHED.includes(job.status);
    const events = (await this.api.get(`/v1/fine_tuning/jobs/${job.id}/events?limit=1000`)).data;
    const logs = events.filter((e) => e.type === "metrics" && e.data).reverse(); // oldest first
    const series = (key) =>
      logs.filter((e) => Number.isFinite(e.data[key])).map((e) => [e.data.step, e.data[key]]);
    this.charts.loss.set("training", series("train_loss"));
    this.charts.loss.set("validation", series("valid_loss"));
    const dpo = job.method?.type === "dpo";
    this.charts.accuracy.retitle(dpo ? "Preference accuracy" : "Token accuracy");
    const accuracy = dpo ? "rewards/accuracies" : "mean_token_accuracy";
    this.charts.accuracy.set("training", series(dpo ? accuracy : `train_${accuracy}`));
    this.charts.accuracy.set("validation", series(`valid_${accuracy}`));
    this.charts.lr.set("learning rate", series("learning_rate"));
    this.charts.epoch.set("epoch", series("epoch"));
    for (const chart of Object.values(this.charts)) chart.draw();
    const stats = $("job-stats");
    stats.replaceChildren();
    const show = (key, label, value) => {
      const dt = document.createElement("dt");
      dt.textContent = label;
      const dd = document.createElement("dd");
      dd.dataset.stat = key;
      dd.textContent = typeof value === "number" ? formatNumber(value) : value;
      stats.append(dt, dd);
    };
    for (const [key, label] of Object.entries(HYPERPARAMETERS)) {
      show(key, label, job.hyperparameters[key]);
    }
    if (dpo) show("beta", "DPO beta", job.method.dpo.hyperparameters.beta);
    for (const [key, label] of Object.entries(STATS)) {
      if (key in job.metrics) show(key, label, job.metrics[key]);
    }
    await this.renderCheckpoints(job);
  }

  async renderCheckpoints(job) {
    const kept = (await this.api.get(`/v1/fine_tuning/jobs/${job.id}/checkpoints?limit=100`)).data;
    const rows = kept.map((c) => {
      const tr = document.createElement("tr");
      const figure = (value) => (Number.isFinite(value) ? formatNumber(value) : null);
      tr.append(
        ...[c.step_number, c.fine_tuned_model_checkpoint, figure(c.metrics.train_loss), figure(c.metrics.valid_loss)].map(cell),
      );
      const chat = document.createElement("button");
      chat.textContent = "Chat";
      chat.className = "quiet";
      chat.onclick = () => this.chatWith(c.fine_tuned_model_checkpoint);
      const td = document.createElement("td");
      td.append(chat);
      tr.append(td);
      return tr;
    });
    $("job-checkpoints").tBodies[0].replaceChildren(...rows);
    $("job-checkpoints").hidden = rows.length === 0;
  }
}

function progress(job) {
  const p = job.progress || {};
  if (p.step === undefined) return "";
  const of = p.max_steps ? `/${p.max_steps}` : "";
  const loss = Number.isFinite(p.loss) ? `, loss ${formatNumber(p.loss)}` : "";
  return `step ${p.step}${of}${loss}`;
}
