"""The Vector Stores API's routes (vector_stores.py is the service behind them), and Atoll's
dataset-features routes beside the files (dataset_features.py)."""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations, and ``user``
# is install()'s parameter, not a global it could resolve from a string.
from typing import Any, Literal

from fastapi import FastAPI

from atoll.plugins.gateway.dataset_features import DatasetFeatures, FileFeatures, SearchFiles
from atoll.plugins.gateway.errors import GatewayError
from atoll.plugins.gateway.vector_batches import CreateFileBatch, FileBatch, FileBatches
from atoll.plugins.gateway.vector_shapes import (
    AttachFile,
    CreateVectorStore,
    SearchResultsPage,
    SearchVectorStore,
    UpdateVectorStore,
    VectorStore,
    VectorStoreDeleted,
    VectorStoreFile,
    VectorStoreFileDeleted,
    VectorStoreFileList,
    VectorStoreList,
    file_object,
)
from atoll.plugins.gateway.vector_stores import VectorStores

Order = Literal["asc", "desc"]


def install(
    app: FastAPI,
    stores: VectorStores,
    batches: FileBatches,
    features: DatasetFeatures,
    user: Any,
) -> None:
    """The vector store and dataset-features routes; ``user`` is app.py's authenticated-caller
    dependency."""

    @app.post("/v1/files/search", response_model=SearchResultsPage, tags=["files"])
    async def search_files(principal: user, body: SearchFiles) -> Any:
        """Rows of the training files the caller may read, nearest the query (Atoll's)."""
        return await features.search(principal, body)

    @app.get("/v1/files/{file_id}/features", response_model=FileFeatures, tags=["files"])
    async def file_features(principal: user, file_id: str) -> Any:
        """A training file's rows embedded, and those near-duplicating an earlier row (Atoll's)."""
        return await features.features(principal, file_id)

    @app.post("/v1/files/{file_id}/features", response_model=FileFeatures, tags=["files"])
    async def extract_features(principal: user, file_id: str) -> Any:
        """Extract a training file's features again where there are none (an extraction that
        failed, or one a gateway restart cut short), metered to the caller (Atoll's)."""
        return await features.extract(principal, file_id)

    def bounded(limit: int) -> int:
        if not 1 <= limit <= 100:
            raise GatewayError(400, "limit must be between 1 and 100", param="limit")
        return limit

    @app.post("/v1/vector_stores", response_model=VectorStore, tags=["vector_stores"])
    async def create(principal: user, body: CreateVectorStore) -> Any:
        return await stores.create(principal, body)

    @app.get("/v1/vector_stores", response_model=VectorStoreList, tags=["vector_stores"])
    async def listing(
        principal: user, order: Order = "desc", after: str | None = None, limit: int = 20
    ) -> Any:
        return await stores.listing(principal, order, after, bounded(limit))

    @app.get("/v1/vector_stores/{store_id}", response_model=VectorStore, tags=["vector_stores"])
    async def one(principal: user, store_id: str) -> Any:
        return await stores.get(principal, store_id)

    @app.post("/v1/vector_stores/{store_id}", response_model=VectorStore, tags=["vector_stores"])
    async def update(principal: user, store_id: str, body: UpdateVectorStore) -> Any:
        return await stores.update(principal, store_id, body)

    @app.delete(
        "/v1/vector_stores/{store_id}", response_model=VectorStoreDeleted, tags=["vector_stores"]
    )
    async def delete(principal: user, store_id: str) -> Any:
        return await stores.delete(principal, store_id)

    @app.post(
        "/v1/vector_stores/{store_id}/files", response_model=VectorStoreFile, tags=["vector_stores"]
    )
    async def attach(principal: user, store_id: str, body: AttachFile) -> Any:
        return await stores.attach(principal, store_id, body)

    @app.get(
        "/v1/vector_stores/{store_id}/files",
        response_model=VectorStoreFileList,
        tags=["vector_stores"],
    )
    async def files(
        principal: user,
        store_id: str,
        order: Order = "desc",
        after: str | None = None,
        limit: int = 20,
        filter: Literal["in_progress", "completed", "failed", "cancelled"] | None = None,
    ) -> Any:
        found = await stores.files(principal, store_id, order, after, bounded(limit))
        if filter not in (None, "completed"):  # every kept file is completed
            found.data, found.has_more = [], False
        return found

    @app.get(
        "/v1/vector_stores/{store_id}/files/{file_id}",
        response_model=VectorStoreFile,
        tags=["vector_stores"],
    )
    async def file(principal: user, store_id: str, file_id: str) -> Any:
        return file_object(await stores.file(principal, store_id, file_id))

    @app.delete(
        "/v1/vector_stores/{store_id}/files/{file_id}",
        response_model=VectorStoreFileDeleted,
        tags=["vector_stores"],
    )
    async def detach(principal: user, store_id: str, file_id: str) -> Any:
        return await stores.detach(principal, store_id, file_id)

    @app.post(
        "/v1/vector_stores/{store_id}/search",
        response_model=SearchResultsPage,
        tags=["vector_stores"],
    )
    async def search(principal: user, store_id: str, body: SearchVectorStore) -> Any:
        return await stores.search(principal, store_id, body)

    @app.post(
        "/v1/vector_stores/{store_id}/file_batches",
        response_model=FileBatch,
        tags=["vector_stores"],
    )
    async def batch_create(principal: user, store_id: str, body: CreateFileBatch) -> Any:
        return await batches.create(principal, store_id, body)

    @app.get(
        "/v1/vector_stores/{store_id}/file_batches/{batch_id}",
        response_model=FileBatch,
        tags=["vector_stores"],
    )
    async def batch_one(principal: user, store_id: str, batch_id: str) -> Any:
        return batches.get(principal, store_id, batch_id).batch

    @app.post(
        "/v1/vector_stores/{store_id}/file_batches/{batch_id}/cancel",
        response_model=FileBatch,
        tags=["vector_stores"],
    )
    async def batch_cancel(principal: user, store_id: str, batch_id: str) -> Any:
        return await batches.cancel(principal, store_id, batch_id)

    @app.get(
        "/v1/vector_stores/{store_id}/file_batches/{batch_id}/files",
        response_model=VectorStoreFileList,
        tags=["vector_stores"],
    )
    async def batch_files(
        principal: user,
        store_id: str,
        batch_id: str,
        limit: int = 20,
        filter: Literal["in_progress", "completed", "failed", "cancelled"] | None = None,
    ) -> Any:
        return await batches.files(principal, store_id, batch_id, filter, bounded(limit))
