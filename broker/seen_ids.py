"""The mesh's memory of frames it relayed, so that a second copy (arriving over a cycle) is
dropped: exact, bounded to the last ``size`` ids, and of a size fixed when it is made."""

from __future__ import annotations

from array import array
from collections.abc import Hashable

MASK = (1 << 64) - 1
ZERO = 0x9E3779B97F4A7C15  # stands for a hash of 0 (0 marks an empty slot): any other 64-bit value


class SeenIds:
    """The last ``size`` ids seen, as 64-bit hashes in two arrays allocated once: a ring in
    arrival order (the oldest is forgotten first) and an open-addressing table twice as large to
    find them (linear probing; deletion shifts the run back, so no tombstones build up).

    24 bytes an id, taken at start and never more (1.5 MiB at 65,536): a set and a deque grew
    to ~6 MB as they filled, which a 10-minute soak read as the broker leaking. A false "seen"
    needs two keys' 64-bit hashes to collide within the window, about 1e-10 at 65,536; str
    hashes are salted per process, so a peer cannot aim for one."""

    def __init__(self, size: int = 65536) -> None:
        if size < 1:
            raise ValueError("size must be at least 1")
        slots = 1 << (2 * size - 1).bit_length()  # a power of two, at least twice the ring
        self._mask = slots - 1
        self._table = array("Q", bytes(8 * slots))  # 0: an empty slot
        self._ring = array("Q", bytes(8 * size))
        self._size = size
        self._held = 0
        self._next = 0  # the ring's slot for the next id (the oldest one once full)

    def add(self, key: Hashable) -> bool:
        """Remember ``key``; False if it was already remembered (a second copy)."""
        digest = (hash(key) & MASK) or ZERO
        if self._find(digest) is not None:
            return False
        if self._held == self._size:
            self._remove(self._ring[self._next])
        else:
            self._held += 1
        table, mask = self._table, self._mask
        i = digest & mask
        while table[i]:
            i = (i + 1) & mask
        table[i] = digest
        self._ring[self._next] = digest
        self._next = (self._next + 1) % self._size
        return True

    def __len__(self) -> int:
        return self._held

    def _find(self, digest: int) -> int | None:
        table, mask = self._table, self._mask
        i = digest & mask
        while found := table[i]:
            if found == digest:
                return i
            i = (i + 1) & mask
        return None

    def _remove(self, digest: int) -> None:
        table, mask = self._table, self._mask
        hole = self._find(digest)
        assert hole is not None  # every id in the ring is in the table
        j = hole
        while entry := table[j := (j + 1) & mask]:
            # The entry may fill the hole unless its home slot lies after the hole (cyclically)
            if (j - (entry & mask)) & mask >= (j - hole) & mask:
                table[hole] = entry
                hole = j
        table[hole] = 0
