"""The data plane's one transfer path: how the ``files`` plugin and the storage plugin's adapter
and dataset services move files over encrypted streams.

- Header lines: one JSON object per line, read by a buffered ``Reader`` (bounded length, each
  read bounded by an idle timeout) that keeps what it read past the newline for the body.
- Bodies: ``send_bytes`` writes exactly the declared size from chunks (``file_chunks`` reads a
  file in a thread); ``receive_bytes`` appends to an open file while hashing, writing back as it
  goes and fsyncing at the end; a sha256 that does not match is ``TransferFailed``.
- Staging, one convention: a file (or an adapter's directory) being received lives in the hidden
  ``.atoll-staging/`` directory beside its destination and is renamed into place only once its
  size and sha256 match, so a partial file is never visible. The files plugin keeps a staged
  file between attempts and resumes it for the same source version (``resume_offset``).
- Streams: ``open_transfer`` opens one; ``put_files`` and ``fetching`` are the client ends of a
  put (header, bodies, the receiver's ``confirmed`` reply: training jobs' resume states, replaced
  whole) and a get (header and bodies read, then ``{"ok": true}`` back); ``put_resumable`` is a
  put the receiver answers with what it already holds of each file, so only the rest is sent
  (the storage plugin's adapter and dataset uploads).

Nothing here writes through a symbolic link: files are opened with ``O_NOFOLLOW`` and a staging
directory that is a link is refused.

It runs past 400 lines because it is that one path whole (files, header lines, bodies, staging,
both ends of a stream): split, the files plugin and storage could drift into two ways to move bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import IO, Any, Literal, Protocol

from atoll.agent.contract import Progress, counter
from atoll.agent.errors import AtollError, DeadlineExceeded, Forbidden, InvalidRequest
from atoll.agent.streams import Stream, StreamReset
from atoll.protocol.streams import WINDOW

STAGING = ".atoll-staging"
READ_SIZE = 1024 * 1024
TRANSFER_WINDOW = 16 * 1024 * 1024  # bulk data: a deep window keeps the pipe full
SYNC_EVERY = 32 * 1024 * 1024
MAX_HEADER_BYTES = 64 * 1024
IDLE_TIMEOUT = 60.0  # seconds a transfer may go without progress before it is given up
OPEN_TIMEOUT = 30.0

OpenMode = Literal["rb", "r+b", "xb"]
_OPEN_FLAGS: dict[OpenMode, int] = {
    "rb": os.O_RDONLY,
    "r+b": os.O_RDWR,
    "xb": os.O_WRONLY | os.O_CREAT | os.O_EXCL,
}


class Opener(Protocol):
    """What a transfer needs from the overlay (an ``Agent`` or a ``PluginContext``)."""

    async def open_stream(
        self,
        dst: str,
        service: str,
        params: Any = None,
        timeout: float = OPEN_TIMEOUT,
        window: int = WINDOW,
    ) -> Stream: ...


class TransferFailed(AtollError):
    """A transfer that cannot succeed by retrying (bad checksum, missing file, refused path)."""


# --- files ----------------------------------------------------------------------------------


def open_nofollow(path: Path, mode: OpenMode = "rb") -> IO[bytes]:
    """Open without following a symbolic link in the last component (``O_NOFOLLOW``): a link
    swapped in after a path was checked is refused instead of read or written through (``xb``
    creates a new file, never through a link)."""
    flags = _OPEN_FLAGS[mode] | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Forbidden(f"{path} is a symbolic link") from None
        raise
    return os.fdopen(fd, mode)


def sha256_file(path: Path, limit: int | None = None) -> hashlib._Hash:
    """The sha256 of ``path``'s first ``limit`` bytes (all: None). Blocking: run it in a thread."""
    digest = hashlib.sha256()
    remaining = limit
    with open_nofollow(path) as fh:
        while remaining is None or remaining > 0:
            block = fh.read(READ_SIZE if remaining is None else min(READ_SIZE, remaining))
            if not block:
                break
            digest.update(block)
            if remaining is not None:
                remaining -= len(block)
    return digest


def version_of(path: Path) -> str:
    """What identifies this exact content for resuming: size and modification time."""
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


async def file_chunks(
    path: Path, offset: int = 0, end: int | None = None, *, nofollow: bool = False
) -> AsyncIterator[bytes]:
    """``path``'s bytes from ``offset`` to ``end`` (its end: None). ``nofollow``: a link as the
    last component is refused (Forbidden). Blocks are read on the loop, as the files plugin always
    read them: what is sent is being hashed meanwhile or was just hashed or written, so it comes
    from the page cache, and a thread hop per block cost ~5% of the sender's throughput
    (bench/dataplane.py)."""
    with open_nofollow(path) if nofollow else path.open("rb") as fh:
        fh.seek(offset)
        at = offset
        while end is None or at < end:
            size = READ_SIZE if end is None else min(READ_SIZE, end - at)
            block = fh.read(size)
            if not block:
                return
            at += len(block)
            yield block


def write_and_hash(fh: IO[bytes], digest: hashlib._Hash, chunk: bytes) -> None:
    """Both release the GIL: run in a thread, the loop meanwhile takes in the next chunks."""
    fh.write(chunk)
    digest.update(chunk)


def check_sha256(digest: hashlib._Hash, expected: object, name: str) -> None:
    if digest.hexdigest() != expected:
        raise TransferFailed(
            f"checksum mismatch for {name}: sha256 {digest.hexdigest()} does not match the "
            f"declared {expected}"
        )


# --- header lines -----------------------------------------------------------------------------


class Reader:
    """Reads JSON header lines and byte runs from a stream, each read bounded by ``idle`` seconds
    (None: no bound); keeps what a line read took past the newline for the reads after it."""

    def __init__(self, stream: Stream, idle: float | None = IDLE_TIMEOUT) -> None:
        self.stream = stream
        self.idle = idle
        self._left = b""

    async def read(self, n: int) -> bytes:
        """Up to ``n`` bytes; b"" once the other side has ended."""
        if self._left:
            chunk, self._left = self._left[:n], self._left[n:]
            return chunk
        if self.idle is None:
            return await self.stream.read(n)
        async with asyncio.timeout(self.idle):
            return await self.stream.read(n)

    async def line(self, limit: int = MAX_HEADER_BYTES) -> dict[str, Any]:
        """One JSON object line of at most ``limit`` bytes."""
        buf = bytearray()
        while (end := buf.find(b"\n")) < 0:
            if len(buf) > limit:
                raise InvalidRequest(f"header line longer than {limit} bytes")
            chunk = await self.read(limit + 1 - len(buf))
            if not chunk:
                raise StreamReset("the stream ended before a complete header line")
            buf += chunk
        if end > limit:
            raise InvalidRequest(f"header line longer than {limit} bytes")
        self._left = bytes(buf[end + 1 :]) + self._left
        try:
            obj = json.loads(buf[:end])
        except ValueError:
            raise InvalidRequest("malformed header line: not JSON") from None
        if not isinstance(obj, dict):
            raise InvalidRequest("malformed header line: not a JSON object")
        return obj


async def write_line(
    stream: Stream, obj: dict[str, Any], idle: float | None = IDLE_TIMEOUT
) -> None:
    async with asyncio.timeout(idle):
        await stream.write(json.dumps(obj).encode() + b"\n")


async def confirmed(reader: Reader, refusal: str) -> dict[str, Any]:
    """The other side's last line, which must say ``"ok": true``; otherwise TransferFailed led by
    ``refusal`` (who did not confirm what)."""
    reply = await reader.line()
    if reply.get("ok") is not True:
        raise TransferFailed(f"{refusal}: {reply}")
    return reply


# --- bodies -----------------------------------------------------------------------------------


async def send_bytes(
    stream: Stream,
    chunks: AsyncIterable[bytes],
    size: int,
    idle: float | None = IDLE_TIMEOUT,
    on_chunk: Callable[[int], None] | None = None,
) -> None:
    """Write exactly ``size`` bytes from ``chunks``, reporting each chunk's length."""
    have = 0
    iterator = aiter(chunks)
    while True:
        async with asyncio.timeout(idle):
            chunk = await anext(iterator, b"")
            if not chunk:
                break
            have += len(chunk)
            if have > size:
                raise TransferFailed(f"a file grew past its declared {size} bytes while sent")
            await stream.write(chunk)
        if on_chunk:
            on_chunk(len(chunk))
    if have != size:
        raise TransferFailed(f"a file shrank to {have} of its declared {size} bytes while sent")


async def receive_bytes(
    reader: Reader,
    fh: IO[bytes],
    digest: hashlib._Hash,
    size: int,
    on_chunk: Callable[[int], None] | None = None,
) -> None:
    """Append the stream's next ``size`` bytes to ``fh``, hashing them into ``digest``; the file
    is written back as it goes (in a thread, so the final fsync has little left) and fsynced at
    the end. A stream that ends early is a StreamReset (a retry may resume)."""
    left = size
    written = 0
    syncing: asyncio.Future[None] | None = None
    try:
        while left:
            chunk = await reader.read(left)
            if not chunk:
                raise StreamReset(f"the stream ended {left} bytes short of {size}")
            await asyncio.to_thread(write_and_hash, fh, digest, chunk)
            left -= len(chunk)
            written += len(chunk)
            if on_chunk:
                on_chunk(len(chunk))
            if written >= SYNC_EVERY and (syncing is None or syncing.done()):
                fh.flush()
                written = 0
                syncing = asyncio.ensure_future(asyncio.to_thread(os.fdatasync, fh.fileno()))
        fh.flush()
    finally:
        if syncing is not None:
            await asyncio.wait([syncing])
    await asyncio.to_thread(os.fsync, fh.fileno())


async def receive_file(
    reader: Reader,
    path: Path,
    size: int,
    sha256: str,
    on_chunk: Callable[[int], None] | None = None,
) -> None:
    """Write the next ``size`` bytes into the new file ``path`` (in a staging directory) and
    check their declared sha256 (TransferFailed on a mismatch)."""
    digest = hashlib.sha256()
    with open_nofollow(path, "xb") as fh:
        await receive_bytes(reader, fh, digest, size, on_chunk)
    check_sha256(digest, sha256, path.name)


# --- staging ----------------------------------------------------------------------------------


def staging_dir(parent: Path) -> Path:
    """``parent``'s hidden staging directory, created if missing; Forbidden if it is a link (a
    link planted there would have received bytes outside ``parent``)."""
    stage = parent / STAGING
    stage.mkdir(parents=True, exist_ok=True)
    if not stat.S_ISDIR(os.lstat(stage).st_mode):  # mkdir(exist_ok) accepts a link
        raise Forbidden(f"{stage} is a symbolic link")
    return stage


@contextlib.contextmanager
def staged(dest: Path, *, directory: bool = False) -> Iterator[Path]:
    """A fresh path in ``dest``'s staging directory to build ``dest`` at (a directory, or a file
    path not yet created), for the caller to rename into place. Whatever is left of it is removed
    on the way out, and the staging directory too once nothing else is staging there."""
    root = staging_dir(dest.parent)
    stage = Path(tempfile.mkdtemp(prefix=f"{dest.name}.", dir=root))
    try:
        yield stage if directory else stage / dest.name
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        with contextlib.suppress(OSError):
            root.rmdir()


def staging_paths(dest: Path) -> tuple[Path, Path]:
    """A resumable transfer's partial file and its metadata for a destination path."""
    key = hashlib.sha256(str(dest).encode()).hexdigest()[:32]
    stage = dest.parent / STAGING
    return stage / f"{key}.part", stage / f"{key}.json"


def staged_so_far(dest: Path) -> tuple[int, str]:
    """How many bytes of which source version are staged for ``dest`` ((0, "") for none): what a
    resuming fetcher asks the sender for (``resume_offset`` checks it again)."""
    part, meta = staging_paths(dest)
    try:
        with open_nofollow(meta) as fh:
            version = json.loads(fh.read())["version"]
        return os.lstat(part).st_size, str(version)
    except (OSError, ValueError, KeyError, TypeError, Forbidden):  # resume_offset says why
        return 0, ""


def resume_offset(dest: Path, size: int, version: str) -> int:
    """How much of this version of the file is already staged; starts it afresh otherwise.
    Nothing here follows a link: one planted as the staging directory, the partial file or its
    metadata would have this write (or truncate) a file outside the allowed directories."""
    part, meta = staging_paths(dest)
    staging_dir(dest.parent)
    want = {"path": str(dest), "size": size, "version": version}
    try:
        with open_nofollow(meta) as fh:
            staged_meta = json.loads(fh.read())
        held = os.lstat(part)
        # Resumed only from a plain file of ours (a hard link's other name would be written).
        if staged_meta == want and stat.S_ISREG(held.st_mode) and held.st_nlink == 1:
            return min(held.st_size, size)
    except (FileNotFoundError, ValueError):  # nothing staged, or unreadable metadata
        pass
    for path in (meta, part):  # afresh, as new files: a hard link's other names keep their bytes
        if path.is_symlink():
            raise Forbidden(f"{path} is a symbolic link")
        path.unlink(missing_ok=True)
    with open_nofollow(meta, "xb") as fh:
        fh.write(json.dumps(want).encode())
    with open_nofollow(part, "xb"):
        pass
    return 0


async def receive_staged(
    reader: Reader,
    dest: Path,
    size: int,
    offset: int,
    on_chunk: Callable[[int], None] | None = None,
) -> hashlib._Hash:
    """Append bytes ``offset..size`` to ``dest``'s staged partial file (``resume_offset`` made
    it); the whole file's sha256 for ``commit_staged``."""
    part, _ = staging_paths(dest)
    digest = await asyncio.to_thread(sha256_file, part, offset) if offset else hashlib.sha256()
    with open_nofollow(part, "r+b") as fh:
        fh.truncate(offset)
        fh.seek(offset)
        await receive_bytes(reader, fh, digest, size - offset, on_chunk)
    return digest


def commit_staged(dest: Path, digest: hashlib._Hash, sha256: object) -> None:
    """Rename the staged file into place if its sha256 is the one declared; otherwise drop it
    (TransferFailed: resending the same bytes would not help)."""
    part, meta = staging_paths(dest)
    try:
        check_sha256(digest, sha256, dest.name)
    except TransferFailed:
        part.unlink(missing_ok=True)
        meta.unlink(missing_ok=True)
        raise
    os.replace(part, dest)
    meta.unlink(missing_ok=True)


# --- streams ----------------------------------------------------------------------------------


@contextlib.contextmanager
def idle_deadline(what: str, idle: float | None) -> Iterator[None]:
    """Turn the TimeoutError of a stalled step (``asyncio.timeout(idle)``) into a clear error."""
    try:
        yield
    except TimeoutError:
        raise DeadlineExceeded(f"{what} made no progress for {idle}s") from None


@contextlib.asynccontextmanager
async def open_transfer(
    overlay: Opener, address: str, service: str, params: Any, idle: float | None
) -> AsyncIterator[Stream]:
    """A stream to ``address``'s ``service`` with a deep window, closed on success and reset on
    any failure (a stalled step: DeadlineExceeded)."""
    stream = await overlay.open_stream(
        address, service, params, timeout=idle or OPEN_TIMEOUT, window=TRANSFER_WINDOW
    )
    try:
        with idle_deadline(f"{service} with {address}", idle):
            yield stream
    except BaseException as exc:
        stream.abort(exc if isinstance(exc, AtollError) else None)
        raise
    with contextlib.suppress(AtollError):  # the exchange is complete; a late break changes nothing
        await stream.close()


async def put_files(
    overlay: Opener,
    address: str,
    service: str,
    header: dict[str, Any],
    files: list[tuple[Path, int]],
    idle: float | None,
    on_chunk: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """The uploading side of a put stream: ``header`` as its first line, then each ``(path,
    size)``'s bytes back to back; the receiver's reply once it confirms it kept them."""
    async with open_transfer(overlay, address, service, None, idle) as stream:
        await write_line(stream, header, idle)
        for path, size in files:
            await send_bytes(stream, file_chunks(path), size, idle, on_chunk)
        return await confirmed(Reader(stream, idle), f"{address} did not confirm the {service}")


async def put_resumable(
    overlay: Opener,
    address: str,
    service: str,
    header: dict[str, Any],
    files: list[tuple[Path, int]],
    idle: float | None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """The uploading side of a put stream of ``(path, size)`` files the receiver may hold part of
    already: it answers ``header`` with ``{"offsets": [N, ...]}`` (the bytes of each file it kept
    from an earlier attempt), then only the rest of each is sent, back to back; its reply once it
    confirms it kept them."""
    async with open_transfer(overlay, address, service, None, idle) as stream:
        await write_line(stream, header, idle)
        reader = Reader(stream, idle)
        offsets = (await reader.line()).get("offsets")
        if (
            not isinstance(offsets, list)
            or len(offsets) != len(files)
            or not all(
                type(n) is int and 0 <= n <= size
                for n, (_, size) in zip(offsets, files, strict=True)
            )
        ):
            raise TransferFailed(f"{address} answered a {service} with no offset within each file")
        total = sum(size for _, size in files)
        advance = counter(total, progress, sum(offsets))
        for (path, size), offset in zip(files, offsets, strict=True):
            await send_bytes(stream, file_chunks(path, offset), size - offset, idle, advance)
        return await confirmed(reader, f"{address} did not confirm the {service}")


@contextlib.asynccontextmanager
async def fetching(
    overlay: Opener, address: str, service: str, params: Any, idle: float | None
) -> AsyncIterator[Reader]:
    """The fetching side of a get stream: a reader of the sender's header line and bytes. When
    the block ends (the bytes verified and in place) the sender is told ``{"ok": true}``; the
    fetch is complete whether or not that last word arrives."""
    async with open_transfer(overlay, address, service, params, idle) as stream:
        yield Reader(stream, idle)
        with contextlib.suppress(AtollError, TimeoutError):
            await write_line(stream, {"ok": True}, idle)
