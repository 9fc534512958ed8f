// The admins' live dashboard: /admin/feed (one frame a second: every agent's discovery entry and
// latest metrics) as a table and charts of the last few minutes. Reconnects when the stream ends.
import { LineChart, formatNumber } from "./charts.js";
import { cell, formatBytes } from "./format.js";

const $ = (id) => document.getElementById(id);
const WINDOW = 300; // points kept per series: five minutes at one frame a second
const RETRY_MS = 2000;

export class Metrics {
  constructor(api) {
    this.api = api;
    this.abort = null;
    this.frames = 0;
    this.charts = {
      cpu: new LineChart($("chart-cpu"), { title: "CPU %", maxPoints: WINDOW }),
      memory: new LineChart($("chart-memory"), { title: "Memory %", maxPoints: WINDOW }),
      tokens: new LineChart($("chart-tokens"), { title: "Tokens / s", maxPoints: WINDOW }),
      queue: new LineChart($("chart-queue"), { title: "Queue depth", maxPoints: WINDOW }),
    };
  }

  show() {
    if (!this.abort) this.follow();
  }

  hide() {
    this.abort?.abort();
    this.abort = null;
  }

  async follow() {
    const abort = (this.abort = new AbortController());
    while (!abort.signal.aborted) {
      $("feed-state").textContent = "connecting…";
      try {
        for await (const frame of this.api.events("GET", "/admin/feed", { signal: abort.signal })) {
          this.update(frame.agents);
        }
      } catch (err) {
        if (abort.signal.aborted) return;
        $("feed-state").textContent = `disconnected: ${err.message}`;
      }
      await new Promise((done) => setTimeout(done, RETRY_MS));
    }
  }

  update(agents) {
    this.frames += 1;
    const now = Date.now() / 1000;
    $("feed-state").textContent = `live · ${agents.length} agents · ${new Date().toLocaleTimeString()}`;
    $("tab-metrics").dataset.frames = String(this.frames);
    $("agents-table").tBodies[0].replaceChildren(...agents.map((a) => row(a)));
    for (const a of agents) {
      const f = figures(a);
      this.charts.cpu.push(a.name, now, f.cpu);
      this.charts.memory.push(a.name, now, f.memory);
      if (f.tokens !== null) this.charts.tokens.push(a.name, now, f.tokens);
      if (f.queue !== null) this.charts.queue.push(a.name, now, f.queue);
    }
    for (const chart of Object.values(this.charts)) chart.draw();
  }
}

// The figures shown for one agent; null where the agent has none (no GPU, no inference plugin).
function figures(a) {
  const system = a.metrics?.system ?? {};
  const gpus = system.gpus ?? [];
  const inference = a.metrics?.plugins?.inference ?? {};
  // The feed's figure, else the announcement's (its load names differ: tokens_per_s).
  const gauge = (name, load = name) => inference[name]?.series?.[0]?.value ?? a.load?.[load] ?? null;
  const mean = (xs) => (xs.length ? xs.reduce((s, x) => s + x, 0) / xs.length : null);
  return {
    cpu: system.cpu?.percent ?? null,
    memory: system.memory?.percent ?? null,
    gpu: mean(gpus.map((g) => g.utilization_percent).filter(Number.isFinite)),
    gpuMemory: gpus.length
      ? `${formatBytes(gpus.reduce((s, g) => s + (g.memory_used_bytes ?? 0), 0))} / ${formatBytes(gpus.reduce((s, g) => s + (g.memory_total_bytes ?? 0), 0))}`
      : null,
    tokens: gauge("tokens_per_second", "tokens_per_s"),
    queue: gauge("queue_depth"),
  };
}

function row(a) {
  const f = figures(a);
  const tr = document.createElement("tr");
  tr.dataset.agent = a.name;
  tr.dataset.status = a.status;
  const num = (v) => (v === null ? "–" : formatNumber(v));
  tr.append(
    ...[
      a.name,
      a.status,
      a.region,
      (a.plugins ?? []).join(", "),
      num(f.cpu),
      num(f.memory),
      num(f.gpu),
      f.gpuMemory,
      num(f.tokens),
      num(f.queue),
      `${num(a.age_s)} s ago`,
    ].map(cell),
  );
  return tr;
}
