"""Cross-tenant service grants on real brokers and agents: tenant acme (the importer, on broker
b1) calls the ``inference`` service of tenant globex's agents (the exporter, on broker b2) under
an operator-signed grant; nothing else crosses, forged grants are refused, revocation cuts at
every broker."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from atoll.agent.errors import AtollError, Forbidden, NoResponder
from atoll.agent.identity import AgentKeys
from atoll.agent.node import Agent
from atoll.agent.runtime import AgentRuntime
from atoll.broker.router import Session
from atoll.broker.server import BrokerServer
from atoll.protocol import session as session_module
from atoll.protocol.frames import Frame, FrameType
from atoll.protocol.session import CallInfo, Publication
from atoll.tenancy import credentials as cred
from atoll.tenancy.keys import generate
from atoll.tenancy.operator import OperatorStore
from support.broker_fakes import frame
from support.overlay import eventually, intercept


async def agent(
    op: OperatorStore, name: str, url: str, tenant: str, roles: tuple[str, ...]
) -> Agent:
    keys = AgentKeys.issue(op, tenant, name, list(roles))
    rt = await AgentRuntime.start(
        op.root / "agents" / tenant / name, [url], keys=keys, connect_timeout=5
    )
    return rt.agent


class Overlay:
    """globex's node (inference + storage handlers) on b2, acme's caller on b1, admins."""

    def __init__(self, operator: OperatorStore, b1: BrokerServer, b2: BrokerServer) -> None:
        self.operator, self.b1, self.b2 = operator, b1, b2
        self.seen: list[CallInfo] = []

    async def start(self) -> Overlay:
        op = self.operator
        self.node = await agent(op, "node", self.b2.url, "globex", ("inference",))
        self.store = await agent(op, "store", self.b2.url, "globex", ("storage",))
        self.caller = await agent(op, "gw", self.b1.url, "acme", ("gateway",))
        self.admin = await agent(op, "admin", self.b1.url, "acme", ("admin",))

        async def chat(params: Any, info: CallInfo) -> Any:
            self.seen.append(info)
            return {"echo": params, "tenant": info.caller.tenant, "roles": info.caller.roles}

        async def secret(params: Any, info: CallInfo) -> Any:
            return "globex's secret"

        self.node.handle("inference", "generate", chat, ("gateway",))
        self.node.handle("storage", "get", secret, ("gateway",))
        self.store.handle("storage", "get", secret, ("gateway",))
        return self

    async def grant(self) -> str:
        grant = self.operator.grant("globex", "acme", [{"plugin": "inference"}], ["gateway"], 3600)
        await self.admin.send_grant(grant.blob)
        await self.admin.flush()
        await eventually(lambda: all(b.router.grants.linking("acme", "globex") for b in self.bs))
        return grant.id

    @property
    def bs(self) -> tuple[BrokerServer, BrokerServer]:
        return self.b1, self.b2


@pytest.fixture
async def overlay(operator, mesh):
    return await Overlay(operator, *mesh).start()


async def test_without_a_grant_no_name_crosses(overlay) -> None:
    with pytest.raises(NoResponder, match="grant"):
        await overlay.caller.call("node@globex/inference", "generate", {"p": 1}, timeout=5)
    with pytest.raises(NoResponder, match="grant"):
        await overlay.caller._peer("node@globex", 5)
    assert await overlay.caller.imports() == []


async def test_a_grant_end_to_end_across_two_brokers(overlay) -> None:
    gid = await overlay.grant()
    reply = await overlay.caller.call("node@globex/inference", "generate", {"p": 1}, timeout=5)
    # The callee sees the caller with its own tenant and the roles the grant gives.
    assert reply == {"echo": {"p": 1}, "tenant": "acme", "roles": ["gateway"]}
    info = overlay.seen[-1]
    assert info.src == "gw@acme" and info.caller.name == "gw" and info.grant.id == gid
    # Discovery: the importer lists only the exporter's agents enrolled for the service.
    ((grant, agents),) = await overlay.caller.imports()
    assert grant.id == gid and [a.name for a in agents] == ["node"]


async def test_only_exported_plugins_and_agents_are_reachable(overlay) -> None:
    await overlay.grant()
    with pytest.raises(NoResponder, match="grant"):
        await overlay.caller.call("node@globex/storage", "get", None, timeout=5)
    with pytest.raises(NoResponder, match="grant"):
        await overlay.caller.call("node@globex", "info", None, timeout=5)  # system
    with pytest.raises(NoResponder, match="grant"):  # storage's key: not even its name
        await overlay.caller.call("store@globex/inference", "generate", None, timeout=5)
    # A grant widens nobody: acme's admin lacks the granted role at home, so has none there.
    with pytest.raises(Forbidden, match=r"roles \)"):
        await overlay.admin.call("node@globex/inference", "generate", None, timeout=5)
    # The exporter reaches only what a reply may: acme's agent, from the exported plugin.
    with pytest.raises(NoResponder, match="grant"):
        await overlay.store.call("gw@acme/gateway", "x", None, timeout=5)


async def test_the_exporter_answers_calls_and_makes_none(overlay, operator) -> None:
    """Its brokers pass what the exported plugin sends towards the importer (its replies), so
    the importer's agents refuse every request from it: a call, a stream, any plugin."""
    await overlay.grant()
    store = await agent(operator, "store", overlay.b1.url, "acme", ("storage",))
    hit: list[CallInfo] = []

    async def read(params: Any, info: CallInfo) -> Any:
        hit.append(info)
        return "acme's adapter bytes"

    async def upload(stream: Any, params: Any, info: CallInfo) -> None:
        hit.append(info)

    store.handle("storage", "adapter", read, ("inference", "gateway"))
    store.streams.serve("storage", "upload", upload, ("inference",))
    assert await overlay.caller.call("node@globex/inference", "generate", {}, timeout=5)
    for dst, method in [("store@acme/storage", "adapter"), ("store@acme", "ping"),
                        ("gw@acme", "ping")]:  # fmt: skip
        for _ in range(50):  # until the mesh knows store@acme (then: refused, not unknown)
            try:
                await overlay.node.call(dst, method, {}, timeout=5, src="node/inference")
            except Forbidden as exc:
                assert "imports nothing from this tenant" in str(exc)
                break
            except NoResponder:
                await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"{dst} {method} was never refused")
    with pytest.raises(Forbidden, match="imports nothing"):
        stream = await overlay.node.open_stream(
            "store@acme/storage", "upload", {}, src="node/inference"
        )
        await stream.read()
    assert hit == []


async def test_nothing_else_is_visible_across_the_grant(overlay, operator) -> None:
    await overlay.grant()
    watcher = await agent(operator, "watcher", overlay.b2.url, "globex", ("admin",))
    acme_saw: list[Publication] = []
    globex_saw: list[Publication] = []
    for pattern in ("metrics.*", "discovery.announce.*"):  # everything an admin may watch
        await overlay.admin.subscribe(pattern, acme_saw.append)
        await watcher.subscribe(pattern, globex_saw.append)
    await overlay.node.publish("metrics.node", {"gpu": 1})
    await overlay.node.publish("discovery.announce.node", {"plugins": ["inference"]}, keep=True)
    await overlay.caller.publish("discovery.announce.gw", {"plugins": ["gateway"]}, keep=True)
    await overlay.caller.call("node@globex/inference", "generate", {}, timeout=5)
    await overlay.admin.publish("metrics.admin", {"acme": 1})
    await eventually(lambda: len(acme_saw) >= 2 and len(globex_saw) >= 2)
    await asyncio.sleep(0.3)
    assert {p.src.split("/")[0] for p in acme_saw} <= {"gw", "admin"}
    assert {p.src.split("/")[0] for p in globex_saw} <= {"node", "store", "watcher"}


async def test_forged_grants_are_refused(overlay, operator) -> None:
    books = [b.router.grants for b in overlay.bs]
    acme = operator.tenant("acme")
    spec = ("globex", "acme", [{"plugin": "inference"}], ["gateway"])
    forged = [
        cred.service_grant(acme.key, *spec, 60),  # a tenant key
        cred.service_grant(generate(), *spec, 60),  # another operator
        cred.service_grant(operator.operator_key, *spec, 1),  # expired (below)
        cred.service_grant(operator.operator_key, "globex", "acme", [], ["gateway"], 60),
        cred.service_grant(operator.operator_key, *spec[:3], ["admin"], 60),
    ]
    good = cred.service_grant(operator.operator_key, *spec, 60)
    forged.append(good[:-3] + bytes([good[-3] ^ 1]) + good[-2:])  # tampered
    await asyncio.sleep(1.1)
    for blob in [*forged, b"\x80", b"junk"]:
        await overlay.admin.send_grant(blob)
    await overlay.admin.flush()
    assert all(not book.imports("acme") for book in books)
    assert overlay.admin.link.connected.is_set()  # refused with a reason, the link stays


async def test_revocation_cuts_at_every_broker(overlay, operator) -> None:
    gid = await overlay.grant()
    near = await agent(operator, "near", overlay.b2.url, "acme", ("gateway",))  # node's broker
    for caller in (overlay.caller, near):
        await caller.call("node@globex/inference", "generate", {}, timeout=5)
    await overlay.admin.send_grant(operator.revoke_grant(gid))
    await eventually(
        lambda: all(not b.router.grants.linking("acme", "globex") for b in overlay.bs), 2.0
    )
    for caller in (overlay.caller, near):  # refused at b1 and at b2
        with pytest.raises(NoResponder, match="grant"):
            await caller.call("node@globex/inference", "generate", {}, timeout=5)
    # The grant sent again stays dead.
    (grant, blob, revoked) = operator.grants()[0]
    assert revoked and grant is not None
    await overlay.admin.send_grant(blob)
    await overlay.admin.flush()
    assert not overlay.b1.router.grants.linking("acme", "globex")


async def test_revocation_cuts_a_stream_in_flight(overlay, operator) -> None:
    gid = await overlay.grant()

    async def talk(stream: Any, params: Any, info: CallInfo) -> None:
        async for chunk in stream:
            await stream.write(chunk)

    overlay.node.streams.serve("inference", "talk", talk, ("gateway",))
    stream = await overlay.caller.open_stream("node@globex/inference", "talk", {})
    await stream.write(b"before")
    assert await stream.read_exactly(6) == b"before"
    await overlay.admin.send_grant(operator.revoke_grant(gid))
    await eventually(
        lambda: all(not b.router.grants.linking("acme", "globex") for b in overlay.bs), 2.0
    )
    with pytest.raises(AtollError):
        async with asyncio.timeout(15):
            await stream.write(b"after")
            await stream.read_exactly(5)


async def test_the_callee_refuses_what_a_compromised_broker_lets_through(overlay, operator) -> None:
    """A broker that skips its grant check still meets the callee's: it sees the grant."""
    await overlay.grant()
    caller = await agent(operator, "gw2", overlay.b2.url, "acme", ("gateway",))

    bypass = {"node@globex/storage": ("globex", "node"), "gw2@acme": ("acme", "gw2")}

    def tap(session: Session, f: Frame) -> Frame | None:
        where = bypass.get(f.header.get("dst", "")) if f.type is FrameType.MSG else None
        if where is None:
            return None
        overlay.b2.router.deliver_msg(*where, f.raw)  # no grant check, either way
        return frame(FrameType.KEYREQ, {"name": session.ident.name})  # routed instead

    undo = intercept(overlay.b2, tap)
    try:
        with pytest.raises(Forbidden, match="does not export 'storage'"):
            await caller.call("node@globex/storage", "get", None, timeout=5)
    finally:
        undo()
    peer = overlay.node._session.peers["gw2@acme"]
    assert peer.grants and peer.ident.roles == ("gateway",)


async def test_the_callee_sees_the_roles_of_the_grant_in_force(
    overlay, operator, monkeypatch
) -> None:
    """Agents never hear of revocations: a callee refetches a granted caller's key (and grant)
    after GRANTED_PEER_TTL_MS, so a narrower grant replacing a revoked one is what it sees."""
    monkeypatch.setattr(session_module, "GRANTED_PEER_TTL_MS", 0)
    gid = await overlay.grant()
    await overlay.caller.call("node@globex/inference", "generate", {}, timeout=5)
    await overlay.admin.send_grant(operator.revoke_grant(gid))
    narrower = operator.grant("globex", "acme", [{"plugin": "inference"}], ["user"], 3600)
    await overlay.admin.send_grant(narrower.blob)
    await eventually(
        lambda: all(
            [g.id for g in b.router.grants.linking("acme", "globex")] == [narrower.id]
            for b in overlay.bs
        )
    )
    with pytest.raises(Forbidden, match=r"\(roles \) may not"):  # user: gw is none at home
        await overlay.caller.call("node@globex/inference", "generate", {}, timeout=5)
