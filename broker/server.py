"""The broker's asyncio/websockets shell around the sans-I/O handshake and router."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import ssl
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from atoll.broker.identity import BrokerKeys, load_broker_keys
from atoll.broker.router import Router, error_frame
from atoll.broker.state import BrokerState
from atoll.logs import EventLogger
from atoll.protocol.errors import AuthError, ProtocolError
from atoll.protocol.frames import DEFAULT_MAX_MESSAGE, decode_message
from atoll.protocol.handshake import ServerHandshake
from atoll.tenancy.credentials import AgentIdentity
from atoll.tenancy.operator import OperatorStore
from atoll.transport import OutQueue

_ids = itertools.count(1)

# websocket close codes: 1008 policy violation, 1013 try again later (slow consumer)
CLOSE_POLICY = 1008
CLOSE_SLOW = 1013


class _Session:
    def __init__(self, ws: ServerConnection, ident: AgentIdentity, server: BrokerServer) -> None:
        self.id = next(_ids)
        self.ws = ws
        self.ident = ident
        self.subs: dict[int, str] = {}
        self.server = server
        self.out = OutQueue(ws, server.max_message, server.queue_limit, self._overflow)
        self.send = self.out.put

    def _overflow(self) -> None:
        self.server.log.warning(
            "broker.slow_consumer", tenant=self.ident.tenant, agent=self.ident.name
        )
        self.server.router.detach(self)
        self.server.spawn(self.ws.close(CLOSE_SLOW, "slow consumer: send queue overflow"))

    def close(self, code: str, reason: str) -> None:
        self.out.put(error_frame(code, reason, fatal=True))

        async def _close() -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.out.drained(), 1.0)
            await self.ws.close(CLOSE_POLICY, reason[:120])

        self.server.spawn(_close())


class BrokerServer:
    def __init__(
        self,
        keys: BrokerKeys,
        state: BrokerState,
        *,
        max_message: int = DEFAULT_MAX_MESSAGE,
        queue_limit: int = 64 * 1024 * 1024,
        handshake_timeout: float = 10.0,
        ping_interval: float = 20.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if queue_limit < 2 * max_message:
            # One inbound batch fans out whole into each subscriber's queue; a limit below that
            # would cut off healthy consumers.
            raise ValueError("queue_limit must be at least twice max_message")
        self.keys = keys
        self.state = state
        self.max_message = max_message
        self.queue_limit = queue_limit
        self.handshake_timeout = handshake_timeout
        self.ping_interval = ping_interval
        self.ssl_context = ssl_context
        self.log = EventLogger("broker", broker=keys.name)
        self.router = Router(state, self.log)
        self._server: Server | None = None
        self._background: set[asyncio.Task] = set()
        self.host = ""
        self.port = 0

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)  # keep a reference until it is done
        task.add_done_callback(self._background.discard)

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

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> BrokerServer:
        self._server = await serve(
            self._handle,
            host,
            port,
            compression=None,
            max_size=self.max_message,
            max_queue=64,
            ping_interval=self.ping_interval,
            ping_timeout=self.ping_interval * 2,
            ssl=self.ssl_context,
        )
        sock = next(iter(self._server.sockets))
        self.host, self.port = sock.getsockname()[:2]
        self.log.info("broker.listening", url=self.url)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handshake(self, ws: ServerConnection) -> AgentIdentity:
        hs = ServerHandshake(
            self.keys.key, self.keys.credential, self.keys.operator_pub, self.max_message
        )
        await ws.send(hs.hello())
        data = await asyncio.wait_for(ws.recv(), self.handshake_timeout)
        frames = decode_message(data, self.max_message)
        if len(frames) != 1:
            raise ProtocolError("AUTH must come alone")
        ident = hs.receive_auth(frames[0])
        self.state.admit(ident)
        await ws.send(hs.welcome())
        return ident

    async def _handle(self, ws: ServerConnection) -> None:
        peer = ws.remote_address
        try:
            ident = await self._handshake(ws)
        except (ProtocolError, TimeoutError) as exc:
            code, reason = (
                (exc.code, exc.reason)
                if isinstance(exc, ProtocolError)
                else ("timeout", "no AUTH in time")
            )
            self.log.warning("broker.auth_refused", peer=peer, code=code, reason=reason)
            try:
                await ws.send(error_frame(code, reason, fatal=True))
                await ws.close(CLOSE_POLICY, reason[:120])
            except ConnectionClosed:
                pass
            return
        except ConnectionClosed:
            return
        session = _Session(ws, ident, self)
        try:
            self.router.attach(session)
        except AuthError as exc:
            await ws.send(error_frame(exc.code, exc.reason, fatal=True))
            await ws.close(CLOSE_POLICY, exc.reason[:120])
            return
        log = self.log.bind(tenant=ident.tenant, agent=ident.name)
        log.info("broker.agent_connected", peer=peer, roles=",".join(ident.roles))
        writer = asyncio.create_task(session.out.run())
        try:
            async for data in ws:
                for frame in decode_message(data, self.max_message):
                    self.router.handle(session, frame)
        except ProtocolError as exc:
            log.warning("broker.frame_refused", code=exc.code, reason=exc.reason)
            session.out.closed = True
            try:
                await ws.send(error_frame(exc.code, exc.reason, fatal=True))
                await ws.close(CLOSE_POLICY, exc.reason[:120])
            except ConnectionClosed:
                pass
        except ConnectionClosed:
            pass
        finally:
            self.router.detach(session)
            session.out.closed = True
            writer.cancel()
            log.info("broker.agent_disconnected")
