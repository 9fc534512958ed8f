"""Attacks from inside a tenant on the overlay: a member agent (or a compromised inference node)
publishing, subscribing and keeping what its roles do not allow, taking other agents' names,
redeeming tokens twice or late, outliving a revocation, and declaring its own policy labels.
Each must be refused by the broker with a reason, leave the broker's state unchanged, and keep
the sender's connection (for permission refusals) up."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from nacl.signing import SigningKey
from websockets.asyncio.client import ClientConnection

from atoll.agent.discovery import ANNOUNCE, Discovery
from atoll.agent.errors import ConnectionLost, Forbidden
from atoll.agent.identity import AgentKeys
from atoll.agent.node import Agent
from atoll.broker import router as router_module
from atoll.broker.identity import issue_broker_dir
from atoll.broker.server import BrokerServer
from atoll.protocol.errors import AuthError
from atoll.protocol.frames import Frame, FrameType, decode_message, encode_frame, pack
from atoll.protocol.trust import check_labels, verify_agent
from atoll.tenancy import permissions
from atoll.tenancy.credentials import EnrollmentToken
from atoll.tenancy.operator import OperatorStore
from support.overlay import AgentFactory, eventually, raw_session


async def next_frame(ws: ClientConnection, ftype: FrameType, timeout: float = 5.0) -> Frame:
    async with asyncio.timeout(timeout):
        while True:
            for f in decode_message(await ws.recv()):
                if f.type is ftype:
                    return f


def pub(subject: str, payload: bytes = b"sealed", keep: bool = False, mid: int = 1) -> bytes:
    header = {"id": mid, "subj": subject, "kid": 1}
    if keep:
        header["keep"] = True
    return encode_frame(FrameType.PUB, header, payload)


async def still_up(ws: ClientConnection, broker: BrokerServer, name: str) -> None:
    """The refused sender keeps its connection: a round trip still works."""
    await ws.send(encode_frame(FrameType.KEYREQ, {"name": name}))
    resp = await next_frame(ws, FrameType.KEYRESP)
    assert resp.header["name"] == name


def retained(broker: BrokerServer, tenant: str = "acme") -> dict[str, bytes]:
    space = broker.router._tenants.get(tenant)
    return {s: data for s, (_by, data) in space.retained.items()} if space else {}


# --- the permission table ------------------------------------------------------------------------


def test_table_names_every_role_and_denies_what_it_does_not_name() -> None:
    inference = ("inference",)
    assert permissions.allowed(inference, "gpu", "publish", "discovery.announce.gpu")
    assert not permissions.allowed(inference, "gpu", "publish", "discovery.announce.gw")
    assert not permissions.allowed(inference, "gpu", "publish", "adapters.new")
    assert not permissions.allowed(inference, "gpu", "subscribe", "jobs.*.events")
    assert not permissions.allowed(inference, "gpu", "subscribe", "jobs.ftjob-1.events")
    assert not permissions.allowed(inference, "gpu", "subscribe", "metrics.*")
    assert not permissions.allowed(inference, "gpu", "subscribe", ">")
    assert not permissions.allowed(inference, "gpu", "publish", "anything.else")
    assert permissions.allowed(("storage",), "s", "publish", "adapters.new")
    assert not permissions.allowed(("storage",), "s", "keep", "adapters.new")
    assert permissions.allowed(("storage",), "s", "publish", "adapters.deleted")
    for role in ("training", "inference", "gateway", "admin"):  # only storage takes access back
        assert not permissions.allowed((role,), "x", "publish", "adapters.deleted")
    assert permissions.allowed(("gateway",), "gw", "subscribe", "adapters.deleted")
    assert not permissions.may_call(("gateway",), permissions.TRAINERS)  # resume states
    assert permissions.allowed(("gateway",), "gw", "subscribe", "jobs.*.events")
    assert not permissions.allowed(("gateway",), "gw", "subscribe", "jobs.>")
    assert permissions.allowed(("training",), "t", "publish", "jobs.ftjob-1.events")
    assert permissions.allowed(("agent",), "a", "subscribe", "app.>")
    assert not permissions.allowed(("agent",), "a", "subscribe", "app")
    assert permissions.may_call(("inference",), permissions.ADAPTER_READERS)
    assert not permissions.may_call(("inference",), permissions.DATASET_READERS)
    assert permissions.may_call(("inference",), permissions.ANY)


async def test_a_member_cannot_announce_adapters_or_read_the_jobs_feed(
    operator: OperatorStore, broker: BrokerServer
) -> None:
    ws = await raw_session(operator, broker, "gpu-evil", roles=("inference",))
    gw = await raw_session(operator, broker, "gw", roles=("gateway",))
    await gw.send(encode_frame(FrameType.SUB, {"sid": 1, "subj": "adapters.new"}))
    await gw.send(encode_frame(FrameType.SUB, {"sid": 2, "subj": "jobs.*.events"}))
    await still_up(gw, broker, "gw")

    # alice/ft-<job> claimed on adapters.new before the real adapter lands
    await ws.send(pub("adapters.new", b'{"id": "alice/ft-1", "owner": "mallory"}'))
    err = await next_frame(ws, FrameType.ERROR)
    assert err.header["code"] == "forbidden"
    assert "may not publish on 'adapters.new'" in err.header["reason"]
    await ws.send(pub("jobs.ftjob-1.events", b"x"))
    assert "may not publish" in (await next_frame(ws, FrameType.ERROR)).header["reason"]
    # who trains what: the tenant-wide jobs feed
    for sid, pattern in enumerate(("jobs.*.events", "jobs.>", ">", "metrics.*"), start=1):
        await ws.send(encode_frame(FrameType.SUB, {"sid": sid, "subj": pattern}))
        err = await next_frame(ws, FrameType.ERROR)
        assert err.header["code"] == "forbidden" and err.header["subj"] == pattern
    await still_up(ws, broker, "gpu-evil")
    # the gateway heard nothing of it
    with pytest.raises(TimeoutError):
        await next_frame(gw, FrameType.PUB, timeout=0.3)
    await ws.close()
    await gw.close()


async def test_real_agents_are_refused_at_once_with_the_reason(
    make_agent: AgentFactory, broker: BrokerServer
) -> None:
    node = await make_agent("gpu-1", roles=("inference",))
    with pytest.raises(Forbidden, match=r"may not publish 'adapters\.new'"):
        await node.agent.publish("adapters.new", {"id": "alice/x"})
    with pytest.raises(Forbidden, match=r"may not subscribe 'jobs\.>'"):
        await node.agent.subscribe("jobs.>")
    storage = await make_agent("store", roles=("storage",))
    gw = await make_agent("gw", roles=("gateway",))
    seen = await gw.agent.subscribe("adapters.new")
    await gw.agent.flush()
    await storage.agent.publish("adapters.new", {"id": "alice/x"})  # the honest path
    got = await seen.next(5)
    assert got.src == "store" and got.data == {"id": "alice/x"}


async def test_an_agent_keeps_only_its_own_announcement(
    operator: OperatorStore, broker: BrokerServer, make_agent: AgentFactory
) -> None:
    await make_agent("gpu-1", roles=("inference",), heartbeat=0.2)
    subject = f"{ANNOUNCE}.gpu-1"
    await eventually(lambda: subject in retained(broker))
    ws = await raw_session(operator, broker, "mallory")
    for frame in (pub(subject, keep=True), pub(subject), pub("app.x", keep=True)):
        await ws.send(frame)
        err = await next_frame(ws, FrameType.ERROR)
        assert err.header["code"] == "forbidden"
    await still_up(ws, broker, "mallory")
    assert retained(broker)[subject] != b"sealed"  # the victim's own, never the attacker's
    assert set(retained(broker)) <= {subject, "metrics.gpu-1"}
    await ws.close()


async def test_kept_publications_have_a_byte_budget(
    operator: OperatorStore, broker: BrokerServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 48 x 1 MiB used to stay in broker memory after the publisher left.
    ws = await raw_session(operator, broker, "fat")
    big = b"x" * (router_module.MAX_KEPT_BYTES_PER_AGENT + 1)
    await ws.send(pub(f"{ANNOUNCE}.fat", big, keep=True))
    err = await next_frame(ws, FrameType.ERROR)
    assert "would keep over" in err.header["reason"]
    assert f"{ANNOUNCE}.fat" not in retained(broker)
    # within its budget the same agent may keep, and replacing its own copy does not add up
    for i in range(3):
        await ws.send(pub(f"{ANNOUNCE}.fat", b"y" * 600_000, keep=True, mid=10 + i))
    await still_up(ws, broker, "fat")
    assert len(retained(broker)[f"{ANNOUNCE}.fat"]) > 600_000
    # the tenant's budget: many agents each within theirs
    monkeypatch.setattr(router_module, "MAX_KEPT_BYTES_PER_TENANT", 1_500_000)
    other = await raw_session(operator, broker, "fat2")
    await other.send(pub(f"{ANNOUNCE}.fat2", b"z" * 950_000, keep=True))
    err = await next_frame(other, FrameType.ERROR)
    assert "tenant 'acme' would keep over" in err.header["reason"]
    assert f"{ANNOUNCE}.fat2" not in retained(broker)
    space = broker.router._tenants["acme"]
    assert space.retained_bytes == sum(len(d) for _b, d in space.retained.values())
    for ws_ in (ws, other):
        await ws_.close()


# --- names are bound ------------------------------------------------------------------------------


def redeem(text: str, key: SigningKey, name: str) -> AgentKeys:
    token = EnrollmentToken.decode(text)
    cred = token.redeem(key.verify_key.encode(), name)
    return AgentKeys(key, cred, token.operator_pub, token.feed_keys)


async def refused(broker: BrokerServer, keys: AgentKeys, match: str) -> None:
    agent = Agent(keys, [broker.url], backoff_max=0.2)
    try:
        with pytest.raises(ConnectionLost, match=match):
            await agent.start(5)
    finally:
        await agent.stop()


async def admitted(broker: BrokerServer, keys: AgentKeys) -> Agent:
    return await Agent(keys, [broker.url], backoff_max=0.2).start(5)


async def test_a_token_redeems_one_name_with_one_key(
    operator: OperatorStore, broker: BrokerServer
) -> None:
    text = operator.token("acme", ["inference"], ttl_s=600).encode()
    key = SigningKey.generate()
    first = await admitted(broker, redeem(text, key, "gpu-1"))
    # the same token and key minting an alias, while connected and after leaving
    await refused(broker, redeem(text, key, "gpu-1b"), "one token redeems one name")
    await first.stop()
    await refused(broker, redeem(text, key, "gpu-1c"), "one token redeems one name")
    # another key with the same token
    await refused(broker, redeem(text, SigningKey.generate(), "gpu-1"), "already used")
    again = await admitted(broker, redeem(text, key, "gpu-1"))  # the owner reconnecting
    await again.stop()
    await eventually(lambda: broker.router.agents("acme") == [])


async def test_a_name_belongs_to_its_first_key_even_offline(
    operator: OperatorStore, broker: BrokerServer
) -> None:
    owner_key = SigningKey.generate()
    owner_keys = redeem(operator.token("acme", ["inference"], 600).encode(), owner_key, "gpu-1")
    owner = await admitted(broker, owner_keys)
    await owner.stop()  # offline: its RPCs and streams must not reach an impostor
    impostor = redeem(
        operator.token("acme", ["inference"], 600).encode(), SigningKey.generate(), "gpu-1"
    )
    await refused(broker, impostor, "belongs to another key")
    binding = broker.state.binding("acme", "gpu-1")
    assert binding is not None and binding.pub == owner_key.verify_key.encode()
    # the owner is still welcome
    back = await admitted(broker, owner_keys)
    await back.stop()


async def test_revoking_a_name_covers_every_key_and_token_seen_under_it(
    operator: OperatorStore, broker: BrokerServer, make_agent: AgentFactory
) -> None:
    key = SigningKey.generate()
    spare = operator.token("acme", ["inference"], 600).encode()  # a second token, kept back
    victim = await admitted(
        broker, redeem(operator.token("acme", ["inference"], 600).encode(), key, "gpu-1")
    )
    admin = await make_agent("ops", roles=("admin",))
    await admin.agent.send_revocation(operator.revoke("acme", name="gpu-1"))
    await eventually(lambda: victim.link.refused.is_set())
    # the same key under a new name, with another token issued before the revocation
    await refused(broker, redeem(spare, key, "gpu-2"), "key of agent 'gpu-2' was revoked")
    # the name itself is free again for a credential issued after the revocation
    fresh = await admitted(
        broker,
        redeem(operator.token("acme", ["inference"], 600).encode(), SigningKey.generate(), "gpu-1"),
    )
    await fresh.stop()
    await victim.stop()


async def test_a_token_past_its_expiry_is_refused_by_the_brokers_clock(
    operator: OperatorStore, broker: BrokerServer
) -> None:
    text = operator.token("acme", ["inference"], ttl_s=1).encode()
    keys = redeem(text, SigningKey.generate(), "late")  # minted in time: verify_agent passes
    verify_agent(keys.credential, operator.operator_pub)
    await asyncio.sleep(1.2)
    await refused(broker, keys, r"expired .* \(by this broker.s clock\)")
    assert broker.state._db.execute("SELECT count(*) FROM enrollments").fetchone()[0] == 0


async def test_name_bindings_hold_across_the_mesh(operator: OperatorStore, tmp_path: Path) -> None:
    brokers: list[BrokerServer] = []
    for name, peers in (("m1", []), ("m2", None)):
        d = tmp_path / name
        issue_broker_dir(operator, d, name)
        urls = peers if peers is not None else [brokers[0].url]
        server = BrokerServer.from_data_dir(d, peers=urls, mesh_refresh=0.5, ping_interval=1.0)
        brokers.append(await server.start("127.0.0.1", 0))
    m1, m2 = brokers
    try:
        await eventually(lambda: "m1" in m2.mesh.links and "m2" in m1.mesh.links, 10)
        key = SigningKey.generate()
        owner = Agent(
            redeem(operator.token("acme", ["inference"], 600).encode(), key, "gpu-1"), [m1.url]
        )
        await owner.start(5)
        await eventually(lambda: m2.state.binding("acme", "gpu-1") is not None)
        await owner.stop()
        impostor = redeem(
            operator.token("acme", ["inference"], 600).encode(), SigningKey.generate(), "gpu-1"
        )
        await refused(m2, impostor, "belongs to another key")

        # A peer broker relaying what the publisher's roles forbid: the receiver checks again
        # against the publisher's own credential, and drops it.
        node = Agent(AgentKeys.issue(operator, "acme", "gpu-9", ["inference"]), [m1.url])
        await node.start(5)
        await eventually(lambda: m2.mesh.credential("acme", "gpu-9") is not None)
        gw = await Agent(AgentKeys.issue(operator, "acme", "gw", ["gateway"]), [m2.url]).start(5)
        heard = await gw.subscribe("adapters.new")
        await gw.flush()

        class Hostile:
            name = "m1"

        for i, (subject, keep) in enumerate(
            (("adapters.new", False), (f"{ANNOUNCE}.gw", True), (f"{ANNOUNCE}.gpu-9", True))
        ):
            header = {"tenant": "acme", "origin": "m1", "ttl": 4, "id": 900 + i}
            header |= {"src": "gpu-9", "subj": subject} | ({"keep": True} if keep else {})
            inner = pub(subject, b"forged", keep=keep, mid=900 + i)
            (frame,) = decode_message(encode_frame(FrameType.RELAY, header, inner))
            m2.mesh._relay(Hostile(), frame)  # type: ignore[arg-type]
        with pytest.raises(TimeoutError):
            await heard.next(0.3)
        kept = retained(m2)
        assert f"{ANNOUNCE}.gw" not in kept  # another agent's announcement: never kept
        assert kept.get(f"{ANNOUNCE}.gpu-9") == inner  # its own it may keep
        await gw.stop()
        await node.stop()
    finally:
        for b in brokers:
            await b.stop()


# --- labels are signed ----------------------------------------------------------------------------


def test_labels_come_from_the_token_and_cannot_be_changed() -> None:
    op_key = SigningKey.generate()
    from atoll.tenancy import credentials as cred

    tenant_key = SigningKey.generate()
    claim = cred.tenant_claim(op_key, "acme", tenant_key.verify_key.encode())
    token = cred.enrollment_token(
        tenant_key,
        claim,
        op_key.verify_key.encode(),
        {1: b"k" * 32},
        "acme",
        ["inference"],
        60,
        labels={"phi": "true"},
    )
    token = EnrollmentToken.decode(token.encode())
    ident = verify_agent(token.redeem(b"\x01" * 32, "gpu"), op_key.verify_key.encode())
    assert ident.labels == {"phi": "true"}
    token_no = cred.enrollment_token(
        tenant_key, claim, op_key.verify_key.encode(), {1: b"k" * 32}, "acme", ["inference"], 60
    )
    forged = cred.agent_claims(
        b"\x01" * 32, "gpu", "acme", ["inference"], "", 60, token_no.jti, {"phi": "true"}
    )
    blob = pack(
        {
            "tenant": claim,
            "grant": token_no.grant,
            "agent": cred.sign(SigningKey(token_no.grant_seed), forged),
        }
    )
    with pytest.raises(AuthError, match="labels its token did not grant"):
        verify_agent(blob, op_key.verify_key.encode())
    with pytest.raises(ValueError, match="label"):
        check_labels({"PHI!": "x"})


async def test_discovery_takes_labels_from_the_credential_not_the_announcement(
    make_agent: AgentFactory,
) -> None:
    honest = await make_agent(
        "phi-node", roles=("inference",), labels={"phi": "true"}, heartbeat=0.2
    )
    liar = await make_agent("liar", roles=("inference",), heartbeat=0.2)
    watcher = await make_agent("gw", roles=("gateway",))
    view = await Discovery(watcher.agent).start()
    await eventually(lambda: {"phi-node", "liar"} <= set(view.entries))
    # the liar announces itself as a PHI node (and as someone else, with that one's credential)
    lie = {**liar.announcer.message(), "labels": {"phi": "true"}, "region": "eu"}
    await liar.agent.publish(f"{ANNOUNCE}.liar", lie, keep=True)
    stolen = {**lie, "name": "phi-node", "cred": honest.agent.ident.credential}
    await liar.agent.publish(f"{ANNOUNCE}.liar", stolen, keep=True)
    await asyncio.sleep(0.5)
    assert view.entries["liar"].labels == {} and view.entries["liar"].region == ""
    assert [e.name for e in view.select(labels={"phi": "true"})] == ["phi-node"]
    await view.stop()
