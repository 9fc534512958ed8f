"""Optimised mixtures of adapters (seed 001's MELT "mixture of adapters"): a search for the
weights (and merge strategy) of candidate adapters that maximise a metric on a small labelled
set, run on the inference nodes, its curve reported, its winner saved as a named mixture that
users call like a model; and the named mixtures' own routes.

A search runs with its creator's rights, as an evaluation does (eval_rows.py): every trial is a
mixture scored on every row through ``Gateway.run``, so model access, limits, budgets and the
ledger apply to each request. The weights come from mixture_search.py; the runs are kept as
kept_runs.py keeps them (who sees one, what a restart keeps). A named mixture belongs to its
creator or, saved with a project's key, to that project (file_access.py: viewers may not save or
delete); calling one still needs the right to use each of its adapters.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations, and ``user``
# is install()'s parameter, not a global it could resolve from a string.
import asyncio
import math
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from atoll.plugins.gateway.accounts.keys import Principal
from atoll.plugins.gateway.accounts.mixtures import SavedMixture, check_mixture_name
from atoll.plugins.gateway.errors import GatewayError
from atoll.plugins.gateway.eval_metrics import RowScore
from atoll.plugins.gateway.eval_rows import Row, held_out_rows, score, summarize
from atoll.plugins.gateway.file_access import may_write
from atoll.plugins.gateway.kept_runs import KeptRuns
from atoll.plugins.gateway.mixture_search import Candidate, WeightSearch
from atoll.plugins.gateway.mixture_shapes import (
    MAX_ROWS,
    CreateMixture,
    CreateMixtureSearch,
    MixtureSearch,
    MixtureSearchList,
    NamedMixture,
    NamedMixtureList,
    Trial,
)
from atoll.plugins.gateway.service import Gateway
from atoll.plugins.inference.contract import AdapterWeight, Mixture

ROWS_AT_ONCE = 4  # rows of one trial in flight: the nodes batch them


class MixtureSearches(KeptRuns[MixtureSearch]):
    """The mixture searches of one gateway, and the named mixtures they save."""

    def __init__(self, gw: Gateway, root: Path) -> None:
        super().__init__(gw.accounts, root, MixtureSearch, "mixture search", "mixsearch")
        self.gw = gw

    async def create(self, principal: Principal, body: CreateMixtureSearch) -> MixtureSearch:
        equal = _mixture(body.adapters, [1.0] * len(body.adapters), "linear", body.density)
        self.gw.resolve(principal, body.model, equal)  # each adapter usable, all for the base
        if body.name is not None:
            self._check_name(principal, body.name)
        rows = await held_out_rows(self.gw, principal, body.file_id, MAX_ROWS)
        record = MixtureSearch(
            id=f"mixsearch-{uuid.uuid4().hex[:24]}",
            created_at=int(time.time()),
            status="queued",
            model=body.model,
            adapters=body.adapters,
            file_id=body.file_id,
            metric=body.metric,
            merge_strategies=body.merge_strategies,
            density=body.density,
            max_trials=body.trials,
            rows=len(rows),
        )
        run = self._run(principal, record, rows, body.max_tokens, body.name)
        return self.start(principal, record, run)

    # --- named mixtures ----------------------------------------------------------------------

    def save_named(self, principal: Principal, body: CreateMixture) -> NamedMixture:
        mixture = body.mixture()
        self.gw.resolve(principal, body.model, mixture)
        self._check_name(principal, body.name)
        return _named(self._saved(principal, body.name, body.model, mixture, None))

    def named(self, principal: Principal, mixture_id: str) -> SavedMixture:
        found = self.gw.accounts.visible_mixture(principal, mixture_id)
        if found is None:
            raise GatewayError(404, f"no mixture {mixture_id!r}", code="not_found")
        return found

    def delete_named(self, principal: Principal, mixture_id: str) -> None:
        found = self.named(principal, mixture_id)
        may_write(self.gw.accounts, principal, found.project, found.owner)
        self.gw.accounts.delete_mixture(mixture_id, actor=principal.user)

    def _check_name(self, principal: Principal, name: str) -> None:
        check_mixture_name(name)
        may_write(self.gw.accounts, principal, principal.project)
        if self.gw.accounts.adapter(name) or self.gw.accounts.visible_mixture(principal, name):
            raise GatewayError(409, f"a model named {name!r} exists already", param="name")

    def _saved(
        self, principal: Principal, name: str, base: str, mixture: Mixture, search: str | None
    ) -> SavedMixture:
        return self.gw.accounts.save_mixture(
            name, base, mixture, principal.user, principal.project, search, actor=principal.user
        )

    # --- running -----------------------------------------------------------------------------

    async def _run(
        self,
        principal: Principal,
        record: MixtureSearch,
        rows: list[Row],
        max_tokens: int,
        name: str | None,
    ) -> None:
        record.status = "running"
        self.save(record)
        search = WeightSearch(len(record.adapters), record.merge_strategies, record.max_trials)
        text_metric = record.metric != "mean_logprob"
        tried: dict[Candidate, Trial] = {}
        while (candidate := search.next()) is not None:
            trial = await self._trial(principal, record, rows, candidate, text_metric, max_tokens)
            search.tell(candidate, -math.inf if trial.score is None else trial.score)
            tried[candidate] = trial
            record.trials.append(trial)
            if search.best is not None and tried[search.best[0]].score is not None:
                record.best = tried[search.best[0]]
                trial.best_score = record.best.score
            self.save(record)
        if record.best is None:
            raise GatewayError(400, "no candidate mixture could be merged on the nodes")
        if name is not None:
            winner = _mixture(
                list(record.best.weights),
                list(record.best.weights.values()),
                record.best.merge_strategy,
                record.density,
            )
            self._saved(principal, name, record.model, winner, record.id)
            record.mixture = name
        self.end(record, "succeeded", None)

    async def _trial(
        self,
        principal: Principal,
        record: MixtureSearch,
        rows: list[Row],
        candidate: Candidate,
        text_metric: bool,
        max_tokens: int,
    ) -> Trial:
        weights = dict(zip(record.adapters, candidate.weights, strict=True))
        mixture = _mixture(
            record.adapters, list(candidate.weights), candidate.merge_strategy, record.density
        )
        target = self.gw.resolve(principal, record.model, mixture)
        gate = asyncio.Semaphore(ROWS_AT_ONCE)

        async def one_row(row: Row) -> RowScore:
            async with gate:
                found, _ = await score(
                    self.gw, principal, target, row, max_tokens if text_metric else None
                )
                return found

        try:
            scores = await asyncio.gather(*(one_row(row) for row in rows))
        except GatewayError as exc:
            if exc.code != "adapter_rejected":  # the nodes could not merge this one: go on
                raise
            return Trial(
                weights=weights,
                merge_strategy=candidate.merge_strategy,
                score=None,
                best_score=None,
                error=exc.message,
            )
        figures = summarize(f"trial-{len(record.trials) + 1}", list(scores))
        return Trial(
            weights=weights,
            merge_strategy=candidate.merge_strategy,
            score=getattr(figures, record.metric),
            best_score=None,
            figures=figures,
        )


def _mixture(ids: list[str], weights: list[float], strategy: Any, density: float) -> Mixture:
    """The mixture of the adapters with a weight (at least one: the search never asks for all
    zero)."""
    kept = [AdapterWeight(id=i, weight=w) for i, w in zip(ids, weights, strict=True) if w]
    return Mixture(adapters=kept, merge_strategy=strategy, density=density)


def _named(saved: SavedMixture) -> NamedMixture:
    return NamedMixture(
        id=saved.id,
        created=int(saved.created),
        owned_by=saved.project or saved.owner,
        base_model=saved.base_model,
        adapters=saved.mixture.adapters,
        merge_strategy=saved.mixture.merge_strategy,
        density=saved.mixture.density,
        search=saved.search,
    )


def install(app: FastAPI, searches: MixtureSearches, user: Any) -> None:
    """The mixture routes; ``user`` is app.py's authenticated-caller dependency."""

    @app.post("/v1/mixture_searches", response_model=MixtureSearch, tags=["mixtures"])
    async def create(principal: user, body: CreateMixtureSearch) -> Any:
        return await searches.create(principal, body)

    @app.get("/v1/mixture_searches", response_model=MixtureSearchList, tags=["mixtures"])
    async def listing(principal: user, limit: int = 20) -> Any:
        if not 1 <= limit <= 100:
            raise GatewayError(400, "limit must be between 1 and 100", param="limit")
        return MixtureSearchList(data=searches.visible(principal, limit))

    @app.get("/v1/mixture_searches/{search_id}", response_model=MixtureSearch, tags=["mixtures"])
    async def one(principal: user, search_id: str) -> Any:
        return searches.get(principal, search_id)

    @app.post(
        "/v1/mixture_searches/{search_id}/cancel", response_model=MixtureSearch, tags=["mixtures"]
    )
    async def cancel(principal: user, search_id: str) -> Any:
        return await searches.cancel(principal, search_id)

    @app.post("/v1/mixtures", response_model=NamedMixture, tags=["mixtures"])
    async def save(principal: user, body: CreateMixture) -> Any:
        return searches.save_named(principal, body)

    @app.get("/v1/mixtures", response_model=NamedMixtureList, tags=["mixtures"])
    async def named_list(principal: user) -> Any:
        found = searches.gw.accounts.visible_mixtures(principal)
        return NamedMixtureList(data=[_named(m) for m in found])

    @app.get("/v1/mixtures/{mixture_id:path}", response_model=NamedMixture, tags=["mixtures"])
    async def named_one(principal: user, mixture_id: str) -> Any:
        return _named(searches.named(principal, mixture_id))

    @app.delete("/v1/mixtures/{mixture_id:path}", tags=["mixtures"])
    async def named_delete(principal: user, mixture_id: str) -> Any:
        searches.delete_named(principal, mixture_id)
        return {"id": mixture_id, "object": "mixture.deleted", "deleted": True}
