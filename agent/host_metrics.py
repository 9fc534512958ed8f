"""Host readings for the metrics feed's ``system`` section: CPU, memory, disk and network
through psutil, GPUs through NVML when present (shape in ``atoll.agent.metrics``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from atoll.agent.metrics import Clock


class SystemCollector:
    """Reads host metrics with psutil (and NVML when present). Rates and CPU percentages cover the
    time since the previous ``collect()`` (since construction for the first one)."""

    def __init__(
        self, data_dir: str | Path = ".", *, gpus: bool = True, clock: Clock = time.monotonic
    ) -> None:
        self.data_dir = Path(data_dir)
        self._clock = clock
        # CPU percentages from our own cpu_times deltas rather than psutil.cpu_percent(None):
        # the same non-blocking semantics, without sharing psutil's module-global baseline with
        # every other caller in the process (a second collector or a plugin would steal it).
        self._cpu = psutil.cpu_times(percpu=True)
        self._cpu_total = psutil.cpu_times()
        self._net = _safe(psutil.net_io_counters)
        self._disk_io = _safe(psutil.disk_io_counters)
        self._last = clock()
        self._nvml = _Nvml.open() if gpus else None

    def collect(self) -> dict[str, Any]:
        now = self._clock()
        interval = max(now - self._last, 1e-9)
        self._last = now

        cpu = psutil.cpu_times(percpu=True)
        cpu_total = psutil.cpu_times()
        per_cpu = [_busy_percent(a, b) for a, b in zip(self._cpu, cpu, strict=False)]
        total = _busy_percent(self._cpu_total, cpu_total)
        self._cpu, self._cpu_total = cpu, cpu_total

        mem = psutil.virtual_memory()
        swap = psutil.swap_memory()
        out: dict[str, Any] = {
            "interval_s": interval,
            "cpu": {"count": len(per_cpu), "percent": total, "per_cpu": per_cpu},
            "load": [float(x) for x in _safe(psutil.getloadavg) or ()],
            "memory": {
                "total_bytes": mem.total,
                "used_bytes": mem.used,
                "available_bytes": mem.available,
                "percent": float(mem.percent),
            },
            "swap": {
                "total_bytes": swap.total,
                "used_bytes": swap.used,
                "percent": float(swap.percent),
            },
            "disk": self._disk(interval),
            "net": self._network(interval),
            "gpus": self._nvml.read() if self._nvml else [],
        }
        return out

    def _disk(self, interval: float) -> dict[str, Any]:
        out: dict[str, Any] = {}
        path = _existing(self.data_dir)
        usage = _safe(psutil.disk_usage, str(path))
        if usage is not None:
            out.update(
                path=str(path),
                total_bytes=usage.total,
                used_bytes=usage.used,
                free_bytes=usage.free,
                percent=float(usage.percent),
            )
        io = _safe(psutil.disk_io_counters)
        if io is not None and self._disk_io is not None:
            out["read_bytes_per_s"] = _rate(self._disk_io.read_bytes, io.read_bytes, interval)
            out["write_bytes_per_s"] = _rate(self._disk_io.write_bytes, io.write_bytes, interval)
        self._disk_io = io
        return out

    def _network(self, interval: float) -> dict[str, Any]:
        io = _safe(psutil.net_io_counters)
        if io is None:
            return {}
        out: dict[str, Any] = {"sent_bytes": io.bytes_sent, "recv_bytes": io.bytes_recv}
        if self._net is not None:
            out["sent_bytes_per_s"] = _rate(self._net.bytes_sent, io.bytes_sent, interval)
            out["recv_bytes_per_s"] = _rate(self._net.bytes_recv, io.bytes_recv, interval)
        self._net = io
        return out

    def close(self) -> None:
        if self._nvml:
            self._nvml.close()
            self._nvml = None


def _cpu_total_time(times: Any) -> float:
    # On Linux guest time is already counted in user time (psutil subtracts it the same way).
    total: float = sum(times) - getattr(times, "guest", 0) - getattr(times, "guest_nice", 0)
    return total


def _busy_percent(before: Any, after: Any) -> float:
    deltas = type(after)(*(max(0.0, b - a) for a, b in zip(before, after, strict=True)))
    total = _cpu_total_time(deltas)
    if total <= 0:
        return 0.0
    busy: float = total - deltas.idle - getattr(deltas, "iowait", 0)
    return round(min(100.0, max(0.0, busy / total * 100)), 1)


def _rate(before: int, after: int, interval: float) -> float:
    return max(0, after - before) / interval  # counters reset when a NIC or disk goes away


def _existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _safe(fn: Callable[..., Any], *args: Any) -> Any:
    """psutil calls that some platforms or containers lack: None instead of an error."""
    try:
        return fn(*args)
    except (OSError, RuntimeError, NotImplementedError, AttributeError):
        return None


class _Nvml:
    """GPU readings through NVML (``pynvml`` from nvidia-ml-py); absent module, library, driver or
    GPU all mean no GPU metrics, never an error."""

    def __init__(self, nvml: Any, handles: list[Any]) -> None:
        self.nvml = nvml
        self.handles = handles

    @classmethod
    def open(cls) -> _Nvml | None:
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception:  # ImportError, NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded...
            return None
        try:
            count = pynvml.nvmlDeviceGetCount()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        except Exception:
            _quietly(pynvml.nvmlShutdown)
            return None
        if not handles:
            _quietly(pynvml.nvmlShutdown)
            return None
        return cls(pynvml, handles)

    def read(self) -> list[dict[str, Any]]:
        nv = self.nvml
        gpus = []
        for index, h in enumerate(self.handles):
            gpu: dict[str, Any] = {"index": index}
            name = _quietly(nv.nvmlDeviceGetName, h)
            if name is not None:
                gpu["name"] = name.decode() if isinstance(name, bytes) else str(name)
            util = _quietly(nv.nvmlDeviceGetUtilizationRates, h)
            if util is not None:
                gpu["utilization_percent"] = float(util.gpu)
            mem = _quietly(nv.nvmlDeviceGetMemoryInfo, h)
            if mem is not None:
                gpu["memory_used_bytes"] = int(mem.used)
                gpu["memory_total_bytes"] = int(mem.total)
            temp = _quietly(nv.nvmlDeviceGetTemperature, h, nv.NVML_TEMPERATURE_GPU)
            if temp is not None:
                gpu["temperature_c"] = float(temp)
            power_mw = _quietly(nv.nvmlDeviceGetPowerUsage, h)
            if power_mw is not None:
                gpu["power_w"] = power_mw / 1000.0
            gpus.append(gpu)
        return gpus

    def close(self) -> None:
        _quietly(self.nvml.nvmlShutdown)


def _quietly(fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception:  # NVMLError_NotSupported and friends: that reading is simply absent
        return None
