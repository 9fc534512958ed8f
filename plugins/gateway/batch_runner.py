"""Running one batch: its input fetched and checked against its endpoint, its lines run as the
gate lets them start (batch_gate.py), each with its creator's key through the same path as the
same request sent alone (inference_routes.py's replies: model access, limits, budgets, the
ledger), then its results and errors stored as files of its creator's, in input order.

A line refused as overloaded (429, 503) is tried again after a pause, up to ``MAX_TRIES``; any
other error is that line's result, in the error file, not the batch's failure. A stopping
gateway starts no more lines and lets those running finish; the rest run at the next start."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from pydantic import BaseModel

from atoll.agent.errors import AtollError
from atoll.plugins.gateway import inference_routes
from atoll.plugins.gateway.accounts.adapters import policy_labels
from atoll.plugins.gateway.accounts.keys import Principal
from atoll.plugins.gateway.batch_gate import Gate
from atoll.plugins.gateway.batch_shapes import (
    BatchError,
    BatchErrors,
    RequestCounts,
    Status,
    request_body,
    result_line,
    unrun_line,
)
from atoll.plugins.gateway.batch_store import BatchStore, Kept, Line
from atoll.plugins.gateway.errors import GatewayError, from_platform
from atoll.plugins.gateway.json_files import write_jsonl
from atoll.plugins.gateway.service import Gateway
from atoll.plugins.storage.contract.datasets import fetch_dataset, upload_dataset

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_TRIES = 5  # of one line refused as overloaded before that error is its result
RETRIED = (429, 503)
STORAGE_WAIT_S = 300.0  # storage unreachable this long (fetching, storing results): it fails


def storage_error(exc: AtollError, param: str | None) -> GatewayError:
    if type(exc).__name__ == "DatasetNotFound":
        return GatewayError(404, exc.message, code="not_found", param=param)
    return from_platform(exc)


def _line_error(exc: Exception) -> GatewayError:
    """What a line's request ended in, as its route would have answered."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, AtollError):
        return from_platform(exc)
    log.exception("a batch line failed")  # a bug of ours: that line's result says so
    return GatewayError(500, f"internal error: {type(exc).__name__}")


def _line_id() -> str:
    return f"batch_req_{uuid.uuid4().hex[:24]}"


class BatchRunner:
    def __init__(self, gw: Gateway, store: BatchStore, gate: Gate) -> None:
        self.gw = gw
        self.store = store
        self.gate = gate
        self.closing = False  # the gateway is stopping: no line starts

    async def run(self, kept: Kept) -> None:
        batch = kept.batch
        try:
            if batch.status == "validating" and not await self._validate(kept):
                return
            lines = self.store.lines(batch.id)
            if batch.status in ("in_progress", "cancelling"):
                await self._lines(kept, lines)
            if not self.closing:
                await self._finalize(kept, lines)
        except GatewayError as exc:
            self.fail(kept, BatchError(code=exc.code or "batch_failed", message=exc.message))
        except Exception as exc:  # a bug of ours: the batch says so, the gateway goes on
            log.exception("batch %s failed", batch.id)
            self.fail(kept, BatchError(code="internal_error", message=type(exc).__name__))

    def fail(self, kept: Kept, error: BatchError) -> None:
        batch = kept.batch
        batch.status, batch.failed_at = "failed", int(time.time())
        batch.errors = BatchErrors(data=[error])
        self.store.save(kept)

    async def _validate(self, kept: Kept) -> bool:
        """Fetch the input once; every line must be for the batch's endpoint."""
        batch = kept.batch
        dest = self.store.path(batch.id, "input.jsonl")
        await self._storage(
            lambda: fetch_dataset(
                self.gw.agent, self.gw.storage_address(), batch.input_file_id, dest, "original"
            )
        )
        lines = self.store.lines(batch.id)
        if wrong := next((line for line in lines if line.url != batch.endpoint), None):
            message = (
                f"line {wrong.n} is for {wrong.url}, but the batch's endpoint is "
                f"{batch.endpoint}: one endpoint per batch"
            )
            self.fail(kept, BatchError(code="invalid_request", message=message, line=wrong.n))
            return False
        batch.request_counts = RequestCounts(total=len(lines))
        if batch.status == "validating":  # not cancelled meanwhile
            batch.status, batch.in_progress_at = "in_progress", int(time.time())
        self.store.save(kept)
        return True

    def _active(self, kept: Kept) -> bool:
        batch = kept.batch
        return not self.closing and batch.status == "in_progress" and time.time() < batch.expires_at

    async def _lines(self, kept: Kept, lines: list[Line]) -> None:
        """Run the lines not done yet, as the gate lets them start; then wait for those
        running (a cancelled or stopping batch too: what they used is metered and kept)."""
        todo = deque(line for line in lines if line.custom_id not in kept.done)
        tries: dict[str, int] = {}
        running: set[asyncio.Task[None]] = set()
        try:
            while (todo or running) and self._active(kept):
                if not todo:  # the rest are running; one refused as overloaded comes back
                    await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                    continue
                line = todo.popleft()
                try:
                    principal = self.gw.accounts.key_principal(kept.key_id)
                    labels = policy_labels(principal)
                except GatewayError as exc:  # the key was revoked, its user left the project
                    result = result_line(_line_id(), line.custom_id, exc.status, "", exc.body())
                    self.store.add_result(kept, result)
                    continue
                if not await self.gate.enter(
                    self._base(line), labels, lambda: not self._active(kept)
                ):
                    todo.appendleft(line)
                    break
                task = asyncio.create_task(self._line(kept, line, principal, todo, tries))
                running.add(task)
                task.add_done_callback(running.discard)
        finally:
            if running:
                await asyncio.gather(*running, return_exceptions=True)

    async def _line(
        self,
        kept: Kept,
        line: Line,
        principal: Principal,
        todo: deque[Line],
        tries: dict[str, int],
    ) -> None:
        rid = uuid.uuid4().hex
        overloaded = False
        try:
            reply = await self._answer(principal, line, rid)
        except Exception as exc:
            error = _line_error(exc)
            tries[line.custom_id] = tried = tries.get(line.custom_id, 0) + 1
            overloaded = error.status in RETRIED and error.retry
            if overloaded and tried < MAX_TRIES:
                todo.append(line)  # after the gate's pause, behind the lines still to run
                return
            result = result_line(_line_id(), line.custom_id, error.status, rid, error.body())
        else:
            body = json.loads(reply.model_dump_json())  # as the route would have answered
            result = result_line(_line_id(), line.custom_id, 200, rid, body)
        finally:
            self.gate.leave(overloaded)
        self.store.add_result(kept, result)

    async def _answer(self, principal: Principal, line: Line, rid: str) -> BaseModel:
        request = request_body(line.url, line.body)
        if line.url == "/v1/chat/completions":
            return await inference_routes.chat_reply(self.gw, principal, request, rid, True)
        if line.url == "/v1/completions":
            return await inference_routes.completion_reply(self.gw, principal, request, rid, True)
        return await inference_routes.embedding_reply(self.gw, principal, request, True)

    def _base(self, line: Line) -> str | None:
        """The base model a line's ``model`` names (None for an embedding model: any node)."""
        model = line.body.get("model")
        if line.url == "/v1/embeddings" or not isinstance(model, str):
            return None
        base, sep, _ = model.partition(":")
        if sep:
            return base
        adapter = self.gw.accounts.adapter(model)
        return adapter.base_model if adapter is not None else model

    async def _finalize(self, kept: Kept, lines: list[Line]) -> None:
        """Store the results and errors as files in input order; lines never run (the batch
        expired or was cancelled) are errors saying so."""
        batch = kept.batch
        undone = [line for line in lines if line.custom_id not in kept.done]
        final: Status
        if batch.status == "cancelling":
            final, code, why = "cancelled", "batch_cancelled", "the batch was cancelled first"
        else:
            final, code = ("expired" if undone else "completed"), "batch_expired"
            why = "the batch's 24h completion window ended first"
            if batch.status != "finalizing":
                batch.status, batch.finalizing_at = "finalizing", int(time.time())
                self.store.save(kept)
        results = [kept.done[line.custom_id] for line in lines if line.custom_id in kept.done]
        ok = [r for r in results if r["response"]["status_code"] == 200]
        errors = [r for r in results if r["response"]["status_code"] != 200]
        errors += [unrun_line(_line_id(), line.custom_id, code, why) for line in undone]
        # Each id is saved once its file is stored: a gateway stopped meanwhile stores only the
        # other one when it resumes.
        if ok and batch.output_file_id is None:
            batch.output_file_id = await self._keep_file(kept, "output", ok)
            self.store.save(kept)
        if errors and batch.error_file_id is None:
            batch.error_file_id = await self._keep_file(kept, "error", errors)
            self.store.save(kept)
        batch.request_counts = RequestCounts(
            total=len(lines), completed=len(ok), failed=len(errors)
        )
        batch.status = final
        setattr(batch, f"{final}_at", int(time.time()))
        self.store.save(kept)
        self.store.finished(kept)

    async def _keep_file(self, kept: Kept, which: str, rows: list[dict[str, Any]]) -> str:
        """``rows`` as a file of the batch's owner (and project) in storage; its id."""
        name = f"{kept.batch.id}_{which}"
        path = self.store.path(kept.batch.id, f"{which}.jsonl")
        write_jsonl(path, rows)
        try:
            record = await self._storage(
                lambda: upload_dataset(
                    self.gw.agent,
                    self.gw.storage_address(),
                    path,
                    name,
                    kept.owner,
                    kept.project,
                    format="batch_output",
                    filename=f"{name}.jsonl",
                )
            )
        finally:
            path.unlink(missing_ok=True)
        return record.id

    async def _storage(self, call: Callable[[], Awaitable[T]]) -> T:
        """``call`` on the storage agent, tried again while none answers (a gateway just
        started has not heard of it yet), up to ``STORAGE_WAIT_S``."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + STORAGE_WAIT_S
        pause = 0.1
        while True:
            try:
                return await call()
            except (GatewayError, AtollError) as exc:
                error = exc if isinstance(exc, GatewayError) else storage_error(exc, None)
                if error.status != 503 or loop.time() + pause > give_up:
                    raise error from None
            await asyncio.sleep(pause)
            pause = min(pause * 2, 5.0)
