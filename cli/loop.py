"""Running a command's coroutine on Atoll's event loop, and waiting for Ctrl-C."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Coroutine
from typing import Any, TypeVar

from atoll import eventloop
from atoll.agent.errors import AtollError, ConnectionLost
from atoll.agent.node import Agent
from atoll.cli.console import fail
from atoll.eventloop import DEFAULT_IDLE_SPIN_US
from atoll.protocol.errors import ProtocolError

T = TypeVar("T")


def run_async(coro: Coroutine[Any, Any, T], idle_spin_us: int = DEFAULT_IDLE_SPIN_US) -> T:
    """``coro`` to its end; a platform error or a missing file ends the command, saying why."""
    try:
        return eventloop.run(coro, idle_spin_us)
    except (AtollError, ProtocolError, FileNotFoundError) as exc:
        fail(str(exc))


async def wait_for_signal(agent: Agent | None = None) -> None:
    """Until Ctrl-C/SIGTERM, or until brokers refuse ``agent`` for good (then exit non-zero)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    waits = [asyncio.create_task(stop.wait())]
    if agent is not None:
        waits.append(asyncio.create_task(agent.link.refused.wait()))
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for w in waits:
        w.cancel()
    if agent is not None and agent.link.fatal is not None:
        raise ConnectionLost(f"broker refused agent {agent.name}: {agent.link.fatal.reason}")
