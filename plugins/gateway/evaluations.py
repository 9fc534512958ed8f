"""Evaluations: a held-out set of chat rows run through base models and adapters on the same
inference nodes, each answer scored against the row's reference (eval_metrics.py), side by side.

An evaluation runs in the gateway with its creator's rights: every request goes through
``Gateway.run`` like the creator's own (model access, limits, budgets, the ledger). Each row costs
two requests per model: a greedy answer, and the reference scored as a ``continuation`` after
the same messages (its tokens' logprobs). Evaluations are kept as JSON files in the gateway's
data directory; one that a stopping gateway interrupts is kept as failed, saying so.

Who may: any key may start one, on a file it may see (file_access.py) and models it may use;
only its creator (and project members, for one made with a project's key) and administrators
see it, as for fine-tuning jobs; others get a 404.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations, and ``user``
# is install()'s parameter, not a global it could resolve from a string.
import asyncio
import json
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from atoll.agent.errors import AtollError
from atoll.plugins.gateway.accounts.keys import Principal
from atoll.plugins.gateway.bodies import checked_finish
from atoll.plugins.gateway.errors import GatewayError, from_platform
from atoll.plugins.gateway.eval_metrics import RowScore, mean, score_row
from atoll.plugins.gateway.evaluation_shapes import (
    MAX_ROWS,
    CreateEvaluation,
    Evaluation,
    EvaluationError,
    EvaluationList,
    Example,
    ModelScores,
)
from atoll.plugins.gateway.file_access import may_see
from atoll.plugins.gateway.json_files import write_json
from atoll.plugins.gateway.service import Gateway
from atoll.plugins.inference.contract import (
    ChatMessage,
    FinishEvent,
    GenerateRequest,
    SamplingParams,
    TokenEvent,
)
from atoll.plugins.storage.contract.datasets import describe_dataset, fetch_dataset

ROWS_AT_ONCE = 4  # rows of one evaluation in flight: the nodes batch them
KEPT = 1000  # evaluations kept; the oldest finished ones go first
STOPPED = "the gateway stopped while it ran; start it again"


class Evaluations:
    """The evaluations of one gateway: their records (in memory and as files) and runs."""

    def __init__(self, gw: Gateway, root: Path) -> None:
        self.gw = gw
        self.root = root
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.records: dict[str, tuple[Evaluation, str, str | None]] = {}  # id -> (it, owner, proj)
        self.runs: dict[str, asyncio.Task[None]] = {}
        self._closing = False
        for path in sorted(root.glob("eval-*.json")):
            saved = json.loads(path.read_text())
            record = Evaluation.model_validate(saved["evaluation"])
            if record.status in ("queued", "running"):
                record.status = "failed"
                record.error = EvaluationError(message=STOPPED)
                record.finished_at = int(time.time())
            self.records[record.id] = (record, saved["owner"], saved["project"])

    async def close(self) -> None:
        self._closing = True
        for task in list(self.runs.values()):
            task.cancel()
        await asyncio.gather(*self.runs.values(), return_exceptions=True)

    # --- the API's operations ----------------------------------------------------------------

    async def create(self, principal: Principal, body: CreateEvaluation) -> Evaluation:
        models = list(dict.fromkeys(body.models))  # each once, in the caller's order
        for model in models:
            self.gw.resolve(principal, model)  # 404 for a model the caller may not use
        rows = await self._rows(principal, body.file_id)
        record = Evaluation(
            id=f"eval-{uuid.uuid4().hex[:24]}",
            created_at=int(time.time()),
            status="queued",
            file_id=body.file_id,
            models=models,
            max_tokens=body.max_tokens,
            rows=len(rows),
        )
        self.records[record.id] = (record, principal.user, principal.project)
        self._save(record.id)
        self._forget_old()
        task = asyncio.create_task(self._run(principal, record, rows, body.examples))
        self.runs[record.id] = task
        task.add_done_callback(lambda _: self.runs.pop(record.id, None))
        return record

    def get(self, principal: Principal, evaluation_id: str) -> Evaluation:
        found = self.records.get(evaluation_id)
        if found is None or not may_see(self.gw.accounts, principal, found[1], found[2]):
            raise GatewayError(404, f"no evaluation {evaluation_id!r}", code="not_found")
        return found[0]

    def visible(self, principal: Principal, model: str | None, limit: int) -> list[Evaluation]:
        """Newest first; with ``model``, those that ran it."""
        seen = [
            record
            for record, owner, project in self.records.values()
            if may_see(self.gw.accounts, principal, owner, project)
            and (model is None or model in record.models)
        ]
        return sorted(seen, key=lambda r: r.created_at, reverse=True)[:limit]

    async def cancel(self, principal: Principal, evaluation_id: str) -> Evaluation:
        record = self.get(principal, evaluation_id)
        task = self.runs.get(evaluation_id)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return record

    # --- running -----------------------------------------------------------------------------

    async def _rows(self, principal: Principal, file_id: str) -> list[list[ChatMessage]]:
        """The file's chat rows (each with at least one message before the reference) if the
        caller may see it; 400 for a file that is no held-out set."""
        agent, storage = self.gw.agent, self.gw.storage_address()
        try:
            info = await describe_dataset(agent, storage, file_id)
            if not may_see(self.gw.accounts, principal, info.owner, info.project):
                raise GatewayError(404, f"no file {file_id!r}", code="not_found", param="file_id")
            if info.kind != "sft":
                raise GatewayError(
                    400, f"file {file_id!r} holds {info.kind} rows, not chat rows", param="file_id"
                )
            if info.rows > MAX_ROWS:
                too_many = f"file {file_id!r} has {info.rows} rows; at most {MAX_ROWS}"
                raise GatewayError(400, too_many, param="file_id")
            with tempfile.TemporaryDirectory(prefix="atoll-eval-") as tmp:
                dest = Path(tmp) / "rows.jsonl"
                await fetch_dataset(agent, storage, file_id, dest, as_="chat")
                lines = dest.read_text().splitlines()
        except AtollError as exc:
            if type(exc).__name__ == "DatasetNotFound":
                raise GatewayError(404, exc.message, code="not_found", param="file_id") from None
            raise from_platform(exc) from None
        rows = []
        for n, line in enumerate(lines, start=1):
            messages = [ChatMessage.model_validate(m) for m in json.loads(line)["messages"]]
            if len(messages) < 2 or messages[-1].role != "assistant":
                raise GatewayError(
                    400,
                    f"row {n} of file {file_id!r} does not end with the assistant's reference "
                    "answer after at least one message",
                    param="file_id",
                )
            rows.append(messages)
        return rows

    async def _run(
        self, principal: Principal, record: Evaluation, rows: list[list[ChatMessage]], shown: int
    ) -> None:
        record.status = "running"
        self._save(record.id)
        scores: dict[str, list[RowScore | None]] = {m: [None] * len(rows) for m in record.models}
        answers: list[dict[str, str]] = [{} for _ in rows]
        gate = asyncio.Semaphore(ROWS_AT_ONCE)

        async def one_row(i: int) -> None:
            async with gate:
                prompt, reference = rows[i][:-1], rows[i][-1].content
                for model in record.models:
                    answer = await self._answer(principal, model, prompt, record.max_tokens)
                    logprobs = await self._score(principal, model, prompt, reference)
                    scores[model][i] = score_row(answer, reference, logprobs)
                    answers[i][model] = answer
                record.rows_done += 1

        try:
            await asyncio.gather(*(one_row(i) for i in range(len(rows))))
        except asyncio.CancelledError:
            if self._closing:
                self._end(record, "failed", STOPPED)
            else:
                self._end(record, "cancelled", None)
            raise
        except GatewayError as exc:
            self._end(record, "failed", exc.message)
            return
        except AtollError as exc:
            self._end(record, "failed", from_platform(exc).message)
            return
        record.results = [_summary(m, [s for s in scores[m] if s is not None]) for m in scores]
        record.examples = [
            Example(
                messages=[m.model_dump(exclude_none=True) for m in rows[i][:-1]],
                reference=rows[i][-1].content,
                answers=answers[i],
            )
            for i in range(min(shown, len(rows)))
        ]
        self._end(record, "succeeded", None)

    async def _answer(
        self, principal: Principal, model: str, prompt: list[ChatMessage], max_tokens: int
    ) -> str:
        target = self.gw.resolve(principal, model)
        request = GenerateRequest(
            messages=prompt,
            model=target.base,
            adapter=target.adapter,
            params=SamplingParams(temperature=0, max_new_tokens=max_tokens),
        )
        events = [e async for _, e in self.gw.run(principal, target, [request])]
        text = "".join(e.text for e in events if isinstance(e, TokenEvent))
        _finished(events)
        return text

    async def _score(
        self, principal: Principal, model: str, prompt: list[ChatMessage], reference: str
    ) -> list[float]:
        target = self.gw.resolve(principal, model)
        request = GenerateRequest(
            messages=prompt,
            model=target.base,
            adapter=target.adapter,
            continuation=reference,
            params=SamplingParams(temperature=0, max_new_tokens=1),
        )
        events = [e async for _, e in self.gw.run(principal, target, [request])]
        _finished(events)
        return [e.logprob for e in events if isinstance(e, TokenEvent) and e.logprob is not None]

    def _end(self, record: Evaluation, status: Any, message: str | None) -> None:
        record.status = status
        record.error = EvaluationError(message=message) if message else None
        record.finished_at = int(time.time())
        self._save(record.id)

    def _save(self, evaluation_id: str) -> None:
        record, owner, project = self.records[evaluation_id]
        data = {"evaluation": record.model_dump(mode="json"), "owner": owner, "project": project}
        write_json(self.root / f"{evaluation_id}.json", data)

    def _forget_old(self) -> None:
        finished = sorted(
            (r.created_at, r.id) for r, _, _ in self.records.values() if r.id not in self.runs
        )
        for _, old in finished[: max(0, len(self.records) - KEPT)]:
            del self.records[old]
            (self.root / f"{old}.json").unlink(missing_ok=True)


def _finished(events: list[Any]) -> None:
    if not events or not isinstance(events[-1], FinishEvent):
        raise GatewayError(503, "the inference node ended without finishing")
    checked_finish(events[-1])


def _summary(model: str, scores: list[RowScore]) -> ModelScores:
    tokens = sum(s.tokens for s in scores)
    return ModelScores(
        model=model,
        exact_match=mean(scores, "exact_match"),
        contains=mean(scores, "contains"),
        rouge_l=mean(scores, "rouge_l"),
        mean_logprob=sum(s.logprob * s.tokens for s in scores) / tokens if tokens else 0.0,
        reference_tokens=tokens,
    )


def install(app: FastAPI, evaluations: Evaluations, user: Any) -> None:
    """The evaluation routes; ``user`` is app.py's authenticated-caller dependency."""

    @app.post("/v1/evaluations", response_model=Evaluation, tags=["evaluations"])
    async def create(principal: user, body: CreateEvaluation) -> Any:
        return await evaluations.create(principal, body)

    @app.get("/v1/evaluations", response_model=EvaluationList, tags=["evaluations"])
    async def listing(principal: user, model: str | None = None, limit: int = 20) -> Any:
        if not 1 <= limit <= 100:
            raise GatewayError(400, "limit must be between 1 and 100", param="limit")
        return EvaluationList(data=evaluations.visible(principal, model, limit))

    @app.get("/v1/evaluations/{evaluation_id}", response_model=Evaluation, tags=["evaluations"])
    async def one(principal: user, evaluation_id: str) -> Any:
        return evaluations.get(principal, evaluation_id)

    @app.post(
        "/v1/evaluations/{evaluation_id}/cancel", response_model=Evaluation, tags=["evaluations"]
    )
    async def cancel(principal: user, evaluation_id: str) -> Any:
        return await evaluations.cancel(principal, evaluation_id)
