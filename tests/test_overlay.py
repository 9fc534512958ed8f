"""Two agents of one tenant do RPC and pub/sub through a real broker; tenants stay apart."""

from __future__ import annotations

import asyncio

import pytest

from atoll.agent.errors import (
    AtollError,
    DeadlineExceeded,
    InternalError,
    NoResponder,
    NoSuchMethod,
)


class QuotaExceeded(AtollError):
    """A plugin's own error type, known to both sides."""


async def test_rpc_between_agents(make_agent) -> None:
    a = await make_agent("alpha")
    b = await make_agent("beta")
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

    b.agent.handle("test", "boom", boom)
    b.agent.handle("test", "quota", quota)
    b.agent.handle("test", "slow", slow)
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
    sub_b = await b.agent.subscribe("events.>")
    sub_x = await intruder.agent.subscribe(">")
    await asyncio.sleep(0.1)
    await a.agent.publish("events.one", {"n": 1})
    got = await sub_b.next(timeout=5)
    assert got.subject == "events.one" and got.data == {"n": 1} and got.src == "alpha"
    with pytest.raises(TimeoutError):
        await sub_x.next(timeout=0.3)
    with pytest.raises(NoResponder, match="tenant 'globex'"):
        await intruder.agent.call("beta", "ping")
