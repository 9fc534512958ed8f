"""The mesh at sizes the fixed limits of old could not reach, on loopback: a line of 25 brokers
delivers end to end, a ring of 24 routes around a dead broker, 1,500 agents on one broker are
all routable from its peer, and idle links with the default timers stay up. Also the
keepalive itself: a new ping interval takes effect at once, for a healthy and a frozen peer."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from atoll.agent.errors import DeadlineExceeded
from atoll.agent.identity import AgentKeys
from atoll.agent.node import Agent
from atoll.agent.runtime import AgentRuntime
from atoll.broker.identity import issue_broker_dir
from atoll.broker.server import BrokerServer
from atoll.protocol.frames import FrameType, decode_message
from atoll.tenancy.operator import OperatorStore
from atoll.transport import WebSocket, connect, serve
from support.overlay import eventually, raw_session


async def start_broker(
    op: OperatorStore, tmp: Path, name: str, peers: list[str], **options: Any
) -> BrokerServer:
    d = tmp / name
    if not (d / "broker").exists():
        issue_broker_dir(op, d, name)
    options = {"mesh_refresh": 0.5, "ping_interval": 1.0} | options
    server = BrokerServer.from_data_dir(d, peers=peers, **options)
    return await server.start("127.0.0.1", 0)


@contextlib.asynccontextmanager
async def brokers_up(
    op: OperatorStore, tmp: Path, wiring: list[tuple[str, list[str]]], **options: Any
) -> AsyncIterator[dict[str, BrokerServer]]:
    """Brokers started in order, each dialling the named earlier ones; all stopped on exit."""
    up: dict[str, BrokerServer] = {}
    try:
        for name, peers in wiring:
            up[name] = await start_broker(op, tmp, name, [up[p].url for p in peers], **options)
        yield up
    finally:
        await asyncio.gather(*(b.stop() for b in up.values()), return_exceptions=True)


async def converged(brokers: list[BrokerServer], timeout: float = 20) -> None:
    names = {b.keys.name for b in brokers}
    await eventually(
        lambda: all(set(b.mesh.state.next_hops()) == names - {b.keys.name} for b in brokers),
        timeout=timeout,
    )


async def agent(op: OperatorStore, name: str, urls: list[str]) -> Agent:
    keys = AgentKeys.issue(op, "acme", name, ["agent"])
    rt = await AgentRuntime.start(
        op.root / "agents" / "acme" / name, urls, keys=keys, ping_interval=1.0, connect_timeout=5
    )
    return rt.agent


async def reachable(caller: Agent, dst: str, within: float) -> float:
    """Seconds until ``caller`` gets an answer from ``dst``; fails after ``within``."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while True:
        try:
            await caller.call(dst, "ping", timeout=0.5)
            return loop.time() - start
        except Exception:
            if loop.time() - start > within:
                raise
            await asyncio.sleep(0.05)


async def test_a_line_of_25_brokers_delivers_end_to_end(operator, tmp_path) -> None:
    names = [f"l{i:02}" for i in range(25)]
    wiring = [(n, [names[i - 1]] if i else []) for i, n in enumerate(names)]
    async with brokers_up(operator, tmp_path, wiring) as up:
        first, last = up[names[0]], up[names[-1]]
        await converged(list(up.values()))
        assert first.mesh.state.next_hops()[names[-1]] == names[1]
        assert first.mesh.state.hop_limit() >= 24  # a fixed 16 never reached the far end
        x = await agent(operator, "x", [first.url])
        z = await agent(operator, "z", [last.url])
        try:
            sub = await x.subscribe("app.z.*")
            await eventually(lambda: last.mesh.state.interested("acme", "app.z.1") == {"l00"}, 10)
            await eventually(lambda: first.mesh.state.locate("acme", "z") == "l24", 10)
            assert (await x.call("z", "ping", timeout=5))["agent"] == "z"
            assert (await z.call("x", "ping", timeout=5))["agent"] == "x"
            await z.publish("app.z.1", "across 24 hops")
            assert (await sub.next(timeout=5)).data == "across 24 hops"
        finally:
            await x.stop()
            await z.stop()


async def test_a_ring_of_24_routes_around_a_dead_broker(operator, tmp_path) -> None:
    names = [f"r{i:02}" for i in range(24)]
    wiring = [(n, [names[i - 1]] if i else []) for i, n in enumerate(names)]
    wiring[-1] = (names[-1], [names[-2], names[0]])  # close the ring
    async with brokers_up(operator, tmp_path, wiring) as up:
        await converged(list(up.values()))
        # x and y sit on the two neighbours of r00: two hops apart through it, 22 around.
        x = await agent(operator, "x", [up["r01"].url])
        y = await agent(operator, "y", [up["r23"].url])
        try:
            await eventually(lambda: up["r01"].mesh.state.locate("acme", "y") == "r23", 10)
            assert up["r01"].mesh.state.next_hops()["r23"] == "r00"
            assert (await x.call("y", "ping", timeout=5))["agent"] == "y"
            await up.pop("r00").stop()
            took = await reachable(x, "y", within=10)
            assert up["r01"].mesh.state.next_hops()["r23"] == "r02"  # the long way round
            assert (await y.call("x", "ping", timeout=5))["agent"] == "x"
            assert took < 5, f"rerouted after {took:.2f}s"
        finally:
            await x.stop()
            await y.stop()


async def test_1500_agents_on_one_broker_are_all_routable_from_its_peer(operator, tmp_path) -> None:
    """An advert holding every agent once broke the decoder's limit of 1024 entries at 1,100
    agents, and the peer lost every route; records now travel in bounded chunks."""
    async with brokers_up(operator, tmp_path, [("b1", []), ("b2", ["b1"])]) as up:
        b1, b2 = up["b1"], up["b2"]
        await converged([b1, b2])
        link = b2.mesh.links["b1"]
        sessions = []
        try:
            for batch in range(15):
                sessions += await asyncio.gather(
                    *(raw_session(operator, b1, f"n{batch}-{i}") for i in range(100))
                )
            names = [f"n{b}-{i}" for b in range(15) for i in range(100)]
            state = b2.mesh.state
            # Generous: a busy CI machine takes its time over 1,500 handshakes.
            await eventually(lambda: all(state.locate("acme", n) == "b1" for n in names), 60)
            assert all(state.credential("acme", n) for n in names)
            # A broker joining now gets all 1,500 at once, in chunks.
            b3 = await start_broker(operator, tmp_path, "b3", [b2.url])
            try:
                await eventually(
                    lambda: all(b3.mesh.state.locate("acme", n) == "b1" for n in names), 60
                )
            finally:
                await b3.stop()
            # And one of them gets a message from an agent at the peer.
            caller = await agent(operator, "caller", [b2.url])
            try:
                with pytest.raises(DeadlineExceeded):  # a raw session: it never answers
                    await caller.call("n14-99", "ping", timeout=0.5)
                got = [decode_message(m)[0] for m in await drain(sessions[-1])]
                assert any(f.type is FrameType.MSG and f.header["src"] for f in got)
            finally:
                await caller.stop()
            assert b2.mesh.links["b1"] is link  # never re-made
        finally:
            await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)


async def drain(ws: Any, wait: float = 2.0) -> list[bytes]:
    """What a raw session received within ``wait`` seconds."""
    out = []
    with contextlib.suppress(asyncio.TimeoutError):
        async with asyncio.timeout(wait):
            while True:
                out.append(await ws.recv())
    return out


async def test_idle_links_with_the_default_timers_stay_up(operator, tmp_path) -> None:
    """Three brokers with the default settings, and three whose links are truly silent but for
    keepalives (digests every 60 s): no link is re-made over 25 s. Before, the listener's
    first ping came after its own 10 s while the mesh's 2 s interval applied to the
    deadline, and a silent link was dropped and re-made."""
    default = [("d1", []), ("d2", ["d1"]), ("d3", ["d1", "d2"])]
    silent = [("s1", []), ("s2", ["s1"]), ("s3", ["s1", "s2"])]
    async with (
        brokers_up(operator, tmp_path, default, mesh_refresh=2.0, ping_interval=10.0) as d,
        brokers_up(operator, tmp_path, silent, mesh_refresh=60.0, ping_interval=10.0) as s,
    ):
        trios = [list(d.values()), list(s.values())]
        for trio in trios:
            await converged(trio)
        links = {
            (b.keys.name, p): link
            for trio in trios
            for b in trio
            for p, link in b.mesh.links.items()
        }
        assert len(links) == 12
        await asyncio.sleep(25)
        now = {
            (b.keys.name, p): link
            for trio in trios
            for b in trio
            for p, link in b.mesh.links.items()
        }
        assert now == links
        assert all(link.ws.open for link in now.values())


# --- the keepalive itself ------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def ws_pair(ping_interval: float) -> AsyncIterator[tuple[WebSocket, WebSocket]]:
    accepted: asyncio.Future[WebSocket] = asyncio.get_running_loop().create_future()
    server = await serve(
        accepted.set_result,
        "127.0.0.1",
        0,
        max_message=1 << 20,
        limit=1 << 24,
        ping_interval=ping_interval,
    )
    port = server.sockets[0].getsockname()[1]
    client = await connect(
        f"ws://127.0.0.1:{port}", max_message=1 << 20, ping_interval=ping_interval, open_timeout=5
    )
    theirs = await accepted
    try:
        yield client, theirs
    finally:
        client.abort()
        theirs.abort()
        server.close()
        await server.wait_closed()


async def test_a_shorter_ping_interval_applies_at_once_and_keeps_a_healthy_idle_link() -> None:
    async with ws_pair(ping_interval=2.0) as (client, theirs):
        for ws in (client, theirs):
            ws.ping_interval = 0.5  # as the mesh does on attach
        # Past the first ping of the old schedule (2 s), without a message: pings and pongs.
        await asyncio.sleep(3.0)
        assert client.open and theirs.open


async def test_a_frozen_peer_is_dropped_by_the_new_deadline() -> None:
    async with ws_pair(ping_interval=10.0) as (client, theirs):
        assert theirs.transport is not None
        theirs.transport.pause_reading()  # a hung host: pongs stop
        client.ping_interval = 0.2
        start = time.monotonic()
        await asyncio.wait_for(client.closed, 3)  # not the 10 s of the first schedule
        assert time.monotonic() - start < 1.0  # silent > 2x the interval, at the next ping
