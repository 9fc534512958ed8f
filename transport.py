"""Websocket connections for brokers and agents: websockets' sans-I/O protocol driven straight
from asyncio protocol callbacks (the shape of python-websockets itself, minus its per-message
tasks and queues).

Each received message goes to ``on_message`` synchronously from ``data_received``; frames sent
during one loop iteration are flushed together as one websocket message (as NATS flushes its write
buffer), which is what makes small-message throughput and latency good from Python.

Over 400 lines on purpose: most of it is ``WebSocket``, one connection's lifecycle (admission,
server-side TLS, opening, receiving, batched sending, closing) over shared buffers and timers.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from atoll.protocol.frames import MAX_FRAMES_PER_MESSAGE

CLOSE_NORMAL = 1000
CLOSE_POLICY = 1008  # a frame or credential broke the rules
CLOSE_TRY_LATER = 1013  # slow consumer


# Connections with queued frames, flushed together: at the end of the data_received that queued
# them (a broker routing a batch) or on the next loop iteration (frames sent from tasks).
_dirty: list[WebSocket] = []
# The loop a flush is already due on. A loop, not a flag: a loop closed with a flush still
# scheduled (one per test, say) must not leave the next loop believing one is coming.
_flush_pending: asyncio.AbstractEventLoop | None = None


def flush_pending() -> None:
    global _flush_pending
    _flush_pending = None
    while _dirty:
        _dirty.pop()._flush()


class Admission:
    """A server's rule for connections not yet admitted by the application's own handshake:
    each must be admitted within ``timeout`` of its TCP accept (the websocket upgrade counts
    against it), and at most ``cap`` may wait at once, so half-open sockets cannot pile up."""

    def __init__(self, timeout: float, cap: int) -> None:
        self.timeout = timeout
        self.cap = cap
        self.pending: set[WebSocket] = set()


class WebSocket(asyncio.Protocol):
    """One websocket connection.

    ``send`` never waits: frames queue and go out on the next loop iteration. Past ``limit``
    queued bytes ``on_overflow`` fires (a broker cuts a slow consumer off); producers that can
    wait (an agent publishing) await ``room()`` to stay under ``high_water``.
    """

    def __init__(
        self,
        protocol: ServerProtocol | ClientProtocol,
        *,
        max_message: int,
        limit: int = 1 << 62,
        high_water: int = 4 * 1024 * 1024,
        ping_interval: float | None = 20.0,
        close_timeout: float = 5.0,
    ) -> None:
        self.ws = protocol
        self.max_message = max_message
        self.limit = limit
        self.high_water = high_water
        self._ping_interval = ping_interval
        self._ping_timer: asyncio.TimerHandle | None = None
        self.close_timeout = close_timeout
        self.on_message: Callable[[bytes | str], None] = self._inbox_put
        self.on_open: Callable[[WebSocket], None] | None = None
        self.on_overflow: Callable[[], None] | None = None
        # Server side: the deadline from accept to ``admitted()``; when it passes, ``on_late``
        # (set once the application has the connection) or an abort.
        self.admission: Admission | None = None
        self.on_late: Callable[[], None] | None = None
        self._admit_timer: asyncio.TimerHandle | None = None
        # Server side wss://: TLS is started after the accept (see _start_tls); what arrives
        # decrypted before start_tls hands over the TLS transport waits here (None: EOF).
        self.tls: ssl.SSLContext | None = None
        self.tls_timeout = 60.0
        self._tls_early: list[bytes | None] | None = None
        self._tls_task: asyncio.Task[None] | None = None
        self.transport: asyncio.Transport | None = None
        self.peer: object = None
        self.queued = 0
        self._out: deque[bytes] = deque()
        self._flush_scheduled = False
        self._paused = False
        self._fragments: list[bytes] = []
        self._fragment_text = False
        self._inbox: asyncio.Queue[bytes | str] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[None] = self._loop.create_future()
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self._room = asyncio.Event()
        self._room.set()
        self._last_seen = self._loop.time()
        self._timers: list[asyncio.TimerHandle] = []
        self.open = False  # the websocket is open and we may still send (kept as a plain flag)
        # Called once, at once, when ``open`` turns false (the peer closed, we closed, the
        # socket broke): ``closed`` resolves only a loop turn or a close handshake later.
        self.on_shut: Callable[[], None] | None = None

    # --- state -----------------------------------------------------------------------------------

    @property
    def ping_interval(self) -> float | None:
        """Seconds between keepalive pings; a peer silent for twice this is dropped at the next
        ping (so between 2x and 3x). Setting it reschedules the next ping at once: the new
        interval and the deadline derived from it apply from now on."""
        return self._ping_interval

    @ping_interval.setter
    def ping_interval(self, seconds: float | None) -> None:
        self._ping_interval = seconds
        if self.open:
            # The silence so far counts against the new deadline only from now: a link that was
            # quiet under a longer interval is not dropped for it.
            self._last_seen = self._loop.time()
            self._schedule_ping()

    def _schedule_ping(self) -> None:
        if self._ping_timer is not None:
            self._ping_timer.cancel()
            self._ping_timer = None
        if self._ping_interval:
            self._ping_timer = self._loop.call_later(self._ping_interval, self._keepalive)

    @property
    def close_code(self) -> int | None:
        return self.ws.close_code

    @property
    def close_reason(self) -> str:
        return self.ws.close_reason or ""

    # --- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)  # a stream socket's
        self.transport = transport
        self.peer = transport.get_extra_info("peername")
        admission = self.admission
        if admission is not None:
            if len(admission.pending) >= admission.cap:
                self.admission = None  # never counted
                transport.abort()
                return
            admission.pending.add(self)
            self._admit_timer = self._loop.call_later(admission.timeout, self._late)
        if self.tls is not None:
            # Paused until start_tls has put its SSL protocol in front of this one.
            transport.pause_reading()
            self._tls_early = []
            self._tls_task = self._loop.create_task(self._start_tls(transport, self.tls))
            return
        if isinstance(self.ws, ClientProtocol):  # the client opens the websocket handshake
            self.ws.send_request(self.ws.connect())
            self._write_protocol_data()

    async def _start_tls(self, raw: asyncio.Transport, context: ssl.SSLContext) -> None:
        """The TLS handshake of an accepted connection, inside its admission deadline: the
        deadline's abort (or the peer going) ends it. asyncio's own ``create_server(ssl=)``
        would show the connection only after the handshake, uncounted and uncapped."""
        tls: asyncio.Transport | None = None
        error: Exception | None = None
        try:
            tls = await self._loop.start_tls(
                raw,
                self,
                context,
                server_side=True,
                ssl_handshake_timeout=self.tls_timeout,
            )
        except Exception as exc:  # a failed handshake; asyncio has closed the socket
            error = exc
        if tls is None:  # failed, or the socket closed mid-handshake (start_tls gives None)
            raw.abort()
            self.connection_lost(error)  # asyncio may not call it: never "connected"
            return
        self.transport = tls
        early, self._tls_early = self._tls_early or [], None
        if self.closed.done():
            return
        for data in early:
            if data is None:
                self.eof_received()
            else:
                self.data_received(data)

    def data_received(self, data: bytes) -> None:
        if self._tls_early is not None:
            # Decrypted data right behind the TLS handshake, before start_tls has returned.
            self._tls_early.append(data)
            return
        global _flush_pending
        _flush_pending = self._loop  # what handling this data queues goes out at the end
        try:
            self._receive(data)
        finally:
            flush_pending()  # everything queued meanwhile, on any connection (broker routing)

    def _receive(self, data: bytes) -> None:
        self._last_seen = self._loop.time()
        self.ws.receive_data(data)
        if self.open and self.ws.state is not State.OPEN:  # the peer started closing
            self._shut()
        events = self.ws.events_received()
        self._write_protocol_data()
        for event in events:
            if self.closed.done():
                break
            if isinstance(event, Frame):
                self._frame(event)
            elif isinstance(event, Request) and isinstance(self.ws, ServerProtocol):
                self._accept(self.ws, event)
            elif isinstance(event, Response):
                self._opened(self.ws.handshake_exc)
        if self.ws.close_expected():
            self._close_soon()

    def eof_received(self) -> bool | None:
        if self._tls_early is not None:
            self._tls_early.append(None)
            return None
        # Nothing may be sent from here on: connection_lost comes a loop iteration later, and a
        # broker routing to this peer meanwhile must not raise inside another connection.
        self._shut()
        self.ws.receive_eof()
        self._write_protocol_data()
        return None

    def admitted(self) -> None:
        """The application's handshake is done: no deadline, and no longer counted as waiting."""
        if self._admit_timer is not None:
            self._admit_timer.cancel()
            self._admit_timer = None
        if self.admission is not None:
            self.admission.pending.discard(self)
            self.admission = None

    def _late(self) -> None:
        # Still counted as waiting until the connection is gone (connection_lost): a close
        # that the peer does not answer holds the socket for up to close_timeout more.
        self._admit_timer = None
        if self.on_late is not None:
            self.on_late()
        elif self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed.done():  # a TLS handshake that failed reports its loss twice
            return
        self.admitted()
        self._shut()
        self.ws.receive_eof()
        if self._ping_timer is not None:
            self._ping_timer.cancel()
            self._ping_timer = None
        for timer in self._timers:
            timer.cancel()
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"connection closed during opening: {exc}"))
            self.opened.exception()  # retrieved here: the opener may already have given up
        self._out.clear()
        self.queued = 0
        self._room.set()
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._out:
            self._flush()

    # --- opening ---------------------------------------------------------------------------------

    def _accept(self, server: ServerProtocol, request: Request) -> None:
        response = server.accept(request)
        server.send_response(response)
        self._write_protocol_data()
        if response.status_code == 101:
            self._opened(None)
        else:
            self._close_soon()

    def _opened(self, exc: Exception | None) -> None:
        if self.opened.done():
            return
        if exc is not None:
            self.opened.set_exception(exc)
            self._close_soon()
            return
        self.opened.set_result(None)
        self.open = True
        self._schedule_ping()
        if self.on_open is not None:
            self.on_open(self)

    def _keepalive(self) -> None:
        self._ping_timer = None
        if not self.open or not self._ping_interval:
            return
        if self._loop.time() - self._last_seen > 2 * self._ping_interval:
            self.fail(1011, "keepalive: peer silent")
            return
        self.ws.send_ping(os.urandom(4))
        self._write_protocol_data()
        self._schedule_ping()

    # --- receiving -------------------------------------------------------------------------------

    def _frame(self, frame: Frame) -> None:
        op = frame.opcode
        if op is Opcode.BINARY or op is Opcode.TEXT:
            # Received frames hold bytes (BytesLike is the sending side's type): no copy here.
            data = bytes(frame.data)
            if frame.fin:
                self.on_message(data.decode("utf-8", "replace") if op is Opcode.TEXT else data)
                return
            self._fragments = [data]
            self._fragment_text = op is Opcode.TEXT
        elif op is Opcode.CONT:
            self._fragments.append(bytes(frame.data))
            if frame.fin:
                data = b"".join(self._fragments)
                self._fragments = []
                self.on_message(data.decode("utf-8", "replace") if self._fragment_text else data)

    def _inbox_put(self, message: bytes | str) -> None:
        self._inbox.put_nowait(message)

    def deliver_to(self, on_message: Callable[[bytes | str], None]) -> None:
        """Hand messages to ``on_message`` from now on, starting with any ``recv`` left unread."""
        self.on_message = on_message
        while not self._inbox.empty():
            on_message(self._inbox.get_nowait())

    async def recv(self, timeout: float) -> bytes | str:
        """The next message, for the handshake phase (before ``on_message`` is replaced)."""
        getter = asyncio.ensure_future(self._inbox.get())
        waiting: set[asyncio.Future[Any]] = {getter, self.closed}
        done, _ = await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            return getter.result()
        getter.cancel()
        if self.closed.done():
            raise ConnectionError(f"connection closed: {self.close_reason or 'no reason'}")
        raise TimeoutError(f"no message within {timeout}s")

    # --- sending ---------------------------------------------------------------------------------

    def send(self, data: bytes, urgent: bool = False) -> None:
        """Queue a frame. ``urgent`` (RPC traffic) writes at once when nothing is queued ahead:
        it saves a loop iteration of latency; streams of publications keep batching."""
        if not self.open:
            return
        if urgent and not self._out and not self._paused:
            self.ws.send_binary(data)
            self._write_protocol_data()
            return
        self._out.append(data)
        self.queued += len(data)
        if self.queued > self.high_water:
            self._room.clear()
        if self.queued > self.limit:
            self._out.clear()
            self.queued = 0
            if self.on_overflow is not None:
                self.on_overflow()
            return
        if not self._flush_scheduled:
            self._flush_scheduled = True
            _dirty.append(self)
            global _flush_pending
            if _flush_pending is not self._loop:
                _flush_pending = self._loop
                self._loop.call_soon(flush_pending)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out = self._out
        while out and not self._paused and self.open:
            batch = [out.popleft()]
            size = len(batch[0])
            while (
                out
                and len(batch) < MAX_FRAMES_PER_MESSAGE
                and size + len(out[0]) <= self.max_message
            ):
                data = out.popleft()
                batch.append(data)
                size += len(data)
            self.queued -= size
            self.ws.send_binary(b"".join(batch) if len(batch) > 1 else batch[0])
            self._write_protocol_data()
        if self.queued <= self.high_water:
            self._room.set()

    def _write_protocol_data(self) -> None:
        transport = self.transport
        if transport is None:
            return
        for data in self.ws.data_to_send():
            if data:
                transport.write(data)
            elif transport.can_write_eof():
                transport.write_eof()
            else:
                transport.close()

    async def room(self) -> None:
        if not self._room.is_set():
            await self._room.wait()

    # --- closing ---------------------------------------------------------------------------------

    def _shut(self) -> None:
        """No more sending: tell ``on_shut`` the first time."""
        was_open, self.open = self.open, False
        if was_open and self.on_shut is not None:
            self.on_shut()

    def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        """Send what is queued, then the close frame; drop the TCP connection if the peer lags."""
        if self.ws.state is State.OPEN:
            self._flush()
            self.ws.send_close(code, reason[:120])
            self._write_protocol_data()
        self._shut()
        self._close_soon()

    def fail(self, code: int, reason: str) -> None:
        """Give up on the peer (silent, or too slow): say why if possible, then drop it now."""
        self._shut()
        self._out.clear()
        self.ws.fail(code, reason[:120])
        self._write_protocol_data()
        self.abort()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _close_soon(self) -> None:
        self._timers.append(self._loop.call_later(self.close_timeout, self.abort))

    async def wait_closed(self) -> None:
        await asyncio.shield(self.closed)


async def serve(
    on_open: Callable[[WebSocket], None],
    host: str,
    port: int,
    *,
    max_message: int,
    limit: int,
    ping_interval: float | None,
    ssl_context: ssl.SSLContext | None = None,
    admission: Admission | None = None,
) -> asyncio.Server:
    """Listen for websocket connections; ``on_open`` gets each one once its handshake is done.
    With ``admission``, each must call ``admitted()`` in time (see Admission), counted from the
    TCP accept: the TLS handshake (``ssl_context``) and the websocket upgrade are inside it."""
    loop = asyncio.get_running_loop()

    def factory() -> WebSocket:
        # No extensions offered or accepted: compression stays off.
        ws = WebSocket(
            ServerProtocol(max_size=max_message),
            max_message=max_message,
            limit=limit,
            ping_interval=ping_interval,
        )
        ws.on_open = on_open
        ws.admission = admission
        # TLS is started by the connection itself, after admission has counted it at accept.
        ws.tls = ssl_context
        if admission is not None:
            ws.tls_timeout = admission.timeout
        return ws

    return await loop.create_server(factory, host, port)


async def connect(
    url: str,
    *,
    max_message: int,
    ping_interval: float | None,
    open_timeout: float,
    ssl_context: ssl.SSLContext | None = None,
) -> WebSocket:
    uri = parse_uri(url)
    protocol = ClientProtocol(uri, max_size=max_message)
    ws = WebSocket(protocol, max_message=max_message, ping_interval=ping_interval)
    tls = (ssl_context or client_tls()) if uri.secure else None
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(open_timeout):
        await loop.create_connection(
            lambda: ws, uri.host, uri.port, ssl=tls, server_hostname=uri.host if tls else None
        )
        try:
            await ws.opened
        except BaseException:
            ws.abort()
            raise
    return ws


def server_tls(cert: Path, key: Path) -> ssl.SSLContext:
    """TLS for a broker's wss:// listener."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


def client_tls(ca_file: Path | None = None) -> ssl.SSLContext:
    """TLS for wss:// broker URLs: system trust store, or a private CA bundle."""
    return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
