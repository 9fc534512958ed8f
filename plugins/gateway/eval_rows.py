"""Held-out chat rows scored on the inference nodes, for evaluations and mixture searches: the
rows read from a file the caller may see, each row's greedy answer and its reference's
log-probabilities, every request through ``Gateway.run`` like the caller's own (model access,
limits, budgets, the ledger)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from atoll.agent.errors import AtollError
from atoll.plugins.gateway.accounts.keys import Principal
from atoll.plugins.gateway.bodies import checked_finish
from atoll.plugins.gateway.errors import GatewayError, from_platform
from atoll.plugins.gateway.eval_metrics import RowScore, mean, score_row
from atoll.plugins.gateway.evaluation_shapes import ModelScores
from atoll.plugins.gateway.file_access import may_see
from atoll.plugins.gateway.service import Gateway, Target
from atoll.plugins.inference.contract import (
    ChatMessage,
    FinishEvent,
    GenerateRequest,
    SamplingParams,
    TokenEvent,
)
from atoll.plugins.storage.contract.datasets import describe_dataset, fetch_dataset

Row = list[ChatMessage]  # the prompt's messages, then the assistant's reference answer


async def held_out_rows(
    gw: Gateway, principal: Principal, file_id: str, max_rows: int
) -> list[Row]:
    """The file's chat rows (each with at least one message before the reference) if the
    caller may see it; 400 for a file that is no held-out set."""
    agent, storage = gw.agent, gw.storage_address()
    try:
        info = await describe_dataset(agent, storage, file_id)
        if not may_see(gw.accounts, principal, info.owner, info.project):
            raise GatewayError(404, f"no file {file_id!r}", code="not_found", param="file_id")
        if info.kind != "sft":
            raise GatewayError(
                400, f"file {file_id!r} holds {info.kind} rows, not chat rows", param="file_id"
            )
        if info.rows > max_rows:
            too_many = f"file {file_id!r} has {info.rows} rows; at most {max_rows}"
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


async def score(
    gw: Gateway, principal: Principal, target: Target, row: Row, max_tokens: int | None
) -> tuple[RowScore, str | None]:
    """``row`` under ``target``: its figures and the greedy answer (``max_tokens`` of it), or,
    with ``max_tokens`` None, the reference's log-probabilities alone (no answer, text figures
    0)."""
    prompt, reference = row[:-1], row[-1].content
    answer = (
        None if max_tokens is None else await _answer(gw, principal, target, prompt, max_tokens)
    )
    logprobs = await _logprobs(gw, principal, target, prompt, reference)
    return score_row(answer or "", reference, logprobs), answer


def _request(target: Target, prompt: Row, **given: Any) -> GenerateRequest:
    return GenerateRequest(
        messages=prompt, model=target.base, adapter=target.adapter, mixture=target.mixture, **given
    )


async def _answer(
    gw: Gateway, principal: Principal, target: Target, prompt: Row, max_tokens: int
) -> str:
    params = SamplingParams(temperature=0, max_new_tokens=max_tokens)
    events = [
        e async for _, e in gw.run(principal, target, [_request(target, prompt, params=params)])
    ]
    _finished(events)
    return "".join(e.text for e in events if isinstance(e, TokenEvent))


async def _logprobs(
    gw: Gateway, principal: Principal, target: Target, prompt: Row, reference: str
) -> list[float]:
    request = _request(
        target,
        prompt,
        continuation=reference,
        params=SamplingParams(temperature=0, max_new_tokens=1),
    )
    events = [e async for _, e in gw.run(principal, target, [request])]
    _finished(events)
    return [e.logprob for e in events if isinstance(e, TokenEvent) and e.logprob is not None]


def _finished(events: list[Any]) -> None:
    if not events or not isinstance(events[-1], FinishEvent):
        raise GatewayError(503, "the inference node ended without finishing")
    checked_finish(events[-1])


def summarize(model: str, scores: list[RowScore]) -> ModelScores:
    """One model's figures over its rows; the log-probability is per reference token."""
    tokens = sum(s.tokens for s in scores)
    return ModelScores(
        model=model,
        exact_match=mean(scores, "exact_match"),
        contains=mean(scores, "contains"),
        rouge_l=mean(scores, "rouge_l"),
        mean_logprob=sum(s.logprob * s.tokens for s in scores) / tokens if tokens else 0.0,
        reference_tokens=tokens,
    )
