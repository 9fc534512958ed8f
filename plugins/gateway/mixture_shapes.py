"""The mixture API's bodies (Atoll's own): a search for a mixture's weights on a labelled set,
its trials and winner, and named mixtures saved to be called like a model."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, model_validator

from atoll.plugins.gateway.bodies import RequestBody
from atoll.plugins.gateway.evaluation_shapes import ModelScores
from atoll.plugins.gateway.kept_runs import RunRecord
from atoll.plugins.gateway.openai_requests import ModelName
from atoll.plugins.inference.contract import MAX_MIXTURE, AdapterWeight, MergeStrategy, Mixture

MAX_TRIALS = 64
MAX_ROWS = 200  # rows of a search: each trial scores every one of them
Metric = Literal["mean_logprob", "exact_match", "contains", "rouge_l"]
AdapterId = Annotated[str, Field(min_length=1, max_length=256)]


def _distinct(ids: list[str], what: str) -> None:
    if len(set(ids)) != len(ids):
        raise ValueError(f"{what} names each one once")


class CreateMixtureSearch(RequestBody):
    """Search weights for ``adapters`` (all for the base model ``model``) that maximise
    ``metric`` on the chat rows of ``file_id`` (each ending with the reference answer); with
    ``name``, save the winner as a named mixture."""

    model: ModelName
    adapters: list[AdapterId] = Field(min_length=2, max_length=MAX_MIXTURE)
    file_id: str = Field(min_length=1, max_length=256)
    metric: Metric = "mean_logprob"  # smooth and cheap: no answer is generated for it
    merge_strategies: list[MergeStrategy] = Field(["linear"], min_length=1, max_length=5)
    density: float = Field(1.0, gt=0.0, le=1.0)  # ties/dare: fraction of weights kept
    trials: int = Field(16, ge=1, le=MAX_TRIALS)
    max_tokens: int = Field(64, ge=1, le=2048)  # each greedy answer, for the text metrics
    name: str | None = Field(None, min_length=1, max_length=160)

    @model_validator(mode="after")
    def _once(self) -> CreateMixtureSearch:
        _distinct(self.adapters, "adapters")
        _distinct(list(self.merge_strategies), "merge_strategies")
        return self


class Trial(BaseModel):
    """One candidate mixture and its figures on the rows; ``best_score`` is the best score of
    the trials up to this one (the search's curve)."""

    weights: dict[str, float]  # adapter -> weight
    merge_strategy: MergeStrategy
    score: float | None  # None: the nodes could not merge it
    best_score: float | None
    figures: ModelScores | None = None
    error: str | None = None


class MixtureSearch(RunRecord):
    object: Literal["mixture.search"] = "mixture.search"
    model: str
    adapters: list[str]
    file_id: str
    metric: Metric
    merge_strategies: list[MergeStrategy]
    density: float
    max_trials: int
    rows: int
    trials: list[Trial] = Field(default_factory=list)
    best: Trial | None = None
    mixture: str | None = None  # the named mixture saved from the winner


class MixtureSearchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[MixtureSearch]


class CreateMixture(RequestBody):
    """Save a mixture of adapters for the base ``model`` under ``name``."""

    name: str = Field(min_length=1, max_length=160)
    model: ModelName
    adapters: list[AdapterWeight] = Field(min_length=1, max_length=MAX_MIXTURE)
    merge_strategy: MergeStrategy = "linear"
    density: float = Field(1.0, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _once(self) -> CreateMixture:
        _distinct([a.id for a in self.adapters], "adapters")
        return self

    def mixture(self) -> Mixture:
        return Mixture(
            adapters=self.adapters, merge_strategy=self.merge_strategy, density=self.density
        )


class NamedMixture(BaseModel):
    id: str
    object: Literal["mixture"] = "mixture"
    created: int
    owned_by: str  # its project, else its creator
    base_model: str
    adapters: list[AdapterWeight]
    merge_strategy: MergeStrategy
    density: float
    search: str | None = None


class NamedMixtureList(BaseModel):
    object: Literal["list"] = "list"
    data: list[NamedMixture]
