"""Streams between agents: echo with half-close, per-stream flow control, recovery from chunks a
broker corrupts or drops, resets, and streams broken by a lost connection."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest

from atoll.agent.errors import ConnectionLost, NoResponder, NoSuchMethod
from atoll.agent.runtime import AgentRuntime
from atoll.agent.streams import Stream, StreamReset
from atoll.broker.server import BrokerServer
from atoll.protocol import streams as protocol_streams
from atoll.protocol.frames import Frame, FrameType
from atoll.protocol.streams import CHUNK
from atoll.tenancy.permissions import ANY
from support.overlay import intercept


async def echo(stream: Stream, params, call) -> None:
    async for chunk in stream:
        await stream.write(chunk)
    await stream.write_eof()


async def sink(stream: Stream, params, call) -> None:
    digest = hashlib.sha256()
    async for chunk in stream:
        digest.update(chunk)
    await stream.write(digest.hexdigest().encode())
    await stream.write_eof()


async def test_echo_half_close_and_many_streams(make_agent) -> None:
    a = await make_agent("alpha")
    b = await make_agent("beta")
    b.agent.streams.serve("test", "echo", echo, ANY)

    async def one(size: int) -> None:
        data = os.urandom(size)
        s = await a.agent.streams.open("beta/test", "echo")
        writer = asyncio.create_task(s.write(data))
        got = bytearray()
        while len(got) < size:
            got += await s.read()
        await writer
        await s.write_eof()  # half-close: the echo ends its side after ours
        assert await s.read() == b""
        assert bytes(got) == data

    await asyncio.gather(*(one(n) for n in (0, 1, 1000, 3 * CHUNK + 7, 5_000_000)))
    await asyncio.sleep(0.1)
    assert not a.agent.streams.streams and not b.agent.streams.streams  # all finished
    with pytest.raises(NoSuchMethod):
        await a.agent.streams.open("beta/test", "nothing")


async def test_slow_reader_stalls_only_its_stream(make_agent) -> None:
    a = await make_agent("alpha")
    b = await make_agent("beta")
    b.agent.streams.serve("test", "echo", echo, ANY)
    parked: asyncio.Queue[Stream] = asyncio.Queue()

    async def park(stream: Stream, params, call) -> None:
        await parked.put(stream)
        await asyncio.sleep(30)  # never reads

    b.agent.streams.serve("test", "park", park, ANY)
    stuck = await a.agent.streams.open("beta/test", "park", window=CHUNK)
    blocked = asyncio.create_task(stuck.write(os.urandom(20 * CHUNK)))
    await asyncio.sleep(0.2)
    assert not blocked.done()  # its window is full
    fast = await a.agent.streams.open("beta/test", "echo")
    await fast.write(b"x" * 100_000)
    got = b""
    while len(got) < 100_000:
        got += await fast.read()
    assert (await a.agent.call("beta", "ping"))["pong"] is True  # RPC flows too
    blocked.cancel()
    stuck.abort()


async def test_corrupted_and_dropped_chunks_are_sent_again(broker, make_agent) -> None:
    a = await make_agent("alpha")
    b = await make_agent("beta")
    b.agent.streams.serve("test", "sink", sink, ANY)
    data = os.urandom(40 * CHUNK)
    s = await a.agent.streams.open("beta/test", "sink")
    seen = {"n": 0}

    def meddle(session, frame: Frame) -> Frame | None:
        if frame.type is FrameType.MSG and frame.header["dst"] == "beta/test":
            seen["n"] += 1
            if seen["n"] == 5:  # corrupt one chunk in the middle
                payload = bytearray(frame.payload)
                payload[100] ^= 0xFF
                return Frame(frame.type, frame.header, bytes(payload))
            if seen["n"] == 41:  # and drop the last one (no gap after it to reveal it)
                return Frame(frame.type, {**frame.header, "dst": "nobody"}, frame.payload)
        return None

    intercept(broker, meddle)
    await s.write(data)
    await s.write_eof()
    digest = (await asyncio.wait_for(s.read_exactly(64), 10)).decode()
    assert digest == hashlib.sha256(data).hexdigest()
    assert seen["n"] > 42  # resent


async def test_reset_and_connection_loss(operator, broker, make_agent) -> None:
    a = await make_agent("alpha")
    b = await make_agent("beta")

    async def refuse(stream: Stream, params, call) -> None:
        raise StreamReset(f"no thanks, {params}")

    async def hold(stream: Stream, params, call) -> None:
        await stream.read()

    b.agent.streams.serve("test", "refuse", refuse, ANY)
    b.agent.streams.serve("test", "hold", hold, ANY)
    s = await a.agent.streams.open("beta/test", "refuse", params="bob")
    with pytest.raises(StreamReset, match="no thanks, bob"):
        await s.read()
    held = await a.agent.streams.open("beta/test", "hold")
    reader = asyncio.create_task(held.read())
    await asyncio.sleep(0.1)
    await broker.stop()
    with pytest.raises(ConnectionLost):
        await asyncio.wait_for(reader, 5)


@pytest.fixture
def quick_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Liveness probes in tenths of a second, so a test sees them at work."""
    monkeypatch.setattr(protocol_streams, "PROBE_AFTER", 0.3)
    monkeypatch.setattr(protocol_streams, "UNREACHABLE_AFTER", 1.0)


async def test_a_stream_whose_far_agent_dies_fails_soon(quick_probes, broker, make_agent) -> None:
    """A writer blocked on a dead reader's window, and a reader waiting on a dead writer, learn
    it from their broker (probes of a silent side are answered NORESP) instead of waiting
    forever; a live side that is only silent keeps its stream."""
    a = await make_agent("alpha")
    b = await make_agent("beta")

    async def park(stream: Stream, params, call) -> None:
        await asyncio.sleep(30)  # never reads nor writes

    b.agent.streams.serve("test", "park", park, ANY)
    b.agent.streams.serve("test", "echo", echo, ANY)
    idle = await a.agent.streams.open("beta/test", "echo")
    await asyncio.sleep(1.5)  # five probe periods of silence, the far side alive
    await idle.write(b"still here")
    assert await asyncio.wait_for(idle.read(), 5) == b"still here"
    stuck = await a.agent.streams.open("beta/test", "park", window=CHUNK)
    writing = asyncio.create_task(stuck.write(os.urandom(8 * CHUNK)))
    waiting = await a.agent.streams.open("beta/test", "park")
    reading = asyncio.create_task(waiting.read())
    await asyncio.sleep(0.2)
    assert not writing.done() and not reading.done()
    await b.agent.link.stop()  # beta's process dies: no goodbye, no reset
    for task in (writing, reading):
        with pytest.raises(NoResponder, match="beta/test is gone"):
            await asyncio.wait_for(task, 10)
    assert not a.agent.streams.streams  # forgotten


@pytest.fixture
def probes_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Quick probes, and a broker's NORESP never enough to give a far side up: whatever fails a
    stream here is the far side's own answer."""
    monkeypatch.setattr(protocol_streams, "PROBE_AFTER", 0.3)
    monkeypatch.setattr(protocol_streams, "UNREACHABLE_AFTER", 600.0)


async def restart(rt: AgentRuntime, broker: BrokerServer, data_dir: Path) -> AgentRuntime:
    """The agent's process dies (no goodbye, no reset) and a new one comes up at once under the
    same name and keys, knowing none of the old one's streams."""
    await rt.agent.link.stop()
    return await AgentRuntime.start(data_dir, [broker.url], keys=rt.agent.keys)


async def test_a_far_agent_restarted_under_its_name_fails_the_stream_at_once(
    probes_only, broker, make_agent, tmp_path
) -> None:
    """The far agent restarts before anything tells its broker it was gone: the probes of a
    blocked writer and of a waiting reader reach the new process, which answers that it has no
    such stream, and both fail at once with that reason instead of waiting forever."""
    a = await make_agent("alpha")
    b = await make_agent("beta")

    async def park(stream: Stream, params, call) -> None:
        await asyncio.sleep(30)  # never reads nor writes

    b.agent.streams.serve("test", "park", park, ANY)
    stuck = await a.agent.streams.open("beta/test", "park", window=CHUNK)
    writing = asyncio.create_task(stuck.write(os.urandom(8 * CHUNK)))
    waiting = await a.agent.streams.open("beta/test", "park")
    reading = asyncio.create_task(waiting.read())
    await asyncio.sleep(0.2)
    again = await restart(b, broker, tmp_path / "beta-again")
    why = r"beta/test has no stream \d+ from alpha: its agent restarted"
    try:
        for task in (writing, reading):
            with pytest.raises(StreamReset, match=why):
                await asyncio.wait_for(task, 10)
        assert not a.agent.streams.streams
    finally:
        await again.stop()


async def test_an_opener_restarted_under_its_name_is_served_afresh(
    probes_only, broker, make_agent, tmp_path
) -> None:
    """The opening agent restarts mid-stream: the far side's handler learns from its own probe
    that the stream is gone, and the new process's streams (numbered apart from the old one's)
    are served as new ones."""
    a = await make_agent("alpha")
    b = await make_agent("beta")
    ended: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()

    async def wait(stream: Stream, params, call) -> None:
        try:
            await stream.read()
        except StreamReset as exc:
            ended.set_result(exc)
            raise

    b.agent.streams.serve("test", "wait", wait, ANY)
    b.agent.streams.serve("test", "echo", echo, ANY)
    await a.agent.streams.open("beta/test", "wait")
    again = await restart(a, broker, tmp_path / "alpha-again")
    try:
        s = await again.agent.streams.open("beta/test", "echo")
        await s.write(b"hello")
        await s.write_eof()
        assert await asyncio.wait_for(s.read_exactly(5), 10) == b"hello"
        error = await asyncio.wait_for(ended, 10)
        assert "alpha has no stream" in str(error)
    finally:
        await again.stop()
