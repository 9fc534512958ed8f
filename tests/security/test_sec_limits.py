"""Time limits before a request or handshake: idle sockets stayed open on the gateway (silent
ones for 120 s and more) and the broker's handshake timer started only after the websocket
upgrade. Now every connection must get somewhere in time, counted from TCP accept, and the
number of connections on the way is capped; honest clients are served throughout."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from atoll.agent.identity import AgentKeys
from atoll.agent.node import Agent
from atoll.broker.server import BrokerServer
from atoll.plugins.gateway.http_limits import HttpLimits, guarded_protocol
from atoll.tenancy.operator import OperatorStore
from atoll.transport import client_tls, server_tls
from support.island import Island
from support.net import self_signed
from support.overlay import AgentFactory, eventually

LIMIT = 0.5  # seconds, the deadline under test
CLOSED_WITHIN = 5.0  # generous: CI machines are slow; never a speed assertion


LONG = 60.0  # a deadline no test waits for: what happens sooner is not the deadline


async def closed(reader: asyncio.StreamReader) -> tuple[bytes, float]:
    """Everything the server sent until it closed, and when it closed (bounded)."""
    started = time.monotonic()
    data = b""
    async with asyncio.timeout(CLOSED_WITHIN):
        try:
            while chunk := await reader.read(65536):
                data += chunk
        except ConnectionError:  # an abort (RST) is a close too
            pass
    return data, time.monotonic() - started


async def broker_with(operator: OperatorStore, **options: object) -> BrokerServer:
    server = BrokerServer.from_data_dir(operator.root, **options)
    return await server.start("127.0.0.1", 0)


async def agent_gets_in(operator: OperatorStore, server: BrokerServer, **options: Any) -> None:
    agent = await Agent(
        AgentKeys.issue(operator, "acme", "ok", ["agent"]), [server.url], **options
    ).start(5)
    assert server.router.agents("acme") == ["ok"]
    await agent.stop()


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
    await agent_gets_in(operator, strict_broker)
    assert strict_broker.admission.pending == set()  # admitted ones are not counted
    for w in (silent_w, half_w):
        w.close()


async def test_half_open_sockets_are_capped(
    operator: OperatorStore, strict_broker: BrokerServer
) -> None:
    held = [await asyncio.open_connection(strict_broker.host, strict_broker.port) for _ in range(5)]
    await eventually(lambda: len(strict_broker.admission.pending) == 5)
    over_r, over_w = await asyncio.open_connection(strict_broker.host, strict_broker.port)
    data, _ = await closed(over_r)  # refused at accept
    assert data == b""
    for reader, _ in held:  # the held ones run out their deadline
        await closed(reader)
    assert strict_broker.admission.pending == set()
    await agent_gets_in(operator, strict_broker)
    over_w.close()
    for _, w in held:
        w.close()


async def test_the_cap_refuses_at_accept_not_at_the_deadline(operator: OperatorStore) -> None:
    server = await broker_with(operator, handshake_timeout=LONG, max_unauthenticated=100)
    try:  # a flood: the cap's worth of silent sockets, then more
        held = [await asyncio.open_connection(server.host, server.port) for _ in range(100)]
        await eventually(lambda: len(server.admission.pending) == 100)
        over = [await asyncio.open_connection(server.host, server.port) for _ in range(20)]
        for reader, _ in over:
            data, _ = await closed(reader)  # within CLOSED_WITHIN, long before LONG
            assert data == b""
        for _, w in held[:10]:  # room again once some go
            w.close()
        await eventually(lambda: len(server.admission.pending) == 90)
        await agent_gets_in(operator, server)
        for _, w in held[10:] + over:
            w.close()
        await eventually(lambda: not server.admission.pending)
    finally:
        await server.stop()


async def test_tls_handshakes_count_against_the_deadline_and_the_cap(
    operator: OperatorStore, tmp_path: Path
) -> None:
    """Under wss:// the TLS handshake is on the way too: a socket that never sends a ClientHello
    is counted from accept, cut at the deadline, and the cap refuses more at once."""
    cert, key = self_signed(tmp_path)
    tls = server_tls(cert, key)
    server = await broker_with(
        operator, ssl_context=tls, handshake_timeout=LIMIT, max_unauthenticated=5
    )
    try:
        silent_r, silent_w = await asyncio.open_connection(server.host, server.port)
        # TLS done, then no websocket upgrade.
        plain_r, plain_w = await asyncio.open_connection(
            server.host, server.port, ssl=client_tls(cert)
        )
        # Not TLS at all: the handshake fails at once.
        garbage_r, garbage_w = await asyncio.open_connection(server.host, server.port)
        garbage_w.write(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n")
        for reader in (silent_r, plain_r, garbage_r):
            data, after = await closed(reader)
            assert after < CLOSED_WITHIN
            assert reader is garbage_r or data == b""  # (garbage may get a TLS alert)
        await eventually(lambda: not server.admission.pending)
        await agent_gets_in(operator, server, ssl_context=client_tls(cert))
        for w in (silent_w, plain_w, garbage_w):
            w.close()
    finally:
        await server.stop()
    server = await broker_with(
        operator, ssl_context=tls, handshake_timeout=LONG, max_unauthenticated=5
    )
    try:
        held = [await asyncio.open_connection(server.host, server.port) for _ in range(5)]
        await eventually(lambda: len(server.admission.pending) == 5)  # counted mid-TLS
        over_r, over_w = await asyncio.open_connection(server.host, server.port)
        data, _ = await closed(over_r)  # refused at accept, long before LONG
        assert data == b""
        for _, w in held:
            w.close()
        await eventually(lambda: not server.admission.pending)  # a lost handshake is uncounted
        await agent_gets_in(operator, server, ssl_context=client_tls(cert))
        over_w.close()
    finally:
        await server.stop()


async def gateway(make_agent: AgentFactory, **limits: Any) -> Island:
    isl = Island(make_agent)
    await isl.add_node("gpu1")
    await (await isl.start_gateway(**limits)).models_seen("echo")
    return isl


async def test_the_gateway_cuts_silent_slow_and_idle_clients(make_agent: AgentFactory) -> None:
    isl = await gateway(make_agent, header_timeout=LIMIT, body_timeout=LIMIT, idle_timeout=LIMIT)
    host, port = isl.plugin.address
    key = isl.key("alice")
    # A flood of silent sockets (well under max_connections), each cut at the header deadline.
    silent = [await asyncio.open_connection(host, port) for _ in range(100)]
    half = await asyncio.open_connection(host, port)
    half[1].write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
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
    for reader, _ in [*silent, half, trickle, slow_body]:
        data, after = await closed(reader)
        assert after < CLOSED_WITHIN and b"200 OK" not in data
    dripping.cancel()
    # A kept-alive connection that goes idle is closed too.
    idle_r, idle_w = await asyncio.open_connection(host, port)
    idle_w.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    data, _ = await closed(idle_r)
    assert data.startswith(b"HTTP/1.1 200")
    # So is one that sends a lone CRLF after its response (uvicorn drops its keep-alive timer on
    # any byte; no request begins, so only the header deadline is left to cut it).
    crlf_r, crlf_w = await asyncio.open_connection(host, port)
    crlf_w.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await crlf_r.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    crlf_w.write(b"\r\n")
    await closed(crlf_r)
    for _, w in [*silent, half, trickle, slow_body, (idle_r, idle_w), (crlf_r, crlf_w)]:
        w.close()


async def test_the_gateway_caps_open_sockets(make_agent: AgentFactory) -> None:
    # Deadlines far off: whatever closes sooner is the cap.
    isl = await gateway(make_agent, max_connections=20, header_timeout=LONG, idle_timeout=LONG)
    host, port = isl.plugin.address
    async with httpx.AsyncClient(base_url=isl.url) as kept:  # a connection from before
        assert (await kept.get("/health")).status_code == 200
        held = [await asyncio.open_connection(host, port) for _ in range(19)]
        await eventually(lambda: len(isl.plugin.server.server_state.connections) == 20)
        over = [await asyncio.open_connection(host, port) for _ in range(30)]
        for reader, _ in over:  # answered and closed at once, not at a deadline
            data, _ = await closed(reader)
            assert data.startswith(b"HTTP/1.1 503") and b"too many open connections" in data
            assert b"retry-after: 1" in data.lower()
        # The connections already open are served on.
        assert (await kept.get("/health")).status_code == 200
        for _, w in held:  # once some go, new ones are served again
            w.close()
        await eventually(lambda: len(isl.plugin.server.server_state.connections) == 1)
        async with httpx.AsyncClient(base_url=isl.url) as fresh:
            assert (await fresh.get("/health")).status_code == 200
        for _, w in over:
            w.close()


async def test_a_body_the_server_is_not_reading_yet_is_no_stall() -> None:
    """The body deadline is the client's: while the app has yet to ask for the body (uvicorn
    stops reading past 64 KiB; a client expecting ``100 Continue`` waits for it), it waits, and
    its clock starts when the server asks: a client that answers ``100 Continue`` just before
    the deadline's next tick is not cut."""

    async def busy_app(scope: dict, receive: Callable, send: Callable) -> None:
        # Busy for longer than the body deadline, asking for the body just before its third tick.
        await asyncio.sleep(2.9 * LIMIT)
        size = 0
        while True:
            message = await receive()
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"%d" % size})

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    sock.setblocking(False)
    host, port = sock.getsockname()
    limits = HttpLimits(header_timeout=LIMIT, body_timeout=LIMIT, max_connections=10)
    server = uvicorn.Server(
        uvicorn.Config(busy_app, log_level="warning", lifespan="off", http=guarded_protocol(limits))
    )
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await eventually(lambda: server.started)
        big = b"x" * 300_000
        r, w = await asyncio.open_connection(host, port)
        w.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(big), big))
        async with asyncio.timeout(CLOSED_WITHIN):
            head = await r.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        w.close()
        r, w = await asyncio.open_connection(host, port)
        w.write(b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        async with asyncio.timeout(CLOSED_WITHIN):
            assert (await r.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 100")
            await asyncio.sleep(0.5 * LIMIT)  # past that tick, within a deadline of the ask
            w.write(b"hello")
            assert (await r.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        w.close()
    finally:
        server.should_exit = True
        await serving
