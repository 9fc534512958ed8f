"""The broker's asyncio shell around the sans-I/O handshake and router.

Everything runs in protocol callbacks: a frame is decoded, authenticated or routed, and its
copies queued on the receivers' connections without a task switch.
"""

from __future__ import annotations

import asyncio
import itertools
import ssl
from pathlib import Path

from atoll.broker.advertise import Advertiser
from atoll.broker.identity import BrokerKeys, load_broker_keys
from atoll.broker.peering import Mesh
from atoll.broker.router import Router, error_frame
from atoll.broker.state import BrokerState
from atoll.logs import EventLogger
from atoll.protocol.errors import AuthError, ProtocolError
from atoll.protocol.frames import DEFAULT_MAX_MESSAGE, decode_message
from atoll.protocol.handshake import ServerHandshake
from atoll.tenancy.credentials import AgentIdentity, BrokerIdentity
from atoll.tenancy.operator import OperatorStore
from atoll.transport import CLOSE_POLICY, CLOSE_TRY_LATER, Admission, WebSocket, serve

_ids = itertools.count(1)


class _Session:
    """One agent connection, from HELLO to close."""

    def __init__(self, ws: WebSocket, server: BrokerServer) -> None:
        self.id = next(_ids)
        self.ws = ws
        self.server = server
        self.ident: AgentIdentity | None = None
        self.subs: dict[int, str] = {}
        self.send = ws.send
        self.log = server.log
        self._hs = ServerHandshake(
            server.keys.key, server.keys.credential, server.keys.operator_pub, server.max_message
        )
        ws.on_message = self._on_auth
        ws.on_overflow = self._overflow
        ws.send(self._hs.hello())
        ws.on_late = self._auth_timeout  # the deadline runs from TCP accept (transport.Admission)
        ws.closed.add_done_callback(self._closed)

    def _refuse(self, code: str, reason: str) -> None:
        self.send(error_frame(code, reason, fatal=True))
        self.ws.close(CLOSE_POLICY, reason)

    def _auth_timeout(self) -> None:
        self.log.warning("broker.auth_refused", peer=self.ws.peer, code="timeout")
        self._refuse("timeout", "no AUTH in time")

    def _on_auth(self, data: bytes | str) -> None:
        self.ws.on_message = self._ignore
        try:
            frames = decode_message(data, self.server.max_message)
            if len(frames) != 1:
                raise ProtocolError("AUTH must come alone")
            ident = self._hs.receive_auth(frames[0])
            if isinstance(ident, BrokerIdentity):  # a peer broker linking into the mesh
                if ident.name == self.server.keys.name:
                    raise AuthError("a broker cannot peer with itself")
                self.ws.admitted()
                self.ws.send(self._hs.welcome(), urgent=True)  # alone: adverts follow at once
                self.server.mesh.attach(self.ws, ident.name, dialled=False)
                return
            self.ident = ident
            self.server.router.attach(self)  # admits: revocations, name bindings, tokens
            self.ws.admitted()
        except ProtocolError as exc:
            self.log.warning(
                "broker.auth_refused", peer=self.ws.peer, code=exc.code, reason=exc.reason
            )
            self._refuse(exc.code, exc.reason)
            return
        self.send(self._hs.welcome(), True)  # its own message: the handshake reads it alone
        self.log = self.server.log.bind(tenant=ident.tenant, agent=ident.name)
        self.log.info("broker.agent_connected", peer=self.ws.peer, roles=",".join(ident.roles))
        self.ws.on_message = self._on_message

    def _ignore(self, data: bytes | str) -> None:
        """After a refusal, while the close completes."""

    def _on_message(self, data: bytes | str) -> None:
        try:
            for frame in decode_message(data, self.server.max_message):
                self.server.router.handle(self, frame)
        except ProtocolError as exc:
            self.log.warning("broker.frame_refused", code=exc.code, reason=exc.reason)
            self.server.router.detach(self)
            self.ws.on_message = self._ignore
            self._refuse(exc.code, exc.reason)

    def _overflow(self) -> None:
        self.log.warning("broker.slow_consumer")
        self.server.router.detach(self)
        self.ws.on_message = self._ignore
        self.ws.fail(CLOSE_TRY_LATER, "slow consumer: send queue overflow")

    def close(self, code: str, reason: str) -> None:
        """Called by the router: tell the agent why, then close."""
        self.ws.on_message = self._ignore
        self._refuse(code, reason)

    def _closed(self, _: asyncio.Future) -> None:
        if self.ident is not None:
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
        self.router = Router(state, self.log)
        self.peer_ssl = peer_ssl  # for wss:// peers with a private CA
        self.mesh = Mesh(self, peers or [], refresh=mesh_refresh)
        self.router.mesh = self.mesh
        self.advertise = advertise  # on the LAN over mDNS (zeroconf)
        self._advertiser: Advertiser | None = None
        self._server: asyncio.Server | None = None
        self._sessions: set[_Session] = set()
        self.host = ""
        self.port = 0

    @classmethod
    def from_data_dir(cls, data_dir: Path, **kw) -> BrokerServer:
        keys = load_broker_keys(data_dir)
        state = BrokerState(Path(data_dir) / "broker" / "state.sqlite", keys.operator_pub)
        op = OperatorStore(data_dir)
        for blob in op.revocations():  # an operator's own dir: honour what it revoked offline
            state.add_revocation(blob)
        return cls(keys, state, **kw)

    @property
    def url(self) -> str:
        scheme = "wss" if self.ssl_context else "ws"
        return f"{scheme}://{self.host}:{self.port}"

    def _open(self, ws: WebSocket) -> None:
        session = _Session(ws, self)
        self._sessions.add(session)
        ws.closed.add_done_callback(lambda _: self._sessions.discard(session))

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
        if self._advertiser is not None:
            await self._advertiser.stop()
            self._advertiser = None
        await self.mesh.stop()
        sessions = list(self._sessions)
        for s in sessions:
            s.ws.close(1001, "broker shutting down")
        if sessions:
            await asyncio.wait([s.ws.closed for s in sessions], timeout=2)
        for s in sessions:
            s.ws.abort()
        for ws in list(self.admission.pending):  # still on the way in: TLS, upgrade or AUTH
            ws.abort()
        await self._server.wait_closed()
        self._server = None
