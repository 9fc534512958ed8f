"""A tenant-wide watch: discovery plus the metrics feed of every agent, as ``atoll top``, the
gateway's dashboard and Prometheus exposition see it. Needs an admin or operator identity."""

from __future__ import annotations

from typing import Any

from atoll.agent.discovery import Discovery
from atoll.agent.feed import METRICS
from atoll.agent.node import Agent, Subscription
from atoll.protocol.session import Publication


class TenantWatch:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.discovery = Discovery(agent)
        self.metrics: dict[str, dict[str, Any]] = {}
        self._sub: Subscription | None = None

    async def start(self) -> TenantWatch:
        await self.discovery.start()
        self._sub = await self.agent.subscribe(f"{METRICS}.*", self._on_metrics)
        await self.agent.flush()  # kept announcements and feeds have arrived once this returns
        return self

    async def stop(self) -> None:
        await self.discovery.stop()
        if self._sub is not None:
            await self._sub.unsubscribe()

    def _on_metrics(self, pub: Publication) -> None:
        name = pub.subject.split(".", 1)[1]
        if isinstance(pub.data, dict) and pub.src.partition("/")[0] == name:
            self.metrics[name] = pub.data

    def rows(self) -> list[dict[str, Any]]:
        """One row per known agent: discovery entry and its latest feed message."""
        return [
            {**e.as_dict(), "metrics": self.metrics.get(name)}
            for name, e in sorted(self.discovery.entries.items())
        ]
