"""The broker mesh's routing state (sans-I/O): a link-state database kept by deltas.

Every broker holds a record of every broker of the mesh: its peer links, its agents (with their
credentials, so any broker can answer a key request and check a relayed publication) and its
interest (the subscription patterns its agents hold). From those records, all brokers share one
view of the graph:

* a direct message goes hop by hop along the shortest path to the broker holding the agent;
* a publication goes down the shortest-path tree rooted at the broker it entered the mesh on,
  only into branches holding an interested broker. All brokers compute the same tree, so each
  interested broker gets one copy, cycles or not; a (origin, id) memory and a hop limit guard
  against the moments when views differ.

Edges count only when both ends advertise them, so a dead broker drops out as soon as one of its
neighbours notices.

Over 400 lines on purpose: it is one database (records, their wire forms and bounds, the pulls in
flight, the graph) whose parts all read and write the same records; split, each part would reach
into the others' state.

How records travel (each a PEER_STATE frame; header ``origin`` and ``seq``, a msgpack map body
with ``kind``), as link-state protocols (OSPF's database exchange) and gossip (push a digest,
pull the data) do it:

* ``delta`` — a broker's own changes, numbered: delta ``seq`` applies only on top of ``seq - 1``.
  Its ``ops``: ``["+a", tenant, agent, credential, since]`` (an agent joined, with the
  credential of that agent only), ``["-a", tenant, agent]``, ``["+s", tenant, pattern]`` and
  ``["-s", tenant, pattern]`` (a pattern first/last held on that broker, however many
  subscriptions share it), ``["peers", [names]]``. A burst of changes (coalesced by the I/O
  shell) is cut into deltas of at most ``CHUNK_ENTRIES`` ops and about ``CHUNK_BYTES``. A
  delta that is news is flooded on. One ahead of what we hold is held (``MAX_EARLY``, a
  second at most: on a mesh with cycles a later delta may overtake an earlier one on a shorter
  path) and applied in order once the hole fills; a hole that stays, or a delta of a broker we
  do not know, has the record pulled whole.
* ``digest`` — ``have: [[origin, seq], ...]``: what a broker holds of every broker it reaches.
  Neighbours send it on a new link and periodically; a broker that finds a neighbour ahead
  asks it (``want: [origins]``) for those records. Links are ordered, so a neighbour's digest
  comes after every delta it forwarded: a digest ahead of us is a real gap, never a race.
  After taking a record whole, a broker tells its other neighbours with a one-entry digest.
* ``snapshot`` — the answer to ``want``: one record at its ``seq`` in ``parts`` chunks of at
  most ``CHUNK_ENTRIES`` agents and patterns and about ``CHUNK_BYTES`` (peers in part 0),
  sent back to back on one link and applied once complete; ``gone`` when we lack it. Each
  link pulls at most ``MAX_PULLS_PER_LINK`` records at a time, so a new link to a big mesh
  is brought up to date without one huge burst; one record at one seq goes to one link at most
  once per ``WANT_COOLDOWN``, so a peer asking in a loop cannot make us stream every record.

No frame grows with the number of agents: a join costs one ``+a`` op (a credential, ~0.4 KB) on
each link, whatever the broker already holds. Credentials travel in the join op rather than
being fetched on demand or by hash: that is O(1) per join already, key requests and the
re-check of relayed publications are answered at once from the record (no round trip, no
asynchronous path, no "credential not here yet" state in the relay), and a cache by hash would
save bytes only when an agent reconnects with the same credential.

Everything received is validated (names, patterns, sizes, sequence numbers) and bounded: what
one broker can make others store is capped (``MAX_AGENTS``, ``MAX_INTEREST``, ``MAX_PEERS``,
``MAX_ORIGIN_BYTES``), and so is the number of brokers kept (``MAX_BROKERS``). A frame that
breaks a rule raises ``ProtocolError`` (the shell cuts that link): honest brokers check the same
rules before flooding, so such a frame comes from a broken or hostile peer. The decoder's array
limit (1024) stays above a chunk's entries (512). Records are not signed by their broker, as in
the advert scheme before: a peer broker is authenticated, and relayed publications are checked
again against the publisher's credential.

The hop limit of a relayed frame comes from the graph, not a constant: twice our eccentricity
(the longest shortest path from us) bounds the mesh's diameter, and two more hops cover a view
that is a little out of date; ``MAX_HOPS`` caps it for validation.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from atoll.protocol.errors import ProtocolError
from atoll.protocol.frames import Frame, FrameType, encode_frame, pack, unpack_map
from atoll.protocol.subjects import SubjectIndex, check_name, check_subject

MAX_HOPS = 255  # the most a relay's ttl may say (validation bound, not the limit in use)
CHUNK_ENTRIES = 512  # agents + patterns in one snapshot chunk, ops in one delta
CHUNK_BYTES = 256 * 1024  # ... and about this many bytes of them
MAX_STATE_PAYLOAD = 1024 * 1024  # one PEER_STATE body, decoded
MAX_BROKERS = 4096  # brokers' records kept
MAX_PEERS = 1024  # peer links one broker may advertise
MAX_AGENTS = 100_000  # agents one broker may advertise
MAX_INTEREST = 100_000  # distinct patterns one broker may advertise
MAX_ORIGIN_BYTES = 64 * 1024 * 1024  # what one broker's record may take in memory
MAX_CREDENTIAL = 16 * 1024
MAX_SEQ = 2**62  # sequence numbers received (ours may then still count up inside the header)
MAX_PULLS_PER_LINK = 4  # records asked of one neighbour at a time
PULL_TIMEOUT = 30.0  # seconds before a record asked for is asked again (of anyone)
# Seconds before one record at one seq is sent to one neighbour again: an honest one asks again
# only after PULL_TIMEOUT (or over a new link), while one asking in a loop would have us send
# every record we hold, megabytes each, as fast as it can ask.
WANT_COOLDOWN = 10.0
MAX_EARLY = 32  # deltas of one broker held while an earlier one comes the long way round
EARLY_BYTES = 16 * 1024 * 1024  # ... and of all brokers together
GAP_GRACE = 1.0  # seconds a hole before held deltas may last before the record is pulled
_ENTRY = 16  # bytes counted per stored entry on top of its strings

AgentKey = tuple[str, str]  # (tenant, agent)
Op = tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class LocalChange:
    """One change of what this broker holds, as the router notes it."""

    kind: str  # "+agent", "-agent", "+interest", "-interest"
    tenant: str
    name: str  # the agent, or the pattern
    credential: bytes = b""
    since: int = 0  # ms: when the agent connected (the most recent connection wins)


@dataclass(eq=False)
class Origin:
    """What one broker (``name``) holds, as of its sequence number ``seq``."""

    name: str
    seq: int
    peers: frozenset[str] = frozenset()
    agents: dict[AgentKey, tuple[bytes, int]] = field(default_factory=dict)
    subs: set[tuple[str, str]] = field(default_factory=set)
    size: int = 0  # bytes counted against MAX_ORIGIN_BYTES
    received: float = 0.0  # monotonic time of the last change taken


class Send(NamedTuple):
    """A frame for the shell to send: to one link, or (``to`` None) to every link but
    ``exclude``."""

    to: str | None
    data: bytes
    exclude: str | None = None


def _agent_size(key: AgentKey, cred: bytes) -> int:
    return len(key[0]) + len(key[1]) + len(cred) + _ENTRY


def _sub_size(entry: tuple[str, str]) -> int:
    return len(entry[0]) + len(entry[1]) + _ENTRY


def _op_size(op: Op) -> int:
    if op[0] == "+a":
        return _agent_size((op[1], op[2]), op[3])
    if op[0] == "peers":
        return sum(len(p) + 2 for p in op[1]) + _ENTRY
    return len(op[1]) + len(op[2]) + _ENTRY


def _op_wire(op: Op) -> list[Any]:
    return [op[0], sorted(op[1])] if op[0] == "peers" else list(op)


class _Overflow(ProtocolError):
    """A broker's record would break a bound."""


# --- decoding (everything here comes from the network) -------------------------------------------


def _int(value: Any, lo: int, hi: int, what: str) -> int:
    if type(value) is not int or not lo <= value < hi:
        raise ProtocolError(f"mesh state: {what} must be an int in [{lo}, {hi})")
    return value


def _list(value: Any, limit: int, what: str) -> list[Any]:
    if type(value) is not list or len(value) > limit:
        raise ProtocolError(f"mesh state: {what} must be a list of at most {limit}")
    return value


def _peers(value: Any) -> frozenset[str]:
    return frozenset(check_name(p, "broker name") for p in _list(value, MAX_PEERS, "peers"))


def _agent(tenant: Any, agent: Any, cred: Any, since: Any) -> tuple[AgentKey, bytes, int]:
    check_name(tenant, "tenant name")
    check_name(agent, "agent name")
    if type(cred) is not bytes or not 0 < len(cred) <= MAX_CREDENTIAL:
        raise ProtocolError(f"mesh state: a credential must be 1-{MAX_CREDENTIAL} bytes")
    return (tenant, agent), cred, _int(since, 0, 2**63, "since")


def _interest(tenant: Any, pattern: Any) -> tuple[str, str]:
    check_name(tenant, "tenant name")
    check_subject(pattern, pattern=True)  # "$" subjects are each broker's own: never advertised
    return tenant, pattern


def _op(raw: Any) -> Op:
    if type(raw) is not list or not raw:
        raise ProtocolError("mesh state: an op is a non-empty list")
    kind, args = raw[0], raw[1:]
    try:
        if kind == "+a":
            key, cred, since = _agent(*args)
            return ("+a", key[0], key[1], cred, since)
        if kind == "-a":
            tenant, agent = args
            return ("-a", check_name(tenant, "tenant name"), check_name(agent, "agent name"))
        if kind in ("+s", "-s"):
            return (kind, *_interest(*args))
        if kind == "peers":
            (peers,) = args
            return ("peers", _peers(peers))
    except (TypeError, ValueError):  # the wrong number of fields
        raise ProtocolError(f"mesh state: malformed {kind!r} op") from None
    raise ProtocolError(f"mesh state: unknown op {kind!r}")


@dataclass
class _Chunk:
    origin: str
    seq: int
    part: int
    parts: int
    peers: frozenset[str] | None
    agents: list[tuple[AgentKey, bytes, int]]
    subs: list[tuple[str, str]]


@dataclass
class _Assembly:
    """A snapshot arriving in parts on one link."""

    origin: str
    seq: int
    parts: int
    peers: frozenset[str]
    agents: dict[AgentKey, tuple[bytes, int]] = field(default_factory=dict)
    subs: set[tuple[str, str]] = field(default_factory=set)
    size: int = 0
    entries: int = 0
    next: int = 0

    def add(self, c: _Chunk) -> None:
        self.entries += len(c.agents) + len(c.subs)
        if self.entries > MAX_AGENTS + MAX_INTEREST:
            raise _Overflow(f"snapshot of {self.origin} holds too many entries")
        for key, cred, since in c.agents:
            self.agents[key] = (cred, since)
            self.size += _agent_size(key, cred)
        for entry in c.subs:
            self.subs.add(entry)
            self.size += _sub_size(entry)
        if len(self.agents) > MAX_AGENTS or len(self.subs) > MAX_INTEREST:
            raise _Overflow(f"broker {self.origin} would hold over {MAX_AGENTS} agents/patterns")
        if self.size > MAX_ORIGIN_BYTES:
            raise _Overflow(f"broker {self.origin} would hold over {MAX_ORIGIN_BYTES} bytes")
        self.next += 1


def _state_frame(origin: str, seq: int, body: dict[str, Any]) -> bytes:
    return encode_frame(FrameType.PEER_STATE, {"origin": origin, "seq": seq}, pack(body))


# --- the database ------------------------------------------------------------------------------


class LinkState:
    def __init__(self, me: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.me = me
        self._clock = clock
        # Start from the clock so a restarted broker's record supersedes what others kept of it.
        own = Origin(me, time.time_ns() // 1000, received=clock())
        self.origins: dict[str, Origin] = {me: own}
        self._pending: list[Op] = []  # own changes not yet numbered
        self.unadvertised = 0  # own agents/patterns left out: beyond the bounds
        self.refused_brokers = 0  # records not kept: MAX_BROKERS reached
        # Derived, for routing.
        self._hops: dict[str, str] | None = None
        self._limit = 2
        self._trees: dict[str, dict[str, str | None]] = {}
        self._interest: dict[str, SubjectIndex[tuple[str, str], str]] = {}  # others' patterns
        self._where: dict[AgentKey, dict[str, int]] = {}  # agent -> broker -> since
        self._lost: dict[str, float] = {}  # unreachable broker -> since when
        # Repair: who told us of newer records, what we asked for, snapshots arriving.
        self._offers: dict[str, dict[str, int]] = {}  # origin -> link -> seq it has
        self._pulls: dict[str, tuple[str, float]] = {}  # origin -> (link asked, when)
        self._assembly: dict[str, _Assembly] = {}  # link -> snapshot in parts
        self._served: dict[tuple[str, str], tuple[int, float]] = {}  # (link, origin) -> seq, when
        self.wants_ignored = 0  # asked again for what we had just sent that link
        # Deltas that came before the one they follow (paths of different lengths): origin ->
        # seq -> (link, frame, ops), since when, and their bytes.
        self._early: dict[str, dict[int, tuple[str, bytes, list[Op]]]] = {}
        self._early_since: dict[str, float] = {}
        self._early_bytes = 0

    @property
    def seq(self) -> int:
        """Our own record's sequence number."""
        return self.origins[self.me].seq

    # --- our own record --------------------------------------------------------------------------

    def local(self, changes: Iterable[LocalChange]) -> None:
        """Note changes of what we hold; ``flush`` numbers them."""
        for c in changes:
            if c.kind == "+agent":
                self._pending.append(("+a", c.tenant, c.name, c.credential, c.since))
            elif c.kind == "-agent":
                self._pending.append(("-a", c.tenant, c.name))
            elif c.kind == "+interest":
                self._pending.append(("+s", c.tenant, c.name))
            elif c.kind == "-interest":
                self._pending.append(("-s", c.tenant, c.name))
            else:
                raise ValueError(f"unknown local change {c.kind!r}")

    def set_peers(self, peers: Iterable[str]) -> None:
        self._pending.append(("peers", frozenset(peers)))

    def flush(self) -> list[bytes]:
        """Apply our noted changes to our record and return them as numbered deltas (frames to
        flood on every link), each within ``CHUNK_ENTRIES`` ops and about ``CHUNK_BYTES``."""
        if not self._pending:
            return []
        own = self.origins[self.me]
        out: list[bytes] = []
        batch: list[list[Any]] = []
        size = 0

        def emit() -> None:
            own.seq += 1
            body = {"kind": "delta", "origin": self.me, "seq": own.seq, "ops": batch}
            out.append(_state_frame(self.me, own.seq, body))

        pending, self._pending = self._pending, []
        for op in pending:
            try:
                if not self._apply(own, op):
                    continue  # no change (a pattern re-added, an agent never advertised)
            except _Overflow:
                self.unadvertised += 1
                continue
            n = _op_size(op)
            if batch and (len(batch) >= CHUNK_ENTRIES or size + n > CHUNK_BYTES):
                emit()
                batch, size = [], 0
            batch.append(_op_wire(op))
            size += n
        if batch:
            emit()
        own.received = self._clock()
        return out

    def _seen_self(self, seq: int) -> list[Send]:
        """Someone holds a record of ours numbered ``seq``: ours must be newer (a restart with
        a clock that went back, or a forgery); renumber past it and have it pulled again."""
        if seq <= self.seq:
            return []
        out = [Send(None, d) for d in self.flush()]
        self.origins[self.me].seq = seq + 1
        out.append(Send(None, self._have([(self.me, seq + 1)])[0]))
        return out

    # --- applying changes ------------------------------------------------------------------------

    def _apply(self, rec: Origin, op: Op) -> bool:
        """One op on a record, indexes kept; False when it changed nothing."""
        kind = op[0]
        if kind == "+a":
            key, cred, since = (op[1], op[2]), op[3], op[4]
            old = rec.agents.get(key)
            grow = _agent_size(key, cred) - (_agent_size(key, old[0]) if old else 0)
            if (old is None and len(rec.agents) >= MAX_AGENTS) or len(cred) > MAX_CREDENTIAL:
                raise _Overflow(f"broker {rec.name} would hold over {MAX_AGENTS} agents")
            if rec.size + grow > MAX_ORIGIN_BYTES:
                raise _Overflow(f"broker {rec.name} would hold over {MAX_ORIGIN_BYTES} bytes")
            rec.agents[key] = (cred, since)
            rec.size += grow
            self._where.setdefault(key, {})[rec.name] = since
            return True
        if kind == "-a":
            key = (op[1], op[2])
            gone = rec.agents.pop(key, None)
            if gone is None:
                return False
            rec.size -= _agent_size(key, gone[0])
            where = self._where.get(key)
            if where is not None:
                where.pop(rec.name, None)
                if not where:
                    del self._where[key]
            return True
        if kind == "+s":
            entry = (op[1], op[2])
            if entry in rec.subs:
                return False
            if len(rec.subs) >= MAX_INTEREST or rec.size + _sub_size(entry) > MAX_ORIGIN_BYTES:
                raise _Overflow(f"broker {rec.name} would hold over {MAX_INTEREST} patterns")
            rec.subs.add(entry)
            rec.size += _sub_size(entry)
            if rec.name != self.me:
                index = self._interest.setdefault(entry[0], SubjectIndex())
                index.add((rec.name, entry[1]), entry[1], rec.name)
            return True
        if kind == "-s":
            entry = (op[1], op[2])
            if entry not in rec.subs:
                return False
            rec.subs.discard(entry)
            rec.size -= _sub_size(entry)
            held = self._interest.get(entry[0])
            if held is not None:
                held.remove((rec.name, entry[1]))
                if not len(held):
                    del self._interest[entry[0]]
            return True
        if kind == "peers":
            if op[1] == rec.peers:
                return False
            if len(op[1]) > MAX_PEERS:
                raise _Overflow(f"broker {rec.name} would advertise over {MAX_PEERS} peers")
            rec.peers = op[1]
            self._graph_changed()
            return True
        raise ValueError(f"unknown op {kind!r}")

    def _drop(self, name: str) -> None:
        """Forget a broker's record and what the indexes hold of it."""
        self._forget_early(name)
        rec = self.origins.pop(name)
        for key in [k for k in self._served if k[1] == name]:
            del self._served[key]
        for key in rec.agents:
            where = self._where.get(key)
            if where is not None:
                where.pop(name, None)
                if not where:
                    del self._where[key]
        for tenant, pattern in rec.subs:
            index = self._interest.get(tenant)
            if index is not None:
                index.remove((name, pattern))
                if not len(index):
                    del self._interest[tenant]
        self._graph_changed()

    def _install(self, asm: _Assembly) -> None:
        if asm.origin in self.origins:
            self._drop(asm.origin)
        rec = self.origins[asm.origin] = Origin(asm.origin, asm.seq, received=self._clock())
        for (tenant, agent), (cred, since) in asm.agents.items():
            self._apply(rec, ("+a", tenant, agent, cred, since))
        for tenant, pattern in asm.subs:
            self._apply(rec, ("+s", tenant, pattern))
        self._apply(rec, ("peers", asm.peers))
        self._graph_changed()

    def _graph_changed(self) -> None:
        self._hops = None
        self._trees.clear()

    # --- frames from a neighbour -----------------------------------------------------------------

    def receive(self, link: str, f: Frame) -> list[Send]:
        """A PEER_STATE frame from neighbour ``link``: what to send in answer (raises
        ProtocolError on anything off: the shell cuts that link)."""
        body = unpack_map(f.payload, "mesh state", MAX_STATE_PAYLOAD)
        kind = body.get("kind")
        if link in self._assembly and kind != "snapshot":
            raise ProtocolError("mesh state: a snapshot's parts come back to back")
        if kind in ("delta", "snapshot"):
            origin = check_name(body.get("origin", ""), "broker name")
            seq = _int(body.get("seq"), 1, MAX_SEQ, "seq")
            if f.header["origin"] != origin or f.header["seq"] != seq:
                raise ProtocolError("mesh state header and body disagree")
            if kind == "delta":
                ops = [_op(raw) for raw in _list(body.get("ops"), CHUNK_ENTRIES, "ops")]
                return self._on_delta(link, f.raw or f.encode(), origin, seq, ops)
            return self._on_chunk(link, self._chunk(origin, seq, body))
        if f.header["origin"] != link:
            raise ProtocolError("mesh state: a digest or request speaks for its sender")
        if kind == "digest":
            have = []
            for entry in _list(body.get("have"), CHUNK_ENTRIES, "have"):
                if type(entry) is not list or len(entry) != 2:
                    raise ProtocolError("mesh state: a digest entry is [origin, seq]")
                have.append(
                    (check_name(entry[0], "broker name"), _int(entry[1], 1, MAX_SEQ, "seq"))
                )
            return self._on_digest(link, have)
        if kind in ("want", "gone"):
            names = [
                check_name(n, "broker name")
                for n in _list(body.get("origins"), CHUNK_ENTRIES, "origins")
            ]
            return self._on_want(link, names) if kind == "want" else self._on_gone(link, names)
        raise ProtocolError(f"mesh state: unknown kind {kind!r}")

    def _chunk(self, origin: str, seq: int, body: dict[str, Any]) -> _Chunk:
        parts = _int(body.get("parts"), 1, 2**20, "parts")
        part = _int(body.get("part"), 0, parts, "part")
        peers = _peers(body.get("peers")) if part == 0 else None
        if part != 0 and "peers" in body:
            raise ProtocolError("mesh state: peers come in a snapshot's first part")
        agents = []
        for entry in _list(body.get("agents"), CHUNK_ENTRIES, "agents"):
            if type(entry) is not list or len(entry) != 4:
                raise ProtocolError("mesh state: an agent entry is [tenant, agent, cred, since]")
            agents.append(_agent(*entry))
        subs = []
        for entry in _list(body.get("subs"), CHUNK_ENTRIES, "subs"):
            if type(entry) is not list or len(entry) != 2:
                raise ProtocolError("mesh state: an interest entry is [tenant, pattern]")
            subs.append(_interest(*entry))
        if len(agents) + len(subs) > CHUNK_ENTRIES:
            raise ProtocolError(f"mesh state: a chunk holds at most {CHUNK_ENTRIES} entries")
        if parts > 1 and not (agents or subs):
            raise ProtocolError("mesh state: an empty part of a snapshot in several")
        return _Chunk(origin, seq, part, parts, peers, agents, subs)

    def _on_delta(self, link: str, raw: bytes, origin: str, seq: int, ops: list[Op]) -> list[Send]:
        if origin == self.me:
            return self._seen_self(seq)
        rec = self.origins.get(origin)
        if rec is not None and seq <= rec.seq:
            return []  # old news (it reached us another way first)
        if rec is None:  # a broker we do not know yet: its whole record from whoever sent this
            self._offer(origin, link, seq)
            return self._pull([origin])
        if rec.seq != seq - 1:
            # Ahead of what we hold: the one before may be on its way along a longer path.
            # Held a while (``poll`` pulls the record whole if the hole stays).
            early = self._early.setdefault(origin, {})
            self._offer(origin, link, seq)
            if seq in early:
                return []
            if len(early) >= MAX_EARLY or self._early_bytes + len(raw) > EARLY_BYTES:
                self._forget_early(origin)
                return self._pull([origin])
            early[seq] = (link, raw, ops)
            self._early_bytes += len(raw)
            self._early_since.setdefault(origin, self._clock())
            return []
        self._extend(rec, ops)
        rec.seq = seq
        out = [Send(None, raw, exclude=link)]
        out += self._catch_up(rec)
        self._settled(origin)
        return out

    def _extend(self, rec: Origin, ops: list[Op]) -> None:
        adds = sum(1 for op in ops if op[0] == "+a")
        grow = sum(_op_size(op) for op in ops if op[0] in ("+a", "+s"))
        if len(rec.agents) + adds > MAX_AGENTS or rec.size + grow > MAX_ORIGIN_BYTES:
            raise _Overflow(f"broker {rec.name} would hold over {MAX_AGENTS} agents or too much")
        for op in ops:
            self._apply(rec, op)
        rec.received = self._clock()

    def _catch_up(self, rec: Origin) -> list[Send]:
        """Apply the held deltas that now follow on, in order (each flooded on as it is)."""
        early = self._early.get(rec.name)
        if not early:
            return []
        out = []
        while (held := early.pop(rec.seq + 1, None)) is not None:
            link, raw, ops = held
            self._early_bytes -= len(raw)
            self._extend(rec, ops)
            rec.seq += 1
            out.append(Send(None, raw, exclude=link))
        for seq in [s for s in early if s <= rec.seq]:
            self._early_bytes -= len(early.pop(seq)[1])
        if early:
            self._early_since[rec.name] = self._clock()  # progress: the next hole gets its time
        else:
            self._forget_early(rec.name)
        return out

    def _forget_early(self, origin: str) -> None:
        for _, raw, _ in self._early.pop(origin, {}).values():
            self._early_bytes -= len(raw)
        self._early_since.pop(origin, None)

    def _on_chunk(self, link: str, c: _Chunk) -> list[Send]:
        asm = self._assembly.get(link)
        if c.part == 0:
            if asm is not None:
                raise ProtocolError("mesh state: snapshot part out of order (a new one began)")
            assert c.peers is not None
            asm = self._assembly[link] = _Assembly(c.origin, c.seq, c.parts, c.peers)
        elif asm is None or (asm.origin, asm.seq, asm.parts, asm.next) != (
            c.origin,
            c.seq,
            c.parts,
            c.part,
        ):
            raise ProtocolError("mesh state: snapshot part out of order")
        asm.add(c)
        if asm.next < asm.parts:
            return []
        del self._assembly[link]
        return self._on_snapshot(link, asm)

    def _on_snapshot(self, link: str, asm: _Assembly) -> list[Send]:
        origin = asm.origin
        pull = self._pulls.get(origin)
        if pull is not None and pull[0] == link:
            del self._pulls[origin]
        if origin == self.me:
            return self._seen_self(asm.seq)
        out: list[Send] = []
        rec = self.origins.get(origin)
        if rec is None and len(self.origins) >= MAX_BROKERS:
            self.refused_brokers += 1
            self._offers.pop(origin, None)
        elif rec is None or asm.seq > rec.seq:
            self._install(asm)
            # Our other neighbours may lack it too: tell them, they pull if so.
            out.append(Send(None, self._have([(origin, asm.seq)])[0], exclude=link))
            out += self._catch_up(self.origins[origin])
            # What others offered is on its way as deltas behind this snapshot (the sender
            # floods all it gets): pulling again now would fetch the record twice. A hole that
            # stays is found again (held deltas, digests).
            self._offers.pop(origin, None)
        return out + self._pull(list(self._offers))

    def _on_digest(self, link: str, have: list[tuple[str, int]]) -> list[Send]:
        out: list[Send] = []
        behind = []
        for origin, seq in have:
            if origin == self.me:
                out += self._seen_self(seq)
                continue
            rec = self.origins.get(origin)
            if rec is None or seq > rec.seq:
                self._offer(origin, link, seq)
                behind.append(origin)
        return out + self._pull(behind)

    def _on_want(self, link: str, names: list[str]) -> list[Send]:
        out: list[Send] = []
        if self.me in names:  # our record with every change so far numbered
            out += [Send(None, d) for d in self.flush()]
        missing = []
        now = self._clock()
        for name in dict.fromkeys(names):
            rec = self.origins.get(name)
            if rec is None:
                missing.append(name)
                continue
            served = self._served.get((link, name))
            if served is not None and served[0] == rec.seq and now - served[1] < WANT_COOLDOWN:
                self.wants_ignored += 1
                continue
            self._served[(link, name)] = (rec.seq, now)
            out += [Send(link, d) for d in self.snapshot(rec)]
        if missing:
            body = {"kind": "gone", "origins": missing}
            out.append(Send(link, _state_frame(self.me, 0, body)))
        return out

    def _on_gone(self, link: str, names: list[str]) -> list[Send]:
        for name in names:
            offers = self._offers.get(name)
            if offers is not None:
                offers.pop(link, None)
                if not offers:
                    del self._offers[name]
            pull = self._pulls.get(name)
            if pull is not None and pull[0] == link:
                del self._pulls[name]
        return self._pull(list(self._offers))

    # --- repair ----------------------------------------------------------------------------------

    def _offer(self, origin: str, link: str, seq: int) -> None:
        if origin not in self._offers and len(self._offers) >= MAX_BROKERS:
            return  # a neighbour naming brokers without end: what we track stays bounded
        offers = self._offers.setdefault(origin, {})
        offers[link] = max(seq, offers.get(link, 0))

    def _settled(self, origin: str) -> None:
        """Forget offers of what we now hold."""
        offers = self._offers.get(origin)
        rec = self.origins.get(origin)
        if offers is None or rec is None:
            return
        for link in [n for n, s in offers.items() if s <= rec.seq]:
            del offers[link]
        if not offers:
            del self._offers[origin]

    def _pull(self, origins: Iterable[str]) -> list[Send]:
        """Ask for the records we are behind on, of the neighbour with the newest, within
        ``MAX_PULLS_PER_LINK`` outstanding per link."""
        now = self._clock()
        busy = Counter(link for link, _ in self._pulls.values())
        wants: dict[str, list[str]] = {}
        for origin in dict.fromkeys(origins):
            pull = self._pulls.get(origin)
            if pull is not None and now - pull[1] < PULL_TIMEOUT:
                continue
            if origin in self._early_since:
                continue  # held deltas wait on one that may still come (``poll`` decides)
            self._settled(origin)
            offers = self._offers.get(origin)
            if not offers:
                continue
            choices = [(s, n) for n, s in offers.items() if busy[n] < MAX_PULLS_PER_LINK]
            if not choices:
                continue
            _, link = max(choices)
            if pull is not None:
                busy[pull[0]] -= 1
            self._pulls[origin] = (link, now)
            busy[link] += 1
            wants.setdefault(link, []).append(origin)
        out = []
        for link, names in wants.items():
            for i in range(0, len(names), CHUNK_ENTRIES):
                body = {"kind": "want", "origins": names[i : i + CHUNK_ENTRIES]}
                out.append(Send(link, _state_frame(self.me, 0, body)))
        return out

    def link_down(self, link: str) -> list[Send]:
        """A neighbour went: what it offered or owed us, we ask of others."""
        self._assembly.pop(link, None)
        for key in [k for k in self._served if k[0] == link]:
            del self._served[key]
        for origin in list(self._offers):
            offers = self._offers[origin]
            offers.pop(link, None)
            if not offers:
                del self._offers[origin]
        for origin in [o for o, (n, _) in self._pulls.items() if n == link]:
            del self._pulls[origin]
        return self._pull(list(self._offers))

    def poll(self) -> list[Send]:
        """Periodically: pull the records whose held deltas wait on a hole for too long, and
        ask again for records asked for too long ago."""
        now = self._clock()
        for origin in [o for o, t in self._early_since.items() if now - t > GAP_GRACE]:
            self._forget_early(origin)
        return self._pull(list(self._offers))

    def digest(self) -> list[bytes]:
        """What we hold of every broker we reach (ourselves included), for a neighbour."""
        reachable = self.next_hops()
        have = [(n, r.seq) for n, r in self.origins.items() if n == self.me or n in reachable]
        return self._have(have)

    def _have(self, have: list[tuple[str, int]]) -> list[bytes]:
        return [
            _state_frame(
                self.me,
                0,
                {"kind": "digest", "have": [list(e) for e in have[i : i + CHUNK_ENTRIES]]},
            )
            for i in range(0, len(have), CHUNK_ENTRIES)
        ]

    def snapshot(self, rec: Origin) -> list[bytes]:
        """A record whole, in chunks (frames to send back to back on one link)."""
        chunks: list[tuple[list[list[Any]], list[list[Any]]]] = []
        agents: list[list[Any]] = []
        subs: list[list[Any]] = []
        size = 0

        def room(n: int) -> None:
            nonlocal agents, subs, size
            if (agents or subs) and (
                len(agents) + len(subs) >= CHUNK_ENTRIES or size + n > CHUNK_BYTES
            ):
                chunks.append((agents, subs))
                agents, subs, size = [], [], 0

        for (tenant, agent), (cred, since) in rec.agents.items():
            n = _agent_size((tenant, agent), cred)
            room(n)
            agents.append([tenant, agent, cred, since])
            size += n
        for tenant, pattern in rec.subs:
            n = _sub_size((tenant, pattern))
            room(n)
            subs.append([tenant, pattern])
            size += n
        chunks.append((agents, subs))
        out = []
        for i, (a, s) in enumerate(chunks):
            body: dict[str, Any] = {"kind": "snapshot", "origin": rec.name, "seq": rec.seq}
            body |= {"part": i, "parts": len(chunks), "agents": a, "subs": s}
            if i == 0:
                body["peers"] = sorted(rec.peers)
            out.append(_state_frame(rec.name, rec.seq, body))
        return out

    def expire(self, max_age: float) -> list[str]:
        """Forget brokers out of reach for longer than ``max_age`` (dead or partitioned away;
        a reachable broker's record stands until it changes)."""
        now = self._clock()
        reachable = self.next_hops()
        gone = []
        for name in self.origins:
            if name == self.me or name in reachable:
                self._lost.pop(name, None)
            elif now - self._lost.setdefault(name, now) > max_age:
                gone.append(name)
        for name in gone:
            self._drop(name)
            del self._lost[name]
            self._offers.pop(name, None)
            self._pulls.pop(name, None)
        return gone

    # --- graph -----------------------------------------------------------------------------------

    def _neighbours(self, name: str) -> list[str]:
        rec = self.origins.get(name)
        if rec is None:
            return []
        origins = self.origins
        return sorted(p for p in rec.peers if p in origins and name in origins[p].peers)

    def _bfs(self, root: str) -> tuple[dict[str, str | None], int]:
        """Parent of every broker reachable from root (deterministic: neighbours by name), and
        the depth of the tree (root's eccentricity)."""
        parent: dict[str, str | None] = {root: None}
        depth = {root: 0}
        queue = deque([root])
        while queue:
            node = queue.popleft()
            for nb in self._neighbours(node):
                if nb not in parent:
                    parent[nb] = node
                    depth[nb] = depth[node] + 1
                    queue.append(nb)
        return parent, max(depth.values())

    def next_hops(self) -> dict[str, str]:
        """Reachable broker -> the peer of ours to send through."""
        if self._hops is None:
            parent, ecc = self._bfs(self.me)
            hops: dict[str, str] = {}
            for node in parent:
                if node == self.me:
                    continue
                hop = node
                while (up := parent[hop]) is not None and up != self.me:
                    hop = up
                hops[node] = hop
            self._hops = hops
            self._limit = min(MAX_HOPS, 2 * ecc + 2)
        return self._hops

    def hop_limit(self) -> int:
        """The ttl of a frame entering the mesh here: the mesh's diameter is at most twice our
        eccentricity; two more hops cover views a little out of date."""
        self.next_hops()
        return self._limit

    def locate(self, tenant: str, agent: str) -> str | None:
        """The reachable broker holding that agent (the most recent connection wins)."""
        where = self._where.get((tenant, agent))
        if not where:
            return None
        best: tuple[int, str] | None = None
        reachable = self.next_hops()
        for name, since in where.items():
            if name != self.me and name not in reachable:
                continue
            if best is None or since > best[0]:
                best = (since, name)
        return best[1] if best else None

    def credential(self, tenant: str, agent: str) -> bytes | None:
        where = self.locate(tenant, agent)
        return self.origins[where].agents[(tenant, agent)][0] if where else None

    def agents(self, tenant: str) -> dict[str, bytes]:
        """The tenant's agents on reachable brokers: name -> credential (for grants' listings,
        which are rare and bounded by the caller)."""
        reachable = self.next_hops()
        found: dict[str, bytes] = {}
        for name, rec in self.origins.items():
            if name == self.me or name in reachable:
                for (t, agent), (cred, _since) in rec.agents.items():
                    if t == tenant:
                        found[agent] = cred
        return found

    # --- publications ----------------------------------------------------------------------------

    def interested(self, tenant: str, subject: str) -> set[str]:
        """Other reachable brokers with a subscription matching the subject."""
        index = self._interest.get(tenant)
        if index is None:
            return set()
        reachable = self.next_hops()
        return {name for name in index.match(subject) if name in reachable}

    def fanout(self, origin: str, targets: set[str]) -> set[str]:
        """Our peers to pass a publication from ``origin`` to, for it to reach ``targets``:
        our children in the shortest-path tree rooted at the origin whose subtree holds one."""
        tree = self._trees.get(origin)
        if tree is None:
            tree = self._trees[origin] = self._bfs(origin)[0]
        if self.me not in tree:
            return set()
        out = set()
        for target in targets:
            node: str | None = target
            if node not in tree:
                continue
            while node is not None and tree[node] != self.me:
                node = tree[node]
            if node is not None and node != self.me:
                out.add(node)
        return out
