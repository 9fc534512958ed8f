"""The storage plugin's dataset service, as other plugins see it: names, schemas, errors, the
method table and typed clients over the agent's streams and RPC.

Overlay surface of an agent's ``storage`` plugin:

    RPC    datasets        DatasetQuery  -> list[DatasetRecord]
    RPC    dataset_info    DatasetRef    -> DatasetRecord
    RPC    dataset_delete  DatasetRef    -> {"deleted": true}       (a writer role)
    STREAM dataset_put     (no params)   uploader writes a DatasetPutHeader line, then the file's
                                         bytes; storage answers {"ok": true, "record": ...}
    STREAM dataset_get     DatasetFetch  storage writes a DatasetGetHeader line, then the bytes
                                         (canonical JSONL as chat or text, or the original file);
                                         the fetcher answers {"ok": true} once they verify

A refused upload resets the stream with the error: DatasetInvalid names the line and reason.
Registered datasets are immutable: uploading a name again makes its next version. A ``csv``
upload (never detected: it is named) is a training job's results file, not training data: kind
``results``, a header and rows of numbers kept as uploaded, fetched only as the original. So
are the gateway's Batch API files (also named, never detected): ``batch`` (requests, one JSON
object a line) and ``batch_output`` (their results or errors), checked line by line; and
``document``, a file for vector stores, kept as uploaded whatever it holds.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from atoll.agent.contract import (
    Caller,
    Method,
    Progress,
    Strict,
    counter,
    parse,
    service_address,
)
from atoll.agent.errors import AtollError
from atoll.agent.transfer import (
    IDLE_TIMEOUT,
    Opener,
    TransferFailed,
    fetching,
    put_resumable,
    receive_file,
    sha256_file,
    staged,
)
from atoll.plugins.storage.contract.wire import (
    PLUGIN,
    Deleted,
    FileName,
    Label,
    OwnerName,
    storage_client,
)

DATASET_PUT = "dataset_put"
DATASET_GET = "dataset_get"
DATASET_ID_PATTERN = r"^ds-[0-9a-f]{12}$"
MAX_FILENAME_BYTES = 200

Format = Literal[
    "alpaca", "sharegpt", "chat", "text", "preference", "csv", "batch", "batch_output", "document"
]
# preference: OpenAI's DPO rows, a prompt with a preferred and a non-preferred reply.
# document: a file for vector stores (the gateway's purpose "assistants").
Kind = Literal["sft", "pt", "preference", "results", "batch", "batch_output", "document"]
# Kinds kept as uploaded and fetched only so: never training data.
ORIGINAL_ONLY: dict[Kind, str] = {
    "results": "a training job's results file",
    "batch": "a batch's requests file",
    "batch_output": "a batch's results file",
    "document": "a file for vector stores",
}
# A batch file's requests (OpenAI's bounds: 50,000 lines; its bytes are the store's and the
# gateway's body limit's): each names one of these URLs, the same one on every line.
BATCH_URLS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
MAX_BATCH_LINES = 50_000
MAX_CUSTOM_ID_CHARS = 512
AsFormat = Literal["chat", "text", "preference", "original"]
# The form each training kind is stored in (and fetched as, unconverted).
CANONICAL_FORM: dict[Kind, AsFormat] = {"sft": "chat", "pt": "text", "preference": "preference"}
DedupMode = Literal["none", "exact", "normalised"]
DatasetIdStr = Annotated[str, StringConstraints(pattern=DATASET_ID_PATTERN)]


# --- errors (rebuilt by class name on the caller's side once this module is imported) ----------


class DatasetNotFound(AtollError):
    """No registered dataset with that id."""


class DatasetInvalid(AtollError):
    """The dataset cannot be used as uploaded; the message names each bad line and why
    (``data``: ``{"errors": [{"line", "reason"}]}``). Nothing was kept."""


def check_filename(name: str) -> str:
    """``name`` if it is a plain file name, else DatasetInvalid naming it: it is shown and may
    become a path where the file is staged, so no directories, ``..`` or control characters."""
    if (
        not name
        or ".." in name
        or "/" in name
        or "\\" in name
        or name != name.strip()
        or not name.isprintable()  # before encode(): a lone surrogate is not printable
        or len(name.encode()) > MAX_FILENAME_BYTES
    ):
        raise DatasetInvalid(
            f"filename {name[:64]!r}: give a plain file name of 1-{MAX_FILENAME_BYTES} bytes "
            "(no '/', '\\', '..' or control characters)"
        )
    return name


# --- schemas ------------------------------------------------------------------------------------


class DedupInfo(BaseModel):
    exact: int  # rows equal to an earlier row
    normalised: int  # rows equal to an earlier one once case-folded and spaces collapsed
    kept: int
    mode: DedupMode  # what was removed: nothing, exact duplicates, or both kinds


class DatasetRecord(BaseModel):
    """A registered dataset as the registry describes it."""

    id: str
    name: str
    version: int  # 1, 2, ... per name
    format: Format  # as uploaded
    kind: Kind  # sft (stored as chat rows), pt (stored as text rows), or kept as uploaded
    rows: int  # kept rows (a batch file's: its requests or results)
    tokens: int
    tokenizer: str  # what counted the tokens: "whitespace" (words)
    sha256: str  # of the uploaded bytes
    bytes: int  # uploaded
    owner: str  # the user the uploader named
    project: str | None
    created: float  # epoch seconds
    dedup: DedupInfo
    filename: str


class DatasetPutHeader(Strict):
    """The first line of a ``dataset_put`` stream; the file's bytes follow."""

    name: Label
    filename: FileName
    format: Format | None = None  # None: detected from the file name and first row
    owner: OwnerName
    project: OwnerName | None = None
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    dedup: DedupMode = "normalised"


class DatasetFetch(Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    id: DatasetIdStr
    as_: AsFormat = Field("chat", alias="as")


class DatasetGetHeader(Strict):
    """The first line of a ``dataset_get`` stream; ``size`` bytes with that sha256 follow."""

    record: DatasetRecord
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class DatasetQuery(Strict):
    owner: str | None = None
    project: str | None = None
    name: str | None = None


class DatasetRef(Strict):
    id: DatasetIdStr


# --- methods: the plugin serves them and the clients below call them from this one table ------

LIST_DATASETS: Method[DatasetQuery, list[DatasetRecord]] = Method(
    "datasets", DatasetQuery, list[DatasetRecord], "datasets query"
)
DATASET_INFO: Method[DatasetRef, DatasetRecord] = Method(
    "dataset_info", DatasetRef, DatasetRecord, "dataset_info request"
)
DELETE_DATASET: Method[DatasetRef, Deleted] = Method(
    "dataset_delete", DatasetRef, Deleted, "dataset_delete request"
)


# --- clients ------------------------------------------------------------------------------------


async def upload_dataset(
    agent: Opener,
    storage: str,
    path: Path,
    name: str,
    owner: str,
    project: str | None = None,
    format: Format | None = None,
    *,
    filename: str | None = None,
    dedup: DedupMode = "normalised",
    idle_timeout: float = IDLE_TIMEOUT,
    progress: Progress | None = None,
) -> DatasetRecord:
    """Upload the file at ``path`` as dataset ``name`` (its next version) for ``owner``; the
    storage agent validates, converts, de-duplicates and registers it, or refuses it with
    DatasetInvalid naming the line and reason. Tried again after a failure, the same upload
    sends only what the storage agent did not keep (``progress`` starts there)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no dataset file {path}")
    size = path.stat().st_size
    digest = (await asyncio.to_thread(sha256_file, path)).hexdigest()
    header = parse(
        DatasetPutHeader,
        {
            "name": name,
            "filename": filename or path.name,
            "format": format,
            "owner": owner,
            "project": project,
            "size": size,
            "sha256": digest,
            "dedup": dedup,
        },
        "dataset upload",
    )
    reply = await put_resumable(
        agent,
        service_address(storage, PLUGIN),
        DATASET_PUT,
        header.model_dump(mode="json"),
        [(path, size)],
        idle_timeout,
        progress,
    )
    return parse(DatasetRecord, reply.get("record"), f"reply from {storage}")


async def fetch_dataset(
    agent: Opener,
    storage: str,
    dataset_id: str,
    dest_path: Path,
    as_: AsFormat = "chat",
    *,
    idle_timeout: float = IDLE_TIMEOUT,
    progress: Progress | None = None,
) -> DatasetRecord:
    """Fetch dataset ``dataset_id`` into the file ``dest_path`` (replacing it) and return its
    record: JSON Lines of chat rows (``as_="chat"``, sft datasets), of ``{"text"}`` rows
    (``"text"``: a pt dataset, or an sft one's turns joined), or the uploaded file
    (``"original"``). The bytes land in the hidden staging directory next to ``dest_path`` and
    are renamed into place once their size and sha256 verify: a broken transfer leaves nothing
    visible."""
    params = parse(DatasetFetch, {"id": dataset_id, "as": as_}, "dataset fetch")
    dest = Path(dest_path).absolute()
    if dest.is_dir():
        raise IsADirectoryError(f"{dest} is a directory; name the file to write")
    where = service_address(storage, PLUGIN)
    wire = params.model_dump(by_alias=True)
    with staged(dest) as tmp:
        async with fetching(agent, where, DATASET_GET, wire, idle_timeout) as reader:
            header = parse(DatasetGetHeader, await reader.line(), f"header from {storage}")
            if header.record.id != dataset_id:
                raise TransferFailed(
                    f"asked for {dataset_id!r}, {storage} sent {header.record.id!r}"
                )
            advance = counter(header.size, progress)
            await receive_file(reader, tmp, header.size, header.sha256, advance)
            os.replace(tmp, dest)
    return header.record


def _ref(dataset_id: str) -> DatasetRef:
    return parse(DatasetRef, {"id": dataset_id}, "dataset id")


async def list_datasets(
    agent: Caller,
    storage: str,
    owner: str | None = None,
    project: str | None = None,
    name: str | None = None,
    timeout: float | None = None,
) -> list[DatasetRecord]:
    query = DatasetQuery(owner=owner, project=project, name=name)
    return await storage_client(agent, storage, timeout).invoke(LIST_DATASETS, query)


async def describe_dataset(
    agent: Caller, storage: str, dataset_id: str, timeout: float | None = None
) -> DatasetRecord:
    return await storage_client(agent, storage, timeout).invoke(DATASET_INFO, _ref(dataset_id))


async def delete_dataset(
    agent: Caller, storage: str, dataset_id: str, timeout: float | None = None
) -> None:
    """Remove the dataset's row and objects; DatasetNotFound if there is none."""
    await storage_client(agent, storage, timeout).invoke(DELETE_DATASET, _ref(dataset_id))
