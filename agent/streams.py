"""Multiplexed, flow-controlled, bidirectional byte streams between agents: the asyncio shell
around ``atoll.protocol.streams`` (which holds the messages, windows and retransmission).

A writer waits while the reader's window is full, a reader while nothing has arrived; each
stream's messages are sealed and sent by the agent (``send``). Half-close: ``write_eof`` ends one
direction; the other may go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from atoll.agent.errors import (
    AtollError,
    ConnectionLost,
    Forbidden,
    InvalidRequest,
    NoResponder,
    NoSuchMethod,
)
from atoll.agent.grant_checks import granted
from atoll.logs import EventLogger
from atoll.protocol.errors import ProtocolError
from atoll.protocol.session import CallInfo, Peer
from atoll.protocol.streams import (
    CHUNK,
    RETRANSMIT_AFTER,
    WINDOW,
    Change,
    StreamWindows,
    unknown_stream_answer,
)
from atoll.protocol.subjects import peer_name, split_remote
from atoll.tenancy.permissions import may_call, refusal


class StreamReset(AtollError):
    """The other side aborted the stream (or it was refused)."""


StreamHandler = Callable[["Stream", Any, CallInfo], Awaitable[None]]
# Seal ``body`` from ``src`` to ``dst`` for ``peer`` and send it; the message id.
Send = Callable[[Peer, str, str, dict[str, Any]], int]
FindPeer = Callable[[str, float], Awaitable[Peer]]  # an agent's peer, its key fetched if need be


class Stream:
    def __init__(
        self,
        mux: StreamMux,
        peer: Peer,
        local: str,
        remote: str,
        sid: int,
        accepted_side: bool,
        window: int,
    ) -> None:
        loop = asyncio.get_running_loop()
        self.mux = mux
        self.peer = peer
        self.local = local  # our address on this stream
        self.remote = remote  # theirs
        self.sid = sid
        self.key = ("in" if accepted_side else "out", remote, sid)
        self.windows = StreamWindows(sid, accepted_side, window, loop.time())
        self._credit = asyncio.Event()
        self._readable = asyncio.Event()
        self._report_pending = False
        self.error: BaseException | None = None
        self.accepted: asyncio.Future[None] = loop.create_future()

    # --- writing -----------------------------------------------------------------------------

    async def write(self, data: bytes | memoryview) -> None:
        """Send bytes, waiting while the reader's window is full."""
        view = memoryview(data)
        for start in range(0, len(view), CHUNK):
            chunk = bytes(view[start : start + CHUNK])
            while True:
                self._check()
                if self.windows.has_room(len(chunk)):
                    break
                self._credit.clear()
                await self._credit.wait()
            self.windows.write(chunk)
            self._flush()

    async def write_eof(self) -> None:
        """Half-close: no more data from us; reading goes on."""
        self._check()
        self.windows.end()
        self._flush()

    async def drain(self) -> None:
        """Wait until the reader has consumed everything written."""
        while self.windows.consumed < self.windows.sent:
            self._check()
            self._credit.clear()
            await self._credit.wait()

    def abort(self, error: AtollError | None = None) -> None:
        if self.error is None:
            err = error or StreamReset("stream aborted")
            self.windows.reset(err.to_wire())
            self._flush()
            self._fail(err)

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def _send(self, body: dict[str, Any]) -> int:
        return self.mux.send(self.peer, self.local, self.remote, body)

    def _flush(self) -> None:
        """Send what the windows queued; a report asked for goes once, at the end of this turn
        of the event loop."""
        windows = self.windows
        if windows.outbox:
            for body in windows.take():
                self._send(body)
        if windows.report_due and not self._report_pending:
            self._report_pending = True
            asyncio.get_running_loop().call_soon(self._send_report)

    def _send_report(self) -> None:
        self._report_pending = False
        if self.error is not None:  # aborted meanwhile
            return
        body = self.windows.take_report()  # None when it went with our end
        if body is not None:
            # Lost with the connection: the writer sends its unconsumed data again, and a copy
            # we hold already makes us report again.
            with contextlib.suppress(ConnectionLost):
                self._send(body)

    def _maybe_done(self) -> None:
        if self.windows.finished:
            self.mux.streams.pop(self.key, None)

    async def close(self) -> None:
        """Done with this stream: end our side and discard whatever else arrives."""
        if self.error is not None:
            self.mux.streams.pop(self.key, None)
            return
        self._check()
        self.windows.close()
        self._flush()
        self._maybe_done()

    # --- reading -----------------------------------------------------------------------------

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (any available with -1); b"" once the other side has ended."""
        windows = self.windows
        while not windows.chunks:
            if self.error is not None:
                raise self.error
            if windows.at_end:
                self._maybe_done()
                return b""
            self._readable.clear()
            await self._readable.wait()
        chunk = windows.take_chunk(n)
        self._flush()
        self._maybe_done()
        return chunk

    async def read_exactly(self, n: int) -> bytes:
        parts, have = [], 0
        while have < n:
            part = await self.read(n - have)
            if not part:
                raise StreamReset(f"stream ended after {have} of {n} bytes")
            parts.append(part)
            have += len(part)
        return b"".join(parts)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while chunk := await self.read():
            yield chunk

    # --- from the mux ------------------------------------------------------------------------

    def on_message(self, msg: dict[str, Any]) -> None:
        try:
            change = self.windows.receive(msg, asyncio.get_running_loop().time())
        except ProtocolError as exc:
            self.abort(StreamReset(exc.reason))
            return
        self._flush()
        if change & Change.READABLE:
            self._readable.set()
        if change & Change.CREDIT:
            self._credit.set()
        if change & Change.FINISHED:
            self._maybe_done()
        if change & Change.ACCEPTED and not self.accepted.done():
            self.accepted.set_result(None)
        if change & Change.RESET:
            self._fail(AtollError.from_wire(msg.get("e")))

    def tick(self, now: float) -> None:
        if self.windows.gone(now):
            self._fail(NoResponder(f"{self.remote} is gone: its broker no longer has it"))
            return
        self.windows.tick(now)
        self._flush()

    def _fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        if not self.accepted.done():
            self.accepted.set_exception(error)
            self.accepted.exception()
        self._readable.set()
        self._credit.set()
        self.mux.streams.pop(self.key, None)


class StreamMux:
    """An agent's streams: opening, accepting, and dispatching stream messages."""

    def __init__(self, name: str, send: Send, find_peer: FindPeer, log: EventLogger) -> None:
        self.name = name  # the agent's: the default source of a stream it opens
        self.send = send
        self._find_peer = find_peer
        self.log = log
        self.streams: dict[tuple[str, str, int], Stream] = {}
        self.services: dict[tuple[str, str], tuple[StreamHandler, tuple[str, ...]]] = {}
        self.opening: dict[int, Stream] = {}  # by the message id of their open
        # From a random start: a process of the same agent started anew (same name and key)
        # numbers its streams apart from the old one's, which the far side may still hold.
        self._ids = itertools.count(int.from_bytes(os.urandom(4), "big"))
        self._ticker: asyncio.Task[None] | None = None

    def serve(
        self, plugin: str, service: str, handler: StreamHandler, roles: tuple[str, ...]
    ) -> None:
        """Accept streams to ``plugin``'s ``service`` from callers with one of ``roles``
        (``permissions.ANY``: any agent of the tenant); checked before the handler runs."""
        self.services[(plugin, service)] = (handler, tuple(roles))

    def unserve(self, plugin: str) -> None:
        for key in [k for k in self.services if k[0] == plugin]:
            del self.services[key]

    async def open(
        self,
        dst: str,
        service: str,
        params: Any = None,
        src: str | None = None,
        timeout: float = 30.0,
        window: int = WINDOW,
    ) -> Stream:
        """Open a stream to ``service`` at ``dst`` (``agent/plugin``)."""
        peer = await self._find_peer(peer_name(dst), timeout)
        sid = next(self._ids)
        local = src or self.name
        stream = Stream(self, peer, local, dst, sid, False, window)
        self.streams[stream.key] = stream
        self._ensure_ticker()
        msg_id = stream._send(stream.windows.opening(service, params))
        self.opening[msg_id] = stream  # a broker's "no responder" for it fails it at once
        try:
            await asyncio.wait_for(asyncio.shield(stream.accepted), timeout)
        except TimeoutError:
            stream.abort(StreamReset(f"{dst} did not accept {service!r} within {timeout}s"))
            assert stream.error is not None
            raise stream.error from None
        except BaseException:  # refused, or the opener was cancelled: forget the stream
            stream.abort(StreamReset(f"opening {service!r} at {dst} was abandoned"))
            raise
        finally:
            self.opening.pop(msg_id, None)
        return stream

    def on_no_responder(self, msg_id: int, dst: str, reason: str) -> None:
        """The broker could not deliver message ``msg_id`` to ``dst``: if it opened a stream,
        fail it; streams with ``dst`` note it is unreachable (``gone`` if it stays so)."""
        stream = self.opening.pop(msg_id, None)
        if stream is not None:
            stream._fail(NoResponder(reason))
            return
        now = asyncio.get_running_loop().time()
        for stream in self.streams.values():
            if stream.remote == dst:
                stream.windows.undelivered(now)

    def _ensure_ticker(self) -> None:
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.create_task(self._tick())

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while self.streams:
            await asyncio.sleep(RETRANSMIT_AFTER / 2)
            now = loop.time()
            for stream in list(self.streams.values()):
                with contextlib.suppress(ConnectionLost):
                    stream.tick(now)

    def reset_all(self, error: BaseException) -> None:
        for stream in list(self.streams.values()):
            stream._fail(error)

    def on_message(self, src: str, dst: str, peer: Peer, msg: dict[str, Any]) -> None:
        sid = msg.get("s")
        if type(sid) is not int:
            return
        if msg.get("k") == "so":
            self._on_open(src, dst, peer, sid, msg)
            return
        stream = self.streams.get(("out" if msg.get("a") else "in", src, sid))
        if stream is None:
            why = f"{dst} has no stream {sid} from {src}: its agent restarted or ended it"
            answer = unknown_stream_answer(msg, StreamReset(why).to_wire())
            if answer is not None:
                with contextlib.suppress(ConnectionLost):
                    self.send(peer, dst, src, answer)
        elif stream.peer.ident.pub == peer.ident.pub:
            stream.on_message(msg)

    def _on_open(self, src: str, dst: str, peer: Peer, sid: int, msg: dict[str, Any]) -> None:
        _, _, plugin = split_remote(dst)
        service = msg.get("svc")
        window = msg.get("w")
        stream = Stream(self, peer, dst, src, sid, True, WINDOW)
        stream.windows.window_out = window if type(window) is int and window > 0 else CHUNK
        served = None
        if isinstance(service, str):
            served = self.services.get((plugin or "system", service))
        if served is None:
            stream.abort(NoSuchMethod(f"{dst} serves no stream {service!r}"))
            return
        handler, roles = served
        try:
            grant = granted(peer, plugin)
        except Forbidden as exc:
            stream.abort(exc)
            return
        if not may_call(peer.ident.roles, roles):
            stream.abort(Forbidden(refusal(peer.ident, dst, f"stream {service!r}", roles)))
            return
        if stream.key in self.streams:
            stream.abort(InvalidRequest(f"stream {sid} is already open"))
            return
        self.streams[stream.key] = stream
        self._ensure_ticker()
        stream.accepted.set_result(None)
        stream.windows.accept()
        stream._flush()
        call = CallInfo(src, peer.ident, f"stream:{service}", grant)
        task = asyncio.create_task(self._run(handler, stream, msg.get("p"), call))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _run(
        self, handler: StreamHandler, stream: Stream, params: Any, call: CallInfo
    ) -> None:
        try:
            await handler(stream, params, call)
            await stream.close()  # the handler is done with it, whatever it left unread
        except AtollError as exc:
            stream.abort(exc)
        except asyncio.CancelledError:
            stream.abort(StreamReset("the serving agent stopped"))
            raise
        except Exception as exc:
            self.log.error("agent.stream_handler_failed", error=exc, exc_info=True)
            stream.abort(StreamReset(f"{type(exc).__name__}: {exc}"))
