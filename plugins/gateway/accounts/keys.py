"""API keys: minted, listed, revoked and rotated, stored only as an HMAC digest; ``authenticate``
turns a key into the ``Principal`` a request acts as, and ``limits_for`` into its limits."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from atoll.plugins.gateway.accounts.audit import write_audit
from atoll.plugins.gateway.accounts.budgets import move_key_budgets
from atoll.plugins.gateway.accounts.database import Connection, Row
from atoll.plugins.gateway.accounts.store import (
    Store,
    check_actor,
    limits_from,
    limits_json,
    not_found,
    require,
)
from atoll.plugins.gateway.contract import Limits
from atoll.plugins.gateway.errors import GatewayError

KEY_FORMAT = re.compile(r"atk_([0-9a-f]{8})_[A-Za-z0-9_-]{32}")
MAX_TTL_S = 10 * 366 * 86400.0
MAX_GRACE_S = 30 * 86400.0
MAX_CACHED_KEYS = 10_000  # keys whose lookups authenticate keeps (emptied when full)
LAST_USED_EVERY_S = 60.0  # last_used is written at most this often per key: no write per request
KEY_ID_TRIES = 8  # 8 hex digits of public id: a collision is rare, eight in a row impossible
KEY_FIELDS = (  # a KeyRecord's columns, as stored
    "key_id", "user", "project", "name", "created", "expires_at", "revoked_at", "rotated_to",
    "grace_until", "last_used",
)  # fmt: skip
KEY_COLS = ", ".join((*KEY_FIELDS, "limits"))


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
    # The key's and its project's limits (JSON) as authenticate read them: the rate limiter's
    # for this request, with no second lookup (a round trip each request on PostgreSQL).
    limits: tuple[str | None, str | None] = field(default=(None, None), compare=False)
    # Whether any budget applies to the key, its user or project, as authenticate read it: a
    # request with none is reserved nothing, with no second lookup.
    budgeted: bool = field(default=True, compare=False)


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


def _key(row: Row, now: float) -> KeyRecord:
    state = _key_state(row["revoked_at"], row["grace_until"], row["expires_at"], now)
    stored = {name: row[name] for name in KEY_FIELDS}
    return KeyRecord(**stored, limits=limits_from(row["limits"]), state=state)


class Keys(Store):
    def _digest(self, plaintext: str) -> bytes:
        return hmac.new(self._secret, plaintext.encode(), hashlib.sha256).digest()

    def _insert_key(
        self,
        db: Connection,
        user: str,
        project: str | None,
        name: str,
        ttl_s: float | None,
        limits: Limits | None,
        now: float,
    ) -> tuple[KeyRecord, str]:
        require(db, "user", user)
        if project is not None:
            require(db, "project", project)
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
        digest, stored = self._digest(plaintext), limits_json(limits)
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
        check_actor(actor)
        now = self._clock()
        with self._tx() as db:
            record, plaintext = self._insert_key(db, user, project, name, ttl_s, limits, now)
            detail = {"user": user, "project": project, "name": name, "ttl_s": ttl_s}
            write_audit(db, self._audit_key, now, actor, "key.create", record.key_id, detail)
        return record, plaintext

    def list_keys(self, user: str | None = None, project: str | None = None) -> list[KeyRecord]:
        now = self._clock()
        rows = self._read(
            f"SELECT {KEY_COLS} FROM api_keys WHERE (:user IS NULL OR user = :user) "
            "AND (:project IS NULL OR project = :project) ORDER BY created, key_id",
            {"user": user, "project": project},
        )
        return [_key(r, now) for r in rows]

    def revoke_key(self, key_id: str, *, actor: str) -> KeyRecord:
        """Refuse the key from the next request on. Revoking a revoked key changes nothing."""
        check_actor(actor)
        now = self._clock()
        with self._tx() as db:
            cur = db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                (now, key_id),
            )
            if cur.rowcount:
                write_audit(db, self._audit_key, now, actor, "key.revoke", key_id, {})
            row = db.execute(f"SELECT {KEY_COLS} FROM api_keys WHERE key_id = ?", (key_id,))
            found = row.fetchone()
            if found is None:
                raise not_found("key", key_id)
        return _key(found, now)

    def rotate_key(
        self, key_id: str, grace_s: float = 3600, *, actor: str, keep_expiry: bool = False
    ) -> tuple[KeyRecord, str]:
        """A new key for the same user, project, name, limits, budgets and lifetime (with
        ``keep_expiry``, the old key's expiry: a user's own rotation extends nothing); the old
        key keeps working for ``grace_s`` seconds (0: not at all), spending from the new key's
        budgets, then is refused as rotated out."""
        if not (0 <= grace_s <= MAX_GRACE_S):
            raise GatewayError(
                400, f"grace_s must be between 0 and {MAX_GRACE_S:.0f} seconds", param="grace_s"
            )
        check_actor(actor)
        now = self._clock()
        with self._tx() as db:
            row = db.execute(
                f"SELECT {KEY_COLS}, ttl_s FROM api_keys WHERE key_id = ?", (key_id,)
            ).fetchone()
            if row is None:
                raise not_found("key", key_id)
            old, ttl_s = _key(row, now), row["ttl_s"]
            if keep_expiry and old.expires_at is not None:
                ttl_s = old.expires_at - now
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
            move_key_budgets(db, key_id, record.key_id)
            detail = {"new_key": record.key_id, "grace_s": grace_s}
            write_audit(db, self._audit_key, now, actor, "key.rotate", key_id, detail)
        return record, plaintext

    def authenticate(self, plaintext: str) -> Principal:
        """Who holds this key, or GatewayError 401 saying why not (403 for a project-scoped key
        whose user has left the project)."""
        key_id, digest = self._parse(plaintext)
        return self._verified(key_id, digest, self._key_rows(key_id))

    def authenticate_cached(self, plaintext: str) -> Principal | None:
        """authenticate's answer where it needs no round trip to the database: the key's row
        cached at the database's current version, and its last_used not due; None where it
        would need one. Exact once ``heard_all`` has said every commit before the request is
        in that version. Takes no lock the store's calls hold for a round trip, so the event
        loop may call it while the worker thread waits on PostgreSQL."""
        key_id, digest = self._parse(plaintext)
        rows = self._cached_key(key_id, self._database.data_version())
        if rows is None or (rows and self._last_used_due(rows[0])):
            return None
        return self._verified(key_id, digest, rows)

    def _parse(self, plaintext: str) -> tuple[str, bytes]:
        found = KEY_FORMAT.fullmatch(plaintext) if isinstance(plaintext, str) else None
        if found is None:
            raise GatewayError(
                401, "malformed API key: expected atk_<id>_<secret>", code="invalid_api_key"
            )
        return f"k_{found.group(1)}", self._digest(plaintext)

    def _verified(self, key_id: str, digest: bytes, rows: list[dict[str, Any]]) -> Principal:
        # Compared in constant time, and against a dummy when the id is unknown, so neither
        # timing nor message tells an attacker that a public id exists.
        stored = rows[0]["digest"] if rows else bytes(len(digest))
        if not hmac.compare_digest(stored, digest) or not rows:
            raise GatewayError(401, "unknown API key", code="invalid_api_key")
        return self._principal(key_id, rows[0])

    def key_principal(self, key_id: str) -> Principal:
        """The rights key ``key_id`` has now, for work it started that goes on without it (a
        batch): the same refusals as ``authenticate`` (revoked, expired, left the project)."""
        rows = self._key_rows(key_id)
        if not rows:
            raise GatewayError(401, f"API key {key_id} no longer exists", code="invalid_api_key")
        return self._principal(key_id, rows[0])

    def _principal(self, key_id: str, row: dict[str, Any]) -> Principal:
        now = self._clock()
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
        if self._last_used_due(row):
            # Changes nothing another gateway caches (each writes its own at most this often):
            # no notification. ``row`` is the cached one: no write again until due.
            with self._tx(keys_kept=True) as db:
                db.execute("UPDATE api_keys SET last_used = ? WHERE key_id = ?", (now, key_id))
            row["last_used"] = now
        return Principal(
            key_id=key_id,
            user=user,
            project=project,
            admin=bool(row["admin"]) and project is None,
            labels=json.loads(row["labels"]) if row["labels"] else {},
            store_prompts=bool(row["store_prompts"]),
            role=row["role"],
            limits=(row["key_limits"], row["project_limits"]),
            budgeted=bool(row["budgeted"]),
        )

    def _last_used_due(self, row: dict[str, Any]) -> bool:
        return row["last_used"] is None or self._clock() - row["last_used"] >= LAST_USED_EVERY_S

    def _key_rows(self, key_id: str) -> list[dict[str, Any]]:
        """What authenticate needs of a key: from the cache when its entry was read at the
        database's current version (data_version: any commit by another connection, SQLite's
        file or PostgreSQL's notifications, moves it on), else looked up and cached at the
        version read *before* the lookup, so a commit the lookup did not see leaves the entry
        stale at once. Every write here that may change it (store._tx) also empties the cache.
        With no version to go by (PostgreSQL's listening connection down), nothing is cached."""
        with self._lock:
            version = self._database.data_version()
            cached = self._cached_key(key_id, version)
            if cached is not None:
                return cached
            rows = [dict(r) for r in self._lookup_key(key_id)]
            if version is not None:
                if len(self._keys) >= MAX_CACHED_KEYS:  # bounded: unknown ids cannot fill memory
                    self._keys.clear()
                # Unknown ids are remembered like known ones (in the same bounded map), so a
                # lookup takes the same path and time whether the id exists or not.
                self._keys[key_id] = (version, rows[0] if rows else None)
            return rows

    def _lookup_key(self, key_id: str) -> list[Row]:
        return self._db.execute(
            "SELECT k.digest, k.user, k.project, k.expires_at, k.revoked_at, k.rotated_to, "
            "k.grace_until, k.last_used, u.admin, p.labels, p.store_prompts, m.role, "
            "k.limits AS key_limits, p.limits AS project_limits, EXISTS (SELECT 1 FROM budgets "
            "b WHERE (b.scope = 'key' AND b.subject IN (k.key_id, k.rotated_to)) OR "
            "(b.scope = 'user' AND b.subject = k.user) OR "
            "(b.scope = 'project' AND b.subject = k.project)) AS budgeted "
            "FROM api_keys k JOIN users u ON u.name = k.user "
            "LEFT JOIN projects p ON p.name = k.project "
            "LEFT JOIN members m ON m.project = k.project AND m.user = k.user "
            "WHERE k.key_id = ?",
            (key_id,),
        ).fetchall()

    def limits_for(self, principal: Principal) -> tuple[Limits | None, Limits | None]:
        """(the key's limits, its project's limits) for the RateLimiter, as authenticate read
        them for this request."""
        key, project = principal.limits
        return limits_from(key), limits_from(project)
