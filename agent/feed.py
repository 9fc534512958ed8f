"""The live resource-metrics feed: every agent publishes system and plugin figures on
``metrics.<agent>`` every few seconds, kept by brokers so a new watcher sees them at once.
Brokers let only the roles the permission table names watch another agent's feed."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

from atoll.agent.host_metrics import SystemCollector
from atoll.agent.metrics import metrics_snapshot
from atoll.agent.node import Agent

if TYPE_CHECKING:
    from atoll.agent.plugins import PluginHost

METRICS = "metrics"


class MetricsPublisher:
    def __init__(
        self, agent: Agent, host: PluginHost, data_dir: Path, interval: float = 5.0
    ) -> None:
        self.agent = agent
        self.host = host
        self.interval = interval
        self.collector = SystemCollector(data_dir)
        self._task: asyncio.Task[None] | None = None

    def message(self) -> dict[str, Any]:
        system = self.collector.collect()
        welcome = self.agent.link.welcome
        if welcome is not None and welcome.skew_ms is not None:
            # Measured at the last handshake: an operator sees drift before brokers refuse it.
            system["clock"] = {"skew_ms": welcome.skew_ms, "broker": welcome.broker.name}
        self.host.system = system  # for a plugin's own snapshot between messages (/metrics)
        return metrics_snapshot(agent=self.agent.name, system=system, plugins=self.host.metrics())

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)  # the first reading needs an interval behind it
            if not self.agent.link.connected.is_set():
                continue
            try:
                msg = await asyncio.to_thread(self.message)  # psutil/NVML may block briefly
                await self.agent.publish(f"{METRICS}.{self.agent.name}", msg, keep=True)
            except Exception as exc:  # a lost connection or a failed reading: try next time
                self.agent.log.info("metrics.publish_failed", error=exc)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self.collector.close()
