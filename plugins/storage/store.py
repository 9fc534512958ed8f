"""Object stores: where the storage plugin keeps bytes, under flat ``/``-separated keys.

The interface is async because the S3 implementation (boto3, ``s3.py``) blocks on the network; a
store does its blocking work in threads, never on the event loop. Semantics follow S3 so that one
can replace the other: objects are whole (a reader never sees a partial object: ``put`` writes to
a temporary name and renames), ``list`` matches a string prefix, ``delete`` of a missing key is not
an error, and there are no directories, only keys.
"""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import os
import shutil
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, TypeVar

from atoll.agent.transfer import READ_SIZE, STAGING, file_chunks, sha256_file, write_and_hash

MAX_KEY_CHARS = 1024
T = TypeVar("T")


class InvalidKey(ValueError):
    """A key that could escape the store or that names no object (``..``, absolute, NUL...)."""


class ObjectNotFound(LookupError):
    """No object under that key."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    sha256: str
    mtime: float  # epoch seconds of the last put


def check_key(key: object) -> str:
    """``key`` if it is a safe relative ``/``-separated name; InvalidKey otherwise."""
    if not isinstance(key, str) or not key:
        raise InvalidKey("an object key must be a non-empty string")
    if len(key) > MAX_KEY_CHARS:
        raise InvalidKey(f"object key is longer than {MAX_KEY_CHARS} characters")
    if "\x00" in key or "\\" in key:
        raise InvalidKey(f"object key {key!r} contains a NUL or a backslash")
    if key.startswith("/"):
        raise InvalidKey(f"object key {key!r} is absolute; keys are relative")
    parts = key.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise InvalidKey(f"object key {key!r} has an empty, '.' or '..' segment")
    if parts[0] == STAGING:
        raise InvalidKey(f"object key {key!r} uses the reserved name {STAGING}")
    return key


def check_prefix(prefix: object) -> str:
    """``prefix`` if it lists only inside the store (its complete segments form a valid key)."""
    if not isinstance(prefix, str) or "\x00" in prefix or "\\" in prefix:
        raise InvalidKey(f"bad key prefix {prefix!r}")
    base = prefix.rpartition("/")[0]
    if base:
        check_key(base)
    return prefix


class ObjectStore(ABC):
    kind: ClassVar[str] = ""

    @abstractmethod
    async def put(self, key: str, data: bytes | AsyncIterable[bytes]) -> ObjectInfo:
        """Store ``data`` under ``key`` atomically, replacing any object there."""

    async def put_file(self, key: str, path: Path) -> ObjectInfo:
        """Store a local file's content under ``key``."""
        return await self.put(key, file_chunks(Path(path)))

    async def put_and_register(
        self, files: Iterable[tuple[str, Path]], register: Callable[[], T]
    ) -> T:
        """Store each ``(key, file)``, then ``register()`` them; on any failure remove what was
        put, so an object nobody registered is never left behind."""
        keys: builtins.list[str] = []
        try:
            for key, path in files:
                keys.append(key)
                await self.put_file(key, path)
            return register()
        except BaseException:
            for key in keys:
                await self.delete(key)
            raise

    @abstractmethod
    def read(self, key: str) -> AsyncGenerator[bytes, None]:
        """The object's bytes in chunks; ObjectNotFound (on first iteration) if there is none."""

    async def get(self, key: str) -> bytes:
        return b"".join([chunk async for chunk in self.read(key)])

    @abstractmethod
    async def stat(self, key: str) -> ObjectInfo:
        """Size, sha256 and mtime; ObjectNotFound if there is no such object."""

    @abstractmethod
    async def exists(self, key: str) -> bool: ...

    @abstractmethod
    async def list(self, prefix: str = "") -> list[str]:
        """Sorted keys starting with ``prefix`` (a plain string prefix, as in S3)."""

    @abstractmethod
    async def delete(self, key: str) -> bool:
        """Remove the object; False if there was none."""


class LocalStore(ObjectStore):
    """Objects as files under ``root`` (a key ``a/b`` is ``root/a/b``). Temporary files live in
    ``root/.atoll-staging`` (the same file system, so the final rename is atomic); those left by
    a crash are removed when a store opens the root, so a root belongs to one store at a time."""

    kind = "local"

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self._staging = self.root / STAGING
        shutil.rmtree(self._staging, ignore_errors=True)
        self._staging.mkdir(parents=True, exist_ok=True)
        # Renames into place and pruning of emptied directories must not interleave (a prune
        # could remove the directory a put is about to rename into).
        self._tree_lock = threading.Lock()
        self._digests: dict[str, tuple[int, int, str]] = {}  # key -> (size, mtime_ns, sha256)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    async def put(self, key: str, data: bytes | AsyncIterable[bytes]) -> ObjectInfo:
        dest = self._path(key)
        fd, tmp_name = tempfile.mkstemp(dir=self._staging, prefix="put-")
        tmp = Path(tmp_name)
        digest = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as fh:
                if isinstance(data, bytes | bytearray | memoryview):
                    await asyncio.to_thread(write_and_hash, fh, digest, bytes(data))
                else:
                    async for chunk in data:
                        await asyncio.to_thread(write_and_hash, fh, digest, chunk)
                fh.flush()
                await asyncio.to_thread(os.fsync, fh.fileno())
            await asyncio.to_thread(self._commit, key, tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        st = dest.stat()
        self._digests[key] = (st.st_size, st.st_mtime_ns, digest.hexdigest())
        return ObjectInfo(key, st.st_size, digest.hexdigest(), st.st_mtime)

    def _commit(self, key: str, tmp: Path, dest: Path) -> None:
        with self._tree_lock:
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, dest)
            except (NotADirectoryError, FileExistsError, IsADirectoryError):
                raise InvalidKey(f"object key {key!r} collides with another object") from None
            dir_fd = os.open(dest.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # the rename itself survives a crash
            finally:
                os.close(dir_fd)

    async def read(self, key: str) -> AsyncGenerator[bytes, None]:
        path = self._path(key)
        try:
            fh = path.open("rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ObjectNotFound(f"no object {key!r}") from None
        with fh:
            while block := await asyncio.to_thread(fh.read, READ_SIZE):
                yield block

    async def stat(self, key: str) -> ObjectInfo:
        path = self._path(key)
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectNotFound(f"no object {key!r}") from None
        if not path.is_file():
            raise ObjectNotFound(f"no object {key!r}")
        cached = self._digests.get(key)
        if cached is not None and cached[:2] == (st.st_size, st.st_mtime_ns):
            sha = cached[2]
        else:  # written before this store opened, or changed behind its back
            sha = (await asyncio.to_thread(sha256_file, path)).hexdigest()
            self._digests[key] = (st.st_size, st.st_mtime_ns, sha)
        return ObjectInfo(key, st.st_size, sha, st.st_mtime)

    async def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    async def list(self, prefix: str = "") -> list[str]:
        base = check_prefix(prefix).rpartition("/")[0]
        top = self._path(base) if base else self.root
        return await asyncio.to_thread(self._walk, top, prefix)

    def _walk(self, top: Path, prefix: str) -> builtins.list[str]:  # ``list``: the method
        keys = []
        for dirpath, dirnames, filenames in os.walk(top):
            here = Path(dirpath)
            if here == self.root:
                dirnames[:] = [d for d in dirnames if d != STAGING]
            for name in filenames:
                key = (here / name).relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    async def delete(self, key: str) -> bool:
        path = self._path(key)
        self._digests.pop(key, None)
        return await asyncio.to_thread(self._remove, path)

    def _remove(self, path: Path) -> bool:
        with self._tree_lock:
            try:
                path.unlink()
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                return False
            # Keys have no directories: drop the ones this delete emptied.
            parent = path.parent
            while parent != self.root:
                try:
                    parent.rmdir()
                except OSError:  # not empty
                    break
                parent = parent.parent
            return True
