"""The broker mesh without sockets: the link-state database kept by deltas (numbering, gaps,
digests, chunked snapshots, bounds on what comes from the network, the graph, interest, fan-out,
the hop limit) and the peering logic driven through fake links (state exchange, revocation and
binding floods, relays and their hop limit)."""

from __future__ import annotations

import asyncio
import random
import tracemalloc
from collections import deque
from types import SimpleNamespace
from typing import Any

import pytest
from nacl.signing import SigningKey

from atoll.broker import mesh as mesh_module
from atoll.broker.mesh import (
    CHUNK_BYTES,
    CHUNK_ENTRIES,
    MAX_HOPS,
    WANT_COOLDOWN,
    LinkState,
    LocalChange,
    Origin,
    Send,
)
from atoll.broker.peering import PeerMesh
from atoll.broker.router import Router
from atoll.broker.seen_ids import SeenIds
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
from atoll.protocol.trust import AgentIdentity, now_ms
from atoll.tenancy.operator import OperatorStore
from atoll.transport import CLOSE_POLICY
from support.broker_fakes import FakeSession, frame, identity


class _AnyInt:
    def __eq__(self, other: object) -> bool:
        return type(other) is int


ANY_INT: Any = _AnyInt()

Agents = dict[tuple[str, str], tuple[bytes, int]]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def record(
    name: str,
    seq: int,
    peers: set[str],
    agents: Agents | None = None,
    subs: set[tuple[str, str]] | None = None,
) -> list[Frame]:
    """A broker's whole record as the snapshot frames a neighbour would send."""
    rec = Origin(name, seq, frozenset(peers), dict(agents or {}), set(subs or ()))
    return [decode(d) for d in LinkState("any").snapshot(rec)]


def decode(data: bytes) -> Frame:
    (f,) = decode_message(data)
    return f


def body(f: Frame | bytes) -> dict[str, Any]:
    return unpack_map((f if isinstance(f, Frame) else decode(f)).payload, "mesh state")


def state_frame(origin: str, seq: int, content: dict[str, Any]) -> Frame:
    return decode(encode_frame(FrameType.PEER_STATE, {"origin": origin, "seq": seq}, pack(content)))


def delta(origin: str, seq: int, *ops: list[Any]) -> Frame:
    return state_frame(
        origin, seq, {"kind": "delta", "origin": origin, "seq": seq, "ops": list(ops)}
    )


def digest(sender: str, *have: tuple[str, int]) -> Frame:
    return state_frame(sender, 0, {"kind": "digest", "have": [list(h) for h in have]})


def feed(state: LinkState, link: str, frames: list[Frame]) -> list[Send]:
    out: list[Send] = []
    for f in frames:
        out += state.receive(link, f)
    return out


def graph(me: str, edges: dict[str, set[str]], **records: list[Frame]) -> LinkState:
    """A view from ``me`` where each broker advertises the peers ``edges`` gives it."""
    state = LinkState(me)
    state.set_peers(edges.get(me, set()))
    state.flush()
    for name, peers in edges.items():
        if name != me:
            feed(state, name, records.get(name) or record(name, 1, peers))
    return state


def wants(sends: list[Send]) -> dict[str, list[str]]:
    """Records asked for, by link."""
    out: dict[str, list[str]] = {}
    for s in sends:
        b = body(s.data)
        if b["kind"] == "want":
            assert s.to is not None
            out.setdefault(s.to, []).extend(b["origins"])
    return out


def joins(n: int, start: int = 0, cred: bytes = b"c" * 400) -> list[LocalChange]:
    return [LocalChange("+agent", "acme", f"a{i}", cred, i) for i in range(start, start + n)]


# --- deltas --------------------------------------------------------------------------------------


def test_own_changes_become_numbered_deltas_carrying_only_what_changed() -> None:
    state = LinkState("a")
    first = state.seq
    assert first >= 1_600_000_000 * 10**6  # from the clock: restarts supersede old records
    state.local(joins(1000))
    state.set_peers({"b"})
    big = state.flush()
    assert state.seq == first + len(big) and len(big) == 2  # 1001 ops: two deltas of <= 512
    assert state.flush() == []  # nothing new, nothing sent

    state.local([LocalChange("+agent", "acme", "late", b"x" * 400, 1)])
    (one,) = state.flush()
    assert body(one) == {
        "kind": "delta",
        "origin": "a",
        "seq": first + 3,
        "ops": [["+a", "acme", "late", b"x" * 400, 1]],
    }
    assert len(one) < 600  # one agent's join, whatever the broker already holds

    state.local([LocalChange("-agent", "acme", "late"), LocalChange("-agent", "acme", "ghost")])
    (gone,) = state.flush()
    assert body(gone)["ops"] == [["-a", "acme", "late"]]  # a change of nothing is not sent


def test_a_burst_is_cut_into_bounded_deltas_that_rebuild_the_same_record() -> None:
    state = LinkState("a")
    state.local(joins(1500, cred=b"c" * 2000))
    state.local([LocalChange("+interest", "acme", f"app.{i}.>") for i in range(100)])
    frames = state.flush()
    assert len(frames) >= 3
    for d in frames:
        assert len(body(d)["ops"]) <= CHUNK_ENTRIES and len(d) <= CHUNK_BYTES + 4096
    other = LinkState("b")
    feed(other, "a", record("a", state.seq - len(frames), set()))  # what it held before
    sends = feed(other, "a", [decode(d) for d in frames])
    assert all(s.to is None and s.exclude == "a" for s in sends)  # each news: flooded on
    got = other.origins["a"]
    assert got.seq == state.seq and got.agents == state.origins["a"].agents
    assert len(got.subs) == 100


def test_a_delta_applies_only_on_top_of_the_sequence_it_extends() -> None:
    clock = Clock()
    state = LinkState("me", clock)
    state.set_peers({"b"})
    state.flush()
    feed(state, "b", record("b", 5, {"me"}))
    cred = b"cred-of-x"
    (sent,) = feed(state, "b", [delta("b", 6, ["+a", "acme", "x", cred, 7])])
    assert sent.to is None and sent.exclude == "b"  # news: flooded on, not back
    assert state.origins["b"].agents == {("acme", "x"): (cred, 7)}
    assert feed(state, "c", [delta("b", 6, ["-a", "acme", "x"])]) == []  # the same seq again
    assert feed(state, "c", [delta("b", 4, ["-a", "acme", "x"])]) == []  # an old one
    assert state.credential("acme", "x") == cred

    # A gap: 8 does not extend 6. Held (7 may come the long way round), not flooded yet; when
    # the hole stays past the grace, the record is asked of the sender.
    assert feed(state, "c", [delta("b", 8, ["-a", "acme", "x"])]) == []
    assert state.origins["b"].seq == 6 and ("acme", "x") in state.origins["b"].agents
    assert state.poll() == []
    clock.now += mesh_module.GAP_GRACE + 0.1
    sends = state.poll()
    assert wants(sends) == {"c": ["b"]} and all(s.to == "c" for s in sends)
    # The record, whole, repairs it; the other neighbours hear we have it (they pull if behind).
    sends = feed(state, "c", record("b", 8, {"me"}))
    assert state.origins["b"].seq == 8 and state.origins["b"].agents == {}
    (told,) = sends
    assert told.exclude == "c" and body(told.data) == {"kind": "digest", "have": [["b", 8]]}


def test_deltas_overtaken_on_a_shorter_path_are_applied_in_order() -> None:
    state = graph("me", {"me": {"b", "c"}, "b": {"me"}, "c": {"me"}})
    d2, d3, d4 = (delta("b", n, ["+s", "acme", f"app.{n}"]) for n in (2, 3, 4))
    assert feed(state, "c", [d4, d3]) == []  # both ahead of 1: held
    sends = feed(state, "b", [d2])
    assert [(s.data, s.exclude) for s in sends] == [(d2.raw, "b"), (d3.raw, "c"), (d4.raw, "c")]
    assert state.origins["b"].seq == 4 and len(state.origins["b"].subs) == 3
    assert state.poll() == [] and state._early == {} and state._early_bytes == 0


def test_too_many_held_deltas_pull_the_record_at_once() -> None:
    state = graph("me", {"me": {"b"}, "b": {"me"}})
    ahead = [delta("b", n, ["+s", "acme", f"app.{n}"]) for n in range(3, 3 + mesh_module.MAX_EARLY)]
    assert feed(state, "b", ahead) == []
    assert wants(feed(state, "b", [delta("b", 100, ["+s", "acme", "app.x"])])) == {"b": ["b"]}
    assert state._early == {} and state._early_bytes == 0


def test_a_delta_of_a_broker_we_do_not_know_pulls_its_record() -> None:
    state = LinkState("me")
    sends = feed(state, "b", [delta("b", 3, ["peers", ["me"]])])
    assert wants(sends) == {"b": ["b"]}
    assert "b" not in state.origins
    assert wants(feed(state, "c", [delta("b", 4, ["peers", ["me"]])])) == {}  # asked already


def test_interest_follows_added_and_removed_patterns() -> None:
    state = graph("a", {"a": {"b"}, "b": {"a"}})
    feed(state, "b", [delta("b", 2, ["+s", "acme", "app.*"], ["+s", "globex", "app.x"])])
    assert state.interested("acme", "app.x") == {"b"}
    assert state.interested("globex", "app.x") == {"b"}
    feed(state, "b", [delta("b", 3, ["-s", "acme", "app.*"])])
    assert state.interested("acme", "app.x") == set()
    assert state.interested("globex", "app.x") == {"b"}


# --- digests, snapshots, repair ------------------------------------------------------------------


def test_a_digest_ahead_of_us_pulls_and_one_behind_or_equal_does_not() -> None:
    state = graph("me", {"me": {"b", "c"}, "b": {"me"}, "c": {"me"}})
    assert feed(state, "b", [digest("b", ("b", 1), ("c", 1))]) == []  # equal
    assert wants(feed(state, "b", [digest("b", ("c", 5), ("z", 2))])) == {"b": ["c", "z"]}
    (d,) = state.digest()
    have = dict(map(tuple, body(d)["have"]))
    assert have == {"me": state.seq, "b": 1, "c": 1}  # what we reach, ourselves included


def test_a_want_asked_again_at_once_is_not_answered_again() -> None:
    """A neighbour asking in a loop would have us send every record over and over: the same
    record at the same seq goes to one link once per WANT_COOLDOWN; a newer seq, another link,
    or the same link after it was re-made are answered at once."""
    now = [100.0]
    state = LinkState("me", clock=lambda: now[0])
    state.set_peers({"b", "c"})
    state.local(joins(10))
    state.flush()

    def snapshots(link: str) -> int:
        want = state_frame(link, 0, {"kind": "want", "origins": ["me"]})
        sends = state.receive(link, want)
        return sum(1 for s in sends if s.to == link and body(s.data)["kind"] == "snapshot")

    assert snapshots("b") == 1
    assert [snapshots("b") for _ in range(50)] == [0] * 50  # asked in a loop: nothing more
    assert state.wants_ignored == 50
    assert snapshots("c") == 1  # another neighbour's own first ask
    now[0] += WANT_COOLDOWN
    assert snapshots("b") == 1  # an honest re-ask, a cooldown later
    state.local(joins(1, start=50))
    state.flush()
    assert snapshots("b") == 1  # a newer record
    state.link_down("b")
    assert snapshots("b") == 1  # a new link starts afresh


def test_a_want_is_answered_with_the_record_in_bounded_chunks() -> None:
    state = LinkState("me")
    state.set_peers({"b"})
    state.local(joins(1300, cred=b"k" * 405))
    state.local([LocalChange("+interest", "acme", f"jobs.{i}") for i in range(300)])
    state.flush()
    want = state_frame("b", 0, {"kind": "want", "origins": ["me", "nobody"]})
    state.local(joins(1, start=5000))  # noted, not yet numbered: the answer numbers it first
    sends = state.receive("b", want)
    flooded = [s for s in sends if s.to is None]
    chunks = [s.data for s in sends if s.to == "b" and body(s.data)["kind"] == "snapshot"]
    (gone,) = [s.data for s in sends if s.to == "b" and body(s.data)["kind"] == "gone"]
    assert len(flooded) == 1 and body(gone)["origins"] == ["nobody"]
    assert len(chunks) >= 4
    for i, c in enumerate(chunks):
        b = body(c)
        assert (b["part"], b["parts"], b["seq"]) == (i, len(chunks), state.seq)
        assert len(b["agents"]) + len(b["subs"]) <= CHUNK_ENTRIES
        assert len(c) <= CHUNK_BYTES + 4096  # no frame grows with the agent count

    other = LinkState("b")
    for c in chunks[:-1]:
        assert other.receive("me", decode(c)) == []
        assert "me" not in other.origins  # applied only once complete
    other.receive("me", decode(chunks[-1]))
    got = other.origins["me"]
    assert got.seq == state.seq and got.agents == state.origins["me"].agents
    assert got.subs == state.origins["me"].subs and got.peers == {"b"}


def test_snapshot_parts_come_in_order_and_back_to_back() -> None:
    big = {("acme", f"a{i}"): (b"c" * 100, i) for i in range(1200)}
    parts = record("b", 4, {"me"}, big)
    assert len(parts) == 3
    with pytest.raises(ProtocolError, match="out of order"):
        feed(LinkState("me"), "b", [parts[0], parts[2]])
    with pytest.raises(ProtocolError, match="out of order"):
        feed(LinkState("me"), "b", [parts[1]])
    with pytest.raises(ProtocolError, match="back to back"):
        feed(LinkState("me"), "b", [parts[0], digest("b", ("b", 4))])
    with pytest.raises(ProtocolError, match="a new one began"):
        feed(LinkState("me"), "b", [parts[0], *record("c", 1, set())])
    state = LinkState("me")
    feed(state, "b", [parts[0]])
    feed(state, "c", record("c", 1, {"me"}))  # other links are not held up
    feed(state, "b", parts[1:])
    assert len(state.origins["b"].agents) == 1200 and "c" in state.origins


def test_pulls_are_bounded_per_link_and_move_on_as_records_arrive() -> None:
    state = LinkState("me")
    names = [f"x{i}" for i in range(10)]
    sends = feed(state, "b", [digest("b", *((n, 1) for n in names))])
    first = wants(sends)["b"]
    assert len(first) == mesh_module.MAX_PULLS_PER_LINK
    sends = feed(state, "b", record(first[0], 1, set()))
    assert len(wants(sends)["b"]) == 1  # one slot freed, one more asked
    assert wants(state.link_down("b")) == {}  # nobody else has them
    # What the link owed us is asked of another neighbour that has it, as many at a time.
    asked = wants(feed(state, "c", [digest("c", *((n, 1) for n in names))]))["c"]
    assert len(asked) == mesh_module.MAX_PULLS_PER_LINK and first[0] not in asked


def test_a_gone_answer_moves_the_pull_to_another_neighbour() -> None:
    state = LinkState("me")
    feed(state, "b", [digest("b", ("z", 9))])
    feed(state, "c", [digest("c", ("z", 7))])
    gone = state_frame("b", 0, {"kind": "gone", "origins": ["z"]})
    assert wants(state.receive("b", gone)) == {"c": ["z"]}


def test_pulls_are_asked_again_after_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    state = LinkState("me", clock)
    assert wants(feed(state, "b", [digest("b", ("z", 9))])) == {"b": ["z"]}
    assert state.poll() == []
    clock.now += mesh_module.PULL_TIMEOUT + 1
    assert wants(state.poll()) == {"b": ["z"]}


def test_a_newer_record_of_ourselves_makes_us_renumber_past_it() -> None:
    state = LinkState("me")
    ours = state.seq
    assert feed(state, "b", [digest("b", ("me", ours))]) == []
    (told,) = feed(state, "b", [digest("b", ("me", ours + 50))])  # a clock that went back
    assert state.seq == ours + 51
    assert told.to is None and body(told.data)["have"] == [["me", ours + 51]]


# --- what comes from the network -----------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        {"kind": "delta", "origin": "b", "seq": 2, "ops": [["+a", "acme", "x", "str-cred", 1]]},
        {"kind": "delta", "origin": "b", "seq": 2, "ops": [["+a", "acme", "x", b"c"]]},
        {"kind": "delta", "origin": "b", "seq": 2, "ops": [["+a", "Acme", "x", b"c", 1]]},
        {"kind": "delta", "origin": "b", "seq": 2, "ops": [["+a", "acme", "x", b"c" * 20000, 1]]},
        {"kind": "delta", "origin": "b", "seq": 2, "ops": [["+s", "acme", "app..x"]]},
        {"kind": "delta", "origin": "b", "seq": 2, "ops": [["+s", "acme", "$SYS.refused.>"]]},
        {"kind": "delta", "origin": "b", "seq": 2, "ops": [["boom", "acme"]]},
        {"kind": "delta", "origin": "b", "seq": 2, "ops": [[]]},
        {"kind": "delta", "origin": "b", "seq": 2, "ops": [["peers", "me"]]},
        {"kind": "delta", "origin": "b", "seq": "2", "ops": []},
        {"kind": "delta", "origin": "b", "seq": 2, "ops": [["-a", "acme"]] * 513},
        {"kind": "delta", "origin": "B!", "seq": 2, "ops": []},
        {"kind": "delta", "origin": "b", "seq": 3, "ops": []},  # the header says 2
        {"kind": "snapshot", "origin": "b", "seq": 2, "part": 0, "parts": 0, "peers": []},
        {"kind": "snapshot", "origin": "b", "seq": 2, "part": 1, "parts": 2, "agents": []},
        {
            "kind": "snapshot",
            "origin": "b",
            "seq": 2,
            "part": 0,
            "parts": 1,
            "peers": [],
            "agents": [["acme", "x", b"c", 1]] * 300,
            "subs": [["acme", "a.b"]] * 300,
        },
        {
            "kind": "snapshot",
            "origin": "b",
            "seq": 2,
            "part": 0,
            "parts": 2,
            "peers": [],
            "agents": [],
            "subs": [],
        },
        {
            "kind": "snapshot",
            "origin": "b",
            "seq": 2,
            "part": 0,
            "parts": 1,
            "peers": [],
            "agents": [["acme", "x", b"c"]],
            "subs": [],
        },
        {"kind": "gossip"},
        {"kind": "digest", "have": [["b", 1, 2]]},
        {"kind": "digest", "have": [["b", -1]]},
        {"kind": "digest", "have": [["b", 1]] * 513},
        {"kind": "want", "origins": "b"},
    ],
)
def test_malformed_state_is_refused(content: dict[str, Any]) -> None:
    state = graph("me", {"me": {"b"}, "b": {"me"}})
    with pytest.raises(ProtocolError):
        state.receive("b", state_frame("b", 2, content))


def test_undecodable_or_oversized_state_is_refused() -> None:
    state = LinkState("me")
    f = state_frame("b", 2, {})
    for payload in (b"\xc1", pack([1, 2]), pack({"kind": "digest", "have": [[b"x" * 10, 1]]})):
        with pytest.raises(ProtocolError):
            state.receive("b", Frame(f.type, f.header, payload))
    huge = pack({"kind": "digest", "have": [], "pad": b"x" * (mesh_module.MAX_STATE_PAYLOAD + 1)})
    with pytest.raises(ProtocolError):
        state.receive("b", Frame(f.type, f.header, huge))
    sender = state_frame("c", 0, {"kind": "digest", "have": []})  # speaks for another broker
    with pytest.raises(ProtocolError, match="speaks for its sender"):
        state.receive("b", sender)


def test_what_one_broker_can_make_others_store_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mesh_module, "MAX_AGENTS", 100)
    state = LinkState("me")
    feed(state, "b", record("b", 1, {"me"}, {("acme", f"a{i}"): (b"c", i) for i in range(100)}))
    with pytest.raises(ProtocolError, match="over 100 agents"):
        state.receive("b", delta("b", 2, ["+a", "acme", "one-more", b"c", 1]))
    with pytest.raises(ProtocolError, match="over 100"):
        feed(
            LinkState("me"),
            "b",
            record("b", 1, {"me"}, {("acme", f"a{i}"): (b"c", i) for i in range(101)}),
        )
    # Our own record stays within the bounds peers check: the rest is left out, and counted.
    own = LinkState("me")
    own.local(joins(101))
    own.flush()
    assert len(own.origins["me"].agents) == 100 and own.unadvertised == 1


def test_records_beyond_the_broker_count_are_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mesh_module, "MAX_BROKERS", 3)
    state = LinkState("me")
    for name in ("b", "c", "d"):
        feed(state, name, record(name, 1, set()))
    assert set(state.origins) == {"me", "b", "c"} and state.refused_brokers == 1
    # Nor are offers of brokers without end tracked.
    asked = wants(feed(state, "b", [digest("b", *((f"x{i}", 1) for i in range(100)))]))
    assert len(state._offers) == 3 and len(asked["b"]) == 3


# --- the graph -----------------------------------------------------------------------------------


def test_an_edge_counts_only_when_both_ends_advertise_it() -> None:
    state = graph("a", {"a": {"b", "c"}, "b": {"a"}, "c": set()})
    assert state.next_hops() == {"b": "b"}


def test_next_hops_follow_shortest_paths() -> None:
    # a - b - c - d, and a - e - d: d is two hops away through e, c two through b; ties go to
    # the neighbour whose name sorts first.
    edges = {
        "a": {"b", "e"},
        "b": {"a", "c"},
        "c": {"b", "d"},
        "d": {"c", "e"},
        "e": {"a", "d"},
    }
    state = graph("a", edges)
    assert state.next_hops() == {"b": "b", "e": "e", "c": "b", "d": "e"}


def test_the_hop_limit_follows_the_diameter_of_the_mesh() -> None:
    names = [f"n{i:02}" for i in range(25)]
    line = {n: {names[j] for j in (i - 1, i + 1) if 0 <= j < 25} for i, n in enumerate(names)}
    end, middle = graph("n00", line), graph("n12", line)
    assert end.hop_limit() == 2 * 24 + 2  # far beyond the fixed 16 of old
    assert 24 <= middle.hop_limit() == 2 * 12 + 2  # still reaches both ends, and back
    assert graph("solo", {"solo": set()}).hop_limit() == 2
    long = [f"m{i:03}" for i in range(200)]
    chain = {n: {long[j] for j in (i - 1, i + 1) if 0 <= j < 200} for i, n in enumerate(long)}
    assert graph("m000", chain).hop_limit() == MAX_HOPS


def test_locate_prefers_the_newest_connection_and_ignores_unreachable_brokers() -> None:
    cred_old, cred_new = b"old-credential", b"new-credential"
    records = {
        "b": record("b", 1, {"a"}, {("acme", "x"): (cred_old, 100)}),
        "c": record("c", 1, {"a"}, {("acme", "x"): (cred_new, 200)}),
        "z": record("z", 1, set(), {("acme", "x"): (b"newest-but-cut-off", 300)}),
    }
    state = graph("a", {"a": {"b", "c"}, "b": {"a"}, "c": {"a"}, "z": set()}, **records)
    assert state.locate("acme", "x") == "c"
    assert state.credential("acme", "x") == cred_new
    assert state.locate("globex", "x") is None and state.credential("globex", "x") is None
    feed(state, "c", [delta("c", 2, ["-a", "acme", "x"])])
    assert state.credential("acme", "x") == cred_old


def test_interest_is_per_tenant_reachable_and_not_our_own() -> None:
    records = {
        "b": record("b", 1, {"a"}, subs={("acme", "app.news.*")}),
        "c": record("c", 1, {"a"}, subs={("acme", "app.>"), ("globex", "app.news.x")}),
        "z": record("z", 1, set(), subs={("acme", "app.>")}),
    }
    state = graph("a", {"a": {"b", "c"}, "b": {"a"}, "c": {"a"}, "z": set()}, **records)
    state.local([LocalChange("+interest", "acme", "app.>")])
    state.flush()
    assert state.interested("acme", "app.news.x") == {"b", "c"}
    assert state.interested("acme", "app.other") == {"c"}
    assert state.interested("globex", "app.news.x") == {"c"}
    assert state.interested("initech", "app.news.x") == set()

    feed(state, "b", record("b", 2, {"a"}))  # b's subscriber left
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
    clock = Clock()
    state = LinkState("a", clock)
    state.set_peers({"b"})
    state.flush()
    feed(state, "b", record("b", 1, {"a"}, {("acme", "x"): (b"c", 1)}))
    feed(state, "b", record("z", 1, set(), {("acme", "y"): (b"c", 1)}, {("acme", "app.>")}))
    assert state.expire(30) == []  # z just became unreachable: counted from now
    clock.now += 31
    assert state.expire(30) == ["z"]  # b is reachable: its record stands
    assert set(state.origins) == {"a", "b"}
    assert state.locate("acme", "y") is None and state.interested("acme", "app.x") == set()


def test_seen_ids_drop_second_copies_within_a_bounded_memory() -> None:
    seen = SeenIds(size=2)
    assert seen.add(1) and not seen.add(1)
    assert seen.add(2) and seen.add(3)  # 1 falls out of memory
    assert seen.add(1) and not seen.add(3)


@pytest.mark.parametrize("size", [1, 3, 8, 100])
def test_seen_ids_answer_as_a_set_of_the_last_ids_would(size: int) -> None:
    """Against a plain model (a set and a deque): keys crowding few home slots (multiples of
    the table's size collide; small ints hash to themselves), so runs wrap around the table
    and deletions shift them back, and a key of hash 0 or -1."""
    rng = random.Random(size)
    seen, model, order = SeenIds(size), set[int](), deque[int]()
    pool = [k * 256 for k in range(3 * size)] + list(range(3 * size)) + [0, -1, -2]
    for _ in range(20_000):
        key = rng.choice(pool)
        fresh = hash(key) not in model
        assert seen.add(key) == fresh, (key, len(seen))
        if fresh:
            model.add(hash(key))
            order.append(hash(key))
            if len(order) > size:
                model.discard(order.popleft())
        assert len(seen) == len(model)


def test_seen_ids_take_their_memory_once() -> None:
    seen = SeenIds(size=4096)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(40_000):
            seen.add(("origin", "acme", 1, "agent", i))
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 4096  # a few transient objects, nothing kept per id


# --- the router's side: what it tells the mesh ---------------------------------------------------


def test_the_router_notes_joins_with_credentials_and_patterns_first_and_last(
    operator: OperatorStore,
) -> None:
    router = Router(BrokerState(None, operator.operator_pub))
    mesh = SimpleNamespace(changed=lambda: None, flood_sync=lambda body: None)
    router.mesh = mesh
    alpha, beta = (FakeSession(identity(operator, n)) for n in ("alpha", "beta"))
    router.attach(alpha)
    router.attach(beta)
    for s in (alpha, beta):
        router.handle(s, frame(FrameType.SUB, {"sid": 1, "subj": "app.>"}))
    router.handle(alpha, frame(FrameType.SUB, {"sid": 2, "subj": "$SYS.refused.>"}))
    got = router.local_changes()
    assert [(c.kind, c.name) for c in got] == [
        ("+agent", "alpha"),
        ("+agent", "beta"),
        ("+interest", "app.>"),  # once, though two subscribe; "$" subjects stay local
    ]
    assert got[0].credential == alpha.ident.credential and got[0].since > 0
    router.handle(alpha, frame(FrameType.SUB, {"sid": 1, "subj": "app.news.>"}))  # sid moved
    router.detach(beta)
    assert [(c.kind, c.name) for c in router.local_changes()] == [
        ("+interest", "app.news.>"),
        ("-interest", "app.>"),
        ("-agent", "beta"),
    ]
    router.detach(beta)  # twice: nothing more
    router.handle(alpha, frame(FrameType.UNSUB, {"sid": 1}))
    assert [(c.kind, c.name) for c in router.local_changes()] == [("-interest", "app.news.>")]


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
        return identity(self.op, name, roles)

    def local(self, name: str, *patterns: str, roles: tuple[str, ...] = ("agent",)) -> FakeSession:
        s = FakeSession(self.ident(name, roles))
        self.router.attach(s)
        for sid, pattern in enumerate(patterns):
            self.router.handle(s, frame(FrameType.SUB, {"sid": sid, "subj": pattern}))
        return s

    def peer_advert(self, name: str, seq: int, **kw: Any) -> None:
        """The neighbour ``name`` sends its whole record (as when we pulled it)."""
        for f in record(name, seq, {"me"}, **kw):
            self.links[name].on_message(f.raw)

    def quiet(self) -> None:
        for ws in self.links.values():
            ws.sent.clear()


def relays(ws: FakeWS) -> list[Frame]:
    """The relayed frames a link got (deltas of ours may go first: they carry credentials)."""
    return [f for f in ws.frames() if f.type is FrameType.RELAY]


def inner_pub(subject: str, src: str, payload: bytes = b"sealed", id: int = 1) -> bytes:
    return encode_frame(FrameType.PUB, {"id": id, "subj": subject, "kid": 1, "src": src}, payload)


@pytest.fixture
async def broker(operator: OperatorStore) -> Broker:
    return Broker(operator)


async def test_a_new_link_hears_our_digest_and_every_revocation_we_hold(
    broker: Broker, operator: OperatorStore
) -> None:
    blob = operator.revoke("acme", name="gone")
    broker.router.apply_revocation(blob)
    p1 = broker.link("p1")
    broker.peer_advert("p1", 1)

    p2 = broker.link("p2")
    got = p2.frames()
    states = [body(f) for f in got if f.type is FrameType.PEER_STATE]
    (ours,) = [b for b in states if b["kind"] == "delta"]  # our new link, numbered
    assert ours["ops"] == [["peers", ["p1", "p2"]]]
    (have,) = [b["have"] for b in states if b["kind"] == "digest"]  # it pulls what it lacks
    assert dict(map(tuple, have)) == {"me": broker.mesh.state.seq, "p1": 1}
    syncs = [unpack_map(f.payload, "sync") for f in got if f.type is FrameType.SYNC]
    assert {"kind": "revoke", "blob": blob} in syncs
    assert p2.ping_interval == 2.0  # a frozen peer is dropped quickly
    assert p1.open

    want = pack({"kind": "want", "origins": ["p1", "me"]})
    broker.receive("p2", FrameType.PEER_STATE, {"origin": "p2", "seq": 0}, want)
    answers = [body(f) for f in p2.frames()]
    assert [(b["kind"], b["origin"]) for b in answers] == [("snapshot", "p1"), ("snapshot", "me")]


async def test_local_agents_travel_as_deltas_of_their_own(broker: Broker) -> None:
    p1 = broker.link("p1")
    broker.quiet()
    for i in range(50):
        broker.local(f"a{i}", "app.>")
    broker.mesh._advertise()
    before = [f for f in p1.frames() if f.type is FrameType.PEER_STATE]
    assert sum(len(body(f)["ops"]) for f in before) == 51  # 50 joins, "app.>" once
    newcomer = broker.local("newcomer", "app.>")
    broker.mesh._advertise()
    (d,) = [f for f in p1.frames() if f.type is FrameType.PEER_STATE]
    assert body(d)["ops"] == [["+a", "acme", "newcomer", newcomer.ident.credential, ANY_INT]]
    assert len(d.raw) < 2 * len(newcomer.ident.credential)


async def test_deltas_flood_on_once_and_a_lying_header_cuts_the_link(broker: Broker) -> None:
    p1, p2 = broker.link("p1"), broker.link("p2")
    broker.peer_advert("p1", 5)
    broker.quiet()
    d = delta("p1", 6, ["+s", "acme", "app.>"])
    broker.links["p1"].on_message(d.raw)
    assert [f.raw for f in p2.frames()] == [d.raw]
    assert p1.frames() == []  # never back where it came from
    broker.links["p1"].on_message(d.raw)  # the same delta again: not news
    assert p2.frames() == []

    lying = pack({"kind": "delta", "origin": "p1", "seq": 9, "ops": []})
    broker.receive("p1", FrameType.PEER_STATE, {"origin": "p1", "seq": 8}, lying)
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
    bind: dict[str, object] = {
        "kind": "bind",
        "tenant": "acme",
        "name": "alpha",
        "pub": other,
        "jti": "",
    }
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
    broker.router.handle(admin, frame(FrameType.REVOKE, {}, blob))
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
