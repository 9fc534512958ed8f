"""FreshReads (fresh_reads.py): concurrent asks share reads, but never one that began before
they were asked."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from atoll.plugins.gateway.fresh_reads import FreshReads


class Store:
    """A read that holds until released, recording the order of events."""

    def __init__(self) -> None:
        self.clock = itertools.count()
        self.started: list[tuple[str, int]] = []  # (key, time the read began)
        self.gates: list[asyncio.Event] = []
        self.fail: set[str] = set()

    async def read(self, key: str) -> int:
        began = next(self.clock)
        self.started.append((key, began))
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()
        if key in self.fail:
            raise LookupError(f"no {key}")
        return began

    async def release(self, tasks: list[asyncio.Task[int]]) -> None:
        """Let every read finish, those queued behind others too, until ``tasks`` are done."""
        for _ in range(100):
            for gate in self.gates:
                gate.set()
            await asyncio.sleep(0.001)
            if all(t.done() for t in tasks):
                return
        raise AssertionError("reads never finished")


async def test_concurrent_asks_share_reads_begun_after_they_asked() -> None:
    store = Store()
    reads: FreshReads[str, int] = FreshReads(store.read)
    asked: dict[int, int] = {}

    async def ask(i: int) -> int:
        asked[i] = next(store.clock)
        return await reads("k")

    first = [asyncio.create_task(ask(i)) for i in range(5)]
    await asyncio.sleep(0.01)
    assert len(store.started) == 1  # one read for the five
    later = [asyncio.create_task(ask(i)) for i in range(5, 20)]
    await asyncio.sleep(0.01)
    assert len(store.started) == 1  # the fifteen wait for the next read, not this one
    other = asyncio.create_task(reads("other"))
    await asyncio.sleep(0.01)
    assert [k for k, _ in store.started] == ["k", "other"]  # another key is not held up
    await store.release([*first, *later, other])
    answers = [t.result() for t in first + later]
    assert len(store.started) == 3  # 20 asks of "k", two reads
    for i, began in enumerate(answers):
        assert began > asked[i]  # every answer from a read that began after the ask
    assert await other == store.started[1][1]


async def test_a_failed_read_fails_its_waiters_and_the_next_read_is_fresh() -> None:
    store = Store()
    store.fail.add("k")
    reads: FreshReads[str, int] = FreshReads(store.read)
    waiters = [asyncio.create_task(reads("k")) for _ in range(3)]
    await store.release(waiters)
    for task in waiters:
        with pytest.raises(LookupError, match="no k"):
            await task
    store.fail.clear()
    again = asyncio.create_task(reads("k"))
    await store.release([again])
    assert await again == store.started[-1][1]


async def test_a_waiter_giving_up_does_not_cancel_the_read_others_wait_on() -> None:
    store = Store()
    reads: FreshReads[str, int] = FreshReads(store.read)
    holder = asyncio.create_task(reads("k"))
    await asyncio.sleep(0.01)
    quitter = asyncio.create_task(reads("k"))  # these two share the next read
    stayer = asyncio.create_task(reads("k"))
    await asyncio.sleep(0.01)
    quitter.cancel()
    holder.cancel()  # the only waiter of the running read gives up too
    await store.release([stayer])
    assert await stayer == store.started[1][1]
    assert quitter.cancelled() and holder.cancelled()
    assert len(store.started) == 2
