// The gateway's HTTP API with the logged-in key: JSON calls and server-sent-event streams read
// with fetch (EventSource cannot send an Authorization header).

export class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

export class Api {
  // `onRefused(error)`: the key stopped working (revoked, expired, rotated out): log out.
  constructor(key, onRefused = () => {}) {
    this.key = key;
    this.onRefused = onRefused;
  }

  headers(extra = {}) {
    return { Authorization: `Bearer ${this.key}`, ...extra };
  }

  async request(method, path, { json, form, signal } = {}) {
    const init = { method, headers: this.headers(), signal };
    if (json !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(json);
    } else if (form !== undefined) {
      init.body = form;
    }
    const response = await fetch(path, init);
    if (!response.ok) {
      const error = await errorOf(response);
      if (response.status === 401) this.onRefused(error);
      throw error;
    }
    return response;
  }

  async get(path, options) {
    return (await this.request("GET", path, options)).json();
  }

  async post(path, json, options = {}) {
    return (await this.request("POST", path, { ...options, json })).json();
  }

  async upload(path, form) {
    return (await this.request("POST", path, { form })).json();
  }

  // Saves the response body as a file named `filename` (the key goes in a header, so a plain
  // link cannot fetch it).
  async download(path, filename) {
    const blob = await (await this.request("GET", path)).blob();
    const url = URL.createObjectURL(blob);
    const link = document.createElement("a");
    link.href = url;
    link.download = filename;
    link.click();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
  }

  async delete(path) {
    return (await this.request("DELETE", path)).json();
  }

  // Yields each event's parsed JSON until `[DONE]` or the end of the body; a mid-stream
  // `{"error": ...}` event is thrown as an ApiError.
  async *events(method, path, { json, signal } = {}) {
    const response = await this.request(method, path, { json, signal });
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const data = block
            .split("\n")
            .filter((line) => line.startsWith("data:"))
            .map((line) => line.slice(5).trimStart())
            .join("\n");
          if (!data) continue;
          if (data === "[DONE]") return;
          const event = JSON.parse(data);
          if (event.error) throw new ApiError(0, event.error.message || "stream failed", event);
          yield event;
        }
      }
    } finally {
      reader.cancel().catch(() => {});
    }
  }
}

export async function errorOf(response) {
  let body = null;
  let message = `${response.status} ${response.statusText}`;
  try {
    body = await response.json();
    message = body?.error?.message || message;
  } catch {
    // not JSON: keep the status line
  }
  const retry = response.headers.get("Retry-After");
  if (retry) message += ` (retry after ${retry} s)`;
  return new ApiError(response.status, message, body);
}
