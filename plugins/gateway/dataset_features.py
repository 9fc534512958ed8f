"""Datasets' features (the seed's "feature extraction"): once a training dataset is uploaded, its
rows are embedded as a vector store's chunks are (an inference node over the overlay, metered to
the uploader), in the background, and kept in the tenant's features store: a vector store of
storage's index, a file per dataset and a chunk per row, labelled as the dataset is visible (its
project's members, else its owner). So rows can be searched across the datasets a caller may
read (``POST /v1/files/search``), and rows whose embedding lies within ``NEAR`` of an earlier
row's are flagged (``GET /v1/files/{id}/features``): the paraphrases that exact and normalised
de-duplication keep. Deleting the file removes its features (and its chunks in any vector store).

Bounds: the first ``MAX_ROWS`` rows, each's first ``MAX_ROW_CHARS`` characters (the rows and
their vectors travel to storage in one message)."""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from atoll.agent.errors import AtollError
from atoll.plugins.gateway import file_access
from atoll.plugins.gateway.accounts.keys import Principal
from atoll.plugins.gateway.bodies import RequestBody
from atoll.plugins.gateway.errors import GatewayError
from atoll.plugins.gateway.vector_access import read_scope
from atoll.plugins.gateway.vector_ingest import check_payload, embed
from atoll.plugins.gateway.vector_shapes import Query, SearchResult, SearchResultsPage, TextContent
from atoll.plugins.gateway.vector_stores import VectorStores
from atoll.plugins.storage.contract.datasets import (
    CANONICAL_FORM,
    DatasetRecord,
    describe_dataset,
    fetch_dataset,
)
from atoll.plugins.storage.contract.vectors import (
    Filter,
    Labels,
    Policy,
    VectorFileAdd,
    VectorSearch,
    VectorStoreNotFound,
    VectorStoreSpec,
)

log = logging.getLogger(__name__)
FEATURES_STORE = "vs_" + "f" * 24  # the tenant's one features store, made on first use
FEATURES_OWNER = "atoll.features"  # its own label: only administrators list it as a store
NEAR = 0.95  # cosine at which a row is flagged as a near-duplicate of an earlier one
MAX_ROWS = 1024
MAX_ROW_CHARS = 1000


class SearchFiles(RequestBody):
    query: Query
    max_num_results: int = Field(10, ge=1, le=50)
    filters: Filter | None = None


class NearDuplicateRow(BaseModel):
    row: int  # from 0, in the dataset as stored (after exact de-duplication)
    duplicate_of: int
    score: float


class FileFeatures(BaseModel):
    object: Literal["file.features"] = "file.features"
    file_id: str
    status: Literal["none", "in_progress", "completed", "failed"]
    model: str | None = None
    rows: int = 0  # rows embedded
    near_duplicates: list[NearDuplicateRow] = Field(default_factory=list)
    error: str | None = None


def row_text(row: Any) -> str:
    """A stored row's text: its strings in order (roles and keys left out)."""
    if isinstance(row, str):
        return row
    if isinstance(row, dict):
        return "\n".join(row_text(v) for k, v in row.items() if k != "role" and row_text(v))
    if isinstance(row, list):
        return "\n".join(t for t in map(row_text, row) if t)
    return ""


class DatasetFeatures:
    def __init__(self, stores: VectorStores) -> None:
        self.stores = stores
        self.gw = stores.gw
        self.running: dict[str, asyncio.Task[None]] = {}
        self.failed: dict[str, str] = {}  # by file id, until the gateway restarts

    def start(self, principal: Principal, record: DatasetRecord) -> None:
        """Extract ``record``'s features in the background, if it is training data."""
        if record.kind in CANONICAL_FORM:
            task = asyncio.create_task(self._extract(principal, record))
            self.running[record.id] = task
            task.add_done_callback(lambda _: self.running.pop(record.id, None))

    async def _extract(self, principal: Principal, record: DatasetRecord) -> None:
        try:
            model = await self._model()
            rows = await self._rows(record)
            vectors = await embed(self.gw, principal, model, rows, background=True)
            check_payload(rows, vectors)
            policy: Policy = "project" if record.project is not None else "private"
            add = VectorFileAdd(
                store_id=FEATURES_STORE,
                file_id=record.id,
                filename=record.filename,
                attributes={"dataset": record.name},
                labels=Labels(owner=record.owner, project=record.project, policy=policy),
                chunks=rows,
                vectors=b"".join(vectors),
                near_duplicates=NEAR,
            )
            await self.stores.index().add_file(add)
        except (GatewayError, AtollError) as exc:  # no model served, a budget spent, ...
            self.failed[record.id] = exc.message
            log.warning("features of %s not extracted: %s", record.id, exc.message)
        except Exception as exc:  # a bug of ours: the upload stands, its features say so
            log.exception("features of %s failed", record.id)
            self.failed[record.id] = f"internal error: {type(exc).__name__}"

    async def _model(self) -> str:
        """The features store's embedding model (the store made first if need be)."""
        index = self.stores.index()
        try:
            return (await index.store(FEATURES_STORE)).model
        except VectorStoreNotFound:
            pass
        served = sorted(self.gw.catalog.embedding_models())
        if not served:
            raise GatewayError(503, "no embedding model is served")
        spec = VectorStoreSpec(
            id=FEATURES_STORE,
            name="dataset features",
            labels=Labels(owner=FEATURES_OWNER),
            model=served[0],
        )
        return (await index.put_store(spec)).model

    async def _rows(self, record: DatasetRecord) -> list[str]:
        with tempfile.TemporaryDirectory(prefix="atoll-features-") as tmp:
            dest = Path(tmp) / "rows.jsonl"
            storage = self.gw.storage_address()
            await fetch_dataset(
                self.gw.agent, storage, record.id, dest, CANONICAL_FORM[record.kind]
            )
            with dest.open() as f:
                lines = [line for _, line in zip(range(MAX_ROWS), f, strict=False)]
        return [row_text(json.loads(line))[:MAX_ROW_CHARS] for line in lines]

    async def forget(self, file_id: str) -> None:
        """The file is deleted: its features go, as do its chunks in any vector store."""
        if task := self.running.get(file_id):
            task.cancel()
        await self.stores.forget_file(file_id)
        self.failed.pop(file_id, None)

    async def features(self, principal: Principal, file_id: str) -> FileFeatures:
        await self._visible(principal, file_id)
        if file_id in self.running:
            return FileFeatures(file_id=file_id, status="in_progress")
        if file_id in self.failed:
            return FileFeatures(file_id=file_id, status="failed", error=self.failed[file_id])
        index = self.stores.index()
        try:
            found = await index.file(FEATURES_STORE, file_id)
            model = (await index.store(FEATURES_STORE)).model
        except AtollError as exc:
            if type(exc).__name__ in ("VectorStoreNotFound", "VectorFileNotFound"):
                return FileFeatures(file_id=file_id, status="none")
            raise
        near = [
            NearDuplicateRow(row=d.chunk, duplicate_of=d.of, score=d.score)
            for d in found.near_duplicates or []
        ]
        return FileFeatures(
            file_id=file_id,
            status="completed",
            model=model,
            rows=found.chunks,
            near_duplicates=near,
        )

    async def extract(self, principal: Principal, file_id: str) -> FileFeatures:
        """Start extracting ``file_id``'s features where it has none (its extraction failed, or
        a gateway restart cut it short: running ones are this process's alone)."""
        record = await self._visible(principal, file_id)
        if record.kind not in CANONICAL_FORM:
            raise GatewayError(400, f"{file_id} is not a training file: it has no features")
        now = (await self.features(principal, file_id)).status
        if now in ("in_progress", "completed"):
            raise GatewayError(409, f"the features of {file_id} are {now}", code="conflict")
        self.failed.pop(file_id, None)
        self.start(principal, record)
        return FileFeatures(file_id=file_id, status="in_progress")

    async def _visible(self, principal: Principal, file_id: str) -> DatasetRecord:
        missing = GatewayError(404, f"no file {file_id!r}", code="not_found")
        try:
            record = await describe_dataset(self.gw.agent, self.gw.storage_address(), file_id)
        except AtollError:
            raise missing from None
        if not file_access.may_see(self.gw.accounts, principal, record.owner, record.project):
            raise missing
        return record

    async def search(self, principal: Principal, body: SearchFiles) -> SearchResultsPage:
        """Rows of the datasets the caller may read nearest the query, best first."""
        index = self.stores.index()
        try:
            model = (await index.store(FEATURES_STORE)).model
        except VectorStoreNotFound:  # no dataset's features yet
            return SearchResultsPage(search_query=[body.query], data=[])
        (vector,) = await embed(self.gw, principal, model, [body.query])
        query = VectorSearch(
            store_id=FEATURES_STORE,
            vector=list(memoryview(vector).cast("f")),
            scope=read_scope(self.gw.accounts, principal),
            max_results=body.max_num_results,
            filters=body.filters,
        )
        data = [
            SearchResult(
                file_id=h.file_id,
                filename=h.filename,
                score=h.score,
                attributes={**(h.attributes or {}), "row": float(h.chunk)},
                content=[TextContent(text=h.text)],
            )
            for h in await self.stores.call(index.search(query))
        ]
        return SearchResultsPage(search_query=[body.query], data=data)
