"""The adapter tiers below the pool's slots, each bounded in bytes: decoded adapters in host
memory (pinned where a GPU copies from them), then the adapter directories on the node's disk;
below those, the storage agent over the data plane.

A load takes an adapter from the highest tier holding it: the host tier skips reading, checking
and decoding the file; the disk tier skips the transfer. Both forget the least recently used
adapters first; the disk tier never removes a directory an adapter being loaded or held in a slot
came from, nor one of the operator's own adapter directories (only what it fetched)."""

from __future__ import annotations

import shutil
import threading
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from atoll.plugins.inference.contract import AdapterInfo

if TYPE_CHECKING:  # torch only where adapters are decoded: the local backend
    from atoll.plugins.inference.pool import LoraWeights

TIERS = ("slots", "host", "disk", "storage")  # where a requested adapter was found


def weights_bytes(weights: LoraWeights) -> int:
    return sum(a.nbytes + b.nbytes for a, b in weights.values())


class HostTier:
    """Decoded adapters (and what checking them found) in host memory, up to ``capacity`` bytes.
    Filled on the pool's loader thread, read on the event loop: a lock guards it."""

    def __init__(self, capacity: int, pin: bool) -> None:
        self.capacity = capacity
        self.pin = pin  # page-locked: the copy to the GPU runs without staging
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[AdapterInfo, LoraWeights, int]] = OrderedDict()
        self.bytes = 0

    def get(self, adapter_id: str) -> tuple[AdapterInfo, LoraWeights] | None:
        with self._lock:
            found = self._entries.get(adapter_id)
            if found is None:
                return None
            self._entries.move_to_end(adapter_id)
            return found[0].model_copy(), found[1]

    def put(self, info: AdapterInfo, weights: LoraWeights) -> None:
        size = weights_bytes(weights)
        if size > self.capacity:
            return  # bigger than the whole tier: it would only push everything else out
        if self.pin:
            weights = {m: (a.pin_memory(), b.pin_memory()) for m, (a, b) in weights.items()}
        with self._lock:
            old = self._entries.pop(info.id, None)
            if old is not None:
                self.bytes -= old[2]
            self._entries[info.id] = (info.model_copy(), weights, size)
            self.bytes += size
            while self.bytes > self.capacity:
                _, (_, _, dropped) = self._entries.popitem(last=False)
                self.bytes -= dropped

    def forget(self, adapter_id: str) -> None:
        with self._lock:
            old = self._entries.pop(adapter_id, None)
            if old is not None:
                self.bytes -= old[2]


class DiskTier:
    """Adapter directories fetched under ``root``, up to ``capacity`` bytes, by last use."""

    def __init__(self, root: Path, capacity: int) -> None:
        self.root = root
        self.capacity = capacity
        self._sizes: OrderedDict[str, int] = OrderedDict()  # adapter id -> bytes; oldest first
        # What a previous run fetched, oldest first by when its files were written.
        found = list(root.glob("**/adapter_config.json")) if root.is_dir() else []
        for config in sorted(found, key=lambda c: c.stat().st_mtime):
            self._sizes[config.parent.relative_to(root).as_posix()] = _size(config.parent)

    @property
    def bytes(self) -> int:
        return sum(self._sizes.values())

    def holds(self, adapter_id: str) -> bool:
        return adapter_id in self._sizes

    def used(self, adapter_id: str, path: Path) -> None:
        """``adapter_id`` was read from ``path``: the most recently used (if it is one of ours)."""
        if not path.is_relative_to(self.root):
            return  # an operator's directory: not ours to count or remove
        if adapter_id in self._sizes:
            self._sizes.move_to_end(adapter_id)
        else:
            self._sizes[adapter_id] = _size(path)

    def forget(self, adapter_id: str) -> None:
        self._sizes.pop(adapter_id, None)

    def trim(self, keep: Iterable[str]) -> list[str]:
        """Remove the least recently used directories (but those in ``keep``) until the tier
        fits; returns the ids removed. Blocking: run it off the event loop."""
        kept = set(keep)
        removed = []
        total = self.bytes
        for adapter_id in list(self._sizes):
            if total <= self.capacity:
                break
            if adapter_id in kept:
                continue
            shutil.rmtree(self.root / adapter_id, ignore_errors=True)
            total -= self._sizes.pop(adapter_id)
            removed.append(adapter_id)
        return removed


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def pinnable() -> bool:
    """Host memory can be page-locked for faster copies: only where a GPU copies from it."""
    import torch

    return torch.cuda.is_available()
