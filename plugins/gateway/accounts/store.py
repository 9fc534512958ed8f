"""The accounts' schema (written once for SQLite and PostgreSQL: database.py), the store every
concern shares (its database, lock, clock and transactions), and the checks and errors they all
use."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, ParamSpec, TypeVar

from atoll.plugins.gateway.accounts import audit_chain
from atoll.plugins.gateway.accounts.database import Args, Connection, open_database
from atoll.plugins.gateway.contract import Limits
from atoll.plugins.gateway.errors import GatewayError

P = ParamSpec("P")
T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY, admin BOOLEAN NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS projects (
    name TEXT PRIMARY KEY, labels TEXT NOT NULL, store_prompts BOOLEAN NOT NULL, limits TEXT,
    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS members (
    project TEXT NOT NULL REFERENCES projects(name), user TEXT NOT NULL REFERENCES users(name),
    role TEXT NOT NULL, PRIMARY KEY (project, user));
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY, digest BLOB NOT NULL, user TEXT NOT NULL REFERENCES users(name),
    project TEXT REFERENCES projects(name), name TEXT NOT NULL, created REAL NOT NULL,
    ttl_s REAL, expires_at REAL, revoked_at REAL, rotated_to TEXT, grace_until REAL,
    last_used REAL, limits TEXT);
CREATE TABLE IF NOT EXISTS adapters (
    id TEXT PRIMARY KEY, base_model TEXT NOT NULL, owner TEXT REFERENCES users(name),
    project TEXT REFERENCES projects(name), public BOOLEAN NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS usage (
    seq INTEGER PRIMARY KEY, request_id TEXT NOT NULL UNIQUE, at REAL NOT NULL,
    key_id TEXT NOT NULL, user TEXT NOT NULL, project TEXT, model TEXT NOT NULL, adapter TEXT,
    prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, status INTEGER NOT NULL,
    latency_ms REAL NOT NULL, prompt_text TEXT);
CREATE INDEX IF NOT EXISTS usage_at ON usage (at);
CREATE INDEX IF NOT EXISTS usage_key ON usage (key_id, at);
CREATE INDEX IF NOT EXISTS usage_project ON usage (project, at);
CREATE INDEX IF NOT EXISTS usage_user ON usage (user, at);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY, at REAL NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL,
    target TEXT NOT NULL, detail TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS audit_at ON audit (at);
"""
# Each schema version after the first, in order: the statements that bring the previous one to it.
MIGRATIONS = [
    # 2: budgets (budgets.py) and each request's cost, in nano-units of the price table's currency
    # (BIGINT: 64-bit in PostgreSQL too; SQLite's INTEGER affinity either way)
    """
    ALTER TABLE usage ADD COLUMN cost BIGINT NOT NULL DEFAULT 0;
    CREATE TABLE budgets (
        id TEXT PRIMARY KEY, scope TEXT NOT NULL, subject TEXT NOT NULL, metric TEXT NOT NULL,
        period TEXT NOT NULL, amount BIGINT NOT NULL, spent BIGINT NOT NULL,
        reserved BIGINT NOT NULL, period_start REAL NOT NULL, created REAL NOT NULL);
    CREATE INDEX budgets_subject ON budgets (subject);
    CREATE TABLE reservations (
        request_id TEXT NOT NULL, budget_id TEXT NOT NULL REFERENCES budgets(id),
        amount BIGINT NOT NULL, expires REAL NOT NULL, PRIMARY KEY (request_id, budget_id));
    CREATE INDEX reservations_expires ON reservations (expires);
    """,
    # 3: the audit log hash-chained under a signed head (audit_chain.py; the rows already there
    # are chained by ``audit_chain.start`` in the same transaction), and projects' retention
    # periods in seconds, NULL: kept (retention.py)
    """
    ALTER TABLE audit ADD COLUMN prev TEXT;
    ALTER TABLE audit ADD COLUMN hash TEXT;
    CREATE TABLE audit_head (
        id TEXT PRIMARY KEY, seq BIGINT NOT NULL, count BIGINT NOT NULL, hash TEXT NOT NULL,
        signature TEXT NOT NULL);
    CREATE TABLE retention (
        project TEXT PRIMARY KEY REFERENCES projects(name), prompts_s REAL, ledger_s REAL,
        datasets_s REAL, updated REAL NOT NULL);
    """,
    # 4: single sign-on: which Atoll user each identity provider's subject is (identities.py)
    """
    CREATE TABLE identities (
        issuer TEXT NOT NULL, subject TEXT NOT NULL, user TEXT NOT NULL REFERENCES users(name),
        created REAL NOT NULL, last_login REAL NOT NULL, PRIMARY KEY (issuer, subject));
    CREATE UNIQUE INDEX identities_user ON identities (issuer, user);
    """,
    # 5: named mixtures of adapters, called like a model (mixtures.py); ``spec`` is the mixture
    # (contract.Mixture) as JSON, ``search`` the mixture search that found it, if one did
    """
    CREATE TABLE mixtures (
        id TEXT PRIMARY KEY, base_model TEXT NOT NULL, owner TEXT NOT NULL REFERENCES users(name),
        project TEXT REFERENCES projects(name), spec TEXT NOT NULL, search TEXT,
        created REAL NOT NULL);
    """,
    # 6: what each gateway sharing the database admitted per limited key and project in the last
    # minute, so rate limits hold across them (rate_shares.py)
    """
    CREATE TABLE rate_shares (
        gateway TEXT NOT NULL, scope TEXT NOT NULL, subject TEXT NOT NULL,
        requests REAL NOT NULL, tokens REAL NOT NULL, active INTEGER NOT NULL, at REAL NOT NULL,
        PRIMARY KEY (gateway, scope, subject));
    """,
]
AUDIT_CHAINED = 3  # the schema version whose step chains the audit log
SCHEMA_VERSION = 1 + len(MIGRATIONS)
KEY_CHECK = b"atoll gateway key check"  # HMACed with the secret: which secret made the keys


class Keep:
    def __repr__(self) -> str:
        return "KEEP"


KEEP: Final = Keep()  # "leave as it is" in update_* calls, where None is a value to set


def short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_actor(actor: object) -> str:
    if not isinstance(actor, str) or not actor or len(actor) > 128:
        raise ValueError(f"actor must name who acts (1-128 characters), not {short(actor)}")
    return actor


def limits_json(limits: Limits | None) -> str | None:
    return None if limits is None else limits.model_dump_json()


def limits_from(text: str | None) -> Limits | None:
    return None if text is None else Limits.model_validate_json(text)


def not_found(kind: str, name: str) -> GatewayError:
    return GatewayError(404, f"no {kind} {name!r}", code=f"{kind}_not_found")


def exists(kind: str, name: str) -> GatewayError:
    return GatewayError(
        409, f"{kind} {name!r} already exists", "invalid_request_error", code="already_exists"
    )


def require(db: Connection, kind: str, name: str) -> None:
    """404 unless the user or project ``name`` exists."""
    table = {"user": "users", "project": "projects"}[kind]
    if not db.execute(f"SELECT 1 FROM {table} WHERE name = ?", (name,)).fetchone():
        raise not_found(kind, name)


class Store:
    """The database, its lock and the clock that each concern's methods share. ``database``: a
    SQLite file's path, or a ``postgresql://`` URL (database.py). ``secret`` keys the HMAC of
    API keys (lose it and every key is unknown) and derives the audit head's signing key
    (audit_chain.py); ``clock`` (epoch seconds) decides expiry, grace and the ledger's times."""

    def __init__(
        self, database: Path | str, secret: bytes, clock: Callable[[], float] = time.time
    ) -> None:
        if not isinstance(secret, bytes) or len(secret) < 16:
            raise ValueError("the key-hashing secret must be at least 16 bytes")
        self._secret = secret
        self._audit_key = audit_chain.signing_key(secret)
        self._clock = clock
        self._lock = threading.Lock()  # one connection; the app may also use it from threads
        # authenticate's cache (keys.py); here because _tx empties it.
        # key_id -> (the database's data_version when it was read, its row; None: unknown)
        self._keys: dict[str, tuple[int, dict[str, Any] | None]] = {}
        self._database = open_database(database)
        self._db = self._database.connection
        # A server, which other gateways may share: calls offloaded.
        self.shared = self._database.shared
        # One thread for the calls offloaded: they take the one connection's lock in turn
        # anyway, and threads queueing on it hand the GIL back and forth for nothing.
        self._worker: ThreadPoolExecutor | None = None
        with self._tx() as db:
            version = self._database.schema_version()
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"the accounts database has schema {version}, newer than this gateway's"
                )
            for step in [SCHEMA, *MIGRATIONS][version:]:  # version n has the first n steps
                for statement in step.split(";"):
                    if statement.strip():
                        db.execute(statement)
            if version < AUDIT_CHAINED:
                audit_chain.start(db, self._audit_key)
            self._database.set_schema_version(SCHEMA_VERSION)
            self._database.check_secret(hmac.new(secret, KEY_CHECK, hashlib.sha256).digest())

    def now(self) -> float:
        """The store's clock (epoch seconds): what expiry, grace and periods are decided by."""
        return self._clock()

    async def offload(self, fn: Callable[P, T], *args: P.args, **kw: P.kwargs) -> T:
        """``fn(*args, **kw)``, a call into this store from the event loop: in a worker thread
        where the database is a server (its round trips would stop the loop, and every other
        request with it, for their whole wait), inline on SQLite (cached or local: microseconds,
        less than the thread hop)."""
        if self.shared:
            if self._worker is None:
                self._worker = ThreadPoolExecutor(1, thread_name_prefix="accounts")
            call = functools.partial(fn, *args, **kw)
            return await asyncio.get_running_loop().run_in_executor(self._worker, call)
        return fn(*args, **kw)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
        with self._lock:
            self._database.close()

    @contextmanager
    def _tx(self, keys_kept: bool = False, locked: bool = True) -> Iterator[Connection]:
        """One write transaction, holding the store's write lock (database.py; unless not
        ``locked``: rows only inserted). Unless it says it changes nothing authenticate caches
        (``keys_kept``: the ledger's, a reservation, a key's last_used), it may change a key,
        user, project, membership or budget: the keys' cache goes, here and (notified at the
        commit) in every gateway sharing the database."""
        with self._lock:
            if not keys_kept:
                self._keys.clear()
            self._database.begin(locked)
            try:
                yield self._db
            except BaseException:
                self._database.rollback()
                raise
            self._database.commit(notify=not keys_kept)

    async def listen(self) -> None:
        """Hear other gateways' commits (a shared database; on the running event loop)."""
        await self._database.listen()

    async def unlisten(self) -> None:
        await self._database.unlisten()

    async def heard_all(self) -> bool:
        """Whether every commit made before this call is in the database's data_version now,
        so a cache entry read at it may answer (PostgreSQL: one round trip, shared); False:
        it may not."""
        return await self._database.heard_all()

    def _cached_key(self, key_id: str, version: int | None) -> list[dict[str, Any]] | None:
        """The key's authenticate rows as cached at ``version`` (keys.py); None when not."""
        entry = self._keys.get(key_id) if version is not None else None
        if entry is None or entry[0] != version:
            return None
        return [entry[1]] if entry[1] is not None else []

    def _unbudgeted(self, key_id: str) -> bool:
        """Whether no budget applies to the key, its user or its project, as its cached row
        says at the database's current version (a budget set or removed, a key rotated: all
        change it); False when that is not known."""
        with self._lock:
            rows = self._cached_key(key_id, self._database.data_version())
        if not rows:  # not cached at this version, or an unknown key
            return False
        return not rows[0]["budgeted"]

    def _read(self, sql: str, args: Args = ()) -> list[Any]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()
