"""TCP tunnels through the overlay (Cresco's stunnel): a listener on one island forwards each
connection over an encrypted stream to an agent that connects to the real destination — e.g.
a gateway reaching a LoRAX server on a GPU island that accepts no inbound connections.

The target agent only connects where its ``[plugins.tunnel] allow`` list says (``host:port`` or
``host:*``); anything else is refused with a clear error.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

from atoll.agent.errors import AtollError, Forbidden, InvalidRequest
from atoll.agent.node import Overlay
from atoll.agent.plugins import Plugin, PluginContext
from atoll.agent.streams import Stream, StreamReset
from atoll.protocol.session import CallInfo
from atoll.protocol.streams import CHUNK
from atoll.tenancy.permissions import TUNNEL_USERS

SERVICE = "tcp"
CONNECT_TIMEOUT = 10.0


def parse_target(text: str) -> tuple[str, str, int]:
    """``AGENT:HOST:PORT`` -> (agent, host, port)."""
    agent, _, rest = text.partition(":")
    host, _, port = rest.rpartition(":")
    if not agent or not host or not port.isdigit():
        raise ValueError(f"{text!r} is not AGENT:HOST:PORT")
    return agent, host, int(port)


def allowed(rules: list[str], host: str, port: int) -> bool:
    for rule in rules:
        r_host, _, r_port = rule.rpartition(":")
        if r_host == host and (r_port == "*" or r_port == str(port)):
            return True
    return False


async def splice(
    stream: Stream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> str | None:
    """Copy both ways until both directions have ended; half-closes pass through. Returns why
    it failed, if it did."""

    async def tcp_to_stream() -> None:
        while data := await reader.read(CHUNK):
            await stream.write(data)
        await stream.write_eof()

    async def stream_to_tcp() -> None:
        async for chunk in stream:
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    tasks = [asyncio.create_task(tcp_to_stream()), asyncio.create_task(stream_to_tcp())]
    try:
        await asyncio.gather(*tasks)
        return None
    except (AtollError, ConnectionError, OSError) as exc:
        stream.abort(StreamReset(f"tunnel connection failed: {exc}"))
        return str(exc)
    finally:
        for t in tasks:
            t.cancel()
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


class TunnelListener:
    """Accepts TCP connections locally and carries each to ``host:port`` seen from ``agent``."""

    def __init__(self, agent: Overlay, target_agent: str, host: str, port: int) -> None:
        self.agent = agent
        self.target = f"{target_agent}/tunnel"
        self.host, self.port = host, port
        self.server: asyncio.Server | None = None
        self.errors: list[str] = []  # why recent connections were refused (for the CLI)

    async def start(self, listen_host: str, listen_port: int) -> TunnelListener:
        self.server = await asyncio.start_server(self._accept, listen_host, listen_port)
        return self

    @property
    def address(self) -> tuple[str, int]:
        assert self.server is not None
        host, port = self.server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            stream = await self.agent.open_stream(
                self.target, SERVICE, {"host": self.host, "port": self.port}
            )
        except AtollError as exc:
            self._refused(str(exc))
            writer.close()
            return
        error = await splice(stream, reader, writer)
        if error is not None:
            self._refused(error)

    def _refused(self, reason: str) -> None:
        self.errors = [*self.errors[-99:], reason]
        self.agent.log.warning("tunnel.refused", target=self.target, reason=reason)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


class ListenSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    listen: str  # local HOST:PORT
    to: str  # AGENT:HOST:PORT

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        host, _, port = v.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"listen {v!r} is not HOST:PORT")
        return v

    @field_validator("to")
    @classmethod
    def _to(cls, v: str) -> str:
        parse_target(v)
        return v


class TunnelConfig(BaseModel):
    """``[plugins.tunnel]``: destinations served for others, and local listeners."""

    model_config = ConfigDict(extra="forbid")

    allow: list[str] = []  # "host:port" or "host:*"
    listen: list[ListenSpec] = []

    @field_validator("allow")
    @classmethod
    def _allow(cls, v: list[str]) -> list[str]:
        for rule in v:
            host, _, port = rule.rpartition(":")
            if not host or not (port == "*" or port.isdigit()):
                raise ValueError(f"allow rule {rule!r} is not host:port or host:*")
        return v


class TunnelPlugin(Plugin):
    """Serves tunnel streams to allowed destinations, and runs configured local listeners."""

    name = "tunnel"
    config_model = TunnelConfig

    async def start(self, ctx: PluginContext) -> None:
        await super().start(ctx)
        config = ctx.settings(TunnelConfig)
        self.allow = config.allow
        self.listeners: list[TunnelListener] = []
        self.opened = ctx.metrics.counter("tunnel_connections", "Tunnel connections served")
        ctx.serve_stream(SERVICE, self._serve, roles=TUNNEL_USERS)
        for spec in config.listen:
            agent, host, port = parse_target(spec.to)
            l_host, _, l_port = spec.listen.rpartition(":")
            listener = TunnelListener(ctx, agent, host, port)
            self.listeners.append(await listener.start(l_host, int(l_port)))

    async def stop(self) -> None:
        for listener in self.listeners:
            await listener.stop()

    def describe(self) -> dict[str, Any]:
        return {"capabilities": {"tunnel_allow": self.allow}}

    async def _serve(self, stream: Stream, params: Any, call: CallInfo) -> None:
        if (
            not isinstance(params, dict)
            or not isinstance(params.get("host"), str)
            or type(params.get("port")) is not int
        ):
            raise InvalidRequest("a tunnel needs {host, port}")
        host, port = params["host"], params["port"]
        if not allowed(self.allow, host, port):
            raise Forbidden(
                f"destination {host}:{port} is not in agent {self.ctx.identity.name}'s tunnel "
                "allow-list"
            )
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), CONNECT_TIMEOUT
            )
        except (OSError, TimeoutError) as exc:
            raise StreamReset(f"cannot connect to {host}:{port}: {exc}") from None
        self.opened.inc()
        await splice(stream, reader, writer)
