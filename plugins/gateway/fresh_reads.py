"""Store reads shared by concurrent requests without ever answering one with a stale read.

On PostgreSQL a key check the cache cannot answer (keys.py: the first use of a key since a
change was notified) is a round trip made in a worker thread (accounts ``offload``), and at
concurrency 32 most requests carry the same key: one thread hop and one query each cost the
gateway more CPU (GIL hand-offs) than the rest of the request. The barrier before a cache hit
(accounts/changes.py) is shared the same way. Requests asking the same
thing while a read of it is under way wait for the *next* read, which starts when that one ends
and answers all of them: every answer comes from a read that began after its request arrived,
so a key revoked through another gateway is refused from the next request on, as before, and
the number of reads in flight per key is one."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class FreshReads(Generic[K, V]):
    """``await reads(key)``: ``read(key)``'s answer (or its exception), shared as above."""

    def __init__(self, read: Callable[[K], Awaitable[V]]) -> None:
        self._read = read
        self._running: dict[K, asyncio.Future[V]] = {}  # a read under way
        self._next: dict[K, asyncio.Future[V]] = {}  # joined by arrivals during it
        self._tasks: set[asyncio.Task[None]] = set()  # held: the loop keeps only weak references

    async def __call__(self, key: K) -> V:
        if (waiting := self._next.get(key)) is None:
            waiting = asyncio.get_running_loop().create_future()
            if key in self._running:
                self._next[key] = waiting  # starts when the running read ends
            else:
                self._start(key, waiting)
        # shield: one request giving up must not cancel the read others wait on
        return await asyncio.shield(waiting)

    def _start(self, key: K, answer: asyncio.Future[V]) -> None:
        self._running[key] = answer
        task = asyncio.get_running_loop().create_task(self._run(key, answer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, key: K, answer: asyncio.Future[V]) -> None:
        try:
            answer.set_result(await self._read(key))
        except asyncio.CancelledError:
            answer.cancel()
            raise
        except Exception as exc:  # handed to every waiter
            answer.set_exception(exc)
            answer.exception()  # retrieved: waiters that gave up leave no "never retrieved"
        finally:
            del self._running[key]
            if (queued := self._next.pop(key, None)) is not None:
                self._start(key, queued)
