"""OpenAI's vector store file batches: many files attached to one store in the background, the
batch's counts and each file's outcome kept (``client.vector_stores.file_batches.create``,
``upload_and_poll``). Each file is attached as ``POST .../files`` attaches it, with the batch
creator's rights, one after another (each is embedded by the nodes in batches of its own chunks);
a file that cannot be attached is counted failed with its reason and the others go on.

Who may: whoever may read the store starts a batch there; a batch is seen by its creator,
members of its project and administrators (file_access.py), others get a 404. Batches are kept
as JSON files in the gateway's data directory; one a stopping gateway interrupted is kept as
cancelled, its remaining files counted so.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, model_validator

from atoll.plugins.gateway.accounts.keys import Principal
from atoll.plugins.gateway.bodies import RequestBody
from atoll.plugins.gateway.errors import GatewayError
from atoll.plugins.gateway.file_access import may_see
from atoll.plugins.gateway.json_files import write_json
from atoll.plugins.gateway.vector_shapes import (
    AttachFile,
    ChunkingStrategy,
    FileCounts,
    VectorStoreFile,
    VectorStoreFileList,
    cursor_page,
)
from atoll.plugins.gateway.vector_stores import VectorStores
from atoll.plugins.storage.contract.vectors import Attributes

MAX_FILES = 500  # OpenAI's limit on one batch
FileId = Annotated[str, Field(min_length=1, max_length=256)]
BatchStatus = Literal["in_progress", "completed", "cancelled", "failed"]


class BatchFile(RequestBody):
    file_id: FileId
    attributes: Attributes | None = None
    chunking_strategy: ChunkingStrategy | None = None


class CreateFileBatch(RequestBody):
    """``file_ids`` (each with the batch's attributes and chunking), or ``files`` (each its own)."""

    file_ids: list[FileId] | None = Field(None, min_length=1, max_length=MAX_FILES)
    files: list[BatchFile] | None = Field(None, min_length=1, max_length=MAX_FILES)
    attributes: Attributes | None = None
    chunking_strategy: ChunkingStrategy | None = None

    @model_validator(mode="after")
    def _one_list(self) -> CreateFileBatch:
        if (self.file_ids is None) == (self.files is None):
            raise ValueError("give file_ids or files, not both")
        if self.files is not None and (self.attributes or self.chunking_strategy):
            raise ValueError("with files, give each file its attributes and chunking_strategy")
        ids = self.file_ids or [f.file_id for f in self.files or []]
        if len(set(ids)) != len(ids):
            raise ValueError("a batch names each file once")
        return self

    def attachments(self) -> list[AttachFile]:
        if self.files is not None:
            return [AttachFile.model_validate(f.model_dump()) for f in self.files]
        return [
            AttachFile(
                file_id=i, attributes=self.attributes, chunking_strategy=self.chunking_strategy
            )
            for i in self.file_ids or []
        ]


class FileBatch(BaseModel):
    id: str
    object: Literal["vector_store.files_batch"] = "vector_store.files_batch"
    created_at: int
    vector_store_id: str
    status: BatchStatus
    file_counts: FileCounts


class Kept(BaseModel):
    """A batch with what the API does not show: whose it is, its files and their outcomes."""

    batch: FileBatch
    owner: str
    project: str | None
    files: list[str]
    errors: dict[str, str] = Field(default_factory=dict)  # file id -> why it failed


class FileBatches:
    def __init__(self, stores: VectorStores, root: Path) -> None:
        self.stores = stores
        self.root = root
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.kept: dict[str, Kept] = {}
        self.runs: dict[str, asyncio.Task[None]] = {}
        for path in sorted(root.glob("vsfb_*.json")):
            kept = Kept.model_validate(json.loads(path.read_text()))
            if kept.batch.status == "in_progress":  # the gateway stopped while it ran
                self._finish(kept, "cancelled")
            self.kept[kept.batch.id] = kept

    async def close(self) -> None:
        for task in list(self.runs.values()):
            task.cancel()
        await asyncio.gather(*self.runs.values(), return_exceptions=True)

    async def create(self, principal: Principal, store_id: str, body: CreateFileBatch) -> FileBatch:
        await self.stores.get(principal, store_id)  # a 404 for a store the caller may not read
        attachments = body.attachments()
        total = len(attachments)
        kept = Kept(
            batch=FileBatch(
                id=f"vsfb_{uuid.uuid4().hex[:24]}",
                created_at=int(time.time()),
                vector_store_id=store_id,
                status="in_progress",
                file_counts=FileCounts(in_progress=total, total=total),
            ),
            owner=principal.user,
            project=principal.project,
            files=[a.file_id for a in attachments],
        )
        self.kept[kept.batch.id] = kept
        self._save(kept)
        task = asyncio.create_task(self._run(principal, kept, attachments))
        self.runs[kept.batch.id] = task
        task.add_done_callback(lambda _: self.runs.pop(kept.batch.id, None))
        return kept.batch

    def get(self, principal: Principal, store_id: str, batch_id: str) -> Kept:
        kept = self.kept.get(batch_id)
        if (
            kept is None
            or kept.batch.vector_store_id != store_id
            or not may_see(self.stores.gw.accounts, principal, kept.owner, kept.project)
        ):
            raise GatewayError(404, f"no file batch {batch_id!r}", code="not_found")
        return kept

    async def cancel(self, principal: Principal, store_id: str, batch_id: str) -> FileBatch:
        kept = self.get(principal, store_id, batch_id)
        task = self.runs.get(batch_id)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return kept.batch

    async def files(
        self,
        principal: Principal,
        store_id: str,
        batch_id: str,
        status: str | None,
        limit: int,
    ) -> VectorStoreFileList:
        """The batch's files as the store holds them (the completed ones), and those that
        failed or were cancelled with their outcome; with ``status``, those in it."""
        kept = self.get(principal, store_id, batch_id)
        attached = {
            f.id: f
            for f in (await self.stores.files(principal, store_id, "asc", None, MAX_FILES)).data
        }
        out = []
        for file_id in kept.files:
            if file_id in attached:
                out.append(attached[file_id])
            elif file_id in kept.errors:
                error = {"code": "server_error", "message": kept.errors[file_id]}
                out.append(self._unattached(kept, file_id, "failed", error))
            elif kept.batch.status != "in_progress":
                out.append(self._unattached(kept, file_id, "cancelled", None))
            else:
                out.append(self._unattached(kept, file_id, "in_progress", None))
        kept_files = [f for f in out if status is None or f.status == status]
        return VectorStoreFileList(**cursor_page(kept_files, None, limit))

    async def _run(self, principal: Principal, kept: Kept, attachments: list[AttachFile]) -> None:
        counts = kept.batch.file_counts
        try:
            for attachment in attachments:
                try:
                    await self.stores.attach(principal, kept.batch.vector_store_id, attachment)
                    counts.completed += 1
                except GatewayError as exc:
                    kept.errors[attachment.file_id] = exc.message
                    counts.failed += 1
                counts.in_progress -= 1
                self._save(kept)
        except asyncio.CancelledError:
            self._finish(kept, "cancelled")
            raise
        self._finish(kept, "completed")

    def _finish(self, kept: Kept, status: BatchStatus) -> None:
        counts = kept.batch.file_counts
        if status == "cancelled":
            counts.cancelled, counts.in_progress = counts.in_progress, 0
        kept.batch.status = status
        self._save(kept)

    def _save(self, kept: Kept) -> None:
        write_json(self.root / f"{kept.batch.id}.json", kept.model_dump(mode="json"))

    @staticmethod
    def _unattached(
        kept: Kept, file_id: str, status: Any, error: dict[str, Any] | None
    ) -> VectorStoreFile:
        return VectorStoreFile(
            id=file_id,
            created_at=kept.batch.created_at,
            vector_store_id=kept.batch.vector_store_id,
            usage_bytes=0,
            status=status,
            last_error=error,
        )
