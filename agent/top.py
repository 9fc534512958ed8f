"""The table ``atoll top`` draws: one row per agent from discovery entries and feed messages.

Pure rendering; the live loop and the CLI live elsewhere. Feed messages come from other agents, so
every reading is looked up defensively and shown as "-" when missing or malformed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from rich.table import Table
from rich.text import Text

STATUS_STYLES = {"ACTIVE": "green", "STALE": "yellow", "LOST": "red", "REFUSED": "bold red"}
_SEVERITY = {"REFUSED": 3, "LOST": 2, "STALE": 1, "ACTIVE": 0}
# Plugin figures worth a glance, in display order: (metric name, short label).
FIGURES = [
    ("requests", "req"),
    ("queue_depth", "queue"),
    ("tokens_per_second", "tok/s"),
    ("tokens", "tok/s"),  # a counter: shown as its rate
    ("adapters_loaded", "adapters"),
    ("jobs_running", "jobs"),
    ("loss", "loss"),
]
MAX_FIGURES = 4


def render_top(entries: list[dict[str, Any]], sort_by: str = "name") -> Table:
    """Entries are ``{"name", "region", "status", "plugins", "age_s", "metrics"}`` (``metrics`` a
    feed message or None). ``sort_by``: name, cpu, mem, gpu, status, age; numeric keys sort
    descending (busiest, worst status, oldest heartbeat first) with missing readings last."""
    if sort_by not in SORT_KEYS:
        raise ValueError(f"unknown sort key {sort_by!r}; valid: {', '.join(SORT_KEYS)}")
    rows = sorted(entries, key=lambda e: str(e.get("name", "")))
    if sort_by != "name":
        # Stable sorts: ties keep name order; None (no reading) sinks to the bottom.
        key = SORT_KEYS[sort_by]
        rows.sort(key=lambda e: (key(e) is None, -(key(e) or 0)))

    table = Table(title=f"atoll top: {len(entries)} agents", title_justify="left")
    table.add_column("agent", no_wrap=True)
    table.add_column("region")
    table.add_column("status")
    for header in ("cpu %", "mem %", "gpu %", "gpu mem", "net rx", "net tx"):
        table.add_column(header, justify="right", no_wrap=True)
    table.add_column("plugins")
    table.add_column("figures")
    table.add_column("age", justify="right", no_wrap=True)
    for entry in rows:
        table.add_row(*_row(entry), style="dim" if entry.get("status") == "LOST" else None)
    return table


def _row(entry: dict[str, Any]) -> list[str | Text]:
    system = _get(entry, "metrics", "system")
    status = str(entry.get("status", "?"))
    gpu_used, gpu_total = _gpu_memory(entry)
    plugins = entry.get("plugins")
    return [
        str(entry.get("name", "?")),
        str(entry.get("region") or "-"),
        Text(status, style=STATUS_STYLES.get(status, "")),
        _pct(_cpu(entry)),
        _pct(_mem(entry)),
        _pct(_gpu(entry)),
        f"{_bytes(gpu_used)}/{_bytes(gpu_total)}" if gpu_total else "-",
        _rate(_get(system, "net", "recv_bytes_per_s")),
        _rate(_get(system, "net", "sent_bytes_per_s")),
        ",".join(map(str, plugins)) if isinstance(plugins, list) and plugins else "-",
        _figures(_get(entry, "metrics", "plugins")) or "-",
        _age(entry.get("age_s")),
    ]


# --- readings ------------------------------------------------------------------------------------


def _get(data: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return None
    return float(value)


def _cpu(entry: dict[str, Any]) -> float | None:
    return _num(_get(entry, "metrics", "system", "cpu", "percent"))


def _mem(entry: dict[str, Any]) -> float | None:
    return _num(_get(entry, "metrics", "system", "memory", "percent"))


def _gpus(entry: dict[str, Any]) -> list[dict[str, Any]]:
    gpus = _get(entry, "metrics", "system", "gpus")
    return [g for g in gpus if isinstance(g, dict)] if isinstance(gpus, list) else []


def _gpu(entry: dict[str, Any]) -> float | None:
    """Mean utilisation over the agent's GPUs."""
    utils = [u for g in _gpus(entry) if (u := _num(g.get("utilization_percent"))) is not None]
    return sum(utils) / len(utils) if utils else None


def _gpu_memory(entry: dict[str, Any]) -> tuple[float, float]:
    used = total = 0.0
    for g in _gpus(entry):
        used += _num(g.get("memory_used_bytes")) or 0.0
        total += _num(g.get("memory_total_bytes")) or 0.0
    return used, total


def _status(entry: dict[str, Any]) -> float | None:
    return _SEVERITY.get(str(entry.get("status")), 4)  # unknown statuses sort first: look at them


def _age(entry_age: Any) -> str:
    age = _num(entry_age)
    if age is None:
        return "-"
    if age < 60:
        return f"{age:.1f}s"
    if age < 3600:
        return f"{int(age // 60)}m{int(age % 60):02d}s"
    return f"{int(age // 3600)}h{int(age % 3600 // 60):02d}m"


SORT_KEYS: dict[str, Callable[[dict[str, Any]], float | None]] = {
    "name": lambda e: None,
    "cpu": _cpu,
    "mem": _mem,
    "gpu": _gpu,
    "status": _status,
    "age": lambda e: _num(e.get("age_s")),
}


def _figures(plugins: Any) -> str:
    """A few well-known plugin figures, summed over label sets and plugins."""
    if not isinstance(plugins, dict):
        return ""
    found: dict[str, float] = {}
    for snapshot in plugins.values():
        if not isinstance(snapshot, dict):
            continue
        shown: set[str] = set()  # one figure per label per plugin (tokens_per_second beats tokens)
        for name, label in FIGURES:
            if label in shown:
                continue
            family = snapshot.get(name)
            if not isinstance(family, dict) and name == "requests":
                family = snapshot.get("requests_total")
            if not isinstance(family, dict) or not isinstance(family.get("series"), list):
                continue
            # A tokens counter shows its rate; other counters and gauges their value.
            field = "rate" if name == "tokens" and family.get("kind") == "counter" else "value"
            values = [_num(_get(s, field)) for s in family["series"]]
            if any(v is not None for v in values):
                shown.add(label)
                found[label] = found.get(label, 0.0) + sum(v for v in values if v is not None)
    return " ".join(f"{label} {_short(v)}" for label, v in list(found.items())[:MAX_FIGURES])


# --- formatting ----------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _short(value: float) -> str:
    if math.isinf(value):
        return str(value)
    if value == int(value) and abs(value) < 1e6:
        return str(int(value))
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.1f}{unit}"
    return f"{value:.3g}"


def _bytes(value: float) -> str:
    if abs(value) < 1024:
        return f"{value:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if abs(value) < 1024:
            return f"{value:.1f} {unit}"
    return f"{value / 1024:.1f} TiB"


def _rate(value: Any) -> str:
    number = _num(value)
    return "-" if number is None else f"{_bytes(number)}/s"
