"""The gateway's Batch API files, kept as uploaded: ``batch``, a file of requests (OpenAI's
``{"custom_id", "method": "POST", "url", "body"}`` per line, every line the same url, each
custom_id once), and ``batch_output``, a batch's results or errors (``{"id", "custom_id",
"response", "error"}`` per line). Pure functions over the bytes, like ``results.py``; what a
request's body may hold is the gateway's to check when it runs the line."""

from __future__ import annotations

from typing import Any, Literal

from atoll.plugins.storage.contract.datasets import (
    BATCH_URLS,
    MAX_BATCH_LINES,
    MAX_CUSTOM_ID_CHARS,
    DatasetInvalid,
    check_filename,
)
from atoll.plugins.storage.datasets import (
    DatasetLimits,
    DedupReport,
    Prepared,
    Problems,
    Row,
    decode_text,
    jsonl_records,
)


def _request_problem(obj: dict[str, Any], url: str | None) -> str | None:
    if obj.get("method") != "POST":
        return 'method must be "POST"'
    if obj.get("url") not in BATCH_URLS:
        return f"url must be one of {', '.join(BATCH_URLS)}"
    if url is not None and obj["url"] != url:
        return f"url {obj['url']!r} differs from the first line's {url!r}: one url per file"
    if not isinstance(obj.get("body"), dict):
        return "body must be a JSON object (the request's body)"
    return None


def _output_problem(obj: dict[str, Any]) -> str | None:
    if not isinstance(obj.get("id"), str):
        return "id must be a string"
    if not isinstance(obj.get("response"), dict | None) or not isinstance(
        obj.get("error"), dict | None
    ):
        return "response and error are each a JSON object or null"
    return None


def prepare_batch(
    data: bytes, filename: str, fmt: Literal["batch", "batch_output"], limits: DatasetLimits
) -> Prepared:
    """Check a batch file's lines; DatasetInvalid names each bad line and why."""
    check_filename(filename)
    if len(data) > limits.max_bytes:
        raise DatasetInvalid(
            f"{filename} is {len(data)} bytes; files may be at most {limits.max_bytes}"
        )
    problems = Problems(filename)
    rows: list[Row] = []
    seen: dict[str, int] = {}  # custom_id -> its line
    url: str | None = None
    for line, obj, chars in jsonl_records(decode_text(data, filename), problems):
        custom_id = obj.get("custom_id") if isinstance(obj, dict) else None
        if not isinstance(obj, dict):
            problems.add(line, "each line is a JSON object")
        elif chars > limits.max_row_chars:
            problems.add(line, f"{chars} characters; a line may have {limits.max_row_chars}")
        elif not isinstance(custom_id, str) or not 0 < len(custom_id) <= MAX_CUSTOM_ID_CHARS:
            problems.add(line, f"custom_id must be a string of 1-{MAX_CUSTOM_ID_CHARS} characters")
        elif custom_id in seen:
            problems.add(line, f"custom_id {custom_id[:64]!r} is also on line {seen[custom_id]}")
        elif why := (_request_problem(obj, url) if fmt == "batch" else _output_problem(obj)):
            problems.add(line, why)
        else:
            seen[custom_id] = line
            url = url or obj.get("url")
            rows.append(Row(line, {"custom_id": custom_id}))
            if len(rows) > MAX_BATCH_LINES:
                problems.stop(line, f"more than {MAX_BATCH_LINES} lines; that is the limit")
    problems.raise_()
    if fmt == "batch" and not rows:
        problems.stop(1, "no requests: a batch file has one JSON object per line")
    return Prepared(
        format=fmt,
        kind=fmt,
        rows=rows,
        dedup=DedupReport(exact=0, normalised=0, kept=len(rows), mode="none"),
        tokens=0,
        canonical=data,  # kept as uploaded
    )
