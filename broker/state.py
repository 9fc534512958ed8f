"""What a broker must remember across restarts: revocations, redeemed enrollment tokens, and
which key each agent name belongs to.

Names are bound: the first key admitted under a name owns it until the name is revoked (or the
binding's credential expires). A token redeems exactly one name with one key, and only before
it expires by this broker's own clock. A credential signed by the tenant key itself may re-key
a name (the tenant is the authority over its names), but only when it was issued after the
binding was made; a token holder never can. Revoking a name also revokes every key and token
seen under it, so a second name minted with the same key or token does not survive.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atoll.protocol.errors import AuthError, ProtocolError
from atoll.protocol.subjects import check_name
from atoll.protocol.trust import AgentIdentity, Revocation, now_ms, verify_revocation


@dataclass(frozen=True)
class Binding:
    """Agent ``name`` of ``tenant`` belongs to key ``pub`` (since ``at``, this broker's or the
    binding broker's clock) until ``exp`` (0: the credential never expires)."""

    tenant: str
    name: str
    pub: bytes
    jti: str
    at: int
    exp: int
    direct: bool  # bound by a credential the tenant key signed itself

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> Binding:
        """A binding another broker of the mesh flooded (ProtocolError unless well-formed)."""
        try:
            b = cls(**{k: body[k] for k in cls.__dataclass_fields__})
            if not (
                isinstance(b.jti, str)
                and isinstance(b.pub, bytes)
                and len(b.pub) == 32
                and type(b.at) is int
                and type(b.exp) is int
                and type(b.direct) is bool
            ):
                raise TypeError
            check_name(b.tenant, "tenant name")
            check_name(b.name, "agent name")
        except (KeyError, TypeError):
            raise ProtocolError("peer sent a malformed name binding") from None
        return b

    def live(self, now: int) -> bool:
        return not self.exp or self.exp > now

    def beats(self, other: Binding) -> bool:
        """Which of two bindings of one name made at different brokers stands: a later one the
        tenant signed itself re-keys the name; otherwise the first one stays."""
        if self.direct and self.at > other.at:
            return True
        if other.direct and other.at > self.at:
            return False
        return (self.at, self.pub) < (other.at, other.pub)


class BrokerState:
    def __init__(self, path: Path | None, operator_pub: bytes) -> None:
        self.operator_pub = operator_pub
        self._db = sqlite3.connect(":memory:" if path is None else str(path))
        self._db.executescript(
            """
            PRAGMA journal_mode=WAL;
            CREATE TABLE IF NOT EXISTS revocations (blob BLOB PRIMARY KEY);
            CREATE TABLE IF NOT EXISTS grants (blob BLOB PRIMARY KEY);
            CREATE TABLE IF NOT EXISTS enrollments (
                jti TEXT PRIMARY KEY, tenant TEXT NOT NULL, agent_pub BLOB NOT NULL,
                name TEXT NOT NULL, at INTEGER NOT NULL);
            CREATE TABLE IF NOT EXISTS names (
                tenant TEXT NOT NULL, name TEXT NOT NULL, pub BLOB NOT NULL, jti TEXT NOT NULL,
                at INTEGER NOT NULL, exp INTEGER NOT NULL, direct INTEGER NOT NULL,
                PRIMARY KEY (tenant, name));
            CREATE TABLE IF NOT EXISTS seen (
                tenant TEXT NOT NULL, name TEXT NOT NULL, pub BLOB NOT NULL, jti TEXT NOT NULL,
                exp INTEGER NOT NULL, PRIMARY KEY (tenant, name, pub, jti));
            """
        )
        self._revocations: list[Revocation] = []
        # Keys and tokens seen under a revoked name -> the revocation's time.
        self._revoked_keys: dict[tuple[str, bytes], int] = {}
        self._revoked_tokens: dict[tuple[str, str], int] = {}
        self._pruned = 0
        for (blob,) in self._db.execute("SELECT blob FROM revocations"):
            self._remember(verify_revocation(blob, operator_pub))

    # --- revocations -----------------------------------------------------------------------------

    def _remember(self, rev: Revocation) -> None:
        self._revocations.append(rev)
        if rev.pub:
            key = (rev.tenant, rev.pub)
            self._revoked_keys[key] = max(self._revoked_keys.get(key, 0), rev.before)
        if not rev.name:
            return
        rows = self._db.execute(
            "SELECT pub, jti FROM seen WHERE tenant = ? AND name = ?", (rev.tenant, rev.name)
        ).fetchall()
        for pub, jti in rows:
            k = (rev.tenant, pub)
            self._revoked_keys[k] = max(self._revoked_keys.get(k, 0), rev.before)
            if jti:
                t = (rev.tenant, jti)
                self._revoked_tokens[t] = max(self._revoked_tokens.get(t, 0), rev.before)
        with self._db:  # the name is free again for a newly issued credential
            self._db.execute(
                "DELETE FROM names WHERE tenant = ? AND name = ? AND at <= ?",
                (rev.tenant, rev.name, rev.before),
            )

    def add_revocation(self, blob: bytes) -> tuple[Revocation, bool]:
        """Verify and keep a revocation (idempotent); True when it was not known yet."""
        rev = verify_revocation(blob, self.operator_pub)
        with self._db:
            cur = self._db.execute("INSERT OR IGNORE INTO revocations VALUES (?)", (blob,))
        if cur.rowcount:
            self._remember(rev)
        return rev, bool(cur.rowcount)

    def revocation_blobs(self) -> list[bytes]:
        return [r.blob for r in self._revocations]

    def keep_grant_record(self, blob: bytes) -> None:
        """A verified grant or grant revocation (``atoll.broker.grants``), kept: a revoked grant
        must stay revoked after a restart."""
        with self._db:
            self._db.execute("INSERT OR IGNORE INTO grants VALUES (?)", (blob,))

    def grant_records(self) -> list[bytes]:
        return [blob for (blob,) in self._db.execute("SELECT blob FROM grants")]

    def revoked(self, ident: AgentIdentity) -> str | None:
        """Why this identity is revoked, or None."""
        rev = next((r for r in self._revocations if r.covers(ident)), None)
        if rev is not None:
            return f"credential of agent {ident.name!r} was revoked"
        before = self._revoked_keys.get((ident.tenant, ident.pub))
        if before is not None and ident.iat <= before:
            return f"the key of agent {ident.name!r} was revoked"
        before = self._revoked_tokens.get((ident.tenant, ident.grant)) if ident.grant else None
        if before is not None and ident.iat <= before:
            return f"the enrollment token of agent {ident.name!r} was revoked"
        return None

    # --- names and tokens ------------------------------------------------------------------------

    def _prune(self, now: int) -> None:
        """Forget bindings whose credentials expired (short-lived tool identities come and go);
        at most once a minute."""
        if now - self._pruned < 60_000:
            return
        self._pruned = now
        with self._db:
            self._db.execute("DELETE FROM names WHERE exp != 0 AND exp < ?", (now,))
            self._db.execute("DELETE FROM seen WHERE exp != 0 AND exp < ?", (now,))

    def binding(self, tenant: str, name: str) -> Binding | None:
        row = self._db.execute(
            "SELECT pub, jti, at, exp, direct FROM names WHERE tenant = ? AND name = ?",
            (tenant, name),
        ).fetchone()
        if row is None:
            return None
        return Binding(tenant, name, row[0], row[1], row[2], row[3], bool(row[4]))

    def _bind(self, b: Binding) -> None:
        with self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO names VALUES (?, ?, ?, ?, ?, ?, ?)",
                (b.tenant, b.name, b.pub, b.jti, b.at, b.exp, int(b.direct)),
            )
            self._db.execute(
                "INSERT OR IGNORE INTO seen VALUES (?, ?, ?, ?, ?)",
                (b.tenant, b.name, b.pub, b.jti, b.exp),
            )

    def admit(self, ident: AgentIdentity) -> Binding | None:
        """Raise AuthError unless this identity may connect; redeem its token on first use and
        bind its name to its key. Returns the binding when it is new (for the mesh)."""
        why = self.revoked(ident)
        if why is not None:
            raise AuthError(why, code="revoked")
        now = now_ms()
        self._prune(now)
        row = None
        if ident.grant:
            row = self._db.execute(
                "SELECT agent_pub, name FROM enrollments WHERE jti = ?", (ident.grant,)
            ).fetchone()
            if row is None and ident.grant_exp <= now:
                raise AuthError(
                    f"enrollment token expired {(now - ident.grant_exp) // 1000} s ago "
                    "(by this broker's clock)",
                    code="expired",
                )
            if row is not None and (row[0] != ident.pub or row[1] != ident.name):
                raise AuthError(
                    f"enrollment token already used (by agent {row[1]!r}): one token redeems "
                    "one name with one key",
                    code="token-used",
                )
        bound = self.binding(ident.tenant, ident.name)
        if (
            bound is not None
            and bound.live(now)
            and bound.pub != ident.pub  # taken by another key
            and (ident.grant or ident.iat <= bound.at)
        ):
            raise AuthError(
                f"agent name {ident.name!r} belongs to another key in this tenant "
                "(revoke it first)",
                code="name-taken",
            )
        if ident.grant and row is None:
            with self._db:
                self._db.execute(
                    "INSERT INTO enrollments VALUES (?, ?, ?, ?, ?)",
                    (ident.grant, ident.tenant, ident.pub, ident.name, now),
                )
        if (
            bound is not None
            and bound.live(now)
            and bound.pub == ident.pub
            and bound.exp in (0, ident.exp)
        ):
            return None  # known: nothing new to tell the mesh
        new = Binding(
            ident.tenant, ident.name, ident.pub, ident.grant, now, ident.exp, not ident.grant
        )
        self._bind(new)
        return new

    def record_binding(self, b: Binding) -> bool:
        """A binding made at another broker of the mesh; True when it changed this one's."""
        if b.jti:
            with self._db:
                self._db.execute(
                    "INSERT OR IGNORE INTO enrollments VALUES (?, ?, ?, ?, ?)",
                    (b.jti, b.tenant, b.pub, b.name, b.at),
                )
        mine = self.binding(b.tenant, b.name)
        if mine is not None and mine.live(now_ms()) and (mine.pub == b.pub or not b.beats(mine)):
            return False
        self._bind(b)
        return True

    def close(self) -> None:
        self._db.close()
