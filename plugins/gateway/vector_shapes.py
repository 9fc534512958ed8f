"""OpenAI's Vector Stores API shapes, as the openai SDK's ``vector_stores`` sends and reads them:
the create, update, attach and search bodies, chunking strategies, the VectorStore,
VectorStoreFile and search-result objects and their lists, and those objects made from what
storage keeps. Filters are storage's own models
(``contract/vectors.py``): storage applies them inside the index search."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, model_validator

from atoll.plugins.gateway.bodies import RequestBody
from atoll.plugins.storage.contract.vectors import (
    Attributes,
    Filter,
    Metadata,
    VectorFileInfo,
    VectorStoreInfo,
)

# OpenAI's "auto" strategy: 800-token chunks overlapping by 400.
AUTO_MAX_TOKENS, AUTO_OVERLAP_TOKENS = 800, 400
DAY_S = 86400
Query = Annotated[str, Field(min_length=1, max_length=16_384)]


class StaticChunking(BaseModel):
    max_chunk_size_tokens: int = Field(ge=100, le=4096)
    chunk_overlap_tokens: int = Field(ge=0)

    @model_validator(mode="after")
    def _overlap(self) -> StaticChunking:
        if self.chunk_overlap_tokens > self.max_chunk_size_tokens // 2:
            raise ValueError("chunk_overlap_tokens must not exceed half of max_chunk_size_tokens")
        return self


class AutoStrategy(RequestBody):
    type: Literal["auto"]


class StaticStrategy(RequestBody):
    type: Literal["static"]
    static: StaticChunking


ChunkingStrategy = Annotated[AutoStrategy | StaticStrategy, Field(discriminator="type")]


def chunking_of(strategy: ChunkingStrategy | None) -> StaticChunking:
    """The sizes a strategy (None: ``auto``) chunks with."""
    if isinstance(strategy, StaticStrategy):
        return strategy.static
    return StaticChunking(
        max_chunk_size_tokens=AUTO_MAX_TOKENS, chunk_overlap_tokens=AUTO_OVERLAP_TOKENS
    )


class ExpiresAfter(RequestBody):
    anchor: Literal["last_active_at"]
    days: int = Field(ge=1, le=365)


class CreateVectorStore(RequestBody):
    name: str = Field("", max_length=256)
    description: str | None = Field(None, max_length=512)
    file_ids: list[str] = Field(default_factory=list, max_length=500)
    chunking_strategy: ChunkingStrategy | None = None
    expires_after: ExpiresAfter | None = None
    metadata: Metadata | None = None


class UpdateVectorStore(RequestBody):
    name: str | None = Field(None, max_length=256)
    expires_after: ExpiresAfter | None = None
    metadata: Metadata | None = None


class AttachFile(RequestBody):
    file_id: str = Field(min_length=1, max_length=256)
    attributes: Attributes | None = None
    chunking_strategy: ChunkingStrategy | None = None


class RankingOptions(RequestBody):
    ranker: Literal["none", "auto", "default-2024-11-15"] | None = None
    score_threshold: float | None = Field(None, ge=0.0, le=1.0)


class SearchVectorStore(RequestBody):
    query: Query | Annotated[list[Query], Field(min_length=1, max_length=16)]
    filters: Filter | None = None
    max_num_results: int = Field(10, ge=1, le=50)
    ranking_options: RankingOptions | None = None
    rewrite_query: bool = False


class FileCounts(BaseModel):
    in_progress: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    total: int = 0


class VectorStore(BaseModel):
    id: str
    object: Literal["vector_store"] = "vector_store"
    created_at: int
    name: str
    description: str | None = None
    usage_bytes: int
    file_counts: FileCounts
    status: Literal["expired", "in_progress", "completed"]
    expires_after: ExpiresAfter | None = None
    expires_at: int | None = None
    last_active_at: int | None = None
    metadata: dict[str, str] | None = None


class VectorStoreList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VectorStore]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class VectorStoreDeleted(BaseModel):
    id: str
    object: Literal["vector_store.deleted"] = "vector_store.deleted"
    deleted: bool = True


class ChunkingObject(BaseModel):
    type: Literal["static"] = "static"
    static: StaticChunking


class VectorStoreFile(BaseModel):
    id: str
    object: Literal["vector_store.file"] = "vector_store.file"
    created_at: int
    vector_store_id: str
    usage_bytes: int
    status: Literal["in_progress", "completed", "cancelled", "failed"] = "completed"
    last_error: dict[str, Any] | None = None
    attributes: dict[str, str | bool | float] | None = None
    chunking_strategy: ChunkingObject | None = None


class VectorStoreFileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VectorStoreFile]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class VectorStoreFileDeleted(BaseModel):
    id: str
    object: Literal["vector_store.file.deleted"] = "vector_store.file.deleted"
    deleted: bool = True


class TextContent(BaseModel):
    type: Literal["text"] = "text"
    text: str


class SearchResult(BaseModel):
    file_id: str
    filename: str
    score: float
    attributes: dict[str, str | bool | float] | None = None
    content: list[TextContent]


class SearchResultsPage(BaseModel):
    object: Literal["vector_store.search_results.page"] = "vector_store.search_results.page"
    search_query: list[str]
    data: list[SearchResult]
    has_more: bool = False
    next_page: str | None = None


def store_object(info: VectorStoreInfo) -> VectorStore:
    """The store as OpenAI's object; ``expires_after`` counts from the store's last change
    (attaching or removing a file, an update): a search writes nothing."""
    expires_at = (
        int(info.last_active_at) + info.expires_after_days * DAY_S
        if info.expires_after_days
        else None
    )
    expired = expires_at is not None and expires_at < time.time()
    return VectorStore(
        id=info.id,
        created_at=int(info.created_at),
        name=info.name,
        description=info.description,
        usage_bytes=info.usage_bytes,
        file_counts=FileCounts(completed=info.files, total=info.files),
        status="expired" if expired else "completed",
        expires_after=(
            ExpiresAfter(anchor="last_active_at", days=info.expires_after_days)
            if info.expires_after_days
            else None
        ),
        expires_at=expires_at,
        last_active_at=int(info.last_active_at),
        metadata=info.metadata,
    )


def file_object(f: VectorFileInfo) -> VectorStoreFile:
    return VectorStoreFile(
        id=f.file_id,
        created_at=int(f.created_at),
        vector_store_id=f.store_id,
        usage_bytes=f.usage_bytes,
        attributes=f.attributes,
        chunking_strategy=(
            ChunkingObject(static=StaticChunking(**f.chunking.model_dump())) if f.chunking else None
        ),
    )


def cursor_page(items: Sequence[Any], after: str | None, limit: int) -> dict[str, Any]:
    """OpenAI's cursor page of ``items`` (each with an ``id``, in the listing's order): those
    after the id ``after``, at most ``limit``, as a list object's fields."""
    if after is not None:
        ids = [i.id for i in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    page = list(items[:limit])
    return {
        "data": page,
        "first_id": page[0].id if page else None,
        "last_id": page[-1].id if page else None,
        "has_more": len(items) > limit,
    }
