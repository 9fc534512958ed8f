"""Where the accounts are kept: a SQLite file (one gateway's) or a PostgreSQL database (shared by
gateways), behind one connection shape every concern writes against: ``db.execute(sql, args)``
with ``?`` or ``:name`` placeholders, rows by position or by column name, one ``IntegrityError``.

SQL is written once, in what both dialects speak: SQLite's spelling of the schema's types (in
capitals), ``INSERT ... ON CONFLICT`` rather than ``INSERT OR IGNORE``/``REPLACE``, true/false
columns declared BOOLEAN (SQLite keeps 0/1), an ``INTEGER PRIMARY KEY`` left out of an INSERT
(never given NULL), ``NULLS FIRST``/``LAST`` where a nullable column is ordered by; postgres.py
translates the rest and refuses SQLite-only statements. A write transaction holds the whole
store's write lock in both (SQLite's ``BEGIN IMMEDIATE``, a PostgreSQL advisory lock), so a
check and the write it guards (a budget's reservation, a name's uniqueness) never interleave
with another writer's.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

Args = tuple[Any, ...] | dict[str, Any]
# The one error a broken constraint raises, in either dialect (PostgreSQL's is translated).
IntegrityError = sqlite3.IntegrityError


class Row(Protocol):
    """A row as sqlite3.Row has it: by position, by column name, and ``keys()``."""

    def __getitem__(self, key: int | str, /) -> Any: ...
    def __iter__(self) -> Iterator[Any]: ...
    def __len__(self) -> int: ...
    def keys(self) -> list[str]: ...


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...


class Connection(Protocol):
    def execute(self, sql: str, args: Args = (), /) -> Cursor: ...
    def executemany(self, sql: str, rows: Iterable[Args], /) -> Cursor: ...


class Database(Protocol):
    """A dialect: its connection, write transactions, and where it keeps the schema's version."""

    # A server that other gateways may share: its calls are round trips, made off the loop.
    shared: bool

    @property
    def connection(self) -> Connection: ...

    def begin(self, lock: bool = True) -> None:
        """Start a write transaction holding the store's write lock (waiting for it); without
        ``lock``, one that only inserts rows nobody checks before writing (the ledger's, where
        no budget applies), which need not wait for other gateways' checks."""

    def commit(self, notify: bool = True) -> None:
        """Commit; ``notify``: tell the other connections' data_version (SQLite's always
        moves; PostgreSQL's gateways are notified, unless the write changed nothing cached)."""

    def rollback(self) -> None: ...

    def schema_version(self) -> int:
        """The schema's version (0: none yet), in a write transaction."""

    def set_schema_version(self, version: int) -> None: ...

    def check_secret(self, check: bytes) -> None:
        """Refuse a key-hashing secret other than the one the store's keys were made with
        (``check`` is derived from it), where several gateways share the store."""

    def data_version(self) -> int | None:
        """A number that changes whenever another connection commits (told without a round
        trip); None while that cannot be told, so nothing may be cached."""

    async def listen(self) -> None:
        """Start hearing other connections' commits, on the running event loop."""

    async def unlisten(self) -> None: ...

    async def heard_all(self) -> bool:
        """Whether every commit made before this call is in data_version now; False while that
        cannot be known, so nothing may be taken from a cache."""

    def close(self) -> None: ...


class SqliteDatabase:
    """One gateway's file. WAL, so readers never wait for the writer."""

    shared = False

    def __init__(self, path: Path) -> None:
        # The file holds key digests and maybe prompts: owner-only from the start (its -wal and
        # -shm files take the same mode).
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA busy_timeout = 5000")  # another process may hold the write lock
        db.execute("PRAGMA journal_mode = WAL")
        # WAL + NORMAL: a commit survives the process dying, with no fsync per request.
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute("PRAGMA foreign_keys = ON")
        self._db = self.connection = db

    def begin(self, lock: bool = True) -> None:
        # IMMEDIATE takes the write lock up front: two processes on the file never deadlock
        # upgrading read locks. (Without ``lock`` the first statement writes: no upgrade.)
        self._db.execute("BEGIN IMMEDIATE" if lock else "BEGIN")

    def commit(self, notify: bool = True) -> None:
        self._db.execute("COMMIT")  # other connections' data_version moves on its own

    def rollback(self) -> None:
        self._db.execute("ROLLBACK")

    def schema_version(self) -> int:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        return int(version)

    def set_schema_version(self, version: int) -> None:
        self._db.execute(f"PRAGMA user_version = {int(version)}")

    def check_secret(self, check: bytes) -> None:
        """Nothing to check: the file is one gateway's, beside its secret."""

    def data_version(self) -> int:
        (version,) = self._db.execute("PRAGMA data_version").fetchone()
        return int(version)

    # The file's data_version is always there and exact: nothing to listen on or wait for.
    async def listen(self) -> None:
        pass

    async def unlisten(self) -> None:
        pass

    async def heard_all(self) -> bool:
        return True

    def close(self) -> None:
        self._db.close()


def open_database(target: Path | str) -> Database:
    """A path: that SQLite file. A string: a ``postgresql://`` URL."""
    if isinstance(target, Path):
        return SqliteDatabase(target)
    from atoll.plugins.gateway.accounts.postgres import PostgresDatabase  # psycopg: only here

    return PostgresDatabase(target)
