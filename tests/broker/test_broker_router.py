"""The broker's Router, driven by fake sessions and a fake mesh: no sockets, no event loop."""

from __future__ import annotations

import time
from typing import Any

import pytest
from nacl.signing import SigningKey

from atoll.broker import router as router_module
from atoll.broker.router import Router
from atoll.broker.state import Binding, BrokerState
from atoll.protocol.errors import AuthError, ProtocolError
from atoll.protocol.frames import Frame, FrameType, encode_frame
from atoll.protocol.trust import AgentIdentity, now_ms
from atoll.tenancy.operator import OperatorStore
from support.broker_fakes import FakeSession, frame, identity


class FakeMesh:
    """The router's view of the mesh, recording every call."""

    def __init__(self, reachable: dict[tuple[str, str], bytes] | None = None) -> None:
        self.reachable = reachable or {}  # (tenant, agent) -> credential, at other brokers
        self.changes = 0
        self.msgs: list[tuple[str, str, dict[str, Any]]] = []
        self.pubs: list[tuple[str, str, dict[str, Any]]] = []
        self.synced: list[dict[str, Any]] = []

    def changed(self) -> None:
        self.changes += 1

    def forward_msg(self, tenant: str, agent: str, data: bytes, route: dict[str, Any]) -> bool:
        if (tenant, agent) not in self.reachable:
            return False
        self.msgs.append((tenant, agent, route))
        return True

    def forward_pub(self, tenant: str, subject: str, data: bytes, route: dict[str, Any]) -> None:
        self.pubs.append((tenant, subject, route))

    def credential(self, tenant: str, agent: str) -> bytes | None:
        return self.reachable.get((tenant, agent))

    def flood_sync(self, body: dict[str, Any]) -> None:
        self.synced.append(body)

    def agents(self, tenant: str) -> dict[str, bytes]:
        return {a: c for (t, a), c in self.reachable.items() if t == tenant}


def pub(subject: str, payload: bytes = b"sealed", keep: bool = False, id: int = 1) -> Frame:
    header: dict[str, Any] = {"id": id, "subj": subject, "kid": 1}
    if keep:
        header["keep"] = True
    return frame(FrameType.PUB, header, payload)


def sub(sid: int, pattern: str) -> Frame:
    return frame(FrameType.SUB, {"sid": sid, "subj": pattern})


class Tenancy:
    """Real credentials of the test operator, as verified identities."""

    def __init__(self, op: OperatorStore) -> None:
        self.op = op

    def ident(
        self,
        name: str,
        roles: tuple[str, ...] = ("agent",),
        tenant: str = "acme",
        key: SigningKey | None = None,
    ) -> AgentIdentity:
        return identity(self.op, name, roles, tenant, key)


@pytest.fixture
def tenancy(operator: OperatorStore) -> Tenancy:
    return Tenancy(operator)


@pytest.fixture
def router(operator: OperatorStore) -> Router:
    return Router(BrokerState(None, operator.operator_pub))


def connect(router: Router, ident: AgentIdentity) -> FakeSession:
    s = FakeSession(ident)
    router.attach(s)
    return s


# --- publish and subscribe -----------------------------------------------------------------------


def test_a_publication_reaches_matching_subscribers_once_stamped_with_its_source(
    router: Router, tenancy: Tenancy
) -> None:
    alpha = connect(router, tenancy.ident("alpha"))
    beta = connect(router, tenancy.ident("beta"))
    gamma = connect(router, tenancy.ident("gamma"))
    router.handle(beta, sub(1, "app.>"))
    router.handle(beta, sub(2, "app.news.*"))  # a second match: still one copy
    router.handle(gamma, sub(1, "app.other"))

    router.handle(alpha, pub("app.news.today", b"sealed-bytes"))

    (got,) = beta.frames()
    assert got.type is FrameType.PUB
    assert got.header["src"] == "alpha" and got.header["subj"] == "app.news.today"
    assert got.payload == b"sealed-bytes"
    assert gamma.frames() == [] and alpha.frames() == []


def test_unsubscribe_and_detach_stop_delivery(router: Router, tenancy: Tenancy) -> None:
    alpha = connect(router, tenancy.ident("alpha"))
    beta = connect(router, tenancy.ident("beta"))
    gamma = connect(router, tenancy.ident("gamma"))
    router.handle(beta, sub(1, "app.x"))
    router.handle(gamma, sub(1, "app.x"))
    router.handle(beta, frame(FrameType.UNSUB, {"sid": 1}))
    router.detach(gamma)

    router.handle(alpha, pub("app.x"))

    assert beta.frames() == [] and gamma.frames() == []
    assert beta.subs == {} and gamma.subs == {}
    assert router.agents("acme") == ["alpha", "beta"]


def test_tenants_are_isolated(router: Router, tenancy: Tenancy) -> None:
    alpha = connect(router, tenancy.ident("alpha"))
    spy = connect(router, tenancy.ident("spy", tenant="globex"))
    router.handle(spy, sub(1, "app.>"))

    router.handle(alpha, pub("app.secret"))
    router.handle(spy, frame(FrameType.MSG, {"id": 9, "dst": "alpha/x"}, b"hi"))

    assert [f.type for f in spy.frames()] == [FrameType.NORESP]  # no alpha in globex
    assert alpha.frames() == []
    assert router.agents("globex") == ["spy"] and router.agents("acme") == ["alpha"]


def test_permission_refusals_keep_the_connection(router: Router, tenancy: Tenancy) -> None:
    alpha = connect(router, tenancy.ident("alpha"))
    admin = connect(router, tenancy.ident("boss", roles=("admin",)))
    router.handle(admin, sub(1, "metrics.*"))

    router.handle(alpha, pub("metrics.beta", id=5))  # not its own feed
    router.handle(alpha, sub(7, "metrics.*"))  # only admins watch every feed

    refused = alpha.frames()
    assert [(f.type, f.header["code"]) for f in refused] == [
        (FrameType.ERROR, "forbidden"),
        (FrameType.ERROR, "forbidden"),
    ]
    assert refused[0].header["id"] == 5 and "may not publish" in refused[0].header["reason"]
    assert refused[1].header["sid"] == 7 and "may not subscribe" in refused[1].header["reason"]
    assert admin.frames() == [] and alpha.subs == {} and alpha.closed is None

    router.handle(alpha, pub("metrics.alpha"))  # its own feed it may publish
    assert [f.header["src"] for f in admin.frames()] == ["alpha"]


def test_bad_subjects_and_too_many_subscriptions_are_refused(
    router: Router, tenancy: Tenancy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(router_module, "MAX_SUBS_PER_SESSION", 2)
    alpha = connect(router, tenancy.ident("alpha"))
    router.handle(alpha, pub("app..x", id=3))
    router.handle(alpha, sub(1, "app.a"))
    router.handle(alpha, sub(2, "app.b"))
    router.handle(alpha, sub(1, "app.c"))  # replacing sid 1 is no new subscription
    router.handle(alpha, sub(3, "app.d"))

    codes = [f.header["code"] for f in alpha.frames()]
    assert codes == ["bad-subject", "limit"]
    assert alpha.subs == {1: "app.c", 2: "app.b"}


def test_spoofed_sources_and_broker_frames_close_the_sender(
    router: Router, tenancy: Tenancy
) -> None:
    alpha = connect(router, tenancy.ident("alpha"))
    with pytest.raises(ProtocolError) as spoofed:
        router.handle(alpha, frame(FrameType.MSG, {"id": 1, "dst": "b", "src": "beta/x"}))
    assert spoofed.value.code == "spoofed"
    with pytest.raises(ProtocolError, match="may not send RELAY"):
        router.handle(alpha, frame(FrameType.RELAY, {"tenant": "acme", "origin": "b", "ttl": 3}))


# --- kept publications ---------------------------------------------------------------------------


def test_a_new_subscriber_sees_the_latest_kept_publication(
    router: Router, tenancy: Tenancy
) -> None:
    alpha = connect(router, tenancy.ident("alpha"))
    router.handle(alpha, pub("discovery.announce.alpha", b"v1", keep=True))
    router.handle(alpha, pub("discovery.announce.alpha", b"v2", keep=True))
    router.handle(alpha, pub("metrics.alpha", b"not kept"))

    late = connect(router, tenancy.ident("late"))
    router.handle(late, sub(1, "discovery.announce.*"))
    router.handle(late, sub(2, "metrics.late"))

    assert [f.payload for f in late.frames()] == [b"v2"]


def test_keeping_needs_the_keep_permission(router: Router, tenancy: Tenancy) -> None:
    alpha = connect(router, tenancy.ident("alpha"))
    router.handle(alpha, pub("app.state", keep=True, id=4))  # may publish, may not keep
    (refused,) = alpha.frames()
    assert refused.header["code"] == "forbidden" and "may not keep" in refused.header["reason"]

    late = connect(router, tenancy.ident("late"))
    router.handle(late, sub(1, "app.>"))
    assert late.frames() == []


def kept_size(agent: str, subject: str, payload: bytes) -> int:
    """Bytes a kept publication holds: the whole frame as delivered, source stamped."""
    header = {"id": 1, "subj": subject, "kid": 1, "keep": True, "src": agent}
    return len(encode_frame(FrameType.PUB, header, payload))


def test_kept_bytes_have_a_budget_per_agent(
    router: Router, tenancy: Tenancy, monkeypatch: pytest.MonkeyPatch
) -> None:
    announce = "discovery.announce.alpha"
    limit = kept_size("alpha", announce, b"a" * 60) + 59
    monkeypatch.setattr(router_module, "MAX_KEPT_BYTES_PER_AGENT", limit)
    alpha = connect(router, tenancy.ident("alpha"))
    router.handle(alpha, pub(announce, b"a" * 60, keep=True))
    router.handle(alpha, pub("metrics.alpha", b"m" * 60, keep=True, id=2))  # one byte over
    (refused,) = alpha.frames()
    assert refused.header["id"] == 2
    assert f"agent 'alpha' would keep over {limit} bytes" in refused.header["reason"]

    # Replacing its own kept publication frees the old one's bytes first.
    router.handle(alpha, pub(announce, b"b" * 90, keep=True, id=3))
    assert alpha.frames() == []
    room = limit - kept_size("alpha", announce, b"b" * 90)
    assert router.kept_room("acme", "alpha", "metrics.alpha", room) is None
    assert router.kept_room("acme", "alpha", "metrics.alpha", room + 1) is not None
    assert router.kept_room("acme", "beta", "metrics.beta", room + 1) is None  # alpha's budget


def test_kept_bytes_have_a_budget_per_tenant(
    router: Router, tenancy: Tenancy, monkeypatch: pytest.MonkeyPatch
) -> None:
    payload = b"x" * 60
    limit = kept_size("a1", "metrics.a1", payload) + kept_size("a2", "metrics.a2", payload) + 59
    monkeypatch.setattr(router_module, "MAX_KEPT_BYTES_PER_TENANT", limit)
    agents = [connect(router, tenancy.ident(n)) for n in ("a1", "a2", "a3")]
    for s in agents:
        router.handle(s, pub(f"metrics.{s.ident.name}", payload, keep=True))
    assert agents[0].frames() == [] and agents[1].frames() == []
    (refused,) = agents[2].frames()
    assert f"tenant 'acme' would keep over {limit} bytes" in refused.header["reason"]
    other = connect(router, tenancy.ident("a3", tenant="globex"))  # another tenant's budget
    router.handle(other, pub("metrics.a3", payload, keep=True))
    assert other.frames() == []


def test_kept_subjects_per_tenant_are_bounded(
    router: Router, tenancy: Tenancy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(router_module, "MAX_RETAINED_PER_TENANT", 1)
    alpha = connect(router, tenancy.ident("alpha"))
    router.handle(alpha, pub("metrics.alpha", b"m1", keep=True))
    router.handle(alpha, pub("discovery.announce.alpha", b"d1", keep=True))  # delivered, not kept
    router.handle(alpha, pub("metrics.alpha", b"m2", keep=True))  # a replacement still is

    late = connect(router, tenancy.ident("boss", roles=("admin",)))
    router.handle(late, sub(1, "metrics.*"))
    router.handle(late, sub(2, "discovery.announce.*"))
    assert [f.payload for f in late.frames()] == [b"m2"]


# --- direct messages and keys --------------------------------------------------------------------


def test_a_direct_message_goes_to_its_agent_or_back_as_no_responder(
    router: Router, tenancy: Tenancy
) -> None:
    alpha = connect(router, tenancy.ident("alpha"))
    beta = connect(router, tenancy.ident("beta"))

    router.handle(alpha, frame(FrameType.MSG, {"id": 1, "dst": "beta/test"}, b"box"))
    router.handle(alpha, frame(FrameType.MSG, {"id": 2, "dst": "ghost/test"}, b"box"))

    (got,) = beta.frames()
    assert (got.header["src"], got.header["dst"], got.payload) == ("alpha", "beta/test", b"box")
    (noresp,) = alpha.frames()
    assert noresp.type is FrameType.NORESP
    assert noresp.header["id"] == 2 and "no agent 'ghost'" in noresp.header["reason"]


def test_messages_and_key_requests_reach_agents_at_other_brokers(
    router: Router, tenancy: Tenancy
) -> None:
    far = tenancy.ident("far")
    mesh = FakeMesh({("acme", "far"): far.credential})
    router.mesh = mesh
    alpha = connect(router, tenancy.ident("alpha"))

    router.handle(alpha, frame(FrameType.MSG, {"id": 4, "dst": "far/p", "src": "alpha/q"}))
    router.handle(alpha, frame(FrameType.KEYREQ, {"name": "far"}))
    router.handle(alpha, frame(FrameType.KEYREQ, {"name": "alpha"}))
    router.handle(alpha, frame(FrameType.KEYREQ, {"name": "ghost"}))

    assert mesh.msgs == [("acme", "far", {"id": 4, "src": "alpha/q", "dst": "far/p"})]
    resp_far, resp_own, missing = alpha.frames()
    assert resp_far.type is FrameType.KEYRESP and resp_far.payload == far.credential
    assert resp_own.payload == alpha.ident.credential
    assert missing.type is FrameType.ERROR and missing.header["code"] == "no-agent"


def test_publications_go_to_the_mesh_with_their_route(router: Router, tenancy: Tenancy) -> None:
    mesh = FakeMesh()
    router.mesh = mesh
    alpha = connect(router, tenancy.ident("alpha"))
    router.handle(alpha, pub("app.x", id=7))
    router.handle(alpha, pub("metrics.alpha", keep=True, id=8))
    router.handle(alpha, pub("metrics.beta", id=9))  # refused: never leaves this broker

    assert mesh.pubs == [
        ("acme", "app.x", {"id": 7, "src": "alpha", "subj": "app.x"}),
        ("acme", "metrics.alpha", {"id": 8, "src": "alpha", "subj": "metrics.alpha", "keep": True}),
    ]


# --- sessions, names, revocations ----------------------------------------------------------------


def test_interest_and_agents_are_what_the_mesh_advertises(router: Router, tenancy: Tenancy) -> None:
    mesh = FakeMesh()
    router.mesh = mesh
    alpha = connect(router, tenancy.ident("alpha"))
    router.handle(alpha, sub(1, "app.>"))
    router.handle(alpha, pub("app.x"))  # publishing changes nothing to advertise
    spy = connect(router, tenancy.ident("spy", tenant="globex"))
    router.handle(spy, sub(3, "discovery.announce.*"))

    agents, subs = router.local_view()
    assert set(agents) == {("acme", "alpha"), ("globex", "spy")}
    assert agents[("acme", "alpha")][0] == alpha.ident.credential
    assert subs == {("acme", "app.>"), ("globex", "discovery.announce.*")}
    assert mesh.changes == 4  # two connects, two subscriptions


def test_a_name_belongs_to_one_key_and_a_reconnect_replaces_the_old_session(
    router: Router, tenancy: Tenancy
) -> None:
    key = SigningKey.generate()
    first = connect(router, tenancy.ident("alpha", key=key))
    router.handle(first, sub(1, "app.>"))
    with pytest.raises(AuthError) as taken:
        connect(router, tenancy.ident("alpha"))  # another key
    assert taken.value.code == "name-taken"

    second = connect(router, tenancy.ident("alpha", key=key))
    assert first.closed is not None and first.closed[0] == "replaced"
    assert first.subs == {}
    beta = connect(router, tenancy.ident("beta"))
    router.handle(beta, pub("app.x"))
    assert first.frames() == [] and second.frames() == []


def test_a_tenant_signed_rekey_waits_for_the_live_session_to_go(
    router: Router, tenancy: Tenancy
) -> None:
    first = connect(router, tenancy.ident("alpha"))
    time.sleep(0.002)  # issued after the name was bound: the tenant may re-key it
    rekeyed = tenancy.ident("alpha")
    with pytest.raises(AuthError, match="in use by another key") as taken:
        connect(router, rekeyed)
    assert taken.value.code == "name-taken" and first.closed is None

    router.detach(first)
    connect(router, rekeyed)
    assert router.agents("acme") == ["alpha"]


def test_a_new_name_binding_floods_to_the_mesh_once(router: Router, tenancy: Tenancy) -> None:
    mesh = FakeMesh()
    router.mesh = mesh
    ident = tenancy.ident("alpha")
    s = connect(router, ident)
    router.detach(s)
    connect(router, ident)  # known binding: nothing new

    (bind,) = mesh.synced
    assert bind["kind"] == "bind" and bind["name"] == "alpha" and bind["pub"] == ident.pub


def test_a_binding_from_another_broker_cuts_the_session_that_lost_the_name(
    router: Router, tenancy: Tenancy
) -> None:
    alpha = connect(router, tenancy.ident("alpha"))
    other = SigningKey.generate().verify_key.encode()
    # Bound by a credential the tenant signed itself, later: it re-keys the name.
    router.apply_binding(Binding("acme", "alpha", other, "", now_ms() + 1000, 0, True))

    assert alpha.closed is not None and alpha.closed[0] == "name-taken"
    assert router.agents("acme") == []


def test_a_revocation_cuts_the_agent_and_floods(
    router: Router, tenancy: Tenancy, operator: OperatorStore
) -> None:
    mesh = FakeMesh()
    router.mesh = mesh
    admin = connect(router, tenancy.ident("boss", roles=("admin",)))
    alpha = connect(router, tenancy.ident("alpha"))
    mesh.synced.clear()
    blob = operator.revoke("acme", name="alpha")

    router.handle(admin, frame(FrameType.REVOKE, {}, blob))

    assert alpha.closed is not None and alpha.closed[0] == "revoked"
    assert router.agents("acme") == ["boss"]
    assert mesh.synced == [{"kind": "revoke", "blob": blob}]
    assert router.apply_revocation(blob) is False  # known already
    with pytest.raises(AuthError) as revoked:
        connect(router, alpha.ident)
    assert revoked.value.code == "revoked"


def test_a_revocation_for_another_tenant_or_forged_is_refused(
    router: Router, tenancy: Tenancy, operator: OperatorStore
) -> None:
    mesh = FakeMesh()
    router.mesh = mesh
    spy = connect(router, tenancy.ident("spy", tenant="globex"))
    alpha = connect(router, tenancy.ident("alpha"))
    mesh.synced.clear()
    blob = operator.revoke("acme", name="alpha")

    router.handle(spy, frame(FrameType.REVOKE, {}, blob))
    router.handle(spy, frame(FrameType.REVOKE, {}, blob[:-1] + bytes([blob[-1] ^ 1])))

    reasons = [f.header["reason"] for f in spy.frames()]
    assert reasons[0] == "revocation is for another tenant"
    assert reasons[1].startswith("revocation refused")
    assert alpha.closed is None and mesh.synced == []


# --- kept state's lifecycle --------------------------------------------------------------------


def test_kept_subjects_have_a_count_budget_per_agent_and_tenant(
    router: Router, tenancy: Tenancy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(router_module, "MAX_KEPT_SUBJECTS_PER_AGENT", 1)
    monkeypatch.setattr(router_module, "MAX_RETAINED_PER_TENANT", 2)
    alpha = connect(router, tenancy.ident("alpha"))
    router.handle(alpha, pub("metrics.alpha", b"m1", keep=True, id=1))
    router.handle(alpha, pub("discovery.announce.alpha", b"d1", keep=True, id=2))  # a second
    router.handle(alpha, pub("metrics.alpha", b"m2", keep=True, id=3))  # a replacement: fine
    (refused,) = alpha.frames()
    assert refused.header["id"] == 2 and refused.header["code"] == "forbidden"
    assert "agent 'alpha' would keep over 1 subjects" in refused.header["reason"]

    beta = connect(router, tenancy.ident("beta"))
    gamma = connect(router, tenancy.ident("gamma"))
    router.handle(beta, pub("metrics.beta", b"b1", keep=True))
    router.handle(gamma, pub("metrics.gamma", b"g1", keep=True))
    assert beta.frames() == []
    (full,) = gamma.frames()
    assert "tenant 'acme' would keep over 2 subjects" in full.header["reason"]
    assert set(kept(router)) == {"metrics.alpha", "metrics.beta"}


def kept(router: Router, tenant: str = "acme") -> dict[str, bytes]:
    space = router._tenants[tenant]
    return {subject: data for subject, (_by, data) in space.retained.items()}


def test_what_a_departed_agent_kept_expires_after_the_ttl(router: Router, tenancy: Tenancy) -> None:
    alpha = connect(router, tenancy.ident("alpha"))
    beta = connect(router, tenancy.ident("beta"))
    router.handle(alpha, pub("discovery.announce.alpha", b"a", keep=True))
    router.handle(alpha, pub("metrics.alpha", b"m", keep=True, id=2))
    router.handle(beta, pub("metrics.beta", b"b", keep=True))
    router.detach(alpha)

    t0 = 1_000_000
    assert router.expire_kept(t0, ttl_ms=60_000) == 0  # alpha's absence is noticed from here
    assert router.expire_kept(t0 + 59_999, ttl_ms=60_000) == 0
    assert router.expire_kept(t0 + 60_000, ttl_ms=60_000) == 2
    assert set(kept(router)) == {"metrics.beta"}  # beta is connected: its state stays
    space = router._tenants["acme"]
    assert space.retained_bytes == sum(len(d) for _b, d in space.retained.values())
    assert set(space.kept_by) == {"beta"} and set(space.kept_subjects) == {"beta"}

    late = connect(router, tenancy.ident("late", roles=("admin",)))
    router.handle(late, sub(1, "metrics.*"))
    router.handle(late, sub(2, "discovery.announce.*"))
    assert [f.payload for f in late.frames()] == [b"b"]  # a new watcher never sees alpha


def test_an_agent_back_within_the_ttl_keeps_its_state(router: Router, tenancy: Tenancy) -> None:
    alpha = connect(router, tenancy.ident("alpha"))
    router.handle(alpha, pub("metrics.alpha", b"m", keep=True))
    router.detach(alpha)
    t0 = 1_000_000
    router.expire_kept(t0, ttl_ms=60_000)
    again = connect(router, alpha.ident)  # back (a reconnect, or after a broker restart)
    assert router.expire_kept(t0 + 30_000, ttl_ms=60_000) == 0  # present: the clock resets
    router.detach(again)
    assert router.expire_kept(t0 + 70_000, ttl_ms=60_000) == 0  # gone again, from here
    assert router.expire_kept(t0 + 130_000, ttl_ms=60_000) == 1
    assert kept(router) == {}


def test_state_kept_for_an_agent_at_another_broker_lives_while_the_mesh_reaches_it(
    router: Router, tenancy: Tenancy
) -> None:
    far = tenancy.ident("far")
    mesh = FakeMesh({("acme", "far"): far.credential})
    router.mesh = mesh
    router.deliver_pub("acme", "metrics.far", b"relayed", keep="far")  # relayed by a peer
    t0 = 1_000_000
    assert router.expire_kept(t0, ttl_ms=1_000) == 0
    assert router.expire_kept(t0 + 5_000, ttl_ms=1_000) == 0  # still reachable: kept
    del mesh.reachable[("acme", "far")]  # its broker's advert no longer lists it
    router.expire_kept(t0 + 6_000, ttl_ms=1_000)
    assert router.expire_kept(t0 + 7_000, ttl_ms=1_000) == 1
    assert kept(router) == {}


def test_a_subscription_finds_kept_subjects_by_pattern(router: Router, tenancy: Tenancy) -> None:
    for name in ("a1", "a2", "a3"):
        s = connect(router, tenancy.ident(name))
        router.handle(s, pub(f"metrics.{name}", name.encode(), keep=True))
        router.handle(s, pub(f"discovery.announce.{name}", b"d-" + name.encode(), keep=True))
    late = connect(router, tenancy.ident("late", roles=("admin",)))
    router.handle(late, sub(1, "metrics.a2"))
    assert [f.payload for f in late.frames()] == [b"a2"]
    router.handle(late, sub(2, "metrics.*"))
    assert sorted(f.payload for f in late.frames()) == [b"a1", b"a2", b"a3"]
    router.handle(late, sub(3, "discovery.announce.*"))
    assert sorted(f.payload for f in late.frames()) == [b"d-a1", b"d-a2", b"d-a3"]
    router.handle(late, sub(4, "discovery.announce.a3"))
    assert [f.payload for f in late.frames()] == [b"d-a3"]
