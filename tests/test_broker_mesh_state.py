"""The broker mesh without sockets: the link-state database (adverts, graph, interest, fan-out)
and the peering logic driven through fake links (advert, revocation and binding floods, relays
and their hop limit)."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import pytest
from nacl.signing import SigningKey

from atoll.broker.mesh import Advert, LinkState, SeenIds
from atoll.broker.peering import PeerMesh
from atoll.broker.router import Router
from atoll.broker.state import BrokerState
from atoll.protocol.errors import ProtocolError
from atoll.protocol.frames import (
    DEFAULT_MAX_MESSAGE,
    Frame,
    FrameType,
    decode_message,
    encode_frame,
    pack,
    unpack_map,
)
from atoll.protocol.trust import AgentIdentity, now_ms, verify_agent
from atoll.tenancy.operator import OperatorStore
from atoll.transport import CLOSE_POLICY


def advert(
    name: str,
    seq: int,
    peers: set[str],
    agents: dict[tuple[str, str], tuple[bytes, int]] | None = None,
    subs: set[tuple[str, str]] | None = None,
) -> Advert:
    return Advert(name, seq, frozenset(peers), dict(agents or {}), frozenset(subs or ()))


def graph(me: str, edges: dict[str, set[str]], **adverts: Advert) -> LinkState:
    """A view from ``me`` where each broker advertises the peers ``edges`` gives it."""
    state = LinkState(me)
    state.advertise(edges.get(me, set()), {}, set())
    for name, peers in edges.items():
        if name != me:
            state.accept(adverts.get(name) or advert(name, 1, peers))
    return state


# --- the link-state database ---------------------------------------------------------------------


def test_only_newer_adverts_of_other_brokers_are_news() -> None:
    state = LinkState("a")
    assert state.accept(advert("b", 5, {"a"}))
    assert not state.accept(advert("b", 5, {"a"}))  # the same one flooded back
    assert not state.accept(advert("b", 4, set()))  # an older one arriving late
    assert state.adverts["b"].peers == {"a"}
    assert not state.accept(advert("a", 10**18, set()))  # ours is ours to say
    assert state.accept(advert("b", 6, set()))


def test_own_adverts_number_up_from_the_clock() -> None:
    state = LinkState("a")
    first = state.advertise({"b"}, {}, set())
    second = state.advertise(set(), {}, set())
    assert second.seq == first.seq + 1
    assert first.seq >= (time.time_ns() // 1000) - 60_000_000  # restarts supersede old adverts


def test_an_edge_counts_only_when_both_ends_advertise_it() -> None:
    state = graph("a", {"a": {"b", "c"}, "b": {"a"}, "c": set()})
    assert state.next_hops() == {"b": "b"}


def test_next_hops_follow_shortest_paths() -> None:
    # a - b - c - d, and a - e - d: d is two hops away through e, c three through b... or
    # two through e; ties go to the neighbour whose name sorts first.
    edges = {
        "a": {"b", "e"},
        "b": {"a", "c"},
        "c": {"b", "d"},
        "d": {"c", "e"},
        "e": {"a", "d"},
    }
    state = graph("a", edges)
    assert state.next_hops() == {"b": "b", "e": "e", "c": "b", "d": "e"}


def test_locate_prefers_the_newest_connection_and_ignores_unreachable_brokers() -> None:
    cred_old, cred_new = b"old-credential", b"new-credential"
    adverts = {
        "b": advert("b", 1, {"a"}, {("acme", "x"): (cred_old, 100)}),
        "c": advert("c", 1, {"a"}, {("acme", "x"): (cred_new, 200)}),
        "z": advert("z", 1, set(), {("acme", "x"): (b"newest-but-cut-off", 300)}),
    }
    state = graph("a", {"a": {"b", "c"}, "b": {"a"}, "c": {"a"}, "z": set()}, **adverts)
    assert state.locate("acme", "x") == "c"
    assert state.credential("acme", "x") == cred_new
    assert state.locate("globex", "x") is None and state.credential("globex", "x") is None


def test_interest_is_per_tenant_reachable_and_not_our_own() -> None:
    adverts = {
        "b": advert("b", 1, {"a"}, subs={("acme", "app.news.*")}),
        "c": advert("c", 1, {"a"}, subs={("acme", "app.>"), ("globex", "app.news.x")}),
        "z": advert("z", 1, set(), subs={("acme", "app.>")}),
    }
    state = LinkState("a")
    for a in adverts.values():
        state.accept(a)
    state.advertise({"b", "c"}, {}, {("acme", "app.>")})
    assert state.interested("acme", "app.news.x") == {"b", "c"}
    assert state.interested("acme", "app.other") == {"c"}
    assert state.interested("globex", "app.news.x") == {"c"}
    assert state.interested("initech", "app.news.x") == set()

    state.accept(advert("b", 2, {"a"}))  # b's subscriber left
    assert state.interested("acme", "app.news.x") == {"c"}


def test_a_publication_goes_down_the_tree_of_its_origin_only_where_someone_listens() -> None:
    # b - a - c - d: from origin b, a passes on towards c and d; c passes on to d only.
    edges = {"a": {"b", "c"}, "b": {"a"}, "c": {"a", "d"}, "d": {"c"}}
    at_a, at_c = graph("a", edges), graph("c", edges)
    assert at_a.fanout("b", {"d"}) == {"c"}
    assert at_a.fanout("b", {"c", "d"}) == {"c"}
    assert at_a.fanout("b", {"b"}) == set()  # never back up the tree
    assert at_c.fanout("b", {"d"}) == {"d"}
    assert at_c.fanout("b", {"a"}) == set()
    assert at_a.fanout("a", {"b", "d"}) == {"b", "c"}


def test_in_a_cycle_each_broker_gets_one_copy() -> None:
    edges = {"a": {"b", "c"}, "b": {"a", "c"}, "c": {"a", "b"}}
    views = {n: graph(n, edges) for n in edges}
    copies = {n: 0 for n in edges}
    todo = [("a", hop) for hop in views["a"].fanout("a", {"b", "c"})]
    while todo:
        _, at = todo.pop()
        copies[at] += 1
        todo += [(at, hop) for hop in views[at].fanout("a", {"b", "c"})]
    assert copies == {"a": 0, "b": 1, "c": 1}


def test_brokers_out_of_reach_are_forgotten_after_a_while() -> None:
    state = graph("a", {"a": {"b"}, "b": {"a"}, "z": set()})
    state.adverts["z"].received -= 100
    state.adverts["b"].received -= 100
    assert state.expire(30) == ["z"]  # b is reachable: its advert stands
    assert set(state.adverts) == {"a", "b"}


def test_adverts_survive_the_wire_and_malformed_ones_are_refused() -> None:
    a = advert("b", 7, {"a", "c"}, {("acme", "x"): (b"cred", 5)}, {("acme", "app.>")})
    back = Advert.decode(a.encode())
    assert (back.name, back.seq, back.peers, back.agents, back.subs) == (
        a.name,
        a.seq,
        a.peers,
        a.agents,
        a.subs,
    )
    for bad in (
        {"name": "b", "seq": "7", "peers": [], "agents": [], "subs": []},
        {"name": "b", "seq": 7, "peers": [], "agents": [["acme", "x", "cred", 5]], "subs": []},
        {"name": "b", "seq": 7, "peers": [], "agents": [], "subs": [["acme", "app..x"]]},
        {"name": "b", "seq": 7, "peers": []},
    ):
        with pytest.raises(ProtocolError):
            Advert.decode(pack(bad))


def test_seen_ids_drop_second_copies_within_a_bounded_memory() -> None:
    seen = SeenIds(size=2)
    assert seen.add(1) and not seen.add(1)
    assert seen.add(2) and seen.add(3)  # 1 falls out of memory
    assert seen.add(1) and not seen.add(3)


# --- peering, driven through fake links ----------------------------------------------------------


class FakeWS:
    """A peer link's websocket: records frames sent; the test delivers frames in."""

    def __init__(self, loop: Any) -> None:
        self.sent: list[bytes] = []
        self.open = True
        self.ping_interval: float | None = None
        self.closed = loop.create_future()
        self.close_code: int | None = None
        self.on_message: Any = None

    def send(self, data: bytes, urgent: bool = False) -> None:
        self.sent.append(data)

    def deliver_to(self, on_message: Any) -> None:
        self.on_message = on_message

    def close(self, code: int = 1000, reason: str = "") -> None:
        self.open = False
        self.close_code = code

    def frames(self) -> list[Frame]:
        out = [f for data in self.sent for f in decode_message(data)]
        self.sent.clear()
        return out


class FakeSession:
    _ids = iter(range(1, 1_000_000))

    def __init__(self, ident: AgentIdentity) -> None:
        self.id = next(self._ids)
        self.ident = ident
        self.subs: dict[int, str] = {}
        self.sent: list[bytes] = []
        self.closed: tuple[str, str] | None = None

    def send(self, data: bytes) -> None:
        self.sent.append(data)

    def close(self, code: str, reason: str) -> None:
        self.closed = (code, reason)


class Broker:
    """A broker ``me`` with a real router and state, its mesh linked to fake peers."""

    def __init__(self, op: OperatorStore, me: str = "me") -> None:
        self.op = op
        self.loop = asyncio.get_running_loop()
        state = BrokerState(None, op.operator_pub)
        self.router = Router(state)
        server = SimpleNamespace(
            keys=SimpleNamespace(name=me),
            max_message=DEFAULT_MAX_MESSAGE,
            ping_interval=10.0,
            peer_ssl=None,
            router=self.router,
            state=state,
        )
        self.mesh = PeerMesh(server, [])  # type: ignore[arg-type]
        self.router.mesh = self.mesh
        self.links: dict[str, FakeWS] = {}

    def link(self, name: str) -> FakeWS:
        ws = FakeWS(self.loop)
        assert self.mesh.attach(ws, name, dialled=True)  # type: ignore[arg-type]
        self.links[name] = ws
        return ws

    def receive(self, peer: str, ftype: FrameType, header: dict[str, Any], payload: bytes) -> None:
        self.links[peer].on_message(encode_frame(ftype, header, payload))

    def ident(self, name: str, roles: tuple[str, ...] = ("agent",)) -> AgentIdentity:
        pub = SigningKey.generate().verify_key.encode()
        return verify_agent(
            self.op.agent_credential("acme", pub, name, list(roles)), self.op.operator_pub
        )

    def local(self, name: str, *patterns: str, roles: tuple[str, ...] = ("agent",)) -> FakeSession:
        s = FakeSession(self.ident(name, roles))
        self.router.attach(s)
        for sid, pattern in enumerate(patterns):
            self.router.handle(s, _frame(FrameType.SUB, {"sid": sid, "subj": pattern}))
        return s

    def peer_advert(self, name: str, seq: int, **kw: Any) -> None:
        a = advert(name, seq, {"me"}, **kw)
        self.receive(name, FrameType.PEER_STATE, {"origin": name, "seq": seq}, a.encode())

    def quiet(self) -> None:
        for ws in self.links.values():
            ws.sent.clear()


def _frame(ftype: FrameType, header: dict[str, Any], payload: bytes = b"") -> Frame:
    (f,) = decode_message(encode_frame(ftype, header, payload))
    return f


def relays(ws: FakeWS) -> list[Frame]:
    """The relayed frames a link got (adverts of ours may go first: they carry credentials)."""
    return [f for f in ws.frames() if f.type is FrameType.RELAY]


def inner_pub(subject: str, src: str, payload: bytes = b"sealed", id: int = 1) -> bytes:
    return encode_frame(FrameType.PUB, {"id": id, "subj": subject, "kid": 1, "src": src}, payload)


@pytest.fixture
async def broker(operator: OperatorStore) -> Broker:
    return Broker(operator)


async def test_a_new_link_hears_every_advert_and_revocation_we_hold(
    broker: Broker, operator: OperatorStore
) -> None:
    blob = operator.revoke("acme", name="gone")
    broker.router.apply_revocation(blob)
    p1 = broker.link("p1")
    broker.peer_advert("p1", 1)

    p2 = broker.link("p2")
    got = p2.frames()
    states = {f.header["origin"]: f for f in got if f.type is FrameType.PEER_STATE}
    assert set(states) == {"me", "p1"}
    assert Advert.decode(states["me"].payload).peers == {"p1", "p2"}
    syncs = [unpack_map(f.payload, "sync") for f in got if f.type is FrameType.SYNC]
    assert {"kind": "revoke", "blob": blob} in syncs
    assert p2.ping_interval == 2.0  # a frozen peer is dropped quickly
    assert p1.open


async def test_adverts_flood_on_once_and_a_lying_header_cuts_the_link(broker: Broker) -> None:
    p1, p2 = broker.link("p1"), broker.link("p2")
    broker.quiet()
    broker.peer_advert("p1", 5)
    assert [f.header["origin"] for f in p2.frames()] == ["p1"]
    assert p1.frames() == []  # never back where it came from
    broker.peer_advert("p1", 5)  # the same advert again: not news
    assert p2.frames() == []

    a = advert("p1", 9, {"me"})
    broker.receive("p1", FrameType.PEER_STATE, {"origin": "p1", "seq": 8}, a.encode())
    assert p1.close_code == CLOSE_POLICY and p2.frames() == []


async def test_a_relayed_publication_is_delivered_and_forwarded_within_its_hop_limit(
    broker: Broker,
) -> None:
    p1, p2 = broker.link("p1"), broker.link("p2")
    publisher = broker.ident("alpha")
    broker.peer_advert("p1", 1, agents={("acme", "alpha"): (publisher.credential, 1)})
    broker.peer_advert("p2", 1, subs={("acme", "app.>")})
    reader = broker.local("reader", "app.>")
    broker.quiet()

    def relay(id: int, ttl: int) -> None:
        header = {"tenant": "acme", "origin": "p1", "ttl": ttl, "id": id}
        header |= {"src": "alpha/x", "subj": "app.news"}
        broker.receive("p1", FrameType.RELAY, header, inner_pub("app.news", "alpha/x", id=id))

    relay(1, ttl=3)
    (forwarded,) = relays(p2)
    assert forwarded.type is FrameType.RELAY and forwarded.header["ttl"] == 2
    assert forwarded.header["origin"] == "p1"  # the tree stays the origin's
    assert decode_message(forwarded.payload)[0].header["src"] == "alpha/x"

    relay(1, ttl=3)  # a second copy of the same frame: dropped
    relay(2, ttl=1)  # its last hop: delivered here, forwarded no further
    assert relays(p2) == [] and relays(p1) == []
    assert [decode_message(d)[0].header["id"] for d in reader.sent] == [1, 2]


async def test_a_relayed_publication_is_checked_against_the_publishers_own_roles(
    broker: Broker,
) -> None:
    broker.link("p1")
    publisher = broker.ident("alpha")
    broker.peer_advert("p1", 1, agents={("acme", "alpha"): (publisher.credential, 1)})
    watcher = broker.local("boss", "metrics.*", roles=("admin",))
    assert watcher.subs == {0: "metrics.*"}
    for id, (src, subject) in enumerate((("alpha", "metrics.beta"), ("ghost", "metrics.ghost"))):
        header = {"tenant": "acme", "origin": "p1", "ttl": 3, "id": id, "src": src, "subj": subject}
        broker.receive("p1", FrameType.RELAY, header, inner_pub(subject, src, id=id))
    assert watcher.sent == []  # alpha may not publish beta's feed; ghost has no credential


async def test_a_relayed_message_to_nobody_goes_back_to_its_sender_as_no_responder(
    broker: Broker,
) -> None:
    p1 = broker.link("p1")
    broker.peer_advert("p1", 1, agents={("acme", "alpha"): (broker.ident("alpha").credential, 1)})
    beta = broker.local("beta")
    broker.quiet()
    for id, dst in ((1, "beta/x"), (2, "ghost/x")):
        header = {"tenant": "acme", "origin": "p1", "ttl": 3, "id": id}
        header |= {"src": "alpha/q", "dst": dst}
        inner = encode_frame(FrameType.MSG, {"id": id, "dst": dst, "src": "alpha/q"}, b"box")
        broker.receive("p1", FrameType.RELAY, header, inner)

    assert [decode_message(d)[0].header["id"] for d in beta.sent] == [1]
    (back,) = relays(p1)
    assert back.header["to"] == "alpha" and back.header["origin"] == "me"
    (noresp,) = decode_message(back.payload)
    assert noresp.type is FrameType.NORESP and noresp.header["id"] == 2


async def test_a_revocation_flood_cuts_local_agents_and_travels_on_once(
    broker: Broker, operator: OperatorStore
) -> None:
    p1, p2 = broker.link("p1"), broker.link("p2")
    alpha = broker.local("alpha")
    broker.quiet()
    body = pack({"kind": "revoke", "blob": operator.revoke("acme", name="alpha")})

    broker.receive("p1", FrameType.SYNC, {"origin": "p1"}, body)
    broker.receive("p2", FrameType.SYNC, {"origin": "p1"}, body)  # around the cycle: old news

    assert alpha.closed is not None and alpha.closed[0] == "revoked"
    assert [f.payload for f in p2.frames()] == [body]
    assert p1.frames() == []

    blob = operator.revoke("acme", name="beta")
    forged = pack({"kind": "revoke", "blob": blob[:-1] + bytes([blob[-1] ^ 1])})
    broker.receive("p2", FrameType.SYNC, {"origin": "p2"}, forged)
    assert p2.close_code == CLOSE_POLICY and p1.frames() == []


async def test_a_binding_flood_cuts_the_local_agent_that_lost_its_name(broker: Broker) -> None:
    p1, p2 = broker.link("p1"), broker.link("p2")
    alpha = broker.local("alpha")
    broker.quiet()
    other = SigningKey.generate().verify_key.encode()
    bind = {"kind": "bind", "tenant": "acme", "name": "alpha", "pub": other, "jti": ""}
    bind |= {"at": now_ms() + 1000, "exp": 0, "direct": True}

    broker.receive("p1", FrameType.SYNC, {"origin": "p1"}, pack(bind))

    assert alpha.closed is not None and alpha.closed[0] == "name-taken"
    assert [unpack_map(f.payload, "sync")["name"] for f in p2.frames()] == ["alpha"]

    broker.receive("p2", FrameType.SYNC, {"origin": "p2"}, pack({**bind, "direct": "yes"}))
    assert p2.close_code == CLOSE_POLICY and p1.frames() == []


async def test_local_bindings_and_revocations_flood_to_every_link(
    broker: Broker, operator: OperatorStore
) -> None:
    p1, p2 = broker.link("p1"), broker.link("p2")
    broker.quiet()
    broker.local("alpha")
    blob = operator.revoke("acme", name="alpha")
    admin = broker.local("boss", roles=("admin",))
    broker.quiet()
    broker.router.handle(admin, _frame(FrameType.REVOKE, {}, blob))
    for ws in (p1, p2):
        (sync,) = [f for f in ws.frames() if f.type is FrameType.SYNC]
        assert unpack_map(sync.payload, "sync") == {"kind": "revoke", "blob": blob}


async def test_two_links_to_one_peer_keep_the_one_the_first_name_dialled(broker: Broker) -> None:
    # "me" < "zed": the link "me" dialled stays; the one zed dialled is closed.
    dialled = broker.link("zed")
    accepted = FakeWS(broker.loop)
    assert not broker.mesh.attach(accepted, "zed", dialled=False)  # type: ignore[arg-type]
    assert accepted.close_code == 1000 and dialled.open
    # "me" > "abe": abe's dialling wins over ours.
    ours = broker.link("abe")
    theirs = FakeWS(broker.loop)
    assert broker.mesh.attach(theirs, "abe", dialled=False)  # type: ignore[arg-type]
    assert ours.close_code == 1000 and theirs.open
