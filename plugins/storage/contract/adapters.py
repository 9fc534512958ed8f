"""The storage plugin's adapter service, as other plugins see it: names, schemas, errors, the
method table and typed clients over the agent's streams and RPC.

Overlay surface of an agent's ``storage`` plugin (adapters):

    RPC    list_adapters     AdapterQuery   -> list[AdapterRecord]
    RPC    describe_adapter  AdapterId      -> AdapterRecord
    RPC    delete_adapter    AdapterId      -> {"deleted": true}       (clients; trainers only
                                                                         a job's checkpoints)
    RPC    note_evaluation   AdapterEvaluation -> AdapterRecord        (clients: an evaluation's
                                            figures for the adapter, the last MAX_EVALUATIONS
                                            kept in its meta's "evaluations")
    STREAM adapter_put       (no params)    uploader writes a header line, then the files' bytes;
                                            storage answers {"ok": true, "adapter": AdapterRecord}
    STREAM adapter_get       AdapterId      storage writes a header line, then the files' bytes;
                                            the fetcher answers {"ok": true} once all verify
    PUB    adapters.new      AdapterRecord  after each successful upload (tenant pub/sub), so
                                            the gateway can grant access at once
    PUB    adapters.deleted  {id}           after each deletion: the gateway takes access back

A header line is the JSON of ``TransferHeader``: ``{"id", "files": [{"name", "size", "sha256"}],
"meta": {...}, "owner", "project", "public", "source_job"}``; the files' bytes follow back to
back in the header's order. Whoever refuses resets the stream with the error (InvalidAdapter,
AdapterExists, Forbidden, TransferFailed...).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, Field, field_validator

from atoll.agent.contract import (
    Caller,
    Method,
    Progress,
    Strict,
    counter,
    parse,
    service_address,
)
from atoll.agent.errors import AtollError, InvalidRequest
from atoll.agent.transfer import (
    IDLE_TIMEOUT,
    Opener,
    Reader,
    TransferFailed,
    fetching,
    put_resumable,
    receive_file,
    sha256_file,
    staged,
)
from atoll.plugins.storage.contract.wire import (
    PLUGIN,
    Deleted,
    FileEntry,
    OwnerName,
    storage_client,
)

PUT_SERVICE = "adapter_put"
GET_SERVICE = "adapter_get"
ADAPTERS_NEW = "adapters.new"
ADAPTERS_DELETED = "adapters.deleted"

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
# A compressed collection (plugins/inference/compression.py) is kept as an adapter record of its
# own kind: id ``collections/...``, these two files, its members listed in ``meta["members"]``;
# the same owner, project and visibility rules as adapters.
COLLECTION_PREFIX = "collections/"
COLLECTION_MANIFEST = "collection.json"
COLLECTION_TENSORS = "collection.safetensors"
COLLECTION_FILES = frozenset({COLLECTION_MANIFEST, COLLECTION_TENSORS})
ADAPTER_FILES = frozenset({CONFIG_FILE, WEIGHTS_FILE}) | TOKENIZER_FILES | COLLECTION_FILES

# 160: a training checkpoint's id is its job's adapter id (up to 118) and "-ckpt-step-<N>".
ADAPTER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,159}")
MAX_META_BYTES = 16 * 1024


# What no inference engine of Atoll serves (each row of a batch goes through its own LoRA
# matrices beside the shared base): storage refuses these at upload, nodes at load.
UNSERVABLE = {
    "use_dora": "DoRA adapters are not served (only plain LoRA batches per row)",
    "lora_bias": "LoRA bias adapters are not served (only plain LoRA batches per row)",
    "modules_to_save": "modules_to_save replaces whole layers and cannot share a batch",
}


def unservable(config: dict[str, Any]) -> str | None:
    """Why the adapter configured by ``config`` (its adapter_config.json) cannot be served
    anywhere, or None."""
    if config.get("peft_type") != "LORA":
        return f"peft_type is {config.get('peft_type')!r}, only LORA is served"
    for key, why in UNSERVABLE.items():
        if config.get(key):
            return why
    ranks = [config.get("r", 0), *(config.get("rank_pattern") or {}).values()]
    if not all(type(r) is int and r > 0 for r in ranks):
        return "rank r must be a positive integer"
    return None


# --- errors (rebuilt by class name on the caller's side once this module is imported) ----------


class AdapterNotFound(AtollError):
    """No adapter with that id exists where this node looks for adapters."""


class InvalidAdapter(AtollError):
    """The upload is not a storable LoRA adapter (config, weights, names or size); nothing kept."""


class AdapterExists(AtollError):
    """That adapter id is taken: adapters are immutable, a new version takes a new id."""


# --- schemas --------------------------------------------------------------------------------


def adapter_id_problem(adapter_id: object) -> str | None:
    """Why ``adapter_id`` is not a valid adapter id, or None if it is."""
    if not isinstance(adapter_id, str) or not ADAPTER_ID.fullmatch(adapter_id):
        return (
            f"adapter id {adapter_id!r} must be 1-160 characters of letters, digits and ._/-, "
            "starting with a letter or digit"
        )
    segments = adapter_id.split("/")
    if any(s in ("", ".", "..") for s in segments):
        return f"adapter id {adapter_id!r} has an empty, '.' or '..' path segment"
    if any(s in ADAPTER_FILES for s in segments):
        # Would collide with another adapter's file in a directory-shaped store.
        return f"adapter id {adapter_id!r} has a segment named like an adapter file"
    return None


def is_collection(adapter_id: str) -> bool:
    return adapter_id.startswith(COLLECTION_PREFIX)


def check_adapter_id(adapter_id: object) -> str:
    problem = adapter_id_problem(adapter_id)
    if problem:
        raise InvalidRequest(problem)
    assert isinstance(adapter_id, str)  # what adapter_id_problem checked first
    return adapter_id


class AdapterFile(FileEntry):
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


class TransferHeader(Strict):
    """The first line of an ``adapter_put`` or ``adapter_get`` stream."""

    id: AdapterIdStr
    files: Annotated[
        list[AdapterFile], Field(max_length=len(ADAPTER_FILES)), AfterValidator(_distinct)
    ]
    meta: Annotated[dict[str, Any], AfterValidator(_bounded)] = Field(default_factory=dict)
    # Who it belongs to, as the uploader (a trainer, the gateway) says: the gateway grants
    # access by these when storage announces the adapter.
    owner: OwnerName | None = None  # a user
    project: OwnerName | None = None
    public: bool = False
    source_job: OwnerName | None = None  # the training job that made it

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
    uploader: str  # the uploading agent's name
    created: float  # epoch seconds
    meta: dict[str, Any] = Field(default_factory=dict)
    owner: str | None = None  # the user it belongs to
    project: str | None = None
    public: bool = False  # visible to every user of the gateway
    source_job: str | None = None


class AdapterId(Strict):
    id: AdapterIdStr


MAX_EVALUATIONS = 10  # an adapter's evaluation summaries kept in its record's meta
MAX_EVALUATION_BYTES = 4096  # one summary's JSON


class AdapterEvaluation(Strict):
    """One evaluation's figures for one adapter (the gateway's summary of its report)."""

    id: AdapterIdStr
    evaluation: dict[str, Any]

    @field_validator("evaluation")
    @classmethod
    def _bounded(cls, v: dict[str, Any]) -> dict[str, Any]:
        if len(json.dumps(v)) > MAX_EVALUATION_BYTES:
            raise ValueError(f"an evaluation summary is at most {MAX_EVALUATION_BYTES} bytes")
        return v


class AdapterQuery(Strict):
    base_model: str | None = None
    owner: str | None = None
    project: str | None = None


# --- methods: the plugin serves them and the clients below call them from this one table ------

LIST_ADAPTERS: Method[AdapterQuery, list[AdapterRecord]] = Method(
    "list_adapters", AdapterQuery, list[AdapterRecord], "list_adapters query"
)
DESCRIBE_ADAPTER: Method[AdapterId, AdapterRecord] = Method(
    "describe_adapter", AdapterId, AdapterRecord, "describe_adapter request"
)
DELETE_ADAPTER: Method[AdapterId, Deleted] = Method(
    "delete_adapter", AdapterId, Deleted, "delete_adapter request"
)
NOTE_EVALUATION: Method[AdapterEvaluation, AdapterRecord] = Method(
    "note_evaluation", AdapterEvaluation, AdapterRecord, "note_evaluation request"
)


async def receive_files(
    reader: Reader, files: list[AdapterFile], directory: Path, progress: Progress | None = None
) -> None:
    """Write each file's bytes into ``directory``, checking its size and sha256."""
    advance = counter(sum(f.size for f in files), progress)
    for entry in files:
        await receive_file(reader, directory / entry.name, entry.size, entry.sha256, advance)


# --- clients --------------------------------------------------------------------------------


async def upload_adapter(
    agent: Opener,
    storage_address: str,
    local_dir: Path,
    adapter_id: str,
    meta: dict[str, Any] | None = None,
    *,
    owner: str | None = None,
    project: str | None = None,
    public: bool = False,
    source_job: str | None = None,
    idle_timeout: float = IDLE_TIMEOUT,
    progress: Progress | None = None,
) -> AdapterRecord:
    """Upload the adapter files in ``local_dir`` (others there, like peft's README.md, are left
    out) as ``adapter_id``, belonging to user ``owner`` and/or ``project`` (or ``public``); the
    storage agent validates and registers it, then announces it on ``adapters.new``."""
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
    header = parse(
        TransferHeader,
        {
            "id": adapter_id,
            "files": files,
            "meta": meta or {},
            "owner": owner,
            "project": project,
            "public": public,
            "source_job": source_job,
        },
        "upload",
    )
    reply = await put_resumable(
        agent,
        service_address(storage_address, PLUGIN),
        PUT_SERVICE,
        header.model_dump(mode="json"),
        [(path, entry.size) for entry, path in zip(header.files, paths, strict=True)],
        idle_timeout,
        progress,
    )
    return parse(AdapterRecord, reply.get("adapter"), f"reply from {storage_address}")


async def fetch_adapter(
    agent: Opener,
    storage_address: str,
    adapter_id: str,
    dest_dir: Path,
    *,
    idle_timeout: float = IDLE_TIMEOUT,
    progress: Progress | None = None,
) -> Path:
    """Fetch adapter ``adapter_id`` into the directory ``dest_dir`` and return it.

    Files land in a directory in the hidden staging directory next to ``dest_dir``, which is
    renamed into place only once every file's size and sha256 match the header: a broken or
    stalled transfer leaves nothing visible, and calling again starts afresh. ``dest_dir`` may
    already exist only without adapter files in it (it holds nested ids: ``team/v1`` fetched
    before ``team``); the files are then moved in one by one, adapter_config.json last.
    """
    check_adapter_id(adapter_id)
    dest = Path(dest_dir).absolute()
    if dest.exists() and (not dest.is_dir() or any((dest / n).exists() for n in ADAPTER_FILES)):
        raise FileExistsError(f"{dest} already holds an adapter; fetch into a new directory")
    where = service_address(storage_address, PLUGIN)
    params = {"id": adapter_id}
    with staged(dest, directory=True) as stage:
        async with fetching(agent, where, GET_SERVICE, params, idle_timeout) as reader:
            raw = await reader.line()
            header = parse(TransferHeader, raw, f"header from {storage_address}")
            if header.id != adapter_id:
                raise TransferFailed(
                    f"asked for {adapter_id!r}, {storage_address} sent {header.id!r}"
                )
            await receive_files(reader, header.files, stage, progress)
            _move_into_place(stage, dest, [f.name for f in header.files])
    return dest


def _move_into_place(stage: Path, dest: Path, names: list[str]) -> None:
    if not dest.exists():
        os.rename(stage, dest)
        return
    # Whoever sees adapter_config.json sees the whole adapter.
    for name in sorted(names, key=lambda n: n == CONFIG_FILE):
        os.rename(stage / name, dest / name)


async def list_adapters(
    agent: Caller,
    storage_address: str,
    base_model: str | None = None,
    owner: str | None = None,
    timeout: float | None = None,
    project: str | None = None,
) -> list[AdapterRecord]:
    query = AdapterQuery(base_model=base_model, owner=owner, project=project)
    return await storage_client(agent, storage_address, timeout).invoke(LIST_ADAPTERS, query)


async def describe_adapter(
    agent: Caller, storage_address: str, adapter_id: str, timeout: float | None = None
) -> AdapterRecord:
    ref = AdapterId(id=check_adapter_id(adapter_id))
    return await storage_client(agent, storage_address, timeout).invoke(DESCRIBE_ADAPTER, ref)


async def note_evaluation(
    agent: Caller,
    storage_address: str,
    adapter_id: str,
    evaluation: dict[str, Any],
    timeout: float | None = None,
) -> AdapterRecord:
    ref = AdapterEvaluation(id=check_adapter_id(adapter_id), evaluation=evaluation)
    return await storage_client(agent, storage_address, timeout).invoke(NOTE_EVALUATION, ref)


async def delete_adapter(
    agent: Caller, storage_address: str, adapter_id: str, timeout: float | None = None
) -> None:
    """Remove the adapter from the registry and the store; AdapterNotFound if there is none."""
    ref = AdapterId(id=check_adapter_id(adapter_id))
    await storage_client(agent, storage_address, timeout).invoke(DELETE_ADAPTER, ref)
