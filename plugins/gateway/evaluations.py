"""Evaluations: a held-out set of chat rows run through base models and adapters on the same
inference nodes, each answer scored against the row's reference (eval_metrics.py), side by side.

An evaluation runs in the gateway with its creator's rights (eval_rows.py). Each row costs two
requests per model: a greedy answer, and the reference scored as a ``continuation`` after the
same messages (its tokens' logprobs). Evaluations are kept as kept_runs.py keeps runs: any key
may start one, on a file it may see and models it may use; its creator, project members and
administrators see it.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations, and ``user``
# is install()'s parameter, not a global it could resolve from a string.
import asyncio
import logging
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from atoll.agent.errors import AtollError
from atoll.plugins.gateway.accounts.keys import Principal
from atoll.plugins.gateway.errors import GatewayError
from atoll.plugins.gateway.eval_metrics import RowScore
from atoll.plugins.gateway.eval_rows import Row, held_out_rows, score, summarize
from atoll.plugins.gateway.evaluation_shapes import (
    MAX_ROWS,
    CreateEvaluation,
    Evaluation,
    EvaluationList,
    Example,
)
from atoll.plugins.gateway.kept_runs import KeptRuns
from atoll.plugins.gateway.service import Gateway
from atoll.plugins.storage.contract.adapters import note_evaluation

log = logging.getLogger(__name__)
ROWS_AT_ONCE = 4  # rows of one evaluation in flight: the nodes batch them


class Evaluations(KeptRuns[Evaluation]):
    """The evaluations of one gateway: their records (in memory and as files) and runs."""

    def __init__(self, gw: Gateway, root: Path) -> None:
        super().__init__(gw.accounts, root, Evaluation, "evaluation", "eval")
        self.gw = gw

    async def create(self, principal: Principal, body: CreateEvaluation) -> Evaluation:
        models = list(dict.fromkeys(body.models))  # each once, in the caller's order
        for model in models:
            self.gw.resolve(principal, model)  # 404 for a model the caller may not use
        rows = await held_out_rows(self.gw, principal, body.file_id, MAX_ROWS)
        record = Evaluation(
            id=f"eval-{uuid.uuid4().hex[:24]}",
            created_at=int(time.time()),
            status="queued",
            file_id=body.file_id,
            models=models,
            max_tokens=body.max_tokens,
            rows=len(rows),
        )
        return self.start(principal, record, self._run(principal, record, rows, body.examples))

    async def _run(
        self, principal: Principal, record: Evaluation, rows: list[Row], shown: int
    ) -> None:
        record.status = "running"
        self.save(record)
        scores: dict[str, list[RowScore | None]] = {m: [None] * len(rows) for m in record.models}
        answers: list[dict[str, str]] = [{} for _ in rows]
        gate = asyncio.Semaphore(ROWS_AT_ONCE)

        async def one_row(i: int) -> None:
            async with gate:
                for model in record.models:
                    target = self.gw.resolve(principal, model)
                    scores[model][i], answer = await score(
                        self.gw, principal, target, rows[i], record.max_tokens
                    )
                    answers[i][model] = answer or ""
                record.rows_done += 1

        await asyncio.gather(*(one_row(i) for i in range(len(rows))))
        record.results = [summarize(m, [s for s in scores[m] if s is not None]) for m in scores]
        record.examples = [
            Example(
                messages=[m.model_dump(exclude_none=True) for m in rows[i][:-1]],
                reference=rows[i][-1].content,
                answers=answers[i],
            )
            for i in range(min(shown, len(rows)))
        ]
        self.end(record, "succeeded", None)
        await self._keep_with_adapters(principal, record)

    async def _keep_with_adapters(self, principal: Principal, record: Evaluation) -> None:
        """Each evaluated adapter keeps the figures, every model's side by side, in its record
        in storage (``GET /v1/adapters/{id}``): they go where the adapter goes. The report
        stands if storage cannot take them."""
        summary = {
            "id": record.id,
            "created_at": record.created_at,
            "file_id": record.file_id,
            "rows": record.rows,
            "results": [r.model_dump() for r in record.results],
        }
        for model in record.models:
            target = self.gw.resolve(principal, model)
            if target.adapter is None or target.mixture is not None:
                continue
            try:
                await note_evaluation(
                    self.gw.agent, self.gw.storage_address(), target.adapter, summary
                )
            except (AtollError, GatewayError) as exc:
                log.warning("evaluation %s not kept with %s: %s", record.id, model, exc)


def install(app: FastAPI, evaluations: Evaluations, user: Any) -> None:
    """The evaluation routes; ``user`` is app.py's authenticated-caller dependency."""

    @app.post("/v1/evaluations", response_model=Evaluation, tags=["evaluations"])
    async def create(principal: user, body: CreateEvaluation) -> Any:
        return await evaluations.create(principal, body)

    @app.get("/v1/evaluations", response_model=EvaluationList, tags=["evaluations"])
    async def listing(principal: user, model: str | None = None, limit: int = 20) -> Any:
        if not 1 <= limit <= 100:
            raise GatewayError(400, "limit must be between 1 and 100", param="limit")
        ran = None if model is None else lambda r: model in r.models
        return EvaluationList(data=evaluations.visible(principal, limit, ran))

    @app.get("/v1/evaluations/{evaluation_id}", response_model=Evaluation, tags=["evaluations"])
    async def one(principal: user, evaluation_id: str) -> Any:
        return evaluations.get(principal, evaluation_id)

    @app.post(
        "/v1/evaluations/{evaluation_id}/cancel", response_model=Evaluation, tags=["evaluations"]
    )
    async def cancel(principal: user, evaluation_id: str) -> Any:
        return await evaluations.cancel(principal, evaluation_id)
