"""The storage plugin: an object store plus a registry of LoRA adapters, served over the data
plane (see ``contract.py`` for the wire). Adapters are validated before anything is kept,
immutable once registered, and stored under ``adapters/<id>/<file>``.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from safetensors import SafetensorError, safe_open

from atoll.agent.errors import Forbidden
from atoll.agent.node import CallInfo
from atoll.agent.plugins import Plugin, PluginContext, rpc
from atoll.agent.streams import Stream
from atoll.plugins.storage.contract import (
    CONFIG_FILE,
    DELETE_METHOD,
    DESCRIBE_METHOD,
    GET_SERVICE,
    IDLE_TIMEOUT,
    LIST_METHOD,
    MAX_HEADER_BYTES,
    PUT_SERVICE,
    WEIGHTS_FILE,
    WRITER_ROLES,
    AdapterExists,
    AdapterId,
    AdapterNotFound,
    AdapterQuery,
    AdapterRecord,
    InvalidAdapter,
    Reader,
    TransferFailed,
    TransferHeader,
    idle_deadline,
    parse,
    receive_files,
    send_bytes,
    write_line,
)
from atoll.plugins.storage.store import LocalStore, ObjectNotFound, ObjectStore

MAX_CONFIG_BYTES = 1024 * 1024

SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    id TEXT PRIMARY KEY,
    base_model TEXT NOT NULL,
    rank INTEGER NOT NULL,
    target_modules TEXT NOT NULL,  -- JSON list
    files TEXT NOT NULL,           -- JSON [{name, size, sha256}]
    size_bytes INTEGER NOT NULL,
    owner TEXT NOT NULL,
    created REAL NOT NULL,
    meta TEXT NOT NULL             -- JSON object
);
CREATE INDEX IF NOT EXISTS adapters_base ON adapters (base_model);
"""
COLUMNS = "id, base_model, rank, target_modules, files, size_bytes, owner, created, meta"


class StorageConfig(BaseModel):
    """``[plugins.storage]``."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    root: Path | None = None  # the local store's directory; None: <plugin data dir>/objects
    max_adapter_bytes: int = Field(2 * 1024**3, ge=1)


def adapter_key(adapter_id: str, name: str) -> str:
    return f"adapters/{adapter_id}/{name}"


class AdapterRegistry:
    """Registered adapters in SQLite. One connection, used only from the event loop: its
    statements are single-row and short."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)  # autocommit: one row per change
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    @staticmethod
    def _record(row: tuple[Any, ...]) -> AdapterRecord:
        keys = COLUMNS.split(", ")
        data = dict(zip(keys, row, strict=True))
        for key in ("target_modules", "files", "meta"):
            data[key] = json.loads(data[key])
        return AdapterRecord.model_validate(data)

    def get(self, adapter_id: str) -> AdapterRecord | None:
        row = self.db.execute(f"SELECT {COLUMNS} FROM adapters WHERE id = ?", (adapter_id,))
        found = row.fetchone()
        return None if found is None else self._record(found)

    def find(self, query: AdapterQuery) -> list[AdapterRecord]:
        sql = f"SELECT {COLUMNS} FROM adapters WHERE 1=1"
        args: list[str] = []
        if query.base_model is not None:
            sql += " AND base_model = ?"
            args.append(query.base_model)
        if query.owner is not None:
            sql += " AND owner = ?"
            args.append(query.owner)
        return [self._record(r) for r in self.db.execute(sql + " ORDER BY id", args)]

    def add(self, r: AdapterRecord) -> None:
        try:
            self.db.execute(
                f"INSERT INTO adapters ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    r.id,
                    r.base_model,
                    r.rank,
                    json.dumps(r.target_modules),
                    json.dumps([f.model_dump() for f in r.files]),
                    r.size_bytes,
                    r.owner,
                    r.created,
                    json.dumps(r.meta),
                ),
            )
        except sqlite3.IntegrityError:
            raise AdapterExists(f"adapter {r.id!r} already exists") from None

    def remove(self, adapter_id: str) -> bool:
        return self.db.execute("DELETE FROM adapters WHERE id = ?", (adapter_id,)).rowcount > 0

    def totals(self) -> tuple[int, int]:
        count, size = self.db.execute("SELECT COUNT(*), SUM(size_bytes) FROM adapters").fetchone()
        return count, size or 0


def inspect_adapter(directory: Path) -> tuple[str, int, list[str]]:
    """(base model, rank, target modules) of the LoRA adapter in ``directory``; InvalidAdapter
    saying what is wrong otherwise. Blocking: run it in a thread."""
    try:
        config = json.loads((directory / CONFIG_FILE).read_text("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidAdapter(f"{CONFIG_FILE} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise InvalidAdapter(f"{CONFIG_FILE} must hold a JSON object")
    if config.get("peft_type") != "LORA":
        raise InvalidAdapter(
            f"{CONFIG_FILE}: peft_type is {config.get('peft_type')!r}; only LORA adapters are kept"
        )
    base = config.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise InvalidAdapter(f"{CONFIG_FILE}: base_model_name_or_path is missing")
    rank = config.get("r")
    if type(rank) is not int or rank < 1:
        raise InvalidAdapter(f"{CONFIG_FILE}: r (the LoRA rank) must be a positive integer")
    targets = config.get("target_modules")
    if isinstance(targets, str):  # peft also takes one regex or "all-linear"
        targets = [targets]
    if (
        not isinstance(targets, list)
        or not targets
        or not all(isinstance(t, str) and t for t in targets)
    ):
        raise InvalidAdapter(f"{CONFIG_FILE}: target_modules must name the adapted modules")
    try:
        with safe_open(str(directory / WEIGHTS_FILE), framework="numpy") as fh:
            tensors = list(fh.keys())
    except SafetensorError as exc:
        raise InvalidAdapter(f"{WEIGHTS_FILE} is not a valid safetensors file: {exc}") from None
    if not any(".lora_A." in t for t in tensors) or not any(".lora_B." in t for t in tensors):
        raise InvalidAdapter(f"{WEIGHTS_FILE} holds no LoRA tensors (lora_A and lora_B)")
    return base, rank, targets


class StoragePlugin(Plugin):
    """Stores adapters: ``adapter_put`` / ``adapter_get`` streams and registry RPCs."""

    name = "storage"

    async def start(self, ctx: PluginContext) -> None:
        await super().start(ctx)
        self.config = StorageConfig.model_validate(ctx.config)
        self.store: ObjectStore = LocalStore(self.config.root or ctx.data_dir / "objects")
        self.incoming = ctx.data_dir / "incoming"  # uploads being received and checked
        shutil.rmtree(self.incoming, ignore_errors=True)  # left by a crash mid-upload
        self.incoming.mkdir()
        self.registry = AdapterRegistry(ctx.data_dir / "registry.sqlite")
        self.uploading: set[str] = set()
        self.adapters = ctx.metrics.gauge("adapters_stored", "Adapters in the registry")
        self.adapter_bytes = ctx.metrics.gauge("adapter_bytes_stored", "Bytes of stored adapters")
        self.served = ctx.metrics.counter("adapter_served_bytes", "Adapter bytes sent to fetchers")
        self.received = ctx.metrics.counter("adapter_received_bytes", "Adapter bytes stored")
        self._update_totals()
        ctx.agent.streams.serve(ctx.name, PUT_SERVICE, self._put)
        ctx.agent.streams.serve(ctx.name, GET_SERVICE, self._get)

    async def stop(self) -> None:
        assert self.ctx is not None
        self.ctx.agent.streams.unserve(self.ctx.name)
        self.registry.close()

    def describe(self) -> dict[str, Any]:
        return {"capabilities": {"adapters": int(self.adapters.value), "store": self.store.kind}}

    def _update_totals(self) -> None:
        count, size = self.registry.totals()
        self.adapters.set(count)
        self.adapter_bytes.set(size)

    def _registered(self, adapter_id: str) -> AdapterRecord:
        record = self.registry.get(adapter_id)
        if record is None:
            assert self.ctx is not None
            raise AdapterNotFound(f"no adapter {adapter_id!r} in storage on {self.ctx.agent.name}")
        return record

    @staticmethod
    def _require_writer(call: CallInfo, action: str) -> None:
        if not call.caller.has_role(*WRITER_ROLES):
            raise Forbidden(
                f"{call.caller.name} may not {action}: that needs one of the roles "
                f"{', '.join(sorted(WRITER_ROLES))} (it has {', '.join(call.caller.roles)})"
            )

    # --- RPC --------------------------------------------------------------------------------

    @rpc(LIST_METHOD)
    async def list_adapters(self, params: Any, call: CallInfo) -> list[dict[str, Any]]:
        query = parse(AdapterQuery, params or {}, "list_adapters query")
        return [r.model_dump(mode="json") for r in self.registry.find(query)]

    @rpc(DESCRIBE_METHOD)
    async def describe_adapter(self, params: Any, call: CallInfo) -> dict[str, Any]:
        ref = parse(AdapterId, params, "describe_adapter request")
        return self._registered(ref.id).model_dump(mode="json")

    @rpc(DELETE_METHOD)
    async def delete_adapter(self, params: Any, call: CallInfo) -> dict[str, Any]:
        self._require_writer(call, "delete adapters")
        ref = parse(AdapterId, params, "delete_adapter request")
        record = self._registered(ref.id)
        self.registry.remove(ref.id)  # first: from here on nobody is offered it
        for entry in record.files:
            await self.store.delete(adapter_key(ref.id, entry.name))
        self._update_totals()
        assert self.ctx is not None
        self.ctx.log.info("storage.adapter_deleted", adapter=ref.id, by=call.caller.name)
        return {"deleted": True}

    # --- streams ----------------------------------------------------------------------------

    def _check_upload(self, header: TransferHeader) -> None:
        """Refusals that need no bytes: before any are received."""
        names = {f.name for f in header.files}
        missing = sorted({CONFIG_FILE, WEIGHTS_FILE} - names)
        if missing:
            raise InvalidAdapter(f"adapter {header.id!r} lacks {' and '.join(missing)}")
        if header.size > self.config.max_adapter_bytes:
            raise InvalidAdapter(
                f"adapter {header.id!r} is {header.size} bytes; this store takes at most "
                f"{self.config.max_adapter_bytes}"
            )
        if next(f.size for f in header.files if f.name == CONFIG_FILE) > MAX_CONFIG_BYTES:
            raise InvalidAdapter(f"{CONFIG_FILE} is larger than {MAX_CONFIG_BYTES} bytes")
        if header.id in self.uploading or self.registry.get(header.id) is not None:
            raise AdapterExists(
                f"adapter {header.id!r} already exists; adapters are immutable, "
                "so upload a new version under a new id"
            )

    async def _put(self, stream: Stream, params: Any, call: CallInfo) -> None:
        assert self.ctx is not None
        self._require_writer(call, "upload adapters")
        with idle_deadline(f"adapter upload from {call.src}", IDLE_TIMEOUT):
            reader = Reader(stream, IDLE_TIMEOUT)
            raw = await reader.line(MAX_HEADER_BYTES)
            header = parse(TransferHeader, raw, "adapter upload header")
            self._check_upload(header)
            stage = Path(tempfile.mkdtemp(dir=self.incoming))
            self.uploading.add(header.id)
            try:
                await receive_files(reader, header.files, stage)
                base, rank, targets = await asyncio.to_thread(inspect_adapter, stage)
                record = AdapterRecord(
                    id=header.id,
                    base_model=base,
                    rank=rank,
                    target_modules=targets,
                    files=header.files,
                    size_bytes=header.size,
                    owner=call.caller.name,
                    created=time.time(),
                    meta=header.meta,
                )
                await self._keep(record, stage)
            finally:
                self.uploading.discard(header.id)
                await asyncio.to_thread(shutil.rmtree, stage, True)
            self.received.inc(header.size)
            self.ctx.log.info(
                "storage.adapter_stored", adapter=header.id, bytes=header.size, owner=record.owner
            )
            reply = {"ok": True, "adapter": record.model_dump(mode="json")}
            await write_line(stream, reply, IDLE_TIMEOUT)

    async def _keep(self, record: AdapterRecord, stage: Path) -> None:
        """Put the checked files into the store, then register them; on any failure remove what
        was put, so an unregistered id has no objects."""
        keys: list[str] = []
        try:
            for entry in record.files:
                keys.append(adapter_key(record.id, entry.name))
                await self.store.put_file(keys[-1], stage / entry.name)
            self.registry.add(record)
        except BaseException:
            for key in keys:
                await self.store.delete(key)
            raise
        self._update_totals()

    async def _get(self, stream: Stream, params: Any, call: CallInfo) -> None:
        ref = parse(AdapterId, params, "adapter_get request")
        record = self._registered(ref.id)
        header = TransferHeader(id=record.id, files=record.files, meta=record.meta)
        with idle_deadline(f"adapter fetch by {call.src}", IDLE_TIMEOUT):
            await write_line(stream, header.model_dump(mode="json"), IDLE_TIMEOUT)
            for entry in record.files:
                chunks = self.store.read(adapter_key(record.id, entry.name))
                try:
                    await send_bytes(stream, chunks, entry.size, IDLE_TIMEOUT)
                except ObjectNotFound:
                    raise AdapterNotFound(f"adapter {record.id!r} was deleted while sent") from None
            reply = await Reader(stream, IDLE_TIMEOUT).line(MAX_HEADER_BYTES)
        if reply.get("ok") is not True:
            raise TransferFailed(f"{call.src} did not confirm adapter {record.id!r}: {reply}")
        self.served.inc(header.size)
