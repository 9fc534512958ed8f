"""The metrics feed library: registry, real psutil readings, Prometheus text, atoll top."""

from __future__ import annotations

import io
import json
import math
import socket
import sys
import threading
import types
from pathlib import Path
from typing import Any

import msgpack
import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from atoll.agent.host_metrics import SystemCollector
from atoll.agent.metrics import (
    FEED_VERSION,
    OTHER,
    BoundedLabel,
    MetricsRegistry,
    metrics_snapshot,
)
from atoll.agent.prometheus import exposition, prometheus_text
from atoll.agent.top import render_top


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# --- registry ------------------------------------------------------------------------------------


def test_same_metric_returned_and_kind_conflicts() -> None:
    reg = MetricsRegistry()
    c = reg.counter("requests", "Requests served.")
    assert reg.counter("requests") is c
    assert reg.counter("requests", labels={}) is c
    c.inc()
    c.inc(2)
    assert c.value == 3
    a = reg.gauge("depth", labels={"queue": "a"})
    b = reg.gauge("depth", labels={"queue": "b"})
    assert a is not b and reg.gauge("depth", labels={"queue": "a"}) is a

    with pytest.raises(ValueError, match="'requests' is already registered as a counter"):
        reg.gauge("requests")
    with pytest.raises(ValueError, match="already registered as a gauge, not a histogram"):
        reg.histogram("depth", labels={"queue": "a"})
    with pytest.raises(ValueError, match="has labels"):
        reg.gauge("depth", labels={"other": "x"})


@pytest.mark.parametrize("name", ["", "1abc", "a-b", "a b", "é", "a.b"])
def test_invalid_metric_names(name: str) -> None:
    with pytest.raises(ValueError, match="invalid metric name"):
        MetricsRegistry().counter(name)


@pytest.mark.parametrize("label", ["", "1a", "a-b", "__x", "a:b"])
def test_invalid_label_names(label: str) -> None:
    with pytest.raises(ValueError, match="invalid label name"):
        MetricsRegistry().counter("ok", labels={label: "v"})


def test_reserved_labels_and_bad_values() -> None:
    reg = MetricsRegistry()
    for name in ("agent", "le"):
        with pytest.raises(ValueError, match="reserved"):
            reg.gauge("g", labels={name: "x"})
    with pytest.raises(ValueError, match="must be a str"):
        reg.gauge("g", labels={"n": 1})  # type: ignore[dict-item]
    assert reg.counter("ok_name:sub", labels={"_x": 'anything "goes"\n'}).value == 0


def test_counter_only_goes_up() -> None:
    c = MetricsRegistry().counter("c")
    for bad in (-1, math.nan, math.inf):
        with pytest.raises(ValueError):
            c.inc(bad)
    assert c.value == 0


def test_gauge_set_inc_dec() -> None:
    g = MetricsRegistry().gauge("g")
    g.set(10)
    g.inc()
    g.dec(3)
    g.inc(0.5)
    assert g.value == 8.5


def test_counter_rate() -> None:
    clock = FakeClock(1000.5)
    c = MetricsRegistry(clock).counter("tokens")
    assert c.rate() == 0.0
    for _ in range(20):  # 10 tokens per second for 20 s
        clock.t += 1
        c.inc(10)
    # One-second buckets: a window's estimate is within one bucket of the truth.
    assert c.rate(10) == pytest.approx(10.0, rel=0.1)
    assert c.rate(5) == pytest.approx(10.0, rel=0.2)
    clock.t += 5  # 5 quiet seconds: half the 10 s window saw nothing
    assert c.rate(10) == pytest.approx(5.0, rel=0.15)
    clock.t += 100
    assert c.rate() == 0.0
    # A young counter divides by its age, not by the whole window.
    young = MetricsRegistry(FakeClock(50.0)).counter("y")
    young._clock.t = 52.0  # type: ignore[attr-defined]
    young.inc(4)
    assert young.rate(10) == pytest.approx(2.0)


def test_histogram_percentiles_on_known_data() -> None:
    h = MetricsRegistry().histogram("latency_s")
    assert h.percentile(0.5) is None
    for v in reversed(range(1, 101)):
        h.observe(v)
    assert (h.percentile(0.5), h.percentile(0.9), h.percentile(0.99)) == (50, 90, 99)
    assert h.percentile(1.0) == 100 and h.percentile(0.001) == 1
    s = h._series()
    assert s["count"] == 100 and s["sum"] == 5050 and s["window"] == 100
    assert (s["p50"], s["p90"], s["p99"], s["mean"]) == (50, 90, 99, 50.5)
    with pytest.raises(ValueError):
        h.observe(math.nan)
    with pytest.raises(ValueError):
        h.percentile(0)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=200), st.floats(0.01, 1.0))
def test_histogram_percentile_is_nearest_rank(values: list[float], q: float) -> None:
    h = MetricsRegistry().histogram("h")
    for v in values:
        h.observe(v)
    p = h.percentile(q)
    assert p is not None
    # Nearest rank: at least q of the data is <= p, and fewer than q is strictly below it.
    assert sum(v <= p for v in values) >= q * len(values) - 1e-9
    assert sum(v < p for v in values) < q * len(values) + 1e-9


def test_histogram_memory_is_bounded() -> None:
    h = MetricsRegistry().histogram("h", window=1024)
    for v in range(100_000):
        h.observe(v)
    assert len(h._recent) == 1024
    assert h.count == 100_000 and h.sum == sum(range(100_000))
    assert h.percentile(0.5) == 100_000 - 1024 + 511  # the window holds the last 1024 observations


def test_histogram_window_ages_out() -> None:
    clock = FakeClock()
    h = MetricsRegistry(clock).histogram("h", max_age_s=60)
    h.observe(1.0)
    clock.t += 30
    h.observe(3.0)
    assert h._series()["p50"] == 1.0
    clock.t += 31  # the first observation is now 61 s old
    assert h.window() == [3.0]
    clock.t += 60
    s = h._series()
    assert s["window"] == 0 and s["count"] == 2 and "p50" not in s and "mean" not in s


def test_histogram_buckets_are_cumulative_with_le_bounds() -> None:
    h = MetricsRegistry().histogram("h", buckets=(0.1, 1.0, 10.0))
    assert h.buckets() == [[0.1, 0], [1.0, 0], [10.0, 0]]
    for v in (0.05, 0.1, 0.5, 1.0, 2.0, 50.0, -3.0):  # a bound holds values equal to it (le)
        h.observe(v)
    assert h.buckets() == [[0.1, 3], [1.0, 5], [10.0, 6]]  # 50.0 is only in +Inf, the count
    s = h._series()
    assert s["buckets"] == h.buckets() and s["count"] == 7
    for bad in ((1.0, 0.5), (1.0, 1.0), (0.1, math.inf), (math.nan,)):
        with pytest.raises(ValueError, match="increasing"):
            MetricsRegistry().histogram("b", buckets=bad)


def test_bounded_label_folds_values_past_its_budget_into_other() -> None:
    bounded = BoundedLabel(3)
    seen = [bounded(f"adapter-{i}") for i in range(1000)]
    assert seen[:3] == ["adapter-0", "adapter-1", "adapter-2"]
    assert set(seen[3:]) == {OTHER}
    assert bounded("adapter-1") == "adapter-1"  # the first ones keep their series
    with pytest.raises(ValueError):
        BoundedLabel(0)


def test_counter_bucket_memory_is_bounded() -> None:
    clock = FakeClock()
    c = MetricsRegistry(clock).counter("c")
    for _ in range(10_000):
        clock.t += 0.5
        c.inc()
    assert len(c._buckets) <= 62


# --- system collector ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def collector() -> SystemCollector:
    return SystemCollector(Path(__file__).parent)


def test_system_collect_matches_psutil(collector: SystemCollector, tmp_path: Path) -> None:
    data = collector.collect()
    assert data["memory"]["total_bytes"] == psutil.virtual_memory().total
    assert data["swap"]["total_bytes"] == psutil.swap_memory().total
    assert data["cpu"]["count"] == psutil.cpu_count() == len(data["cpu"]["per_cpu"])
    assert all(0 <= p <= 100 for p in [*data["cpu"]["per_cpu"], data["cpu"]["percent"]])
    assert 0 <= data["memory"]["percent"] <= 100
    assert data["disk"]["total_bytes"] == psutil.disk_usage(str(Path(__file__).parent)).total
    assert len(data["load"]) == 3 and all(x >= 0 for x in data["load"])
    assert data["net"]["sent_bytes"] >= 0 and data["net"]["recv_bytes"] >= 0
    assert isinstance(data["gpus"], list)
    # A data dir that does not exist yet reports the filesystem it will live on.
    later = SystemCollector(tmp_path / "not" / "yet", gpus=False).collect()
    assert later["disk"]["path"] == str(tmp_path)
    assert later["disk"]["total_bytes"] == psutil.disk_usage(str(tmp_path)).total


def test_first_collect_does_not_block() -> None:
    import time

    start = time.perf_counter()
    data = SystemCollector(gpus=False).collect()
    assert time.perf_counter() - start < 0.5
    assert data["interval_s"] > 0


def _loopback_transfer(nbytes: int) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    received = 0

    def sink() -> None:
        nonlocal received
        conn, _ = server.accept()
        with conn:
            while chunk := conn.recv(1 << 16):
                received += len(chunk)

    thread = threading.Thread(target=sink)
    thread.start()
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.sendall(b"x" * nbytes)
    thread.join(5)
    server.close()
    assert received == nbytes


def test_network_rates_rise_with_loopback_traffic(collector: SystemCollector) -> None:
    baseline = collector.collect()["net"]
    assert baseline["sent_bytes_per_s"] >= 0 and baseline["recv_bytes_per_s"] >= 0
    payload = 8 << 20
    _loopback_transfer(payload)
    data = collector.collect()
    net, interval = data["net"], data["interval_s"]
    assert net["sent_bytes_per_s"] * interval >= payload * 0.99
    assert net["recv_bytes_per_s"] * interval >= payload * 0.99
    assert net["sent_bytes"] - baseline["sent_bytes"] >= payload
    if "read_bytes_per_s" in data["disk"]:
        assert data["disk"]["read_bytes_per_s"] >= 0 and data["disk"]["write_bytes_per_s"] >= 0


def test_cpu_percent_is_high_while_busy() -> None:
    import time

    collector = SystemCollector(gpus=False)
    end = time.perf_counter() + 0.3
    while time.perf_counter() < end:  # one core busy
        pass
    data = collector.collect()
    assert max(data["cpu"]["per_cpu"]) > 30 or data["cpu"]["percent"] > 100 / psutil.cpu_count() / 2


class _FakeNvmlError(Exception):
    pass


class FakePynvml(types.ModuleType):
    """The slice of ``pynvml`` the collector uses: GPU 1 has no power reading, as on some cards."""

    NVML_TEMPERATURE_GPU = 0

    def __init__(self, *, gpus: int = 2, fail_init: bool = False) -> None:
        super().__init__("pynvml")
        self.gpus = gpus
        self.fail_init = fail_init
        self.shutdowns = 0

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise _FakeNvmlError("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return self.gpus

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, h: int) -> bytes | str:
        return b"NVIDIA H100" if h == 0 else "NVIDIA L4"  # old pynvml returns bytes

    def nvmlDeviceGetUtilizationRates(self, h: int) -> types.SimpleNamespace:
        return types.SimpleNamespace(gpu=87 - h, memory=5)

    def nvmlDeviceGetMemoryInfo(self, h: int) -> types.SimpleNamespace:
        return types.SimpleNamespace(used=10 << 30, total=80 << 30, free=70 << 30)

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        return 61

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        if h == 1:
            raise _FakeNvmlError("Not Supported")
        return 402_500  # milliwatts


def test_gpu_metrics_through_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    nv = FakePynvml()
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    collector = SystemCollector()
    gpus = collector.collect()["gpus"]
    assert gpus[0] == {
        "index": 0,
        "name": "NVIDIA H100",
        "utilization_percent": 87.0,
        "memory_used_bytes": 10 << 30,
        "memory_total_bytes": 80 << 30,
        "temperature_c": 61.0,
        "power_w": 402.5,
    }
    assert gpus[1]["name"] == "NVIDIA L4" and "power_w" not in gpus[1]  # unsupported: left out
    collector.close()
    assert nv.shutdowns == 1


def test_no_gpu_means_no_gpu_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakePynvml(fail_init=True))
    assert SystemCollector().collect()["gpus"] == []
    monkeypatch.setitem(sys.modules, "pynvml", FakePynvml(gpus=0))
    assert SystemCollector().collect()["gpus"] == []
    monkeypatch.setitem(sys.modules, "pynvml", None)  # the module is not installed
    assert SystemCollector().collect()["gpus"] == []


# --- feed message --------------------------------------------------------------------------------


def _plugin_registry() -> MetricsRegistry:
    reg = MetricsRegistry()
    reg.counter("requests", "Requests served.", {"adapter": "a1"}).inc(40)
    reg.counter("requests", labels={"adapter": 'we"ird\nname\\x'}).inc(2)
    reg.gauge("queue_depth", "Requests waiting.").set(3)
    reg.counter("tokens").inc(500)
    h = reg.histogram("latency_s", "Request latency.", buckets=(0.1, 0.5, 1.0))
    for v in range(1, 101):
        h.observe(v / 100)
    reg.histogram("idle_s")  # nothing observed yet
    return reg


def _feed(agent: str = "gpu-1") -> dict[str, Any]:
    system = SystemCollector(gpus=False).collect()
    system["gpus"] = [
        {"index": 0, "name": "NVIDIA H100", "utilization_percent": 87.0, "memory_used_bytes": 1024,
         "memory_total_bytes": 4096, "temperature_c": 61.0, "power_w": 402.5},
    ]  # fmt: skip
    return metrics_snapshot(
        agent=agent, system=system, plugins={"inference": _plugin_registry()}, now=1700000000.5
    )


def _only_plain_types(value: Any) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _only_plain_types(v) for k, v in value.items())
    if isinstance(value, list):
        return all(map(_only_plain_types, value))
    return isinstance(value, str | int | float) and not isinstance(value, bool)


def test_feed_message_shape_and_serialisation() -> None:
    msg = _feed()
    assert msg["v"] == FEED_VERSION and msg["agent"] == "gpu-1" and msg["time"] == 1700000000.5
    assert set(msg) == {"v", "agent", "time", "system", "plugins"}
    assert set(msg["system"]) == {
        "interval_s",
        "cpu",
        "load",
        "memory",
        "swap",
        "disk",
        "net",
        "gpus",
    }
    inference = msg["plugins"]["inference"]
    assert inference["requests"]["kind"] == "counter"
    first = inference["requests"]["series"][0]
    assert first == {"labels": {"adapter": "a1"}, "value": 40, "rate": first["rate"]}
    assert first["rate"] > 0
    assert inference["latency_s"]["series"][0]["p99"] == 0.99
    assert _only_plain_types(msg)
    assert msgpack.unpackb(msgpack.packb(msg)) == msg
    assert json.loads(json.dumps(msg, allow_nan=False)) == msg
    # Snapshots already taken pass through untouched.
    again = metrics_snapshot(agent="a", system={}, plugins={"inference": inference})
    assert again["plugins"]["inference"] is inference and again["time"] > 1.7e9


# --- Prometheus ----------------------------------------------------------------------------------


def _parse(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _samples(family: Any, name: str | None = None) -> list[Any]:
    return [s for s in family.samples if name is None or s.name == name]


def test_prometheus_text_parses_and_carries_values() -> None:
    gpu1, cpu1 = _feed("gpu-1"), _feed("cpu-1")
    cpu1["system"]["gpus"] = []
    text = prometheus_text({"gpu-1": gpu1, "cpu-1": cpu1})
    families = _parse(text)

    # One HELP/TYPE per family, even with two agents.
    assert text.count("# TYPE atoll_cpu_percent gauge") == 1
    assert text.count("# HELP atoll_memory_used_bytes ") == 1
    assert text.endswith("\n")

    per_cpu = _samples(families["atoll_cpu_percent"])
    assert len(per_cpu) == 2 * psutil.cpu_count()
    first = next(s for s in per_cpu if s.labels == {"agent": "gpu-1", "cpu": "0"})
    assert first.value == gpu1["system"]["cpu"]["per_cpu"][0]

    mem = {s.labels["agent"]: s.value for s in _samples(families["atoll_memory_total_bytes"])}
    assert mem == {"gpu-1": psutil.virtual_memory().total, "cpu-1": psutil.virtual_memory().total}
    assert families["atoll_network_receive_bytes_per_second"].type == "gauge"
    assert families["atoll_network_receive_bytes"].type == "counter"
    assert "# TYPE atoll_network_receive_bytes_total counter" in text
    assert {s.labels["agent"] for s in _samples(families["atoll_load1"])} == {"gpu-1", "cpu-1"}
    disk = _samples(families["atoll_disk_total_bytes"])[0]
    assert disk.labels["path"] == gpu1["system"]["disk"]["path"]
    if "read_bytes_per_s" in gpu1["system"]["disk"]:
        reads = _samples(families["atoll_disk_read_bytes_per_second"])
        assert {s.labels["agent"] for s in reads} == {"gpu-1", "cpu-1"} and "path" not in reads[
            0
        ].labels

    gpu = _samples(families["atoll_gpu_utilization_percent"])
    assert [(s.labels, s.value) for s in gpu] == [({"agent": "gpu-1", "gpu": "0"}, 87.0)]
    assert _samples(families["atoll_gpu_power_watts"])[0].value == 402.5
    assert _samples(families["atoll_gpu_info"])[0].labels["name"] == "NVIDIA H100"
    assert _samples(families["atoll_metrics_timestamp_seconds"])[0].value == 1700000000.5
    assert _samples(families["atoll_cpus"])[0].value == psutil.cpu_count()


def test_prometheus_clock_skew_in_seconds() -> None:
    msg = metrics_snapshot(
        agent="a", system={"clock": {"skew_ms": -250, "broker": "b"}}, plugins={}
    )
    skew = _parse(prometheus_text({"a": msg}))["atoll_clock_skew_seconds"]
    assert [(s.labels, s.value) for s in skew.samples] == [({"agent": "a"}, -0.25)]


def test_prometheus_plugin_metrics() -> None:
    families = _parse(prometheus_text({"gpu-1": _feed()}))

    requests = families["atoll_inference_requests"]
    assert requests.type == "counter" and requests.documentation == "Requests served."
    totals = {
        s.labels["adapter"]: s.value for s in _samples(requests, "atoll_inference_requests_total")
    }
    # The label value with a quote, a newline and a backslash survives escaping.
    assert totals == {"a1": 40, 'we"ird\nname\\x': 2}

    assert _samples(families["atoll_inference_queue_depth"])[0].value == 3
    assert families["atoll_inference_queue_depth"].type == "gauge"

    latency = families["atoll_inference_latency_s"]
    assert latency.type == "histogram"
    buckets = {
        s.labels["le"]: s.value for s in _samples(latency, "atoll_inference_latency_s_bucket")
    }
    assert buckets == {"0.1": 10, "0.5": 50, "1.0": 100, "+Inf": 100}  # 0.01 .. 1.00
    assert _samples(latency, "atoll_inference_latency_s_count")[0].value == 100
    assert _samples(latency, "atoll_inference_latency_s_sum")[0].value == pytest.approx(50.5)
    idle = families["atoll_inference_idle_s"]  # nothing observed: zero buckets, count and sum
    assert {s.value for s in idle.samples} == {0}
    assert len(_samples(idle, "atoll_inference_idle_s_bucket")) == 12  # the 11 defaults + Inf


def test_openmetrics_when_the_scrape_asks_for_it() -> None:
    feeds = {"gpu-1": _feed()}
    body, content_type = exposition(feeds, "application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    text = body.decode()
    assert text.endswith("# EOF\n") and "# TYPE atoll_inference_requests counter" in text
    families = {f.name: f for f in openmetrics_families(text)}
    assert families["atoll_inference_latency_s"].type == "histogram"
    assert families["atoll_gpu"].type == "info"
    assert families["atoll_network_receive_bytes"].type == "counter"
    assert families["atoll_memory_total_bytes"].unit == "bytes"
    body, content_type = exposition(feeds, None)
    assert content_type.startswith("text/plain; version=0.0.4") and b"# EOF" not in body


def test_histograms_from_older_or_odd_feeds() -> None:
    """A histogram without buckets (an agent older than them) or with buckets no histogram can
    have keeps its count, sum and +Inf bucket; its finite buckets are left out."""
    series = {"labels": {}, "count": 4, "sum": 2.0}
    odd = [
        [[1.0, 3], [0.5, 4]],  # bounds not increasing
        [[0.5, 3], [1.0, 2]],  # counts falling
        [[0.5, 9]],  # more than the count
        [["x", 1]],
        [[math.inf, 4]],
        "junk",
    ]
    plugins = {f"h{i}": {"kind": "histogram", "series": [{**series, "buckets": b}]}
               for i, b in enumerate([None, *odd])}  # fmt: skip
    families = _parse(prometheus_text({"a": {"plugins": {"p": plugins}}}))
    for i in range(len(odd) + 1):
        buckets = _samples(families[f"atoll_p_h{i}"], f"atoll_p_h{i}_bucket")
        assert [(s.labels["le"], s.value) for s in buckets] == [("+Inf", 4)]


def test_prometheus_escaping_of_agent_and_help() -> None:
    reg = MetricsRegistry()
    reg.gauge("g", 'help with \\ and\nnewline and "quotes"').set(math.nan)
    reg.gauge("h").set(-math.inf)
    reg.counter("jobs_total").inc()  # the _total suffix is not doubled
    agent = 'odd "agent"\\\nname'
    text = prometheus_text(
        {agent: metrics_snapshot(agent=agent, system={}, plugins={"my-plugin": reg})}
    )
    families = _parse(text)
    g = families["atoll_my_plugin_g"]
    assert g.documentation == 'help with \\ and\nnewline and "quotes"'
    assert g.samples[0].labels == {"agent": agent} and math.isnan(g.samples[0].value)
    assert families["atoll_my_plugin_h"].samples[0].value == -math.inf
    assert families["atoll_my_plugin_jobs"].samples[0].name == "atoll_my_plugin_jobs_total"
    assert "# TYPE atoll_my_plugin_jobs_total counter" in text


@settings(max_examples=50, deadline=None)
@given(st.text(max_size=30))
def test_prometheus_label_values_round_trip(value: str) -> None:
    reg = MetricsRegistry()
    reg.gauge("g", labels={"v": value}).set(1)
    text = prometheus_text({"a": metrics_snapshot(agent="a", system={}, plugins={"p": reg})})
    family = _parse(text)["atoll_p_g"]
    assert family.samples[0].labels == {"agent": "a", "v": value}


def test_prometheus_skips_malformed_and_conflicting_input() -> None:
    reg = MetricsRegistry()
    reg.gauge("x_total").set(5)  # would clash with the counter family "x" below
    other = MetricsRegistry()
    other.counter("x").inc()
    other.gauge("y").set(1)
    snapshots: dict[str, Any] = {
        "a": metrics_snapshot(agent="a", system={}, plugins={"p": other}),
        "b": metrics_snapshot(agent="b", system={}, plugins={"p": reg}),
        "c": {"system": {"cpu": "garbage", "memory": {"total_bytes": "many"}, "gpus": [1, None]},
              "plugins": {"p": {"y": {"kind": "counter", "series": []},      # kind clash: dropped
                                "bad name": {"kind": "gauge", "series": []},
                                "z": {"kind": "weird", "series": [{"labels": {}, "value": 1}]},
                                "w": {"kind": "gauge", "series": [
                                    {"labels": {"agent": "spoof"}, "value": 1},
                                    {"labels": {}, "value": 10**400},
                                    {"labels": {}, "value": "NaN?"}, "junk"]}}}},
        "d": "not a dict",
    }  # fmt: skip
    families = _parse(prometheus_text(snapshots))
    assert set(families) == {"atoll_metrics_timestamp_seconds", "atoll_p_x", "atoll_p_y"}
    assert [s.labels["agent"] for s in families["atoll_p_x"].samples] == ["a"]
    assert families["atoll_p_y"].type == "gauge"
    assert prometheus_text({}) == ""


# --- atoll top -----------------------------------------------------------------------------------


def _entry(
    name: str, status: str, age: float, cpu: float | None, mem: float, gpu: float | None
) -> dict[str, Any]:
    reg = MetricsRegistry()
    reg.counter("requests", labels={"adapter": "a"}).inc(7)
    reg.counter("requests", labels={"adapter": "b"}).inc(5)
    reg.gauge("queue_depth").set(2)
    reg.gauge("tokens_per_second").set(35.5)
    system: dict[str, Any] = {
        "cpu": {"percent": cpu, "per_cpu": []},
        "memory": {"percent": mem},
        "net": {"recv_bytes_per_s": 1536.0, "sent_bytes_per_s": 3 * 1024 * 1024},
        "gpus": [] if gpu is None else [
            {"utilization_percent": gpu, "memory_used_bytes": 8 << 30,
             "memory_total_bytes": 80 << 30},
        ],
    }  # fmt: skip
    if cpu is None:
        del system["cpu"]
    return {
        "name": name,
        "region": "eu-west",
        "status": status,
        "plugins": ["system", "inference"],
        "age_s": age,
        "metrics": metrics_snapshot(agent=name, system=system, plugins={"inference": reg}),
    }


ENTRIES = [
    _entry("bravo", "ACTIVE", 2.0, 50.0, 20.0, 10.0),
    _entry("alpha", "STALE", 30.0, 10.0, 80.0, None),
    _entry("delta", "ACTIVE", 1.0, None, 40.0, 95.0),
    _entry("charlie", "LOST", 4000.0, 90.0, 10.0, 50.0),
]


def _text(table: Any) -> str:
    console = Console(record=True, width=200, file=io.StringIO())  # recorded, not printed
    console.print(table)
    return console.export_text()


def _order(text: str) -> list[str]:
    names = ["alpha", "bravo", "charlie", "delta"]
    return sorted(names, key=text.index)


@pytest.mark.parametrize(
    ("sort_by", "expected"),
    [
        ("name", ["alpha", "bravo", "charlie", "delta"]),
        ("cpu", ["charlie", "bravo", "alpha", "delta"]),  # delta has no reading: last
        ("mem", ["alpha", "delta", "bravo", "charlie"]),
        ("gpu", ["delta", "charlie", "bravo", "alpha"]),
        ("status", ["charlie", "alpha", "bravo", "delta"]),  # worst first, ties by name
        ("age", ["charlie", "alpha", "bravo", "delta"]),
    ],
)
def test_render_top_sort_orders(sort_by: str, expected: list[str]) -> None:
    assert _order(_text(render_top(ENTRIES, sort_by))) == expected


def test_render_top_cells() -> None:
    text = _text(render_top([*ENTRIES, {"name": "echo", "status": "LOST", "metrics": None}]))
    bravo = next(line for line in text.splitlines() if "bravo" in line)
    cells = ["eu-west", "ACTIVE", "50.0", "20.0", "10.0", "8.0 GiB/80.0 GiB", "1.5 KiB/s"]
    cells += ["3.0 MiB/s", "system,inference", "req 12", "queue 2", "tok/s 35.5", "2.0s"]
    for cell in cells:
        assert cell in bravo, cell
    echo = next(line for line in text.splitlines() if "echo" in line)
    assert echo.count("-") >= 8  # no metrics: dashes, not errors
    assert "1h06m" in text  # charlie's heartbeat age


def test_render_top_unknown_sort_key() -> None:
    with pytest.raises(ValueError, match="valid: name, cpu, mem, gpu, status, age"):
        render_top(ENTRIES, "ram")
