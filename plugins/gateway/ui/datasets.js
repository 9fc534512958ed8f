// Datasets: upload (checked row by row by the storage agent; its errors are shown as they are)
// and the caller's list, through OpenAI's /v1/files.
import { cell, formatBytes, formatTime } from "./format.js";

const $ = (id) => document.getElementById(id);

export class Datasets {
  constructor(api) {
    this.api = api;
    $("upload-form").onsubmit = (e) => {
      e.preventDefault();
      this.upload();
    };
  }

  show() {
    this.refresh();
  }

  async refresh() {
    try {
      const files = (await this.api.get("/v1/files")).data;
      $("datasets-table").tBodies[0].replaceChildren(...files.map((f) => this.row(f)));
    } catch (err) {
      $("upload-error").textContent = `Could not list datasets: ${err.message}`;
    }
  }

  row(f) {
    const tr = document.createElement("tr");
    tr.dataset.id = f.id;
    tr.append(...[f.id, f.filename, formatBytes(f.bytes), formatTime(f.created_at)].map(cell));
    const del = document.createElement("button");
    del.className = "quiet small";
    del.textContent = "Delete";
    del.onclick = async () => {
      if (!confirm(`Delete ${f.filename} (${f.id})?`)) return;
      try {
        await this.api.delete(`/v1/files/${encodeURIComponent(f.id)}`);
      } catch (err) {
        $("upload-error").textContent = err.message;
      }
      this.refresh();
    };
    const td = document.createElement("td");
    td.append(del);
    tr.append(td);
    return tr;
  }

  async upload() {
    const input = $("dataset-file");
    const file = input.files[0];
    $("upload-error").textContent = "";
    $("upload-status").textContent = "";
    if (!file) return;
    const form = new FormData();
    form.append("purpose", "fine-tune");
    form.append("file", file, file.name);
    $("upload-status").textContent = `Uploading ${file.name}…`;
    try {
      const record = await this.api.upload("/v1/files", form);
      $("upload-status").textContent = `Uploaded ${record.filename} as ${record.id}.`;
      input.value = "";
    } catch (err) {
      $("upload-status").textContent = "";
      $("upload-error").textContent = `${file.name} was not kept: ${err.message}`;
    }
    this.refresh();
  }
}
