"""Wire helpers shared by the storage plugin's adapter and dataset services and their clients:
JSON header lines and byte runs over a stream, each step bounded by an idle timeout, and request
parsing with clear errors. Importing this file pulls in no torch (nor safetensors)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, StringConstraints, ValidationError

from atoll.agent.errors import AtollError, DeadlineExceeded, InvalidRequest
from atoll.agent.files import TRANSFER_WINDOW, TransferFailed
from atoll.agent.node import Overlay
from atoll.agent.streams import Stream, StreamReset

PLUGIN = "storage"
MAX_HEADER_BYTES = 64 * 1024
IDLE_TIMEOUT = 60.0  # seconds a transfer may go without progress before it is given up
Progress = Callable[[int, int], None]  # (bytes done, bytes in all)

M = TypeVar("M", bound=BaseModel)

# A user or project name (the gateway's accounts), a job id: what records say they belong to.
OwnerName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")]


def _label(value: str, limit: int) -> str:
    if not 1 <= len(value) <= limit:
        raise ValueError(f"must be 1-{limit} characters")
    if value != value.strip():
        raise ValueError("must not start or end with spaces")
    if any(c in "/\\" or ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("must hold no '/', '\\' or control characters")
    return value


# A name people chose (a dataset's, a file's): free text within those bounds.
Label = Annotated[str, AfterValidator(lambda v: _label(v, 128))]
FileName = Annotated[str, AfterValidator(lambda v: _label(v, 255))]


def parse(model: type[M], data: Any, what: str) -> M:
    """``data`` as ``model``, or InvalidRequest naming what is wrong."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidRequest(f"bad {what}: {problems}") from None


def address(storage: str) -> str:
    """An agent name means that agent's ``storage`` plugin."""
    return storage if "/" in storage else f"{storage}/{PLUGIN}"


class Reader:
    """Reads JSON lines and byte runs from a stream, each read bounded by ``idle`` seconds; keeps
    what a line read took past the newline for the reads after it."""

    def __init__(self, stream: Stream, idle: float) -> None:
        self.stream = stream
        self.idle = idle
        self._left = b""

    async def read(self, n: int) -> bytes:
        """Up to ``n`` bytes; b"" once the other side has ended."""
        if self._left:
            chunk, self._left = self._left[:n], self._left[n:]
            return chunk
        async with asyncio.timeout(self.idle):
            return await self.stream.read(n)

    async def line(self, limit: int) -> dict[str, Any]:
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


async def write_line(stream: Stream, obj: dict[str, Any], idle: float) -> None:
    async with asyncio.timeout(idle):
        await stream.write(json.dumps(obj).encode() + b"\n")


async def send_bytes(
    stream: Stream,
    chunks: AsyncIterable[bytes],
    size: int,
    idle: float,
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


def _write_and_hash(fh: Any, digest: hashlib._Hash, chunk: bytes) -> None:
    fh.write(chunk)
    digest.update(chunk)


async def receive_file(
    reader: Reader,
    path: Path,
    size: int,
    sha256: str,
    on_chunk: Callable[[int], None] | None = None,
) -> None:
    """Write the next ``size`` bytes into ``path`` and check their sha256 (TransferFailed on a
    mismatch). Hashing and writing run in threads."""
    digest = hashlib.sha256()
    with path.open("wb") as fh:
        left = size
        while left:
            chunk = await reader.read(left)
            if not chunk:
                raise StreamReset(f"the stream ended {left} bytes short in {path.name}")
            await asyncio.to_thread(_write_and_hash, fh, digest, chunk)
            left -= len(chunk)
            if on_chunk:
                on_chunk(len(chunk))
        fh.flush()
        await asyncio.to_thread(os.fsync, fh.fileno())
    if digest.hexdigest() != sha256:
        raise TransferFailed(
            f"{path.name}: sha256 {digest.hexdigest()} does not match the declared {sha256}"
        )


@contextlib.contextmanager
def idle_deadline(what: str, idle: float) -> Iterator[None]:
    """Turn the TimeoutError of a stalled step (``asyncio.timeout(idle)``) into a clear error."""
    try:
        yield
    except TimeoutError:
        raise DeadlineExceeded(f"{what} made no progress for {idle}s") from None


@contextlib.asynccontextmanager
async def transfer(
    agent: Overlay, storage: str, service: str, params: Any, idle: float
) -> AsyncIterator[Stream]:
    """An open stream that is closed on success and reset on any failure."""
    stream = await agent.open_stream(
        address(storage), service, params, timeout=idle, window=TRANSFER_WINDOW
    )
    try:
        with idle_deadline(f"{service} with {storage}", idle):
            yield stream
    except BaseException as exc:
        stream.abort(exc if isinstance(exc, AtollError) else None)
        raise
    with contextlib.suppress(AtollError):  # the exchange is complete; a late break changes nothing
        await stream.close()
