"""The storage plugin's vector index, as gateways see it: vector stores of text chunks with their
embeddings, each attached file labelled with who may read its chunks, searched with the reader's
scopes applied inside the index search (see ``plugins/storage/vectors.py``).

Overlay surface of an agent's ``storage`` plugin (gateways and admins only: ``CLIENTS``):

    RPC vector_store_put     VectorStoreSpec   -> VectorStoreInfo   (create, or rename/re-tag)
    RPC vector_stores        (no params)       -> list[VectorStoreInfo]
    RPC vector_store_info    VectorStoreRef    -> VectorStoreInfo
    RPC vector_store_delete  VectorStoreRef    -> {"deleted": true}
    RPC vector_file_add      VectorFileAdd     -> VectorFileInfo    (chunks and their vectors)
    RPC vector_files         VectorStoreRef    -> list[VectorFileInfo]
    RPC vector_file          VectorFileRef     -> VectorFileInfo
    RPC vector_file_delete   VectorFileRef     -> {"deleted": bool}
    RPC vector_search        VectorSearch      -> list[VectorHit]

The gateway computes embeddings (an inference node's) and says whom a record belongs to
(``Labels``) and whom a search is for (``ReadScope``); storage keeps the labels with the records
and returns only the chunks the scope may read, however many others rank higher.
"""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    Field,
    PlainSerializer,
    StringConstraints,
    model_validator,
)

from atoll.agent.contract import Caller, Method, NoParams, Strict
from atoll.agent.errors import AtollError
from atoll.plugins.storage.contract.wire import Deleted, OwnerName, storage_client

# Who reads a record: its owner only, the members of its project, or every user of the tenant.
Policy = Literal["private", "project", "tenant"]
VectorStoreId = Annotated[str, StringConstraints(pattern=r"^vs_[0-9a-f]{24}$")]
FileId = Annotated[str, StringConstraints(pattern=r"^ds-[0-9a-f]{12}$")]
AttrKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
AttrValue = Annotated[str, StringConstraints(max_length=512)] | bool | float
Attributes = Annotated[dict[AttrKey, AttrValue], Field(max_length=16)]
Metadata = Annotated[
    dict[AttrKey, Annotated[str, StringConstraints(max_length=512)]], Field(max_length=16)
]
MAX_CHUNKS = 4096  # per file
# Bytes that travel as base64 in JSON (the RPC's form) and are bytes in Python.
Packed = Annotated[
    bytes,
    BeforeValidator(lambda v: base64.b64decode(v, validate=True) if isinstance(v, str) else v),
    PlainSerializer(lambda b: base64.b64encode(b).decode(), when_used="json"),
]
MAX_DIMS = 4096


class VectorStoreNotFound(AtollError):
    """No vector store with that id."""


class VectorFileNotFound(AtollError):
    """The vector store holds no such file."""


class Labels(Strict):
    """Whose a record is and who may read it. ``project`` policy needs a project."""

    owner: OwnerName
    project: OwnerName | None = None
    policy: Policy = "private"

    @model_validator(mode="after")
    def _project_policy(self) -> Labels:
        if self.policy == "project" and self.project is None:
            raise ValueError("policy 'project' needs a project")
        return self


class ReadScope(Strict):
    """Whom a read is for: ``admin`` reads everything; otherwise tenant records, project records
    of ``projects``, and the ``user``'s private ones (those outside a project only when
    ``personal``: a key scoped to a project sees nothing of its user's outside it)."""

    user: OwnerName
    projects: list[OwnerName] = Field(default_factory=list, max_length=1024)
    personal: bool = True
    admin: bool = False

    def reads(self, labels: Labels) -> bool:
        if self.admin or labels.policy == "tenant":
            return True
        if labels.project is not None and labels.project not in self.projects:
            return False
        if labels.policy == "project":
            return True
        return labels.owner == self.user and (labels.project is not None or self.personal)


class Comparison(Strict):
    """OpenAI's comparison filter on a file's attributes."""

    type: Literal["eq", "ne", "gt", "gte", "lt", "lte", "in", "nin"]
    key: AttrKey
    value: AttrValue | Annotated[list[str | float], Field(max_length=256)]

    @model_validator(mode="after")
    def _list_for_sets(self) -> Comparison:
        if (self.type in ("in", "nin")) != isinstance(self.value, list):
            wants = "a list" if self.type in ("in", "nin") else "one value"
            raise ValueError(f"'{self.type}' takes {wants}")
        return self

    def matches(self, attributes: dict[str, Any]) -> bool:
        if self.key not in attributes:
            return self.type in ("ne", "nin")
        have, want = attributes[self.key], self.value
        if self.type in ("in", "nin"):
            assert isinstance(want, list)
            return (have in want) == (self.type == "in")
        if self.type in ("eq", "ne"):
            same = have == want and (_numbers(have, want) or type(have) is type(want))
            return same == (self.type == "eq")
        if not (_numbers(have, want) or (isinstance(have, str) and isinstance(want, str))):
            return False  # an order between a number and a string: no match
        return {"gt": have > want, "gte": have >= want, "lt": have < want, "lte": have <= want}[
            self.type
        ]


def _numbers(*values: Any) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


class Compound(Strict):
    """OpenAI's compound filter: ``and`` or ``or`` of comparisons and compounds."""

    type: Literal["and", "or"]
    filters: list[Comparison | Compound] = Field(min_length=1, max_length=64)

    def matches(self, attributes: dict[str, Any]) -> bool:
        results = (f.matches(attributes) for f in self.filters)
        return all(results) if self.type == "and" else any(results)


Filter = Comparison | Compound


class VectorStoreSpec(Strict):
    """A store to create (``labels`` and ``model``: whose, and the embedding model its vectors
    come from) or to change (only name, description, metadata, expiry change)."""

    id: VectorStoreId
    name: str = Field("", max_length=256)
    description: str | None = Field(None, max_length=512)
    metadata: Metadata | None = None
    expires_after_days: int | None = Field(None, ge=1, le=365)
    labels: Labels
    model: str = Field(min_length=1, max_length=256)


class VectorStoreInfo(VectorStoreSpec):
    created_at: float
    last_active_at: float
    files: int
    chunks: int
    usage_bytes: int  # the chunks' text and vectors


class VectorStoreRef(Strict):
    id: VectorStoreId


class Chunking(Strict):
    max_chunk_size_tokens: int
    chunk_overlap_tokens: int


class VectorFileAdd(Strict):
    """A file's chunks and their vectors (``vectors``: float32, little-endian, one row per
    chunk), replacing any earlier attachment of the same file."""

    store_id: VectorStoreId
    file_id: FileId
    filename: str = Field(min_length=1, max_length=255)
    attributes: Attributes | None = None
    labels: Labels
    chunking: Chunking | None = None  # None: the chunks as the caller cut them (rows)
    chunks: list[Annotated[str, Field(max_length=200_000)]] = Field(
        min_length=1, max_length=MAX_CHUNKS
    )
    vectors: Packed
    # Flag each chunk whose vector is this close (cosine) to an earlier chunk's of the file.
    near_duplicates: float | None = Field(None, gt=0.0, le=1.0)


class NearDuplicate(BaseModel):
    """Chunk ``chunk`` of a file is ``score`` (cosine) from its earlier chunk ``of``."""

    chunk: int
    of: int
    score: float


class VectorFileInfo(BaseModel):
    store_id: str
    file_id: str
    filename: str
    attributes: dict[str, Any] | None
    labels: Labels
    chunking: Chunking | None
    chunks: int
    usage_bytes: int
    created_at: float
    first_chunk: int = 0  # the index's id of its chunk 0 (its chunks' ids follow on)
    near_duplicates: list[NearDuplicate] | None = None  # when the add asked for them


class VectorFileRef(Strict):
    store_id: VectorStoreId
    file_id: FileId


class VectorSearch(Strict):
    """The nearest ``max_results`` chunks to ``vector`` (cosine) that ``scope`` may read and
    whose file's attributes pass ``filters``, scoring at least ``score_threshold``."""

    store_id: VectorStoreId
    vector: list[float] = Field(min_length=1, max_length=MAX_DIMS)
    scope: ReadScope
    max_results: int = Field(10, ge=1, le=50)
    filters: Filter | None = None
    score_threshold: float | None = Field(None, ge=0.0, le=1.0)  # None: any score (cosine < 0 too)


class VectorHit(BaseModel):
    file_id: str
    filename: str
    score: float
    attributes: dict[str, Any] | None
    text: str
    chunk: int  # its place in its file, from 0


VECTOR_STORE_PUT: Method[VectorStoreSpec, VectorStoreInfo] = Method(
    "vector_store_put", VectorStoreSpec, VectorStoreInfo, "vector_store_put request"
)
VECTOR_STORES: Method[NoParams, list[VectorStoreInfo]] = Method(
    "vector_stores", NoParams, list[VectorStoreInfo]
)
VECTOR_STORE_INFO: Method[VectorStoreRef, VectorStoreInfo] = Method(
    "vector_store_info", VectorStoreRef, VectorStoreInfo, "vector_store_info request"
)
VECTOR_STORE_DELETE: Method[VectorStoreRef, Deleted] = Method(
    "vector_store_delete", VectorStoreRef, Deleted, "vector_store_delete request"
)
VECTOR_FILE_ADD: Method[VectorFileAdd, VectorFileInfo] = Method(
    "vector_file_add", VectorFileAdd, VectorFileInfo, "vector_file_add request"
)
VECTOR_FILES: Method[VectorStoreRef, list[VectorFileInfo]] = Method(
    "vector_files", VectorStoreRef, list[VectorFileInfo], "vector_files request"
)
VECTOR_FILE: Method[VectorFileRef, VectorFileInfo] = Method(
    "vector_file", VectorFileRef, VectorFileInfo, "vector_file request"
)
VECTOR_FILE_DELETE: Method[VectorFileRef, Deleted] = Method(
    "vector_file_delete", VectorFileRef, Deleted, "vector_file_delete request"
)
VECTOR_SEARCH: Method[VectorSearch, list[VectorHit]] = Method(
    "vector_search", VectorSearch, list[VectorHit], "vector_search request"
)


class VectorIndexClient:
    """The typed client of a storage agent's vector index."""

    def __init__(self, agent: Caller, storage: str, timeout: float | None = None) -> None:
        self.client = storage_client(agent, storage, timeout)

    async def put_store(self, spec: VectorStoreSpec) -> VectorStoreInfo:
        return await self.client.invoke(VECTOR_STORE_PUT, spec)

    async def stores(self) -> list[VectorStoreInfo]:
        return await self.client.invoke(VECTOR_STORES, NoParams())

    async def store(self, store_id: str) -> VectorStoreInfo:
        return await self.client.invoke(VECTOR_STORE_INFO, VectorStoreRef(id=store_id))

    async def delete_store(self, store_id: str) -> bool:
        return (await self.client.invoke(VECTOR_STORE_DELETE, VectorStoreRef(id=store_id))).deleted

    async def add_file(self, add: VectorFileAdd) -> VectorFileInfo:
        return await self.client.invoke(VECTOR_FILE_ADD, add)

    async def files(self, store_id: str) -> list[VectorFileInfo]:
        return await self.client.invoke(VECTOR_FILES, VectorStoreRef(id=store_id))

    async def file(self, store_id: str, file_id: str) -> VectorFileInfo:
        ref = VectorFileRef(store_id=store_id, file_id=file_id)
        return await self.client.invoke(VECTOR_FILE, ref)

    async def delete_file(self, store_id: str, file_id: str) -> bool:
        ref = VectorFileRef(store_id=store_id, file_id=file_id)
        return (await self.client.invoke(VECTOR_FILE_DELETE, ref)).deleted

    async def search(self, search: VectorSearch) -> list[VectorHit]:
        return await self.client.invoke(VECTOR_SEARCH, search)
