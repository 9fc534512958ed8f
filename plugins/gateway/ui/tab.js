// What the tabs with a form and a list refreshed while shown share: filling the form when shown,
// polling while shown, stopping when hidden; the tabs of background runs (evaluations, mixture
// searches) their list and selected run; and the form helpers they use.

const RUNNING = ["queued", "running"];
const RUNS_POLL_MS = 1500;

export class PollingTab {
  show() {
    this.fillForm();
    this.poll();
  }

  hide() {
    clearTimeout(this.timer);
    this.timer = null;
  }
}

// Uploaded datasets (not a job's results file, nor a batch's files) as <option>s.
export function datasetOptions(files) {
  return files.data
    .filter((f) => f.purpose === "fine-tune")
    .map((f) => new Option(`${f.filename} (${f.id})`, f.id));
}

// A tab of the caller's background runs at `path`: `start` one from the form, the list in
// `table` (each run a `row`), the selected one's `detail`, refreshed while any is running.
export class RunsTab extends PollingTab {
  constructor(api, { path, noun, table, error }) {
    super();
    this.api = api;
    this.path = path;
    this.noun = noun;
    this.table = table;
    this.error = error;
    this.selected = null;
    this.timer = null;
  }

  async start(body) {
    this.error.textContent = "";
    try {
      this.selected = await this.api.post(this.path, body);
      this.poll();
    } catch (err) {
      this.error.textContent = err.message;
    }
  }

  async poll() {
    clearTimeout(this.timer);
    try {
      const list = (await this.api.get(`${this.path}?limit=100`)).data;
      this.table.tBodies[0].replaceChildren(...list.map((r) => this.row(r)));
      if (this.selected) {
        this.selected = await this.api.get(`${this.path}/${this.selected.id}`);
        this.detail(this.selected);
      }
      if (list.some((r) => RUNNING.includes(r.status))) {
        this.timer = setTimeout(() => this.poll(), RUNS_POLL_MS);
      }
    } catch (err) {
      this.error.textContent = `Could not list ${this.noun}: ${err.message}`;
    }
  }
}

// One checkbox (in a label) for each value.
export function checkboxes(values) {
  return values.map((value) => {
    const label = document.createElement("label");
    label.className = "check";
    const box = document.createElement("input");
    box.type = "checkbox";
    box.value = value;
    label.append(box, ` ${value}`);
    return label;
  });
}
