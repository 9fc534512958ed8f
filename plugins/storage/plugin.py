"""The storage plugin: an object store (a local directory, or S3) plus a registry of LoRA
adapters and training datasets, served over the data plane (see ``contract/`` for the wire).
Adapters are validated before anything is kept, immutable once registered, stored under
``adapters/<id>/<file>`` and announced on ``adapters.new`` (a deletion on ``adapters.deleted``);
datasets are handled by ``dataset_service.py``, training jobs' resume states by ``resume.py``,
vector stores by ``vectors.py``.
Every object is sealed at rest (sealed_store.py) unless ``encrypt`` is off.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from atoll.agent.config import ConfigPath
from atoll.agent.contract import parse
from atoll.agent.errors import AtollError, Forbidden
from atoll.agent.plugins import Plugin, PluginContext, rpc
from atoll.agent.streams import Stream
from atoll.agent.transfer import (
    IDLE_TIMEOUT,
    Reader,
    confirmed,
    idle_deadline,
    send_bytes,
    write_line,
)
from atoll.plugins.storage.adapter_files import adapter_key, inspect_adapter, inspect_collection
from atoll.plugins.storage.contract.adapters import (
    ADAPTERS_DELETED,
    ADAPTERS_NEW,
    COLLECTION_FILES,
    COLLECTION_MANIFEST,
    CONFIG_FILE,
    DELETE_ADAPTER,
    DESCRIBE_ADAPTER,
    GET_SERVICE,
    LIST_ADAPTERS,
    MAX_EVALUATIONS,
    NOTE_EVALUATION,
    PUT_SERVICE,
    WEIGHTS_FILE,
    AdapterExists,
    AdapterId,
    AdapterNotFound,
    AdapterRecord,
    InvalidAdapter,
    TransferHeader,
    is_collection,
)
from atoll.plugins.storage.contract.datasets import (
    DATASET_GET,
    DATASET_INFO,
    DATASET_PUT,
    DELETE_DATASET,
    LIST_DATASETS,
)
from atoll.plugins.storage.contract.resume import RESUME_DROP, RESUME_GET, RESUME_PUT
from atoll.plugins.storage.contract.wire import ROTATE_KEYS
from atoll.plugins.storage.dataset_service import DatasetService
from atoll.plugins.storage.datasets import DatasetLimits
from atoll.plugins.storage.keyring import KEYRING_FILE, Keyring
from atoll.plugins.storage.partials import PartialUploads
from atoll.plugins.storage.registry import AdapterRegistry, DatasetRegistry, open_registry
from atoll.plugins.storage.resume import ResumeStates
from atoll.plugins.storage.s3 import S3Config, S3Store
from atoll.plugins.storage.sealed_store import SealedStore
from atoll.plugins.storage.store import LocalStore, ObjectNotFound, ObjectStore
from atoll.plugins.storage.vectors import VectorIndex, VectorRPC
from atoll.protocol.session import CallInfo
from atoll.tenancy.permissions import (
    ADAPTER_READERS,
    ADAPTER_WRITERS,
    ADMINS,
    CLIENTS,
    DATASET_READERS,
    RESULTS_WRITERS,
    TRAINERS,
)

MAX_CONFIG_BYTES = 1024 * 1024


class DatasetsConfig(BaseModel):
    """``[plugins.storage.datasets]``: what one uploaded dataset may be."""

    model_config = ConfigDict(extra="forbid")

    max_bytes: int = Field(default=DatasetLimits.max_bytes, ge=1)
    max_rows: int = Field(default=DatasetLimits.max_rows, ge=1)
    max_row_chars: int = Field(default=DatasetLimits.max_row_chars, ge=1)


class StorageConfig(BaseModel):
    """``[plugins.storage]``."""

    model_config = ConfigDict(extra="forbid")

    store: Literal["local", "s3"] = "local"
    root: ConfigPath | None = None  # the local store's directory; None: <plugin data dir>/objects
    s3: S3Config | None = None  # [plugins.storage.s3], for store = "s3"
    max_adapter_bytes: int = Field(2 * 1024**3, ge=1)
    # Seal new objects (adapters, datasets, results files) with per-object data keys wrapped by
    # the tenant's key (sealed_store.py). On by default: the cost is a ChaCha20 pass over the
    # bytes, and the keyring file to back up. Off: new objects are plaintext; sealed ones read.
    encrypt: bool = True
    max_resume_bytes: int = Field(6 * 1024**3, ge=1)  # a job's optimizer, scheduler, RNG state
    datasets: DatasetsConfig = Field(default_factory=DatasetsConfig)

    @model_validator(mode="after")
    def _store_settings(self) -> StorageConfig:
        if self.store == "s3" and self.s3 is None:
            raise ValueError("store = 's3' needs an [s3] section with at least the bucket")
        if self.store == "local" and self.s3 is not None:
            raise ValueError("an [s3] section is given but store is 'local'; set store = 's3'")
        if self.store == "s3" and self.root is not None:
            raise ValueError("root is the local store's directory; the s3 store has no root")
        return self


class StoragePlugin(VectorRPC, Plugin):
    """Stores adapters and datasets: their streams and registry RPCs; vector stores (the
    RPCs of ``VectorRPC``)."""

    name = "storage"
    config_model = StorageConfig

    async def start(self, ctx: PluginContext) -> None:
        await super().start(ctx)
        self.config = config = ctx.settings(StorageConfig)
        self.incoming = ctx.data_dir / "incoming"  # uploads being received and checked
        shutil.rmtree(self.incoming, ignore_errors=True)  # left by a crash mid-upload
        self.incoming.mkdir()
        if config.s3 is not None:  # store = "s3" (the config's checks)
            s3 = S3Store(config.s3, spool_dir=self.incoming)
            await s3.open()
            inner: ObjectStore = s3
        else:
            inner = LocalStore(config.root or ctx.data_dir / "objects")
        self.db = open_registry(ctx.data_dir / "registry.sqlite")
        keyring = Keyring.open(ctx.data_dir / KEYRING_FILE, ctx.identity.tenant)
        self.store = SealedStore(inner, keyring, self.db, seal=config.encrypt)
        self.registry = AdapterRegistry(self.db)
        self.dataset_registry = DatasetRegistry(self.db)
        self.datasets = DatasetService(
            ctx,
            self.store,
            self.dataset_registry,
            DatasetLimits(**config.datasets.model_dump()),
            self.incoming,
            PartialUploads(ctx.data_dir / "resumable" / "datasets"),
        )
        self.resume = ResumeStates(ctx, self.store, self.incoming, config.max_resume_bytes)
        self.vectors = VectorIndex(self.store)
        await self.vectors.load()
        self.uploading: set[str] = set()
        self.partials = PartialUploads(ctx.data_dir / "resumable" / "adapters")  # see _put
        self.adapters = ctx.metrics.gauge("adapters_stored", "Adapters in the registry")
        self.adapter_bytes = ctx.metrics.gauge("adapter_bytes_stored", "Bytes of stored adapters")
        self.served = ctx.metrics.counter("adapter_served_bytes", "Adapter bytes sent to fetchers")
        self.received = ctx.metrics.counter("adapter_received_bytes", "Adapter bytes stored")
        self._update_totals()
        ctx.serve_stream(PUT_SERVICE, self._put, roles=ADAPTER_WRITERS)
        ctx.serve_stream(GET_SERVICE, self._get, roles=ADAPTER_READERS)
        # Trainers upload results files only: the service refuses them anything else.
        ctx.serve_stream(DATASET_PUT, self.datasets.put, roles=RESULTS_WRITERS)
        ctx.serve_stream(DATASET_GET, self.datasets.get, roles=DATASET_READERS)
        ctx.serve_stream(RESUME_PUT, self.resume.put, roles=TRAINERS)
        ctx.serve_stream(RESUME_GET, self.resume.get, roles=TRAINERS)

    async def stop(self) -> None:
        self.db.close()

    def describe(self) -> dict[str, Any]:
        return {"capabilities": {"adapters": int(self.adapters.value), "store": self.config.store}}

    def _update_totals(self) -> None:
        count, size = self.registry.totals()
        self.adapters.set(count)
        self.adapter_bytes.set(size)

    def _registered(self, adapter_id: str) -> AdapterRecord:
        record = self.registry.get(adapter_id)
        if record is None:
            where = self.ctx.identity.name
            raise AdapterNotFound(f"no adapter {adapter_id!r} in storage on {where}")
        return record

    # --- RPC --------------------------------------------------------------------------------

    @rpc(LIST_ADAPTERS.name, roles=ADAPTER_READERS)
    async def list_adapters(self, params: Any, call: CallInfo) -> list[dict[str, Any]]:
        query = LIST_ADAPTERS.parse_params(params)
        return [r.model_dump(mode="json") for r in self.registry.find(query)]

    @rpc(DESCRIBE_ADAPTER.name, roles=ADAPTER_READERS)
    async def describe_adapter(self, params: Any, call: CallInfo) -> dict[str, Any]:
        ref = DESCRIBE_ADAPTER.parse_params(params)
        return self._registered(ref.id).model_dump(mode="json")

    @rpc(NOTE_EVALUATION.name, roles=CLIENTS)
    async def note_evaluation(self, params: Any, call: CallInfo) -> dict[str, Any]:
        """Keep an evaluation's figures with the adapter: its meta's ``evaluations``, newest
        last, the last MAX_EVALUATIONS (the gateway has checked the caller's right to it)."""
        note = NOTE_EVALUATION.parse_params(params)
        record = self._registered(note.id)
        kept = record.meta.get("evaluations")
        kept = [*(kept if isinstance(kept, list) else []), note.evaluation][-MAX_EVALUATIONS:]
        record.meta["evaluations"] = kept
        self.registry.set_meta(note.id, record.meta)
        return record.model_dump(mode="json")

    @rpc(DELETE_ADAPTER.name, roles=ADAPTER_WRITERS)
    async def delete_adapter(self, params: Any, call: CallInfo) -> dict[str, Any]:
        """Clients delete any adapter; trainers only a training job's checkpoints (those past
        the number kept)."""
        ref = DELETE_ADAPTER.parse_params(params)
        record = self._registered(ref.id)
        if not call.caller.has_role(*CLIENTS) and not (
            record.source_job and "checkpoint" in record.meta
        ):
            raise Forbidden(f"a trainer deletes only training checkpoints; {ref.id!r} is not one")
        self.registry.remove(ref.id)  # first: from here on nobody is offered it
        for entry in record.files:
            await self.store.delete(adapter_key(ref.id, entry.name))
        self._update_totals()
        self.ctx.log.info("storage.adapter_deleted", adapter=ref.id, by=call.caller.name)
        try:  # the gateway then takes back its access (it asks storage first)
            await self.ctx.publish(ADAPTERS_DELETED, {"id": ref.id})
        except AtollError as exc:
            self.ctx.log.warning("storage.announce_failed", adapter=ref.id, error=exc)
        return {"deleted": True}

    @rpc(ROTATE_KEYS.name, roles=ADMINS)
    async def keys_rotate(self, params: Any, call: CallInfo) -> dict[str, Any]:
        ROTATE_KEYS.parse_params(params)
        rotated = self.store.rotate()
        self.ctx.log.info("storage.keys_rotated", by=call.caller.name, **rotated)
        return rotated

    @rpc(RESUME_DROP.name, roles=TRAINERS)
    async def resume_drop(self, params: Any, call: CallInfo) -> dict[str, Any]:
        ref = RESUME_DROP.parse_params(params)
        return {"deleted": await self.resume.drop(ref.job)}

    @rpc(LIST_DATASETS.name, roles=DATASET_READERS)
    async def list_datasets(self, params: Any, call: CallInfo) -> list[dict[str, Any]]:
        return [r.model_dump(mode="json") for r in self.datasets.find(params)]

    @rpc(DATASET_INFO.name, roles=DATASET_READERS)
    async def dataset_info(self, params: Any, call: CallInfo) -> dict[str, Any]:
        return self.datasets.info(params).model_dump(mode="json")

    @rpc(DELETE_DATASET.name, roles=CLIENTS)
    async def delete_dataset(self, params: Any, call: CallInfo) -> dict[str, Any]:
        await self.datasets.delete(params, call)
        return {"deleted": True}

    # --- streams ----------------------------------------------------------------------------

    def _check_upload(self, header: TransferHeader) -> None:
        """Refusals that need no bytes: before any are received."""
        names = {f.name for f in header.files}
        collection = is_collection(header.id)
        needed = COLLECTION_FILES if collection else {CONFIG_FILE, WEIGHTS_FILE}
        missing = sorted(needed - names)
        if missing:
            raise InvalidAdapter(f"adapter {header.id!r} lacks {' and '.join(missing)}")
        if collection != (names <= COLLECTION_FILES):
            raise InvalidAdapter(
                f"{header.id!r}: only collections/... ids hold a collection's files, and only them"
            )
        if header.size > self.config.max_adapter_bytes:
            raise InvalidAdapter(
                f"adapter {header.id!r} is {header.size} bytes; this store takes at most "
                f"{self.config.max_adapter_bytes}"
            )
        small = COLLECTION_MANIFEST if collection else CONFIG_FILE
        if next(f.size for f in header.files if f.name == small) > MAX_CONFIG_BYTES:
            raise InvalidAdapter(f"{small} is larger than {MAX_CONFIG_BYTES} bytes")
        if header.id in self.uploading:  # a cut transfer whose end this side has not seen yet
            raise AdapterExists(
                f"adapter {header.id!r} is being uploaded by another transfer right now; "
                "try again once it ends (a cut upload then resumes where it stopped)"
            )
        if self.registry.get(header.id) is not None:
            raise AdapterExists(
                f"adapter {header.id!r} already exists; adapters are immutable, "
                "so upload a new version under a new id"
            )

    async def _put(self, stream: Stream, params: Any, call: CallInfo) -> None:
        with idle_deadline(f"adapter upload from {call.src}", IDLE_TIMEOUT):
            reader = Reader(stream, IDLE_TIMEOUT)
            raw = await reader.line()
            header = parse(TransferHeader, raw, "adapter upload header")
            self._check_upload(header)
            self.uploading.add(header.id)
            try:
                who = [call.caller.name, header.id, header.owner or "", header.project or ""]
                who += [f"{f.name}:{f.sha256}" for f in header.files]
                stage, resumed = await self.partials.receive(stream, reader, who, header.files)
            except BaseException:
                self.uploading.discard(header.id)
                raise  # what arrived stays for the next attempt
            try:
                meta = header.meta
                if is_collection(header.id):  # its members as its manifest says, not the uploader
                    base, rank, targets, members = await asyncio.to_thread(
                        inspect_collection, stage
                    )
                    meta = meta | {"kind": "collection", "members": members}
                else:
                    base, rank, targets = await asyncio.to_thread(inspect_adapter, stage)
                record = AdapterRecord(
                    id=header.id,
                    base_model=base,
                    rank=rank,
                    target_modules=targets,
                    files=header.files,
                    size_bytes=header.size,
                    uploader=call.caller.name,
                    created=time.time(),
                    meta=meta,
                    owner=header.owner,
                    project=header.project,
                    public=header.public,
                    source_job=header.source_job,
                )
                await self._keep(record, stage)
            finally:  # kept or refused: nothing left to resume
                self.uploading.discard(header.id)
                await self.partials.drop(stage)
            self.received.inc(header.size - resumed)
            self.ctx.log.info(
                "storage.adapter_stored",
                adapter=header.id,
                bytes=header.size,
                owner=record.owner,
                project=record.project,
                by=record.uploader,
            )
            await self._announce(record)  # before the reply: the uploader's next step may need it
            reply = {"ok": True, "adapter": record.model_dump(mode="json")}
            await write_line(stream, reply, IDLE_TIMEOUT)

    async def _announce(self, record: AdapterRecord) -> None:
        """Tell the tenant: the gateway grants access by owner/project at once. The adapter is
        stored either way; a failed announcement is logged (an admin can then register the
        adapter at the gateway by hand)."""
        try:
            await self.ctx.publish(ADAPTERS_NEW, record.model_dump(mode="json"))
        except AtollError as exc:
            self.ctx.log.warning("storage.announce_failed", adapter=record.id, error=exc)

    async def _keep(self, record: AdapterRecord, stage: Path) -> None:
        """Put the checked files into the store, then register them; on any failure remove what
        was put, so an unregistered id has no objects."""
        files = [(adapter_key(record.id, f.name), stage / f.name) for f in record.files]
        await self.store.put_and_register(files, lambda: self.registry.add(record))
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
            refusal = f"{call.src} did not confirm adapter {record.id!r}"
            await confirmed(Reader(stream, IDLE_TIMEOUT), refusal)
        self.served.inc(header.size)
