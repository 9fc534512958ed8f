"""Two agents of one tenant do RPC and pub/sub through a real broker; tenants stay apart."""

from __future__ import annotations

import asyncio

import pytest

from atoll.agent.errors import (
    AtollError,
    ConnectionLost,
    DeadlineExceeded,
    InternalError,
    NoResponder,
    NoSuchMethod,
)
from atoll.broker.server import BrokerServer
from atoll.tenancy.permissions import ANY
from support.overlay import eventually, raw_session


class QuotaExceeded(AtollError):
    """A plugin's own error type, known to both sides."""


async def test_rpc_between_agents(make_agent) -> None:
    a = await make_agent("alpha", roles=("operator",))
    b = await make_agent("beta", roles=("admin",))
    reply = await a.agent.call("beta", "ping", {"x": 1})
    assert reply["pong"] is True and reply["agent"] == "beta" and reply["echo"] == {"x": 1}
    info = await b.agent.call("alpha/system", "info")
    assert info["name"] == "alpha" and info["tenant"] == "acme"
    plugins = await a.agent.call("beta", "plugins")
    assert [p["name"] for p in plugins] == ["system"]


async def test_rpc_errors_are_typed(make_agent) -> None:
    a = await make_agent("alpha")
    b = await make_agent("beta")

    async def boom(params, call):
        raise ValueError("kaput")

    async def slow(params, call):
        await asyncio.sleep(10)

    async def quota(params, call):
        raise QuotaExceeded("over quota", {"limit": 3})

    b.agent.handle("test", "boom", boom, ANY)
    b.agent.handle("test", "quota", quota, ANY)
    b.agent.handle("test", "slow", slow, ANY)
    with pytest.raises(NoResponder, match="no agent 'gamma' in tenant 'acme'"):
        await a.agent.call("gamma", "ping")
    with pytest.raises(NoSuchMethod):
        await a.agent.call("beta/test", "nothing")
    with pytest.raises(InternalError, match="ValueError: kaput"):
        await a.agent.call("beta/test", "boom")
    with pytest.raises(QuotaExceeded) as err:
        await a.agent.call("beta/test", "quota")
    assert err.value.data == {"limit": 3}
    with pytest.raises(DeadlineExceeded):
        await a.agent.call("beta/test", "slow", timeout=0.3)


async def test_pubsub_within_tenant_only(make_agent) -> None:
    a = await make_agent("alpha")
    b = await make_agent("beta")
    intruder = await make_agent("alpha", tenant="globex")  # same name, other tenant
    sub_b = await b.agent.subscribe("app.events.>")
    sub_x = await intruder.agent.subscribe("app.>")
    await asyncio.sleep(0.1)
    await a.agent.publish("app.events.one", {"n": 1})
    got = await sub_b.next(timeout=5)
    assert got.subject == "app.events.one" and got.data == {"n": 1} and got.src == "alpha"
    await asyncio.sleep(0.3)
    heard = []
    while not sub_x.queue.empty():
        heard.append(sub_x.queue.get_nowait().subject)
    assert "app.events.one" not in heard  # it hears its own tenant (its own announcements) only
    assert all(s.startswith("discovery.") for s in heard)
    with pytest.raises(NoResponder, match="tenant 'globex'"):
        await intruder.agent.call("beta", "ping")


async def test_unsendable_result_is_an_error_not_a_hang(make_agent) -> None:
    a = await make_agent("alpha")
    b = await make_agent("beta")

    async def weird(params, call):
        return {"obj": object()}

    b.agent.handle("test", "weird", weird, ANY)
    with pytest.raises(InternalError, match="cannot be sent"):
        await a.agent.call("beta/test", "weird", timeout=5)


async def test_failover_across_broker_list(operator, broker, make_agent) -> None:
    dead = "ws://127.0.0.1:9"  # discard port: nothing listens
    a = await make_agent("alpha", brokers=[dead, broker.url])
    b = await make_agent("beta")
    assert a.agent.link.url == broker.url
    assert (await a.agent.call("beta", "ping"))["pong"] is True
    assert b.agent.link.url == broker.url


async def test_a_peer_enrolled_anew_is_reached_after_one_deadline(make_agent) -> None:
    """A peer whose key changed (enrolled again under its name) cannot open what we seal with
    the old key, nor tell us: the call that times out makes us ask the broker for its key again,
    and the next call reaches it."""
    a = await make_agent("alpha")
    b = await make_agent("beta")
    assert (await a.agent.call("beta", "ping"))["pong"] is True  # its key is cached now
    await b.stop()
    await make_agent("beta")  # new keys, same name
    with pytest.raises(DeadlineExceeded):
        await a.agent.call("beta", "ping", timeout=1.0)
    assert (await a.agent.call("beta", "ping", timeout=5.0))["pong"] is True


async def test_a_link_is_down_the_moment_its_socket_is(make_agent) -> None:
    """No caller may see a dead link as up: ``connected`` clears when the websocket stops
    sending, not a loop turn (or a close handshake) later, and comes back on reconnect."""
    a = await make_agent("alpha")
    link = a.agent.link
    ws = link._ws
    assert ws is not None and link.connected.is_set()
    ws.close()  # the close handshake has not even started to come back
    assert not link.connected.is_set()
    with pytest.raises(ConnectionLost):
        link.send(b"x")
    await link.wait_connected(10)  # reconnected, on a new socket
    assert link._ws is not ws and link.connected.is_set()


async def test_silent_peer_is_dropped_by_keepalive(operator) -> None:
    server = BrokerServer.from_data_dir(operator.root, ping_interval=0.2)
    await server.start()
    try:
        ws = await raw_session(operator, server, "mute")
        assert server.router.agents("acme") == ["mute"]
        ws.transport.pause_reading()  # it stops answering pings
        await eventually(lambda: server.router.agents("acme") == [], timeout=5)
        ws.transport.abort()
    finally:
        await server.stop()
