"""The storage plugin's adapter service, as other plugins see it: names, schemas, errors, and
thin clients that use only the agent's streams and RPC. Importing this file pulls in no torch
(nor safetensors).

Overlay surface of an agent's ``storage`` plugin:

    RPC    list_adapters     AdapterQuery   -> list[AdapterRecord]
    RPC    describe_adapter  AdapterId      -> AdapterRecord
    RPC    delete_adapter    AdapterId      -> {"deleted": true}       (a writer role)
    STREAM adapter_put       (no params)    uploader writes a header line, then the files' bytes;
                                            storage answers {"ok": true, "adapter": AdapterRecord}
    STREAM adapter_get       AdapterId      storage writes a header line, then the files' bytes;
                                            the fetcher answers {"ok": true} once all verify

A header line is the JSON of ``TransferHeader``: ``{"id", "files": [{"name", "size", "sha256"}],
"meta": {...}}``; the files' bytes follow back to back in the header's order. Whoever refuses
resets the stream with the error (InvalidAdapter, AdapterExists, Forbidden, TransferFailed...).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from atoll.agent.errors import AtollError, DeadlineExceeded, InvalidRequest
from atoll.agent.files import STAGING, TRANSFER_WINDOW, TransferFailed, sha256_file
from atoll.agent.node import Agent
from atoll.agent.streams import Stream, StreamReset

# Re-exported: the inference contract owns these names (errors are registered by class name).
from atoll.plugins.inference.contract import AdapterNotFound
from atoll.plugins.storage.store import file_chunks

__all__ = ["AdapterNotFound", "TransferFailed"]

PLUGIN = "storage"
PUT_SERVICE = "adapter_put"
GET_SERVICE = "adapter_get"
LIST_METHOD = "list_adapters"
DESCRIBE_METHOD = "describe_adapter"
DELETE_METHOD = "delete_adapter"

# Uploading and deleting need one of these roles (a trainer holds "training"); any agent of
# the tenant may fetch and list.
WRITER_ROLES = frozenset({"admin", "operator", "training", "gateway"})

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TOKENIZER_FILES = frozenset(
    {
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer.model",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "merges.txt",
        "chat_template.jinja",
        "chat_template.json",
    }
)
ADAPTER_FILES = frozenset({CONFIG_FILE, WEIGHTS_FILE}) | TOKENIZER_FILES

ADAPTER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}")
MAX_HEADER_BYTES = 64 * 1024
MAX_META_BYTES = 16 * 1024
IDLE_TIMEOUT = 60.0  # seconds a transfer may go without progress before it is given up
Progress = Callable[[int, int], None]  # (bytes done, bytes in all)


# --- errors (rebuilt by class name on the caller's side once this module is imported) ----------


class InvalidAdapter(AtollError):
    """The upload is not a storable LoRA adapter (config, weights, names or size); nothing kept."""


class AdapterExists(AtollError):
    """That adapter id is taken: adapters are immutable, a new version takes a new id."""


# --- schemas --------------------------------------------------------------------------------


def adapter_id_problem(adapter_id: object) -> str | None:
    """Why ``adapter_id`` is not a valid adapter id, or None if it is."""
    if not isinstance(adapter_id, str) or not ADAPTER_ID.fullmatch(adapter_id):
        return (
            f"adapter id {adapter_id!r} must be 1-128 characters of letters, digits and ._/-, "
            "starting with a letter or digit"
        )
    segments = adapter_id.split("/")
    if any(s in ("", ".", "..") for s in segments):
        return f"adapter id {adapter_id!r} has an empty, '.' or '..' path segment"
    if any(s in ADAPTER_FILES for s in segments):
        # Would collide with another adapter's file in a directory-shaped store.
        return f"adapter id {adapter_id!r} has a segment named like an adapter file"
    return None


def check_adapter_id(adapter_id: object) -> str:
    problem = adapter_id_problem(adapter_id)
    if problem:
        raise InvalidRequest(problem)
    return adapter_id  # type: ignore[return-value]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AdapterFile(_Strict):
    name: str
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @field_validator("name")
    @classmethod
    def _allowed(cls, name: str) -> str:
        if name not in ADAPTER_FILES:
            allowed = ", ".join(sorted(ADAPTER_FILES))
            raise ValueError(f"file {name!r} is not part of an adapter; allowed: {allowed}")
        return name


def _distinct(files: list[AdapterFile]) -> list[AdapterFile]:
    names = [f.name for f in files]
    if len(set(names)) != len(names):
        raise ValueError("each file is named once")
    return files


def _bounded(meta: dict[str, Any]) -> dict[str, Any]:
    try:
        encoded = json.dumps(meta)
    except (TypeError, ValueError):
        raise ValueError("meta must be plain JSON (strings, numbers, lists, objects)") from None
    if len(encoded) > MAX_META_BYTES:
        raise ValueError(f"meta is larger than {MAX_META_BYTES} bytes of JSON")
    return meta


def _check_id(adapter_id: str) -> str:
    problem = adapter_id_problem(adapter_id)
    if problem:
        raise ValueError(problem)
    return adapter_id


AdapterIdStr = Annotated[str, AfterValidator(_check_id)]


class TransferHeader(_Strict):
    """The first line of an ``adapter_put`` or ``adapter_get`` stream."""

    id: AdapterIdStr
    files: Annotated[
        list[AdapterFile], Field(max_length=len(ADAPTER_FILES)), AfterValidator(_distinct)
    ]
    meta: Annotated[dict[str, Any], AfterValidator(_bounded)] = Field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


class AdapterRecord(BaseModel):
    """A stored adapter as the registry describes it."""

    id: str
    base_model: str
    rank: int
    target_modules: list[str]
    files: list[AdapterFile]
    size_bytes: int
    owner: str  # the uploading agent's name
    created: float  # epoch seconds
    meta: dict[str, Any] = Field(default_factory=dict)


class AdapterId(_Strict):
    id: AdapterIdStr


class AdapterQuery(_Strict):
    base_model: str | None = None
    owner: str | None = None


M = TypeVar("M", bound=BaseModel)


def parse(model: type[M], data: Any, what: str) -> M:
    """``data`` as ``model``, or InvalidRequest naming what is wrong."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidRequest(f"bad {what}: {problems}") from None


# --- wire helpers (shared by the clients below and the plugin) --------------------------------


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


async def receive_files(
    reader: Reader, files: list[AdapterFile], directory: Path, progress: Progress | None = None
) -> None:
    """Write each file's bytes into ``directory`` and check its size and sha256 (TransferFailed
    on a mismatch). Hashing and writing run in threads."""
    total, done = sum(f.size for f in files), 0
    for entry in files:
        digest = hashlib.sha256()
        with (directory / entry.name).open("wb") as fh:
            left = entry.size
            while left:
                chunk = await reader.read(left)
                if not chunk:
                    raise StreamReset(f"the stream ended {left} bytes short in {entry.name}")
                await asyncio.to_thread(_write_and_hash, fh, digest, chunk)
                left -= len(chunk)
                done += len(chunk)
                if progress:
                    progress(done, total)
            fh.flush()
            await asyncio.to_thread(os.fsync, fh.fileno())
        if digest.hexdigest() != entry.sha256:
            raise TransferFailed(
                f"{entry.name}: sha256 {digest.hexdigest()} does not match the declared "
                f"{entry.sha256}"
            )


def _address(storage: str) -> str:
    """An agent name means that agent's ``storage`` plugin."""
    return storage if "/" in storage else f"{storage}/{PLUGIN}"


@contextlib.contextmanager
def idle_deadline(what: str, idle: float) -> Iterator[None]:
    """Turn the TimeoutError of a stalled step (``asyncio.timeout(idle)``) into a clear error."""
    try:
        yield
    except TimeoutError:
        raise DeadlineExceeded(f"{what} made no progress for {idle}s") from None


@contextlib.asynccontextmanager
async def _transfer(
    agent: Agent, storage: str, service: str, params: Any, idle: float
) -> AsyncIterator[Stream]:
    """An open stream that is closed on success and reset on any failure."""
    stream = await agent.streams.open(
        _address(storage), service, params, timeout=idle, window=TRANSFER_WINDOW
    )
    try:
        with idle_deadline(f"{service} with {storage}", idle):
            yield stream
    except BaseException as exc:
        stream.abort(exc if isinstance(exc, AtollError) else None)
        raise
    with contextlib.suppress(AtollError):  # the exchange is complete; a late break changes nothing
        await stream.close()


# --- clients --------------------------------------------------------------------------------


async def upload_adapter(
    agent: Agent,
    storage_address: str,
    local_dir: Path,
    adapter_id: str,
    meta: dict[str, Any] | None = None,
    *,
    idle_timeout: float = IDLE_TIMEOUT,
    progress: Progress | None = None,
) -> AdapterRecord:
    """Upload the adapter files in ``local_dir`` (others there, like peft's README.md, are left
    out) as ``adapter_id``; the storage agent validates and registers it."""
    check_adapter_id(adapter_id)
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise FileNotFoundError(f"no adapter directory {local_dir}")
    paths = [local_dir / n for n in sorted(ADAPTER_FILES) if (local_dir / n).is_file()]
    files = []
    for path in paths:
        digest = await asyncio.to_thread(sha256_file, path)
        files.append(
            AdapterFile(name=path.name, size=path.stat().st_size, sha256=digest.hexdigest())
        )
    header = parse(TransferHeader, {"id": adapter_id, "files": files, "meta": meta or {}}, "upload")
    async with _transfer(agent, storage_address, PUT_SERVICE, None, idle_timeout) as stream:
        await write_line(stream, header.model_dump(mode="json"), idle_timeout)
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            if progress:
                progress(done, header.size)

        for entry, path in zip(header.files, paths, strict=True):
            await send_bytes(stream, file_chunks(path), entry.size, idle_timeout, advance)
        reply = await Reader(stream, idle_timeout).line(MAX_HEADER_BYTES)
        if reply.get("ok") is not True:
            raise TransferFailed(f"{storage_address} did not confirm the upload: {reply}")
        return parse(AdapterRecord, reply.get("adapter"), f"reply from {storage_address}")


async def fetch_adapter(
    agent: Agent,
    storage_address: str,
    adapter_id: str,
    dest_dir: Path,
    *,
    idle_timeout: float = IDLE_TIMEOUT,
    progress: Progress | None = None,
) -> Path:
    """Fetch adapter ``adapter_id`` into the directory ``dest_dir`` and return it.

    Files land in a hidden staging directory next to ``dest_dir`` (``.atoll-partial/``), which
    is renamed into place only once every file's size and sha256 match the header: a broken or
    stalled transfer leaves nothing visible, and calling again starts afresh. ``dest_dir`` may
    already exist only without adapter files in it (it holds nested ids: ``team/v1`` fetched
    before ``team``); the files are then moved in one by one, adapter_config.json last.
    """
    check_adapter_id(adapter_id)
    dest = Path(dest_dir).absolute()
    if dest.exists() and (not dest.is_dir() or any((dest / n).exists() for n in ADAPTER_FILES)):
        raise FileExistsError(f"{dest} already holds an adapter; fetch into a new directory")
    staging_root = dest.parent / STAGING
    staging_root.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f"{dest.name}.", dir=staging_root))
    try:
        params = {"id": adapter_id}
        async with _transfer(agent, storage_address, GET_SERVICE, params, idle_timeout) as stream:
            reader = Reader(stream, idle_timeout)
            raw = await reader.line(MAX_HEADER_BYTES)
            header = parse(TransferHeader, raw, f"header from {storage_address}")
            if header.id != adapter_id:
                raise TransferFailed(
                    f"asked for {adapter_id!r}, {storage_address} sent {header.id!r}"
                )
            await receive_files(reader, header.files, stage, progress)
            _move_into_place(stage, dest, [f.name for f in header.files])
            # The adapter is complete and in place whether or not this last word arrives.
            with contextlib.suppress(AtollError, TimeoutError):
                await write_line(stream, {"ok": True}, idle_timeout)
        return dest
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        with contextlib.suppress(OSError):
            staging_root.rmdir()  # only if no other transfer is staging there


def _move_into_place(stage: Path, dest: Path, names: list[str]) -> None:
    if not dest.exists():
        os.rename(stage, dest)
        return
    # Whoever sees adapter_config.json sees the whole adapter.
    for name in sorted(names, key=lambda n: n == CONFIG_FILE):
        os.rename(stage / name, dest / name)


async def list_adapters(
    agent: Agent,
    storage_address: str,
    base_model: str | None = None,
    owner: str | None = None,
    timeout: float | None = None,
) -> list[AdapterRecord]:
    query = AdapterQuery(base_model=base_model, owner=owner).model_dump()
    rows = await agent.call(_address(storage_address), LIST_METHOD, query, timeout)
    return [AdapterRecord.model_validate(row) for row in rows]


async def describe_adapter(
    agent: Agent, storage_address: str, adapter_id: str, timeout: float | None = None
) -> AdapterRecord:
    check_adapter_id(adapter_id)
    row = await agent.call(_address(storage_address), DESCRIBE_METHOD, {"id": adapter_id}, timeout)
    return AdapterRecord.model_validate(row)


async def delete_adapter(
    agent: Agent, storage_address: str, adapter_id: str, timeout: float | None = None
) -> None:
    """Remove the adapter from the registry and the store; AdapterNotFound if there is none."""
    check_adapter_id(adapter_id)
    await agent.call(_address(storage_address), DELETE_METHOD, {"id": adapter_id}, timeout)
