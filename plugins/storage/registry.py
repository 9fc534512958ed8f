"""The storage plugin's registry in SQLite: adapters, datasets, and sealed objects' data keys.
One connection, used only from the event loop: its statements are single-row and short."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from atoll.plugins.storage.contract.adapters import AdapterExists, AdapterQuery, AdapterRecord
from atoll.plugins.storage.contract.datasets import DatasetQuery, DatasetRecord

SCHEMA_VERSION = 3  # PRAGMA user_version; 0 with an adapters table is the first layout

SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    id TEXT PRIMARY KEY,
    base_model TEXT NOT NULL,
    rank INTEGER NOT NULL,
    target_modules TEXT NOT NULL,  -- JSON list
    files TEXT NOT NULL,           -- JSON [{name, size, sha256}]
    size_bytes INTEGER NOT NULL,
    uploader TEXT NOT NULL,        -- the uploading agent
    created REAL NOT NULL,
    meta TEXT NOT NULL,            -- JSON object
    owner TEXT,                    -- the user it belongs to
    project TEXT,
    public INTEGER NOT NULL DEFAULT 0,
    source_job TEXT
);
CREATE INDEX IF NOT EXISTS adapters_base ON adapters (base_model);
CREATE TABLE IF NOT EXISTS datasets (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    format TEXT NOT NULL,
    kind TEXT NOT NULL,
    rows INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    tokenizer TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    owner TEXT NOT NULL,
    project TEXT,
    created REAL NOT NULL,
    dedup TEXT NOT NULL,           -- JSON {exact, normalised, kept, mode}
    filename TEXT NOT NULL,
    UNIQUE (name, version)
);
-- The last version given per name: deleting a version never frees its number for other bytes.
CREATE TABLE IF NOT EXISTS dataset_versions (name TEXT PRIMARY KEY, last INTEGER NOT NULL);
-- Each sealed object's data key, wrapped by a KEK of the keyring (sealed_store.py).
CREATE TABLE IF NOT EXISTS object_keys (
    key TEXT PRIMARY KEY,          -- the object's key in the store
    object_id BLOB NOT NULL,       -- the id in its sealed header
    kek TEXT NOT NULL,             -- the KEK that wraps its data key
    wrapped BLOB NOT NULL,         -- its data key, wrapped
    size INTEGER NOT NULL,         -- plaintext bytes
    sha256 TEXT NOT NULL,          -- of the plaintext
    created REAL NOT NULL
);
"""

# The first layout's adapters table had no visibility columns and called the uploader "owner".
MIGRATE_1 = """
ALTER TABLE adapters RENAME TO adapters_v1;
DROP INDEX IF EXISTS adapters_base;
"""
COPY_1 = """
INSERT INTO adapters (id, base_model, rank, target_modules, files, size_bytes, uploader,
                      created, meta)
SELECT id, base_model, rank, target_modules, files, size_bytes, owner, created, meta
FROM adapters_v1;
DROP TABLE adapters_v1;
"""

ADAPTER_COLUMNS = (
    "id, base_model, rank, target_modules, files, size_bytes, uploader, created, meta, owner, "
    "project, public, source_job"
)
DATASET_COLUMNS = (
    "id, name, version, format, kind, rows, tokens, tokenizer, sha256, bytes, owner, project, "
    "created, dedup, filename"
)


def _run(db: sqlite3.Connection, script: str) -> None:
    """Each statement of ``script`` (none holds a ';' inside) in the open transaction
    (``executescript`` would commit it)."""
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)


def open_registry(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)  # autocommit, explicit transactions
    db.execute("PRAGMA journal_mode=WAL")
    version = db.execute("PRAGMA user_version").fetchone()[0]
    first_layout = (
        version == 0
        and db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'adapters'"
        ).fetchone()
    )
    db.execute("BEGIN IMMEDIATE")
    try:
        if first_layout:
            _run(db, MIGRATE_1)
        _run(db, SCHEMA)
        if first_layout:
            _run(db, COPY_1)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        db.close()
        raise
    return db


def _where(filters: dict[str, Any]) -> tuple[str, list[Any]]:
    used = {k: v for k, v in filters.items() if v is not None}
    sql = "".join(f" AND {column} = ?" for column in used)
    return " WHERE 1=1" + sql, list(used.values())


class AdapterRegistry:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    @staticmethod
    def _record(row: tuple[Any, ...]) -> AdapterRecord:
        data = dict(zip(ADAPTER_COLUMNS.split(", "), row, strict=True))
        for key in ("target_modules", "files", "meta"):
            data[key] = json.loads(data[key])
        data["public"] = bool(data["public"])
        return AdapterRecord.model_validate(data)

    def get(self, adapter_id: str) -> AdapterRecord | None:
        row = self.db.execute(f"SELECT {ADAPTER_COLUMNS} FROM adapters WHERE id = ?", (adapter_id,))
        found = row.fetchone()
        return None if found is None else self._record(found)

    def find(self, query: AdapterQuery) -> list[AdapterRecord]:
        where, args = _where(query.model_dump())
        rows = self.db.execute(f"SELECT {ADAPTER_COLUMNS} FROM adapters{where} ORDER BY id", args)
        return [self._record(r) for r in rows]

    def add(self, r: AdapterRecord) -> None:
        try:
            self.db.execute(
                f"INSERT INTO adapters ({ADAPTER_COLUMNS}) VALUES ({', '.join('?' * 13)})",
                (
                    r.id,
                    r.base_model,
                    r.rank,
                    json.dumps(r.target_modules),
                    json.dumps([f.model_dump() for f in r.files]),
                    r.size_bytes,
                    r.uploader,
                    r.created,
                    json.dumps(r.meta),
                    r.owner,
                    r.project,
                    int(r.public),
                    r.source_job,
                ),
            )
        except sqlite3.IntegrityError:
            raise AdapterExists(f"adapter {r.id!r} already exists") from None

    def set_meta(self, adapter_id: str, meta: dict[str, Any]) -> None:
        self.db.execute("UPDATE adapters SET meta = ? WHERE id = ?", (json.dumps(meta), adapter_id))

    def remove(self, adapter_id: str) -> bool:
        return self.db.execute("DELETE FROM adapters WHERE id = ?", (adapter_id,)).rowcount > 0

    def totals(self) -> tuple[int, int]:
        count, size = self.db.execute("SELECT COUNT(*), SUM(size_bytes) FROM adapters").fetchone()
        return count, size or 0


class DatasetRegistry:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    @staticmethod
    def _record(row: tuple[Any, ...]) -> DatasetRecord:
        data = dict(zip(DATASET_COLUMNS.split(", "), row, strict=True))
        data["dedup"] = json.loads(data["dedup"])
        return DatasetRecord.model_validate(data)

    def get(self, dataset_id: str) -> DatasetRecord | None:
        row = self.db.execute(f"SELECT {DATASET_COLUMNS} FROM datasets WHERE id = ?", (dataset_id,))
        found = row.fetchone()
        return None if found is None else self._record(found)

    def find(self, query: DatasetQuery) -> list[DatasetRecord]:
        where, args = _where(query.model_dump())
        rows = self.db.execute(
            f"SELECT {DATASET_COLUMNS} FROM datasets{where} ORDER BY name, version", args
        )
        return [self._record(r) for r in rows]

    def add(self, record: DatasetRecord) -> DatasetRecord:
        """Register ``record`` as the next version of its name; the stored record returned."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            (version,) = self.db.execute(
                "INSERT INTO dataset_versions (name, last) VALUES (?, 1) "
                "ON CONFLICT (name) DO UPDATE SET last = last + 1 RETURNING last",
                (record.name,),
            ).fetchone()
            stored = record.model_copy(update={"version": version})
            data = stored.model_dump(mode="json")
            data["dedup"] = json.dumps(data["dedup"])
            columns = DATASET_COLUMNS.split(", ")
            marks = ", ".join("?" * len(columns))
            self.db.execute(
                f"INSERT INTO datasets ({DATASET_COLUMNS}) VALUES ({marks})",
                [data[c] for c in columns],
            )
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return stored

    def remove(self, dataset_id: str) -> bool:
        return self.db.execute("DELETE FROM datasets WHERE id = ?", (dataset_id,)).rowcount > 0

    def totals(self) -> tuple[int, int]:
        count, size = self.db.execute("SELECT COUNT(*), SUM(bytes) FROM datasets").fetchone()
        return count, size or 0
