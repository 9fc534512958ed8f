"""What a departed agent kept (its announcement and metrics) leaves the broker after the
broker's ``kept_ttl``, with real agents on a real broker: new watchers stop seeing it and the
tenant's kept budget gets its room back, while connected agents keep theirs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from atoll.agent.discovery import ANNOUNCE
from atoll.broker.server import BrokerServer
from atoll.tenancy.operator import OperatorStore
from support.overlay import AgentFactory, eventually

KEPT_TTL_S = 0.6


@pytest.fixture
async def broker(operator: OperatorStore) -> AsyncIterator[BrokerServer]:
    server = BrokerServer.from_data_dir(operator.root, kept_ttl=KEPT_TTL_S)
    await server.start("127.0.0.1", 0)
    yield server
    await server.stop()


def kept(broker: BrokerServer) -> set[str]:
    space = broker.router._tenants.get("acme")
    return {subject for subject, _ in space.retained.items()} if space else set()


async def announced(make_agent: AgentFactory, name: str) -> set[str]:
    """Who a watcher that joins now is told about (the kept announcements it is sent)."""
    watcher = await make_agent(name, roles=("admin",))
    sub = await watcher.agent.subscribe(f"{ANNOUNCE}.*")
    seen: set[str] = set()
    with pytest.raises(asyncio.TimeoutError):
        while True:
            seen.add((await sub.next(timeout=0.5)).src)
    await watcher.stop()
    return seen - {name}


async def test_a_departed_agents_kept_state_expires(
    broker: BrokerServer, make_agent: AgentFactory
) -> None:
    leaver = await make_agent("leaver")
    await make_agent("stayer")
    await eventually(lambda: {f"{ANNOUNCE}.leaver", f"{ANNOUNCE}.stayer"} <= kept(broker))
    await leaver.stop()
    assert f"{ANNOUNCE}.leaver" in kept(broker)  # still there at once: it may come back

    await eventually(lambda: not any(s.endswith(".leaver") for s in kept(broker)), timeout=5)
    assert f"{ANNOUNCE}.stayer" in kept(broker)
    space = broker.router._tenants["acme"]
    assert "leaver" not in space.kept_by and "leaver" not in space.kept_subjects
    assert await announced(make_agent, "late-watcher") == {"stayer"}
