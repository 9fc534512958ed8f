"""The built-in ``system`` plugin every agent runs: ping (anyone of the tenant), info and
plugins (admins' and operators' tooling), and the remote lifecycle of the agent's other plugins
(``plugin_add``, ``plugin_reconfigure``, ``plugin_remove``, ``plugin_restart``: operators only,
since a plugin's config decides what the host exposes, e.g. the files plugin's directories)."""

from __future__ import annotations

import platform
import time
from typing import Any

from pydantic import BaseModel, ConfigDict

from atoll import __version__
from atoll.agent.contract import parse
from atoll.agent.errors import InvalidRequest
from atoll.agent.plugins import Plugin, PluginHost, rpc
from atoll.protocol.session import CallInfo
from atoll.tenancy.permissions import ADMINS, ANY, PLUGIN_MANAGERS


class PluginChange(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str
    config: dict[str, Any] = {}


class PluginName(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str


class SystemPlugin(Plugin):
    name = "system"

    def __init__(self, host: PluginHost) -> None:
        super().__init__()
        self.host = host  # the agent's plugins: the one plugin that manages the others

    @rpc(roles=ANY)
    async def ping(self, params: Any, call: CallInfo) -> dict[str, Any]:
        ident = self.ctx.identity
        return {"pong": True, "agent": ident.name, "time": time.time(), "echo": params}

    @rpc(roles=ADMINS)
    async def info(self, params: Any, call: CallInfo) -> dict[str, Any]:
        ident = self.ctx.identity
        return {
            "name": ident.name,
            "tenant": ident.tenant,
            "region": ident.region,
            "roles": list(ident.roles),
            "labels": dict(ident.labels),
            "version": __version__,
            "host": platform.node(),
            "python": platform.python_version(),
            "uptime_s": round(time.time() - self.ctx.started_at, 3),
            "broker": self.ctx.broker_url,
            "plugins": [p["name"] for p in self.ctx.plugin_statuses()],
        }

    @rpc(roles=ADMINS)
    async def plugins(self, params: Any, call: CallInfo) -> list[dict[str, Any]]:
        return self.ctx.plugin_statuses()

    @rpc(roles=PLUGIN_MANAGERS)
    async def plugin_add(self, params: Any, call: CallInfo) -> list[dict[str, Any]]:
        change = parse(PluginChange, params, "plugin_add")
        if change.name in self.host.plugins:
            raise InvalidRequest(f"plugin {change.name!r} runs here already: reconfigure it")
        await self._change(change.name, change.config, call)
        return self.ctx.plugin_statuses()

    @rpc(roles=PLUGIN_MANAGERS)
    async def plugin_reconfigure(self, params: Any, call: CallInfo) -> list[dict[str, Any]]:
        change = parse(PluginChange, params, "plugin_reconfigure")
        if change.name not in self.host.plugins:
            raise InvalidRequest(f"plugin {change.name!r} is not running here: add it")
        await self._change(change.name, change.config, call)
        return self.ctx.plugin_statuses()

    @rpc(roles=PLUGIN_MANAGERS)
    async def plugin_remove(self, params: Any, call: CallInfo) -> list[dict[str, Any]]:
        name = parse(PluginName, params, "plugin_remove").name
        await self._change(name, None, call)
        return self.ctx.plugin_statuses()

    @rpc(roles=PLUGIN_MANAGERS)
    async def plugin_restart(self, params: Any, call: CallInfo) -> list[dict[str, Any]]:
        name = parse(PluginName, params, "plugin_restart").name
        self.ctx.log.info("system.plugin_restart", plugin=name, by=call.caller.name)
        await self.host.restart(name)
        return self.ctx.plugin_statuses()

    async def _change(self, name: str, config: dict[str, Any] | None, call: CallInfo) -> None:
        self.ctx.log.info(
            "system.plugin_change", plugin=name, removed=config is None, by=call.caller.name
        )
        await self.host.change(name, config)
