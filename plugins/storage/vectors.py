"""The storage plugin's vector index (``contract/vectors.py`` for the wire): vector stores of text
chunks, each store one FAISS index in memory and one sealed object at rest.

Index: ``IndexIDMap`` over ``IndexFlatIP`` on L2-normalised vectors, so a score is the cosine
similarity and the search is exact. FAISS because one library serves CPU hosts (faiss-cpu) and
GPU hosts (faiss-gpu, the same API: ``index_cpu_to_gpu``), its selectors filter *inside* the
search, and its indexes serialise to bytes the sealed store keeps. Storage keeps its indexes on
the CPU whatever its host: a flat index of thousands of chunks is searched in well under a
millisecond there, and a GPU is the inference nodes' (moving an index is one call if that ever
changes). Exact search is what a
store's size (thousands of chunks) needs; an IVF or HNSW index would drop recall under a
selector that leaves few ids, which is the permission case.

Permissions: each file attachment carries ``Labels`` (owner, project, policy); a search builds an
``IDSelectorBatch`` of the chunks whose file the caller's ``ReadScope`` may read and whose
attributes pass the filters, and FAISS ranks only those: a reader gets the k best of what they
may read, never fewer because other users' chunks rank higher.

At rest: ``vectors/<store id>`` holds a 4-byte length, the store's JSON (its spec, files,
chunks' text) and the serialised index, sealed like every object (sealed_store.py) and written
whole by the object store (temporary name, then rename): a crash leaves the old store or the
new one. Every change is made to a copy (a cloned index), written, and only then swapped in, one
writer per store at a time: a search never sees a change that was not kept. A change rewrites
the whole store: fine for the thousands to a few hundred thousand chunks a flat index serves.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import faiss
import numpy as np

from atoll.agent.contract import NoParams
from atoll.agent.errors import InvalidRequest
from atoll.agent.plugins import rpc
from atoll.plugins.storage.contract.vectors import (
    MAX_DIMS,
    VECTOR_FILE,
    VECTOR_FILE_ADD,
    VECTOR_FILE_DELETE,
    VECTOR_FILES,
    VECTOR_SEARCH,
    VECTOR_STORE_DELETE,
    VECTOR_STORE_INFO,
    VECTOR_STORE_PUT,
    VECTOR_STORES,
    NearDuplicate,
    VectorFileAdd,
    VectorFileInfo,
    VectorFileNotFound,
    VectorHit,
    VectorSearch,
    VectorStoreInfo,
    VectorStoreNotFound,
    VectorStoreSpec,
)
from atoll.plugins.storage.store import ObjectStore
from atoll.protocol.session import CallInfo
from atoll.tenancy.permissions import CLIENTS

PREFIX = "vectors/"
T = TypeVar("T")


def _key(store_id: str) -> str:
    return PREFIX + store_id


def near_duplicates(
    vectors: np.ndarray, threshold: float, limit: int = 1000
) -> list[NearDuplicate]:
    """Each row's nearest earlier row at ``threshold`` or closer (at most ``limit`` rows):
    FAISS's range search over the rows themselves."""
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    bounds, scores, found = index.range_search(vectors, threshold)
    flagged = []
    for row in range(len(vectors)):
        near = [
            (float(scores[at]), int(found[at]))
            for at in range(bounds[row], bounds[row + 1])
            if found[at] < row
        ]
        if near:
            score, of = max(near)
            flagged.append(NearDuplicate(chunk=row, of=of, score=score))
            if len(flagged) == limit:
                break
    return flagged


def matrix(add: VectorFileAdd) -> np.ndarray:
    """The file's vectors as an (n, d) float32 array, normalised; InvalidRequest if they do not
    fit its chunks."""
    flat = np.frombuffer(add.vectors, dtype="<f4")
    n = len(add.chunks)
    if flat.size % n or not 0 < flat.size // n <= MAX_DIMS:
        raise InvalidRequest(f"{flat.size} numbers are not {n} vectors of 1-{MAX_DIMS} dimensions")
    vectors = np.ascontiguousarray(flat.reshape(n, flat.size // n), dtype=np.float32)
    faiss.normalize_L2(vectors)
    return vectors


@dataclass
class Kept:
    """One store in memory: its spec, files, chunks (id -> (file id, text)) and index."""

    spec: VectorStoreSpec
    created_at: float
    last_active_at: float
    files: dict[str, VectorFileInfo] = field(default_factory=dict)
    chunks: dict[int, tuple[str, str]] = field(default_factory=dict)
    index: Any = None  # faiss.IndexIDMap, made when the first vectors come (their size)
    next_id: int = 0

    def copy(self) -> Kept:
        index = None if self.index is None else faiss.clone_index(self.index)
        return Kept(
            self.spec,
            self.created_at,
            self.last_active_at,
            dict(self.files),
            dict(self.chunks),
            index,
            self.next_id,
        )

    def info(self) -> VectorStoreInfo:
        return VectorStoreInfo(
            **self.spec.model_dump(),
            created_at=self.created_at,
            last_active_at=self.last_active_at,
            files=len(self.files),
            chunks=len(self.chunks),
            usage_bytes=sum(f.usage_bytes for f in self.files.values()),
        )

    def to_bytes(self) -> bytes:
        meta = {
            "spec": self.spec.model_dump(mode="json"),
            "created_at": self.created_at,
            "last_active_at": self.last_active_at,
            "files": [f.model_dump(mode="json") for f in self.files.values()],
            "chunks": [[i, f, t] for i, (f, t) in self.chunks.items()],
            "next_id": self.next_id,
        }
        head = json.dumps(meta, ensure_ascii=False).encode()
        index = b"" if self.index is None else faiss.serialize_index(self.index).tobytes()
        return struct.pack("<I", len(head)) + head + index

    @classmethod
    def from_bytes(cls, data: bytes) -> Kept:
        (n,) = struct.unpack_from("<I", data)
        meta = json.loads(data[4 : 4 + n])
        kept = cls(
            VectorStoreSpec.model_validate(meta["spec"]),
            meta["created_at"],
            meta["last_active_at"],
            files={f["file_id"]: VectorFileInfo.model_validate(f) for f in meta["files"]},
            chunks={i: (f, t) for i, f, t in meta["chunks"]},
            next_id=meta["next_id"],
        )
        if len(data) > 4 + n:
            kept.index = faiss.deserialize_index(np.frombuffer(data[4 + n :], dtype=np.uint8))
        return kept


class VectorIndex:
    """Every vector store of this storage agent, loaded at start."""

    def __init__(self, store: ObjectStore) -> None:
        self.objects = store
        self.kept: dict[str, Kept] = {}
        self.locks: dict[str, asyncio.Lock] = {}  # a store's writers, one at a time

    async def load(self) -> None:
        for key in await self.objects.list(PREFIX):
            kept = Kept.from_bytes(await self.objects.get(key))
            self.kept[kept.spec.id] = kept

    def _kept(self, store_id: str) -> Kept:
        kept = self.kept.get(store_id)
        if kept is None:
            raise VectorStoreNotFound(f"no vector store {store_id!r}")
        return kept

    async def _change(self, store_id: str, change: Callable[[Kept], T]) -> T:
        """``change`` made to a copy of the store, saved, then put in its place: a reader sees
        the store before or after, and a change that fails (refused, or not saved) is none."""
        async with self.locks.setdefault(store_id, asyncio.Lock()):
            new = self._kept(store_id).copy()
            result = change(new)
            new.last_active_at = time.time()
            await self.objects.put(_key(store_id), await asyncio.to_thread(new.to_bytes))
            self.kept[store_id] = new
            return result

    async def put_store(self, spec: VectorStoreSpec) -> VectorStoreInfo:
        """Create the store, or change what may change of it (its labels and model stay)."""
        if spec.id not in self.kept:
            now = time.time()
            kept = Kept(spec, now, now)
            await self.objects.put(_key(spec.id), kept.to_bytes())
            self.kept[spec.id] = kept
            return kept.info()

        def rename(kept: Kept) -> None:
            kept.spec = spec.model_copy(
                update={"labels": kept.spec.labels, "model": kept.spec.model}
            )

        await self._change(spec.id, rename)
        return self.kept[spec.id].info()

    def stores(self) -> list[VectorStoreInfo]:
        return [k.info() for k in self.kept.values()]

    def store(self, store_id: str) -> VectorStoreInfo:
        return self._kept(store_id).info()

    async def delete_store(self, store_id: str) -> None:
        self._kept(store_id)
        async with self.locks.setdefault(store_id, asyncio.Lock()):
            del self.kept[store_id]  # first: from here on no search finds it
            await self.objects.delete(_key(store_id))
        self.locks.pop(store_id, None)

    async def add_file(self, add: VectorFileAdd) -> VectorFileInfo:
        """The file's chunks in the store, replacing any earlier attachment of it."""
        vectors = matrix(add)
        flagged = None
        if add.near_duplicates is not None:
            flagged = await asyncio.to_thread(near_duplicates, vectors, add.near_duplicates)
        info = VectorFileInfo(
            store_id=add.store_id,
            file_id=add.file_id,
            filename=add.filename,
            attributes=add.attributes,
            labels=add.labels,
            chunking=add.chunking,
            chunks=len(add.chunks),
            usage_bytes=sum(len(t.encode()) for t in add.chunks) + len(add.vectors),
            created_at=time.time(),
            near_duplicates=flagged,
        )

        def attach(kept: Kept) -> None:
            if kept.index is None:
                kept.index = faiss.IndexIDMap(faiss.IndexFlatIP(vectors.shape[1]))
            elif kept.index.d != vectors.shape[1]:
                raise InvalidRequest(
                    f"vectors of {vectors.shape[1]} dimensions; store {add.store_id} holds "
                    f"vectors of {kept.index.d}"
                )
            self._drop_chunks(kept, add.file_id)
            ids = np.arange(kept.next_id, kept.next_id + len(add.chunks), dtype=np.int64)
            kept.index.add_with_ids(vectors, ids)
            new = zip(ids.tolist(), add.chunks, strict=True)
            kept.chunks.update((i, (add.file_id, t)) for i, t in new)
            kept.next_id += len(add.chunks)
            kept.files[add.file_id] = info.model_copy(update={"first_chunk": int(ids[0])})

        await self._change(add.store_id, attach)
        return self.file(add.store_id, add.file_id)

    def files(self, store_id: str) -> list[VectorFileInfo]:
        return list(self._kept(store_id).files.values())

    def file(self, store_id: str, file_id: str) -> VectorFileInfo:
        found = self._kept(store_id).files.get(file_id)
        if found is None:
            raise VectorFileNotFound(f"vector store {store_id} holds no file {file_id!r}")
        return found

    async def delete_file(self, store_id: str, file_id: str) -> None:
        def detach(kept: Kept) -> None:
            self.file(store_id, file_id)  # there, or VectorFileNotFound
            self._drop_chunks(kept, file_id)
            del kept.files[file_id]

        await self._change(store_id, detach)

    @staticmethod
    def _drop_chunks(kept: Kept, file_id: str) -> None:
        gone = [i for i, (f, _) in kept.chunks.items() if f == file_id]
        if gone and kept.index is not None:
            kept.index.remove_ids(np.array(gone, dtype=np.int64))
        for i in gone:
            del kept.chunks[i]

    def search(self, query: VectorSearch) -> list[VectorHit]:
        """The best chunks the scope may read, ranked by FAISS among those alone."""
        kept = self._kept(query.store_id)
        readable = {
            f.file_id
            for f in kept.files.values()
            if query.scope.reads(f.labels)
            and (query.filters is None or query.filters.matches(f.attributes or {}))
        }
        ids = [i for i, (f, _) in kept.chunks.items() if f in readable]
        if not ids or kept.index is None:
            return []
        if len(query.vector) != kept.index.d:
            raise InvalidRequest(
                f"a query of {len(query.vector)} dimensions; the store's are {kept.index.d}"
            )
        vector = np.array([query.vector], dtype=np.float32)
        faiss.normalize_L2(vector)
        selector = faiss.IDSelectorBatch(np.array(ids, dtype=np.int64))
        k = min(query.max_results, len(ids))
        params = faiss.SearchParameters()
        params.sel = selector  # FAISS ranks only these ids
        scores, found = kept.index.search(vector, k, params=params)
        hits = []
        for score, chunk in zip(scores[0], found[0], strict=True):
            if chunk < 0 or (query.score_threshold is not None and score < query.score_threshold):
                continue
            file_id, text = kept.chunks[int(chunk)]
            f = kept.files[file_id]
            hits.append(
                VectorHit(
                    file_id=file_id,
                    filename=f.filename,
                    score=float(score),
                    attributes=f.attributes,
                    text=text,
                    chunk=int(chunk) - f.first_chunk,
                )
            )
        return hits


class VectorRPC:
    """The vector index's RPCs, mixed into the storage plugin (which sets ``vectors``):
    gateways and administrators only (``CLIENTS``), who act for users and say whom for."""

    vectors: VectorIndex

    @rpc(VECTOR_STORE_PUT.name, roles=CLIENTS)
    async def vector_store_put(self, params: Any, call: CallInfo) -> dict[str, Any]:
        spec = VECTOR_STORE_PUT.parse_params(params)
        return (await self.vectors.put_store(spec)).model_dump(mode="json")

    @rpc(VECTOR_STORES.name, roles=CLIENTS)
    async def vector_stores(self, params: Any, call: CallInfo) -> list[dict[str, Any]]:
        NoParams.model_validate(params or {})
        return [s.model_dump(mode="json") for s in self.vectors.stores()]

    @rpc(VECTOR_STORE_INFO.name, roles=CLIENTS)
    async def vector_store_info(self, params: Any, call: CallInfo) -> dict[str, Any]:
        ref = VECTOR_STORE_INFO.parse_params(params)
        return self.vectors.store(ref.id).model_dump(mode="json")

    @rpc(VECTOR_STORE_DELETE.name, roles=CLIENTS)
    async def vector_store_delete(self, params: Any, call: CallInfo) -> dict[str, Any]:
        await self.vectors.delete_store(VECTOR_STORE_DELETE.parse_params(params).id)
        return {"deleted": True}

    @rpc(VECTOR_FILE_ADD.name, roles=CLIENTS)
    async def vector_file_add(self, params: Any, call: CallInfo) -> dict[str, Any]:
        add = VECTOR_FILE_ADD.parse_params(params)
        return (await self.vectors.add_file(add)).model_dump(mode="json")

    @rpc(VECTOR_FILES.name, roles=CLIENTS)
    async def vector_files(self, params: Any, call: CallInfo) -> list[dict[str, Any]]:
        ref = VECTOR_FILES.parse_params(params)
        return [f.model_dump(mode="json") for f in self.vectors.files(ref.id)]

    @rpc(VECTOR_FILE.name, roles=CLIENTS)
    async def vector_file(self, params: Any, call: CallInfo) -> dict[str, Any]:
        ref = VECTOR_FILE.parse_params(params)
        return self.vectors.file(ref.store_id, ref.file_id).model_dump(mode="json")

    @rpc(VECTOR_FILE_DELETE.name, roles=CLIENTS)
    async def vector_file_delete(self, params: Any, call: CallInfo) -> dict[str, Any]:
        ref = VECTOR_FILE_DELETE.parse_params(params)
        await self.vectors.delete_file(ref.store_id, ref.file_id)
        return {"deleted": True}

    @rpc(VECTOR_SEARCH.name, roles=CLIENTS)
    async def vector_search(self, params: Any, call: CallInfo) -> list[dict[str, Any]]:
        query = VECTOR_SEARCH.parse_params(params)
        return [h.model_dump(mode="json") for h in self.vectors.search(query)]
