"""Brokers linked into a mesh: routing across hops, exactly-once delivery over cycles, failover,
and revocations that reach every broker."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from atoll.agent.errors import NoResponder
from atoll.agent.identity import AgentKeys
from atoll.agent.node import Agent
from atoll.agent.runtime import AgentRuntime
from atoll.broker import peering
from atoll.broker.identity import issue_broker_dir
from atoll.broker.server import BrokerServer
from atoll.protocol.session import Publication
from atoll.tenancy.operator import OperatorStore
from support.overlay import eventually


async def start_broker(
    op: OperatorStore, tmp: Path, name: str, peers: list[str], port: int = 0
) -> BrokerServer:
    d = tmp / name
    if not (d / "broker").exists():
        issue_broker_dir(op, d, name)
    server = BrokerServer.from_data_dir(d, peers=peers, mesh_refresh=0.5, ping_interval=1.0)
    return await server.start("127.0.0.1", port)


async def converged(brokers: list[BrokerServer]) -> None:
    names = {b.keys.name for b in brokers}
    await eventually(
        lambda: all(set(b.mesh.state.next_hops()) == names - {b.keys.name} for b in brokers),
        timeout=10,
    )


@pytest.fixture
async def triangle(operator, tmp_path):
    b1 = await start_broker(operator, tmp_path, "b1", [])
    b2 = await start_broker(operator, tmp_path, "b2", [b1.url])
    b3 = await start_broker(operator, tmp_path, "b3", [b1.url, b2.url])
    brokers = [b1, b2, b3]
    await converged(brokers)
    yield brokers
    for b in brokers:
        await b.stop()


async def agent(op: OperatorStore, name: str, urls: list[str], tenant: str = "acme") -> Agent:
    keys = AgentKeys.issue(op, tenant, name, ["agent"])
    rt = await AgentRuntime.start(
        op.root / "agents" / tenant / name, urls, keys=keys, ping_interval=1.0, connect_timeout=5
    )
    return rt.agent


async def test_triangle_rpc_and_exactly_once_pubsub(operator, triangle) -> None:
    b3 = triangle[2]
    agents = [await agent(operator, f"a{i}", [b.url]) for i, b in enumerate(triangle, 1)]
    a1, a2, a3 = agents
    try:
        got: dict[str, list[object]] = {a.name: [] for a in agents}
        for a in agents:

            def note(p: Publication, n: str = a.name) -> None:
                got[n].append(p.data)

            await a.subscribe("app.news.>", note)
        await eventually(
            lambda: all(
                b.mesh.state.interested("acme", "app.news.x")
                == {x.keys.name for x in triangle} - {b.keys.name}
                for b in triangle
            ),
            timeout=10,
        )
        assert (await a1.call("a3", "ping"))["agent"] == "a3"
        assert (await a3.call("a2/system", "ping"))["agent"] == "a2"
        for i in range(50):
            await a2.publish(f"app.news.{i % 3}", i)
        await eventually(lambda: all(len(v) == 50 for v in got.values()))
        await asyncio.sleep(0.3)  # any duplicate would have arrived by now
        assert all(v == list(range(50)) for v in got.values()), got
        with pytest.raises(NoResponder, match="no agent 'nobody'"):
            await a1.call("nobody", "ping")
        # Another tenant on the same mesh sees nothing and reaches nobody.
        other = await agent(operator, "a1", [b3.url], tenant="globex")
        heard: list[str] = []
        await other.subscribe("app.>", lambda p: heard.append(p.subject))
        await other.subscribe("discovery.announce.*", lambda p: heard.append(p.subject))
        await other.flush()
        await a1.publish("app.news.x", "private")
        await asyncio.sleep(0.3)
        assert heard and all(s == "discovery.announce.a1" for s in heard)  # only its own
        with pytest.raises(NoResponder):
            await other.call("a2", "ping")
        await other.stop()
    finally:
        for a in agents:
            await a.stop()


async def test_line_of_brokers_routes_over_two_hops(operator, tmp_path) -> None:
    b1 = await start_broker(operator, tmp_path, "l1", [])
    b2 = await start_broker(operator, tmp_path, "l2", [b1.url])
    b3 = await start_broker(operator, tmp_path, "l3", [b2.url])
    brokers = [b1, b2, b3]
    try:
        await converged(brokers)
        x = await agent(operator, "x", [b1.url])
        z = await agent(operator, "z", [b3.url])
        sub = await x.subscribe("app.z.*")
        await eventually(lambda: b3.mesh.state.interested("acme", "app.z.1") == {"l1"})
        await eventually(lambda: b1.mesh.state.locate("acme", "z") == "l3")
        assert (await x.call("z", "ping"))["agent"] == "z"
        await z.publish("app.z.1", "hello")
        assert (await sub.next(timeout=5)).data == "hello"
        await x.stop()
        await z.stop()
    finally:
        for b in brokers:
            await b.stop()


async def test_a_new_agents_first_message_does_not_overtake_its_advert(
    operator, tmp_path, monkeypatch
) -> None:
    """A message relayed from an agent that just connected reaches a broker that must already
    know the sender (the receiver asks it for the sender's credential to open the message)."""
    b1 = await start_broker(operator, tmp_path, "b1", [])
    b2 = await start_broker(operator, tmp_path, "b2", [b1.url])
    try:
        await converged([b1, b2])
        x = await agent(operator, "x", [b1.url])
        await eventually(lambda: b2.mesh.state.locate("acme", "x") is not None)
        monkeypatch.setattr("atoll.broker.peering.ADVERT_DELAY", 30.0)  # y's advert: coalescing
        y = await agent(operator, "y", [b2.url])
        assert (await y.call("x", "ping", timeout=5))["agent"] == "x"
        await x.stop()
        await y.stop()
    finally:
        await b1.stop()
        await b2.stop()


async def test_broker_death_failover_and_reconvergence(operator, triangle) -> None:
    b1, b2, b3 = triangle
    mover = await agent(operator, "mover", [b3.url, b1.url])
    caller = await agent(operator, "caller", [b2.url])
    try:
        await eventually(lambda: b2.mesh.state.locate("acme", "mover") == "b3")  # advertised
        assert (await caller.call("mover", "ping"))["pong"] is True
        await b3.stop()
        loop = asyncio.get_running_loop()
        start = loop.time()
        await mover.link.wait_connected(5)
        await eventually(lambda: mover.link.url == b1.url and mover.link.connected.is_set())

        async def reachable() -> bool:
            try:
                await caller.call("mover", "ping", timeout=0.5)
                return True
            except Exception:
                return False

        while not await reachable():
            assert loop.time() - start < 5, "mover unreachable 5 s after its broker died"
            await asyncio.sleep(0.05)
        await eventually(lambda: set(b1.mesh.state.next_hops()) == {"b2"})
    finally:
        await mover.stop()
        await caller.stop()


async def test_revocation_reaches_every_broker(operator, triangle) -> None:
    b1, _, b3 = triangle
    victim = await agent(operator, "victim", [b3.url])
    admin = await agent(operator, "admin", [b1.url])
    try:
        await admin.send_revocation(operator.revoke("acme", name="victim"))
        await eventually(lambda: victim.link.refused.is_set(), timeout=5)
        for b in triangle:

            def revoked(b: BrokerServer = b) -> bool:
                return len(b.state.revocation_blobs()) == 1

            await eventually(revoked)
    finally:
        await victim.stop()
        await admin.stop()


async def test_enrollment_token_is_one_time_across_the_mesh(operator, triangle) -> None:
    b1, b2, _ = triangle
    text = operator.token("acme", ["inference"], ttl_s=600).encode()
    from atoll.agent.errors import ConnectionLost
    from atoll.tenancy.credentials import EnrollmentToken

    first = Agent(AgentKeys.from_token(EnrollmentToken.decode(text), "gpu-1"), [b1.url])
    await first.start(5)
    await eventually(
        lambda: b2.state._db.execute("SELECT count(*) FROM enrollments").fetchone()[0] == 1
    )
    second = Agent(AgentKeys.from_token(EnrollmentToken.decode(text), "gpu-2"), [b2.url])
    with pytest.raises(ConnectionLost, match="already used"):
        await second.start(5)
    await second.stop()
    await first.stop()


async def test_a_remote_brokers_refusal_reaches_the_publisher_once(
    operator, tmp_path, monkeypatch
) -> None:
    """A broker two hops away that does not keep a publication (its kept budget is full) or
    refuses it (its view of the publisher's permissions differs) tells the publisher why, over
    the mesh, as the publisher's own broker would; a burst of such publications draws one
    notice, not one each."""
    monkeypatch.setattr(peering, "NOTICE_EVERY", 2.0)
    b1 = await start_broker(operator, tmp_path, "r1", [])
    b2 = await start_broker(operator, tmp_path, "r2", [b1.url])
    b3 = await start_broker(operator, tmp_path, "r3", [b2.url])
    brokers = [b1, b2, b3]
    try:
        await converged(brokers)
        pub = await agent(operator, "pub", [b1.url])
        sub = await agent(operator, "sub", [b3.url])
        notices: list[str] = []

        def note(record: logging.LogRecord) -> bool:
            if "broker_error" in record.getMessage():
                notices.append(record.getMessage())
            return True

        pub.log.logger.addFilter(note)
        got: list[object] = []  # the test's publications (not the agents' own announcements)

        def heard(p: Publication) -> None:
            if isinstance(p.data, int):
                got.append(p.data)

        await sub.subscribe("discovery.announce.pub", heard)
        await sub.subscribe("app.state.*", heard)
        await eventually(lambda: b1.mesh.state.interested("acme", "app.state.y") == {"r3"})
        await eventually(lambda: b3.mesh.state.locate("acme", "pub") == "r1")

        full = "tenant 'acme' would keep over 0 bytes"
        monkeypatch.setattr(b3.router, "kept_room", lambda *args: full)
        for i in range(20):
            await pub.publish("discovery.announce.pub", i, keep=True)
        await eventually(lambda: len(got) == 20)  # delivered all the same
        await eventually(lambda: len(notices) == 1)
        assert f"broker r3 did not keep 'discovery.announce.pub': {full}" in notices[0]

        await asyncio.sleep(2.0)  # the next notice is due
        monkeypatch.setattr(b3.mesh, "_may", lambda *args: args[3] != "app.state.y")
        for i in range(20):
            await pub.publish("app.state.y", i)
        await eventually(lambda: len(notices) == 2)
        assert "broker r3 refused a publication on 'app.state.y'" in notices[1]
        await asyncio.sleep(0.3)  # any further notice would have arrived by now
        assert len(notices) == 2 and len(got) == 20
        await pub.stop()
        await sub.stop()
    finally:
        for b in brokers:
            await b.stop()
