// Display helpers shared by the tabs.

export function formatBytes(n) {
  if (!Number.isFinite(n)) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

export function formatTime(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleString() : "–";
}

export function cell(value) {
  const td = document.createElement("td");
  td.textContent = value ?? "–";
  return td;
}
