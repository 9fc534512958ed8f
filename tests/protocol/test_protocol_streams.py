"""Stream flow control as a state machine, without sockets: two ``StreamWindows`` exchange the
messages they queue by hand; windows, reports, gaps, resends and the end are checked."""

from __future__ import annotations

from typing import Any

import pytest

from atoll.protocol.errors import ProtocolError
from atoll.protocol.streams import (
    CHUNK,
    PROBE_AFTER,
    RETRANSMIT_AFTER,
    UNREACHABLE_AFTER,
    Change,
    StreamWindows,
    unknown_stream_answer,
)


def pair(window: int = 4 * CHUNK) -> tuple[StreamWindows, StreamWindows]:
    """An opened stream: the opener's end and the accepting end, accepted."""
    opener = StreamWindows(1, False, window, 0.0)
    acceptor = StreamWindows(1, True, window, 0.0)
    acceptor.window_out = window
    acceptor.accept()
    [accepted] = acceptor.take()
    assert accepted == {"k": "sk", "s": 1, "w": window, "a": 1}
    assert opener.receive(accepted, 0.0) == Change.ACCEPTED
    return opener, acceptor


def deliver(src: StreamWindows, dst: StreamWindows, now: float = 0.0) -> Change:
    change = Change.NONE
    for body in src.take():
        change |= dst.receive(body, now)
    return change


def report(src: StreamWindows) -> dict[str, Any]:
    body = src.take_report()
    assert body is not None
    return body


def test_data_flows_within_the_window_and_credit_returns() -> None:
    opener, acceptor = pair(window=2 * CHUNK)
    assert opener.has_room(CHUNK) and opener.has_room(2 * CHUNK)
    assert not opener.has_room(2 * CHUNK + 1)
    opener.write(b"a" * CHUNK)
    opener.write(b"b" * CHUNK)
    assert not opener.has_room(1)  # the reader's window is full
    assert deliver(opener, acceptor) == Change.READABLE
    assert acceptor.take_chunk(-1) == b"a" * CHUNK
    assert acceptor.report_due  # a quarter window read: credit is reported
    change = opener.receive(report(acceptor), 1.0)
    assert change == Change.CREDIT
    assert opener.consumed == CHUNK and opener.has_room(CHUNK)
    assert [start for start, _ in opener.unacked] == [CHUNK]  # what was read is let go


def test_partial_reads_split_chunks() -> None:
    opener, acceptor = pair()
    opener.write(b"hello world")
    deliver(opener, acceptor)
    assert acceptor.take_chunk(5) == b"hello"
    assert acceptor.take_chunk(-1) == b" world"
    assert acceptor.read == 11


def test_a_gap_asks_once_for_the_missing_data() -> None:
    opener, acceptor = pair()
    opener.write(b"1" * 10)
    opener.write(b"2" * 10)
    _, second = opener.take()
    assert acceptor.receive(second, 0.0) == Change.NONE  # the first was lost
    assert acceptor.take() == [{"k": "sn", "s": 1, "o": 0, "a": 1}]
    assert acceptor.receive(second, 0.0) == Change.NONE
    assert acceptor.take() == []  # already asked from that offset
    opener.receive({"k": "sn", "s": 1, "o": 0, "a": 1}, 2.0)
    resent = opener.take()
    assert [(b["k"], b["o"]) for b in resent] == [("sd", 0), ("sd", 10)]
    assert opener.progress_at == 2.0
    for body in resent:
        acceptor.receive(body, 2.0)
    assert b"".join(acceptor.chunks) == b"1" * 10 + b"2" * 10


def test_overrunning_the_window_is_a_protocol_error() -> None:
    _, acceptor = pair(window=CHUNK)
    acceptor.receive({"k": "sd", "s": 1, "o": 0, "d": b"x" * CHUNK}, 0.0)
    with pytest.raises(ProtocolError, match="overran"):
        acceptor.receive({"k": "sd", "s": 1, "o": CHUNK, "d": b"x" * (CHUNK + 1)}, 0.0)


def test_the_tail_is_sent_again_after_silence() -> None:
    opener, _ = pair()
    opener.write(b"last")
    opener.end()
    opener.take()  # lost on the way
    opener.tick(RETRANSMIT_AFTER / 2)
    assert opener.take() == []  # not yet
    opener.tick(RETRANSMIT_AFTER + 0.1)
    assert [(b["k"], b["o"]) for b in opener.take()] == [("sd", 0), ("se", 4)]


def test_both_ends_finish_once_everything_is_read() -> None:
    opener, acceptor = pair()
    opener.write(b"ping")
    opener.end()
    assert deliver(opener, acceptor) == Change.READABLE
    assert acceptor.take_chunk(-1) == b"ping"
    assert acceptor.at_end and acceptor.report_due
    acceptor.close()  # its end carries its last report: no separate one
    assert acceptor.take_report() is None
    assert acceptor.outbox == [{"k": "se", "s": 1, "o": 0, "n": 4, "r": 4, "e": True, "a": 1}]
    assert not acceptor.finished  # it does not know yet that its end arrived
    assert deliver(acceptor, opener) == Change.CREDIT | Change.READABLE | Change.FINISHED
    assert opener.finished and opener.report_due
    assert acceptor.receive(report(opener), 0.0) == Change.FINISHED
    assert acceptor.finished


def test_reset_and_unknown_messages() -> None:
    opener, acceptor = pair()
    assert opener.receive({"k": "sr", "s": 1, "e": ["StreamReset", "no", None]}, 0.0) == (
        Change.RESET
    )
    assert opener.receive({"k": "sd", "s": 1, "o": "x", "d": b""}, 0.0) == Change.NONE
    assert opener.receive({"k": "??", "s": 1}, 0.0) == Change.NONE
    acceptor.reset(["StreamReset", "no", None])
    assert acceptor.take() == [{"k": "sr", "s": 1, "e": ["StreamReset", "no", None], "a": 1}]


def test_data_after_close_is_counted_as_read() -> None:
    opener, acceptor = pair()
    acceptor.close()
    acceptor.take()
    opener.write(b"ignored")
    assert deliver(opener, acceptor) == Change.NONE
    assert acceptor.read == acceptor.expected == 7 and not acceptor.chunks
    assert report(acceptor)["n"] == 7


def test_a_silent_side_is_probed_and_answers() -> None:
    opener, acceptor = pair()
    opener.tick(PROBE_AFTER - 0.1)
    assert opener.take() == []  # not silent long enough
    opener.tick(PROBE_AFTER)
    [probe] = opener.take()
    assert probe["k"] == "sa" and probe["q"] is True
    opener.tick(PROBE_AFTER + 0.5)
    assert opener.take() == []  # one probe per silence
    acceptor.receive(probe, PROBE_AFTER)
    answer = report(acceptor)
    assert "q" not in answer and answer["a"] == 1
    opener.receive(answer, PROBE_AFTER + 0.6)
    opener.tick(2 * PROBE_AFTER + 0.5)
    assert opener.take() == []  # heard again: the silence starts over
    opener.tick(2 * PROBE_AFTER + 0.7)
    assert [b["q"] for b in opener.take()] == [True]


def test_a_side_its_broker_no_longer_has_is_gone_after_a_grace() -> None:
    opener, acceptor = pair()
    opener.undelivered(10.0)
    opener.undelivered(12.0)  # the first NORESP starts the clock
    assert not opener.gone(10.0 + UNREACHABLE_AFTER - 0.1)
    assert opener.gone(10.0 + UNREACHABLE_AFTER)
    acceptor.tick(PROBE_AFTER)  # it failed over and speaks again
    opener.receive(acceptor.take()[0], 16.0)
    assert not opener.gone(100.0)


def test_a_probe_of_a_stream_the_far_process_never_had_is_answered_with_a_reset() -> None:
    """The far agent restarted under its name before its broker noticed: the probe reaches a
    new process without the stream, whose reset fails the stream at once; nothing else sent
    to an unknown stream is answered (late reports, copies, resets: no bouncing)."""
    why = ["StreamReset", "beta has no stream 1: its agent restarted or ended it", None]
    for prober in pair():
        prober.tick(PROBE_AFTER)
        [probe] = prober.take()
        answer = unknown_stream_answer(probe, why)
        # Marked as from the side the prober is not, so its agent finds the stream.
        assert answer == {"k": "sr", "s": 1, "e": why} | ({} if probe.get("a") else {"a": 1})
        assert prober.receive(answer, PROBE_AFTER) == Change.RESET
    opener, acceptor = pair()
    opener.write(b"late")
    opener.end()
    sent = opener.take()
    for body in sent:
        acceptor.receive(body, 0.0)
    assert acceptor.take_chunk(-1) == b"late"
    quiet = [*sent, report(acceptor), {"k": "sr", "s": 1, "e": why}, {"k": "sa", "q": True}]
    assert [unknown_stream_answer(m, why) for m in quiet] == [None] * len(quiet)
