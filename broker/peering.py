"""The broker mesh's I/O: authenticated links to peer brokers, mesh state exchange, relaying.
(Over 400 lines: one link's life, from dial or accept through authentication to keepalive and
relaying, reads best in one place; its decisions are all ``mesh.py``'s.)

A link is a websocket like an agent's, opened by either broker (``--peer URL`` dials; the other
accepts) and authenticated with operator-signed broker credentials on both sides. What travels
on it and why is ``mesh.py``'s (deltas, digests, snapshots in chunks); this shell feeds it the
router's changes (coalesced for ``ADVERT_DELAY``), the frames of its links and a clock
(``refresh``: digests to every neighbour, records asked for again, unreachable brokers
forgotten), and sends what it answers.

Keepalive: a link pings every ``PEER_PING`` seconds from the moment it is attached (the
transport reschedules its next ping when the interval changes), and a neighbour silent for
twice that is dropped at the next ping; digests every ``refresh`` seconds keep a healthy link
from ever being silent that long.

A relayed publication this broker refuses (or does not keep) is answered to its publisher over
the mesh, as a message's NORESP is: rate-limited per publisher (``NOTICE_EVERY``).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from typing import TYPE_CHECKING, Any

from atoll.broker.mesh import LinkState, Send
from atoll.broker.seen_ids import SeenIds
from atoll.broker.state import Binding
from atoll.logs import EventLogger
from atoll.protocol.errors import AuthError, ProtocolError
from atoll.protocol.frames import Frame, FrameType, decode_message, encode_frame, pack, unpack_map
from atoll.protocol.handshake import ClientHandshake
from atoll.protocol.subjects import check_name, check_subject, split_address, split_remote
from atoll.protocol.trust import AgentIdentity, verify_agent
from atoll.tenancy import permissions
from atoll.transport import CLOSE_POLICY, WebSocket, connect

if TYPE_CHECKING:
    from atoll.broker.server import BrokerServer


PEER_PING = 2.0  # seconds: a frozen peer broker is dropped 2-3x this after its last word
_CACHE_LIMIT = 4096  # verified credentials and permission answers of remote agents
NOTICE_EVERY = 10.0  # seconds: at most one refusal notice to a remote publisher in each
ADVERT_DELAY = 0.02  # seconds: coalesces a burst of connects/subscriptions into fewer deltas


class PeerLink:
    def __init__(self, mesh: PeerMesh, ws: WebSocket, name: str, dialled: bool) -> None:
        self.mesh = mesh
        self.ws = ws
        self.name = name
        self.dialled = dialled
        self.send = ws.send
        ws.closed.add_done_callback(lambda _: mesh.detach(self))

    def start(self) -> None:
        """Handle what the neighbour sends, starting with anything it sent already."""
        self.ws.deliver_to(self._on_message)

    def _on_message(self, data: bytes | str) -> None:
        try:
            for frame in decode_message(data, self.mesh.server.max_message):
                self.mesh.on_frame(self, frame)
        except ProtocolError as exc:
            self.mesh.log.warning("mesh.frame_refused", peer=self.name, reason=exc.reason)
            self.ws.close(CLOSE_POLICY, exc.reason)


class PeerMesh:
    """This broker's side of the mesh: its peer links, the adverts it floods, relaying."""

    def __init__(
        self,
        server: BrokerServer,
        peers: list[str],
        refresh: float = 2.0,
        backoff_max: float = 2.0,
    ) -> None:
        self.server = server
        self.me = server.keys.name
        self.urls = list(peers)
        self.refresh = refresh
        self.backoff_max = backoff_max
        self.log = EventLogger("mesh", broker=self.me)
        self.state = LinkState(self.me)
        self.links: dict[str, PeerLink] = {}
        self._seen = SeenIds()
        self._synced = SeenIds()
        self._advert_due: asyncio.TimerHandle | None = None  # coalesced deltas, scheduled
        self._unadvertised = 0  # agents/patterns left out of our record, as last logged
        self._refused_brokers = 0  # brokers' records not kept (MAX_BROKERS), as last logged
        self._idents: dict[bytes, AgentIdentity] = {}  # remote agents' verified credentials
        self._allowed: dict[tuple[bytes, str, str], bool] = {}
        self._noticed: dict[tuple[str, str], float] = {}  # (tenant, publisher) -> last notice
        self._tasks: list[asyncio.Task[None]] = []

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._dial(url)) for url in self.urls]
        self._tasks.append(asyncio.create_task(self._refresh()))

    async def stop(self) -> None:
        if self._advert_due is not None:
            self._advert_due.cancel()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for link in list(self.links.values()):
            link.ws.close(1001, "broker shutting down")

    async def _refresh(self) -> None:
        # Changes travel as deltas when they happen; this loop repairs what went missing (a
        # digest to each neighbour, records asked for again) and forgets brokers that stayed
        # out of reach.
        while True:
            await asyncio.sleep(self.refresh)
            gone = self.state.expire(30 * self.refresh)
            if gone:
                self.log.info("mesh.expired", brokers=",".join(gone))
            self._send_all(self.state.poll())
            if self.state.refused_brokers > self._refused_brokers:
                self._refused_brokers = self.state.refused_brokers
                self.log.warning("mesh.too_many_brokers", refused=self._refused_brokers)
            digest = self.state.digest()
            for link in list(self.links.values()):
                for data in digest:
                    link.send(data)

    async def _dial(self, url: str) -> None:
        failures = 0
        while True:
            try:
                ws = await connect(
                    url,
                    max_message=self.server.max_message,
                    ping_interval=self.server.ping_interval,
                    open_timeout=5,
                    ssl_context=self.server.peer_ssl,
                )
                try:
                    name = await self._handshake(ws)
                except BaseException:
                    ws.abort()
                    raise
                if self.attach(ws, name, dialled=True):
                    failures = 0
                    await ws.wait_closed()
            except (OSError, ConnectionError, ProtocolError, TimeoutError) as exc:
                reason = getattr(exc, "reason", "") or str(exc) or type(exc).__name__
                self.log.info("mesh.dial_failed", url=url, reason=reason)
            failures += 1
            cap = min(self.backoff_max, 0.05 * 2 ** min(failures, 10))
            await asyncio.sleep(random.uniform(cap / 2, cap))

    async def _handshake(self, ws: WebSocket) -> str:
        keys = self.server.keys
        hs = ClientHandshake(keys.key, keys.credential, keys.operator_pub, peer=True)

        async def one() -> Frame:
            frames = decode_message(await ws.recv(5), self.server.max_message)
            if len(frames) != 1:
                raise ProtocolError("handshake frames must come alone")
            return frames[0]

        ws.send(hs.receive_hello(await one()))
        welcome = hs.receive_welcome(await one())
        if welcome.broker.name == self.me:
            raise AuthError("dialled ourselves")
        return welcome.broker.name

    # --- links -----------------------------------------------------------------------------------

    def attach(self, ws: WebSocket, name: str, dialled: bool) -> bool:
        """A new authenticated link. Two brokers dialling each other keep one link: the one
        dialled by the broker whose name sorts first."""
        old = self.links.get(name)
        if old is not None and old.ws.open:
            keep_new = dialled == (self.me < name)
            if not keep_new:
                ws.close(1000, "duplicate mesh link")
                return False
            old.ws.close(1000, "duplicate mesh link")
        if old is not None:  # what was asked of the old link is asked again of the new one
            self._send_all(self.state.link_down(name))
        # Few links, and the mesh reroutes once one goes silent. The transport reschedules its
        # next ping at once, so the listener's longer first wait does not outlive the deadline.
        ws.ping_interval = PEER_PING
        link = PeerLink(self, ws, name, dialled)
        self.links[name] = link
        self.log.info("mesh.linked", peer=name, dialled=dialled)
        records = [("revoke", b) for b in self.server.state.revocation_blobs()]
        records += [("grant", b) for b in self.server.router.grants.records()]
        for kind, blob in records:
            body = pack({"kind": kind, "blob": blob})
            link.send(encode_frame(FrameType.SYNC, {"origin": self.me}, body))
        self.state.set_peers(self.links)
        self._advertise()
        for data in self.state.digest():  # the new neighbour pulls what it lacks
            link.send(data)
        link.start()  # only now: what it already sent may want answers on this very link
        return True

    def detach(self, link: PeerLink) -> None:
        if self.links.get(link.name) is link:
            del self.links[link.name]
            self.log.info("mesh.unlinked", peer=link.name)
            self.state.set_peers(self.links)
            self._advertise()
            self._send_all(self.state.link_down(link.name))

    # --- adverts ---------------------------------------------------------------------------------

    def changed(self) -> None:
        """Local agents or interest changed: send the deltas shortly, together for a burst."""
        if self._advert_due is None:
            self._advert_due = asyncio.get_running_loop().call_later(ADVERT_DELAY, self._advertise)

    def _advertise(self) -> None:
        """Number what changed here and flood it (alone, it is numbered all the same: the
        first neighbour pulls our record whole)."""
        if self._advert_due is not None:
            self._advert_due.cancel()
            self._advert_due = None
        self.state.local(self.server.router.local_changes())
        for data in self.state.flush():
            self._flood(data, exclude=None)
        if self.state.unadvertised > self._unadvertised:
            self._unadvertised = self.state.unadvertised
            self.log.warning("mesh.over_bounds", left_out=self._unadvertised)

    def _flood(self, data: bytes, exclude: str | None) -> None:
        for name, link in self.links.items():
            if name != exclude:
                link.send(data)

    def _send_all(self, sends: list[Send]) -> None:
        for send in sends:
            if send.to is None:
                self._flood(send.data, send.exclude)
            else:
                link = self.links.get(send.to)
                if link is not None:
                    link.send(send.data)

    # --- frames from peers -----------------------------------------------------------------------

    def on_frame(self, link: PeerLink, f: Frame) -> None:
        if f.type is FrameType.RELAY:
            self._relay(link, f)
        elif f.type is FrameType.PEER_STATE:
            self._send_all(self.state.receive(link.name, f))
        elif f.type is FrameType.SYNC:
            self._sync(link, f)
        else:
            raise ProtocolError(f"peer brokers may not send {f.type.name} frames")

    def flood_sync(self, body: dict[str, Any]) -> None:
        data = pack(body)
        self._synced.add(data)
        self._flood(encode_frame(FrameType.SYNC, {"origin": self.me}, data), exclude=None)

    def _sync(self, link: PeerLink, f: Frame) -> None:
        if not self._synced.add(f.payload):
            return
        body = unpack_map(f.payload, "sync")
        kind = body.get("kind")
        if kind == "revoke":
            blob = body.get("blob")
            try:
                if not isinstance(blob, bytes):
                    raise AuthError("revocation missing")  # as verify_revocation says it
                self.server.router.apply_revocation(blob)
            except AuthError as exc:
                raise ProtocolError(f"peer sent a bad revocation: {exc.reason}") from None
        elif kind == "grant":
            try:
                self.server.router.apply_grant(body.get("blob"))
            except AuthError as exc:
                raise ProtocolError(f"peer sent a bad grant: {exc.reason}") from None
        elif kind == "bind":
            self.server.router.apply_binding(Binding.from_wire(body))
        else:
            raise ProtocolError(f"unknown sync kind {kind!r}")
        self._flood(f.raw, exclude=link.name)

    # --- relaying --------------------------------------------------------------------------------

    # A relay's header carries what routing needs (tenant, hop limit, and the inner frame's id,
    # source and destination, subject or return address), so brokers on the way never decode
    # the inner frame: it travels as the bytes the first broker checked and stamped.
    _ROUTE_KEYS = ("id", "src", "dst", "subj", "keep", "to")

    def forward_msg(
        self,
        tenant: str,
        agent: str,
        data: bytes,
        route: dict[str, Any],
        ttl: int | None = None,
        origin: str | None = None,
    ) -> bool:
        """Send a direct frame towards the broker holding ``agent``; False if none does."""
        where = self.state.locate(tenant, agent)
        hop = self.state.next_hops().get(where) if where and where != self.me else None
        link = self.links.get(hop) if hop else None
        if link is None:
            return False
        if self._advert_due is not None:
            # A new local agent's first message must not overtake the advert carrying its
            # credential: the receiver would ask for the sender's key before its broker has it.
            self._advertise()
        if ttl is None:  # entering the mesh here: as many hops as our view of it can need
            ttl = self.state.hop_limit()
        link.send(self._relay_frame(tenant, origin or self.me, ttl, route, data))
        return True

    def forward_pub(
        self,
        tenant: str,
        subject: str,
        data: bytes,
        route: dict[str, Any],
        ttl: int | None = None,
        origin: str | None = None,
    ) -> None:
        origin = origin or self.me
        if self._advert_due is not None:  # peers check the publisher's roles: credential first
            self._advertise()
        # Kept publications (discovery state) go to every broker, so any later subscriber sees
        # them; the rest only where someone listens.
        targets = (
            set(self.state.next_hops())
            if route.get("keep")
            else self.state.interested(tenant, subject)
        )
        if not targets:
            return
        if ttl is None:
            ttl = self.state.hop_limit()
        frame = self._relay_frame(tenant, origin, ttl, route, data)
        for hop in self.state.fanout(origin, targets):
            link = self.links.get(hop)
            if link is not None:
                link.send(frame)

    def _relay_frame(
        self, tenant: str, origin: str, ttl: int, route: dict[str, Any], inner: bytes
    ) -> bytes:
        header = {k: route[k] for k in self._ROUTE_KEYS if k in route}
        header.update(tenant=tenant, origin=origin, ttl=ttl)
        return encode_frame(FrameType.RELAY, header, inner)

    def credential(self, tenant: str, agent: str) -> bytes | None:
        return self.state.credential(tenant, agent)

    def agents(self, tenant: str) -> dict[str, bytes]:
        return self.state.agents(tenant)

    def _may(self, tenant: str, agent: str, kind: str, subject: str) -> bool:
        """Checked again here, from the publisher's own credential: a peer broker is not
        trusted to have applied the publisher's permissions."""
        blob = self.state.credential(tenant, agent)
        if blob is None:
            return False
        ident = self._idents.get(blob)
        if ident is None:
            try:
                ident = verify_agent(blob, self.server.state.operator_pub)
            except AuthError:
                return False
            if ident.tenant != tenant or ident.name != agent:
                return False
            if len(self._idents) >= _CACHE_LIMIT:
                self._idents.clear()
            self._idents[blob] = ident
        key = (blob, kind, subject)
        hit = self._allowed.get(key)
        if hit is None:
            if len(self._allowed) >= _CACHE_LIMIT:
                self._allowed.clear()
            hit = self._allowed[key] = permissions.allowed(ident.roles, agent, kind, subject)
        return hit

    def _tell_publisher(
        self, tenant: str, publisher: str, msg_id: int, subject: str, what: str
    ) -> None:
        """A relayed publication this broker refused or did not keep: tell its publisher, as
        its own broker tells it of a refusal there, over the mesh. At most one notice to a
        publisher each ``NOTICE_EVERY`` from this broker: one refused at every broker of a large
        mesh, or publishing on many refused subjects, draws no flood back."""
        key = (tenant, publisher)
        now = time.monotonic()
        if now - self._noticed.get(key, -NOTICE_EVERY) < NOTICE_EVERY:
            return
        if len(self._noticed) >= _CACHE_LIMIT:
            self._noticed.clear()
        self._noticed[key] = now
        reason = f"broker {self.me} {what}"
        header = {"code": "forbidden", "reason": reason, "id": msg_id, "subj": subject}
        notice = encode_frame(FrameType.ERROR, header)
        if not self.server.router.deliver_msg(tenant, publisher, notice):
            self.forward_msg(tenant, publisher, notice, {"id": msg_id, "to": publisher})

    def _relay(self, link: PeerLink, f: Frame) -> None:
        h = f.header
        tenant, origin, ttl = h["tenant"], h["origin"], h["ttl"] - 1
        check_name(tenant, "tenant name")
        msg_id = h.get("id")
        if type(msg_id) is not int:
            raise ProtocolError("a relay names its frame's id")
        kind = "dst" if "dst" in h else "subj" if "subj" in h else "to" if "to" in h else None
        if kind is None:
            raise ProtocolError("a relay names a destination, a subject or a return address")
        src = h.get("src", "")
        if kind != "to":
            split_remote(src)  # brokers stamp it; a peer must not relay anonymous frames
        if not self._seen.add((origin, tenant, kind, src, msg_id)):
            return  # a second copy (views differed for a moment): exactly once still
        router = self.server.router
        if kind == "subj":
            subject = h["subj"]
            check_subject(subject)
            publisher, _ = split_address(src)
            if not self._may(tenant, publisher, "publish", subject):
                self.log.warning("mesh.pub_refused", peer=link.name, agent=publisher, subj=subject)
                what = f"refused a publication on {subject!r}: {publisher!r} may not publish there"
                self._tell_publisher(tenant, publisher, msg_id, subject, what)
                return
            keep = None
            if h.get("keep"):
                why = (
                    router.kept_room(tenant, publisher, subject, len(f.payload))
                    if self._may(tenant, publisher, "keep", subject)
                    else f"{publisher!r} may not keep it"
                )
                if why is None:
                    keep = publisher
                else:  # delivered all the same, as a plain publication
                    what = f"did not keep {subject!r}: {why}"
                    self._tell_publisher(tenant, publisher, msg_id, subject, what)
            router.deliver_pub(tenant, subject, f.payload, keep)
            if ttl > 0:
                self.forward_pub(tenant, subject, f.payload, h, ttl, origin)
        elif kind == "dst":
            agent, _, _ = split_remote(h["dst"])
            sender, home, _ = split_remote(src)
            home = home or tenant
            reason = f"no agent {agent!r} in tenant {tenant!r}"
            if home != tenant:  # across tenants: checked again here, against our own grants
                crossing = router.grants.crossing(home, src, h["dst"])
                if crossing != (tenant, agent):
                    self.log.warning("mesh.cross_refused", peer=link.name, src=src, dst=h["dst"])
                    reason = f"forbidden: {crossing}"
                    agent = ""  # delivered nowhere: the sender hears why
            if agent and router.deliver_msg(tenant, agent, f.payload):
                return
            if agent and ttl > 0 and self.forward_msg(tenant, agent, f.payload, h, ttl, origin):
                return
            noresp = encode_frame(
                FrameType.NORESP, {"id": msg_id, "dst": h["dst"], "reason": reason}
            )  # tell the sender, wherever it is
            if not router.deliver_msg(home, sender, noresp):
                self.forward_msg(home, sender, noresp, {"id": msg_id, "to": sender})
        else:
            to = h["to"]
            check_name(to, "agent name")
            if not router.deliver_msg(tenant, to, f.payload) and ttl > 0:
                self.forward_msg(tenant, to, f.payload, h, ttl, origin)
