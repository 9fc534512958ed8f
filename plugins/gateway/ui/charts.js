// A small SVG line chart: named series of (x, y) points, redrawn on every update. The root
// carries data-points (points drawn) so that tests and people can see it change.

const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 360;
const HEIGHT = 160;
const PAD = { left: 48, right: 8, top: 8, bottom: 20 };
const COLOURS = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777"];

export class LineChart {
  constructor(container, { title, maxPoints = 500, format = formatNumber } = {}) {
    this.series = new Map();
    this.maxPoints = maxPoints;
    this.format = format;
    container.replaceChildren();
    container.classList.add("chart");
    const heading = (this.heading = document.createElement("h3"));
    heading.textContent = title;
    this.svg = document.createElementNS(SVG, "svg");
    this.svg.setAttribute("viewBox", `0 0 ${WIDTH} ${HEIGHT}`);
    this.svg.setAttribute("role", "img");
    this.svg.setAttribute("aria-label", title);
    this.legend = document.createElement("div");
    this.legend.className = "legend";
    container.append(heading, this.svg, this.legend);
    this.root = container;
    this.draw();
  }

  // A new title (the same chart showing another figure).
  retitle(title) {
    this.heading.textContent = title;
    this.svg.setAttribute("aria-label", title);
  }

  // Replaces a series' points (e.g. a job's whole loss curve).
  set(name, points) {
    this.series.set(name, points.slice(-this.maxPoints));
  }

  // Appends one point (e.g. a live metric).
  push(name, x, y) {
    if (y === null || y === undefined || !Number.isFinite(y)) return;
    const points = this.series.get(name) ?? [];
    points.push([x, y]);
    if (points.length > this.maxPoints) points.splice(0, points.length - this.maxPoints);
    this.series.set(name, points);
  }

  draw() {
    const all = [...this.series.values()].flat();
    this.root.dataset.points = String(all.length);
    this.svg.replaceChildren();
    this.legend.replaceChildren();
    if (all.length === 0) {
      this.svg.append(text(WIDTH / 2, HEIGHT / 2, "no data yet", "middle"));
      return;
    }
    const xs = all.map((p) => p[0]);
    const ys = all.map((p) => p[1]);
    let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
    let [y0, y1] = [Math.min(...ys, 0), Math.max(...ys)];
    if (x0 === x1) [x0, x1] = [x0 - 1, x1 + 1];
    if (y0 === y1) y1 = y0 + 1; // a flat line (all zeros, say) sits on the axis
    const sx = (x) => PAD.left + ((x - x0) / (x1 - x0)) * (WIDTH - PAD.left - PAD.right);
    const sy = (y) => HEIGHT - PAD.bottom - ((y - y0) / (y1 - y0)) * (HEIGHT - PAD.top - PAD.bottom);
    const axis = document.createElementNS(SVG, "path");
    axis.setAttribute("class", "axis");
    axis.setAttribute(
      "d",
      `M${PAD.left},${PAD.top} V${HEIGHT - PAD.bottom} H${WIDTH - PAD.right}`,
    );
    this.svg.append(
      axis,
      text(PAD.left - 4, PAD.top + 8, this.format(y1), "end"),
      text(PAD.left - 4, HEIGHT - PAD.bottom, this.format(y0), "end"),
    );
    let i = 0;
    for (const [name, points] of this.series) {
      const colour = COLOURS[i++ % COLOURS.length];
      const line = document.createElementNS(SVG, "polyline");
      line.setAttribute("points", points.map(([x, y]) => `${sx(x)},${sy(y)}`).join(" "));
      line.setAttribute("stroke", colour);
      line.setAttribute("class", "series");
      line.dataset.series = name;
      this.svg.append(line);
      const last = points.at(-1);
      const item = document.createElement("span");
      item.style.setProperty("--colour", colour);
      item.textContent = last ? `${name}: ${this.format(last[1])}` : name;
      this.legend.append(item);
    }
  }
}

function text(x, y, value, anchor) {
  const node = document.createElementNS(SVG, "text");
  node.setAttribute("x", x);
  node.setAttribute("y", y);
  node.setAttribute("text-anchor", anchor);
  node.textContent = value;
  return node;
}

export function formatNumber(v) {
  if (!Number.isFinite(v)) return "–";
  const a = Math.abs(v);
  if (a !== 0 && (a < 0.01 || a >= 1e5)) return v.toExponential(1);
  return String(Math.round(v * 100) / 100);
}
