"""Background runs the gateway keeps as JSON files in its data directory (evaluations, mixture
searches): each record with its creator and project, the task that runs it, who may see it, and
what a restart keeps (a run a stopping gateway interrupted is kept as failed, saying so).

Who may see a run: its creator (and project members, for one made with a project's key) and
administrators, as for fine-tuning jobs; others get a 404 as for one that does not exist.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel

from atoll.agent.errors import AtollError
from atoll.plugins.gateway.accounts import Accounts
from atoll.plugins.gateway.accounts.keys import Principal
from atoll.plugins.gateway.errors import GatewayError, from_platform
from atoll.plugins.gateway.file_access import may_see
from atoll.plugins.gateway.json_files import write_json

KEPT = 1000  # runs kept of each kind; the oldest finished ones go first
STOPPED = "the gateway stopped while it ran; start it again"

RunStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class RunError(BaseModel):
    message: str


class RunRecord(BaseModel):
    """What every kept run shows: its state and times."""

    id: str
    created_at: int
    finished_at: int | None = None
    status: RunStatus
    error: RunError | None = None


R = TypeVar("R", bound=RunRecord)


class KeptRuns(Generic[R]):
    """The runs of one kind (``noun`` in errors, ids ``{prefix}-...`` as file names)."""

    def __init__(
        self, accounts: Accounts, root: Path, record: type[R], noun: str, prefix: str
    ) -> None:
        self.accounts = accounts
        self.root = root
        self.noun = noun
        self.prefix = prefix
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.records: dict[str, tuple[R, str, str | None]] = {}  # id -> (it, owner, project)
        self.runs: dict[str, asyncio.Task[None]] = {}
        self._closing = False
        for path in sorted(root.glob(f"{prefix}-*.json")):
            saved = json.loads(path.read_text())
            # Evaluations kept before runs shared this module saved theirs as "evaluation".
            kept = record.model_validate(saved.get("record") or saved["evaluation"])
            if kept.status in ("queued", "running"):
                self._stamp(kept, "failed", STOPPED)
            self.records[kept.id] = (kept, saved["owner"], saved["project"])

    async def close(self) -> None:
        self._closing = True
        for task in list(self.runs.values()):
            task.cancel()
        await asyncio.gather(*self.runs.values(), return_exceptions=True)

    def start(self, principal: Principal, record: R, run: Coroutine[Any, Any, None]) -> R:
        """Keep ``record`` (the caller's) and run ``run`` for it in the background."""
        self.records[record.id] = (record, principal.user, principal.project)
        self.save(record)
        self._forget_old()
        task = asyncio.create_task(self._guarded(record, run))
        self.runs[record.id] = task
        task.add_done_callback(lambda _: self.runs.pop(record.id, None))
        return record

    def get(self, principal: Principal, run_id: str) -> R:
        found = self.records.get(run_id)
        if found is None or not may_see(self.accounts, principal, found[1], found[2]):
            raise GatewayError(404, f"no {self.noun} {run_id!r}", code="not_found")
        return found[0]

    def visible(
        self, principal: Principal, limit: int, where: Callable[[R], bool] | None = None
    ) -> list[R]:
        """Newest first; with ``where``, those it accepts."""
        seen = [
            record
            for record, owner, project in self.records.values()
            if may_see(self.accounts, principal, owner, project)
            and (where is None or where(record))
        ]
        return sorted(seen, key=lambda r: r.created_at, reverse=True)[:limit]

    async def cancel(self, principal: Principal, run_id: str) -> R:
        record = self.get(principal, run_id)
        task = self.runs.get(run_id)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return record

    def end(self, record: R, status: RunStatus, message: str | None) -> None:
        self._stamp(record, status, message)
        self.save(record)

    def save(self, record: R) -> None:
        _, owner, project = self.records[record.id]
        data = {"record": record.model_dump(mode="json"), "owner": owner, "project": project}
        write_json(self.root / f"{record.id}.json", data)

    async def _guarded(self, record: R, run: Coroutine[Any, Any, None]) -> None:
        """Runs ``run``; a failure it did not end the record with ends it here."""
        try:
            await run
        except asyncio.CancelledError:
            if self._closing:
                self.end(record, "failed", STOPPED)
            else:
                self.end(record, "cancelled", None)
            raise
        except GatewayError as exc:
            self.end(record, "failed", exc.message)
        except AtollError as exc:
            self.end(record, "failed", from_platform(exc).message)

    @staticmethod
    def _stamp(record: RunRecord, status: RunStatus, message: str | None) -> None:
        record.status = status
        record.error = RunError(message=message) if message else None
        record.finished_at = int(time.time())

    def _forget_old(self) -> None:
        finished = sorted(
            (r.created_at, r.id) for r, _, _ in self.records.values() if r.id not in self.runs
        )
        for _, old in finished[: max(0, len(self.records) - KEPT)]:
            del self.records[old]
            (self.root / f"{old}.json").unlink(missing_ok=True)
