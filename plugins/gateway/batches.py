"""OpenAI's Batch API at the gateway: a file of requests (purpose ``batch``, kept by storage) run
in the background with its creator's key, below interactive traffic's priority
(batch_gate.py), each line as the same request sent alone (batch_runner.py), its results and
errors stored as files the creator downloads with ``files.content``.

A batch survives a restart of its gateway (batch_store.py keeps it in the data directory): a
stopping gateway lets the lines running finish (up to ``DRAIN_S``) and starts no more; at the
next start the lines not done run, and no finished line runs (or is metered) twice. A line cut
by the drain's end is metered for what it used (as a client that left) and runs again.

Who may: any key may start a batch on a file it may see (file_access.py); only its creator (and
project members, for one made with a project's key) and administrators see or cancel it; others
get a 404.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations, and ``user``
# is install()'s parameter, not a global it could resolve from a string.
import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from atoll.agent.errors import AtollError
from atoll.plugins.gateway.accounts.keys import Principal
from atoll.plugins.gateway.batch_gate import Gate
from atoll.plugins.gateway.batch_runner import BatchRunner, storage_error
from atoll.plugins.gateway.batch_shapes import (
    UNFINISHED,
    WINDOW_S,
    Batch,
    BatchList,
    CreateBatch,
    RequestCounts,
)
from atoll.plugins.gateway.batch_store import BatchStore, Kept
from atoll.plugins.gateway.errors import GatewayError
from atoll.plugins.gateway.file_access import may_see
from atoll.plugins.gateway.service import Gateway
from atoll.plugins.storage.contract.datasets import DatasetRecord, describe_dataset

DRAIN_S = 10.0  # a stopping gateway waits this long for the lines running to finish
KEPT = 1000  # batches kept; the oldest finished ones go first


class Batches:
    """The batches of one gateway: their records and runs."""

    def __init__(self, gw: Gateway, root: Path, concurrency: int) -> None:
        self.gw = gw
        self.store = BatchStore(root)
        self.runner = BatchRunner(gw, self.store, Gate(gw, concurrency))
        self.kept = {kept.batch.id: kept for kept in self.store.load()}
        self.runs: dict[str, asyncio.Task[None]] = {}

    def start(self) -> None:
        """Resume the batches a stopped gateway left unfinished."""
        for kept in self.kept.values():
            if kept.batch.status in UNFINISHED:
                self._launch(kept)

    async def close(self) -> None:
        self.runner.closing = True
        runs = list(self.runs.values())
        if runs:
            await asyncio.wait(runs, timeout=DRAIN_S)
        for task in runs:
            task.cancel()
        await asyncio.gather(*runs, return_exceptions=True)

    def _launch(self, kept: Kept) -> None:
        batch_id = kept.batch.id
        task = asyncio.create_task(self.runner.run(kept))
        self.runs[batch_id] = task
        task.add_done_callback(lambda _: self.runs.pop(batch_id, None))

    # --- the API's operations ----------------------------------------------------------------

    async def create(self, principal: Principal, body: CreateBatch) -> Batch:
        info = await self._input_file(principal, body.input_file_id)
        now = int(time.time())
        batch = Batch(
            id=f"batch_{uuid.uuid4().hex[:24]}",
            endpoint=body.endpoint,
            input_file_id=info.id,
            status="validating",
            created_at=now,
            expires_at=now + WINDOW_S,
            request_counts=RequestCounts(total=info.rows),
            metadata=body.metadata,
        )
        kept = Kept(batch, principal.user, principal.project, principal.key_id)
        self.kept[batch.id] = kept
        self.store.save(kept)
        self._forget_old()
        self._launch(kept)
        detail = {"input_file_id": info.id, "endpoint": body.endpoint}
        self.gw.accounts.audit(principal.user, "batch.create", batch.id, detail)
        return batch

    def get(self, principal: Principal, batch_id: str) -> Batch:
        return self._visible(principal, batch_id).batch

    def listing(self, principal: Principal, after: str | None, limit: int) -> BatchList:
        """Newest first; ``after``: those older than that batch (the SDK's pages)."""
        seen = sorted(
            (k.batch for k in self.kept.values() if self._sees(principal, k)),
            key=lambda b: (b.created_at, b.id),
            reverse=True,
        )
        if after is not None:
            ids = [b.id for b in seen]
            seen = seen[ids.index(after) + 1 :] if after in ids else []
        page = seen[:limit]
        return BatchList(
            data=page,
            first_id=page[0].id if page else None,
            last_id=page[-1].id if page else None,
            has_more=len(seen) > limit,
        )

    def cancel(self, principal: Principal, batch_id: str) -> Batch:
        """Stop starting its lines; those running finish, and what finished is stored."""
        kept = self._visible(principal, batch_id)
        batch = kept.batch
        if batch.status in ("validating", "in_progress"):
            batch.status, batch.cancelling_at = "cancelling", int(time.time())
            self.store.save(kept)
            self.gw.accounts.audit(principal.user, "batch.cancel", batch_id, {})
        elif batch.status != "cancelling":
            raise GatewayError(
                409,
                f"batch {batch_id} is {batch.status}: only a validating or in-progress batch can "
                "be cancelled",
            )
        return batch

    def _sees(self, principal: Principal, kept: Kept) -> bool:
        return may_see(self.gw.accounts, principal, kept.owner, kept.project)

    def _visible(self, principal: Principal, batch_id: str) -> Kept:
        kept = self.kept.get(batch_id)
        if kept is None or not self._sees(principal, kept):
            raise GatewayError(404, f"no batch {batch_id!r}", code="not_found")
        return kept

    async def _input_file(self, principal: Principal, file_id: str) -> DatasetRecord:
        """The file, if the caller may see it and it holds a batch's requests."""
        try:
            info = await describe_dataset(self.gw.agent, self.gw.storage_address(), file_id)
        except AtollError as exc:
            raise storage_error(exc, "input_file_id") from None
        if not may_see(self.gw.accounts, principal, info.owner, info.project):
            raise GatewayError(404, f"no file {file_id!r}", code="not_found", param="input_file_id")
        if info.kind != "batch":
            raise GatewayError(
                400,
                f'file {file_id!r} is not a batch file: upload one with purpose "batch"',
                param="input_file_id",
            )
        return info

    def _forget_old(self) -> None:
        finished = sorted(
            (k.batch.created_at, k.batch.id)
            for k in self.kept.values()
            if k.batch.status not in UNFINISHED
        )
        for _, old in finished[: max(0, len(self.kept) - KEPT)]:
            del self.kept[old]
            self.store.forget(old)


def install(app: FastAPI, batches: Batches, user: Any) -> None:
    """The batch routes; ``user`` is app.py's authenticated-caller dependency."""

    @app.post("/v1/batches", response_model=Batch, tags=["batches"])
    async def create(principal: user, body: CreateBatch) -> Any:
        return await batches.create(principal, body)

    @app.get("/v1/batches", response_model=BatchList, tags=["batches"])
    async def listing(principal: user, after: str | None = None, limit: int = 20) -> Any:
        if not 1 <= limit <= 100:
            raise GatewayError(400, "limit must be between 1 and 100", param="limit")
        return batches.listing(principal, after, limit)

    @app.get("/v1/batches/{batch_id}", response_model=Batch, tags=["batches"])
    async def one(principal: user, batch_id: str) -> Any:
        return batches.get(principal, batch_id)

    @app.post("/v1/batches/{batch_id}/cancel", response_model=Batch, tags=["batches"])
    async def cancel(principal: user, batch_id: str) -> Any:
        return batches.cancel(principal, batch_id)
