"""Deadlines and a connection cap for the gateway's HTTP server.

uvicorn closes a connection that idles between requests (``timeout_keep_alive``) but has no
deadline for a request's head or body: a client that connects and sends nothing, or trickles a
header a byte at a time (slowloris), holds a socket forever. ``guarded_protocol`` wraps
uvicorn's httptools protocol: a request's head must be complete within ``header_timeout`` of the
connection (or of its first byte after a keep-alive wait), its body must make progress at least
every ``body_timeout``, and beyond ``max_connections`` open connections a new one is answered
503 and closed at once while the others are served on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_BUSY_BODY = (
    b'{"error": {"message": "too many open connections; retry later", '
    b'"type": "server_error", "param": null, "code": "busy"}}'
)
BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)
)


@dataclass(frozen=True)
class HttpLimits:
    header_timeout: float
    body_timeout: float
    max_connections: int


class _ReadingFlow(FlowControl):
    """uvicorn's flow control, telling the protocol each time the app asks for body bytes
    (``receive`` resumes reading, after sending any ``100 Continue``)."""

    def __init__(self, transport: asyncio.Transport, on_read: Callable[[], None]) -> None:
        super().__init__(transport)
        self._on_read = on_read

    def resume_reading(self) -> None:
        super().resume_reading()
        self._on_read()


def guarded_protocol(limits: HttpLimits) -> type[HttpToolsProtocol]:
    class Guarded(HttpToolsProtocol):
        _deadline: asyncio.TimerHandle | None = None
        _refused = False
        _in_body = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            if len(self.connections) >= limits.max_connections:
                self._refused = True
                self.transport = transport  # connection_lost closes it
                transport.write(BUSY)
                transport.close()
                return
            super().connection_made(transport)
            self.flow = _ReadingFlow(transport, self._asked_for_body)
            self._arm(limits.header_timeout)  # a silent client is cut after this

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            if self._refused:
                return
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            if self._deadline is None and (self.cycle is None or self.cycle.response_complete):
                # Bytes between requests start the next head's deadline: uvicorn cancels its
                # keep-alive timer on any byte, so a lone CRLF (no message begins) would
                # otherwise hold the connection with no deadline at all.
                self._arm(limits.header_timeout)
            super().data_received(data)

        def _arm(self, seconds: float) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _asked_for_body(self) -> None:
            # The client's clock starts when the server reads: one that waited for ``100
            # Continue`` (or for a paused read) gets a whole deadline from that moment.
            if self._in_body:
                self._arm(limits.body_timeout)

        def _expired(self) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            cycle = self.cycle
            if self.flow.read_paused or (cycle is not None and cycle.waiting_for_100_continue):
                # The server is not reading (the app has yet to ask for the body, or a
                # pipelined request waits): the client cannot progress, so it is not its stall.
                self._arm(limits.body_timeout)
                return
            self.transport.close()

        # The head: from its first byte (or the connection) to its end, one fixed deadline.
        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._deadline is None:
                self._arm(limits.header_timeout)

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()
            # Until the body ends (if there is one); not for a websocket upgrade (uvicorn hands
            # the connection over), but an Upgrade header naming anything else is a request.
            if self.parser is not None and not (
                self.parser.should_upgrade() and self._should_upgrade()
            ):
                self._in_body = True
                self._arm(limits.body_timeout)

        # The body: each piece resets the deadline; the whole request ends it.
        def on_body(self, body: bytes) -> None:
            self._arm(limits.body_timeout)
            super().on_body(body)

        def on_message_complete(self) -> None:
            self._in_body = False
            self._disarm()
            super().on_message_complete()

    return Guarded
