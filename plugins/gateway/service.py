"""What the gateway does for a request, apart from HTTP: who is calling, which model and adapters
they named and may use, limits, routing to an inference node, and the ledger. The routes only turn
HTTP bodies into these calls and events back into HTTP.
(Over 400 lines: a request's path — who, which model, limits and budget, the node, the
ledger — reads best in one place; what each step uses lives in its own module.)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from opentelemetry import trace

from atoll.agent.metrics import MetricsRegistry
from atoll.agent.watch import TenantWatch
from atoll.plugins.gateway.accounts import Accounts
from atoll.plugins.gateway.accounts.adapters import policy_labels
from atoll.plugins.gateway.accounts.keys import Principal
from atoll.plugins.gateway.accounts.ledger import Ledger
from atoll.plugins.gateway.bodies import Event, usage_of
from atoll.plugins.gateway.catalog import Catalog
from atoll.plugins.gateway.errors import GatewayError, ended_status
from atoll.plugins.gateway.fresh_reads import FreshReads
from atoll.plugins.gateway.limits import Permit, RateLimiter
from atoll.plugins.gateway.router import ModelRouter, ReplyMethod
from atoll.plugins.gateway.spending import TEMPLATE_TOKENS, Spending, prompt_estimate
from atoll.plugins.gateway.telemetry import GatewayMetrics
from atoll.plugins.gateway.traces import answered, requested
from atoll.plugins.inference.contract import (
    EMBED,
    FinishEvent,
    GenerateRequest,
    Mixture,
    Usage,
)


@dataclass(frozen=True)
class Target:
    """What a request's ``model`` (and mixture) resolved to."""

    model: str  # as the caller named it, echoed in responses
    base: str | None
    adapter: str | None = None
    mixture: Mixture | None = None
    labels: dict[str, str] = field(default_factory=dict)  # routing policy (phi=true, ...)

    @property
    def adapter_label(self) -> str | None:
        return self.adapter or (self.mixture.key() if self.mixture else None)


class Gateway:
    def __init__(
        self,
        accounts: Accounts,
        limiter: RateLimiter,
        router: ModelRouter,
        watch: TenantWatch,
        metrics: MetricsRegistry,
        own_feed: Callable[[], dict[str, Any]],
        request_timeout: float,
        max_body_bytes: int,
        storage: str | None = None,
        queue: str | None = None,
        label_values: int = 100,
        spending: Spending | None = None,
    ) -> None:
        self.started = time.time()
        self.agent = router.agent
        self.storage = storage  # the storage agent (files); None: found by discovery
        self.queue = queue  # the training queue's agent (fine-tuning); None: discovery
        self.accounts = accounts
        self.ledger = Ledger(accounts)
        self.limiter = limiter
        self.router = router
        self.watch = watch
        self.catalog = Catalog(watch.discovery, accounts, int(self.started))
        self.request_timeout = request_timeout
        self.max_body_bytes = max_body_bytes
        self.telemetry = GatewayMetrics(metrics, label_values)
        self.own_feed = own_feed  # this agent's feed message, built on the spot
        self.spending = spending or Spending(accounts, {}, TEMPLATE_TOKENS, request_timeout + 60)
        self._key_checks: FreshReads[str, Principal] = FreshReads(
            lambda token: accounts.offload(accounts.authenticate, token)
        )
        # Interactive requests not answering yet (no first event): batch_gate.py waits for none.
        self.interactive_waiting = 0

    # --- who and what ------------------------------------------------------------------------

    async def authenticate(self, authorization: str | None) -> Principal:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise GatewayError(401, "missing API key: send 'Authorization: Bearer <key>'")
        token = token.strip()
        if self.accounts.shared:  # PostgreSQL: the cache, once every commit before now is heard
            if await self.accounts.heard_all():
                cached = self.accounts.authenticate_cached(token)
                if cached is not None:
                    return cached
            return await self._key_checks(token)
        return self.accounts.authenticate(token)  # SQLite: cached, microseconds

    def resolve(
        self,
        principal: Principal,
        model: str,
        mixture: Mixture | None = None,
    ) -> Target:
        """``model`` is a base id, an adapter id, ``base:adapter`` or a named mixture; a mixture
        names its base in ``model``. Each adapter must be one the caller may use (403/404
        otherwise), and the policy labels of its project follow the request to the nodes that
        may serve it."""
        if mixture is not None:
            parts = [self.accounts.check_use(principal, a.id) for a in mixture.adapters]
            for access in parts:
                if access.base_model != model:
                    raise GatewayError(
                        400,
                        f"adapter {access.id!r} is for {access.base_model!r}, not {model!r}",
                        param="adapters",
                    )
            labels = policy_labels(principal, *parts)
            return Target(model=model, base=model, mixture=mixture, labels=labels)
        base, sep, adapter = model.partition(":")
        if not sep and model in self.catalog.base_models():  # no store lookup for a base
            return Target(model=model, base=model, labels=policy_labels(principal))
        if sep or self.accounts.adapter(model) is not None:
            access = self.accounts.check_use(principal, adapter if sep else model)
            if sep and access.base_model != base:
                raise GatewayError(
                    404,
                    f"adapter {adapter!r} is for {access.base_model!r}, not {base!r}",
                    code="model_not_found",
                    param="model",
                )
            labels = policy_labels(principal, access)
            return Target(model=model, base=access.base_model, adapter=access.id, labels=labels)
        saved = self.accounts.visible_mixture(principal, model)
        if saved is not None:  # its adapters checked as any mixture's, for this caller
            return replace(self.resolve(principal, saved.base_model, saved.mixture), model=model)
        raise GatewayError(
            404,
            f"the model {model!r} does not exist or you do not have access to it",
            code="model_not_found",
            param="model",
        )

    def storage_address(self) -> str:
        return self.storage or self._service("storage", None, "no storage agent is online")

    def queue_address(self) -> str:
        return self.queue or self._service(
            "training", {"queue": True}, "no training queue is online"
        )

    def _service(self, plugin: str, capability: dict[str, Any] | None, missing: str) -> str:
        found = self.watch.discovery.select(plugin=plugin, capability=capability)
        if not found:
            raise GatewayError(503, missing, code="no_capacity")
        return f"{found[0].name}/{plugin}"

    def default_base(self) -> str:
        """The base model when a request names none (LoRAX's API has no model field): the only
        one served, or a clear error naming the choices."""
        bases = sorted(self.catalog.base_models())
        if len(bases) == 1:
            return bases[0]
        if not bases:
            raise GatewayError(503, "no inference node is online", code="no_capacity")
        raise GatewayError(
            400, f"several base models are served ({', '.join(bases)}): name one with an adapter"
        )

    async def call(
        self,
        principal: Principal,
        model: str,
        method: ReplyMethod,
        params: Any,
        prompt_text: str | None,
        background: bool = False,
        on_delta: Callable[[str], None] | None = None,
    ) -> Any:
        """A one-reply inference call (``EMBED``, ``TRANSCRIBE``), with limits and ledger;
        ``background`` for a batch's (not counted as interactive traffic waiting);
        ``on_delta``: a streamed transcription's partial text, as it comes."""
        kind, operation, served = (
            ("embedding", "embeddings", self.catalog.embedding_models())
            if method is EMBED
            else ("transcription", "transcription", self.catalog.transcription_models())
        )
        if model not in served:
            raise GatewayError(
                404,
                f"no {kind} model {model!r} is served (now: {', '.join(sorted(served)) or 'none'})",
                code="model_not_found",
                param="model",
            )
        request_id = uuid.uuid4().hex
        span = trace.get_current_span()  # the request's server span (traces.py), if traced
        requested(span, principal, request_id, operation, model, None)
        await self.spending.reserve_call(principal, request_id, model, params)
        permit = self._admit(principal, request_id)
        # Charged before the node is asked (inference_routes.py hands an EmbedRequest, not a
        # dict), so a burst of concurrent calls cannot all pass the limit; transcriptions have
        # no text in.
        estimate = prompt_estimate(params) if method is EMBED else 0
        permit.charge(estimate)
        started = time.perf_counter()
        status, tokens = 200, estimate
        waiting = not background
        self.interactive_waiting += waiting
        try:
            reply, _route = await self.router.call(
                method, params, model, policy_labels(principal), self.request_timeout, on_delta
            )
            counted = (reply.get("usage") or {}).get("prompt_tokens")
            if counted is not None:  # the node's count settles it; none: the estimate stays
                tokens = int(counted)
            return reply
        except BaseException as exc:
            status = ended_status(exc)
            raise
        finally:
            self.interactive_waiting -= waiting
            usage = Usage(prompt_tokens=tokens)
            latency = await self._settle(
                principal, permit, request_id, model, None, usage, status, started, prompt_text
            )
            self.telemetry.record(principal.project, operation, model, None, usage, status, latency)
            answered(span, operation, usage, status)

    # --- running -----------------------------------------------------------------------------

    async def run(
        self,
        principal: Principal,
        target: Target,
        requests: list[GenerateRequest],
        per_prompt: int = 1,
        prompt_text: str | None = None,
        operation: str = "chat",
        background: bool = False,
    ) -> AsyncGenerator[tuple[int, Event], None]:
        """Events of ``requests`` (the choices of one API request, ``per_prompt`` per prompt) as
        ``(choice, event)``, tokens as they arrive. Limits apply to the whole request; its
        ledger row is written once every choice has finished, before the caller ends its
        response, with the usage the response reports; ``operation`` is its
        ``gen_ai.operation.name`` in the metrics. Its budgets hold the most it can spend before
        it is sent; tokens are charged to the rate limits as they are spent: the prompt at
        admission (estimated), each completion token as it is handed to the response, so a
        client that leaves mid-stream has paid for what it got. ``background``: a batch's
        request, which interactive ones waiting for their first event hold back."""
        request_id = requests[0].request_id or uuid.uuid4().hex
        model = target.base or target.model
        span = trace.get_current_span()  # the request's server span (traces.py), if traced
        requested(
            span, principal, request_id, operation, target.model, target.adapter_label, requests
        )
        await self.spending.reserve_generate(
            principal, request_id, model, target.adapter, requests, per_prompt
        )
        permit = self._admit(principal, request_id)
        estimate = sum(prompt_estimate(r) for r in requests[::per_prompt])
        permit.charge(estimate)
        sent = 0
        started = time.perf_counter()
        finishes: list[tuple[int, FinishEvent]] = []
        usage = Usage()
        status = 200
        streams = [
            self.router.stream(
                r.model_copy(update={"request_id": request_id}), target.labels, self.request_timeout
            )
            for r in requests
        ]
        # One choice (the usual case) is read straight through: no task, no queue.
        events = _tagged(streams[0]) if len(streams) == 1 else _interleaved(streams)
        ttft: float | None = None
        waiting = not background
        self.interactive_waiting += waiting
        try:
            async for index, item in events:
                if ttft is None:
                    ttft = time.perf_counter() - started
                    self.interactive_waiting -= waiting
                    waiting = False
                if item.type == "finish":
                    finishes.append((index, item))
                    usage = usage_of(finishes, per_prompt)
                else:
                    sent += 1
                    permit.charge(1)
                yield index, item
        except BaseException as exc:
            status = ended_status(exc)
            raise
        finally:
            self.interactive_waiting -= waiting
            await events.aclose()
            if len(finishes) < len(streams):  # cut short: what was admitted and sent counts
                usage = Usage(
                    prompt_tokens=max(usage.prompt_tokens, estimate),
                    completion_tokens=max(usage.completion_tokens, sent),
                )
            latency = await self._settle(
                principal,
                permit,
                request_id,
                model,
                target.adapter_label,
                usage,
                status,
                started,
                prompt_text,
            )
            self.telemetry.record(
                principal.project,
                operation,
                model,
                target.adapter_label,
                usage,
                status,
                latency,
                ttft,
                len(streams),
            )
            answered(span, operation, usage, status, finishes)

    def _admit(self, principal: Principal, request_id: str) -> Permit:
        """Past the rate limits, after the budgets' reservation: given back if they refuse."""
        try:
            return self.limiter.admit(principal, *self.accounts.limits_for(principal))
        except BaseException:
            self.spending.release(request_id)
            raise

    async def _settle(
        self,
        principal: Principal,
        permit: Permit,
        request_id: str,
        model: str,
        adapter: str | None,
        usage: Usage,
        status: int,
        started: float,
        prompt_text: str | None,
    ) -> float:
        """A finished request: its tokens to the limits, its row and cost to the ledger and its
        budgets (written when this returns); its latency."""
        permit.done(usage.total_tokens)
        latency = time.perf_counter() - started
        row = self.accounts.usage_row(
            principal,
            request_id=request_id,
            model=model,
            adapter=adapter,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            status=status,
            latency_ms=round(latency * 1000, 3),
            prompt_text=prompt_text,
            cost=self.spending.cost(model, adapter, usage),
        )
        await self.ledger.write(row)
        return latency


async def _tagged(stream: Any) -> AsyncGenerator[tuple[int, Event], None]:
    try:
        async for event in stream:
            yield 0, event
    finally:
        await stream.aclose()


async def _interleaved(streams: list[Any]) -> AsyncGenerator[tuple[int, Event], None]:
    """The events of several choices as they come, each tagged with its choice."""
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(index: int, stream: Any) -> None:
        try:
            async for event in stream:
                await queue.put((index, event))
            await queue.put((index, None))  # this choice is complete
        except BaseException as exc:
            await queue.put((index, exc))
            raise

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t
        for stream in streams:
            await stream.aclose()
