"""Files for vector stores (the gateway's purpose ``assistants``): kept as uploaded, whatever
they hold, and never training data. Whether one is text the gateway finds when it attaches it to
a vector store (and refuses it there, as OpenAI refuses a file type it cannot parse)."""

from __future__ import annotations

from atoll.plugins.storage.contract.datasets import DatasetInvalid, check_filename
from atoll.plugins.storage.datasets import DatasetLimits, DedupReport, Prepared


def prepare_document(data: bytes, filename: str, limits: DatasetLimits) -> Prepared:
    check_filename(filename)
    if len(data) > limits.max_bytes:
        raise DatasetInvalid(
            f"{filename} is {len(data)} bytes; files may be at most {limits.max_bytes}"
        )
    return Prepared(
        format="document",
        kind="document",
        rows=[],
        dedup=DedupReport(exact=0, normalised=0, kept=0, mode="none"),
        tokens=0,
        canonical=data,  # kept as uploaded
    )
