"""A gateway's batches as files in its data directory, so that a restarted gateway resumes them:
``<id>.json`` (the Batch object and who made it, written whole), ``<id>.input.jsonl`` (the input
file, fetched once) and ``<id>.done.jsonl`` (each finished line's result, appended as it
finishes: the lines a resumed batch does not run again)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atoll.plugins.gateway.batch_shapes import UNFINISHED, Batch
from atoll.plugins.gateway.json_files import write_json


@dataclass(frozen=True)
class Line:
    n: int  # 1-based line of the input file
    custom_id: str
    url: str
    body: dict[str, Any]


@dataclass
class Kept:
    """A batch as this gateway keeps it: the Batch object, who made it (the key it runs with)
    and the results of its finished lines by custom_id."""

    batch: Batch
    owner: str
    project: str | None
    key_id: str
    done: dict[str, dict[str, Any]] = field(default_factory=dict)


class BatchStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(mode=0o700, parents=True, exist_ok=True)

    def path(self, batch_id: str, name: str) -> Path:
        return self.root / f"{batch_id}.{name}"

    def load(self) -> list[Kept]:
        """Every batch kept; an unfinished one with its results so far (and its counts)."""
        found = []
        for path in sorted(self.root.glob("batch_*.json")):
            saved = json.loads(path.read_text())
            batch = Batch.model_validate(saved["batch"])
            kept = Kept(batch, saved["owner"], saved["project"], saved["key_id"])
            if batch.status in UNFINISHED:
                kept.done = self._read_done(batch.id)
                ok = sum(r["response"]["status_code"] == 200 for r in kept.done.values())
                counts = batch.request_counts
                counts.completed, counts.failed = ok, len(kept.done) - ok
            found.append(kept)
        return found

    def save(self, kept: Kept) -> None:
        data = {
            "batch": kept.batch.model_dump(mode="json"),
            "owner": kept.owner,
            "project": kept.project,
            "key_id": kept.key_id,
        }
        write_json(self.path(kept.batch.id, "json"), data)

    def lines(self, batch_id: str) -> list[Line]:
        """The fetched input's lines (storage checked their shape at upload)."""
        path = self.path(batch_id, "input.jsonl")
        if not path.exists():  # finished, or failed before it was fetched
            return []
        lines = []
        for n, raw in enumerate(path.read_bytes().splitlines(), start=1):
            if raw.strip():
                obj = json.loads(raw)
                lines.append(Line(n, obj["custom_id"], obj["url"], obj["body"]))
        return lines

    def add_result(self, kept: Kept, result: dict[str, Any]) -> None:
        """A finished line's result, appended to ``done`` before anything else happens."""
        with self.path(kept.batch.id, "done.jsonl").open("a") as done:
            done.write(json.dumps(result, ensure_ascii=False) + "\n")
        kept.done[result["custom_id"]] = result
        counts = kept.batch.request_counts
        if result["response"]["status_code"] == 200:
            counts.completed += 1
        else:
            counts.failed += 1

    def finished(self, kept: Kept) -> None:
        """Its results are stored as files: the work files go."""
        for name in ("input.jsonl", "done.jsonl"):
            self.path(kept.batch.id, name).unlink(missing_ok=True)
        kept.done = {}

    def forget(self, batch_id: str) -> None:
        self.path(batch_id, "json").unlink(missing_ok=True)

    def _read_done(self, batch_id: str) -> dict[str, dict[str, Any]]:
        """Results so far; a last line cut by a crash is dropped (its line runs again)."""
        path = self.path(batch_id, "done.jsonl")
        if not path.exists():
            return {}
        data = path.read_bytes()
        whole = data[: data.rfind(b"\n") + 1]
        if len(whole) != len(data):
            with path.open("r+b") as f:
                f.truncate(len(whole))
        results = (json.loads(raw) for raw in whole.splitlines())
        return {r["custom_id"]: r for r in results}
