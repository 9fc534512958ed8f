"""The busy-polling event loop every atoll process runs (atoll/eventloop.py)."""

from __future__ import annotations

import asyncio
import os
import selectors
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from atoll import eventloop
from atoll.agent.config import load_config
from atoll.eventloop import SpinningSelector
from support.net import ATOLL_CLI


@pytest.fixture
def polls(monkeypatch: pytest.MonkeyPatch) -> list[float | None]:
    """Every timeout the platform selector is asked for, in order."""
    seen: list[float | None] = []
    original = selectors.DefaultSelector.select

    def select(self: selectors.DefaultSelector, timeout: float | None = None) -> list:
        seen.append(timeout)
        return original(self, timeout)

    monkeypatch.setattr(selectors.DefaultSelector, "select", select)
    return seen


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def hot_selector(
    pair: tuple[socket.socket, socket.socket], polls: list, spin_s: float, **options: float
) -> SpinningSelector:
    """A selector on ``pair[0]`` that has just seen I/O; ``polls`` cleared after it."""
    a, b = pair
    sel = SpinningSelector(spin_s, **options)
    sel.register(a, selectors.EVENT_READ)
    b.send(b"x")
    assert [key.fileobj for key, _ in sel.select(1.0)] == [a]
    a.recv(1)
    polls.clear()
    return sel


def test_a_process_without_recent_io_sleeps_at_once(polls: list, pair: tuple) -> None:
    sel = SpinningSelector(0.005)
    sel.register(pair[0], selectors.EVENT_READ)
    assert sel.select(0.02) == []
    assert polls == [0.02]  # no spinning: one blocking select for the whole timeout


def test_after_io_it_polls_before_sleeping_and_sleeps_only_the_rest(
    polls: list, pair: tuple
) -> None:
    # a busy CI machine: the last I/O is still recent, and a yield is not taken as given away
    sel = hot_selector(pair, polls, 0.005, hot_window_s=10.0, yielded_s=10.0)
    t0 = time.perf_counter()
    assert sel.select(0.05) == []
    waited = time.perf_counter() - t0
    assert polls[:2] == [0, 0]  # non-blocking polls first
    assert 0 < polls[-1] <= 0.0451  # then the timeout less the time spun (5 ms or more)
    assert set(polls[:-1]) == {0}
    assert waited >= 0.049


def test_data_arriving_during_the_spin_is_returned_by_a_poll(polls: list, pair: tuple) -> None:
    a, b = pair
    # Long enough for the write to land in it; the writer is a thread of this process, and the
    # moment it takes the GIL must not count as the core given away.
    sel = hot_selector(pair, polls, 0.5, hot_window_s=10.0, yielded_s=10.0)
    writer = threading.Timer(0.01, b.send, (b"y",))
    writer.start()
    try:
        ready = sel.select(None)
    finally:
        writer.join()
    assert [key.fileobj for key, _ in ready] == [a]
    assert set(polls) == {0}  # found by a poll: no blocking select was made


def test_the_spin_never_outlasts_a_shorter_timeout(polls: list, pair: tuple) -> None:
    sel = hot_selector(pair, polls, 1.0, hot_window_s=10.0, yielded_s=10.0)
    t0 = time.perf_counter()
    assert sel.select(0.01) == []
    assert time.perf_counter() - t0 < 0.5  # the timer due in 10 ms bounds the spin


def test_spinning_stops_once_io_is_older_than_the_hot_window(polls: list, pair: tuple) -> None:
    sel = hot_selector(pair, polls, 0.001, hot_window_s=0.01)
    time.sleep(0.02)
    polls.clear()
    sel.select(0.01)
    assert polls == [0.01]


def test_run_serves_a_real_connection_and_zero_means_asyncios_own_loop() -> None:
    async def echo_once() -> tuple[bytes, type]:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(await r.read(100))
            await w.drain()
            w.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        replies = []
        for word in (b"one", b"two"):
            writer.write(word)
            replies.append(await reader.read(100))
            writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()
        server.close()
        await server.wait_closed()
        selector = asyncio.get_running_loop()._selector  # type: ignore[attr-defined]
        return b" ".join(replies), type(selector)

    assert eventloop.run(echo_once(), 200) == (b"one two", SpinningSelector)
    words, selector = eventloop.run(echo_once(), 0)
    assert words == b"one two" and selector is not SpinningSelector
    with pytest.raises(ValueError, match="idle_spin_us"):
        eventloop.new_event_loop(eventloop.MAX_IDLE_SPIN_US + 1)


def test_config_takes_idle_spin_in_agent_not_beside_it_in_broker(tmp_path: Path) -> None:
    base = '[agent]\nname = "a"\ndata_dir = "d"\nbrokers = ["ws://127.0.0.1:7400"]\n'
    path = tmp_path / "a.toml"
    path.write_text(base)
    assert load_config(path).agent.idle_spin_us == eventloop.DEFAULT_IDLE_SPIN_US
    path.write_text(base + "idle_spin_us = 0\n[broker]\nlisten = '127.0.0.1:0'\n")
    assert load_config(path).agent.idle_spin_us == 0
    path.write_text(base + "idle_spin_us = 20000\n")
    with pytest.raises(ValueError, match="idle_spin_us"):
        load_config(path)
    path.write_text(base + "[broker]\nidle_spin_us = 10\n")
    with pytest.raises(ValueError, match=r"set idle_spin_us in \[agent\]"):
        load_config(path)


def test_broker_command_bounds_idle_spin_and_keeps_it_out_of_a_config_run(tmp_path: Path) -> None:
    cli = [*ATOLL_CLI, "broker", "-d", str(tmp_path)]
    too_long = subprocess.run([*cli, "--idle-spin-us", "20000"], capture_output=True, text=True)
    assert too_long.returncode == 2 and "--idle-spin-us" in too_long.stderr
    config = tmp_path / "broker.toml"
    config.write_text("[broker]\nlisten = '127.0.0.1:0'\n")
    mixed = subprocess.run(
        [*cli, "--config", str(config), "--idle-spin-us", "0"], capture_output=True, text=True
    )
    assert mixed.returncode == 1 and "drop --idle-spin-us" in mixed.stderr


def test_a_yield_that_gave_the_core_away_ends_the_spin(
    polls: list, pair: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    sel = hot_selector(pair, polls, 0.5, hot_window_s=10.0)
    monkeypatch.setattr(os, "sched_yield", lambda: time.sleep(0.002))  # someone else ran
    t0 = time.perf_counter()
    assert sel.select(0.05) == []
    assert polls[0] == 0 and len(polls) == 2  # one poll, one yield given away, then sleep
    assert 0 < polls[1] <= 0.0481  # the rest of the timeout, less the 2 ms given away
    assert time.perf_counter() - t0 >= 0.049
