"""OpenAI's Vector Stores API at the gateway: stores, files attached to them, and search, kept by
the storage plugin's vector index (``storage/contract/vectors.py``); the gateway chunks a file's
text, has an inference node embed the chunks (vector_ingest.py) and says whose they are.

Who reads what: every attached file, and so each of its chunks, carries labels (owner, project,
policy): ``private`` its owner only, ``project`` the members of its project, ``tenant`` every
user. The policy defaults from the attaching key (a project's key: ``project``; else
``private``); the reserved attribute ``atoll_policy`` sets it (vector_access.py). A store is
labelled the same way (its metadata's ``atoll_policy``). A search embeds the query and passes
the caller's scope (user, projects, whether the key reaches beyond one project); storage ranks
only the chunks that scope may read. A store the caller may not read is a 404, as if it were
not there; changing or deleting a store takes its owner, an owner of its project or an
administrator; detaching a file its attacher or whoever may change the store.

The embedding model is chosen when a store is created (the first served embedding model, by
name) and kept: a store's vectors all come from one model.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from atoll.agent.errors import AtollError
from atoll.plugins.gateway import file_access
from atoll.plugins.gateway.accounts.keys import Principal
from atoll.plugins.gateway.bodies import unsupported
from atoll.plugins.gateway.errors import GatewayError, from_platform
from atoll.plugins.gateway.service import Gateway
from atoll.plugins.gateway.vector_access import (
    POLICY_KEY,
    may_change,
    policy_asked,
    read_scope,
    write_labels,
)
from atoll.plugins.gateway.vector_ingest import check_payload, chunk, embed, file_text
from atoll.plugins.gateway.vector_shapes import (
    AttachFile,
    ChunkingStrategy,
    CreateVectorStore,
    SearchResult,
    SearchResultsPage,
    SearchVectorStore,
    TextContent,
    UpdateVectorStore,
    VectorStore,
    VectorStoreDeleted,
    VectorStoreFile,
    VectorStoreFileDeleted,
    VectorStoreFileList,
    VectorStoreList,
    chunking_of,
    cursor_page,
    file_object,
    store_object,
)
from atoll.plugins.storage.contract.datasets import describe_dataset
from atoll.plugins.storage.contract.vectors import (
    Chunking,
    VectorFileAdd,
    VectorFileInfo,
    VectorIndexClient,
    VectorSearch,
    VectorStoreInfo,
    VectorStoreSpec,
)

STORE_ID = re.compile(r"^vs_[0-9a-f]{24}$")
FILE_ID = re.compile(r"^ds-[0-9a-f]{12}$")


def _platform(exc: AtollError, param: str | None = None) -> GatewayError:
    if type(exc).__name__ in ("VectorStoreNotFound", "VectorFileNotFound", "DatasetNotFound"):
        return GatewayError(404, exc.message, code="not_found", param=param)
    return from_platform(exc)


class VectorStores:
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def index(self) -> VectorIndexClient:
        return VectorIndexClient(self.gw.agent, self.gw.storage_address(), self.gw.request_timeout)

    async def call(self, call: Any, param: str | None = None) -> Any:
        try:
            return await call
        except AtollError as exc:
            raise _platform(exc, param) from None

    async def _store(self, principal: Principal, store_id: str) -> VectorStoreInfo:
        missing = GatewayError(404, f"no vector store {store_id!r}", code="not_found")
        if not STORE_ID.match(store_id):
            raise missing
        info: VectorStoreInfo = await self.call(self.index().store(store_id))
        if not read_scope(self.gw.accounts, principal).reads(info.labels):
            raise missing
        return info

    # --- stores ----------------------------------------------------------------------------

    async def create(self, principal: Principal, body: CreateVectorStore) -> VectorStore:
        policy = policy_asked((body.metadata or {}).get(POLICY_KEY), principal, "metadata")
        labels = write_labels(principal, policy)
        served = sorted(self.gw.catalog.embedding_models())
        if not served:
            raise GatewayError(503, "no embedding model is served: a vector store needs one")
        store_id = f"vs_{uuid.uuid4().hex[:24]}"
        spec = VectorStoreSpec(
            id=store_id,
            name=body.name,
            description=body.description,
            metadata=body.metadata,
            expires_after_days=body.expires_after.days if body.expires_after else None,
            labels=labels,
            model=served[0],
        )
        # The files first: one the caller may not attach leaves no store behind.
        ready = [
            await self._prepare(principal, spec, f, None, body.chunking_strategy)
            for f in body.file_ids
        ]
        info = await self.call(self.index().put_store(spec))
        for add in ready:
            await self.call(self.index().add_file(add), "file_ids")
        self.gw.accounts.audit(principal.user, "vector_store.create", store_id, {})
        return store_object(await self.call(self.index().store(store_id)) if ready else info)

    async def get(self, principal: Principal, store_id: str) -> VectorStore:
        return store_object(await self._store(principal, store_id))

    async def listing(
        self, principal: Principal, order: str, after: str | None, limit: int
    ) -> VectorStoreList:
        scope = read_scope(self.gw.accounts, principal)
        infos: list[VectorStoreInfo] = await self.call(self.index().stores())
        seen = sorted(
            (store_object(i) for i in infos if scope.reads(i.labels)),
            key=lambda s: (s.created_at, s.id),
            reverse=order == "desc",
        )
        return VectorStoreList(**cursor_page(seen, after, limit))

    async def update(
        self, principal: Principal, store_id: str, body: UpdateVectorStore
    ) -> VectorStore:
        info = await self._changeable(principal, store_id)
        spec = VectorStoreSpec.model_validate(
            info.model_dump(include=set(VectorStoreSpec.model_fields))
        )
        if body.name is not None:
            spec.name = body.name
        if body.metadata is not None:
            asked = body.metadata.get(POLICY_KEY, spec.labels.policy)
            if asked != spec.labels.policy:
                raise GatewayError(
                    400,
                    f"vector store {store_id} is {spec.labels.policy}: its {POLICY_KEY} is set "
                    "when it is created",
                    param="metadata",
                )
            spec.metadata = body.metadata
        if body.expires_after is not None:
            spec.expires_after_days = body.expires_after.days
        updated = await self.call(self.index().put_store(spec))
        self.gw.accounts.audit(principal.user, "vector_store.update", store_id, {})
        return store_object(updated)

    async def delete(self, principal: Principal, store_id: str) -> VectorStoreDeleted:
        await self._changeable(principal, store_id)
        await self.call(self.index().delete_store(store_id))
        self.gw.accounts.audit(principal.user, "vector_store.delete", store_id, {})
        return VectorStoreDeleted(id=store_id)

    async def _changeable(self, principal: Principal, store_id: str) -> VectorStoreInfo:
        info = await self._store(principal, store_id)
        if not may_change(self.gw.accounts, principal, info.labels):
            raise GatewayError(
                403,
                f"{principal.user!r} may not change vector store {store_id}: that takes its "
                "owner, an owner of its project or an administrator",
                code="permission_denied",
            )
        return info

    # --- files -----------------------------------------------------------------------------

    async def _prepare(
        self,
        principal: Principal,
        store: VectorStoreSpec,
        file_id: str,
        attributes: dict[str, Any] | None,
        strategy: ChunkingStrategy | None,
    ) -> VectorFileAdd:
        """The file's chunks and vectors, labelled for the caller."""
        missing = GatewayError(404, f"no file {file_id!r}", code="not_found", param="file_id")
        if not FILE_ID.match(file_id):
            raise missing
        record = await self.call(
            describe_dataset(self.gw.agent, self.gw.storage_address(), file_id), "file_id"
        )
        if not file_access.may_see(self.gw.accounts, principal, record.owner, record.project):
            raise missing
        asked = policy_asked((attributes or {}).get(POLICY_KEY), principal, "attributes")
        labels = write_labels(principal, asked)
        sizes = chunking_of(strategy)
        chunks = chunk(await file_text(self.gw, record), sizes)
        vectors = await embed(self.gw, principal, store.model, chunks)
        check_payload(chunks, vectors)
        return VectorFileAdd(
            store_id=store.id,
            file_id=file_id,
            filename=record.filename,
            attributes=attributes,
            labels=labels,
            chunking=Chunking(**sizes.model_dump()),
            chunks=chunks,
            vectors=b"".join(vectors),
        )

    async def attach(
        self, principal: Principal, store_id: str, body: AttachFile
    ) -> VectorStoreFile:
        info = await self._store(principal, store_id)
        kept = await self._files(store_id)
        if body.file_id in kept and not self._may_detach(principal, info, kept[body.file_id]):
            raise GatewayError(
                409,
                f"file {body.file_id} is already in vector store {store_id}, attached by another "
                "user",
                code="already_exists",
                param="file_id",
            )
        add = await self._prepare(
            principal, info, body.file_id, body.attributes, body.chunking_strategy
        )
        added = await self.call(self.index().add_file(add), "file_id")
        self.gw.accounts.audit(
            principal.user, "vector_store.file_add", store_id, {"file": add.file_id}
        )
        return file_object(added)

    async def files(
        self, principal: Principal, store_id: str, order: str, after: str | None, limit: int
    ) -> VectorStoreFileList:
        await self._store(principal, store_id)
        scope = read_scope(self.gw.accounts, principal)
        seen = sorted(
            (
                file_object(f)
                for f in (await self._files(store_id)).values()
                if scope.reads(f.labels)
            ),
            key=lambda f: (f.created_at, f.id),
            reverse=order == "desc",
        )
        return VectorStoreFileList(**cursor_page(seen, after, limit))

    async def file(self, principal: Principal, store_id: str, file_id: str) -> VectorFileInfo:
        await self._store(principal, store_id)
        missing = GatewayError(
            404, f"no file {file_id!r} in vector store {store_id}", code="not_found"
        )
        if not FILE_ID.match(file_id):
            raise missing
        try:
            found = await self.index().file(store_id, file_id)
        except AtollError as exc:
            raise (
                missing if type(exc).__name__ == "VectorFileNotFound" else _platform(exc)
            ) from None
        if not read_scope(self.gw.accounts, principal).reads(found.labels):
            raise missing
        return found

    async def detach(
        self, principal: Principal, store_id: str, file_id: str
    ) -> VectorStoreFileDeleted:
        info = await self._store(principal, store_id)
        found = await self.file(principal, store_id, file_id)
        if not self._may_detach(principal, info, found):
            raise GatewayError(
                403,
                f"{principal.user!r} may not remove file {file_id} from vector store {store_id}: "
                "that takes whoever attached it or may change the store",
                code="permission_denied",
            )
        await self.call(self.index().delete_file(store_id, file_id))
        self.gw.accounts.audit(
            principal.user, "vector_store.file_delete", store_id, {"file": file_id}
        )
        return VectorStoreFileDeleted(id=file_id)

    def _may_detach(self, principal: Principal, info: VectorStoreInfo, f: VectorFileInfo) -> bool:
        return f.labels.owner == principal.user or may_change(
            self.gw.accounts, principal, info.labels
        )

    async def forget_file(self, file_id: str) -> None:
        """The file is deleted: its chunks leave every store that holds them (no text of a
        deleted file stays searchable)."""
        index = self.index()
        for store in await index.stores():
            try:
                await index.delete_file(store.id, file_id)
            except AtollError as exc:
                if type(exc).__name__ not in ("VectorStoreNotFound", "VectorFileNotFound"):
                    raise

    async def _files(self, store_id: str) -> dict[str, VectorFileInfo]:
        found: list[VectorFileInfo] = await self.call(self.index().files(store_id))
        return {f.file_id: f for f in found}

    # --- search ----------------------------------------------------------------------------

    async def search(
        self, principal: Principal, store_id: str, body: SearchVectorStore
    ) -> SearchResultsPage:
        info = await self._store(principal, store_id)
        if body.rewrite_query:
            raise unsupported("rewrite_query", "the query is searched as written")
        if store_object(info).status == "expired":
            raise GatewayError(
                400,
                f"vector store {store_id} has expired: update its expires_after to use it again",
            )
        queries = [body.query] if isinstance(body.query, str) else body.query
        (vector,) = await embed(self.gw, principal, info.model, [" ".join(queries)])
        threshold = body.ranking_options.score_threshold if body.ranking_options else None
        query = VectorSearch(
            store_id=store_id,
            vector=list(memoryview(vector).cast("f")),
            scope=read_scope(self.gw.accounts, principal),
            max_results=body.max_num_results,
            filters=body.filters,
            score_threshold=threshold,
        )
        hits = await self.call(self.index().search(query))
        data = [
            SearchResult(
                file_id=h.file_id,
                filename=h.filename,
                score=h.score,
                attributes=h.attributes,
                content=[TextContent(text=h.text)],
            )
            for h in hits
        ]
        return SearchResultsPage(search_query=queries, data=data)
