"""Assemble a running agent from its identity and config: connection, system plugin, plugins."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from atoll.agent.identity import AgentKeys
from atoll.agent.node import Agent
from atoll.agent.plugins import PluginHost
from atoll.agent.system_plugin import SystemPlugin


class AgentRuntime:
    def __init__(self, agent: Agent, host: PluginHost) -> None:
        self.agent = agent
        self.host = host

    @classmethod
    async def start(
        cls,
        data_dir: Path,
        brokers: list[str],
        plugins: dict[str, dict[str, Any]] | None = None,
        *,
        keys: AgentKeys | None = None,
        connect_timeout: float = 10.0,
        **agent_options: Any,
    ) -> AgentRuntime:
        keys = keys or AgentKeys.load(data_dir)
        agent = Agent(keys, brokers, **agent_options)
        host = PluginHost(agent, data_dir)
        await host.add("system", plugin=SystemPlugin())
        await agent.start(wait=connect_timeout)
        for name, config in (plugins or {}).items():
            if name != "system" and config.get("enabled", True):
                await host.add(name, config)
        return cls(agent, host)

    async def stop(self) -> None:
        await self.host.stop_all()
        await self.agent.stop()
