"""Prometheus text exposition (format 0.0.4) of agents' metrics-feed messages.

System readings become gauges (and byte totals counters) named ``atoll_*`` with an ``agent``
label; a plugin's metric ``name`` becomes the family ``atoll_<plugin>_<name>``: counters as
``counter`` named ``..._total`` (the suffix added once), gauges as ``gauge``, histograms as
``summary`` (window quantiles 0.5/0.9/0.99 plus cumulative ``_sum`` and ``_count``).

Feed messages arrive from other agents, so anything malformed is skipped, never raised; where two
sources want one family name with different types (or clashing sample names) the first wins.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from atoll.agent.metrics import LABEL_NAME, METRIC_NAME, QUANTILES, RESERVED_LABELS

# (family, type, help, path into the feed message's "system" dict)
_SYSTEM: list[tuple[str, str, str, tuple[str, ...]]] = [
    ("atoll_cpu_count", "gauge", "Logical CPUs.", ("cpu", "count")),
    ("atoll_cpu_usage_percent", "gauge", "CPU busy percent over all cores.", ("cpu", "percent")),
    ("atoll_memory_total_bytes", "gauge", "Physical memory.", ("memory", "total_bytes")),
    ("atoll_memory_used_bytes", "gauge", "Memory in use.", ("memory", "used_bytes")),
    ("atoll_memory_available_bytes", "gauge", "Memory available.", ("memory", "available_bytes")),
    ("atoll_memory_percent", "gauge", "Memory in use, percent.", ("memory", "percent")),
    ("atoll_swap_total_bytes", "gauge", "Swap space.", ("swap", "total_bytes")),
    ("atoll_swap_used_bytes", "gauge", "Swap in use.", ("swap", "used_bytes")),
    ("atoll_swap_percent", "gauge", "Swap in use, percent.", ("swap", "percent")),
    (
        "atoll_network_transmit_bytes_per_second",
        "gauge",
        "Bytes sent per second, all interfaces.",
        ("net", "sent_bytes_per_s"),
    ),
    (
        "atoll_network_receive_bytes_per_second",
        "gauge",
        "Bytes received per second, all interfaces.",
        ("net", "recv_bytes_per_s"),
    ),
    (
        "atoll_network_transmit_bytes_total",
        "counter",
        "Bytes sent since boot, all interfaces.",
        ("net", "sent_bytes"),
    ),
    (
        "atoll_network_receive_bytes_total",
        "counter",
        "Bytes received since boot, all interfaces.",
        ("net", "recv_bytes"),
    ),
    (
        "atoll_clock_skew_milliseconds",
        "gauge",
        "This agent's clock minus its broker's, measured at the last handshake.",
        ("clock", "skew_ms"),
    ),
]
_DISK: list[tuple[str, str, str]] = [  # labelled with the data dir's path
    ("atoll_disk_total_bytes", "Size of the data dir's filesystem.", "total_bytes"),
    ("atoll_disk_used_bytes", "Used space on the data dir's filesystem.", "used_bytes"),
    ("atoll_disk_free_bytes", "Free space on the data dir's filesystem.", "free_bytes"),
    ("atoll_disk_percent", "Used space on the data dir's filesystem, percent.", "percent"),
]
_DISK_IO: list[tuple[str, str, str]] = [  # all disks, so no path label
    ("atoll_disk_read_bytes_per_second", "Bytes read per second, all disks.", "read_bytes_per_s"),
    (
        "atoll_disk_write_bytes_per_second",
        "Bytes written per second, all disks.",
        "write_bytes_per_s",
    ),
]
_GPU: list[tuple[str, str, str]] = [
    ("atoll_gpu_utilization_percent", "GPU busy percent.", "utilization_percent"),
    ("atoll_gpu_memory_used_bytes", "GPU memory in use.", "memory_used_bytes"),
    ("atoll_gpu_memory_total_bytes", "GPU memory.", "memory_total_bytes"),
    ("atoll_gpu_temperature_celsius", "GPU temperature.", "temperature_c"),
    ("atoll_gpu_power_watts", "GPU power draw.", "power_w"),
]
_PLUGIN_TYPES = {"counter": "counter", "gauge": "gauge", "histogram": "summary"}


def prometheus_text(snapshots: Mapping[str, dict[str, Any]]) -> str:
    """The exposition of feed messages keyed by agent name (the key is the ``agent`` label)."""
    out = _Exposition()
    for agent, msg in snapshots.items():
        if isinstance(msg, dict):
            _add_agent(out, str(agent), msg)
    return out.render()


def _add_agent(out: _Exposition, agent: str, msg: dict[str, Any]) -> None:
    base = {"agent": agent}
    if _number(msg.get("time")) is not None:
        out.add(
            "atoll_metrics_timestamp_seconds",
            "gauge",
            "When the agent built its last metrics message (epoch seconds).",
            [("", base, msg["time"])],
        )
    system = msg.get("system")
    if isinstance(system, dict):
        _add_system(out, base, system)
    plugins = msg.get("plugins")
    if isinstance(plugins, dict):
        for plugin, snapshot in plugins.items():
            if isinstance(snapshot, dict):
                _add_plugin(out, base, str(plugin), snapshot)


def _add_system(out: _Exposition, base: dict[str, str], system: dict[str, Any]) -> None:
    for family, kind, help, path in _SYSTEM:
        value = _dig(system, path)
        if value is not None:
            out.add(family, kind, help, [("", base, value)])
    per_cpu = _dig(system, ("cpu", "per_cpu"))
    if isinstance(per_cpu, list):
        samples = [("", {**base, "cpu": str(i)}, v) for i, v in enumerate(per_cpu)]
        out.add("atoll_cpu_percent", "gauge", "Busy percent per logical CPU.", samples)
    load = system.get("load")
    if isinstance(load, list):
        for period, value in zip(("1", "5", "15"), load, strict=False):
            out.add(
                f"atoll_load{period}",
                "gauge",
                f"{period}-minute load average.",
                [("", base, value)],
            )
    disk = system.get("disk")
    if isinstance(disk, dict):
        labels = {**base, "path": str(disk.get("path", ""))}
        for family, help, key in _DISK:
            if key in disk:
                out.add(family, "gauge", help, [("", labels, disk[key])])
        for family, help, key in _DISK_IO:
            if key in disk:
                out.add(family, "gauge", help, [("", base, disk[key])])
    gpus = system.get("gpus")
    if isinstance(gpus, list):
        for i, gpu in enumerate(g for g in gpus if isinstance(g, dict)):
            labels = {**base, "gpu": str(gpu.get("index", i))}
            if "name" in gpu:
                info = {**labels, "name": str(gpu["name"])}
                out.add(
                    "atoll_gpu_info", "gauge", "GPU model (value is always 1).", [("", info, 1)]
                )
            for family, help, key in _GPU:
                if key in gpu:
                    out.add(family, "gauge", help, [("", labels, gpu[key])])


def _add_plugin(
    out: _Exposition, base: dict[str, str], plugin: str, snapshot: dict[str, Any]
) -> None:
    prefix = "atoll_" + re.sub(r"[^a-zA-Z0-9_]", "_", plugin) + "_"
    for name, family in snapshot.items():
        if not (isinstance(family, dict) and isinstance(name, str) and METRIC_NAME.fullmatch(name)):
            continue
        kind_name = family.get("kind")  # may be anything, unhashable included
        kind = _PLUGIN_TYPES.get(kind_name) if isinstance(kind_name, str) else None
        series = family.get("series")
        if kind is None or not isinstance(series, list):
            continue
        # Format 0.0.4 names a counter's family after its sample, ``..._total`` included.
        fname = prefix + (name.removesuffix("_total") + "_total" if kind == "counter" else name)
        help = str(family.get("help") or f"{plugin} plugin metric {name}.")
        samples: list[tuple[str, dict[str, str], Any]] = []
        for s in series:
            labels = s.get("labels") if isinstance(s, dict) else None
            if not isinstance(labels, dict) or not all(map(_plugin_label, labels)):
                continue
            labels = {**base, **{k: str(v) for k, v in labels.items()}}
            if kind in ("counter", "gauge"):
                samples.append(("", labels, s.get("value")))
            else:
                for q, key in QUANTILES:
                    if key in s:
                        samples.append(("", {**labels, "quantile": str(q)}, s[key]))
                samples.append(("_sum", labels, s.get("sum")))
                samples.append(("_count", labels, s.get("count")))
        out.add(fname, kind, help, samples)


def _plugin_label(name: Any) -> bool:
    return (
        isinstance(name, str)
        and bool(LABEL_NAME.fullmatch(name))
        and not name.startswith("__")
        and name not in RESERVED_LABELS
    )


@dataclass
class _Family:
    kind: str
    help: str
    lines: list[str] = field(default_factory=list)


class _Exposition:
    """Families in first-seen order, each with its samples grouped under one HELP/TYPE."""

    def __init__(self) -> None:
        self.families: dict[str, _Family] = {}
        self.owner: dict[str, str] = {}  # every name a family's samples use -> that family

    def add(
        self,
        name: str,
        kind: str,
        help: str,
        samples: Iterable[tuple[str, dict[str, str], Any]],
    ) -> None:
        family = self.families.get(name)
        if family is None:
            names = {name, name.removesuffix("_total")}  # OpenMetrics readers drop _total
            if kind == "summary":
                names |= {name + "_sum", name + "_count"}
            if any(n in self.owner for n in names):
                return  # e.g. a plugin gauge "x_total" next to a counter "x"
            family = self.families[name] = _Family(kind, help)
            self.owner.update(dict.fromkeys(names, name))
        elif family.kind != kind:
            return
        for suffix, labels, value in samples:
            text = _format_value(value)
            if text is not None:
                family.lines.append(f"{name}{suffix}{_format_labels(labels)} {text}")

    def render(self) -> str:
        lines = []
        for name, family in self.families.items():
            if not family.lines:
                continue
            lines.append(f"# HELP {name} {_escape_help(family.help)}")
            lines.append(f"# TYPE {name} {family.kind}")
            lines.extend(family.lines)
        return "\n".join(lines) + "\n" if lines else ""


def _format_labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{escape_label_value(v)}"' for k, v in labels.items()) + "}"


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _format_value(value: Any) -> str | None:
    number = _number(value)
    if number is None:
        return None
    if isinstance(number, int):
        return str(number)
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "+Inf" if number > 0 else "-Inf"
    return repr(number)


def _number(value: Any) -> int | float | None:
    if isinstance(value, bool):
        return int(value)
    return value if isinstance(value, int | float) else None


def _dig(data: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data
