"""Multiplexed, flow-controlled, bidirectional byte streams between agents.

Stream messages ride sealed direct messages (so they are end-to-end encrypted like RPC), each
naming its stream and byte offset:

    so  open     {s, svc, p: params, w: window}      sk  accepted  {s, w}
    sd  data     {s, o: offset, d: bytes}            se  end       {s, o: final offset}
    sa  report   {s, n: bytes read, r: bytes received in order, e: end received}
    sn  resend   {s, o: from offset}                 sr  reset     {s, e: [type, message, data]}

Messages from the accepting side carry ``a: 1`` (both sides number their own streams).

Flow control is per stream: a writer keeps at most the reader's window unconsumed, so a slow
reader stalls its own stream and nothing else on the connection. Writers keep unconsumed data
until the reader has it, so a chunk a broker drops or corrupts (and the receiver therefore
refuses) is noticed as a gap at the next offset — or by a retransmission timer at the tail — and
sent again. Half-close: ``write_eof`` ends one direction; the other may go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from atoll.agent.errors import (
    AtollError,
    ConnectionLost,
    Forbidden,
    InvalidRequest,
    NoResponder,
    NoSuchMethod,
)
from atoll.tenancy.permissions import may_call, refusal

if TYPE_CHECKING:
    from atoll.agent.node import Agent, CallInfo, _Peer

WINDOW = 4 * 1024 * 1024
CHUNK = 1024 * 1024
RETRANSMIT_AFTER = 1.0  # seconds without progress on unconsumed data: send it again


class StreamReset(AtollError):
    """The other side aborted the stream (or it was refused)."""


StreamHandler = Callable[["Stream", Any, "CallInfo"], Awaitable[None]]


class Stream:
    def __init__(
        self,
        mux: StreamMux,
        peer: _Peer,
        local: str,
        remote: str,
        sid: int,
        accepted_side: bool,
        window: int,
    ) -> None:
        self.mux = mux
        self.peer = peer
        self.local = local  # our address on this stream
        self.remote = remote  # theirs
        self.sid = sid
        self.accepted_side = accepted_side
        self.key = ("in" if accepted_side else "out", remote, sid)
        self.window_in = window  # what we let the other side send ahead of our reads
        self.window_out = 0  # what they let us send ahead; set when the stream is accepted
        # outbound
        self._sent = 0
        self._consumed = 0  # by the remote reader
        self._received = 0  # in order by the remote side (it may not have read it yet)
        self._eof_delivered = False
        self._unacked: deque[tuple[int, bytes]] = deque()
        self._credit = asyncio.Event()
        self._eof_sent = False
        self._progress_at = asyncio.get_running_loop().time()
        # inbound
        self._expected = 0
        self._chunks: deque[bytes] = deque()
        self._read = 0
        self._granted = 0
        self._eof_at: int | None = None
        self._nacked_at = -1
        self._reported = 0
        self._report_due = False
        self._closed = False
        self._readable = asyncio.Event()
        self.error: BaseException | None = None
        self.accepted: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # --- writing -----------------------------------------------------------------------------

    async def write(self, data: bytes | memoryview) -> None:
        """Send bytes, waiting while the reader's window is full."""
        view = memoryview(data)
        for start in range(0, len(view), CHUNK):
            chunk = bytes(view[start : start + CHUNK])
            while True:
                self._check()
                if self._sent - self._consumed + len(chunk) <= max(self.window_out, CHUNK):
                    break
                self._credit.clear()
                await self._credit.wait()
            self._unacked.append((self._sent, chunk))
            self._send({"k": "sd", "s": self.sid, "o": self._sent, "d": chunk})
            self._sent += len(chunk)

    async def write_eof(self) -> None:
        """Half-close: no more data from us; reading goes on."""
        self._check()
        if not self._eof_sent:
            self._eof_sent = True
            self._send({"k": "se", "s": self.sid, "o": self._sent})

    async def drain(self) -> None:
        """Wait until the reader has consumed everything written."""
        while self._consumed < self._sent:
            self._check()
            self._credit.clear()
            await self._credit.wait()

    def abort(self, error: AtollError | None = None) -> None:
        if self.error is None:
            err = error or StreamReset("stream aborted")
            self._send({"k": "sr", "s": self.sid, "e": err.to_wire()})
            self._fail(err)

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def _send(self, body: dict[str, Any]) -> int:
        if self.accepted_side:
            body["a"] = 1
        return self.mux.agent._send_sealed(self.peer, self.local, self.remote, body)

    def _report(self) -> None:
        """Tell the writer what we hold and have read: once per turn of the event loop, however
        often asked in it (the last data, its EOF, the final read and a close come together:
        one message, not four, each sealed and relayed)."""
        self._reported = self._expected
        if not self._report_due:
            self._report_due = True
            asyncio.get_running_loop().call_soon(self._send_report)

    def _send_report(self) -> None:
        if not self._report_due or self.error is not None:  # sent with our EOF, or aborted
            return
        self._report_due = False
        # Lost with the connection: the writer sends its unconsumed data again, and a copy we
        # hold already makes us report again (on_data).
        with contextlib.suppress(ConnectionLost):
            self._send({"k": "sa", "s": self.sid, **self._report_fields()})

    def _report_fields(self) -> dict[str, Any]:
        eof = self._eof_at is not None and self._expected >= self._eof_at
        return {"n": self._read, "r": self._expected, "e": eof}

    def _maybe_done(self) -> None:
        """Both directions ended and all data consumed: the stream is finished."""
        if (
            self._eof_sent
            and self._eof_delivered
            and self._consumed >= self._sent
            and self._eof_at is not None
            and (self._closed or self._read >= self._eof_at)
        ):
            self.mux.streams.pop(self.key, None)

    async def close(self) -> None:
        """Done with this stream: end our side and discard whatever else arrives."""
        if self.error is not None:
            self.mux.streams.pop(self.key, None)
            return
        self._check()
        self._closed = True
        self._read = self._expected
        self._chunks.clear()
        self._reported = self._expected
        if self._eof_sent:
            self._report()
        else:  # our EOF carries our last report (and stands for one still due)
            self._eof_sent = True
            self._report_due = False
            self._send({"k": "se", "s": self.sid, "o": self._sent, **self._report_fields()})
        self._maybe_done()

    # --- reading -----------------------------------------------------------------------------

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (any available with -1); b"" once the other side has ended."""
        while not self._chunks:
            if self.error is not None:
                raise self.error
            if self._eof_at is not None and self._expected >= self._eof_at:
                self._maybe_done()
                return b""
            self._readable.clear()
            await self._readable.wait()
        chunk = self._chunks.popleft()
        if 0 <= n < len(chunk):
            self._chunks.appendleft(chunk[n:])
            chunk = chunk[:n]
        self._read += len(chunk)
        ended = self._eof_at is not None and self._read >= self._eof_at
        if self._read - self._granted >= self.window_in // 4 or ended:
            # Credit in batches (a writer is only ever blocked with a quarter window unreported
            # or more), and at the end so the writer learns everything was read.
            self._granted = self._read
            self._report()
        if ended:
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

    async def __aiter__(self):
        while chunk := await self.read():
            yield chunk

    # --- from the mux ------------------------------------------------------------------------

    def on_data(self, offset: int, data: bytes) -> None:
        if self._closed:  # nobody will read it: count it as read
            if offset == self._expected:
                self._expected += len(data)
                self._read = self._expected
                self._report()
            return
        if offset == self._expected:
            if self._expected + len(data) - self._read > self.window_in + CHUNK:
                self.abort(StreamReset("peer overran the stream window"))
                return
            self._chunks.append(data)
            self._expected += len(data)
            self._readable.set()
            if self._expected - self._reported >= self.window_in // 4:
                self._report()
        elif offset > self._expected:
            self._gap()
        else:  # a copy of something we have: the writer has not heard; tell it
            self._report()

    def on_eof(self, offset: int) -> None:
        self._eof_at = offset
        if self._expected < offset:
            self._gap()
        elif not self._chunks:  # else the read that reaches the end reports, once for both
            self._report()
        self._readable.set()
        self._maybe_done()

    def _gap(self) -> None:
        """Data missing before what arrived (refused as corrupt, or dropped): ask once for it."""
        if self._nacked_at != self._expected:
            self._nacked_at = self._expected
            self._send({"k": "sn", "s": self.sid, "o": self._expected})

    def on_report(self, consumed: int, received: int, eof: bool) -> None:
        if received > self._received or consumed > self._consumed or eof:
            self._progress_at = asyncio.get_running_loop().time()
        self._received = max(self._received, received)
        self._eof_delivered = self._eof_delivered or eof
        if consumed > self._consumed:
            self._consumed = consumed
            while self._unacked and self._unacked[0][0] + len(self._unacked[0][1]) <= consumed:
                self._unacked.popleft()
            self._credit.set()
        self._maybe_done()

    def on_resend(self, offset: int) -> None:
        for start, chunk in list(self._unacked):
            if start + len(chunk) > offset:
                self._send({"k": "sd", "s": self.sid, "o": start, "d": chunk})
        if self._eof_sent:
            self._send({"k": "se", "s": self.sid, "o": self._sent})
        self._progress_at = asyncio.get_running_loop().time()

    def tick(self, now: float) -> None:
        """Retransmit the tail when the reader has not received it for a while (a lost last
        chunk or end has nothing after it to reveal the gap)."""
        missing = self._received < self._sent or (self._eof_sent and not self._eof_delivered)
        if missing and now - self._progress_at > RETRANSMIT_AFTER:
            self.on_resend(self._received)

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

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.streams: dict[tuple[str, str, int], Stream] = {}
        self.services: dict[tuple[str, str], tuple[StreamHandler, tuple[str, ...]]] = {}
        self.opening: dict[int, Stream] = {}  # by the message id of their open
        self._ids = itertools.count(1)
        self._ticker: asyncio.Task | None = None

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
        from atoll.protocol.subjects import split_address

        agent_name, _ = split_address(dst)
        peer = self.agent._peers.get(agent_name) or await self.agent._peer(agent_name, timeout)
        sid = next(self._ids)
        local = src or self.agent.name
        stream = Stream(self, peer, local, dst, sid, False, window)
        self.streams[stream.key] = stream
        self._ensure_ticker()
        msg_id = stream._send({"k": "so", "s": sid, "svc": service, "p": params, "w": window})
        self.opening[msg_id] = stream  # a broker's "no responder" for it fails it at once
        try:
            await asyncio.wait_for(asyncio.shield(stream.accepted), timeout)
        except TimeoutError:
            stream.abort(StreamReset(f"{dst} did not accept {service!r} within {timeout}s"))
            raise stream.error from None  # type: ignore[misc]
        except BaseException:  # refused, or the opener was cancelled: forget the stream
            stream.abort(StreamReset(f"opening {service!r} at {dst} was abandoned"))
            raise
        finally:
            self.opening.pop(msg_id, None)
        return stream

    def on_no_responder(self, msg_id: int, reason: str) -> bool:
        """The broker could not deliver message ``msg_id``: if it opened a stream, fail it."""
        stream = self.opening.pop(msg_id, None)
        if stream is None:
            return False
        stream._fail(NoResponder(reason))
        return True

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

    def on_message(self, src: str, dst: str, peer: _Peer, msg: dict[str, Any]) -> None:
        kind, sid = msg.get("k"), msg.get("s")
        if type(sid) is not int:
            return
        if kind == "so":
            self._on_open(src, dst, peer, sid, msg)
            return
        stream = self.streams.get(("out" if msg.get("a") else "in", src, sid))
        if stream is None or stream.peer.ident.pub != peer.ident.pub:
            return
        offset = msg.get("o")
        if kind == "sd":
            data = msg.get("d")
            if type(offset) is int and isinstance(data, bytes):
                stream.on_data(offset, data)
        elif kind == "sa":
            n, r = msg.get("n"), msg.get("r")
            if type(n) is int and type(r) is int:
                stream.on_report(n, r, msg.get("e") is True)
        elif kind == "sn":
            if type(offset) is int:
                stream.on_resend(offset)
        elif kind == "se":
            n, r = msg.get("n"), msg.get("r")
            if type(n) is int and type(r) is int:  # a closing side's last report rides along
                stream.on_report(n, r, msg.get("e") is True)
            if type(offset) is int:
                stream.on_eof(offset)
        elif kind == "sk":
            window = msg.get("w")
            stream.window_out = window if type(window) is int and window > 0 else CHUNK
            if not stream.accepted.done():
                stream.accepted.set_result(None)
        elif kind == "sr":
            stream._fail(AtollError.from_wire(msg.get("e")))

    def _on_open(self, src: str, dst: str, peer: _Peer, sid: int, msg: dict[str, Any]) -> None:
        from atoll.agent.node import CallInfo
        from atoll.protocol.subjects import split_address

        _, plugin = split_address(dst)
        service = msg.get("svc")
        window = msg.get("w")
        stream = Stream(self, peer, dst, src, sid, True, WINDOW)
        stream.window_out = window if type(window) is int and window > 0 else CHUNK
        served = self.services.get((plugin or "system", service))  # type: ignore[arg-type]
        if served is None or not isinstance(service, str):
            stream.abort(NoSuchMethod(f"{dst} serves no stream {service!r}"))
            return
        handler, roles = served
        if not may_call(peer.ident.roles, roles):
            stream.abort(Forbidden(refusal(peer.ident, dst, f"stream {service!r}", roles)))
            return
        if stream.key in self.streams:
            stream.abort(InvalidRequest(f"stream {sid} is already open"))
            return
        self.streams[stream.key] = stream
        self._ensure_ticker()
        stream.accepted.set_result(None)
        stream._send({"k": "sk", "s": sid, "w": stream.window_in})
        task = asyncio.create_task(
            self._run(handler, stream, msg.get("p"), CallInfo(src, peer.ident, f"stream:{service}"))
        )
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _run(self, handler: StreamHandler, stream: Stream, params: Any, call) -> None:
        try:
            await handler(stream, params, call)
            await stream.close()  # the handler is done with it, whatever it left unread
        except AtollError as exc:
            stream.abort(exc)
        except asyncio.CancelledError:
            stream.abort(StreamReset("the serving agent stopped"))
            raise
        except Exception as exc:
            self.agent.log.error("agent.stream_handler_failed", error=exc, exc_info=True)
            stream.abort(StreamReset(f"{type(exc).__name__}: {exc}"))
