"""When a batch's next line may start: the gateway's batches yield to interactive traffic.

At most ``limit`` lines run at once (all batches of this gateway together). None starts while
an interactive request of this gateway waits for its first event (service.py counts them), nor
while every node serving the line's model announces a queue (the router's view): batch lines
fill the capacity interactive requests leave, and never queue in front of one. A line refused as
overloaded pauses every start, for longer each time in a row (up to ``MAX_PAUSE_S``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from atoll.plugins.gateway.service import Gateway

POLL_S = 0.05  # how often a waiting start looks again
FIRST_PAUSE_S = 0.5
MAX_PAUSE_S = 30.0


class Gate:
    def __init__(self, gw: Gateway, limit: int) -> None:
        self.gw = gw
        self.limit = limit
        self.running = 0
        self._pause = FIRST_PAUSE_S
        self._paused_until = 0.0

    def open(self, base_model: str | None, labels: dict[str, str]) -> bool:
        return (
            self.running < self.limit
            and self.gw.interactive_waiting == 0
            and asyncio.get_running_loop().time() >= self._paused_until
            and not self.gw.router.saturated(base_model, labels)
        )

    async def enter(
        self, base_model: str | None, labels: dict[str, str], give_up: Callable[[], bool]
    ) -> bool:
        """Wait until a line for ``base_model`` may start, and count it as running; False,
        counting nothing, once ``give_up()`` (the batch stopped meanwhile)."""
        while not self.open(base_model, labels):
            if give_up():
                return False
            await asyncio.sleep(POLL_S)
        self.running += 1
        return True

    def leave(self, overloaded: bool) -> None:
        """A line ended; ``overloaded``: it was refused so, and every start waits a while."""
        self.running -= 1
        if overloaded:
            self._paused_until = asyncio.get_running_loop().time() + self._pause
            self._pause = min(self._pause * 2, MAX_PAUSE_S)
        else:
            self._pause = FIRST_PAUSE_S
