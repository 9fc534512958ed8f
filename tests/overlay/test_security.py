"""Hostile and broken input at the overlay: a broker that snoops, tampers or replays; garbage,
oversized and spoofed frames; expired, revoked and reused credentials; slow consumers."""

from __future__ import annotations

import asyncio
import os

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from atoll.agent.errors import ConnectionLost, DeadlineExceeded
from atoll.agent.identity import AgentKeys
from atoll.agent.node import Agent
from atoll.broker.server import BrokerServer
from atoll.protocol.errors import AuthError
from atoll.protocol.frames import Frame, FrameType, decode_message, encode_frame, pack
from atoll.protocol.handshake import ClientHandshake
from atoll.protocol.trust import now_ms
from atoll.tenancy import credentials as cred
from atoll.tenancy.operator import OperatorStore
from atoll.tenancy.permissions import ANY
from support.overlay import eventually, intercept, raw_session

SECRET = b"PLAINTEXT-MARKER-7f3a9c"


async def broker_refusal(broker: BrokerServer, keys: AgentKeys) -> Frame:
    """Run the handshake by hand with ``keys``; return the broker's fatal ERROR frame."""
    ws = await connect(broker.url, compression=None)
    hs = ClientHandshake(keys.key, keys.credential, keys.operator_pub)
    (hello,) = decode_message(await ws.recv())
    await ws.send(hs.receive_hello(hello))
    frames = await closed_with(ws)
    assert frames[-1].type is FrameType.ERROR and frames[-1].header["fatal"] is True
    return frames[-1]


async def closed_with(ws: ClientConnection) -> list[Frame]:
    """Read until the broker closes the connection; return the frames it sent first."""
    frames: list[Frame] = []
    with pytest.raises(ConnectionClosed):
        async with asyncio.timeout(5):
            while True:
                frames += decode_message(await ws.recv())
    return frames


async def test_broker_never_sees_plaintext(broker, make_agent) -> None:
    relayed: list[bytes] = []
    intercept(broker, lambda s, f: relayed.append(f.encode()))
    a = await make_agent("alpha")
    b = await make_agent("beta")

    async def echo(params, call):
        return params

    b.agent.handle("test", "echo", echo, ANY)
    sub = await b.agent.subscribe("app.secrets")
    await b.agent.flush()
    assert await a.agent.call("beta/test", "echo", SECRET) == SECRET
    await a.agent.publish("app.secrets", {"note": SECRET})
    assert (await sub.next(timeout=5)).data == {"note": SECRET}
    assert len(relayed) >= 3
    assert not [f for f in relayed if SECRET in f]


@pytest.fixture
async def counting(make_agent):
    """alpha, beta, and the list of what beta/test.count has served (it returns the count)."""
    a = await make_agent("alpha")
    b = await make_agent("beta")
    served: list[object] = []

    async def count(params, call):
        served.append(params)
        return len(served)

    b.agent.handle("test", "count", count, ANY)
    return a, b, served


async def test_tampering_broker_is_detected(broker, counting) -> None:
    a, _, served = counting
    await a.agent.call("beta/test", "count", 0)  # keys exchanged, then the broker turns bad

    def tamper(session, frame: Frame) -> Frame | None:
        if frame.type is FrameType.MSG and frame.header["dst"] == "beta/test":
            payload = bytearray(frame.payload)
            payload[-1] ^= 0x01
            return Frame(frame.type, frame.header, bytes(payload))
        return None

    untap = intercept(broker, tamper)
    with pytest.raises(DeadlineExceeded):
        await a.agent.call("beta/test", "count", 1, timeout=0.5)
    untap()
    assert await a.agent.call("beta/test", "count", 2) == 2
    assert served == [0, 2]


async def test_replayed_message_is_rejected(broker, counting) -> None:
    a, b, served = counting
    captured: list[tuple[object, Frame]] = []
    untap = intercept(
        broker, lambda s, f: captured.append((s, f)) if f.type is FrameType.MSG else None
    )
    assert await a.agent.call("beta/test", "count", "once") == 1
    untap()
    session, request = next((s, f) for s, f in captured if f.header["dst"] == "beta/test")
    for _ in range(3):
        broker.router.handle(session, request)  # the broker replays the sealed request
    await b.agent.flush()
    await asyncio.sleep(0.2)
    assert served == ["once"]


async def test_misrouted_payload_is_rejected(broker, make_agent) -> None:
    """A broker re-labelling a sealed payload for another plugin is caught by the envelope."""
    a = await make_agent("alpha")
    b = await make_agent("beta")
    hits: list[str] = []

    async def one(params, call):
        hits.append("one")

    async def two(params, call):
        hits.append("two")

    b.agent.handle("p1", "go", one, ANY)
    b.agent.handle("p2", "go", two, ANY)
    await a.agent.call("beta/p1", "go")

    def relabel(session, frame: Frame) -> Frame | None:
        if frame.type is FrameType.MSG and frame.header["dst"] == "beta/p1":
            return Frame(frame.type, {**frame.header, "dst": "beta/p2"}, frame.payload)
        return None

    intercept(broker, relabel)
    with pytest.raises(DeadlineExceeded):
        await a.agent.call("beta/p1", "go", timeout=0.5)
    assert hits == ["one"]


async def test_garbage_oversized_and_spoofed_frames_cut_only_the_sender(
    operator, broker, make_agent
) -> None:
    a = await make_agent("alpha")
    await make_agent("beta")

    garbage = await raw_session(operator, broker, "garbage")
    await garbage.send(os.urandom(64) + b"\xc1")
    frames = await closed_with(garbage)
    assert frames and frames[-1].type is FrameType.ERROR and frames[-1].header["fatal"]

    text = await raw_session(operator, broker, "text")
    await text.send("not binary")
    await closed_with(text)

    big = await raw_session(operator, broker, "big")
    await big.send(b"\x00" * (broker.max_message + 1))
    await closed_with(big)
    assert big.close_code == 1009  # message too big

    spoof = await raw_session(operator, broker, "spoof")
    await spoof.send(encode_frame(FrameType.MSG, {"id": 1, "src": "alpha", "dst": "beta"}, b"x"))
    frames = await closed_with(spoof)
    assert frames[-1].header["code"] == "spoofed"

    unauth = await connect(broker.url, compression=None)
    await unauth.recv()  # HELLO
    await unauth.send(b"\x93\x01\x02")  # truncated garbage instead of AUTH
    frames = await closed_with(unauth)
    assert frames[-1].type is FrameType.ERROR

    assert (await a.agent.call("beta", "ping"))["pong"] is True


async def test_expired_credential_refused(operator, broker) -> None:
    tenant = operator.tenant("acme")
    keys = AgentKeys.issue(operator, "acme", "old", ["agent"])
    claims = cred.agent_claims(keys.key.verify_key.encode(), "old", "acme", ["agent"], "", 60)
    claims["iat"] -= 3_600_000
    claims["exp"] = now_ms() - 1000
    keys.credential = pack({"tenant": tenant.claim, "agent": cred.sign(tenant.key, claims)})
    with pytest.raises(AuthError, match="credential expired"):
        Agent(keys, [broker.url])  # the agent itself says so before trying
    # ... and the broker refuses it all the same.
    refusal = await broker_refusal(broker, keys)
    assert refusal.header["code"] == "expired"
    assert "credential expired" in refusal.header["reason"]


async def test_foreign_operator_refused(tmp_path, broker) -> None:
    other = OperatorStore(tmp_path / "other")
    other.init()
    keys = AgentKeys.issue(other, "default", "mallory", ["admin"])
    keys.operator_pub = broker.keys.operator_pub  # it knows which operator the broker trusts
    refusal = await broker_refusal(broker, keys)
    assert refusal.header["reason"] == "tenant claim has a bad signature"


async def test_revoked_agent_is_cut_off_and_refused(operator, broker, make_agent) -> None:
    a = await make_agent("alpha")
    victim = await make_agent("victim")
    admin = await make_agent("admin", roles=("admin",))
    await admin.agent.send_revocation(operator.revoke("acme", name="victim"))
    await eventually(lambda: victim.agent.link.refused.is_set())
    assert victim.agent.link.fatal is not None and victim.agent.link.fatal.code == "revoked"
    with pytest.raises(Exception, match="no agent 'victim'"):
        await a.agent.call("victim", "ping")
    # A fresh credential issued after the revocation is admitted again.
    again = Agent(AgentKeys.issue(operator, "acme", "victim", ["agent"]), [broker.url])
    await again.start(wait=5)
    await again.stop()
    assert (await a.agent.call("admin", "ping"))["pong"] is True


async def test_revocation_survives_broker_restart(operator) -> None:
    server = BrokerServer.from_data_dir(operator.root)
    await server.start()
    keys = AgentKeys.issue(operator, "acme", "gone", ["agent"])
    server.state.add_revocation(operator.revoke("acme", pub=keys.key.verify_key.encode()))
    await server.stop()
    server.state.close()
    server = BrokerServer.from_data_dir(operator.root)
    await server.start()
    agent = Agent(keys, [server.url])
    try:
        with pytest.raises(ConnectionLost, match="revoked"):
            await agent.start(wait=5)
    finally:
        await agent.stop()
        await server.stop()


async def test_enrollment_token_is_one_time(operator, broker) -> None:
    token = operator.token("acme", ["inference"], ttl_s=600)
    text = token.encode()
    first = Agent(AgentKeys.from_token(cred.EnrollmentToken.decode(text), "gpu-1"), [broker.url])
    await first.start(wait=5)
    assert first.ident.roles == ("inference",)
    second = Agent(AgentKeys.from_token(cred.EnrollmentToken.decode(text), "gpu-2"), [broker.url])
    with pytest.raises(ConnectionLost, match="enrollment token already used"):
        await second.start(wait=5)
    await second.stop()
    # The rightful holder reconnects with the credential it redeemed.
    await first.stop()
    again = Agent(first.keys, [broker.url])
    await again.start(wait=5)
    await again.stop()


async def test_slow_consumer_is_disconnected(operator, tmp_path, make_agent) -> None:
    server = BrokerServer.from_data_dir(
        operator.root, max_message=64 * 1024, queue_limit=512 * 1024
    )
    await server.start()
    try:
        pub = await make_agent("pub", brokers=[server.url])
        fast = await make_agent("fast", brokers=[server.url])
        got: list[object] = []
        await fast.agent.subscribe("app.flood", lambda p: got.append(p))
        slow = await raw_session(operator, server, "slow")
        await slow.send(encode_frame(FrameType.SUB, {"sid": 1, "subj": "app.flood"}))
        await pub.agent.flush()
        slow.transport.pause_reading()  # a consumer that stops reading
        payload = os.urandom(4096)
        for _ in range(2000):
            await pub.agent.publish("app.flood", payload)
        await eventually(lambda: "slow" not in server.router.agents("acme"), timeout=10)
        await eventually(lambda: len(got) == 2000, timeout=10)
        assert (await pub.agent.call("fast", "ping"))["pong"] is True
        slow.transport.abort()  # it never read its backlog; do not wait for a close handshake
    finally:
        await server.stop()


async def test_reconnect_resubscribe_and_fail_fast(operator, tmp_path, make_agent) -> None:
    server = BrokerServer.from_data_dir(operator.root)
    await server.start()
    port = server.port
    a = await make_agent("alpha", brokers=[server.url])
    b = await make_agent("beta", brokers=[server.url])
    sub = await b.agent.subscribe("app.news.*")

    async def stall(params, call):
        await asyncio.sleep(30)

    b.agent.handle("test", "stall", stall, ANY)
    pending = asyncio.create_task(a.agent.call("beta/test", "stall", timeout=30))
    await asyncio.sleep(0.2)
    await server.stop()
    server.state.close()
    with pytest.raises(ConnectionLost, match="lost"):
        async with asyncio.timeout(3):  # fails fast, does not wait for the 30 s deadline
            await pending
    with pytest.raises(ConnectionLost):
        await a.agent.call("beta", "ping")
    server = BrokerServer.from_data_dir(operator.root)
    await server.start("127.0.0.1", port)
    try:
        await a.agent.link.wait_connected(10)
        await b.agent.link.wait_connected(10)
        await b.agent.flush()
        await a.agent.publish("app.news.today", "back")
        assert (await sub.next(timeout=5)).data == "back"
        assert (await a.agent.call("beta", "ping"))["pong"] is True
    finally:
        await server.stop()


async def test_cancelled_call_cancels_the_handler(make_agent) -> None:
    a = await make_agent("alpha")
    b = await make_agent("beta")
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def long(params, call):
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    b.agent.handle("test", "long", long, ANY)
    task = asyncio.create_task(a.agent.call("beta/test", "long"))
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    await asyncio.wait_for(cancelled.wait(), 5)
