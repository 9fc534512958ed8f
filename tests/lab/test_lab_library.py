"""The lab itself (``support.lab``): namespaces joined through the hub, nftables loss and
partitions (one-way ones too), the relay's delay, rate, stall and cut, and teardown."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from pathlib import Path

import pytest

from support.lab import Island, Lab, NetNs, Relay, namespaces

pytestmark = pytest.mark.lab


async def echo_server(isl: Island, port: int = 9000) -> asyncio.Server:
    """A TCP echo server on ``isl``'s address."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(serve, sock=await isl.netns.listen(isl.ip, port))


async def udp_delivered(sender: NetNs, to: Island, count: int = 400) -> int:
    """UDP datagrams from ``sender`` that reach ``to`` (of ``count``, paced)."""
    rx = await to.netns._make(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    rx.bind((to.ip, 9100))
    rx.setblocking(False)
    tx = await sender._make(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    got = 0

    def drain() -> int:
        n = 0
        while True:
            try:
                rx.recv(16)
                n += 1
            except BlockingIOError:
                return n

    try:
        with contextlib.suppress(PermissionError):  # an output drop rule: EPERM
            tx.sendto(b"arp", (to.ip, 9101))  # resolve the neighbour first (another port)
        await asyncio.sleep(0.05)
        for i in range(count):  # in batches, drained as they come: no receive buffer overflow
            with contextlib.suppress(PermissionError):
                tx.sendto(b"x", (to.ip, 9100))
            if i % 20 == 19:
                await asyncio.sleep(0.005)
                got += drain()
        await asyncio.sleep(0.1)
        return got + drain()
    finally:
        rx.close()
        tx.close()


async def test_islands_loss_and_partitions(lab: Lab) -> None:
    a, b = lab.island("a"), lab.island("b")
    assert {f"{lab.id}-hub", a.ns, b.ns} <= set(namespaces())
    assert await udp_delivered(a.netns, b) == 400  # a healthy bridge
    b.loss(50)
    assert 120 < await udp_delivered(a.netns, b) < 280  # numgen: about half
    b.partition(outbound=False)  # one way: nothing reaches b, b still sends
    assert await udp_delivered(a.netns, b) == 0
    assert await udp_delivered(b.netns, a) == 400
    b.partition()
    assert await udp_delivered(b.netns, a) == 0
    b.heal()
    assert await udp_delivered(a.netns, b) == 400
    # Loopback inside a partitioned island is untouched.
    b.partition()
    assert await udp_delivered(b.netns, b) == 400


async def test_relay_delay_rate_stall_and_cut(lab: Lab) -> None:
    b = lab.island("b")
    server = await echo_server(b)
    relay = (await lab.portal(b, 9000)).profile(rtt=0.1)
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    try:
        t = time.monotonic()
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        assert 0.09 < time.monotonic() - t < 0.5  # the round trip: 50 ms each way
        relay.profile(rate=2_000_000)  # 2 MB/s each way, no delay
        t = time.monotonic()
        writer.write(b"x" * 1_000_000)
        await reader.readexactly(1_000_000)
        assert 0.4 < time.monotonic() - t < 2.0  # ~0.5 s each way, pipelined
        relay.profile()
        relay.down.stalled = True
        writer.write(b"held")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.readexactly(4), 0.3)
        relay.down.stalled = False
        assert await asyncio.wait_for(reader.readexactly(4), 2) == b"held"
        assert relay.cut() == 2  # both legs of the one connection
        assert await asyncio.wait_for(reader.read(), 2) == b""
    finally:
        writer.close()
        server.close()


async def test_teardown_kills_processes_and_deletes_namespaces(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    async with lab:
        isl = lab.island("a")
        proc = await asyncio.create_subprocess_exec("ip", "netns", "exec", isl.ns, "sleep", "300")
        await asyncio.sleep(0.2)
    assert not [ns for ns in namespaces() if ns.startswith(f"{lab.id}-")]
    assert await asyncio.wait_for(proc.wait(), 5) != 0  # killed with its namespace


def test_relay_profile_is_per_direction() -> None:
    relay = Relay(NetNs(None), "127.0.0.1", NetNs(None), ("127.0.0.1", 1)).profile(0.04, 1e6)
    assert (relay.up.delay, relay.down.delay, relay.up.rate) == (0.02, 0.02, 1e6)
    relay.up.set(delay=0.1)
    assert relay.down.delay == 0.02
    with pytest.raises(AttributeError):
        relay.up.set(jitter=1)
