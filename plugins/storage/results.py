"""A training job's results file (OpenAI's ``fine-tune-results``): a CSV of figures with a header
row, kept as uploaded. A pure function over its bytes, like ``datasets.prepare``, which calls it
for the ``csv`` format; the trainer uploads one when a job ends."""

from __future__ import annotations

import csv
import math

from atoll.plugins.storage.contract.datasets import DatasetInvalid, check_filename
from atoll.plugins.storage.datasets import (
    DatasetLimits,
    DedupReport,
    Prepared,
    Problems,
    Row,
    decode_text,
)


def _number(cell: str) -> bool:
    try:
        return math.isfinite(float(cell))
    except ValueError:
        return False


def prepare_results(data: bytes, filename: str, limits: DatasetLimits) -> Prepared:
    """Check a results CSV: a header of distinct names, then rows of as many cells, each a
    number or empty. DatasetInvalid names each problem's line."""
    check_filename(filename)
    if len(data) > limits.max_bytes:
        raise DatasetInvalid(
            f"{filename} is {len(data)} bytes; files may be at most {limits.max_bytes}"
        )
    lines = decode_text(data, filename).splitlines()
    problems = Problems(filename)
    reader = csv.reader(lines)
    header = next(reader, [])
    if not header or not all(name.strip() for name in header):
        problems.stop(1, "the first line must name each column")
    if len(set(header)) != len(header):
        problems.stop(1, "each column is named once")
    rows: list[Row] = []
    for cells in reader:
        line = reader.line_num
        if not cells:
            continue
        if len(cells) != len(header):
            problems.add(line, f"{len(cells)} cells; the header names {len(header)} columns")
        elif bad := next((c for c in cells if c and not _number(c)), None):
            problems.add(line, f"{bad[:32]!r} is not a number")
        else:
            rows.append(Row(line, {name: cell for name, cell in zip(header, cells, strict=True)}))
        if len(rows) > limits.max_rows:
            problems.stop(line, f"more than {limits.max_rows} rows; that is the limit")
    problems.raise_()
    return Prepared(
        format="csv",
        kind="results",
        rows=rows,
        dedup=DedupReport(exact=0, normalised=0, kept=len(rows), mode="none"),
        tokens=0,
        canonical=data,  # a results file is its own canonical form
    )
