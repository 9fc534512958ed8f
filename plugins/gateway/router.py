"""Routing: which inference agent serves a request, and streaming its events back with retries.

Candidates come from the discovery view: ACTIVE agents offering the ``inference`` plugin, serving
the base model, carrying every label of the caller's routing policy (when the only such agents
have gone STALE, a request waits a while for one to be heard again). Agents that already hold the
adapter go first (no load, no fetch); the rest are ordered by power of two choices on their load.

A node that fails before its first event is skipped and the next candidate is tried (up to
``attempts``): nothing has reached the client yet, so a retry is invisible to it. After the first
event an error propagates, since the client already has text. Errors that are the request's fault
are never retried elsewhere: every node would refuse the same request.

Each request returns a ``Route`` naming the node that served it and the failures before it, for
the caller's metrics and logs, and with traces on (traces.py) a routing span under the request's
span, whose W3C traceparent travels to the node inside the sealed request. (Over 400 lines:
streamed and one-reply requests share the choosing, waiting, retry and tracing rules, which
belong together.)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from opentelemetry import context as otel_context
from opentelemetry.trace import Span, Tracer
from pydantic import BaseModel

from atoll.agent.contract import Method
from atoll.agent.discovery import Discovery, Entry, Status
from atoll.agent.errors import AtollError, DeadlineExceeded, InvalidRequest
from atoll.agent.node import Overlay
from atoll.agent.tracing import NO_TRACER
from atoll.plugins.gateway.errors import GatewayError, ended_status, from_platform
from atoll.plugins.gateway.traces import attempt, routed, routing
from atoll.plugins.inference.contract import (
    EMBED,
    PLUGIN,
    TRANSCRIBE,
    AdapterRejected,
    EmbedRequest,
    EmbedResult,
    FinishEvent,
    GenerateRequest,
    TokenEvent,
    TranscribeHeader,
    TranscribeRequest,
    TranscribeResult,
    Unsupported,
    stream_generate,
    transcribe,
)
from atoll.plugins.storage.contract.adapters import AdapterNotFound

# The request's own fault: another node would refuse it the same way.
REQUEST_FAULTS = (InvalidRequest, AdapterRejected, AdapterNotFound, Unsupported)
FIRST_EVENT_TIMEOUT = 10.0  # seconds a node may take to open the stream and send its first event
# The inference methods that answer in one reply, and their names.
ReplyMethod = Method[EmbedRequest, EmbedResult] | Method[TranscribeHeader, TranscribeResult]
ReplyName = Literal["embed", "transcribe"]
REPLY_METHODS: dict[str, ReplyMethod] = {EMBED.name: EMBED, TRANSCRIBE.name: TRANSCRIBE}
Event = TokenEvent | FinishEvent


@dataclass
class Route:
    """Where a request went: the node that served it (the last one tried, if none did) and one
    ``"node: error"`` line per node that failed before answering."""

    node: str | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def retries(self) -> int:
        """Nodes that failed before answering (each one meant trying another)."""
        return len(self.failures)


class RoutedStream:
    """The events of one routed generation, with its ``route`` (filled in as it goes). Errors
    before the first event (503, 504, the request's 4xx) come from the first ``anext``, so a
    caller can still answer with an HTTP status."""

    def __init__(self, events: AsyncGenerator[Event, None], route: Route) -> None:
        self._events = events
        self.route = route

    def __aiter__(self) -> RoutedStream:
        return self

    async def __anext__(self) -> Event:
        return await self._events.__anext__()

    async def aclose(self) -> None:
        """Stop early: the node's stream is aborted and it stops generating."""
        await self._events.aclose()


def _num(value: Any) -> float:
    """A load figure from an announcement (network data): anything odd counts as zero."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0.0
    return number if number == number and number >= 0 else 0.0  # NaN and negatives: zero


def _caps(entry: Entry) -> dict[str, Any]:
    caps = entry.capabilities.get(PLUGIN)
    return caps if isinstance(caps, dict) else {}


def _holds(entry: Entry, adapter: str) -> bool:
    """Whether the node has the adapter in memory: loaded, or a member of a loaded compressed
    collection."""
    caps = _caps(entry)
    loaded, collections = caps.get("adapters"), caps.get("collections")
    if isinstance(loaded, list) and adapter in loaded:
        return True
    return isinstance(collections, dict) and any(
        isinstance(members, list) and adapter in members for members in collections.values()
    )


def _describe_labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return " with labels " + ", ".join(f"{k}={v}" for k, v in sorted(labels.items()))


class ModelRouter:
    """Sends the gateway's inference requests to the nodes serving their model (the broker's
    ``Router`` routes frames; this one routes requests)."""

    def __init__(
        self,
        agent: Overlay,
        discovery: Discovery,
        attempts: int = 3,
        *,
        first_event_timeout: float = FIRST_EVENT_TIMEOUT,
    ) -> None:
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        if first_event_timeout <= 0:
            raise ValueError("first_event_timeout must be positive")
        self.agent = agent
        self.discovery = discovery
        self.attempts = attempts
        self.first_event_timeout = first_event_timeout
        # Requests this gateway has running per node: announced load lags a heartbeat behind,
        # so without this a burst would all land on whichever node looked idle last.
        self.inflight: dict[str, int] = {}
        self.prefer_imported = False  # other tenants' nodes (agent@tenant) before our own
        self.tracer: Tracer = NO_TRACER  # the gateway's, when it exports traces (traces.py)
        self._rng = random.Random()

    # --- choosing ---------------------------------------------------------------------------------

    def candidates(
        self,
        base_model: str | None,
        adapter: str | None,
        labels: dict[str, str],
        status: Status = Status.ACTIVE,
    ) -> list[Entry]:
        """Nodes that may serve a generation, best first."""
        capability = {"models": base_model} if base_model else None
        found = self.discovery.select(
            plugin=PLUGIN, capability=capability, labels=labels, status=status
        )
        own = [e for e in found if "@" not in e.name]
        imported = [e for e in found if "@" in e.name]  # another tenant's, through a grant
        first, then = (imported, own) if self.prefer_imported else (own, imported)
        return self._order(first or then, adapter)

    def saturated(self, base_model: str | None, labels: dict[str, str]) -> bool:
        """Every ACTIVE node that could serve ``base_model`` (None: any) has requests waiting,
        as last announced: background work (batches) waits rather than queue behind them."""
        nodes = self.candidates(base_model, None, labels)
        return bool(nodes) and all(_num(e.load.get("queue_depth")) > 0 for e in nodes)

    def _serving(
        self, kind: str, model: str | None, labels: dict[str, str], status: Status = Status.ACTIVE
    ) -> list[Entry]:
        """Nodes whose ``kind`` model (embeddings, transcription) is ``model`` (None: any)."""
        found = self.discovery.select(plugin=PLUGIN, labels=labels, status=status)
        if model:
            return self._order([e for e in found if _caps(e).get(kind) == model], None)
        return self._order([e for e in found if _caps(e).get(kind)], None)

    async def _awaited(self, pick: Callable[[Status], list[Entry]], deadline: float) -> list[Entry]:
        """ACTIVE nodes ``pick`` chooses; none, but some gone STALE (silent for a few beats:
        a broker restarting, a link failing over): wait for them to be heard again, up to the
        first-event timeout within the deadline, rather than fail at once."""
        nodes = pick(Status.ACTIVE)
        if nodes or not pick(Status.STALE):
            return nodes
        wait = min(deadline, asyncio.get_running_loop().time() + self.first_event_timeout)
        return await self.discovery.until(
            lambda: pick(Status.ACTIVE), wait - asyncio.get_running_loop().time()
        )

    def _order(self, entries: list[Entry], adapter: str | None) -> list[Entry]:
        holders = [e for e in entries if adapter and _holds(e, adapter)]
        others = [e for e in entries if e not in holders]
        return self._two_choices(holders) + self._two_choices(others)

    def _two_choices(self, entries: list[Entry]) -> list[Entry]:
        """Power of two choices, repeated: each place goes to the less loaded of two nodes drawn
        at random from those left. Random draws keep equal nodes evenly used and spread a herd
        of gateways acting on the same stale load figures."""
        pool, ordered = list(entries), []
        while pool:  # one node leaves the pool per turn
            if len(pool) == 1:
                pick = pool[0]
            else:
                a, b = self._rng.sample(pool, 2)
                pick = a if self._load(a) <= self._load(b) else b
            pool.remove(pick)
            ordered.append(pick)
        return ordered

    def _load(self, entry: Entry) -> float:
        """Waiting requests, plus the running batch's share of the node's batch capacity."""
        max_batch = max(1.0, _num(_caps(entry).get("max_batch")))
        running = _num(entry.load.get("running")) + self.inflight.get(entry.name, 0)
        return _num(entry.load.get("queue_depth")) + running / max_batch

    # --- generation -------------------------------------------------------------------------------

    def stream(
        self, request: GenerateRequest, labels: dict[str, str], deadline_s: float
    ) -> RoutedStream:
        """Generate ``request`` on the best node, yielding its events as they arrive; the whole
        generation must end within ``deadline_s`` (else GatewayError 504, and the node stops).
        Callers set ``request.model`` (for an adapter, its base from the registry): without it
        every inference node is a candidate, whatever base it serves."""
        if deadline_s <= 0:
            raise ValueError("deadline_s must be positive")
        route = Route()
        # The caller's context (its request's span) is taken now: the events are read later.
        parent = otel_context.get_current()
        return RoutedStream(self._stream(request, dict(labels), deadline_s, route, parent), route)

    async def _stream(
        self,
        request: GenerateRequest,
        labels: dict[str, str],
        deadline_s: float,
        route: Route,
        parent: otel_context.Context,
    ) -> AsyncGenerator[Event, None]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + deadline_s
        adapter = request.adapter or (request.mixture.key() if request.mixture else None)
        span = routing(self.tracer, parent, request.model or adapter or "any")
        nodes: list[Entry] = []
        error: int | None = None
        finished = False  # the finish event is out: a caller closing the events after it is fine
        try:
            nodes = await self._awaited(
                lambda status: self.candidates(request.model, adapter, labels, status), deadline
            )
            if not nodes:
                what = request.model or request.adapter or "text generation"
                raise GatewayError(
                    503, f"no inference node serves {what}{_describe_labels(labels)}"
                )
            last: AtollError | None = None
            for entry in nodes[: self.attempts]:
                await self._link_up(deadline)
                route.node = entry.name
                self.inflight[entry.name] = self.inflight.get(entry.name, 0) + 1
                sent = request
                if tp := attempt(span, entry.name, _why(entry, nodes, adapter, route)):
                    sent = request.model_copy(update={"traceparent": tp})
                events = stream_generate(self.agent, f"{entry.name}/{PLUGIN}", sent)
                try:
                    try:
                        event = await self._first(events, deadline, deadline_s)
                    except _NodeFailed as failed:
                        route.failures.append(f"{entry.name}: {failed.error.message}")
                        last = failed.error
                        continue
                    finished = event.type == "finish"
                    yield event
                    while not finished:
                        event = await self._next(events, deadline, deadline_s, entry.name)
                        finished = event.type == "finish"
                        yield event
                    return
                finally:
                    await events.aclose()  # aborts the node's stream unless it finished
                    self._done(entry.name)
            route.node = None
            assert last is not None  # the loop ran at least once and every attempt failed
            raise _exhausted(route, last)
        except BaseException as exc:
            error = None if finished else ended_status(exc)
            raise
        finally:
            routed(span, len(nodes), route.failures, error)

    async def _first(
        self, events: AsyncIterator[Event], deadline: float, deadline_s: float
    ) -> Event:
        """The node's first event; _NodeFailed when another node may do better."""
        loop = asyncio.get_running_loop()
        limit = min(deadline, loop.time() + self.first_event_timeout)
        try:
            async with asyncio.timeout_at(limit):
                return await anext(events)
        except TimeoutError:
            if loop.time() >= deadline:
                raise _deadline(deadline_s) from None
            raise _NodeFailed(
                AtollError(f"no first event within {self.first_event_timeout}s")
            ) from None
        except StopAsyncIteration:  # stream_generate never ends without a finish event
            raise _NodeFailed(AtollError("the stream ended without an event")) from None
        except DeadlineExceeded as exc:  # the node's or the overlay's own time limit
            if loop.time() >= deadline:
                raise _deadline(deadline_s) from exc
            raise _NodeFailed(exc) from exc
        except REQUEST_FAULTS as exc:
            raise from_platform(exc) from exc
        except AtollError as exc:
            raise _NodeFailed(exc) from exc
        except ValueError as exc:  # a malformed event line: a broken node
            raise _NodeFailed(AtollError(f"malformed event: {exc}")) from exc

    async def _next(
        self, events: AsyncIterator[Event], deadline: float, deadline_s: float, node: str
    ) -> Event:
        """A later event: any failure now reaches the caller (the client has text already)."""
        try:
            async with asyncio.timeout_at(deadline):
                return await anext(events)
        except TimeoutError:
            raise _deadline(deadline_s) from None
        except StopAsyncIteration:
            raise GatewayError(503, f"{node} ended the stream without finishing") from None
        except AtollError as exc:
            raise from_platform(exc) from exc
        except ValueError as exc:
            raise GatewayError(503, f"{node} sent a malformed event: {exc}") from exc

    async def _link_up(self, deadline: float) -> None:
        """While this gateway's own broker link is down (its broker died; the agent is failing
        over to another), wait for it, up to the first-event timeout within the deadline: the
        fault is ours, and trying the next node at once would fail it too, exhausting every
        attempt in a moment. Still down after that: the attempt goes ahead and fails."""
        loop = asyncio.get_running_loop()
        wait = min(deadline, loop.time() + self.first_event_timeout) - loop.time()
        if wait > 0:
            with contextlib.suppress(AtollError):
                await self.agent.wait_connected(wait)

    def _done(self, node: str) -> None:
        left = self.inflight.get(node, 0) - 1
        if left > 0:
            self.inflight[node] = left
        else:
            self.inflight.pop(node, None)

    # --- one-shot calls ---------------------------------------------------------------------------

    async def call(
        self,
        method: ReplyMethod | ReplyName,
        params: dict[str, Any] | BaseModel,
        model: str | None,
        labels: dict[str, str],
        deadline_s: float,
        on_delta: Callable[[str], None] | None = None,
    ) -> tuple[Any, Route]:
        """RPC ``EMBED``, or ``TRANSCRIBE`` (a stream carrying the audio: ``params`` is a
        TranscribeRequest), on the best node (or a method named so), retried elsewhere when a
        node fails; the reply and its route. ``model`` names the embedding or transcription
        model (None: any node that embeds or transcribes). ``on_delta`` takes a streamed
        transcription's partial text; once some has gone, a failure is not retried."""
        spec = REPLY_METHODS.get(method if isinstance(method, str) else method.name)
        if spec is None:
            raise ValueError(f"the router calls embed or transcribe, not {method!r}")
        if deadline_s <= 0:
            raise ValueError("deadline_s must be positive")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + deadline_s
        pick: Callable[[Status], list[Entry]]
        kind = "embeddings" if spec is EMBED else "transcription"
        pick = functools.partial(self._serving, kind, model, labels)
        what = f"{kind} ({model})" if model else kind
        if spec is TRANSCRIBE:
            params = TranscribeRequest.model_validate(params)
        elif isinstance(params, BaseModel):
            params = params.model_dump(exclude_none=True)
        span = routing(self.tracer, otel_context.get_current(), model or kind)
        route = Route()
        nodes: list[Entry] = []
        error: int | None = None
        try:
            nodes = await self._awaited(pick, deadline)
            if not nodes:
                where = _describe_labels(labels)
                raise GatewayError(503, f"no inference node serves {what}{where}")
            return await self._call_nodes(
                spec, params, nodes, deadline, deadline_s, route, span, on_delta
            )
        except BaseException as exc:
            error = ended_status(exc)
            raise
        finally:
            routed(span, len(nodes), route.failures, error)

    async def _call_nodes(
        self,
        spec: ReplyMethod,
        params: Any,
        nodes: list[Entry],
        deadline: float,
        deadline_s: float,
        route: Route,
        span: Span,
        on_delta: Callable[[str], None] | None,
    ) -> tuple[Any, Route]:
        """``call``'s attempts, node after node (``params``: a TranscribeRequest, or the
        embedding request's dict)."""
        loop = asyncio.get_running_loop()
        delivered = False

        def delta(text: str) -> None:
            nonlocal delivered
            delivered = True
            if on_delta is not None:
                on_delta(text)

        last: AtollError | None = None
        for entry in nodes[: self.attempts]:
            await self._link_up(deadline)
            route.node = entry.name
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise _deadline(deadline_s)
            self.inflight[entry.name] = self.inflight.get(entry.name, 0) + 1
            tp = attempt(span, entry.name, _why(entry, nodes, None, route))
            try:
                address = f"{entry.name}/{PLUGIN}"
                if spec is TRANSCRIBE:
                    async with asyncio.timeout(remaining):
                        heard = await transcribe(self.agent, address, params, remaining, delta)
                    return heard.model_dump(mode="json"), route
                sent = params | {"traceparent": tp} if tp else params
                result = await self.agent.call(address, spec.name, sent, remaining)
                return result, route
            except TimeoutError as exc:  # the transcribe stream's whole deadline
                raise _deadline(deadline_s) from exc
            except DeadlineExceeded as exc:
                if loop.time() >= deadline:
                    raise _deadline(deadline_s) from exc
                route.failures.append(f"{entry.name}: {exc.message}")
                last = exc
            except REQUEST_FAULTS as exc:
                raise from_platform(exc) from exc
            except AtollError as exc:
                if delivered:  # the caller has text already: no second node's from the start
                    raise from_platform(exc) from exc
                route.failures.append(f"{entry.name}: {exc.message}")
                last = exc
            finally:
                self._done(entry.name)
        route.node = None
        assert last is not None
        raise _exhausted(route, last)


class _NodeFailed(Exception):
    """A node failed before its first event: try the next one."""

    def __init__(self, error: AtollError) -> None:
        super().__init__(error.message)
        self.error = error


def _why(entry: Entry, nodes: list[Entry], adapter: str | None, route: Route) -> str:
    """Why ``entry`` is tried (for the routing span)."""
    if route.failures:
        return "retry"
    if adapter and _holds(entry, adapter):
        return "adapter loaded"
    return "only node" if len(nodes) == 1 else "least loaded"


def _deadline(deadline_s: float) -> GatewayError:
    return GatewayError(504, f"the request did not finish within its {deadline_s:g}s deadline")


def _exhausted(route: Route, last: AtollError) -> GatewayError:
    """Every node tried failed: the last failure's status (429 when all were overloaded, 503
    otherwise), naming each failure."""
    mapped = from_platform(last)
    tried = len(route.failures)
    return GatewayError(
        mapped.status,
        f"{tried} inference node(s) failed before answering: {'; '.join(route.failures)}",
        code=mapped.code,
        retry_after=mapped.retry_after,
    )
