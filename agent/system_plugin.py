"""The built-in ``system`` plugin every agent runs: ping (anyone of the tenant), info and
plugins (operators' tooling)."""

from __future__ import annotations

import platform
import time
from typing import Any

from atoll import __version__
from atoll.agent.plugins import Plugin, rpc
from atoll.protocol.session import CallInfo
from atoll.tenancy.permissions import ADMINS, ANY


class SystemPlugin(Plugin):
    name = "system"

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
