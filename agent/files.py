"""File transfers between agents: chunked over an encrypted stream, flow-controlled, verified by
sha256, and resumable.

A file being received is written under the hidden staging directory next to its destination
(``.atoll-staging/``, see ``transfer.py``) and renamed into place only once its size and sha256
match: a failed or interrupted transfer never leaves a visible partial file. After a reconnect (a
broker restart, a failover) the sender asks again and the receiver answers with how much it
already holds; the transfer goes on from there. Agents serve only the directories their
``[plugins.files] dirs`` allow-list names.

Wire (on the stream, after the open parameters): the serving side writes a JSON line first —
``{"offset": N}`` for a put, ``{"size": S, "version": V, "offset": N}`` for a get — then the
sender streams bytes N..S and a trailer line ``{"sha256": H}``, hashed while sending (in a thread)
rather than before the first byte; a put ends with the receiver's ``{"ok": true}`` once the file
is in place. A partial file resumes only for the same source version (size and mtime).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from atoll.agent.config import ConfigPath
from atoll.agent.contract import Progress, counter
from atoll.agent.errors import ConnectionLost, Forbidden, InvalidRequest
from atoll.agent.node import Overlay
from atoll.agent.plugins import Plugin, PluginContext
from atoll.agent.streams import Stream, StreamReset
from atoll.agent.transfer import (
    STAGING,
    Reader,
    TransferFailed,
    commit_staged,
    file_chunks,
    open_transfer,
    receive_staged,
    resume_offset,
    send_bytes,
    sha256_file,
    staged_so_far,
    version_of,
    write_line,
)
from atoll.protocol.session import CallInfo
from atoll.tenancy.permissions import FILE_USERS

HEADER_BYTES = 4096  # the longest header line either side takes: a few numbers and a version
IDLE = None  # no idle deadline: a stalled transfer waits for the link (resumed on reconnect)


async def _receive(
    reader: Reader, dest: Path, size: int, offset: int, progress: Progress | None
) -> None:
    """Append bytes offset..size to the staged file, check the trailer's sha256 against the
    whole file, and rename it into place."""
    digest = await receive_staged(reader, dest, size, offset, counter(size, progress, offset))
    commit_staged(dest, digest, (await reader.line(HEADER_BYTES)).get("sha256"))


async def _send(
    stream: Stream, path: Path, offset: int, size: int, progress: Progress | None
) -> None:
    """Stream bytes offset..size, then the whole file's sha256, hashed meanwhile in a thread."""
    hashing = asyncio.ensure_future(asyncio.to_thread(sha256_file, path, size))
    try:
        chunks = file_chunks(path, offset, size, nofollow=True)
        await send_bytes(stream, chunks, size - offset, IDLE, counter(size, progress, offset))
        await write_line(stream, {"sha256": (await hashing).hexdigest()}, IDLE)
    finally:
        hashing.cancel()


RETRYABLE = (ConnectionLost, StreamReset)


async def _retrying(
    agent: Overlay, attempt: Callable[[], Awaitable[None]], retries: int, what: str
) -> None:
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
    params = {"path": remote, "size": size, "version": version}
    sent_total = 0

    async def attempt() -> None:
        nonlocal sent_total
        async with open_transfer(agent, f"{target}/files", "put", params, IDLE) as stream:
            reader = Reader(stream, IDLE)
            offset = (await reader.line(HEADER_BYTES))["offset"]
            await _send(stream, local, offset, size, progress)
            sent_total += size - offset
            if not (await reader.line(HEADER_BYTES)).get("ok"):
                raise TransferFailed("the receiver did not confirm the file")

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
        offset, version = staged_so_far(local)
        hint = {"path": remote, "offset": offset, "version": version}
        async with open_transfer(agent, f"{source}/files", "get", hint, IDLE) as stream:
            reader = Reader(stream, IDLE)
            head = await reader.line(HEADER_BYTES)
            size, version, offset = head["size"], head["version"], head["offset"]
            if await asyncio.to_thread(resume_offset, local, size, version) < offset:
                raise TransferFailed("the sender resumed past what is staged here")
            await _receive(reader, local, size, offset, progress)
            received += size - offset

    await _retrying(agent, attempt, retries, f"get {source}:{remote} -> {local}")
    return received


class FilesConfig(BaseModel):
    """``[plugins.files]``: the directories other agents may read and write here."""

    model_config = ConfigDict(extra="forbid")

    dirs: list[ConfigPath] = []


class FilesPlugin(Plugin):
    """Serves file puts and gets within the configured directories."""

    name = "files"
    config_model = FilesConfig

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
        await write_line(stream, {"offset": offset}, IDLE)
        await _receive(Reader(stream, IDLE), dest, size, offset, None)
        self.received.inc(size - offset)
        await write_line(stream, {"ok": True}, IDLE)

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
        await write_line(stream, {"size": size, "version": version, "offset": offset}, IDLE)
        await _send(stream, path, offset, size, None)
        self.sent.inc(size - offset)
