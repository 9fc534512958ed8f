"""The evaluation API's bodies (Atoll's own, beside OpenAI's fine-tuning ones): what a caller
sends to start one and the evaluation object it gets back."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from atoll.plugins.gateway.bodies import RequestBody
from atoll.plugins.gateway.kept_runs import RunRecord
from atoll.plugins.gateway.openai_requests import ModelName

MAX_MODELS = 8
MAX_ROWS = 1000  # rows of one evaluation: each runs once per model, twice (answer and score)
MAX_EXAMPLES = 20


class CreateEvaluation(RequestBody):
    """Run the held-out chat rows of ``file_id`` (each ending with the assistant's reference
    answer) through every model of ``models`` (base models, adapters, ``base:adapter``)."""

    file_id: str = Field(min_length=1, max_length=256)
    models: list[ModelName] = Field(min_length=1, max_length=MAX_MODELS)
    max_tokens: int = Field(128, ge=1, le=2048)  # of each greedy answer
    examples: int = Field(3, ge=0, le=MAX_EXAMPLES)  # rows shown with every model's answer


class ModelScores(BaseModel):
    """One model's figures over the rows: the means of exact match, contains-the-reference and
    ROUGE-L F1, and the mean log-probability per token of the references after their prompts."""

    model: str
    exact_match: float
    contains: float
    rouge_l: float
    mean_logprob: float
    reference_tokens: int


class Example(BaseModel):
    messages: list[dict[str, Any]]
    reference: str
    answers: dict[str, str]  # model -> its greedy answer


class Evaluation(RunRecord):
    object: Literal["evaluation"] = "evaluation"
    file_id: str
    models: list[str]
    max_tokens: int
    rows: int
    rows_done: int = 0
    results: list[ModelScores] = Field(default_factory=list)
    examples: list[Example] = Field(default_factory=list)


class EvaluationList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Evaluation]
