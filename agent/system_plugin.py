"""The built-in ``system`` plugin every agent runs: ping, info, plugins."""

from __future__ import annotations

import platform
import time
from typing import Any

from atoll import __version__
from atoll.agent.node import CallInfo
from atoll.agent.plugins import Plugin, rpc


class SystemPlugin(Plugin):
    name = "system"

    @rpc()
    async def ping(self, params: Any, call: CallInfo) -> dict[str, Any]:
        return {"pong": True, "agent": self.ctx.agent.name, "time": time.time(), "echo": params}

    @rpc()
    async def info(self, params: Any, call: CallInfo) -> dict[str, Any]:
        agent = self.ctx.agent
        ident = agent.ident
        return {
            "name": ident.name,
            "tenant": ident.tenant,
            "region": ident.region,
            "roles": list(ident.roles),
            "version": __version__,
            "host": platform.node(),
            "python": platform.python_version(),
            "uptime_s": round(time.time() - agent.started_at, 3),
            "broker": agent.link.url,
            "plugins": [p["name"] for p in self.ctx.host.statuses()],
        }

    @rpc()
    async def plugins(self, params: Any, call: CallInfo) -> list[dict[str, Any]]:
        return self.ctx.host.statuses()
