"""Time limits before a request or handshake: idle sockets stayed open on the gateway (silent
ones for 120 s and more) and the broker's handshake timer started only after the websocket
upgrade. Now every connection must get somewhere in time, counted from TCP accept, and the
number of connections on the way is capped; honest clients are served throughout."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from atoll.agent.identity import AgentKeys
from atoll.agent.node import Agent
from atoll.broker.server import BrokerServer
from atoll.tenancy.operator import OperatorStore
from conftest import AgentFactory, Island

LIMIT = 0.5  # seconds, the deadline under test
CLOSED_WITHIN = 5.0  # generous: CI machines are slow; never a speed assertion


async def closed(reader: asyncio.StreamReader) -> tuple[bytes, float]:
    """Everything the server sent until it closed, and when it closed (bounded)."""
    started = time.monotonic()
    data = b""
    async with asyncio.timeout(CLOSED_WITHIN):
        while chunk := await reader.read(65536):
            data += chunk
    return data, time.monotonic() - started


@pytest.fixture
async def strict_broker(operator: OperatorStore) -> AsyncIterator[BrokerServer]:
    server = BrokerServer.from_data_dir(
        operator.root, handshake_timeout=LIMIT, max_unauthenticated=5
    )
    await server.start("127.0.0.1", 0)
    yield server
    await server.stop()


async def test_the_brokers_deadline_runs_from_tcp_accept(
    operator: OperatorStore, strict_broker: BrokerServer
) -> None:
    host, port = strict_broker.host, strict_broker.port
    # Silent: never upgrades to a websocket.
    silent_r, silent_w = await asyncio.open_connection(host, port)
    # Half an upgrade request, then nothing.
    half_r, half_w = await asyncio.open_connection(host, port)
    half_w.write(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
    for reader in (silent_r, half_r):
        data, after = await closed(reader)
        assert data == b"" and after < CLOSED_WITHIN
    # An honest agent still gets in.
    agent = await Agent(
        AgentKeys.issue(operator, "acme", "ok", ["agent"]), [strict_broker.url]
    ).start(5)
    assert strict_broker.router.agents("acme") == ["ok"]
    assert strict_broker.admission.pending == set()  # admitted ones are not counted
    await agent.stop()
    for w in (silent_w, half_w):
        w.close()


async def test_half_open_sockets_are_capped(
    operator: OperatorStore, strict_broker: BrokerServer
) -> None:
    held = [await asyncio.open_connection(strict_broker.host, strict_broker.port) for _ in range(5)]
    await asyncio.sleep(0.1)
    assert len(strict_broker.admission.pending) == 5
    over_r, over_w = await asyncio.open_connection(strict_broker.host, strict_broker.port)
    data, after = await closed(over_r)  # refused at once, not after the deadline
    assert data == b"" and after < LIMIT
    for reader, _ in held:  # the held ones run out their deadline
        await closed(reader)
    assert strict_broker.admission.pending == set()
    agent = await Agent(
        AgentKeys.issue(operator, "acme", "ok", ["agent"]), [strict_broker.url]
    ).start(5)
    await agent.stop()
    over_w.close()
    for _, w in held:
        w.close()


async def gateway(make_agent: AgentFactory, **limits: object) -> Island:
    isl = Island(make_agent)
    await isl.add_node("gpu1")
    await (await isl.start_gateway(**limits)).models_seen("echo")
    return isl


async def test_the_gateway_cuts_silent_slow_and_idle_clients(make_agent: AgentFactory) -> None:
    isl = await gateway(make_agent, header_timeout=LIMIT, body_timeout=LIMIT, idle_timeout=LIMIT)
    host, port = isl.plugin.address
    key = isl.key("alice")
    silent = await asyncio.open_connection(host, port)
    trickle = await asyncio.open_connection(host, port)
    slow_body = await asyncio.open_connection(host, port)
    slow_body[1].write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + key.encode() + b"\r\nContent-Length: 1000\r\n\r\n{"
    )

    async def drip() -> None:  # a header byte every LIMIT/5: progress, but never a whole head
        request = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 1000
        for byte in request:
            trickle[1].write(bytes([byte]))
            await asyncio.sleep(LIMIT / 5)

    dripping = asyncio.create_task(drip())
    async with httpx.AsyncClient(base_url=isl.url) as http:  # served meanwhile
        reply = await http.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert reply.status_code == 200
    for reader, _ in (silent, trickle, slow_body):
        _, after = await closed(reader)
        assert after < CLOSED_WITHIN
    dripping.cancel()
    # A kept-alive connection that goes idle is closed too.
    idle_r, idle_w = await asyncio.open_connection(host, port)
    idle_w.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    data, _ = await closed(idle_r)
    assert data.startswith(b"HTTP/1.1 200")
    for _, w in (silent, trickle, slow_body, (idle_r, idle_w)):
        w.close()


async def test_the_gateway_caps_open_connections(make_agent: AgentFactory) -> None:
    isl = await gateway(make_agent, max_connections=5, header_timeout=30)
    host, port = isl.plugin.address
    held = [await asyncio.open_connection(host, port) for _ in range(5)]
    await asyncio.sleep(0.1)
    over_r, over_w = await asyncio.open_connection(host, port)
    data, after = await closed(over_r)
    assert data.startswith(b"HTTP/1.1 503") and b"too many open connections" in data
    assert after < LIMIT
    for _, w in held:  # once they go, others are served again
        w.close()
    await asyncio.sleep(0.2)
    async with httpx.AsyncClient(base_url=isl.url) as http:
        assert (await http.get("/health")).status_code == 200
    over_w.close()
