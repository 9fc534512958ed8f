"""The storage plugin's dataset service, as other plugins see it (re-exported by ``contract.py``):
names, schemas, errors and thin clients over the agent's streams and RPC.

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
Registered datasets are immutable: uploading a name again makes its next version.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from atoll.agent.errors import AtollError
from atoll.agent.files import TransferFailed, sha256_file
from atoll.agent.node import Overlay
from atoll.plugins.storage.datasets import AsFormat, DatasetInvalid, DedupMode, Format, Kind
from atoll.plugins.storage.store import file_chunks
from atoll.plugins.storage.wire import (
    IDLE_TIMEOUT,
    MAX_HEADER_BYTES,
    FileName,
    Label,
    OwnerName,
    Progress,
    Reader,
    address,
    parse,
    receive_file,
    send_bytes,
    transfer,
    write_line,
)

__all__ = ["DatasetInvalid"]

DATASET_PUT = "dataset_put"
DATASET_GET = "dataset_get"
DATASETS_METHOD = "datasets"
DATASET_INFO_METHOD = "dataset_info"
DATASET_DELETE_METHOD = "dataset_delete"
DATASET_ID_PATTERN = r"^ds-[0-9a-f]{12}$"

DatasetIdStr = Annotated[str, StringConstraints(pattern=DATASET_ID_PATTERN)]


class DatasetNotFound(AtollError):
    """No registered dataset with that id."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


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
    kind: Kind  # sft (stored as chat rows) or pt (stored as text rows)
    rows: int  # kept rows
    tokens: int
    tokenizer: str  # what counted the tokens: "whitespace" (words)
    sha256: str  # of the uploaded bytes
    bytes: int  # uploaded
    owner: str  # the user the uploader named
    project: str | None
    created: float  # epoch seconds
    dedup: DedupInfo
    filename: str


class DatasetPutHeader(_Strict):
    """The first line of a ``dataset_put`` stream; the file's bytes follow."""

    name: Label
    filename: FileName
    format: Format | None = None  # None: detected from the file name and first row
    owner: OwnerName
    project: OwnerName | None = None
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    dedup: DedupMode = "normalised"


class DatasetFetch(_Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    id: DatasetIdStr
    as_: AsFormat = Field("chat", alias="as")


class DatasetGetHeader(_Strict):
    """The first line of a ``dataset_get`` stream; ``size`` bytes with that sha256 follow."""

    record: DatasetRecord
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class DatasetQuery(_Strict):
    owner: str | None = None
    project: str | None = None
    name: str | None = None


class DatasetRef(_Strict):
    id: DatasetIdStr


def _ref(dataset_id: str) -> dict[str, str]:
    return parse(DatasetRef, {"id": dataset_id}, "dataset id").model_dump()


# --- clients ------------------------------------------------------------------------------------


async def upload_dataset(
    agent: Overlay,
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
    DatasetInvalid naming the line and reason."""
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
    async with transfer(agent, storage, DATASET_PUT, None, idle_timeout) as stream:
        await write_line(stream, header.model_dump(mode="json"), idle_timeout)
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            if progress:
                progress(done, size)

        await send_bytes(stream, file_chunks(path), size, idle_timeout, advance)
        reply = await Reader(stream, idle_timeout).line(MAX_HEADER_BYTES)
        if reply.get("ok") is not True:
            raise TransferFailed(f"{storage} did not confirm the dataset upload: {reply}")
        return parse(DatasetRecord, reply.get("record"), f"reply from {storage}")


async def fetch_dataset(
    agent: Overlay,
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
    (``"original"``). The bytes land in a hidden temporary file next to ``dest_path``, renamed
    into place once their size and sha256 verify: a broken transfer leaves nothing visible."""
    params = parse(DatasetFetch, {"id": dataset_id, "as": as_}, "dataset fetch")
    dest = Path(dest_path).absolute()
    if dest.is_dir():
        raise IsADirectoryError(f"{dest} is a directory; name the file to write")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        wire = params.model_dump(by_alias=True)
        async with transfer(agent, storage, DATASET_GET, wire, idle_timeout) as stream:
            reader = Reader(stream, idle_timeout)
            header = parse(
                DatasetGetHeader, await reader.line(MAX_HEADER_BYTES), f"header from {storage}"
            )
            if header.record.id != dataset_id:
                raise TransferFailed(
                    f"asked for {dataset_id!r}, {storage} sent {header.record.id!r}"
                )
            done = 0

            def advance(n: int) -> None:
                nonlocal done
                done += n
                if progress:
                    progress(done, header.size)

            await receive_file(reader, tmp, header.size, header.sha256, advance)
            os.replace(tmp, dest)
            # The file is complete and in place whether or not this last word arrives.
            with contextlib.suppress(AtollError, TimeoutError):
                await write_line(stream, {"ok": True}, idle_timeout)
        return header.record
    finally:
        tmp.unlink(missing_ok=True)


async def list_datasets(
    agent: Overlay,
    storage: str,
    owner: str | None = None,
    project: str | None = None,
    name: str | None = None,
    timeout: float | None = None,
) -> list[DatasetRecord]:
    query = DatasetQuery(owner=owner, project=project, name=name).model_dump()
    rows = await agent.call(address(storage), DATASETS_METHOD, query, timeout)
    return [DatasetRecord.model_validate(row) for row in rows]


async def describe_dataset(
    agent: Overlay, storage: str, dataset_id: str, timeout: float | None = None
) -> DatasetRecord:
    row = await agent.call(address(storage), DATASET_INFO_METHOD, _ref(dataset_id), timeout)
    return DatasetRecord.model_validate(row)


async def delete_dataset(
    agent: Overlay, storage: str, dataset_id: str, timeout: float | None = None
) -> None:
    """Remove the dataset's row and objects; DatasetNotFound if there is none."""
    await agent.call(address(storage), DATASET_DELETE_METHOD, _ref(dataset_id), timeout)
