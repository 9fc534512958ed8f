// What the tabs with a form and a list refreshed while shown share: filling the form when shown,
// polling while shown, stopping when hidden; and the caller's datasets as a select's options.

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
