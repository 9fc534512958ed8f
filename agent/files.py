"""File transfers between agents: chunked over an encrypted stream, flow-controlled, verified by
sha256, and resumable.

A file being received is written under a hidden staging directory next to its destination
(``.atoll-partial/``) and renamed into place only once its size and sha256 match: a failed or
interrupted transfer never leaves a visible partial file. After a reconnect (a broker restart, a
failover) the sender asks again and the receiver answers with how much it already holds; the
transfer goes on from there. Agents serve only the directories their ``[plugins.files] dirs``
allow-list names.

Wire (on the stream, after the open parameters): the serving side writes a JSON line first —
``{"offset": N}`` for a put, ``{"size": S, "version": V, "offset": N}`` for a get — then the
sender streams bytes N..S and a trailer line ``{"sha256": H}``, hashed while sending (in a thread)
rather than before the first byte; a put ends with the receiver's ``{"ok": true}`` once the file
is in place. A partial file resumes only for the same source version (size and mtime).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from atoll.agent.config import ConfigPath
from atoll.agent.errors import AtollError, ConnectionLost, Forbidden, InvalidRequest
from atoll.agent.node import CallInfo, Overlay
from atoll.agent.plugins import Plugin, PluginContext
from atoll.agent.streams import Stream, StreamReset
from atoll.tenancy.permissions import FILE_USERS

STAGING = ".atoll-partial"
READ_SIZE = 1024 * 1024
TRANSFER_WINDOW = 16 * 1024 * 1024  # bulk data: a deep window keeps the pipe full
SYNC_EVERY = 32 * 1024 * 1024
Progress = Callable[[int, int], None]


class TransferFailed(AtollError):
    """A transfer that cannot succeed by retrying (bad checksum, missing file, refused path)."""


_OPEN_FLAGS = {"rb": os.O_RDONLY, "r+b": os.O_RDWR, "xb": os.O_WRONLY | os.O_CREAT | os.O_EXCL}


def open_nofollow(path: Path, mode: str = "rb") -> Any:
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


def staging_paths(dest: Path) -> tuple[Path, Path]:
    """Hidden partial file and its metadata for a destination path."""
    key = hashlib.sha256(str(dest).encode()).hexdigest()[:32]
    stage = dest.parent / STAGING
    return stage / f"{key}.part", stage / f"{key}.json"


def version_of(path: Path) -> str:
    """What identifies this exact content for resuming: size and modification time."""
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def resume_offset(dest: Path, size: int, version: str) -> int:
    """How much of this version of the file is already staged; starts it afresh otherwise.
    Nothing here follows a link: one planted as the staging directory, the partial file or its
    metadata would have this write (or truncate) a file outside the allowed directories."""
    part, meta = staging_paths(dest)
    part.parent.mkdir(parents=True, exist_ok=True)
    if not stat.S_ISDIR(os.lstat(part.parent).st_mode):  # mkdir(exist_ok) accepts a link
        raise Forbidden(f"{part.parent} is a symbolic link")
    want = {"path": str(dest), "size": size, "version": version}
    try:
        with open_nofollow(meta) as fh:
            staged = json.loads(fh.read())
        held = os.lstat(part)
        # Resumed only from a plain file of ours (a hard link's other name would be written).
        if staged == want and stat.S_ISREG(held.st_mode) and held.st_nlink == 1:
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


def _write_and_hash(fh: Any, digest: Any, chunk: bytes) -> None:
    fh.write(chunk)
    digest.update(chunk)


async def _receive(
    stream: Stream, dest: Path, size: int, offset: int, progress: Progress | None
) -> None:
    """Append bytes offset..size to the staged file, check the trailer's sha256 against the
    whole file, and rename it into place."""
    part, meta = staging_paths(dest)
    digest = await asyncio.to_thread(sha256_file, part, offset) if offset else hashlib.sha256()
    have = offset
    syncing: asyncio.Future | None = None
    synced = offset
    with open_nofollow(part, "r+b") as fh:
        fh.truncate(offset)
        fh.seek(offset)
        try:
            while have < size:
                chunk = await stream.read(size - have)
                if not chunk:
                    raise ConnectionLost(f"stream ended at {have} of {size} bytes")  # resumable
                # In a thread (both release the GIL): the loop meanwhile opens the next chunks.
                await asyncio.to_thread(_write_and_hash, fh, digest, chunk)
                have += len(chunk)
                if progress:
                    progress(have, size)
                if have - synced >= SYNC_EVERY and (syncing is None or syncing.done()):
                    # Write back as we go, in a thread, so the final fsync has little left.
                    fh.flush()
                    synced = have
                    syncing = asyncio.ensure_future(asyncio.to_thread(os.fdatasync, fh.fileno()))
            fh.flush()
        finally:
            if syncing is not None:
                await asyncio.wait([syncing])
        os.fsync(fh.fileno())
    sha256 = (await _json_line(stream)).get("sha256")
    if digest.hexdigest() != sha256:
        part.unlink(missing_ok=True)
        meta.unlink(missing_ok=True)
        raise TransferFailed(
            f"checksum mismatch for {dest.name}: sender says {sha256}, "
            f"received {digest.hexdigest()}"
        )
    os.replace(part, dest)
    meta.unlink(missing_ok=True)


async def _send(
    stream: Stream, path: Path, offset: int, size: int, progress: Progress | None
) -> None:
    """Stream bytes offset..size, then the whole file's sha256, hashed meanwhile in a thread."""
    hashing = asyncio.ensure_future(asyncio.to_thread(sha256_file, path, size))
    try:
        with open_nofollow(path) as fh:
            fh.seek(offset)
            sent = offset
            while sent < size:
                block = fh.read(min(READ_SIZE, size - sent))
                if not block:
                    raise TransferFailed(f"{path} shrank while being sent")
                await stream.write(block)
                sent += len(block)
                if progress:
                    progress(sent, size)
        await _line(stream, {"sha256": (await hashing).hexdigest()})
    finally:
        hashing.cancel()


async def _json_line(stream: Stream) -> dict[str, Any]:
    line = bytearray()
    while not line.endswith(b"\n"):
        byte = await stream.read(1)
        if not byte:
            raise ConnectionLost("stream ended before a header line")
        line += byte
        if len(line) > 4096:
            raise InvalidRequest("header line too long")
    try:
        obj = json.loads(line)
    except ValueError:
        raise InvalidRequest("malformed header line") from None
    if not isinstance(obj, dict):
        raise InvalidRequest("malformed header line")
    return obj


async def _line(stream: Stream, obj: dict[str, Any]) -> None:
    await stream.write(json.dumps(obj).encode() + b"\n")


RETRYABLE = (ConnectionLost, StreamReset)


async def _retrying(agent: Overlay, attempt: Callable[[], Any], retries: int, what: str) -> Any:
    """Run a transfer attempt; after a broken connection wait for the link and go on."""
    for n in range(retries + 1):
        try:
            return await attempt()
        except RETRYABLE as exc:
            if n == retries:
                raise TransferFailed(f"{what} failed after {retries} retries: {exc}") from None
            agent.log.info("files.retrying", what=what, error=exc)
            await agent.wait_connected(30)
            await asyncio.sleep(0.05 * (n + 1))
    raise AssertionError("unreachable")


async def put_file(
    agent: Overlay,
    target: str,
    local: Path,
    remote: str,
    progress: Progress | None = None,
    retries: int = 10,
) -> int:
    """Send ``local`` to ``remote`` on agent ``target``; returns bytes actually sent."""
    local = Path(local)
    size, version = local.stat().st_size, version_of(local)
    sent_total = 0

    async def attempt() -> None:
        nonlocal sent_total
        stream = await agent.open_stream(
            f"{target}/files",
            "put",
            {"path": remote, "size": size, "version": version},
            window=TRANSFER_WINDOW,
        )
        try:
            offset = (await _json_line(stream))["offset"]
            await _send(stream, local, offset, size, progress)
            sent_total += size - offset
            if not (await _json_line(stream)).get("ok"):
                raise TransferFailed("the receiver did not confirm the file")
        finally:
            await stream.close()

    await _retrying(agent, attempt, retries, f"put {local} -> {target}:{remote}")
    return sent_total


async def get_file(
    agent: Overlay,
    source: str,
    remote: str,
    local: Path,
    progress: Progress | None = None,
    retries: int = 10,
) -> int:
    """Fetch ``remote`` from agent ``source`` into ``local``; returns bytes actually received."""
    local = Path(local).absolute()
    received = 0

    async def attempt() -> None:
        nonlocal received
        part, meta = staging_paths(local)
        hint: dict[str, Any] = {"path": remote, "offset": 0, "version": ""}
        try:
            staged = json.loads(meta.read_text())
            hint.update(offset=part.stat().st_size, version=staged["version"])
        except (OSError, ValueError, KeyError):
            pass
        stream = await agent.open_stream(f"{source}/files", "get", hint, window=TRANSFER_WINDOW)
        try:
            head = await _json_line(stream)
            size, version, offset = head["size"], head["version"], head["offset"]
            if await asyncio.to_thread(resume_offset, local, size, version) < offset:
                raise TransferFailed("the sender resumed past what is staged here")
            await _receive(stream, local, size, offset, progress)
            received += size - offset
        finally:
            await stream.close()

    await _retrying(agent, attempt, retries, f"get {source}:{remote} -> {local}")
    return received


class FilesConfig(BaseModel):
    """``[plugins.files]``: the directories other agents may read and write here."""

    model_config = ConfigDict(extra="forbid")

    dirs: list[ConfigPath] = []


class FilesPlugin(Plugin):
    """Serves file puts and gets within the configured directories."""

    name = "files"

    async def start(self, ctx: PluginContext) -> None:
        await super().start(ctx)
        config = ctx.settings(FilesConfig)
        self.roots = [d.resolve() for d in config.dirs]
        for root in self.roots:
            root.mkdir(parents=True, exist_ok=True)
        self.received = ctx.metrics.counter("files_received_bytes", "Bytes received")
        self.sent = ctx.metrics.counter("files_sent_bytes", "Bytes sent")
        for service, handler in (("put", self._put), ("get", self._get)):
            ctx.serve_stream(service, handler, roles=FILE_USERS)

    def describe(self) -> dict[str, Any]:
        return {"capabilities": {"file_dirs": [str(r) for r in self.roots]}}

    def resolve(self, path: Any) -> Path:
        """A path inside an allowed directory with every link resolved (a link anywhere in it,
        the last component too, must land inside an allowed directory); Forbidden otherwise.
        Files are then opened with ``O_NOFOLLOW``, so a link swapped in afterwards is refused."""
        if not isinstance(path, str) or not path or "\x00" in path:
            raise InvalidRequest("a file path is required")
        p = Path(path)
        if not p.is_absolute() and self.roots:
            p = self.roots[0] / p
        p = p.resolve()
        if STAGING in p.parts or not any(p.is_relative_to(r) and p != r for r in self.roots):
            allowed = ", ".join(map(str, self.roots)) or "nothing"
            raise Forbidden(f"{path} is outside this agent's file allow-list ({allowed})")
        return p

    async def _put(self, stream: Stream, params: Any, call: CallInfo) -> None:
        if (
            not isinstance(params, dict)
            or type(params.get("size")) is not int
            or not isinstance(params.get("version"), str)
            or params["size"] < 0
        ):
            raise InvalidRequest("put needs {path, size, version}")
        dest = self.resolve(params.get("path"))
        dest.parent.mkdir(parents=True, exist_ok=True)
        size = params["size"]
        offset = await asyncio.to_thread(resume_offset, dest, size, params["version"])
        await _line(stream, {"offset": offset})
        await _receive(stream, dest, size, offset, None)
        self.received.inc(size - offset)
        await _line(stream, {"ok": True})

    async def _get(self, stream: Stream, params: Any, call: CallInfo) -> None:
        if not isinstance(params, dict):
            raise InvalidRequest("get needs {path, offset, version}")
        path = self.resolve(params.get("path"))
        if not path.is_file():
            raise TransferFailed(f"no file {path}")
        size, version = path.stat().st_size, version_of(path)
        offset = params.get("offset", 0)
        if params.get("version") != version or type(offset) is not int or not 0 <= offset <= size:
            offset = 0  # another version, or nothing staged: from the start
        await _line(stream, {"size": size, "version": version, "offset": offset})
        await _send(stream, path, offset, size, None)
        self.sent.inc(size - offset)
