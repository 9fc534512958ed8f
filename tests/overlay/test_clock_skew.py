"""Clocks compared at the handshake, with real brokers and agents: an agent or peer broker whose
clock is ten minutes off is refused with the reason (its own log says why), a tenant's admins see
the refusal in the watch that `atoll agents` draws, and agents report their measured skew in the
metrics feed."""

from __future__ import annotations

from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from atoll.agent.identity import AgentKeys
from atoll.agent.watch import REFUSED, TenantWatch
from atoll.broker import peering
from atoll.broker.identity import issue_broker_dir
from atoll.broker.server import BrokerServer
from atoll.protocol.frames import Frame, FrameType, decode_message
from atoll.protocol.handshake import ClientHandshake
from atoll.protocol.trust import now_ms
from atoll.tenancy.operator import OperatorStore
from support.overlay import AgentFactory, eventually

TEN_MINUTES_MS = 600_000


class FastClock(ClientHandshake):
    """A host whose clock runs ten minutes ahead."""

    def receive_hello(self, frame: Frame, now: int | None = None) -> bytes:
        return super().receive_hello(frame, now_ms() + TEN_MINUTES_MS)


async def refused_agent(operator: OperatorStore, broker: BrokerServer, name: str) -> Frame:
    """Connect as ``name`` with a fast clock; the broker's answer to its AUTH."""
    keys = AgentKeys.issue(operator, "acme", name, ["agent"])
    async with connect(broker.url, compression=None) as ws:
        hs = FastClock(keys.key, keys.credential, keys.operator_pub)
        (hello,) = decode_message(await ws.recv())
        await ws.send(hs.receive_hello(hello))
        (answer,) = decode_message(await ws.recv())
    return answer


async def test_an_agent_with_a_wrong_clock_is_refused_and_admins_see_why(
    operator: OperatorStore, broker: BrokerServer, make_agent: AgentFactory
) -> None:
    admin = await make_agent("boss", roles=("admin",))
    watch = await TenantWatch(admin.agent).start()

    answer = await refused_agent(operator, broker, "drifter")

    assert answer.type is FrameType.ERROR and answer.header["code"] == "clock-skew"
    reason = answer.header["reason"]
    assert "agent 'drifter' is 600 s ahead of this broker's" in reason and "NTP" in reason
    await eventually(lambda: any(r["name"] == "drifter" for r in watch.rows()))
    (row,) = [r for r in watch.rows() if r["name"] == "drifter"]
    assert row["status"] == REFUSED
    assert row["refused"] == f"by broker {broker.keys.name}: {reason}"

    late = await TenantWatch(admin.agent).start()  # a watcher that joins later is told too
    assert any(r["name"] == "drifter" and r["status"] == REFUSED for r in late.rows())
    await late.stop()
    await watch.stop()


async def test_only_admins_are_told_and_a_healthy_agent_reports_its_skew(
    operator: OperatorStore, broker: BrokerServer, make_agent: AgentFactory
) -> None:
    member = await make_agent("member")
    gateway = await make_agent("gw", roles=("gateway",))
    watch = await TenantWatch(gateway.agent).start()  # may read feeds, not brokers' notices
    await refused_agent(operator, broker, "drifter")
    assert not any(r["name"] == "drifter" for r in watch.rows())
    await watch.stop()

    welcome = member.agent.link.welcome
    assert welcome is not None and welcome.skew_ms is not None and abs(welcome.skew_ms) < 5_000
    clock = member.feed.message()["system"]["clock"]
    assert clock == {"skew_ms": welcome.skew_ms, "broker": broker.keys.name}


async def test_a_peer_broker_with_a_wrong_clock_is_refused(
    operator: OperatorStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    make_agent: AgentFactory,
) -> None:
    home = BrokerServer.from_data_dir(operator.root)
    await home.start("127.0.0.1", 0)
    issue_broker_dir(operator, tmp_path / "far", "far-island")
    monkeypatch.setattr(peering, "ClientHandshake", FastClock)  # the far island's clock
    far = BrokerServer.from_data_dir(tmp_path / "far", peers=[home.url], mesh_refresh=0.5)
    await far.start("127.0.0.1", 0)
    try:
        admin = await make_agent("boss", roles=("admin",), brokers=[home.url])
        watch = await TenantWatch(admin.agent).start()
        await eventually(lambda: any(r["name"] == "broker far-island" for r in watch.rows()))
        (row,) = [r for r in watch.rows() if r["name"] == "broker far-island"]
        assert row["status"] == REFUSED
        assert "broker 'far-island' is 600 s ahead of this broker's" in row["refused"]
        assert not home.mesh.links and not far.mesh.links  # never linked
        await watch.stop()
    finally:
        await far.stop()
        await home.stop()
