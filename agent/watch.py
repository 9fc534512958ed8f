"""A tenant-wide watch: discovery plus the metrics feed of every agent, as ``atoll top``, the
gateway's dashboard and Prometheus exposition see it, and (for admins and operators) who brokers
refused at the handshake and why. Needs a role that may read other agents' feeds."""

from __future__ import annotations

import time
from typing import Any

from atoll.agent.discovery import Discovery
from atoll.agent.feed import METRICS
from atoll.agent.node import Agent, Subscription
from atoll.protocol.session import Publication
from atoll.protocol.subjects import REFUSALS
from atoll.tenancy import permissions

REFUSED = "REFUSED"


class TenantWatch:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.discovery = Discovery.shared(agent)
        self.metrics: dict[str, dict[str, Any]] = {}
        self.refusals: dict[tuple[str, str], dict[str, Any]] = {}  # (kind, name) -> notice
        self._subs: list[Subscription] = []

    async def start(self) -> TenantWatch:
        await self.discovery.start()
        self._subs.append(await self.agent.subscribe(f"{METRICS}.*", self._on_metrics))
        pattern = f"{REFUSALS}.>"
        if permissions.allowed(self.agent.ident.roles, self.agent.name, "subscribe", pattern):
            self._subs.append(await self.agent.subscribe(pattern, self._on_refusal))
        await self.agent.flush()  # kept announcements and feeds have arrived once this returns
        return self

    async def stop(self) -> None:
        await self.discovery.stop()
        for sub in self._subs:
            await sub.unsubscribe()
        self._subs.clear()

    def _on_refusal(self, pub: Publication) -> None:
        notice = pub.data  # told by a broker, in clear: shown, never acted on
        if isinstance(notice, dict) and isinstance(notice.get("at"), int):
            kind, name = notice.get("kind"), notice.get("name")
            if isinstance(kind, str) and isinstance(name, str):
                self.refusals[(kind, name)] = notice

    def _on_metrics(self, pub: Publication) -> None:
        name = pub.subject.split(".", 1)[1]
        if isinstance(pub.data, dict) and pub.src.partition("/")[0] == name:
            self.metrics[name] = pub.data

    def rows(self) -> list[dict[str, Any]]:
        """One row per known agent (discovery entry, latest feed message), its status REFUSED
        with the reason when a broker refused it since it was last heard; then a row for each
        refused agent never heard of and each refused peer broker."""
        rows: dict[str, dict[str, Any]] = {
            name: {**e.as_dict(), "metrics": self.metrics.get(name)}
            for name, e in self.discovery.entries.items()
        }
        now = time.time()
        for (kind, name), notice in sorted(self.refusals.items()):
            at = notice["at"] / 1000
            refusal = {"status": REFUSED, "refused": _refusal(notice)}
            entry = self.discovery.entries.get(name) if kind == "agent" else None
            if entry is not None:
                if at > entry.seen_at:
                    rows[name].update(refusal)
                continue
            key = name if kind == "agent" else f"broker {name}"
            rows[key] = {
                "name": key, "region": "", "labels": {}, "plugins": [], "capabilities": {},
                "endpoints": {}, "load": {}, "interval": 0.0, "age_s": round(now - at, 3),
                "metrics": None, **refusal,
            }  # fmt: skip
        return [rows[k] for k in sorted(rows)]


def _refusal(notice: dict[str, Any]) -> str:
    return f"by broker {notice.get('broker', '?')}: {notice.get('reason', '')}"
