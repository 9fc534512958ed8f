"""Assemble a running agent from its identity and config: connection, system plugin, plugins."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from atoll.agent.discovery import Announcer
from atoll.agent.feed import MetricsPublisher
from atoll.agent.identity import AgentKeys
from atoll.agent.node import Agent
from atoll.agent.plugins import PluginHost, remote_changes
from atoll.agent.system_plugin import SystemPlugin


class AgentRuntime:
    def __init__(
        self, agent: Agent, host: PluginHost, announcer: Announcer, feed: MetricsPublisher
    ) -> None:
        self.agent = agent
        self.host = host
        self.announcer = announcer
        self.feed = feed

    @classmethod
    async def start(
        cls,
        data_dir: Path,
        brokers: list[str],
        plugins: dict[str, dict[str, Any]] | None = None,
        *,
        keys: AgentKeys | None = None,
        connect_timeout: float = 10.0,
        heartbeat: float = 5.0,
        metrics_interval: float = 5.0,
        config_dir: Path | None = None,
        **agent_options: Any,
    ) -> AgentRuntime:
        keys = keys or AgentKeys.load(data_dir)
        agent = Agent(keys, brokers, **agent_options)
        host = PluginHost(agent, data_dir, config_dir)
        await host.add("system", plugin=SystemPlugin(host))
        await agent.start(wait=connect_timeout)
        configured = {
            # `enabled` is the host's switch, the same for every plugin: not theirs to check.
            name: {k: v for k, v in config.items() if k != "enabled"}
            for name, config in (plugins or {}).items()
            if name != "system" and config.get("enabled", True)
        }
        # What operators changed remotely wins over the config file (None: removed).
        for name, config in remote_changes(data_dir).items():
            if config is None:
                configured.pop(name, None)
            else:
                configured[name] = config
        for name, config in configured.items():
            try:
                await host.add(name, config)
            except Exception:  # logged and shown in statuses; the agent serves on without it
                continue
        announcer = Announcer(agent, host.describe, heartbeat)
        announcer.start()
        feed = MetricsPublisher(agent, host, data_dir, metrics_interval)
        feed.start()
        return cls(agent, host, announcer, feed)

    async def stop(self) -> None:
        await self.feed.stop()
        await self.announcer.stop()  # says "leaving" while the link is still up
        await self.host.stop_all()
        await self.agent.stop()
