"""Encryption at rest: an ObjectStore that seals what it puts into another (local or S3) with
envelope encryption. Each object gets a fresh random data key (sealing.py's chunked format); the
data key, wrapped by the tenant's current KEK (keyring.py), is kept in the registry's
``object_keys`` table with the object's plaintext size and sha256, never beside the object. So
rotating a KEK re-wraps rows and rewrites no object, and deleting a row leaves its object
unreadable anywhere a copy survives (backups, S3 versions).

Objects written before sealing was on, or with ``encrypt = false``, stay plaintext and still read:
an object with no key row is read as it is, unless it begins with the sealed header's magic (a
sealed object whose data key is gone); an object with a key row must be sealed (an object swapped
for plaintext behind the store's back is refused, not served).
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import sqlite3
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator
from typing import Any

from atoll.plugins.storage.contract.wire import ObjectDamaged
from atoll.plugins.storage.keyring import Keyring
from atoll.plugins.storage.sealing import HEADER, Opener, Sealer, is_sealed
from atoll.plugins.storage.store import ObjectInfo, ObjectNotFound, ObjectStore, check_key

# A read that meets a put or delete of its key half committed tries again, for about a second.
RACE_TRIES = 20
RACE_PAUSE = 0.05


class SealedStore(ObjectStore):
    """``inner`` with envelope encryption; ``seal`` False: new objects go in as plaintext
    (sealed ones still read)."""

    def __init__(self, inner: ObjectStore, keyring: Keyring, db: sqlite3.Connection, seal: bool):
        self.inner = inner
        self.keyring = keyring
        self.db = db  # the registry's connection, used from the event loop only
        self.seal = seal

    def _row(self, key: str) -> tuple[bytes, str, bytes, int, str, float] | None:
        found: tuple[bytes, str, bytes, int, str, float] | None = self.db.execute(
            "SELECT object_id, kek, wrapped, size, sha256, created FROM object_keys WHERE key = ?",
            (key,),
        ).fetchone()
        return found

    async def put(self, key: str, data: bytes | AsyncIterable[bytes]) -> ObjectInfo:
        check_key(key)
        if not self.seal:
            self.db.execute("DELETE FROM object_keys WHERE key = ?", (key,))
            return await self.inner.put(key, data)
        data_key, object_id = secrets.token_bytes(32), secrets.token_bytes(16)
        sealer = Sealer(data_key, object_id, key)
        digest, size = hashlib.sha256(), 0

        async def sealed() -> AsyncIterator[bytes]:
            nonlocal size
            yield sealer.header
            chunks = [bytes(data)] if isinstance(data, bytes | bytearray | memoryview) else data
            async for chunk in _each(chunks):
                digest.update(chunk)
                size += len(chunk)
                if out := await asyncio.to_thread(sealer.feed, chunk):
                    yield out
            yield sealer.finish()

        await self.inner.put(key, sealed())
        kek, wrapped = self.keyring.wrap(data_key, key)
        now = time.time()
        self.db.execute(
            "INSERT INTO object_keys (key, object_id, kek, wrapped, size, sha256, created) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET "
            "object_id = excluded.object_id, kek = excluded.kek, wrapped = excluded.wrapped, "
            "size = excluded.size, sha256 = excluded.sha256, created = excluded.created",
            (key, object_id, kek, wrapped, size, digest.hexdigest(), now),
        )
        return ObjectInfo(key, size, digest.hexdigest(), now)

    async def read(self, key: str) -> AsyncGenerator[bytes, None]:
        check_key(key)
        for tries_left in reversed(range(RACE_TRIES)):
            chunks = self.inner.read(key)
            head = b""
            while len(head) < HEADER.size and (more := await anext(chunks, b"")):
                head += more
            # The row after the object is open: a put or delete of this key between the two
            # (object and row are not changed in one step) shows as an object id that does not
            # match its row, and is read again once it has committed.
            row = self._row(key)
            sealed = is_sealed(head)
            if (row is None and not sealed) or (
                row is not None and sealed and _object_id(head) in (row[0], None)
            ):
                break  # (a header cut short is the Opener's to refuse)
            await chunks.aclose()
            if not tries_left:
                raise ObjectDamaged(f"stored object {key!r} {_mismatch(row is None, sealed)}")
            await asyncio.sleep(RACE_PAUSE)
        if row is None:
            if head:
                yield head
            async for chunk in chunks:
                yield chunk
            return
        object_id, kek, wrapped = row[:3]
        opener = Opener(self.keyring.unwrap(kek, wrapped, key), key, object_id)
        chunk = head
        while chunk:
            if plain := await asyncio.to_thread(opener.feed, chunk):
                yield plain
            chunk = await anext(chunks, b"")
        if last := opener.finish():
            yield last

    async def stat(self, key: str) -> ObjectInfo:
        row = self._row(check_key(key))
        if row is None:
            return await self.inner.stat(key)
        if not await self.inner.exists(key):
            raise ObjectNotFound(f"no object {key!r}")
        return ObjectInfo(key, row[3], row[4], row[5])

    async def exists(self, key: str) -> bool:
        return await self.inner.exists(key)

    async def list(self, prefix: str = "") -> list[str]:
        return await self.inner.list(prefix)

    async def delete(self, key: str) -> bool:
        # The data key first: from here on no copy of the object can be read.
        self.db.execute("DELETE FROM object_keys WHERE key = ?", (check_key(key),))
        return await self.inner.delete(key)

    def rotate(self) -> dict[str, Any]:
        """A new current KEK; every data key re-wrapped under it in one transaction; the KEKs
        no data key needs any more retired. The objects are not touched."""
        kek = self.keyring.rotate()
        self.db.execute("BEGIN IMMEDIATE")
        try:
            rows = self.db.execute(
                "SELECT key, kek, wrapped FROM object_keys WHERE kek != ?", (kek,)
            ).fetchall()
            for key, old, wrapped in rows:
                _, rewrapped = self.keyring.wrap(self.keyring.unwrap(old, wrapped, key), key)
                self.db.execute(
                    "UPDATE object_keys SET kek = ?, wrapped = ? WHERE key = ?",
                    (kek, rewrapped, key),
                )
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        in_use = {k for (k,) in self.db.execute("SELECT DISTINCT kek FROM object_keys")}
        return {"kek": kek, "rewrapped": len(rows), "retired": self.keyring.retire(in_use)}


def _object_id(head: bytes) -> bytes | None:
    return HEADER.unpack(head[: HEADER.size])[3] if len(head) >= HEADER.size else None


def _mismatch(keyless: bool, sealed: bool) -> str:
    if keyless:
        return "is sealed, but its data key is gone"
    if not sealed:
        return "is damaged: it should be sealed and is not (replaced)"
    return "is damaged: its data key seals another object (replaced)"


async def _each(chunks: AsyncIterable[bytes] | list[bytes]) -> AsyncIterator[bytes]:
    if isinstance(chunks, list):
        for chunk in chunks:
            yield chunk
    else:
        async for chunk in chunks:
            yield chunk
