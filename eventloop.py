"""The event loop every ``atoll`` process runs: asyncio's, with a short busy-poll before sleeping.

A message crossing the overlay wakes a sleeping process at every hop (agent -> broker -> agent
and back). On virtual machines a wake-up costs tens of microseconds (an idle vCPU halts and must
be interrupted back), more than the Python work of a hop. So after network activity the loop
polls without blocking for up to ``idle_spin_us`` before it sleeps, as Go's scheduler spins
before parking and as Aeron's idle strategies do: a reply that comes back within the spin is
read at once. Measured with ``bench/overlay.py`` on 2 vCPUs: RPC p50 ~360 -> ~140 us.

The cost is bounded: the loop spins only when its last wake-up brought I/O less than
``HOT_WINDOW_S`` ago (a process that only runs timers never spins), for at most
``idle_spin_us`` per idle period, and it yields the core between polls: a yield that took long
means another task needed the core, and then the loop stops spinning and sleeps, so busy
processes sharing few cores keep their throughput (``bench/dataplane.py``). Stopping instead
whenever the machine has more runnable tasks than cores was tried: a chain of brokers on two
vCPUs then slept at nearly every hop and got slower than without spinning (``bench/mesh.py``).
``idle_spin_us = 0`` turns it off.
"""

from __future__ import annotations

import asyncio
import os
import selectors
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

DEFAULT_IDLE_SPIN_US = 200
MAX_IDLE_SPIN_US = 10_000
HOT_WINDOW_S = 0.001  # spin only if the last I/O was this recent
YIELDED_S = 20e-6  # a sched_yield this long gave the core away: stop spinning


class SpinningSelector(selectors.DefaultSelector):
    """The platform's default selector, polled for ``spin_s`` before a blocking select."""

    def __init__(
        self, spin_s: float, hot_window_s: float = HOT_WINDOW_S, yielded_s: float = YIELDED_S
    ) -> None:
        super().__init__()
        self.spin_s = spin_s
        self.hot_window_s = hot_window_s
        self.yielded_s = yielded_s
        self._last_io = -hot_window_s

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        poll = super().select
        clock = time.perf_counter
        if self.spin_s and (timeout is None or timeout > 0):
            start = clock()
            if start - self._last_io < self.hot_window_s:
                spin = self.spin_s if timeout is None else min(self.spin_s, timeout)
                end = start + spin
                while True:
                    ready = poll(0)
                    if ready:
                        self._last_io = clock()
                        return ready
                    now = clock()
                    if now >= end:
                        break
                    os.sched_yield()
                    if clock() - now > self.yielded_s:
                        break  # another task needed this core: leave it to them, sleep
                if timeout is not None:
                    timeout = max(0.0, timeout - (clock() - start))
        ready = poll(timeout)
        if ready:
            self._last_io = clock()
        return ready


def check_idle_spin(us: int) -> int:
    if not 0 <= us <= MAX_IDLE_SPIN_US:
        raise ValueError(f"idle_spin_us must be between 0 and {MAX_IDLE_SPIN_US}, not {us}")
    return us


def new_event_loop(idle_spin_us: int = DEFAULT_IDLE_SPIN_US) -> asyncio.AbstractEventLoop:
    check_idle_spin(idle_spin_us)
    if not idle_spin_us:
        return asyncio.new_event_loop()
    return asyncio.SelectorEventLoop(SpinningSelector(idle_spin_us / 1e6))


def run(main: Coroutine[Any, Any, T], idle_spin_us: int = DEFAULT_IDLE_SPIN_US) -> T:
    """``asyncio.run`` on the loop above."""
    with asyncio.Runner(loop_factory=lambda: new_event_loop(idle_spin_us)) as runner:
        return runner.run(main)
