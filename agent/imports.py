"""Imported services in discovery: another tenant's agents a grant lets this tenant call.

An exporter's announcements are sealed with its tenant's feed key, which an importer never
holds, and must stay so: they say everything about the exporter's agents. So an importer does
not hear them; it asks its broker what it imports (``Agent.imports``: per grant, the exporter's
agents enrolled for the exported plugin, their credentials verified here) and asks each of them,
through the exported plugin itself, to describe that one service (``describe``: a plugin's own
method, such as inference's ``info``). What it learns is what a call needs (the agent's name, the
plugin, its models and load) and becomes a discovery entry named ``agent@tenant`` with that one
plugin, refreshed every ``interval``; one that stops answering goes STALE and LOST as a silent
agent does. An entry whose service does not fit the grant (another base model than the one it is
limited to) is left out: the callee would refuse its calls anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

from atoll.agent.discovery import Discovery, Entry
from atoll.agent.errors import AtollError
from atoll.protocol.grants import Grant
from atoll.protocol.trust import AgentIdentity

Describe = Callable[[str], Awaitable[dict[str, Any]]]
"""``describe(address)``: ``{"capabilities": {...}, "load": {...}}`` of the service there."""
Lister = Callable[[], Awaitable[list[tuple[Grant, list[AgentIdentity]]]]]


class Imports:
    def __init__(
        self,
        imports: Lister,
        discovery: Discovery,
        plugin: str,
        describe: Describe,
        interval: float = 5.0,
        timeout: float = 5.0,
    ) -> None:
        self.imports = imports
        self.discovery = discovery
        self.plugin = plugin
        self.describe = describe
        self.interval = interval
        self.timeout = timeout
        self._task: asyncio.Task[None] | None = None

    def start(self) -> Imports:
        self._task = asyncio.create_task(self._run())
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(AtollError, TimeoutError):
                await self.refresh()
            await asyncio.sleep(self.interval)

    async def refresh(self) -> list[str]:
        """Look once: the entries heard (``agent@tenant``)."""
        found = await self.imports()
        services = [
            (grant, ident)
            for grant, agents in found
            if grant.exports(self.plugin)
            for ident in agents
        ]
        heard = await asyncio.gather(*(self._describe(g, i) for g, i in services))
        return [name for name in heard if name is not None]

    async def _describe(self, grant: Grant, ident: AgentIdentity) -> str | None:
        name = f"{ident.name}@{grant.exporter}"
        try:
            async with asyncio.timeout(self.timeout):
                said = await self.describe(f"{name}/{self.plugin}")
            caps = dict(said["capabilities"])
            load = dict(said.get("load") or {})
        except (AtollError, TimeoutError, KeyError, TypeError, ValueError):
            return None  # not heard this time: it goes STALE, then LOST, as a silent agent
        model = caps.get("base_model")
        if not grant.allows(self.plugin, model if isinstance(model, str) else ""):
            return None
        now = time.time()
        self.discovery.heard(
            Entry(
                name=name,
                region=ident.region,
                labels=dict(ident.labels),
                plugins=[self.plugin],
                capabilities={self.plugin: caps},
                load=load,
                interval=self.interval,
                announced_at=now,
                seen_at=now,
            )
        )
        return name
