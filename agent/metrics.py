"""Metrics for the live resource feed: a registry plugins write to, and the feed message.

Pure library code: nothing here touches the overlay. The agent builds one feed message with
``metrics_snapshot`` every few seconds and publishes it on ``metrics.<agent>``.

Feed message (only str/int/float/list/dict, so msgpack and JSON both carry it)::

    {
      "v": 1,                              # FEED_VERSION
      "agent": "gpu-1",
      "time": 1712345678.25,               # epoch seconds when the message was built
      "system": {                          # host_metrics.SystemCollector.collect()
        "interval_s": 5.0,                 # seconds the rates below were measured over
        "cpu": {"count": 16, "percent": 12.5, "per_cpu": [10.0, 15.0, ...]},
        "load": [0.5, 0.4, 0.3],           # 1, 5, 15 minute load average
        "memory": {"total_bytes": ..., "used_bytes": ..., "available_bytes": ...,
                   "percent": 41.0},
        "swap": {"total_bytes": ..., "used_bytes": ..., "percent": 0.0},
        "disk": {"path": "/var/lib/atoll", "total_bytes": ..., "used_bytes": ...,
                 "free_bytes": ..., "percent": 63.1,
                 "read_bytes_per_s": 0.0, "write_bytes_per_s": 4096.0},
        "net": {"sent_bytes": ..., "recv_bytes": ...,             # totals since boot
                "sent_bytes_per_s": 1200.0, "recv_bytes_per_s": 800.0},
        "gpus": [{"index": 0, "name": "NVIDIA H100", "utilization_percent": 87.0,
                  "memory_used_bytes": ..., "memory_total_bytes": ...,
                  "temperature_c": 61.0, "power_w": 402.5}],
        "clock": {"skew_ms": 12, "broker": "campus-a"},  # vs its broker, at the handshake
      },
      "plugins": {                         # plugin name -> MetricsRegistry.snapshot()
        "inference": {
          "requests": {"kind": "counter", "help": "...", "series": [
              {"labels": {"adapter": "a1"}, "value": 42, "rate": 1.5}]},   # rate: per second
          "queue_depth": {"kind": "gauge", "help": "", "series": [
              {"labels": {}, "value": 3}]},
          "latency_s": {"kind": "histogram", "help": "", "series": [
              {"labels": {}, "count": 1000, "sum": 52.1,                   # cumulative
               "buckets": [[0.01, 12], [0.05, 700], [0.1, 950]],          # cumulative
               "window": 1000, "mean": 0.05, "p50": 0.04, "p90": 0.09, "p99": 0.2}]},
        },
      },
    }

A section or field the host cannot read (no disk I/O counters in a container, no GPU, a GPU
without power readings) is left out rather than faked; ``gpus`` is then ``[]``. Histogram
``mean``/``p50``/``p90``/``p99`` describe the recent window (the last 1024 observations no older
than 60 s) and are absent while that window is empty: they are for a glance (``atoll top``, the
web UI). ``buckets`` are what Prometheus aggregates: ``[upper bound, observations <= bound]``
pairs since the start, bounds increasing, the ``+Inf`` bucket left out (it is ``count``; strict
JSON has no infinity). Gauge values may be NaN or infinite (a diverging training loss is worth
showing); msgpack carries those, strict JSON does not.

``buckets`` was added to version 1 (nothing else changed meaning, so ``v`` stays 1): readers take
a histogram without it, from an older agent, as one with only the ``+Inf`` bucket.
"""

from __future__ import annotations

import bisect
import itertools
import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

FEED_VERSION = 1
METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
# The Prometheus exporter adds ``agent`` to every series and ``le`` to histogram buckets.
RESERVED_LABELS = frozenset({"agent", "le"})
QUANTILES = ((0.5, "p50"), (0.9, "p90"), (0.99, "p99"))
OTHER = "other"  # what label values past a BoundedLabel's budget become

# Histogram bucket upper bounds (seconds unless said): the GenAI ones from OpenTelemetry's GenAI
# semantic conventions (each metric's ExplicitBucketBoundaries) and vLLM's (its metrics/buckets.py).
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # Prometheus'
# gen_ai.server.request.duration: OTel's 0.01 .. 81.92 s doubling, two more for the 120 s deadline.
REQUEST_DURATION_BUCKETS = tuple(0.01 * 2**i for i in range(16))
# gen_ai.server.time_to_first_token: OTel's 0.001 .. 10 s, then vLLM's tail to past the deadline.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0)  # fmt: skip
# gen_ai.server.time_per_output_token: 2.5 and 5 ms (small models decode faster than 10 ms a
# token), then OTel's and vLLM's 0.01 .. 2.5 s, and vLLM's 5 and 10 s for stalls.
TPOT_BUCKETS = (0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                1.0, 2.5, 5.0, 10.0)  # fmt: skip
# gen_ai.client.token.usage (tokens per request and type): OTel's powers of 4, 1 .. 4**13.
TOKEN_BUCKETS = tuple(float(4**i) for i in range(14))

Clock = Callable[[], float]
LabelKey = tuple[tuple[str, str], ...]


# --- plugin metrics ------------------------------------------------------------------------------


class Counter:
    """A monotonically increasing count; also remembers recent increments for ``rate()``."""

    kind = "counter"
    RATE_WINDOW_S = 10.0
    _KEEP_S = 60  # one-second buckets kept, so rate() windows up to a minute are answerable

    def __init__(self, labels: dict[str, str], clock: Clock = time.monotonic) -> None:
        self.labels = labels
        self._clock = clock
        self._lock = threading.Lock()
        self._value: float = 0
        self._created = clock()
        self._buckets: deque[list[float]] = deque()  # [whole second, increments in it]

    @property
    def value(self) -> float:
        return self._value

    def inc(self, n: float = 1) -> None:
        if not n >= 0 or math.isinf(n):  # `not >=` also catches NaN
            raise ValueError(f"a counter only goes up by a finite amount, got {n!r}")
        now = self._clock()
        second = math.floor(now)
        with self._lock:
            self._value += n
            if self._buckets and self._buckets[-1][0] == second:
                self._buckets[-1][1] += n
            else:
                self._buckets.append([second, n])
                while self._buckets[0][0] < second - self._KEEP_S:
                    self._buckets.popleft()

    def rate(self, window_s: float = RATE_WINDOW_S) -> float:
        """Increments per second over the last ``window_s`` (or since creation, if younger)."""
        now = self._clock()
        # Whole buckets from floor(now - window) on, so the span is exact, not a bucket short.
        start = max(math.floor(now - window_s), self._created)
        span = now - start
        if span <= 0:
            return 0.0
        with self._lock:
            total = sum(n for second, n in self._buckets if second >= math.floor(start))
        return total / span

    def _series(self) -> dict[str, Any]:
        return {"labels": dict(self.labels), "value": self._value, "rate": self.rate()}


class Gauge:
    """A value that goes up and down (queue depth, adapters loaded, training loss)."""

    kind = "gauge"

    def __init__(self, labels: dict[str, str], clock: Clock = time.monotonic) -> None:
        self.labels = labels
        self._lock = threading.Lock()
        self._value: float = 0

    @property
    def value(self) -> float:
        return self._value

    def set(self, value: float) -> None:
        self._value = value

    def inc(self, n: float = 1) -> None:
        with self._lock:
            self._value += n

    def dec(self, n: float = 1) -> None:
        with self._lock:
            self._value -= n

    def _series(self) -> dict[str, Any]:
        return {"labels": dict(self.labels), "value": self._value}


class Histogram:
    """Observations (latencies, sizes): cumulative count, sum and bucket counts (``buckets`` are
    the finite upper bounds; +Inf is implied), plus percentiles and mean over a bounded recent
    window (at most ``window`` observations, none older than ``max_age_s``), so memory stays
    fixed however many are observed."""

    kind = "histogram"

    def __init__(
        self,
        labels: dict[str, str],
        clock: Clock = time.monotonic,
        window: int = 1024,
        max_age_s: float = 60.0,
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> None:
        if window < 1 or max_age_s <= 0:
            raise ValueError("a histogram needs window >= 1 and max_age_s > 0")
        bounds = [float(b) for b in buckets]
        if not all(math.isfinite(b) for b in bounds) or bounds != sorted(set(bounds)):
            raise ValueError(f"bucket bounds must be finite and increasing, got {buckets!r}")
        self.labels = labels
        self.bounds = tuple(bounds)
        self._clock = clock
        self._max_age_s = max_age_s
        self._lock = threading.Lock()
        self._recent: deque[tuple[float, float]] = deque(maxlen=window)  # (time, value)
        self._in_bucket = [0] * len(bounds)  # observations in (previous bound, bound]
        self.count = 0
        self.sum: float = 0.0

    def observe(self, value: float) -> None:
        if math.isnan(value):
            raise ValueError("cannot observe NaN")
        i = bisect.bisect_left(self.bounds, value)  # the first bound >= value (le semantics)
        with self._lock:
            self.count += 1
            self.sum += value
            if i < len(self.bounds):
                self._in_bucket[i] += 1
            self._recent.append((self._clock(), value))

    def buckets(self) -> list[list[float]]:
        """``[bound, observations <= bound]`` for each finite bound, as the feed carries them."""
        with self._lock:
            counts = itertools.accumulate(self._in_bucket)
            return [[b, n] for b, n in zip(self.bounds, counts, strict=True)]

    def window(self) -> list[float]:
        """The observations still in the window, oldest first."""
        horizon = self._clock() - self._max_age_s
        with self._lock:
            while self._recent and self._recent[0][0] < horizon:
                self._recent.popleft()
            return [v for _, v in self._recent]

    def percentile(self, q: float) -> float | None:
        """Nearest-rank percentile (an observed value) of the window, ``q`` in (0, 1]."""
        return _nearest_rank(sorted(self.window()), q)

    def _series(self) -> dict[str, Any]:
        values = sorted(self.window())
        out: dict[str, Any] = {
            "labels": dict(self.labels),
            "count": self.count,
            "sum": self.sum,
            "buckets": self.buckets(),
            "window": len(values),
        }
        if values:
            out["mean"] = math.fsum(values) / len(values)
            for q, key in QUANTILES:
                out[key] = _nearest_rank(values, q)
        return out


def _nearest_rank(ordered: list[float], q: float) -> float | None:
    if not 0 < q <= 1:
        raise ValueError(f"percentile must be in (0, 1], got {q!r}")
    if not ordered:
        return None
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


Metric = Counter | Gauge | Histogram
M = TypeVar("M", Counter, Gauge, Histogram)


class _Family:
    def __init__(self, kind: str, help: str, label_names: frozenset[str]) -> None:
        self.kind = kind
        self.help = help
        self.label_names = label_names
        self.series: dict[LabelKey, Metric] = {}


class MetricsRegistry:
    """One plugin's metrics. ``counter("x")`` twice returns the same object; a family is one name
    with one kind and one set of label names, each distinct label-value set one series."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._families: dict[str, _Family] = {}

    def counter(self, name: str, help: str = "", labels: dict[str, str] | None = None) -> Counter:
        return self._get(Counter, name, help, labels)

    def gauge(self, name: str, help: str = "", labels: dict[str, str] | None = None) -> Gauge:
        return self._get(Gauge, name, help, labels)

    def histogram(
        self,
        name: str,
        help: str = "",
        labels: dict[str, str] | None = None,
        *,
        window: int = 1024,
        max_age_s: float = 60.0,
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> Histogram:
        """``window``/``max_age_s``/``buckets`` apply when the series is created, not on later
        look-ups."""
        return self._get(
            Histogram, name, help, labels, window=window, max_age_s=max_age_s, buckets=buckets
        )

    def _get(
        self, cls: type[M], name: str, help: str, labels: dict[str, str] | None, **kw: Any
    ) -> M:
        labels = dict(labels or {})
        check_metric_name(name)
        for label, value in labels.items():
            check_label(label, value)
        key = tuple(sorted(labels.items()))
        with self._lock:
            family = self._families.get(name)
            if family is None:
                family = self._families[name] = _Family(cls.kind, help, frozenset(labels))
            elif family.kind != cls.kind:
                raise ValueError(
                    f"metric {name!r} is already registered as a {family.kind}, not a {cls.kind}"
                )
            elif family.label_names != frozenset(labels):
                raise ValueError(
                    f"metric {name!r} has labels {sorted(family.label_names)}, got {sorted(labels)}"
                )
            if help and not family.help:
                family.help = help
            metric = family.series.get(key)
            if metric is None:
                metric = family.series[key] = cls(labels, self._clock, **kw)
            assert isinstance(metric, cls)  # the family's kind is cls.kind
            return metric

    def snapshot(self) -> dict[str, Any]:
        """``{name: {"kind", "help", "series": [...]}}``; see the module docstring."""
        with self._lock:
            families = [(n, f, list(f.series.values())) for n, f in self._families.items()]
        return {
            name: {"kind": f.kind, "help": f.help, "series": [m._series() for m in series]}
            for name, f, series in families
        }


class BoundedLabel:
    """One label's values, at most ``limit`` distinct ones: the first ``limit`` seen stay, later
    ones become ``other``, so thousands of adapters cannot become thousands of series. First seen,
    not most used: a counter never moves to another series (Prometheus would read a reset)."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"a label needs room for at least one value, got {limit}")
        self.limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        with self._lock:
            if value in self._seen:
                return value
            if len(self._seen) < self.limit:
                self._seen.add(value)
                return value
        return OTHER


def check_metric_name(name: str) -> None:
    if not isinstance(name, str) or not METRIC_NAME.fullmatch(name):
        raise ValueError(f"invalid metric name {name!r}: must match {METRIC_NAME.pattern}")


def check_label(name: str, value: str) -> None:
    if not isinstance(name, str) or not LABEL_NAME.fullmatch(name) or name.startswith("__"):
        raise ValueError(
            f"invalid label name {name!r}: must match {LABEL_NAME.pattern} and not start with __"
        )
    if name in RESERVED_LABELS:
        raise ValueError(f"label name {name!r} is reserved (one of {sorted(RESERVED_LABELS)})")
    if not isinstance(value, str):
        raise ValueError(f"label {name!r} value must be a str, got {type(value).__name__}")


# --- the feed message ----------------------------------------------------------------------------


def metrics_snapshot(
    *,
    agent: str,
    system: dict[str, Any],
    plugins: Mapping[str, MetricsRegistry | dict[str, Any]],
    now: float | None = None,
) -> dict[str, Any]:
    """One agent's feed message (shape in the module docstring). ``plugins`` maps plugin names to
    their registries (snapshotted here) or to snapshots already taken."""
    return {
        "v": FEED_VERSION,
        "agent": agent,
        "time": time.time() if now is None else now,
        "system": system,
        "plugins": {
            name: reg.snapshot() if isinstance(reg, MetricsRegistry) else reg
            for name, reg in plugins.items()
        },
    }
