"""Retention per project: how long the ledger keeps a request's prompt text, its rows, and storage
a project's datasets (the gateway purges those through storage, ../retention.py). A period of
None keeps them. ``purge_ledger`` clears what is past its period in one transaction and audits
it; a dry run counts the same rows and changes nothing."""

from __future__ import annotations

from dataclasses import dataclass

from atoll.plugins.gateway.accounts.audit import write_audit
from atoll.plugins.gateway.accounts.store import Store, check_actor, require
from atoll.plugins.gateway.errors import GatewayError

MAX_PERIOD_S = 100 * 365 * 86400.0


@dataclass(frozen=True)
class RetentionPolicy:
    project: str
    prompts_s: float | None  # seconds a request's prompt text is kept (store_prompts projects)
    ledger_s: float | None  # seconds a request's ledger row is kept
    datasets_s: float | None  # seconds after upload a dataset of the project is kept
    updated: float


@dataclass(frozen=True)
class LedgerPurge:
    prompts: int  # prompt texts cleared (or, in a dry run, that would be)
    ledger_rows: int  # ledger rows removed


def _check_period(name: str, value: float | None) -> float | None:
    if value is not None and not 0 < value <= MAX_PERIOD_S:
        raise GatewayError(400, f"{name} must be a period of 1 s to 100 years", param=name)
    return value


class Retention(Store):
    def set_retention(
        self,
        project: str,
        prompts_s: float | None,
        ledger_s: float | None,
        datasets_s: float | None,
        *,
        actor: str,
    ) -> RetentionPolicy:
        """The project's periods, all three replaced (None: kept); no period at all removes the
        policy."""
        check_actor(actor)
        periods = {
            "prompts_s": _check_period("prompts_s", prompts_s),
            "ledger_s": _check_period("ledger_s", ledger_s),
            "datasets_s": _check_period("datasets_s", datasets_s),
        }
        now = self._clock()
        with self._tx() as db:
            require(db, "project", project)
            db.execute("DELETE FROM retention WHERE project = ?", (project,))
            if any(v is not None for v in periods.values()):
                db.execute(
                    "INSERT INTO retention (project, prompts_s, ledger_s, datasets_s, updated) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (project, prompts_s, ledger_s, datasets_s, now),
                )
            write_audit(db, self._audit_key, now, actor, "retention.set", project, periods)
        return RetentionPolicy(project, prompts_s, ledger_s, datasets_s, now)

    def list_retention(self) -> list[RetentionPolicy]:
        rows = self._read(
            "SELECT project, prompts_s, ledger_s, datasets_s, updated FROM retention "
            "ORDER BY project"
        )
        return [RetentionPolicy(*row) for row in rows]

    def purge_ledger(self, dry_run: bool, *, actor: str) -> dict[str, LedgerPurge]:
        """Per project with a policy: prompt texts older than its prompts period cleared, rows
        older than its ledger period removed (or, dry, counted)."""
        check_actor(actor)
        now = self._clock()
        report: dict[str, LedgerPurge] = {}
        with self._tx(keys_kept=True) as db:
            policies = db.execute("SELECT project, prompts_s, ledger_s FROM retention").fetchall()
            for project, prompts_s, ledger_s in policies:
                prompts = rows = 0
                if prompts_s is not None:
                    where = "project = ? AND at < ? AND prompt_text IS NOT NULL"
                    args = (project, now - prompts_s)
                    (prompts,) = db.execute(
                        f"SELECT COUNT(*) FROM usage WHERE {where}", args
                    ).fetchone()
                    if prompts and not dry_run:
                        db.execute(f"UPDATE usage SET prompt_text = NULL WHERE {where}", args)
                if ledger_s is not None:
                    args = (project, now - ledger_s)
                    (rows,) = db.execute(
                        "SELECT COUNT(*) FROM usage WHERE project = ? AND at < ?", args
                    ).fetchone()
                    if rows and not dry_run:
                        db.execute("DELETE FROM usage WHERE project = ? AND at < ?", args)
                report[project] = LedgerPurge(prompts, rows)
                if (prompts or rows) and not dry_run:
                    detail = {"prompts": prompts, "ledger_rows": rows}
                    write_audit(db, self._audit_key, now, actor, "retention.purge", project, detail)
        return report
