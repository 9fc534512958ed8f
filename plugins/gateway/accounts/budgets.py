"""Budgets per key, user and project, in tokens or in cost, over a period (daily, weekly, monthly,
or in total), that concurrent requests cannot overrun.

A request *reserves* its most possible spend before it is sent (``reserve``): one transaction
checks every budget that applies to it (its key's, its user's, its project's) against what is
spent plus what requests in flight hold, and holds its amount in each, or holds nothing and is
refused (429 naming the budget). When it ends, the ledger's transaction that writes its row
(ledger.py) also *settles* it (``settle``): its holds are released and what it actually used is
charged, so a budget's ``spent`` is always the sum of its ledger rows since the period began.

Plain SQL over rows keyed by a readable id (``user:alice:tokens:monthly``), run in the store's
write transactions, which hold its one write lock (SQLite's ``BEGIN IMMEDIATE``, PostgreSQL's
advisory lock: database.py), so gateways sharing a PostgreSQL database cannot overrun a budget
either. Costs are integers: nano-units of the price table's currency, so sums are exact.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from atoll.plugins.gateway.accounts.audit import write_audit
from atoll.plugins.gateway.accounts.database import Connection, Row
from atoll.plugins.gateway.accounts.store import Store, check_actor, not_found, require
from atoll.plugins.gateway.errors import GatewayError

SCOPES = ("key", "user", "project")
METRICS = ("tokens", "cost")
PERIODS = ("daily", "weekly", "monthly", "total")
NANO = 10**9  # cost is kept in nano-units of the currency
MAX_TOKENS_BUDGET = 10**15
MAX_COST_BUDGET = 10**9  # currency units: 10^18 nano-units still fit a signed 64-bit integer
BUDGET_COLS = "id, scope, subject, metric, period, amount, spent, reserved, period_start, created"


def budget_id(scope: str, subject: str, metric: str, period: str) -> str:
    return f"{scope}:{subject}:{metric}:{period}"


def period_start(period: str, now: float, created: float) -> float:
    """When the period that holds ``now`` began (UTC calendar days, ISO weeks, months)."""
    if period == "total":
        return created
    day = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "weekly":
        day -= timedelta(days=day.weekday())
    elif period == "monthly":
        day = day.replace(day=1)
    return day.timestamp()


def period_end(period: str, start: float) -> float | None:
    """When a period that began at ``start`` resets (None: never)."""
    if period == "total":
        return None
    begun = datetime.fromtimestamp(start, UTC)
    if period == "daily":
        return (begun + timedelta(days=1)).timestamp()
    if period == "weekly":
        return (begun + timedelta(days=7)).timestamp()
    month = begun.replace(year=begun.year + begun.month // 12, month=begun.month % 12 + 1)
    return month.timestamp()


def stamp(at: float | None) -> str:
    if at is None:
        return "never"
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class BudgetRecord:
    """One budget as listed: ``limit``, ``spent``, ``reserved`` and ``remaining`` in tokens, or
    for cost in the price table's currency units."""

    id: str
    scope: str
    subject: str
    metric: str
    period: str
    limit: float
    spent: float
    reserved: float  # held now by requests in flight
    remaining: float
    period_start: float
    resets_at: float | None

    def words(self) -> str:
        unit = "tokens" if self.metric == "tokens" else "in cost"
        return (
            f"{_num(self.remaining)} of {_num(self.limit)} {unit} left ({_num(self.spent)} spent, "
            f"{_num(self.reserved)} held by requests in flight)"
        )


def _num(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) and not value.is_integer() else f"{value:.0f}"


def _units(metric: str, amount: int) -> float | int:
    return amount if metric == "tokens" else amount / NANO


def _record(row: Row, now: float) -> BudgetRecord:
    """The budget as of ``now``: a period that ended shows as reset."""
    spent, start = row["spent"], row["period_start"]
    end = period_end(row["period"], start)
    if end is not None and now >= end:
        spent, start = 0, period_start(row["period"], now, row["created"])
        end = period_end(row["period"], start)
    metric, amount, reserved = row["metric"], row["amount"], row["reserved"]
    return BudgetRecord(
        id=row["id"],
        scope=row["scope"],
        subject=row["subject"],
        metric=metric,
        period=row["period"],
        limit=_units(metric, amount),
        spent=_units(metric, spent),
        reserved=_units(metric, reserved),
        remaining=_units(metric, max(0, amount - spent - reserved)),
        period_start=start,
        resets_at=end,
    )


def _applying(db: Connection, key_id: str, user: str, project: str | None) -> list[Any]:
    """The budgets of the key (or of the key it was rotated to: a key in its grace period
    spends from its successor's), its user and its project."""
    return db.execute(
        f"SELECT {BUDGET_COLS} FROM budgets WHERE (scope = 'key' AND subject IN "
        "(?, (SELECT rotated_to FROM api_keys WHERE key_id = ?))) "
        "OR (scope = 'user' AND subject = ?) OR (scope = 'project' AND subject = ?) ORDER BY id",
        (key_id, key_id, user, project),
    ).fetchall()


def move_key_budgets(db: Connection, old: str, new: str) -> None:
    """A rotated key's budgets become its successor's, with what is spent and held."""
    rows = db.execute(
        "SELECT id, metric, period FROM budgets WHERE scope = 'key' AND subject = ?", (old,)
    ).fetchall()
    for ident, metric, period in rows:
        moved = budget_id("key", new, metric, period)
        db.execute(
            f"INSERT INTO budgets ({BUDGET_COLS}) SELECT ?, scope, ?, metric, period, amount, "
            "spent, reserved, period_start, created FROM budgets WHERE id = ?",
            (moved, new, ident),
        )
        db.execute("UPDATE reservations SET budget_id = ? WHERE budget_id = ?", (moved, ident))
        db.execute("DELETE FROM budgets WHERE id = ?", (ident,))


def _one(db: Connection, ident: str) -> Any:
    return db.execute(f"SELECT {BUDGET_COLS} FROM budgets WHERE id = ?", (ident,)).fetchone()


def _roll_over(db: Connection, row: Row, now: float) -> int:
    """Start a new period if the budget's has ended; what is spent in the period now."""
    end = period_end(row["period"], row["period_start"])
    if end is None or now < end:
        return int(row["spent"])
    start = period_start(row["period"], now, row["created"])
    db.execute("UPDATE budgets SET spent = 0, period_start = ? WHERE id = ?", (start, row["id"]))
    return 0


def _release(db: Connection, where: str, args: tuple[Any, ...]) -> None:
    """Give back the holds of the reservations ``where`` selects, and forget them."""
    held: dict[str, int] = defaultdict(int)
    for budget, amount in db.execute(
        f"DELETE FROM reservations WHERE {where} RETURNING budget_id, amount", args
    ).fetchall():
        held[budget] += amount
    for budget, amount in sorted(held.items()):
        db.execute("UPDATE budgets SET reserved = reserved - ? WHERE id = ?", (amount, budget))


# What settle needs of one request: its id, when its row was written, who made it (key, user,
# project), and the tokens and cost it used.
Usage = tuple[str, float, str, str, str | None, int, int]


def settle(db: Connection, usages: list[Usage]) -> None:
    """In the ledger's transaction that writes the requests' rows: release what they held,
    charge what each used to every budget that applies to it now. A turn's requests are settled
    together, a statement per budget touched rather than per request (each a round trip on
    PostgreSQL), in the period that the latest of them falls in."""
    ids = tuple(request_id for request_id, *_ in usages)
    _release(db, f"request_id IN ({', '.join('?' * len(ids))})", ids)
    applying: dict[tuple[str, str, str | None], list[Any]] = {}
    budgets: dict[str, Any] = {}  # id -> its row
    latest: dict[str, float] = {}  # id -> the latest row charged to it
    charges: dict[str, int] = defaultdict(int)
    for _, at, key_id, user, project, tokens, cost in usages:
        who = (key_id, user, project)
        if who not in applying:
            applying[who] = _applying(db, *who)
        for row in applying[who]:
            ident = budgets.setdefault(row["id"], row)["id"]
            latest[ident] = max(latest.get(ident, at), at)
            charges[ident] += tokens if row["metric"] == "tokens" else cost
    for ident, row in sorted(budgets.items()):
        _roll_over(db, row, latest[ident])
        if charges[ident]:
            db.execute("UPDATE budgets SET spent = spent + ? WHERE id = ?", (charges[ident], ident))


class Budgets(Store):
    def set_budget(
        self, scope: str, subject: str, metric: str, period: str, limit: float, *, actor: str
    ) -> BudgetRecord:
        """Create the budget, or change its limit (what is spent in the period stays)."""
        if scope not in SCOPES:
            raise GatewayError(400, f"scope must be one of {', '.join(SCOPES)}", param="scope")
        if metric not in METRICS:
            raise GatewayError(400, f"metric must be one of {', '.join(METRICS)}", param="metric")
        if period not in PERIODS:
            raise GatewayError(400, f"period must be one of {', '.join(PERIODS)}", param="period")
        most = MAX_TOKENS_BUDGET if metric == "tokens" else MAX_COST_BUDGET
        if not isinstance(limit, int | float) or not 0 <= limit <= most:
            raise GatewayError(400, f"limit must be between 0 and {most}", param="limit")
        if metric == "tokens" and limit != int(limit):
            raise GatewayError(400, "a tokens budget's limit is a whole number", param="limit")
        amount = int(limit) if metric == "tokens" else round(limit * NANO)
        check_actor(actor)
        now = self._clock()
        ident = budget_id(scope, subject, metric, period)
        # Not keys_kept: whether a key is budgeted is in authenticate's cache.
        with self._tx() as db:
            if scope == "key":
                if not db.execute("SELECT 1 FROM api_keys WHERE key_id = ?", (subject,)).fetchone():
                    raise not_found("key", subject)
            else:
                require(db, scope, subject)
            db.execute(
                f"INSERT INTO budgets ({BUDGET_COLS}) VALUES (?, ?, ?, ?, ?, ?, 0, 0, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET amount = excluded.amount",
                (ident, scope, subject, metric, period, amount,
                 period_start(period, now, now), now),
            )  # fmt: skip
            detail = {"limit": limit}
            write_audit(db, self._audit_key, now, actor, "budget.set", ident, detail)
            return _record(_one(db, ident), now)

    def remove_budget(self, budget: str, *, actor: str) -> None:
        check_actor(actor)
        now = self._clock()
        with self._tx() as db:  # (as set_budget's: the keys' cache goes)
            db.execute("DELETE FROM reservations WHERE budget_id = ?", (budget,))
            if db.execute("DELETE FROM budgets WHERE id = ?", (budget,)).rowcount == 0:
                raise not_found("budget", budget)
            write_audit(db, self._audit_key, now, actor, "budget.remove", budget, {})

    def list_budgets(
        self, scope: str | None = None, subject: str | None = None
    ) -> list[BudgetRecord]:
        now = self._clock()
        rows = self._read(
            f"SELECT {BUDGET_COLS} FROM budgets WHERE (:scope IS NULL OR scope = :scope) "
            "AND (:subject IS NULL OR subject = :subject) ORDER BY id",
            {"scope": scope, "subject": subject},
        )
        return [_record(r, now) for r in rows]

    def budgets_of(self, key_id: str, user: str, project: str | None) -> list[BudgetRecord]:
        """Every budget a request with this key would be checked against."""
        now = self._clock()
        with self._lock:
            return [_record(r, now) for r in _applying(self._db, key_id, user, project)]

    def reserve(
        self,
        request_id: str,
        key_id: str,
        user: str,
        project: str | None,
        tokens: int,
        cost: int,
        hold_s: float,
        why: str = "",
    ) -> None:
        """Hold ``tokens`` and ``cost`` in every budget that applies, all or none, for at most
        ``hold_s`` seconds (a request that outlives it, or a gateway that died, gives its holds
        back then); GatewayError 429 naming the first budget it does not fit in. ``why`` says
        in the refusal what the amount is made of."""
        now = self._clock()  # (a key with no budget is not reserved for: Principal.budgeted)
        with self._tx(keys_kept=True) as db:
            _release(db, "expires < ?", (now,))
            rows = _applying(db, key_id, user, project)
            holds = []
            for row in rows:
                spent = _roll_over(db, row, now)
                need = tokens if row["metric"] == "tokens" else cost
                if spent + row["reserved"] + need > row["amount"]:
                    raise _refusal(_record(_one(db, row["id"]), now), need, why, now)
                holds.append((request_id, row["id"], need, now + hold_s))
            db.executemany(
                "INSERT INTO reservations (request_id, budget_id, amount, expires) "
                "VALUES (?, ?, ?, ?)",
                holds,
            )
            for _, budget, need, _ in holds:
                db.execute(
                    "UPDATE budgets SET reserved = reserved + ? WHERE id = ?", (need, budget)
                )

    def release(self, request_id: str) -> None:
        """A reserved request that was never sent (refused by a rate limit): its holds back."""
        with self._tx(keys_kept=True) as db:
            _release(db, "request_id = ?", (request_id,))


def _refusal(budget: BudgetRecord, need: int, why: str, now: float) -> GatewayError:
    wants = _num(_units(budget.metric, need))
    message = (
        f"budget {budget.id} cannot cover this request: {budget.words()}; it needs up to {wants}"
        f"{f' ({why})' if why else ''}; it resets {stamp(budget.resets_at)}"
    )
    if budget.resets_at is not None:
        message += f" (in {_wait(budget.resets_at - now)})"
    return GatewayError(
        429,
        message,
        type="insufficient_quota",
        code="budget_exceeded",
        detail={"budget": {**budget.__dict__, "needed": _units(budget.metric, need)}},
        retry=False,
    )


def _wait(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds >= 86400:
        return f"{seconds // 86400} d {seconds % 86400 // 3600} h"
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 60} min {seconds % 60} s"
