"""An agent's session over its broker link, sans-I/O: frames in; events and frames out.

The agent (``atoll.agent.node``) is the asyncio shell around it, as websockets' ``asyncio/`` code
wraps its ``protocol.py``: it feeds ``receive`` the frames of each message with the wall clock,
writes the frames the session makes, and acts on the events ``receive``, ``expire`` and
``connection_lost`` return. Here live call correlation, deadlines, the peers' Box keys (a frame
from an agent whose key is unknown is held until the broker answers for it), replay refusal and
the RPC message bodies; no futures or tasks, and the times its decisions rest on are passed in
(the sealer stamps envelopes with the wall clock itself).

Direct messages (sealed with the Box key the two agents share) carry a body ``{k: kind, ...}``:

    q  request   {c: call id, m: method, p: params, t: ms left}     x  cancel {c}
    r  result    {c, r: result}                                    e  error  {c, e: wire error}
    s* stream messages (``atoll.protocol.streams``)

It runs past 400 lines because the events it returns are declared here, beside the one machine
that makes them: together they are the whole contract between the session and its shell.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import os
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from atoll.protocol.errors import AuthError, ProtocolError
from atoll.protocol.frames import Frame, FrameType, encode_frame, unpack_map
from atoll.protocol.grants import MAX_PEER_GRANTS, Grant, verify_grant
from atoll.protocol.seal import ReplayGuard, Sealer, box_key, open_sealed
from atoll.protocol.subjects import peer_name, qualify, split_remote
from atoll.protocol.trust import AgentIdentity, verify_agent

MAX_HELD = 1024  # frames held per sender while its key is fetched; later ones are dropped
# Agents never hear of a grant's revocation or replacement (brokers enforce those): a callee
# refetches an importer's key, and so the grant it comes through, this often, so that what it
# sees of a caller (the granted roles) is never older than this.
GRANTED_PEER_TTL_MS = 60_000
MAX_KEPT_SEEN = 65536  # kept publications remembered, to tell a kept copy sent again from a replay


@dataclass(slots=True)
class Peer:
    """Another agent: its verified identity and the Box key shared with it; for an agent of
    another tenant (``name@tenant``), the grants that join the two (either way: a grant's
    exporter answers our calls, its importer may call us). An importer's caller is seen with
    its grants' roles that it also holds at home, never others."""

    ident: AgentIdentity
    key: bytes
    grants: tuple[Grant, ...] = ()
    learnt: int = 0  # when (ms): a granted peer is asked for again after GRANTED_PEER_TTL_MS


@dataclass(frozen=True)
class CallInfo:
    """Who is calling: the caller's address and its verified identity (for role checks)."""

    src: str
    caller: AgentIdentity
    method: str
    grant: Grant | None = None  # the grant a caller of another tenant comes through


class Publication(NamedTuple):  # a tuple: built once per delivered message
    subject: str
    src: str
    data: Any


# --- events: slotted dataclasses, the cheapest typed records to build (one or two per message) --


class Failure(enum.Enum):
    """Why a call ended without a result."""

    REMOTE = "remote"  # the handler failed: the detail is its error in wire form
    NO_RESPONDER = "no-responder"  # the broker found nobody at the address
    DEADLINE = "deadline"  # no answer in time
    DISCONNECTED = "disconnected"  # the broker link was lost


@dataclass(slots=True)
class Replied:
    call: int
    result: Any


@dataclass(slots=True)
class CallFailed:
    call: int
    failure: Failure
    detail: Any  # the remote error's wire form (REMOTE), else a reason


@dataclass(slots=True)
class Requested:
    """A request to serve; the answer goes back with ``reply`` or ``reply_error``."""

    src: str
    dst: str
    peer: Peer
    call: int
    method: str
    params: Any
    timeout_ms: Any  # the caller's time left (an int when well formed)


@dataclass(slots=True)
class Cancelled:
    """The caller of ``call`` gave up on it."""

    src: str
    call: int


@dataclass(slots=True)
class StreamMessage:
    src: str
    dst: str
    peer: Peer
    body: dict[str, Any]


@dataclass(slots=True)
class Undelivered:
    """The broker could not deliver message ``msg`` (one that was not a call: a stream's) to
    ``dst``."""

    msg: int
    dst: str
    reason: str


@dataclass(slots=True)
class PeerKnown:
    name: str
    peer: Peer


@dataclass(slots=True)
class PeerUnknown:
    """No usable key for ``name``: who waits for it fails with ``reason``."""

    name: str
    reason: str


@dataclass(slots=True)
class ImportsKnown:
    """What this tenant imports (the answer to ``request_key("@")``): per grant, the exporter's
    agents that serve it, verified."""

    imports: list[tuple[Grant, list[AgentIdentity]]]


@dataclass(slots=True)
class KeyRequest:
    """A frame asking the broker for ``name``'s credential, to write. If it cannot be written,
    tell the session (``key_request_failed``) so that the next need asks again."""

    name: str
    frame: bytes


@dataclass(slots=True)
class BrokerError:
    code: str
    reason: str
    fatal: bool  # the broker closes the connection after it


@dataclass(slots=True)
class Refused:
    """Something received was refused (bad, forged, replayed): worth a warning in the log."""

    event: str
    fields: dict[str, Any]


Event = (
    Publication
    | Replied
    | CallFailed
    | Requested
    | Cancelled
    | StreamMessage
    | Undelivered
    | PeerKnown
    | PeerUnknown
    | ImportsKnown
    | KeyRequest
    | BrokerError
    | Refused
)


@dataclass(slots=True)
class _Call:
    msg: int
    peer: Peer
    src: str
    dst: str
    method: str
    timeout: float
    deadline: float


class Session:
    """One agent's end of the overlay: seals what it sends, opens what it receives."""

    def __init__(
        self, tenant: str, secret_key: bytes, operator_pub: bytes, feed_keys: dict[int, bytes]
    ) -> None:
        self.tenant = tenant
        self._sk = secret_key  # 64-byte Ed25519 secret key: Box keys derive from it
        self._operator_pub = operator_pub
        self._feed_keys = feed_keys
        self._feed_kid = max(feed_keys)
        self._sealer = Sealer()
        self._replay = ReplayGuard()
        # (source, subject) -> nonce of the kept publication last opened: a broker sends the
        # kept copy again to each new subscription, which is the current state, not a replay.
        self._kept: dict[tuple[str, str], bytes] = {}
        self._ids = itertools.count(int.from_bytes(os.urandom(4), "big") << 20)
        self.peers: dict[str, Peer] = {}
        self._asked: set[str] = set()  # names whose key the broker was asked for
        self._held: dict[str, list[Frame]] = {}  # frames waiting for their sender's key
        self._calls: dict[int, _Call] = {}
        self._by_msg: dict[int, int] = {}  # message id of a request -> its call
        self._deadlines: list[tuple[float, int]] = []  # heap; entries of ended calls linger

    # --- sending -------------------------------------------------------------------------------

    def message(self, peer: Peer, src: str, dst: str, body: dict[str, Any]) -> tuple[int, bytes]:
        """A MSG frame sealing ``body`` for ``peer``, and its message id (a broker's NORESP names
        it)."""
        msg = next(self._ids)
        return msg, self._sealed(msg, peer, src, dst, body)

    def _sealed(self, msg: int, peer: Peer, src: str, dst: str, body: dict[str, Any]) -> bytes:
        if "@" in dst and "@" not in src:  # to another tenant: it must know whom to answer
            src = qualify(src, self.tenant)
        sealed = self._sealer.seal(peer.key, src, dst, body)
        return encode_frame(FrameType.MSG, {"id": msg, "src": src, "dst": dst}, sealed)

    def call(
        self,
        peer: Peer,
        src: str,
        dst: str,
        method: str,
        params: Any,
        timeout: float,
        deadline: float,
        now: float,
    ) -> tuple[int, bytes]:
        """Start calling ``method`` at ``dst``: the call's id and the request to write. It ends
        with a ``Replied`` or ``CallFailed`` event, or ``cancel``/``forget``."""
        call = next(self._ids)
        left_ms = int(max(0.0, deadline - now) * 1000)
        body = {"k": "q", "c": call, "m": method, "p": params, "t": left_ms}
        msg = next(self._ids)
        frame = self._sealed(msg, peer, src, dst, body)
        self._calls[call] = _Call(msg, peer, src, dst, method, timeout, deadline)
        self._by_msg[msg] = call
        heapq.heappush(self._deadlines, (deadline, call))
        if len(self._deadlines) > 64 + 2 * len(self._calls):  # mostly ended calls: rebuild
            self._deadlines = [(c.deadline, cid) for cid, c in self._calls.items()]
            heapq.heapify(self._deadlines)
        return call, frame

    def cancel(self, call: int) -> bytes | None:
        """End ``call``: the frame telling the callee to stop (None if it had ended)."""
        pending = self._end(call)
        if pending is None:
            return None
        body = {"k": "x", "c": call}
        return self._sealed(next(self._ids), pending.peer, pending.src, pending.dst, body)

    def forget(self, call: int) -> None:
        """End ``call`` without a word to the callee (its caller is gone)."""
        pending = self._calls.pop(call, None)  # _end, inlined: once per call made
        if pending is not None:
            self._by_msg.pop(pending.msg, None)

    def expire(self, now: float) -> list[Event]:
        """Time is ``now``: every call whose deadline has come fails. The callee's key is then
        forgotten (the next call asks the broker again): an agent enrolled anew under the same
        name has a new key, cannot open what we seal with its old one, and cannot tell us."""
        events: list[Event] = []
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            _, call = heapq.heappop(heap)
            ended = self._end(call)
            if ended is not None:
                name = ended.peer.ident.name
                if self.peers.get(name) is ended.peer:
                    del self.peers[name]
                reason = f"{ended.dst} did not answer {ended.method!r} within {ended.timeout}s"
                events.append(CallFailed(call, Failure.DEADLINE, reason))
        return events

    def reply(self, peer: Peer, src: str, dst: str, call: int, result: Any) -> bytes:
        """The result of a served call (raises TypeError, ValueError or OverflowError for one
        msgpack cannot carry)."""
        return self._sealed(next(self._ids), peer, src, dst, {"k": "r", "c": call, "r": result})

    def reply_error(self, peer: Peer, src: str, dst: str, call: int, error: Any) -> bytes:
        """A served call's error, in wire form."""
        return self._sealed(next(self._ids), peer, src, dst, {"k": "e", "c": call, "e": error})

    def publish(self, subject: str, data: Any, src: str, keep: bool = False) -> bytes:
        """A PUB frame sealing ``data`` with the newest feed key (``subject`` already checked)."""
        sealed = self._sealer.seal(self._feed_keys[self._feed_kid], src, subject, data)
        header = {"id": next(self._ids), "src": src, "subj": subject, "kid": self._feed_kid}
        if keep:
            header["keep"] = True
        return encode_frame(FrameType.PUB, header, sealed)

    def subscribe(self, sid: int, pattern: str) -> bytes:
        return encode_frame(FrameType.SUB, {"sid": sid, "subj": pattern})

    def unsubscribe(self, sid: int) -> bytes:
        return encode_frame(FrameType.UNSUB, {"sid": sid})

    def revoke(self, blob: bytes) -> bytes:
        return encode_frame(FrameType.REVOKE, {}, blob)

    def request_key(self, name: str) -> bytes | None:
        """The frame asking for ``name``'s key; None while an earlier request is unanswered."""
        if name in self._asked:
            return None
        self._asked.add(name)
        return encode_frame(FrameType.KEYREQ, {"name": name})

    def key_request_failed(self, name: str) -> None:
        """The request for ``name``'s key could not be written."""
        self._asked.discard(name)

    def connection_lost(self, reason: str) -> list[Event]:
        """The broker link is gone: pending calls fail, held frames and key requests go."""
        calls, self._calls = self._calls, {}
        self._by_msg.clear()
        self._deadlines.clear()
        self._asked.clear()
        self._held.clear()
        return [
            CallFailed(call, Failure.DISCONNECTED, f"{reason} (calling {pending.dst})")
            for call, pending in calls.items()
        ]

    def _end(self, call: int) -> _Call | None:
        pending = self._calls.pop(call, None)
        if pending is not None:
            self._by_msg.pop(pending.msg, None)
        return pending

    # --- receiving -----------------------------------------------------------------------------

    def receive(self, frames: list[Frame], now_ms: int) -> list[Event]:
        """The events the frames of one message cause (``now_ms``: the wall clock, for replay
        and credential checks)."""
        events: list[Event] = []
        for f in frames:
            t = f.type
            if t is FrameType.PUB:
                self._on_pub(f, now_ms, events)
            elif t is FrameType.MSG:
                self._on_msg(f, now_ms, events)
            elif t is FrameType.KEYRESP:
                self._on_keyresp(f, now_ms, events)
            elif t is FrameType.NORESP:
                self._on_noresp(f, events)
            elif t is FrameType.ERROR:
                self._on_error(f, events)
            else:
                events.append(Refused("agent.unexpected_frame", {"type": t.name}))
        return events

    def _on_error(self, f: Frame, events: list[Event]) -> None:
        h = f.header
        events.append(BrokerError(h["code"], h["reason"], h.get("fatal", False)))
        name = h.get("name")
        if name is not None:  # a key request refused
            self._asked.discard(name)
            self._held.pop(name, None)
            events.append(PeerUnknown(name, h["reason"]))

    def _on_noresp(self, f: Frame, events: list[Event]) -> None:
        msg, reason = f.header["id"], f.header["reason"]
        call = self._by_msg.get(msg)
        if call is None:
            events.append(Undelivered(msg, f.header["dst"], reason))
        elif self._end(call) is not None:
            events.append(CallFailed(call, Failure.NO_RESPONDER, reason))

    def _on_keyresp(self, f: Frame, now: int, events: list[Event]) -> None:
        name = f.header["name"]
        self._asked.discard(name)
        grants: tuple[Grant, ...] = ()
        try:
            if name == "@":
                events.append(ImportsKnown(self._imports(f.payload, now)))
                return
            agent, tenant, _ = split_remote(name)
            blob = f.payload
            if tenant is not None:
                blob, grants = self._granted(blob, tenant, now)
            ident = verify_agent(blob, self._operator_pub, now)
            if ident.name != agent or ident.tenant != (tenant or self.tenant):
                raise AuthError(f"broker answered for {name!r} with a credential of {ident.name!r}")
            if imported := [g for g in grants if g.importer == ident.tenant]:
                # Its grants' roles that its own tenant gave it too: a grant widens no agent
                # of the importer beyond what it is at home.
                granted = {r for g in imported for r in g.roles}
                ident = replace(ident, roles=tuple(r for r in ident.roles if r in granted))
        except ProtocolError as exc:
            events.append(Refused("agent.peer_key_refused", {"peer": name, "reason": exc.reason}))
            events.append(PeerUnknown(name, f"agent {name!r}: {exc.reason}"))
            self._held.pop(name, None)
            return
        peer = Peer(ident, box_key(self._sk, ident.pub), grants, now)
        self.peers[name] = peer
        events.append(PeerKnown(name, peer))
        for held in self._held.pop(name, []):
            self._open_msg(peer, held, now, events)

    def _granted(self, payload: bytes, tenant: str, now: int) -> tuple[bytes, tuple[Grant, ...]]:
        """Another tenant's agent: its credential, and the grants (verified here, as brokers
        do) that join its tenant and ours."""
        answer = unpack_map(payload, "granted key")
        blobs = answer.get("grants")
        if not isinstance(blobs, list) or not 1 <= len(blobs) <= MAX_PEER_GRANTS:
            raise AuthError(f"granted key carries no list of 1 to {MAX_PEER_GRANTS} grants")
        grants = tuple(verify_grant(b, self._operator_pub, now) for b in blobs)
        if any({g.importer, g.exporter} != {self.tenant, tenant} for g in grants):
            raise AuthError(f"a grant offered for tenant {tenant!r} joins other tenants")
        cred = answer.get("cred")
        if not isinstance(cred, bytes):
            raise AuthError("granted key has no credential")
        return cred, grants

    def _imports(self, payload: bytes, now: int) -> list[tuple[Grant, list[AgentIdentity]]]:
        found: list[tuple[Grant, list[AgentIdentity]]] = []
        listed = unpack_map(payload, "imports").get("imports")
        for item in listed if isinstance(listed, list) else []:
            try:
                grant = verify_grant(item.get("grant"), self._operator_pub, now)
                if grant.importer != self.tenant:
                    continue
                agents = [verify_agent(c, self._operator_pub, now) for c in item.get("agents")]
            except (ProtocolError, AttributeError, TypeError):
                continue  # one bad entry hides only itself
            found.append((grant, [a for a in agents if a.tenant == grant.exporter]))
        return found

    def _on_msg(self, f: Frame, now: int, events: list[Event]) -> None:
        src = f.header.get("src", "")
        try:
            agent = peer_name(src)
        except ProtocolError:
            events.append(Refused("agent.msg_refused", {"reason": "bad source address"}))
            return
        peer = self.peers.get(agent)
        if peer is not None and (not peer.grants or now - peer.learnt < GRANTED_PEER_TTL_MS):
            self._open_msg(peer, f, now, events)
            return
        held = self._held.setdefault(agent, [])
        if len(held) < MAX_HELD:
            held.append(f)
        frame = self.request_key(agent)
        if frame is not None:
            events.append(KeyRequest(agent, frame))

    def _open_msg(self, peer: Peer, f: Frame, now: int, events: list[Event]) -> None:
        src, dst = f.header["src"], f.header["dst"]
        try:
            nonce, sent, msg = open_sealed(peer.key, f.payload, src, dst)
            self._replay.check(peer.ident.pub, nonce, sent, now)
            if type(msg) is not dict:
                raise ProtocolError("message body must be a map")
        except ProtocolError as exc:
            if exc.code == "tampered":
                self.peers.pop(peer.ident.name, None)  # the peer may have a new key: refetch
            fields = {"src": src, "code": exc.code, "reason": exc.reason}
            events.append(Refused("agent.msg_refused", fields))
            return
        kind = msg.get("k")
        call: Any = msg.get("c")  # a peer's value: checked, or looked up as it came
        if kind == "q":
            method = msg.get("m")
            if type(call) is int and isinstance(method, str):
                events.append(Requested(src, dst, peer, call, method, msg.get("p"), msg.get("t")))
        elif kind == "r" or kind == "e":
            pending = self._calls.pop(call, None)
            if pending is None:
                return
            self._by_msg.pop(pending.msg, None)
            if kind == "r":
                events.append(Replied(call, msg.get("r")))
            else:
                events.append(CallFailed(call, Failure.REMOTE, msg.get("e")))
        elif kind == "x":
            events.append(Cancelled(src, call))
        elif isinstance(kind, str) and kind[:1] == "s":
            events.append(StreamMessage(src, dst, peer, msg))

    def _on_pub(self, f: Frame, now: int, events: list[Event]) -> None:
        h = f.header
        if h["subj"].startswith("$"):  # a broker's own notice, in clear (it holds no feed key)
            try:
                notice = unpack_map(f.payload, "broker notice", 64 * 1024)
            except ProtocolError as exc:
                bad = {"subject": h["subj"], "reason": exc.reason}
                events.append(Refused("agent.pub_refused", bad))
                return
            events.append(Publication(h["subj"], "", notice))
            return
        key = self._feed_keys.get(h["kid"])
        if key is None:
            fields: dict[str, Any] = {"subject": h["subj"], "reason": "unknown feed key"}
            events.append(Refused("agent.pub_refused", fields))
            return
        src = h.get("src", "")
        try:
            nonce, sent, data = open_sealed(key, f.payload, src, h["subj"])
            kept = (src, h["subj"]) if h.get("keep") else None
            if kept is None or self._kept.get(kept) != nonce:
                self._replay.check(src, nonce, sent, now)  # per address: one sealer epoch
                if kept is not None:
                    if len(self._kept) >= MAX_KEPT_SEEN:
                        self._kept.clear()
                    self._kept[kept] = nonce
        except ProtocolError as exc:
            fields = {"subject": h["subj"], "code": exc.code, "reason": exc.reason}
            events.append(Refused("agent.pub_refused", fields))
            return
        events.append(Publication(h["subj"], src, data))
