"""Stream flow control, sans-I/O: one stream's offsets, windows, acknowledgements and
retransmission, and the stream messages they call for.

Stream messages ride sealed direct messages (so they are end-to-end encrypted like RPC), each
naming its stream and byte offset:

    so  open     {s, svc, p: params, w: window}      sk  accepted  {s, w}
    sd  data     {s, o: offset, d: bytes}            se  end       {s, o: final offset}
    sa  report   {s, n: bytes read, r: bytes received in order, e: end received, q: answer me}
    sn  resend   {s, o: from offset}                 sr  reset     {s, e: [type, message, data]}

Messages from the accepting side carry ``a: 1`` (both sides number their own streams).

Flow control is per stream: a writer keeps at most the reader's window unconsumed, so a slow
reader stalls its own stream and nothing else on the connection. Writers keep unconsumed data
until the reader has it, so a chunk a broker drops or corrupts (and the receiver therefore
refuses) is noticed as a gap at the next offset — or by a retransmission timer at the tail — and
sent again. Half-close: ``end`` ends one direction; the other may go on.

A stream whose other side says nothing for ``PROBE_AFTER`` sends a report asking for one back
(``q``): an idle stream stays quiet otherwise, and its far agent may have died. A broker answers
a message for an agent it no longer has with NORESP (``undelivered``); a far side that stays
unreachable for ``UNREACHABLE_AFTER`` (longer than an agent takes to fail over to another
broker) is ``gone``, and the stream fails instead of waiting forever on a writer or reader that
will never come back. A far agent that restarted under its name before its broker noticed gets
the probe in a process that never had the stream: it answers with a reset
(``unknown_stream_answer``), and the stream fails at once.

``StreamWindows`` queues the messages it calls for in ``outbox``; ``report_due`` asks for a
report, which the caller sends (``take_report``) once per turn of its event loop however often
it was asked in it (the last data, its end, the final read and a close come together: one
message, not four, each sealed and relayed). Times are seconds of a monotonic clock.
"""

from __future__ import annotations

import enum
from collections import deque
from typing import Any

from atoll.protocol.errors import ProtocolError

WINDOW = 4 * 1024 * 1024
CHUNK = 1024 * 1024
RETRANSMIT_AFTER = 1.0  # seconds without progress on unconsumed data: send it again
PROBE_AFTER = 2.0  # seconds of silence from the other side: ask it for a report
UNREACHABLE_AFTER = 5.0  # seconds the other side's broker says it has no such agent: gone

Body = dict[str, Any]


class Change(enum.IntFlag):
    """What a received stream message changed, for whoever waits on the stream."""

    NONE = 0
    READABLE = 1  # data or the end arrived: a reader may go on
    CREDIT = 2  # the reader consumed more: a writer may go on
    ACCEPTED = 4  # the other side accepted the stream (``window_out`` is set)
    RESET = 8  # the other side reset the stream: its message's ``e`` says why
    FINISHED = 16  # both directions ended and everything was consumed


def unknown_stream_answer(msg: Body, error: Any) -> Body | None:
    """The answer to a message for a stream this side does not have (``error`` in wire form):
    a reset when the other side asks for an answer (a probe: it has heard nothing for
    ``PROBE_AFTER``), since this side is a new process of the agent, which never had the stream,
    or forgot it; None for anything else (a late report or a copy after a stream ended needs
    none, and a reset answered with a reset would bounce)."""
    sid = msg.get("s")
    if msg.get("k") != "sa" or msg.get("q") is not True or type(sid) is not int:
        return None
    answer: Body = {"k": "sr", "s": sid, "e": error}
    if not msg.get("a"):  # the opener asked: this side answers as the accepting one
        answer["a"] = 1
    return answer


class StreamWindows:
    """One end of one stream: what it sent and what the other side has of it, what it received
    and what its reader has taken."""

    def __init__(self, sid: int, accepted_side: bool, window: int, now: float) -> None:
        self.sid = sid
        self.accepted_side = accepted_side
        self.window_in = window  # what we let the other side send ahead of our reads
        self.window_out = 0  # what they let us send ahead; set when the stream is accepted
        self.outbox: list[Body] = []
        # outbound
        self.sent = 0
        self.consumed = 0  # by the remote reader
        self.received = 0  # in order by the remote side (it may not have read it yet)
        self.eof_delivered = False
        self.unacked: deque[tuple[int, bytes]] = deque()
        self.eof_sent = False
        self.progress_at = now
        # liveness of the other side
        self.heard_at = now  # its last message (or the stream's start)
        self.probed_at = now
        self.unreachable_at: float | None = None  # since a broker first said it had no such agent
        # inbound
        self.expected = 0
        self.chunks: deque[bytes] = deque()
        self.read = 0
        self.granted = 0
        self.eof_at: int | None = None
        self.nacked_at = -1
        self.reported = 0
        self.report_due = False
        self.closed = False

    def _emit(self, body: Body) -> None:
        if self.accepted_side:
            body["a"] = 1
        self.outbox.append(body)

    def take(self) -> list[Body]:
        """The messages to send, in order (the outbox is emptied)."""
        out, self.outbox = self.outbox, []
        return out

    @property
    def finished(self) -> bool:
        """Both directions ended and all data consumed: the stream is done."""
        return (
            self.eof_sent
            and self.eof_delivered
            and self.consumed >= self.sent
            and self.eof_at is not None
            and (self.closed or self.read >= self.eof_at)
        )

    # --- opening -----------------------------------------------------------------------------

    def opening(self, service: str, params: Any) -> Body:
        """The message opening this stream to ``service`` (sent at once by the opener, which
        keeps its message id: a broker's NORESP names it)."""
        return {"k": "so", "s": self.sid, "svc": service, "p": params, "w": self.window_in}

    def accept(self) -> None:
        """Accept the stream the other side opened, granting it our window."""
        self._emit({"k": "sk", "s": self.sid, "w": self.window_in})

    # --- writing -----------------------------------------------------------------------------

    def has_room(self, size: int) -> bool:
        """May ``size`` more bytes go out now (the reader's window allows a chunk at least)?"""
        return self.sent - self.consumed + size <= max(self.window_out, CHUNK)

    def write(self, chunk: bytes) -> None:
        self.unacked.append((self.sent, chunk))
        self._emit({"k": "sd", "s": self.sid, "o": self.sent, "d": chunk})
        self.sent += len(chunk)

    def end(self) -> None:
        """Half-close: no more data from us (once)."""
        if not self.eof_sent:
            self.eof_sent = True
            self._emit({"k": "se", "s": self.sid, "o": self.sent})

    def reset(self, error: Any) -> None:
        """Abort the stream, telling the other side why (``error`` in wire form)."""
        self._emit({"k": "sr", "s": self.sid, "e": error})

    def close(self) -> None:
        """Done with the stream: end our side and count whatever else arrives as read."""
        self.closed = True
        self.read = self.expected
        self.chunks.clear()
        self.reported = self.expected
        if self.eof_sent:
            self._want_report()
        else:  # our end carries our last report (and stands for one still due)
            self.eof_sent = True
            self.report_due = False
            self._emit({"k": "se", "s": self.sid, "o": self.sent, **self._report_fields()})

    def tick(self, now: float) -> None:
        """Retransmit the tail when the reader has not received it for a while (a lost last
        chunk or end has nothing after it to reveal the gap); probe a silent other side."""
        missing = self.received < self.sent or (self.eof_sent and not self.eof_delivered)
        if missing and now - self.progress_at > RETRANSMIT_AFTER:
            self._resend(self.received, now)
        if now - max(self.heard_at, self.probed_at) >= PROBE_AFTER:
            self.probed_at = now
            self._emit({"k": "sa", "s": self.sid, **self._report_fields(), "q": True})

    def undelivered(self, now: float) -> None:
        """A broker could not deliver our message: the other side's agent is not connected."""
        if self.unreachable_at is None:
            self.unreachable_at = now

    def gone(self, now: float) -> bool:
        """The other side has been unreachable too long to be failing over: give up on it."""
        return self.unreachable_at is not None and now - self.unreachable_at >= UNREACHABLE_AFTER

    def _resend(self, offset: int, now: float) -> None:
        for start, chunk in list(self.unacked):
            if start + len(chunk) > offset:
                self._emit({"k": "sd", "s": self.sid, "o": start, "d": chunk})
        if self.eof_sent:
            self._emit({"k": "se", "s": self.sid, "o": self.sent})
        self.progress_at = now

    # --- reading -----------------------------------------------------------------------------

    @property
    def at_end(self) -> bool:
        """Everything up to the other side's end has arrived (and nothing is left to read once
        ``chunks`` is empty)."""
        return self.eof_at is not None and self.expected >= self.eof_at

    def take_chunk(self, n: int) -> bytes:
        """Up to ``n`` bytes (all of the next chunk with -1) of what arrived; ``chunks`` must
        not be empty."""
        chunk = self.chunks.popleft()
        if 0 <= n < len(chunk):
            self.chunks.appendleft(chunk[n:])
            chunk = chunk[:n]
        self.read += len(chunk)
        ended = self.eof_at is not None and self.read >= self.eof_at
        if self.read - self.granted >= self.window_in // 4 or ended:
            # Credit in batches (a writer is only ever blocked with a quarter window unreported
            # or more), and at the end so the writer learns everything was read.
            self.granted = self.read
            self._want_report()
        return chunk

    def _want_report(self) -> None:
        self.reported = self.expected
        self.report_due = True

    def take_report(self) -> Body | None:
        """The report asked for since the last one (None if none is due any more)."""
        if not self.report_due:
            return None
        self.report_due = False
        body = {"k": "sa", "s": self.sid, **self._report_fields()}
        if self.accepted_side:
            body["a"] = 1
        return body

    def _report_fields(self) -> Body:
        eof = self.eof_at is not None and self.expected >= self.eof_at
        return {"n": self.read, "r": self.expected, "e": eof}

    # --- receiving ---------------------------------------------------------------------------

    def receive(self, msg: Body, now: float) -> Change:
        """Take a stream message (other than ``so``) from the other side. Raises ProtocolError
        if it overran the window we gave it."""
        kind, offset = msg.get("k"), msg.get("o")
        self.heard_at, self.unreachable_at = now, None
        if kind == "sd":
            data = msg.get("d")
            if type(offset) is int and isinstance(data, bytes):
                return self._on_data(offset, data)
        elif kind == "sa":
            n, r = msg.get("n"), msg.get("r")
            if msg.get("q") is True:
                self._want_report()
            if type(n) is int and type(r) is int:
                return self._on_report(n, r, msg.get("e") is True, now)
        elif kind == "sn":
            if type(offset) is int:
                self._resend(offset, now)
        elif kind == "se":
            change = Change.NONE
            n, r = msg.get("n"), msg.get("r")
            if type(n) is int and type(r) is int:  # a closing side's last report rides along
                change |= self._on_report(n, r, msg.get("e") is True, now)
            if type(offset) is int:
                change |= self._on_eof(offset)
            return change
        elif kind == "sk":
            window = msg.get("w")
            self.window_out = window if type(window) is int and window > 0 else CHUNK
            return Change.ACCEPTED
        elif kind == "sr":
            return Change.RESET
        return Change.NONE

    def _on_data(self, offset: int, data: bytes) -> Change:
        if self.closed:  # nobody will read it: count it as read
            if offset == self.expected:
                self.expected += len(data)
                self.read = self.expected
                self._want_report()
            return Change.NONE
        if offset == self.expected:
            if self.expected + len(data) - self.read > self.window_in + CHUNK:
                raise ProtocolError("peer overran the stream window")
            self.chunks.append(data)
            self.expected += len(data)
            if self.expected - self.reported >= self.window_in // 4:
                self._want_report()
            return Change.READABLE
        if offset > self.expected:
            self._gap()
        else:  # a copy of something we have: the writer has not heard; tell it
            self._want_report()
        return Change.NONE

    def _on_eof(self, offset: int) -> Change:
        self.eof_at = offset
        if self.expected < offset:
            self._gap()
        elif not self.chunks:  # else the read that reaches the end reports, once for both
            self._want_report()
        return Change.READABLE | (Change.FINISHED if self.finished else Change.NONE)

    def _gap(self) -> None:
        """Data missing before what arrived (refused as corrupt, or dropped): ask once for it."""
        if self.nacked_at != self.expected:
            self.nacked_at = self.expected
            self._emit({"k": "sn", "s": self.sid, "o": self.expected})

    def _on_report(self, consumed: int, received: int, eof: bool, now: float) -> Change:
        change = Change.NONE
        if received > self.received or consumed > self.consumed or eof:
            self.progress_at = now
        self.received = max(self.received, received)
        self.eof_delivered = self.eof_delivered or eof
        if consumed > self.consumed:
            self.consumed = consumed
            while self.unacked and self.unacked[0][0] + len(self.unacked[0][1]) <= consumed:
                self.unacked.popleft()
            change = Change.CREDIT
        return change | (Change.FINISHED if self.finished else Change.NONE)
