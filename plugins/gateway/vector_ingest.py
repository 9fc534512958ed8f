"""What a vector store takes in, at the gateway: an uploaded file's text (checked: text, not too
large), cut into overlapping chunks of whitespace-separated tokens (the unit Atoll counts a
dataset's tokens in), and the chunks' embeddings from an inference node over the overlay,
metered to the caller as a ``/v1/embeddings`` request is."""

from __future__ import annotations

import re
import struct
import tempfile
from pathlib import Path

from atoll.agent.errors import AtollError
from atoll.plugins.gateway.accounts.keys import Principal
from atoll.plugins.gateway.errors import GatewayError, from_platform
from atoll.plugins.gateway.service import Gateway
from atoll.plugins.gateway.vector_shapes import StaticChunking
from atoll.plugins.inference.contract import EMBED, EmbedRequest, EmbedResult
from atoll.plugins.storage.contract.datasets import DatasetRecord, fetch_dataset
from atoll.plugins.storage.contract.vectors import MAX_CHUNKS

MAX_FILE_BYTES = 2 * 1024 * 1024  # of a file attached to a vector store
EMBED_BATCH = 256  # chunks embedded per inference call
# A file's chunks and vectors travel to storage in one RPC message, under the broker's 8 MiB.
MAX_PAYLOAD_BYTES = 6 * 1024 * 1024
MAX_CHUNK_CHARS = 100_000  # an embedding request's bound on one input
# A token: a run of non-space characters, cut every 100 (minified text has long runs).
_WORD = re.compile(r"\S{1,100}")


async def file_text(gw: Gateway, record: DatasetRecord) -> str:
    """The file's text; a 400 for a file too large or that is not UTF-8 text."""
    if record.bytes > MAX_FILE_BYTES:
        raise GatewayError(
            400,
            f"file {record.id} is {record.bytes} bytes; a vector store takes files of at most "
            f"{MAX_FILE_BYTES}",
            code="invalid_file",
            param="file_id",
        )
    with tempfile.TemporaryDirectory(prefix="atoll-vectors-") as tmp:
        dest = Path(tmp) / "content"
        try:
            await fetch_dataset(gw.agent, gw.storage_address(), record.id, dest, as_="original")
        except AtollError as exc:
            raise from_platform(exc) from None
        data = dest.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = "\0"
    if "\0" in text:
        raise GatewayError(
            400,
            f"file {record.id} ({record.filename}) is not UTF-8 text; a vector store takes text "
            "files",
            code="unsupported_file",
            param="file_id",
        )
    if not text.strip():
        raise GatewayError(
            400, f"file {record.id} holds no text", code="invalid_file", param="file_id"
        )
    return text


def chunk(text: str, sizes: StaticChunking) -> list[str]:
    """``text`` in windows of ``max_chunk_size_tokens`` tokens, each starting
    ``max - overlap`` tokens after the last; a chunk is the text between its first and last
    token, as written. 400 when that makes more than MAX_CHUNKS chunks."""
    spans = [m.span() for m in _WORD.finditer(text)]
    size, step = (
        sizes.max_chunk_size_tokens,
        sizes.max_chunk_size_tokens - sizes.chunk_overlap_tokens,
    )
    starts = range(0, max(len(spans) - sizes.chunk_overlap_tokens, 1), step)
    if len(starts) > MAX_CHUNKS:
        raise GatewayError(
            400,
            f"the file makes {len(starts)} chunks; at most {MAX_CHUNKS} are kept per file "
            "(use larger chunks or a smaller file)",
            param="chunking_strategy",
        )
    chunks = [text[spans[i][0] : spans[min(i + size, len(spans)) - 1][1]] for i in starts]
    if (longest := max(map(len, chunks))) > MAX_CHUNK_CHARS:
        raise GatewayError(
            400,
            f"a chunk of {longest} characters; at most {MAX_CHUNK_CHARS} are kept (use smaller "
            "chunks)",
            param="chunking_strategy",
        )
    return chunks


async def embed(
    gw: Gateway, principal: Principal, model: str, texts: list[str], background: bool = False
) -> list[bytes]:
    """Each text's embedding as little-endian float32 bytes, from a node serving ``model``;
    ``background``: below interactive traffic, as a batch's lines."""
    vectors: list[bytes] = []
    for at in range(0, len(texts), EMBED_BATCH):
        # The model reads far fewer characters than that bound: a longer query loses nothing.
        batch = [t[:MAX_CHUNK_CHARS] for t in texts[at : at + EMBED_BATCH]]
        request = EmbedRequest(input=batch, model=model)
        reply = await gw.call(principal, model, EMBED, request, None, background=background)
        result = EmbedResult.model_validate(reply)
        vectors += [struct.pack(f"<{len(v)}f", *v) for v in result.embeddings]
    return vectors


def check_payload(chunks: list[str], vectors: list[bytes]) -> None:
    size = sum(len(c.encode()) for c in chunks) + sum(len(v) for v in vectors) * 4 // 3
    if size > MAX_PAYLOAD_BYTES:
        raise GatewayError(
            400,
            f"the file's chunks and vectors come to {size} bytes; a file may have "
            f"{MAX_PAYLOAD_BYTES} (attach a smaller file)",
            code="invalid_file",
            param="file_id",
        )
