"""Rate limits across gateways that share a PostgreSQL database: each gateway keeps its own
sliding windows in memory (limits.py) and, about once a second, writes what each limited key and
project did through it in the last minute (requests, tokens, requests running now) and reads the
sum of what the other gateways wrote. Admission counts both, so N gateways do not grant N times a
key's rate: the most a limit can be overrun by is what the other gateways admit between two
exchanges. A gateway that stops exchanging (stopped, cut off) drops out after ``stale_s``.

Unused on SQLite: its file is one gateway's."""

from __future__ import annotations

from typing import NamedTuple

from atoll.plugins.gateway.accounts.store import Store


class Share(NamedTuple):
    """One key's or project's use through some gateway(s): requests and tokens in the last
    minute, requests running now."""

    requests: float = 0.0
    tokens: float = 0.0
    active: int = 0


Scope = tuple[str, str]  # ("key", key_id) or ("project", name)


class RateShares(Store):
    def share_rates(
        self, gateway: str, mine: dict[Scope, Share], stale_s: float
    ) -> dict[Scope, Share]:
        """Replace ``gateway``'s rows by ``mine``; the other gateways' sums per scope, of rows
        written in the last ``stale_s`` seconds."""
        now = self._clock()
        with self._tx(keys_kept=True) as db:
            db.execute("DELETE FROM rate_shares WHERE gateway = ? OR at < ?", (gateway, now - 600))
            db.executemany(
                "INSERT INTO rate_shares (gateway, scope, subject, requests, tokens, active, at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(gateway, *scope, *share, now) for scope, share in mine.items()],
            )
        rows = self._read(
            "SELECT scope, subject, SUM(requests), SUM(tokens), SUM(active) FROM rate_shares "
            "WHERE gateway != ? AND at >= ? GROUP BY scope, subject",
            (gateway, now - stale_s),
        )
        return {(s, n): Share(float(r), float(t), int(a)) for s, n, r, t, a in rows}
