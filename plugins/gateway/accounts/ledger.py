"""The usage ledger: one row per request (who, which model and adapter, tokens, cost, status,
latency, and the prompt for a project that opted in), with totals, grouped reports and paged
export; ``Ledger`` writes the rows from the event loop, a turn's rows in one transaction, which
also settles each request's budgets (budgets.py): a budget's counter moves with its rows."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from atoll.plugins.gateway.accounts.budgets import NANO, settle
from atoll.plugins.gateway.accounts.database import IntegrityError
from atoll.plugins.gateway.accounts.keys import Principal
from atoll.plugins.gateway.accounts.store import Store
from atoll.plugins.gateway.errors import GatewayError

USAGE_COLS = (
    "seq, request_id, at, key_id, user, project, model, adapter, prompt_tokens, "
    "completion_tokens, status, latency_ms, prompt_text, cost"
)


GROUPS = ("user", "project", "key_id", "model", "adapter")  # what a report may group by


@dataclass(frozen=True)
class UsageTotals:
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost: float = 0.0  # in the price table's currency


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
    cost: int  # nano-units


def _usage_where(
    key_id: str | None,
    project: str | None,
    user: str | None,
    since: float | None,
    until: float | None = None,
) -> tuple[str, dict[str, Any]]:
    where = (
        "(:key_id IS NULL OR key_id = :key_id) AND (:project IS NULL OR project = :project) "
        "AND (:user IS NULL OR user = :user) AND (:since IS NULL OR at >= :since) "
        "AND (:until IS NULL OR at < :until)"
    )
    args = {"key_id": key_id, "project": project, "user": user, "since": since, "until": until}
    return where, args


SUMS = (
    "COUNT(*), COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0), "
    "COALESCE(SUM(cost), 0)"
)


class UsageTable(Store):
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
        cost: int = 0,
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
        if type(cost) is not int or cost < 0:
            raise ValueError(f"cost must be a non-negative integer (nano-units), not {cost!r}")
        if type(status) is not int or not 100 <= status <= 599:
            raise ValueError(f"status must be an HTTP status, not {status!r}")
        if not latency_ms >= 0:
            raise ValueError(f"latency_ms must be non-negative, not {latency_ms!r}")
        kept = prompt_text if principal.store_prompts else None
        who = (principal.key_id, principal.user, principal.project)
        counts = (prompt_tokens, completion_tokens, status, float(latency_ms))
        return (request_id, self._clock(), *who, model, adapter, *counts, kept, cost)

    def insert_usage(self, rows: list[tuple[Any, ...]]) -> list[ValueError | None]:
        """``rows`` (from usage_row) in one transaction; if one clashes with a request already
        in the ledger, each in its own. Per row: None, or why it was refused."""
        sql = f"INSERT INTO usage ({USAGE_COLS.removeprefix('seq, ')}) VALUES (?{', ?' * 12})"
        # Rows of keys that no budget applies to (their cached rows say so, at the database's
        # current version) settle nothing: no budget to read, no hold to release (a request
        # reserves only where a budget applies, and removing a budget drops its holds). A batch
        # of only such rows is inserted without waiting for the write lock.
        usages = [
            (rid, at, key_id, user, project, p + c, cost)
            for rid, at, key_id, user, project, _, _, p, c, *_, cost in rows
            if not self._unbudgeted(key_id)
        ]
        try:
            with self._tx(keys_kept=True, locked=bool(usages)) as db:
                db.executemany(sql, rows)
                if usages:
                    settle(db, usages)
            return [None] * len(rows)
        except IntegrityError:
            if len(rows) == 1:
                return [ValueError(f"request {rows[0][0]!r} is already in the ledger")]
        return [self.insert_usage([row])[0] for row in rows]

    def usage(
        self,
        key_id: str | None = None,
        project: str | None = None,
        user: str | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> UsageTotals:
        """Totals of the ledger rows matching every filter given (a project: its keys' rows),
        ``since`` included, ``until`` not."""
        where, args = _usage_where(key_id, project, user, since, until)
        ((requests, prompt, completion, cost),) = self._read(
            f"SELECT {SUMS} FROM usage WHERE {where}", args
        )
        return UsageTotals(requests, prompt, completion, cost / NANO)

    def usage_report(
        self,
        group_by: list[str],
        key_id: str | None = None,
        project: str | None = None,
        user: str | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> list[dict[str, Any]]:
        """Totals per distinct value of the ``group_by`` columns (of ``GROUPS``), largest first."""
        if not group_by or len(set(group_by)) != len(group_by) or set(group_by) - set(GROUPS):
            raise GatewayError(
                400, f"group_by names distinct columns of {', '.join(GROUPS)}", param="group_by"
            )
        where, args = _usage_where(key_id, project, user, since, until)
        columns = ", ".join(group_by)  # checked against GROUPS above
        order = ", ".join(f"{c} NULLS FIRST" for c in group_by)  # SQLite's way, in PostgreSQL too
        rows = self._read(
            f"SELECT {columns}, {SUMS} FROM usage WHERE {where} GROUP BY {columns} "
            f"ORDER BY COUNT(*) DESC, {order}",
            args,
        )
        n = len(group_by)
        return [
            {
                **dict(zip(group_by, r[:n], strict=True)),
                **UsageTotals(r[n], r[n + 1], r[n + 2], r[n + 3] / NANO).__dict__,
            }
            for r in rows
        ]

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
        where, args = _usage_where(key_id, project, user, since)
        rows = self._read(
            f"SELECT {USAGE_COLS} FROM usage WHERE {where} AND seq > :after "
            "ORDER BY seq LIMIT :limit",
            args | {"after": after, "limit": limit},
        )
        return [UsageRow(*r) for r in rows]


class Ledger:
    """Usage rows of the requests that finish in the same turn of the event loop, or while the
    previous batch is being written, committed in one transaction rather than one each; each
    request still waits for its own row before its response ends (a row whose request was
    cancelled meanwhile is written all the same)."""

    def __init__(self, accounts: UsageTable) -> None:
        self.accounts = accounts
        self._pending: list[tuple[tuple[Any, ...], asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def write(self, row: tuple[Any, ...]) -> None:
        loop = asyncio.get_running_loop()
        written = loop.create_future()
        self._pending.append((row, written))
        if self._writer is None or self._writer.done():
            self._writer = loop.create_task(self._flush())
        await written

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            rows = [r for r, _ in batch]
            try:
                refusals: list[Exception | None] = [
                    *await self.accounts.offload(self.accounts.insert_usage, rows)
                ]
            except Exception as exc:  # the database itself failed: every waiting request hears it
                refusals = [exc] * len(batch)
            for (_, written), refused in zip(batch, refusals, strict=True):
                if written.done():  # its request was cancelled
                    continue
                if refused is None:
                    written.set_result(None)
                else:
                    written.set_exception(refused)
