"""Prometheus exposition of agents' metrics-feed messages, through ``prometheus_client``.

``FeedCollector`` turns feed messages keyed by agent name (the key is the ``agent`` label of
every series) into metric families at each scrape; ``exposition`` renders them in the format the
scrape's ``Accept`` header asks for (OpenMetrics 1.0, or text format 0.0.4 by default).

Names: system readings become gauges (byte totals counters) named ``atoll_*``; a plugin's metric
``name`` becomes ``atoll_<plugin>_<name>``, except names in OpenTelemetry's GenAI namespace
(``gen_ai_...``, the semantic conventions' names translated to Prometheus), which are exported as
they are so dashboards made for those conventions work. Counters are ``counter`` families whose
sample is ``..._total`` (the suffix added once), gauges ``gauge``, histograms ``histogram`` with
the feed's cumulative buckets (``+Inf`` is the count); a family named ``..._seconds`` or
``..._bytes`` carries that unit in OpenMetrics.

Feed messages arrive from other agents, so anything malformed is skipped, never raised; where two
sources want one family name with different types (or clashing sample names) the first wins, so
the caller lists the snapshot it trusts most (its own) first.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from atoll.agent.metrics import LABEL_NAME, METRIC_NAME, RESERVED_LABELS

GENAI_PREFIX = "gen_ai_"
Snapshots = Mapping[str, Any]

# (family, type, help, path into the feed message's "system" dict)
_SYSTEM: list[tuple[str, str, str, tuple[str, ...]]] = [
    ("atoll_cpus", "gauge", "Logical CPUs.", ("cpu", "count")),
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
        "atoll_network_transmit_bytes",
        "counter",
        "Bytes sent since boot, all interfaces.",
        ("net", "sent_bytes"),
    ),
    (
        "atoll_network_receive_bytes",
        "counter",
        "Bytes received since boot, all interfaces.",
        ("net", "recv_bytes"),
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
# The sample names a family of each type writes (OpenMetrics reserves _created for all three).
_SUFFIXES = {
    "gauge": ("",),
    "counter": ("", "_total", "_created"),
    "histogram": ("", "_bucket", "_sum", "_count", "_created"),
    "info": ("", "_info"),
}
_UNITS = ("seconds", "bytes")


def exposition(snapshots: Snapshots, accept: str | None = None) -> tuple[bytes, str]:
    """The exposition of ``snapshots`` (feed messages by agent) and its content type, in the
    format an ``Accept`` header asks for."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(FeedCollector(lambda: snapshots)), content_type


def prometheus_text(snapshots: Snapshots) -> str:
    """The text format 0.0.4 exposition of ``snapshots``."""
    return exposition(snapshots)[0].decode()


class FeedCollector(Collector):
    """A collector over feed messages, read from ``source`` at each ``collect``."""

    def __init__(self, source: Callable[[], Snapshots]) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        out = _Families()
        for agent, msg in self.source().items():
            if isinstance(msg, dict):
                _add_agent(out, str(agent), msg)
        yield from (m for m in out.families.values() if m.samples)


class _Families:
    """Families in first-seen order; a family refused when its type or sample names clash with
    one already there."""

    def __init__(self) -> None:
        self.families: dict[str, Metric] = {}
        self.owner: dict[str, str] = {}  # every sample name a family writes -> that family

    def get(self, name: str, kind: str, help: str) -> Metric | None:
        family = self.families.get(name)
        if family is not None:
            return family if family.type == kind else None
        names = {name + s for s in _SUFFIXES[kind]}
        if any(n in self.owner for n in names) or not METRIC_NAME.fullmatch(name):
            return None
        unit = next((u for u in _UNITS if name.endswith("_" + u)), "")
        family = self.families[name] = Metric(name, help, kind, unit)
        self.owner.update(dict.fromkeys(names, name))
        return family

    def add(self, name: str, kind: str, help: str, labels: dict[str, str], value: Any) -> None:
        """One sample of a gauge or counter family (a counter's family name without _total)."""
        number = _number(value)
        family = self.get(name, kind, help) if number is not None else None
        if family is None or number is None:
            return
        if kind == "counter":
            if not number >= 0:  # a count is never negative (nor NaN)
                return
            name += "_total"
        family.add_sample(name, labels, number)


def _add_agent(out: _Families, agent: str, msg: dict[str, Any]) -> None:
    base = {"agent": agent}
    out.add(
        "atoll_metrics_timestamp_seconds",
        "gauge",
        "When the agent built its last metrics message (epoch seconds).",
        base,
        msg.get("time"),
    )
    system = msg.get("system")
    if isinstance(system, dict):
        _add_system(out, base, system)
    plugins = msg.get("plugins")
    if isinstance(plugins, dict):
        for plugin, snapshot in plugins.items():
            if isinstance(snapshot, dict):
                _add_plugin(out, base, str(plugin), snapshot)


def _add_system(out: _Families, base: dict[str, str], system: dict[str, Any]) -> None:
    for family, kind, help, path in _SYSTEM:
        out.add(family, kind, help, base, _dig(system, path))
    skew_ms = _number(_dig(system, ("clock", "skew_ms")))
    if skew_ms is not None:  # seconds: Prometheus' base unit
        help = "This agent's clock minus its broker's, measured at the last handshake."
        out.add("atoll_clock_skew_seconds", "gauge", help, base, skew_ms / 1000)
    per_cpu = _dig(system, ("cpu", "per_cpu"))
    if isinstance(per_cpu, list):
        for i, v in enumerate(per_cpu):
            help = "Busy percent per logical CPU."
            out.add("atoll_cpu_percent", "gauge", help, {**base, "cpu": str(i)}, v)
    load = system.get("load")
    if isinstance(load, list):
        for period, value in zip(("1", "5", "15"), load, strict=False):
            out.add(f"atoll_load{period}", "gauge", f"{period}-minute load average.", base, value)
    disk = system.get("disk")
    if isinstance(disk, dict):
        labels = {**base, "path": str(disk.get("path", ""))}
        for family, help, key in _DISK:
            out.add(family, "gauge", help, labels, disk.get(key))
        for family, help, key in _DISK_IO:
            out.add(family, "gauge", help, base, disk.get(key))
    gpus = system.get("gpus")
    if isinstance(gpus, list):
        for i, gpu in enumerate(g for g in gpus if isinstance(g, dict)):
            labels = {**base, "gpu": str(gpu.get("index", i))}
            info = out.get("atoll_gpu", "info", "GPU model.") if "name" in gpu else None
            if info is not None:
                info.add_sample("atoll_gpu_info", {**labels, "name": str(gpu["name"])}, 1)
            for family, help, key in _GPU:
                out.add(family, "gauge", help, labels, gpu.get(key))


def _add_plugin(
    out: _Families, base: dict[str, str], plugin: str, snapshot: dict[str, Any]
) -> None:
    prefix = "atoll_" + re.sub(r"[^a-zA-Z0-9_]", "_", plugin) + "_"
    for name, family in snapshot.items():
        if not (isinstance(family, dict) and isinstance(name, str) and METRIC_NAME.fullmatch(name)):
            continue
        kind = family.get("kind")  # may be anything, unhashable included
        series = family.get("series")
        if kind not in ("counter", "gauge", "histogram") or not isinstance(series, list):
            continue
        full = name if name.startswith(GENAI_PREFIX) else prefix + name
        if kind == "counter":
            full = full.removesuffix("_total")
        help = str(family.get("help") or f"{plugin} plugin metric {name}.")
        for s in series:
            labels = s.get("labels") if isinstance(s, dict) else None
            if not isinstance(labels, dict) or not all(map(_plugin_label, labels)):
                continue
            labels = {**base, **{k: str(v) for k, v in labels.items()}}
            if kind == "histogram":
                _add_histogram(out, full, help, labels, s)
            else:
                out.add(full, kind, help, labels, s.get("value"))


def _add_histogram(
    out: _Families, name: str, help: str, labels: dict[str, str], series: dict[str, Any]
) -> None:
    count, total = _number(series.get("count")), _number(series.get("sum"))
    if count is None or total is None or not 0 <= count < math.inf:
        return
    family = out.get(name, "histogram", help)
    if family is None:
        return
    for bound, n in _buckets(series.get("buckets"), count):
        family.add_sample(name + "_bucket", {**labels, "le": repr(float(bound))}, n)
    family.add_sample(name + "_bucket", {**labels, "le": "+Inf"}, count)
    family.add_sample(name + "_count", labels, count)
    family.add_sample(name + "_sum", labels, total)


def _buckets(raw: Any, count: float) -> list[tuple[float, float]]:
    """The feed's ``[[bound, cumulative count], ...]`` if it is one a histogram can have
    (finite increasing bounds, counts never falling nor above ``count``); else none, so the
    series still has its sum, count and +Inf bucket."""
    if not isinstance(raw, list):
        return []
    out: list[tuple[float, float]] = []
    for pair in raw:
        if not (isinstance(pair, list | tuple) and len(pair) == 2):
            return []
        bound, n = _number(pair[0]), _number(pair[1])
        if bound is None or n is None or not math.isfinite(bound):
            return []
        if out and (bound <= out[-1][0] or n < out[-1][1]):
            return []
        if not 0 <= n <= count:
            return []
        out.append((bound, n))
    return out


def _plugin_label(name: Any) -> bool:
    return (
        isinstance(name, str)
        and bool(LABEL_NAME.fullmatch(name))
        and not name.startswith("__")
        and name not in RESERVED_LABELS
    )


def _number(value: Any) -> float | None:
    if not isinstance(value, int | float):  # bool is an int: True is 1
        return None
    try:
        return float(value)
    except OverflowError:  # an int past any float: no sample, rather than a failed scrape
        return None


def _dig(data: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data
