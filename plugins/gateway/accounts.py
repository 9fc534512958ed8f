"""The gateway's accounts in one SQLite file: users, projects and roles, API keys, who may see and
use which adapter, the usage ledger (one row per request) and the audit log (one row per admin
action, written in the same transaction as the change it records).

Methods are synchronous and each runs one short statement or transaction, so the app may call them
from the event loop. Nothing is cached: a revoked key, a removed member or a changed admin flag is
seen by the very next request.

Adapter visibility (``visible_adapters``, ``check_use``): an adapter the caller may not see is
answered 404, exactly like one that does not exist, so ids of other projects do not leak; one the
caller may see but not use (a project viewer's) is answered 403.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from atoll.plugins.gateway.contract import Limits
from atoll.plugins.gateway.errors import GatewayError
from atoll.plugins.storage.contract import adapter_id_problem

SCHEMA_VERSION = 1
NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,199}")  # no ':', the API's base:adapter
LABEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}")
KEY_FORMAT = re.compile(r"atk_([0-9a-f]{8})_[A-Za-z0-9_-]{32}")
ROLES = ("owner", "member", "viewer")
USING_ROLES = ("owner", "member")  # viewers may list a project's adapters, not use them
WRITING_ROLES = USING_ROLES  # viewers read only: no uploads, jobs or deletions in the project
MAX_LABELS = 32
MAX_LABEL_VALUE = 128
MAX_TTL_S = 10 * 366 * 86400.0
MAX_GRACE_S = 30 * 86400.0
MAX_CACHED_KEYS = 10_000  # keys whose lookups authenticate keeps (emptied when full)
LAST_USED_EVERY_S = 60.0  # last_used is written at most this often per key: no write per request
KEY_ID_TRIES = 8  # 8 hex digits of public id: a collision is rare, eight in a row impossible


class _Keep:
    def __repr__(self) -> str:
        return "KEEP"


KEEP: Final = _Keep()  # "leave as it is" in update_* calls, where None is a value to set


@dataclass(frozen=True)
class Principal:
    """Who is calling, from an API key. ``admin`` only for an administrator's key with no
    project scope: a project-scoped key of an admin is a plain key of that project."""

    key_id: str
    user: str
    project: str | None
    admin: bool
    labels: dict[str, str]
    store_prompts: bool
    role: str | None = None  # the user's role in ``project`` (owner, member, viewer)


@dataclass(frozen=True)
class UserRecord:
    name: str
    admin: bool
    created: float


@dataclass(frozen=True)
class ProjectRecord:
    name: str
    labels: dict[str, str]
    store_prompts: bool
    limits: Limits | None
    created: float


@dataclass(frozen=True)
class Member:
    user: str
    role: str


@dataclass(frozen=True)
class KeyRecord:
    """An API key as listed: never its secret."""

    key_id: str
    user: str
    project: str | None
    name: str
    created: float
    expires_at: float | None
    revoked_at: float | None
    rotated_to: str | None
    grace_until: float | None  # after a rotation: when this key stops working
    last_used: float | None  # to the minute
    limits: Limits | None
    state: str  # active | revoked | rotated | expired, when it was read


@dataclass(frozen=True)
class AdapterAccess:
    id: str
    base_model: str
    owner: str | None
    project: str | None
    public: bool
    labels: dict[str, str]  # routing policy of the adapter's project; {} if none
    created: float


@dataclass(frozen=True)
class UsageTotals:
    requests: int
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class UsageRow:
    seq: int
    request_id: str
    at: float
    key_id: str
    user: str
    project: str | None
    model: str
    adapter: str | None
    prompt_tokens: int
    completion_tokens: int
    status: int
    latency_ms: float
    prompt_text: str | None


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    at: float
    actor: str
    action: str
    target: str
    detail: dict[str, Any]


SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY, admin INTEGER NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS projects (
    name TEXT PRIMARY KEY, labels TEXT NOT NULL, store_prompts INTEGER NOT NULL, limits TEXT,
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
    project TEXT REFERENCES projects(name), public INTEGER NOT NULL, created REAL NOT NULL);
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

KEY_COLS = (
    "key_id, user, project, name, created, expires_at, revoked_at, rotated_to, grace_until, "
    "last_used, limits"
)
ADAPTER_COLS = "a.id, a.base_model, a.owner, a.project, a.public, p.labels, a.created"
ADAPTER_FROM = "adapters a LEFT JOIN projects p ON p.name = a.project"
USAGE_COLS = (
    "seq, request_id, at, key_id, user, project, model, adapter, prompt_tokens, "
    "completion_tokens, status, latency_ms, prompt_text"
)
# The one visibility rule, in SQL (named parameters :scope, :admin, :user). A project-scoped key
# sees its project's and public adapters only, even an admin's key: the scope is what its holder
# asked for. Within that scope, admins see everything.
VISIBLE = """
    (:scope IS NULL OR a.public OR a.project = :scope)
    AND (:admin OR a.public OR a.owner = :user
         OR a.project IN (SELECT project FROM members WHERE user = :user))
"""


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_name(kind: str, value: object) -> str:
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise GatewayError(
            400,
            f"invalid {kind} name {_short(value)}: 1-64 characters of a-z 0-9 . _ -, "
            "starting with a letter or digit",
            param=kind,
        )
    return value


def _check_labels(labels: object) -> dict[str, str]:
    if not isinstance(labels, dict) or len(labels) > MAX_LABELS:
        raise GatewayError(400, f"labels must be a mapping of at most {MAX_LABELS} entries")
    for key, value in labels.items():
        if not isinstance(key, str) or not LABEL_KEY.fullmatch(key):
            raise GatewayError(400, f"invalid label name {_short(key)}", param="labels")
        if not isinstance(value, str) or len(value) > MAX_LABEL_VALUE or not value.isprintable():
            raise GatewayError(400, f"invalid value for label {key!r}", param="labels")
    return dict(labels)


def _check_adapter_id(value: object) -> None:
    problem = adapter_id_problem(value)  # the platform's one adapter-id rule (storage, nodes)
    if problem:
        raise GatewayError(400, problem, param="id")


def _check_base_model(value: object) -> str:
    if not isinstance(value, str) or not MODEL_ID.fullmatch(value):
        raise GatewayError(
            400,
            f"base model {_short(value)} must be 1-200 characters of letters, digits and ._/-",
            param="base_model",
        )
    return value


def _check_actor(actor: object) -> str:
    if not isinstance(actor, str) or not actor or len(actor) > 128:
        raise ValueError(f"actor must name who acts (1-128 characters), not {_short(actor)}")
    return actor


def _limits_json(limits: Limits | None) -> str | None:
    return None if limits is None else limits.model_dump_json()


def _limits(text: str | None) -> Limits | None:
    return None if text is None else Limits.model_validate_json(text)


def _key_state(
    revoked_at: float | None, grace_until: float | None, expires_at: float | None, now: float
) -> str:
    if revoked_at is not None:
        return "revoked"
    if grace_until is not None and now >= grace_until:
        return "rotated"
    if expires_at is not None and now >= expires_at:
        return "expired"
    return "active"


def _not_found(kind: str, name: str) -> GatewayError:
    return GatewayError(404, f"no {kind} {name!r}", code=f"{kind}_not_found")


def _exists(kind: str, name: str) -> GatewayError:
    return GatewayError(
        409, f"{kind} {name!r} already exists", "invalid_request_error", code="already_exists"
    )


def policy_labels(principal: Principal, *adapters: AdapterAccess) -> dict[str, str]:
    """Labels a node must carry to serve a request: the policy of the key's project and of each
    used adapter's project (a phi project's adapter stays on phi nodes whoever calls it)."""
    merged = dict(principal.labels)
    for access in adapters:
        for key, value in access.labels.items():
            if merged.setdefault(key, value) != value:
                raise GatewayError(
                    400,
                    f"routing policies conflict: label {key!r} must be both {merged[key]!r} and "
                    f"{value!r} (adapter {access.id!r})",
                    code="policy_conflict",
                )
    return merged


class Accounts:
    """The store. ``secret`` keys the HMAC of API keys (lose it and every key is unknown);
    ``clock`` (epoch seconds) decides expiry, grace and the ledger's times."""

    def __init__(self, path: Path, secret: bytes, clock: Callable[[], float] = time.time) -> None:
        if not isinstance(secret, bytes) or len(secret) < 16:
            raise ValueError("the key-hashing secret must be at least 16 bytes")
        self._secret = secret
        self._clock = clock
        self._lock = threading.Lock()  # one connection; the app may also use it from threads
        self._keys: dict[str, dict[str, Any] | None] = {}  # key_id -> its row; None: unknown
        self._keys_version = -1  # PRAGMA data_version the cache was filled at
        # The file holds key digests and maybe prompts: owner-only from the start (its -wal and
        # -shm files take the same mode).
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row  # rows by position or by column name
        self._db.execute("PRAGMA busy_timeout = 5000")  # another process may hold the write lock
        self._db.execute("PRAGMA journal_mode = WAL")
        # WAL + NORMAL: a commit survives the process dying, with no fsync per request.
        self._db.execute("PRAGMA synchronous = NORMAL")
        self._db.execute("PRAGMA foreign_keys = ON")
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"{path} has schema {version}, newer than this gateway's")
        with self._tx() as db:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self, ledger: bool = False) -> Iterator[sqlite3.Connection]:
        """One write transaction; IMMEDIATE takes the write lock up front, so two processes on
        the file never deadlock upgrading read locks. Any but the ledger's (``ledger``) may
        change a key, user, project or membership: the keys' cache goes."""
        with self._lock:
            if not ledger:
                self._keys.clear()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _key_rows(self, key_id: str) -> list[dict[str, Any]]:
        """What authenticate needs of a key, from a cache that every write here (but the
        ledger's) empties, and any commit by another connection to the file (SQLite's
        data_version): a revocation or a membership change counts from the next request on."""
        with self._lock:
            (version,) = self._db.execute("PRAGMA data_version").fetchone()
            if version != self._keys_version:
                self._keys.clear()
                self._keys_version = version
            # Unknown ids are remembered like known ones (in the same bounded map), so a lookup
            # takes the same path and time whether the id exists or not.
            if key_id in self._keys:
                cached = self._keys[key_id]
                return [cached] if cached is not None else []
            rows = self._db.execute(
                "SELECT k.digest, k.user, k.project, k.expires_at, k.revoked_at, k.rotated_to, "
                "k.grace_until, k.last_used, u.admin, p.labels, p.store_prompts, m.role "
                "FROM api_keys k JOIN users u ON u.name = k.user "
                "LEFT JOIN projects p ON p.name = k.project "
                "LEFT JOIN members m ON m.project = k.project AND m.user = k.user "
                "WHERE k.key_id = ?",
                (key_id,),
            ).fetchall()
            if len(self._keys) >= MAX_CACHED_KEYS:  # bounded: unknown ids cannot fill memory
                self._keys.clear()
            self._keys[key_id] = dict(rows[0]) if rows else None
            return [dict(r) for r in rows]

    def _read(self, sql: str, args: tuple[Any, ...] | dict[str, Any] = ()) -> list[Any]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    @staticmethod
    def _write_audit(
        db: sqlite3.Connection, at: float, actor: str, action: str, target: str, detail: dict
    ) -> None:
        db.execute(
            "INSERT INTO audit (at, actor, action, target, detail) VALUES (?, ?, ?, ?, ?)",
            (at, actor, action, target, json.dumps(detail, sort_keys=True)),
        )

    # --- users and projects ---------------------------------------------------------------

    def create_user(self, name: str, admin: bool = False, *, actor: str) -> UserRecord:
        _check_name("user", name)
        _check_actor(actor)
        now = self._clock()
        with self._tx() as db:
            if db.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone():
                raise _exists("user", name)
            db.execute("INSERT INTO users VALUES (?, ?, ?)", (name, bool(admin), now))
            self._write_audit(db, now, actor, "user.create", name, {"admin": bool(admin)})
        return UserRecord(name, bool(admin), now)

    def list_users(self) -> list[UserRecord]:
        rows = self._read("SELECT name, admin, created FROM users ORDER BY name")
        return [UserRecord(n, bool(a), c) for n, a, c in rows]

    def set_admin(self, name: str, admin: bool, *, actor: str) -> None:
        _check_actor(actor)
        now = self._clock()
        with self._tx() as db:
            cur = db.execute("UPDATE users SET admin = ? WHERE name = ?", (bool(admin), name))
            if cur.rowcount == 0:
                raise _not_found("user", name)
            self._write_audit(db, now, actor, "user.set_admin", name, {"admin": bool(admin)})

    def create_project(
        self,
        name: str,
        labels: dict[str, str] | None = None,
        store_prompts: bool = False,
        limits: Limits | None = None,
        *,
        actor: str,
    ) -> ProjectRecord:
        _check_name("project", name)
        labels = _check_labels(labels or {})
        _check_actor(actor)
        now = self._clock()
        with self._tx() as db:
            if db.execute("SELECT 1 FROM projects WHERE name = ?", (name,)).fetchone():
                raise _exists("project", name)
            db.execute(
                "INSERT INTO projects VALUES (?, ?, ?, ?, ?)",
                (name, json.dumps(labels), bool(store_prompts), _limits_json(limits), now),
            )
            detail = {
                "labels": labels,
                "store_prompts": bool(store_prompts),
                "limits": None if limits is None else limits.model_dump(),
            }
            self._write_audit(db, now, actor, "project.create", name, detail)
        return ProjectRecord(name, labels, bool(store_prompts), limits, now)

    def update_project(
        self,
        name: str,
        *,
        actor: str,
        labels: dict[str, str] | _Keep = KEEP,
        store_prompts: bool | _Keep = KEEP,
        limits: Limits | _Keep | None = KEEP,
    ) -> ProjectRecord:
        """Change what is given; ``limits=None`` removes the project's limits."""
        _check_actor(actor)
        changes: dict[str, Any] = {}  # column -> stored value
        detail: dict[str, Any] = {}
        if not isinstance(labels, _Keep):
            detail["labels"] = _check_labels(labels)
            changes["labels"] = json.dumps(detail["labels"])
        if not isinstance(store_prompts, _Keep):
            detail["store_prompts"] = changes["store_prompts"] = bool(store_prompts)
        if not isinstance(limits, _Keep):
            detail["limits"] = None if limits is None else limits.model_dump()
            changes["limits"] = _limits_json(limits)
        if not changes:
            raise GatewayError(400, "nothing to update")
        now = self._clock()
        with self._tx() as db:
            sets = ", ".join(f"{column} = ?" for column in changes)
            cur = db.execute(
                f"UPDATE projects SET {sets} WHERE name = ?", (*changes.values(), name)
            )
            if cur.rowcount == 0:
                raise _not_found("project", name)
            self._write_audit(db, now, actor, "project.update", name, detail)
            row = db.execute(
                "SELECT name, labels, store_prompts, limits, created FROM projects WHERE name = ?",
                (name,),
            ).fetchone()
        return self._project(row)

    @staticmethod
    def _project(row: sqlite3.Row) -> ProjectRecord:
        name, labels, store_prompts, limits, created = row
        return ProjectRecord(
            name, json.loads(labels), bool(store_prompts), _limits(limits), created
        )

    def list_projects(self) -> list[ProjectRecord]:
        rows = self._read(
            "SELECT name, labels, store_prompts, limits, created FROM projects ORDER BY name"
        )
        return [self._project(r) for r in rows]

    def add_member(self, project: str, user: str, role: str, *, actor: str) -> None:
        """Add ``user`` to ``project`` with ``role``, or change the role of a member."""
        if role not in ROLES:
            raise GatewayError(400, f"role must be one of {', '.join(ROLES)}", param="role")
        _check_actor(actor)
        now = self._clock()
        with self._tx() as db:
            self._require(db, "project", project)
            self._require(db, "user", user)
            db.execute(
                "INSERT INTO members VALUES (?, ?, ?) "
                "ON CONFLICT (project, user) DO UPDATE SET role = excluded.role",
                (project, user, role),
            )
            detail = {"user": user, "role": role}
            self._write_audit(db, now, actor, "member.add", project, detail)

    def remove_member(self, project: str, user: str, *, actor: str) -> None:
        _check_actor(actor)
        now = self._clock()
        with self._tx() as db:
            cur = db.execute("DELETE FROM members WHERE project = ? AND user = ?", (project, user))
            if cur.rowcount == 0:
                raise GatewayError(
                    404, f"{user!r} is not a member of project {project!r}", code="not_a_member"
                )
            self._write_audit(db, now, actor, "member.remove", project, {"user": user})

    def members(self, project: str) -> list[Member]:
        if not self._read("SELECT 1 FROM projects WHERE name = ?", (project,)):
            raise _not_found("project", project)
        rows = self._read(
            "SELECT user, role FROM members WHERE project = ? ORDER BY user", (project,)
        )
        return [Member(u, r) for u, r in rows]

    def limits_for(self, principal: Principal) -> tuple[Limits | None, Limits | None]:
        """(the key's limits, its project's limits) for the RateLimiter."""
        rows = self._read(
            "SELECT k.limits, p.limits FROM api_keys k "
            "LEFT JOIN projects p ON p.name = k.project WHERE k.key_id = ?",
            (principal.key_id,),
        )
        if not rows:
            raise _not_found("key", principal.key_id)
        return _limits(rows[0][0]), _limits(rows[0][1])

    @staticmethod
    def _require(db: sqlite3.Connection, kind: str, name: str) -> None:
        table = {"user": "users", "project": "projects"}[kind]
        if not db.execute(f"SELECT 1 FROM {table} WHERE name = ?", (name,)).fetchone():
            raise _not_found(kind, name)

    # --- API keys -------------------------------------------------------------------------

    def _digest(self, plaintext: str) -> bytes:
        return hmac.new(self._secret, plaintext.encode(), hashlib.sha256).digest()

    @staticmethod
    def _key(row: sqlite3.Row, now: float) -> KeyRecord:
        state = _key_state(row["revoked_at"], row["grace_until"], row["expires_at"], now)
        return KeyRecord(*row[:10], _limits(row["limits"]), state)

    def _insert_key(
        self,
        db: sqlite3.Connection,
        user: str,
        project: str | None,
        name: str,
        ttl_s: float | None,
        limits: Limits | None,
        now: float,
    ) -> tuple[KeyRecord, str]:
        self._require(db, "user", user)
        if project is not None:
            self._require(db, "project", project)
            member = db.execute(
                "SELECT 1 FROM members WHERE project = ? AND user = ?", (project, user)
            ).fetchone()
            if member is None:
                raise GatewayError(
                    400,
                    f"a key for project {project!r} needs {user!r} to be a member of it",
                    code="not_a_member",
                )
        for _ in range(KEY_ID_TRIES):
            public = secrets.token_hex(4)
            key_id = f"k_{public}"
            if not db.execute("SELECT 1 FROM api_keys WHERE key_id = ?", (key_id,)).fetchone():
                break
        else:
            raise RuntimeError("no free key id found")  # 2^32 ids: only a broken RNG gets here
        plaintext = f"atk_{public}_{secrets.token_urlsafe(24)}"
        expires = None if ttl_s is None else now + ttl_s
        digest, stored = self._digest(plaintext), _limits_json(limits)
        db.execute(
            "INSERT INTO api_keys (key_id, digest, user, project, name, created, ttl_s, "
            "expires_at, limits) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (key_id, digest, user, project, name, now, ttl_s, expires, stored),
        )
        record = KeyRecord(
            key_id, user, project, name, now, expires, None, None, None, None, limits, "active"
        )
        return record, plaintext

    def create_key(
        self,
        user: str,
        project: str | None = None,
        name: str = "",
        ttl_s: float | None = None,
        limits: Limits | None = None,
        *,
        actor: str,
    ) -> tuple[KeyRecord, str]:
        """A new key and its plaintext, which is shown this once and stored only as a digest."""
        if not isinstance(name, str) or len(name) > 100 or not name.isprintable():
            raise GatewayError(
                400, "a key's name is at most 100 printable characters", param="name"
            )
        if ttl_s is not None and not (0 < ttl_s <= MAX_TTL_S):
            raise GatewayError(
                400, f"ttl_s must be between 0 and {MAX_TTL_S:.0f} seconds", param="ttl_s"
            )
        _check_actor(actor)
        now = self._clock()
        with self._tx() as db:
            record, plaintext = self._insert_key(db, user, project, name, ttl_s, limits, now)
            detail = {"user": user, "project": project, "name": name, "ttl_s": ttl_s}
            self._write_audit(db, now, actor, "key.create", record.key_id, detail)
        return record, plaintext

    def list_keys(self, user: str | None = None, project: str | None = None) -> list[KeyRecord]:
        now = self._clock()
        rows = self._read(
            f"SELECT {KEY_COLS} FROM api_keys WHERE (:user IS NULL OR user = :user) "
            "AND (:project IS NULL OR project = :project) ORDER BY created, key_id",
            {"user": user, "project": project},
        )
        return [self._key(r, now) for r in rows]

    def revoke_key(self, key_id: str, *, actor: str) -> KeyRecord:
        """Refuse the key from the next request on. Revoking a revoked key changes nothing."""
        _check_actor(actor)
        now = self._clock()
        with self._tx() as db:
            cur = db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                (now, key_id),
            )
            if cur.rowcount:
                self._write_audit(db, now, actor, "key.revoke", key_id, {})
            row = db.execute(f"SELECT {KEY_COLS} FROM api_keys WHERE key_id = ?", (key_id,))
            found = row.fetchone()
            if found is None:
                raise _not_found("key", key_id)
        return self._key(found, now)

    def rotate_key(
        self, key_id: str, grace_s: float = 3600, *, actor: str
    ) -> tuple[KeyRecord, str]:
        """A new key for the same user, project, name, limits and lifetime; the old key keeps
        working for ``grace_s`` seconds (0: not at all), then is refused as rotated out."""
        if not (0 <= grace_s <= MAX_GRACE_S):
            raise GatewayError(
                400, f"grace_s must be between 0 and {MAX_GRACE_S:.0f} seconds", param="grace_s"
            )
        _check_actor(actor)
        now = self._clock()
        with self._tx() as db:
            row = db.execute(
                f"SELECT {KEY_COLS}, ttl_s FROM api_keys WHERE key_id = ?", (key_id,)
            ).fetchone()
            if row is None:
                raise _not_found("key", key_id)
            old, ttl_s = self._key(row, now), row["ttl_s"]
            if old.rotated_to is not None:
                raise GatewayError(400, f"key {key_id} was already rotated to {old.rotated_to}")
            if old.state != "active":
                raise GatewayError(400, f"key {key_id} is {old.state}: only an active key rotates")
            record, plaintext = self._insert_key(
                db, old.user, old.project, old.name, ttl_s, old.limits, now
            )
            db.execute(
                "UPDATE api_keys SET rotated_to = ?, grace_until = ? WHERE key_id = ?",
                (record.key_id, now + grace_s, key_id),
            )
            detail = {"new_key": record.key_id, "grace_s": grace_s}
            self._write_audit(db, now, actor, "key.rotate", key_id, detail)
        return record, plaintext

    def authenticate(self, plaintext: str) -> Principal:
        """Who holds this key, or GatewayError 401 saying why not (403 for a project-scoped key
        whose user has left the project)."""
        found = KEY_FORMAT.fullmatch(plaintext) if isinstance(plaintext, str) else None
        if found is None:
            raise GatewayError(
                401, "malformed API key: expected atk_<id>_<secret>", code="invalid_api_key"
            )
        key_id = f"k_{found.group(1)}"
        digest = self._digest(plaintext)
        rows = self._key_rows(key_id)
        # Compared in constant time, and against a dummy when the id is unknown, so neither
        # timing nor message tells an attacker that a public id exists.
        stored = rows[0]["digest"] if rows else bytes(len(digest))
        if not hmac.compare_digest(stored, digest) or not rows:
            raise GatewayError(401, "unknown API key", code="invalid_api_key")
        row, now = rows[0], self._clock()
        user, project = row["user"], row["project"]
        state = _key_state(row["revoked_at"], row["grace_until"], row["expires_at"], now)
        if state == "revoked":
            raise GatewayError(401, f"API key {key_id} was revoked", code="key_revoked")
        if state == "rotated":
            raise GatewayError(
                401,
                f"API key {key_id} was rotated out (replaced by {row['rotated_to']}; its grace "
                "period ended)",
                code="key_rotated",
            )
        if state == "expired":
            raise GatewayError(401, f"API key {key_id} expired", code="key_expired")
        if project is not None and row["role"] is None:
            raise GatewayError(
                403,
                f"API key {key_id} is for project {project!r}, which {user!r} no longer belongs to",
                code="not_a_member",
            )
        if row["last_used"] is None or now - row["last_used"] >= LAST_USED_EVERY_S:
            with self._tx() as db:
                db.execute("UPDATE api_keys SET last_used = ? WHERE key_id = ?", (now, key_id))
        return Principal(
            key_id=key_id,
            user=user,
            project=project,
            admin=bool(row["admin"]) and project is None,
            labels=json.loads(row["labels"]) if row["labels"] else {},
            store_prompts=bool(row["store_prompts"]),
            role=row["role"],
        )

    # --- adapter access registry ----------------------------------------------------------

    @staticmethod
    def _adapter(row: sqlite3.Row) -> AdapterAccess:
        adapter_id, base, owner, project, public, labels, created = tuple(row)[:7]
        labels_map = json.loads(labels) if labels else {}
        return AdapterAccess(adapter_id, base, owner, project, bool(public), labels_map, created)

    @classmethod
    def _check_holder(
        cls, db: sqlite3.Connection, owner: str | None, project: str | None, public: bool
    ) -> None:
        if owner is not None and project is not None:
            raise GatewayError(400, "an adapter belongs to a user or to a project, not both")
        if owner is None and project is None and not public:
            raise GatewayError(400, "an adapter needs an owner, a project, or public=True")
        if owner is not None:
            cls._require(db, "user", owner)
        if project is not None:
            cls._require(db, "project", project)

    def register_adapter(
        self,
        id: str,
        base_model: str,
        owner: str | None = None,
        project: str | None = None,
        public: bool = False,
        *,
        actor: str,
    ) -> AdapterAccess:
        _check_adapter_id(id)
        _check_base_model(base_model)
        _check_actor(actor)
        now = self._clock()
        with self._tx() as db:
            self._check_holder(db, owner, project, public)
            if db.execute("SELECT 1 FROM adapters WHERE id = ?", (id,)).fetchone():
                raise _exists("adapter", id)
            db.execute(
                "INSERT INTO adapters VALUES (?, ?, ?, ?, ?, ?)",
                (id, base_model, owner, project, bool(public), now),
            )
            detail = {
                "base_model": base_model,
                "owner": owner,
                "project": project,
                "public": bool(public),
            }
            self._write_audit(db, now, actor, "adapter.register", id, detail)
            row = db.execute(f"SELECT {ADAPTER_COLS} FROM {ADAPTER_FROM} WHERE a.id = ?", (id,))
            return self._adapter(row.fetchone())

    def update_adapter(
        self,
        id: str,
        *,
        actor: str,
        base_model: str | _Keep = KEEP,
        owner: str | _Keep | None = KEEP,
        project: str | _Keep | None = KEEP,
        public: bool | _Keep = KEEP,
    ) -> AdapterAccess:
        """Change what is given; moving an adapter from a user to a project takes
        ``owner=None, project=...``."""
        _check_actor(actor)
        changes: dict[str, Any] = {}
        if not isinstance(base_model, _Keep):
            changes["base_model"] = _check_base_model(base_model)
        if not isinstance(owner, _Keep):
            changes["owner"] = owner
        if not isinstance(project, _Keep):
            changes["project"] = project
        if not isinstance(public, _Keep):
            changes["public"] = bool(public)
        if not changes:
            raise GatewayError(400, "nothing to update")
        now = self._clock()
        with self._tx() as db:
            row = db.execute("SELECT owner, project, public FROM adapters WHERE id = ?", (id,))
            found = row.fetchone()
            if found is None:
                raise _not_found("adapter", id)
            after = dict(zip(("owner", "project", "public"), found, strict=True)) | changes
            self._check_holder(db, after["owner"], after["project"], bool(after["public"]))
            sets = ", ".join(f"{column} = ?" for column in changes)
            db.execute(f"UPDATE adapters SET {sets} WHERE id = ?", (*changes.values(), id))
            self._write_audit(db, now, actor, "adapter.update", id, changes)
            row = db.execute(f"SELECT {ADAPTER_COLS} FROM {ADAPTER_FROM} WHERE a.id = ?", (id,))
            return self._adapter(row.fetchone())

    def unregister_adapter(self, id: str, *, actor: str) -> None:
        _check_actor(actor)
        now = self._clock()
        with self._tx() as db:
            if db.execute("DELETE FROM adapters WHERE id = ?", (id,)).rowcount == 0:
                raise _not_found("adapter", id)
            self._write_audit(db, now, actor, "adapter.unregister", id, {})

    def adapter(self, id: str) -> AdapterAccess | None:
        rows = self._read(f"SELECT {ADAPTER_COLS} FROM {ADAPTER_FROM} WHERE a.id = ?", (id,))
        return self._adapter(rows[0]) if rows else None

    def list_adapters(self) -> list[AdapterAccess]:
        """Every registered adapter (for admins)."""
        rows = self._read(f"SELECT {ADAPTER_COLS} FROM {ADAPTER_FROM} ORDER BY a.id", ())
        return [self._adapter(r) for r in rows]

    @staticmethod
    def _who(principal: Principal) -> dict[str, Any]:
        return {"scope": principal.project, "admin": principal.admin, "user": principal.user}

    def visible_adapters(self, principal: Principal) -> list[AdapterAccess]:
        """What ``/v1/models`` shows this caller (usable or, for a viewer, only listable)."""
        rows = self._read(
            f"SELECT {ADAPTER_COLS} FROM {ADAPTER_FROM} WHERE {VISIBLE} ORDER BY a.id",
            self._who(principal),
        )
        return [self._adapter(r) for r in rows]

    def check_use(self, principal: Principal, adapter_id: str) -> AdapterAccess:
        """The adapter if this caller may use it; 404 if it is unknown or invisible to them, 403
        if they may only see it."""
        rows = self._read(
            f"SELECT {ADAPTER_COLS}, (SELECT role FROM members m WHERE m.project = a.project "
            f"AND m.user = :user) FROM {ADAPTER_FROM} WHERE a.id = :id AND {VISIBLE}",
            self._who(principal) | {"id": adapter_id},
        )
        if not rows:
            raise GatewayError(
                404,
                f"the model {adapter_id!r} does not exist or you do not have access to it",
                code="model_not_found",
                param="model",
            )
        access, role = self._adapter(rows[0]), rows[0][-1]
        if principal.admin or access.public or access.owner == principal.user:
            return access
        if role in USING_ROLES:
            return access
        raise GatewayError(
            403,
            f"{principal.user!r} is a {role} of project {access.project!r}: its adapters may be "
            "listed, not used",
            code="permission_denied",
            param="model",
        )

    # --- usage ledger and audit log -------------------------------------------------------

    def usage_row(
        self,
        principal: Principal,
        request_id: str,
        model: str,
        adapter: str | None,
        prompt_tokens: int,
        completion_tokens: int,
        status: int,
        latency_ms: float,
        prompt_text: str | None = None,
    ) -> tuple[Any, ...]:
        """One request's ledger row, checked. ``status`` is the HTTP status the caller got (a
        stream that failed after its 200 records the error's status; a client that went away,
        499). The prompt text is kept only for a project that opted in."""
        if not isinstance(request_id, str) or not 0 < len(request_id) <= 128:
            raise ValueError("request_id must be 1-128 characters")
        if any(type(n) is not int or n < 0 for n in (prompt_tokens, completion_tokens)):
            raise ValueError(
                f"token counts must be non-negative integers, not {prompt_tokens!r} and "
                f"{completion_tokens!r}"
            )
        if type(status) is not int or not 100 <= status <= 599:
            raise ValueError(f"status must be an HTTP status, not {status!r}")
        if not latency_ms >= 0:
            raise ValueError(f"latency_ms must be non-negative, not {latency_ms!r}")
        kept = prompt_text if principal.store_prompts else None
        who = (principal.key_id, principal.user, principal.project)
        counts = (prompt_tokens, completion_tokens, status, float(latency_ms))
        return (request_id, self._clock(), *who, model, adapter, *counts, kept)

    def insert_usage(self, rows: list[tuple[Any, ...]]) -> list[ValueError | None]:
        """``rows`` (from usage_row) in one transaction; if one clashes with a request already
        in the ledger, each in its own. Per row: None, or why it was refused."""
        sql = f"INSERT INTO usage ({USAGE_COLS}) VALUES (NULL, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        try:
            with self._tx(ledger=True) as db:
                db.executemany(sql, rows)
            return [None] * len(rows)
        except sqlite3.IntegrityError:
            if len(rows) == 1:
                return [ValueError(f"request {rows[0][0]!r} is already in the ledger")]
        return [self.insert_usage([row])[0] for row in rows]

    @staticmethod
    def _usage_where(
        key_id: str | None, project: str | None, user: str | None, since: float | None
    ) -> tuple[str, dict[str, Any]]:
        where = (
            "(:key_id IS NULL OR key_id = :key_id) AND (:project IS NULL OR project = :project) "
            "AND (:user IS NULL OR user = :user) AND (:since IS NULL OR at >= :since)"
        )
        return where, {"key_id": key_id, "project": project, "user": user, "since": since}

    def usage(
        self,
        key_id: str | None = None,
        project: str | None = None,
        user: str | None = None,
        since: float | None = None,
    ) -> UsageTotals:
        """Totals of the ledger rows matching every filter given (a project: its keys' rows)."""
        where, args = self._usage_where(key_id, project, user, since)
        ((requests, prompt, completion),) = self._read(
            "SELECT COUNT(*), COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0)"
            f" FROM usage WHERE {where}",
            args,
        )
        return UsageTotals(requests, prompt, completion)

    def usage_rows(
        self,
        key_id: str | None = None,
        project: str | None = None,
        user: str | None = None,
        since: float | None = None,
        after: int = 0,
        limit: int = 1000,
    ) -> list[UsageRow]:
        """Ledger rows in order, for export: page on with ``after`` = the last row's seq."""
        if not 1 <= limit <= 100_000:
            raise GatewayError(400, "limit must be between 1 and 100000", param="limit")
        where, args = self._usage_where(key_id, project, user, since)
        rows = self._read(
            f"SELECT {USAGE_COLS} FROM usage WHERE {where} AND seq > :after "
            "ORDER BY seq LIMIT :limit",
            args | {"after": after, "limit": limit},
        )
        return [UsageRow(*r) for r in rows]

    def audit(self, actor: str, action: str, target: str, detail: dict[str, Any]) -> None:
        """An admin action done outside this store (the app's own), in the same log."""
        _check_actor(actor)
        if not isinstance(action, str) or not 0 < len(action) <= 64:
            raise ValueError("action must be 1-64 characters")
        if not isinstance(target, str) or len(target) > 256:
            raise ValueError("target must be at most 256 characters")
        now = self._clock()
        with self._tx() as db:
            self._write_audit(db, now, actor, action, target, detail)

    def audit_log(self, limit: int = 100, since: float | None = None) -> list[AuditEntry]:
        """The newest ``limit`` entries (at or after ``since``), newest first."""
        if not 1 <= limit <= 10_000:
            raise GatewayError(400, "limit must be between 1 and 10000", param="limit")
        rows = self._read(
            "SELECT seq, at, actor, action, target, detail FROM audit "
            "WHERE (:since IS NULL OR at >= :since) ORDER BY seq DESC LIMIT :limit",
            {"since": since, "limit": limit},
        )
        return [AuditEntry(s, at, a, act, t, json.loads(d)) for s, at, a, act, t, d in rows]
