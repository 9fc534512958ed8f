"""The audit log: one row per admin action, written in the same transaction as the change it
records (``write_audit``), read newest first, hash-chained under a signed head that
``verify_audit`` checks (audit_chain.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from nacl.signing import SigningKey

from atoll.plugins.gateway.accounts import audit_chain
from atoll.plugins.gateway.accounts.database import Connection
from atoll.plugins.gateway.accounts.store import Store, check_actor
from atoll.plugins.gateway.errors import GatewayError


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    at: float
    actor: str
    action: str
    target: str
    detail: dict[str, Any]


def write_audit(
    db: Connection,
    key: SigningKey,
    at: float,
    actor: str,
    action: str,
    target: str,
    detail: dict[str, Any],
) -> None:
    audit_chain.append(db, key, at, actor, action, target, json.dumps(detail, sort_keys=True))


class AuditLog(Store):
    def audit(self, actor: str, action: str, target: str, detail: dict[str, Any]) -> None:
        """An admin action done outside this store (the app's own), in the same log."""
        check_actor(actor)
        if not isinstance(action, str) or not 0 < len(action) <= 64:
            raise ValueError("action must be 1-64 characters")
        if not isinstance(target, str) or len(target) > 256:
            raise ValueError("target must be at most 256 characters")
        now = self._clock()
        with self._tx() as db:
            write_audit(db, self._audit_key, now, actor, action, target, detail)

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

    def verify_audit(self) -> audit_chain.Verdict:
        """Re-compute the chain and check the head's signature: the first bad row, if any."""
        return audit_chain.verify(self._read, self._audit_key)
