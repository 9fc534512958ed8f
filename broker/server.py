"""The broker's asyncio shell around the sans-I/O handshake and router.

Everything runs in protocol callbacks: a frame is decoded, authenticated or routed, and its
copies queued on the receivers' connections without a task switch.
"""

from __future__ import annotations

import asyncio
import itertools
import ssl
from pathlib import Path
from typing import Any

from atoll.broker.advertise import Advertiser
from atoll.broker.identity import BrokerKeys, load_broker_keys
from atoll.broker.peering import PeerMesh
from atoll.broker.router import Router, error_frame
from atoll.broker.state import BrokerState
from atoll.logs import EventLogger
from atoll.protocol.errors import AuthError, ProtocolError
from atoll.protocol.frames import DEFAULT_MAX_MESSAGE, decode_message
from atoll.protocol.handshake import ServerHandshake
from atoll.protocol.trust import AgentIdentity, BrokerIdentity, now_ms
from atoll.tenancy.operator import OperatorStore
from atoll.transport import CLOSE_POLICY, CLOSE_TRY_LATER, Admission, WebSocket, serve

_ids = itertools.count(1)


def _refuse(ws: WebSocket, code: str, reason: str) -> None:
    """Tell the peer why in a fatal ERROR frame, then close."""
    ws.send(error_frame(code, reason, fatal=True))
    ws.close(CLOSE_POLICY, reason)


def _ignore(data: bytes | str) -> None:
    """After a refusal, while the close completes."""


class _Handshake:
    """One connection from accept to AUTH accepted: an agent's becomes a ``_Session``, a peer
    broker's a mesh link."""

    def __init__(self, ws: WebSocket, server: BrokerServer) -> None:
        self.ws = ws
        self.server = server
        self._hs = ServerHandshake(
            server.keys.key, server.keys.credential, server.keys.operator_pub, server.max_message
        )
        ws.on_message = self._on_auth
        ws.on_overflow = self._overflow
        ws.send(self._hs.hello())
        ws.on_late = self._auth_timeout  # the deadline runs from TCP accept (transport.Admission)

    def _auth_timeout(self) -> None:
        self.server.log.warning("broker.auth_refused", peer=self.ws.peer, code="timeout")
        _refuse(self.ws, "timeout", "no AUTH in time")

    def _overflow(self) -> None:
        self.ws.fail(CLOSE_TRY_LATER, "slow consumer: send queue overflow")

    def _on_auth(self, data: bytes | str) -> None:
        ws, server = self.ws, self.server
        ws.on_message = _ignore
        try:
            frames = decode_message(data, server.max_message)
            if len(frames) != 1:
                raise ProtocolError("AUTH must come alone")
            ident = self._hs.receive_auth(frames[0])
            if isinstance(ident, BrokerIdentity):  # a peer broker linking into the mesh
                if ident.name == server.keys.name:
                    raise AuthError("a broker cannot peer with itself")
                ws.admitted()
                ws.send(self._hs.welcome(), urgent=True)  # alone: adverts follow at once
                server.mesh.attach(ws, ident.name, dialled=False)
                return
            session = _Session(ws, server, ident)
            server.router.attach(session)  # admits: revocations, name bindings, tokens
            ws.admitted()
        except ProtocolError as exc:
            server.log.warning(
                "broker.auth_refused", peer=ws.peer, code=exc.code, reason=exc.reason
            )
            _refuse(ws, exc.code, exc.reason)
            who = self._hs.verified
            if who is not None:  # a real agent or broker: its tenant's admins learn why
                tenant, kind = (
                    (who.tenant, "agent")
                    if isinstance(who, AgentIdentity)
                    else (
                        None,
                        "broker",
                    )
                )
                server.router.refused(tenant, kind, who.name, exc.code, exc.reason, now_ms())
            return
        session.start(self._hs.welcome())


class _Session:
    """One authenticated agent connection, as the router routes to it (``router.Session``)."""

    def __init__(self, ws: WebSocket, server: BrokerServer, ident: AgentIdentity) -> None:
        self.id = next(_ids)
        self.ws = ws
        self.server = server
        self.ident = ident
        self.subs: dict[int, str] = {}
        self.send = ws.send
        self.log = server.log.bind(tenant=ident.tenant, agent=ident.name)

    def start(self, welcome: bytes) -> None:
        """Admitted by the router: welcome the agent and route what it sends."""
        ws = self.ws
        ws.on_overflow = self._overflow
        ws.closed.add_done_callback(self._closed)
        self.send(welcome, True)  # its own message: the handshake reads it alone
        self.log.info("broker.agent_connected", peer=ws.peer, roles=",".join(self.ident.roles))
        ws.on_message = self._on_message

    def _on_message(self, data: bytes | str) -> None:
        try:
            for frame in decode_message(data, self.server.max_message):
                self.server.router.handle(self, frame)
        except ProtocolError as exc:
            self.log.warning("broker.frame_refused", code=exc.code, reason=exc.reason)
            self.server.router.detach(self)
            self.ws.on_message = _ignore
            _refuse(self.ws, exc.code, exc.reason)

    def _overflow(self) -> None:
        self.log.warning("broker.slow_consumer")
        self.server.router.detach(self)
        self.ws.on_message = _ignore
        self.ws.fail(CLOSE_TRY_LATER, "slow consumer: send queue overflow")

    def close(self, code: str, reason: str) -> None:
        """Called by the router: tell the agent why, then close."""
        self.ws.on_message = _ignore
        _refuse(self.ws, code, reason)

    def _closed(self, _: asyncio.Future[None]) -> None:
        self.server.router.detach(self)
        self.log.info("broker.agent_disconnected", reason=self.ws.close_reason or "eof")


class BrokerServer:
    def __init__(
        self,
        keys: BrokerKeys,
        state: BrokerState,
        *,
        max_message: int = DEFAULT_MAX_MESSAGE,
        queue_limit: int = 64 * 1024 * 1024,
        handshake_timeout: float = 10.0,
        max_unauthenticated: int = 1024,
        ping_interval: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
        peers: list[str] | None = None,
        peer_ssl: ssl.SSLContext | None = None,
        mesh_refresh: float = 2.0,
        advertise: bool = False,
        kept_ttl: float = 600.0,
    ) -> None:
        if queue_limit < 2 * max_message:
            # One inbound batch fans out whole into each subscriber's queue; a limit below that
            # would cut off healthy consumers.
            raise ValueError("queue_limit must be at least twice max_message")
        self.keys = keys
        self.state = state
        self.max_message = max_message
        self.queue_limit = queue_limit
        # From TCP accept to AUTH accepted, the websocket upgrade included; at most this many
        # connections may be on the way at once (half-open sockets cannot exhaust the broker).
        self.admission = Admission(handshake_timeout, max_unauthenticated)
        self.ping_interval = ping_interval
        self.ssl_context = ssl_context
        self.log = EventLogger("broker", broker=keys.name)
        self.router = Router(state, self.log, keys.name)
        self.peer_ssl = peer_ssl  # for wss:// peers with a private CA
        self.mesh = PeerMesh(self, peers or [], refresh=mesh_refresh)
        self.router.mesh = self.mesh
        self.advertise = advertise  # on the LAN over mDNS (zeroconf)
        # How long what an agent kept (announcement, metrics) outlives the agent's last link.
        self.kept_ttl = kept_ttl
        self._sweeper: asyncio.Task[None] | None = None
        self._advertiser: Advertiser | None = None
        self._server: asyncio.Server | None = None
        self._conns: set[WebSocket] = set()  # open connections, agents' and peers'
        self.host = ""
        self.port = 0

    @classmethod
    def from_data_dir(cls, data_dir: Path, **kw: Any) -> BrokerServer:
        keys = load_broker_keys(data_dir)
        state = BrokerState(Path(data_dir) / "broker" / "state.sqlite", keys.operator_pub)
        op = OperatorStore(data_dir)
        for blob in op.revocations():  # an operator's own dir: honour what it revoked offline
            state.add_revocation(blob)
        for blob in op.grant_records():  # its grants too (the router verifies them at start)
            state.keep_grant_record(blob)
        return cls(keys, state, **kw)

    @property
    def url(self) -> str:
        scheme = "wss" if self.ssl_context else "ws"
        return f"{scheme}://{self.host}:{self.port}"

    def _open(self, ws: WebSocket) -> None:
        _Handshake(ws, self)
        self._conns.add(ws)
        ws.closed.add_done_callback(lambda _: self._conns.discard(ws))

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> BrokerServer:
        self._server = await serve(
            self._open,
            host,
            port,
            max_message=self.max_message,
            limit=self.queue_limit,
            ping_interval=self.ping_interval,
            ssl_context=self.ssl_context,
            admission=self.admission,
        )
        sock = self._server.sockets[0]
        self.host, self.port = sock.getsockname()[:2]
        self.mesh.start()
        self._sweeper = asyncio.create_task(self._sweep_kept())
        if self.advertise:
            scheme = "wss" if self.ssl_context else "ws"
            self._advertiser = Advertiser(self.keys.name, scheme, host, self.port)
            await self._advertiser.start()
        self.log.info("broker.listening", url=self.url)
        return self

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._advertiser is not None:
            await self._advertiser.stop()
            self._advertiser = None
        await self.mesh.stop()
        conns = list(self._conns)
        for ws in conns:
            ws.close(1001, "broker shutting down")
        if conns:
            await asyncio.wait([ws.closed for ws in conns], timeout=2)
        for ws in conns:
            ws.abort()
        for ws in list(self.admission.pending):  # still on the way in: TLS, upgrade or AUTH
            ws.abort()
        await self._server.wait_closed()
        self._server = None

    async def _sweep_kept(self) -> None:
        """Expire what departed agents kept, checking a few times per ``kept_ttl``."""
        ttl_ms = int(self.kept_ttl * 1000)
        while True:
            await asyncio.sleep(min(self.kept_ttl / 4, 30.0))
            self.router.expire_kept(now_ms(), ttl_ms)
