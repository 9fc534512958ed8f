"""A test broker's agents driven by hand: hand-made sessions, a tapped router, bounded polling."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from websockets.asyncio.client import ClientConnection, connect

from atoll.agent.identity import AgentKeys
from atoll.agent.node import Agent
from atoll.agent.runtime import AgentRuntime
from atoll.broker.router import Session
from atoll.broker.server import BrokerServer
from atoll.protocol.frames import Frame, decode_message
from atoll.protocol.handshake import ClientHandshake
from atoll.tenancy.operator import OperatorStore

AgentFactory = Callable[..., Awaitable[AgentRuntime]]
"""The ``make_agent`` fixture: ``await make_agent(name, tenant=, roles=, brokers=, labels=,
**options)`` enrolls and starts an agent on the test broker."""


async def raw_session(
    operator: OperatorStore,
    broker: BrokerServer,
    name: str,
    max_size: int | None = None,
    roles: tuple[str, ...] = ("agent",),
) -> ClientConnection:
    """A hand-driven authenticated websocket, to send frames no real agent would."""
    keys = AgentKeys.issue(operator, "acme", name, list(roles))
    ws = await connect(broker.url, compression=None, max_size=max_size)
    hs = ClientHandshake(keys.key, keys.credential, keys.operator_pub)
    (hello,) = decode_message(await ws.recv())
    await ws.send(hs.receive_hello(hello))
    (welcome,) = decode_message(await ws.recv())
    hs.receive_welcome(welcome)
    return ws


Tap = Callable[[Session, Frame], Frame | None]


def intercept(broker: BrokerServer, tap: Tap) -> Callable[[], None]:
    """Play a compromised broker: ``tap`` sees every frame an agent sends before the router
    does, and a Frame it returns is routed instead. Returns the undo."""
    router = broker.router
    route = router.handle

    def handle(session: Session, frame: Frame) -> None:
        route(session, tap(session, frame) or frame)

    # An instance attribute shadows the method until the undo deletes it (set through the
    # instance's dict: mypy refuses assigning to a method).
    vars(router)["handle"] = handle
    return lambda: delattr(router, "handle")


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``check`` until true; bounded in time."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not check():
        if loop.time() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def refused_put(agent: Agent, service: str, first_line: bytes, body: bytes = b"") -> None:
    """Speak one of storage's put streams by hand (``first_line``, then ``body``), to send what
    the client never would; raises the refusal. The offsets storage answers a header with (where
    a resumed upload goes on from) are read past."""
    stream = await agent.streams.open("store/storage", service, None)
    try:
        await stream.write(first_line + b"\n" + body)
        reply = b""
        while not reply.endswith(b"\n") or reply.startswith(b'{"offsets"'):
            if reply.endswith(b"\n"):
                reply = b""
            reply += await asyncio.wait_for(stream.read(), 10)
        raise AssertionError(f"storage accepted it: {reply!r}")
    finally:
        await stream.close()
