"""The LRU cache of LoRA adapters on one base model, with pinning.

A bad adapter is refused before it touches the model (adapter_checks.py), so a refusal never
disturbs requests being served. The cache keeps adapters in the pool's slots (pool.py), one each;
when none is free, the least recently used one that is neither pinned nor held by a request is
evicted first.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from atoll.agent.metrics import MetricsRegistry
from atoll.plugins.inference.adapter_tiers import TIERS, DiskTier, HostTier
from atoll.plugins.inference.backend import AdapterFetcher
from atoll.plugins.inference.contract import (
    AdapterInfo,
    AdapterRejected,
    Mixture,
    Overloaded,
)
from atoll.plugins.storage.contract.adapters import AdapterNotFound

if TYPE_CHECKING:
    from atoll.plugins.inference.pool import AdapterPool, LoraWeights


@dataclass
class LoadedAdapter:
    """An adapter in a pool slot: what it is, its slot, and the requests holding it now."""

    info: AdapterInfo
    slot: int
    refs: int = 0


class AdapterCache:
    """Which adapters are in the pool's slots, loading and evicting them as requests need.

    ``fetch`` gets an adapter's directory (from the storage agent or a local directory);
    ``validate`` checks it (off the event loop); ``read`` (or ``merge``, for a mixture) runs on
    the pool's loader thread, which copies the result into a slot. Evicting is giving a slot
    back: nothing to undo in the model.
    """

    def __init__(
        self,
        pool: AdapterPool,
        root: Path,
        fetch: AdapterFetcher,
        validate: Callable[[Path, str], AdapterInfo],
        read: Callable[[Path], LoraWeights],
        merge: Callable[[list[Path], Mixture], LoraWeights],
        metrics: MetricsRegistry,
        host: HostTier,
        disk: DiskTier,
    ) -> None:
        self.pool = pool
        self.capacity = pool.slots
        self.root = root  # where fetched adapters are kept on disk
        self.host = host
        self.disk = disk
        self._fetch = fetch
        self._validate = validate
        self._read = read
        self._merge = merge
        self.entries: OrderedDict[str, LoadedAdapter] = OrderedDict()  # LRU order: oldest first
        self._loading: dict[str, asyncio.Future[LoadedAdapter]] = {}
        self._room: deque[asyncio.Future[None]] = deque()  # loads waiting for a slot, in order
        self.hits = metrics.counter("adapter_cache_hits", "Requests whose adapter was loaded")
        self.misses = metrics.counter("adapter_cache_misses", "Requests that had to load it")
        self.loads = metrics.counter("adapter_loads", "Adapters loaded into the pool")
        self.refusals = metrics.counter("adapter_refusals", "Adapters refused at validation")
        self.evictions = metrics.counter("adapter_evictions", "Adapters evicted from the pool")
        self.load_time = metrics.histogram("adapter_load_seconds", "Fetch, check and load time")
        self.slot_time = metrics.histogram(
            "adapter_slot_load_seconds", "Read and copy into a slot (loader thread), until ready"
        )
        self.loaded = metrics.gauge("adapters_loaded", "Adapters loaded now")
        self.found = {
            tier: metrics.counter(
                "adapter_tier_hits",
                "Requests by the highest tier their adapter was in",
                {"tier": tier},
            )
            for tier in TIERS
        }
        self.tier_time = {
            tier: metrics.histogram(
                "adapter_tier_load_seconds",
                "Load time by the tier loaded from",
                labels={"tier": tier},
            )
            for tier in TIERS[1:]
        }
        self.tier_bytes = {
            tier: metrics.gauge("adapter_tier_bytes", "Bytes each tier holds", {"tier": tier})
            for tier in ("host", "disk")
        }

    # --- requests ----------------------------------------------------------------------------

    async def acquire(self, adapter_id: str) -> LoadedAdapter:
        """The loaded adapter, loading it first if needed; holds it until ``release``."""
        entry = self.entries.get(adapter_id)
        if entry is not None:
            self.hits.inc()
            self.found["slots"].inc()
        else:
            self.misses.inc()
            entry = await self._single_flight(adapter_id, lambda: self._load_new(adapter_id))
        self._touch(entry)
        entry.refs += 1
        return entry

    async def acquire_mixture(self, mixture: Mixture) -> LoadedAdapter:
        key = mixture.key()
        entry = self.entries.get(key)
        if entry is not None:
            self.hits.inc()
        else:
            self.misses.inc()
            entry = await self._single_flight(key, lambda: self._merge_new(key, mixture))
        self._touch(entry)
        entry.refs += 1
        return entry

    def release(self, entry: LoadedAdapter) -> None:
        entry.refs -= 1
        if not entry.refs:
            self._wake()

    # --- administration ----------------------------------------------------------------------

    async def load(self, adapter_id: str) -> AdapterInfo:
        entry = self.entries.get(adapter_id) or await self._single_flight(
            adapter_id, lambda: self._load_new(adapter_id)
        )
        self._touch(entry)
        return entry.info

    async def unload(self, adapter_id: str) -> bool:
        entry = self.entries.get(adapter_id)
        if entry is None:
            return False
        if entry.refs:
            raise Overloaded(f"adapter {adapter_id!r} is serving {entry.refs} request(s)")
        self._drop(adapter_id, entry)
        return True

    def pin(self, adapter_id: str, pinned: bool) -> AdapterInfo:
        entry = self.entries.get(adapter_id)
        if entry is None:
            raise AdapterNotFound(f"adapter {adapter_id!r} is not loaded here")
        entry.info.pinned = pinned
        return entry.info

    def infos(self) -> list[AdapterInfo]:
        return [e.info for e in self.entries.values()]

    # --- internals ---------------------------------------------------------------------------

    def _touch(self, entry: LoadedAdapter) -> None:
        self.entries.move_to_end(entry.info.id)

    async def _single_flight(
        self, key: str, make: Callable[[], Awaitable[LoadedAdapter]]
    ) -> LoadedAdapter:
        """Concurrent requests for one missing adapter share one load."""
        pending = self._loading.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[LoadedAdapter] = asyncio.get_running_loop().create_future()
        self._loading[key] = fut
        try:
            entry = await make()
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: waiters get it, nobody else must
            raise
        finally:
            del self._loading[key]
        fut.set_result(entry)
        return entry

    async def _checked(self, adapter_id: str) -> tuple[Path, AdapterInfo, str]:
        """The adapter's directory, what checking it found, and the tier it came from."""
        on_disk = self.disk.holds(adapter_id)
        path = await self._fetch(adapter_id, self.root)
        fetched = not on_disk and path.is_relative_to(self.root)
        try:
            info = await asyncio.to_thread(self._validate, path, adapter_id)
        except AdapterRejected:
            self.refusals.inc()
            if path.is_relative_to(self.root):  # fetched, not an operator's directory
                # Kept, a refused copy would answer for whatever takes its id next.
                self.disk.forget(adapter_id)
                await asyncio.to_thread(shutil.rmtree, path, True)
            raise
        self.disk.used(adapter_id, path)
        if fetched:  # the disk tier grew: the least recently used others may go
            keep = {*self.entries, *self._loading, adapter_id}
            await asyncio.to_thread(self.disk.trim, keep)
        self.tier_bytes["disk"].set(self.disk.bytes)
        return path, info, "storage" if fetched else "disk"

    async def _load_new(self, adapter_id: str) -> LoadedAdapter:
        started = time.perf_counter()
        held = self.host.get(adapter_id)
        if held is not None:  # decoded before: no file to read, check or decode
            info, weights = held
            tier = "host"

            def read() -> LoraWeights:
                return weights

        else:
            path, info, tier = await self._checked(adapter_id)
            checked = info.model_copy()

            def read() -> LoraWeights:
                try:
                    decoded = self._read(path)
                except AdapterRejected as exc:  # damaged past its header: the same refusal
                    raise AdapterRejected(f"adapter {adapter_id!r} refused: {exc}") from None
                self.host.put(checked, decoded)
                return decoded

        entry = await self._into_slot(info, read, started)
        self.loads.inc()
        self.found[tier].inc()
        self.tier_time[tier].observe(time.perf_counter() - started)
        self.tier_bytes["host"].set(self.host.bytes)
        return entry

    async def _merge_new(self, key: str, mixture: Mixture) -> LoadedAdapter:
        started = time.perf_counter()
        parts = [await self._checked(a.id) for a in mixture.adapters]
        first = parts[0][1]
        info = AdapterInfo(
            id=key,
            base_model=first.base_model,
            rank=max(i.rank for _, i, _ in parts),
            target_modules=sorted({t for _, i, _ in parts for t in i.target_modules}),
            mixture=True,
        )
        return await self._into_slot(
            info, lambda: self._merge([p for p, _, _ in parts], mixture), started
        )

    async def _into_slot(
        self, info: AdapterInfo, read: Callable[[], LoraWeights], started: float
    ) -> LoadedAdapter:
        """Take a slot (evicting if needed) and have the pool's loader fill it."""
        await self._make_room()
        slot = self.pool.take()
        copying = time.perf_counter()
        loaded = asyncio.wrap_future(self.pool.load(slot, read))
        try:
            await asyncio.shield(loaded)
        except asyncio.CancelledError:
            # The loader may still be writing: the slot is free again only once it is done.
            loaded.add_done_callback(lambda _: self._give_back(slot))
            raise
        except BaseException:
            self._give_back(slot)
            raise
        now = time.perf_counter()
        info.loaded = True
        info.load_seconds = now - started
        entry = LoadedAdapter(info=info, slot=slot)
        self.entries[info.id] = entry
        self.slot_time.observe(now - copying)
        self.load_time.observe(info.load_seconds)
        self.loaded.set(len(self.entries))
        return entry

    async def _make_room(self) -> None:
        """Evict least recently used adapters until a slot is free. While every slot is held by
        requests (running, queued or loading), wait in line for one: a request's load starts as
        soon as a slot frees; only pinned adapters filling the pool refuse it."""
        while not self.pool.free:
            victim = next(
                (k for k, e in self.entries.items() if not e.refs and not e.info.pinned), None
            )
            if victim is not None:
                self._drop(victim, self.entries[victim])
                self.evictions.inc()
                continue
            if all(e.info.pinned for e in self.entries.values()) and len(self.entries) == (
                self.capacity
            ):
                raise Overloaded(f"all {self.capacity} adapter slots are pinned or serving")
            turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._room.append(turn)
            try:
                await turn
            finally:
                if turn in self._room:
                    self._room.remove(turn)
        if self.pool.free > 1:
            self._wake()  # room for the next in line too

    def _wake(self) -> None:
        while self._room:
            turn = self._room.popleft()
            if not turn.done():
                turn.set_result(None)
                return

    def _give_back(self, slot: int) -> None:
        self.pool.give_back(slot)
        self._wake()

    def _drop(self, key: str, entry: LoadedAdapter) -> None:
        del self.entries[key]
        self.pool.give_back(entry.slot)
        self.loaded.set(len(self.entries))
