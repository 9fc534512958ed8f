"""What a broker must remember across restarts: revocations and redeemed enrollment tokens."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from atoll.protocol.errors import AuthError
from atoll.tenancy.credentials import AgentIdentity, Revocation, verify_revocation


class BrokerState:
    def __init__(self, path: Path | None, operator_pub: bytes) -> None:
        self.operator_pub = operator_pub
        self._db = sqlite3.connect(":memory:" if path is None else str(path))
        self._db.executescript(
            """
            PRAGMA journal_mode=WAL;
            CREATE TABLE IF NOT EXISTS revocations (blob BLOB PRIMARY KEY);
            CREATE TABLE IF NOT EXISTS enrollments (
                jti TEXT PRIMARY KEY, tenant TEXT NOT NULL, agent_pub BLOB NOT NULL,
                name TEXT NOT NULL, at INTEGER NOT NULL);
            """
        )
        self._revocations: list[Revocation] = []
        for (blob,) in self._db.execute("SELECT blob FROM revocations"):
            self._revocations.append(verify_revocation(blob, operator_pub))

    def add_revocation(self, blob: bytes) -> tuple[Revocation, bool]:
        """Verify and keep a revocation (idempotent); True when it was not known yet."""
        rev = verify_revocation(blob, self.operator_pub)
        with self._db:
            cur = self._db.execute("INSERT OR IGNORE INTO revocations VALUES (?)", (blob,))
        if cur.rowcount:
            self._revocations.append(rev)
        return rev, bool(cur.rowcount)

    def record_enrollment(self, jti: str, tenant: str, pub: bytes, name: str, at: int) -> None:
        """A token redeemed at another broker of the mesh: the first redemption stands."""
        with self._db:
            self._db.execute(
                "INSERT OR IGNORE INTO enrollments VALUES (?, ?, ?, ?, ?)",
                (jti, tenant, pub, name, at),
            )

    def revocation_blobs(self) -> list[bytes]:
        return [r.blob for r in self._revocations]

    def revoked(self, ident: AgentIdentity) -> Revocation | None:
        return next((r for r in self._revocations if r.covers(ident)), None)

    def admit(self, ident: AgentIdentity) -> None:
        """Raise AuthError unless this identity may connect; redeem its token on first use."""
        rev = self.revoked(ident)
        if rev is not None:
            raise AuthError(f"credential of agent {ident.name!r} was revoked", code="revoked")
        if not ident.grant:
            return
        row = self._db.execute(
            "SELECT agent_pub, name FROM enrollments WHERE jti = ?", (ident.grant,)
        ).fetchone()
        if row is None:
            with self._db:
                self._db.execute(
                    "INSERT INTO enrollments VALUES (?, ?, ?, ?, ?)",
                    (ident.grant, ident.tenant, ident.pub, ident.name, ident.iat),
                )
        elif row[0] != ident.pub:
            raise AuthError(
                f"enrollment token already used (by agent {row[1]!r})", code="token-used"
            )

    def close(self) -> None:
        self._db.close()
