"""The storage plugin's dataset half: the ``dataset_put`` / ``dataset_get`` streams and the
registry operations behind the ``datasets``, ``dataset_info`` and ``dataset_delete`` RPCs (see
``contract/datasets.py`` for the wire).

A dataset is kept as two objects, ``datasets/<id>/original`` (the bytes as uploaded) and
``datasets/<id>/canonical.jsonl`` (its checked, de-duplicated rows: chat for sft, text for pt),
and one registry row. Nothing is kept until every row has passed; nothing is ever rewritten.

Uploads resume (``partials.py``): the bytes received are kept under a key of who uploads what
(caller, owner, project, sha256), so a cut upload sends only the rest when tried again.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Literal

from atoll.agent.contract import parse
from atoll.agent.errors import Forbidden, InvalidRequest
from atoll.agent.plugins import PluginContext
from atoll.agent.streams import Stream
from atoll.agent.transfer import (
    IDLE_TIMEOUT,
    Reader,
    confirmed,
    file_chunks,
    idle_deadline,
    send_bytes,
    write_line,
)
from atoll.plugins.storage.batch_files import prepare_batch
from atoll.plugins.storage.contract.datasets import (
    CANONICAL_FORM,
    DATASET_INFO,
    DELETE_DATASET,
    LIST_DATASETS,
    ORIGINAL_ONLY,
    DatasetFetch,
    DatasetGetHeader,
    DatasetInvalid,
    DatasetNotFound,
    DatasetPutHeader,
    DatasetRecord,
    DedupInfo,
    Kind,
    check_filename,
)
from atoll.plugins.storage.contract.wire import FileEntry
from atoll.plugins.storage.datasets import DatasetLimits, Prepared, convert_line, prepare
from atoll.plugins.storage.documents import prepare_document
from atoll.plugins.storage.partials import PartialUploads
from atoll.plugins.storage.registry import DatasetRegistry
from atoll.plugins.storage.results import prepare_results
from atoll.plugins.storage.store import ObjectNotFound, ObjectStore
from atoll.protocol.session import CallInfo
from atoll.tenancy.permissions import CLIENTS

ORIGINAL = "original"
CANONICAL = "canonical.jsonl"


def dataset_key(dataset_id: str, name: str) -> str:
    return f"datasets/{dataset_id}/{name}"


def _prepare_file(path: Path, header: DatasetPutHeader, limits: DatasetLimits) -> Prepared:
    """Blocking: run it in a thread."""
    data = path.read_bytes()
    if header.format == "csv":
        prepared = prepare_results(data, header.filename, limits)
    elif header.format in ("batch", "batch_output"):
        prepared = prepare_batch(data, header.filename, header.format, limits)
    elif header.format == "document":
        prepared = prepare_document(data, header.filename, limits)
    else:
        prepared = prepare(data, header.filename, header.format, limits, header.dedup)
    path.with_name(CANONICAL).write_bytes(prepared.canonical)
    return prepared


def _convert_file(src: Path, dest: Path, kind: Kind, as_: Literal["chat", "text"]) -> str:
    """Canonical JSONL ``src`` in the ``as_`` form into ``dest``; its sha256. Blocking."""
    digest = hashlib.sha256()
    with src.open("rb") as fh, dest.open("wb") as out:
        for line in fh:
            converted = convert_line(line, kind, as_)
            out.write(converted)
            digest.update(converted)
    return digest.hexdigest()


class DatasetService:
    def __init__(
        self,
        ctx: PluginContext,
        store: ObjectStore,
        registry: DatasetRegistry,
        limits: DatasetLimits,
        incoming: Path,
        partials: PartialUploads,
    ) -> None:
        self.ctx = ctx
        self.store = store
        self.registry = registry
        self.limits = limits
        self.incoming = incoming  # uploads being checked, conversions being sent
        self.partials = partials  # uploads being received (kept across restarts)
        self.stored = ctx.metrics.gauge("datasets_stored", "Datasets in the registry")
        self.stored_bytes = ctx.metrics.gauge("dataset_bytes_stored", "Uploaded dataset bytes")
        self.served = ctx.metrics.counter("dataset_served_bytes", "Dataset bytes sent")
        self.received = ctx.metrics.counter("dataset_received_bytes", "Dataset bytes stored")
        self._update_totals()

    def _update_totals(self) -> None:
        count, size = self.registry.totals()
        self.stored.set(count)
        self.stored_bytes.set(size)

    def registered(self, dataset_id: str) -> DatasetRecord:
        record = self.registry.get(dataset_id)
        if record is None:
            where = self.ctx.identity.name
            raise DatasetNotFound(f"no dataset {dataset_id!r} in storage on {where}")
        return record

    # --- registry operations ------------------------------------------------------------------

    def find(self, params: object) -> list[DatasetRecord]:
        return self.registry.find(LIST_DATASETS.parse_params(params))

    def info(self, params: object) -> DatasetRecord:
        return self.registered(DATASET_INFO.parse_params(params).id)

    async def delete(self, params: object, call: CallInfo) -> None:
        record = self.registered(DELETE_DATASET.parse_params(params).id)
        self.registry.remove(record.id)  # first: from here on nobody is offered it
        for name in (ORIGINAL, CANONICAL):
            await self.store.delete(dataset_key(record.id, name))
        self._update_totals()
        self.ctx.log.info("storage.dataset_deleted", dataset=record.id, by=call.caller.name)

    # --- streams ------------------------------------------------------------------------------

    async def put(self, stream: Stream, params: object, call: CallInfo) -> None:
        with idle_deadline(f"dataset upload from {call.src}", IDLE_TIMEOUT):
            reader = Reader(stream, IDLE_TIMEOUT)
            raw = await reader.line()
            header = parse(DatasetPutHeader, raw, "dataset upload header")
            if header.format != "csv" and not call.caller.has_role(*CLIENTS):
                raise Forbidden(
                    f"{call.caller.name!r} may upload a training job's results file (format "
                    "csv), not a dataset: that takes one of the roles " + ", ".join(CLIENTS)
                )
            check_filename(header.filename)  # as prepare() does, before any byte is received
            if header.size > self.limits.max_bytes:  # refused before any byte is received
                raise DatasetInvalid(
                    f"{header.filename} is {header.size} bytes; this store takes datasets of at "
                    f"most {self.limits.max_bytes}"
                )
            who = (call.caller.name, header.owner, header.project or "", header.sha256)
            original = FileEntry(name=ORIGINAL, size=header.size, sha256=header.sha256)
            partial, offset = await self.partials.receive(stream, reader, who, [original])
            stage = Path(tempfile.mkdtemp(dir=self.incoming))
            try:
                (partial / ORIGINAL).replace(stage / ORIGINAL)
                await self.partials.drop(partial)  # received whole: nothing left to resume
                prepared = await asyncio.to_thread(
                    _prepare_file, stage / ORIGINAL, header, self.limits
                )
                record = await self._keep(header, prepared, stage)
            finally:
                await asyncio.to_thread(shutil.rmtree, stage, True)
            self.received.inc(header.size - offset)
            self.ctx.log.info(
                "storage.dataset_stored",
                dataset=record.id,
                name=record.name,
                version=record.version,
                rows=record.rows,
                owner=record.owner,
                resumed_from=offset,
            )
            await write_line(
                stream, {"ok": True, "record": record.model_dump(mode="json")}, IDLE_TIMEOUT
            )

    def _new_id(self) -> str:
        for _ in range(8):  # 48 random bits: a clash is all but impossible, never looped on
            dataset_id = f"ds-{secrets.token_hex(6)}"
            if self.registry.get(dataset_id) is None:
                return dataset_id
        raise RuntimeError("could not draw an unused dataset id")

    async def _keep(
        self, header: DatasetPutHeader, prepared: Prepared, stage: Path
    ) -> DatasetRecord:
        """Put both objects, then register them; on any failure remove what was put, so an
        unregistered id has no objects."""
        record = DatasetRecord(
            id=self._new_id(),
            name=header.name,
            version=0,  # the registry gives the next one of this name
            format=prepared.format,
            kind=prepared.kind,
            rows=len(prepared.rows),
            tokens=prepared.tokens,
            tokenizer="whitespace",
            sha256=header.sha256,
            bytes=header.size,
            owner=header.owner,
            project=header.project,
            created=time.time(),
            dedup=DedupInfo(**vars(prepared.dedup)),
            filename=header.filename,
        )
        files = [(dataset_key(record.id, name), stage / name) for name in (ORIGINAL, CANONICAL)]
        stored = await self.store.put_and_register(files, lambda: self.registry.add(record))
        self._update_totals()
        return stored

    async def get(self, stream: Stream, params: object, call: CallInfo) -> None:
        request = parse(DatasetFetch, params, "dataset_get request")
        record = self.registered(request.id)
        if record.kind in ORIGINAL_ONLY and request.as_ != "original":
            raise InvalidRequest(
                f"{record.id!r} is {ORIGINAL_ONLY[record.kind]}, not a dataset: fetch it as the "
                "original"
            )
        with idle_deadline(f"dataset fetch by {call.src}", IDLE_TIMEOUT):
            if request.as_ == "original":
                size = await self._send_object(stream, record, ORIGINAL)
            elif request.as_ == CANONICAL_FORM.get(record.kind):
                size = await self._send_object(stream, record, CANONICAL)
            elif record.kind == "pt":
                raise InvalidRequest(
                    f"dataset {record.id!r} is a pt (text) dataset: it has no turns to read as "
                    "chat; fetch it as text"
                )
            elif "preference" in (record.kind, request.as_):
                # A preference pair has two replies to one prompt: no one conversation or text.
                raise InvalidRequest(
                    f"dataset {record.id!r} holds {record.kind} rows: they cannot be read as "
                    f"{request.as_}"
                )
            else:
                assert request.as_ in ("chat", "text")
                size = await self._send_converted(stream, record, request.as_)
            refusal = f"{call.src} did not confirm dataset {record.id!r}"
            await confirmed(Reader(stream, IDLE_TIMEOUT), refusal)
        self.served.inc(size)

    async def _send_object(self, stream: Stream, record: DatasetRecord, name: str) -> int:
        key = dataset_key(record.id, name)
        try:
            info = await self.store.stat(key)
            header = DatasetGetHeader(record=record, size=info.size, sha256=info.sha256)
            await write_line(stream, header.model_dump(mode="json"), IDLE_TIMEOUT)
            await send_bytes(stream, self.store.read(key), info.size, IDLE_TIMEOUT)
        except ObjectNotFound:
            raise DatasetNotFound(f"dataset {record.id!r} was deleted while sent") from None
        return info.size

    async def _send_converted(
        self, stream: Stream, record: DatasetRecord, as_: Literal["chat", "text"]
    ) -> int:
        stage = Path(tempfile.mkdtemp(dir=self.incoming))
        try:
            src, dest = stage / CANONICAL, stage / "converted.jsonl"
            fh = await asyncio.to_thread(src.open, "wb")
            try:
                async for chunk in self.store.read(dataset_key(record.id, CANONICAL)):
                    await asyncio.to_thread(fh.write, chunk)
            except ObjectNotFound:
                raise DatasetNotFound(f"dataset {record.id!r} was deleted while sent") from None
            finally:
                fh.close()
            sha = await asyncio.to_thread(_convert_file, src, dest, record.kind, as_)
            size = dest.stat().st_size
            header = DatasetGetHeader(record=record, size=size, sha256=sha)
            await write_line(stream, header.model_dump(mode="json"), IDLE_TIMEOUT)
            await send_bytes(stream, file_chunks(dest), size, IDLE_TIMEOUT)
        finally:
            await asyncio.to_thread(shutil.rmtree, stage, True)
        return size
