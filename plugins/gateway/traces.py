"""The gateway's OTLP traces (``otlp_traces_endpoint``; agent/tracing.py sets the provider up):
a server span per OpenAI inference request, named and attributed after OpenTelemetry's GenAI
semantic conventions, and a routing span under it per choice (router.py), whose context the
inference node continues.

What a span carries: the operation, requested model and sampling settings, token usage and
finish reasons, the adapter (``atoll.adapter``), the caller's user and project, and the request
id the ledger and the response's ``id`` carry (``atoll.request.id``). Never prompt or completion
text: traces leave the tenant for an operator's collector.

A client's W3C ``traceparent`` header makes the server span its child; a malformed one is
ignored (a fresh trace starts), and as everywhere in W3C propagation, its sampled flag decides
whether the request is recorded. ``tracestate`` is not taken from clients.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from opentelemetry import context as otel_context
from opentelemetry.trace import (
    INVALID_SPAN,
    Span,
    SpanKind,
    Status,
    StatusCode,
    Tracer,
    get_current_span,
    set_span_in_context,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from atoll.agent.tracing import parent_context, traceparent
from atoll.plugins.gateway.accounts.keys import Principal
from atoll.plugins.inference.contract import FinishEvent, GenerateRequest, Usage

# The traced routes and their gen_ai.operation.name (as telemetry.py's metrics name them).
TRACED_PATHS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "text_completion",
    "/v1/embeddings": "embeddings",
}
GENERATES = ("chat", "text_completion")  # operations with output tokens


class TraceRequests:
    """ASGI middleware: the server span of each traced request, current while the route and
    its streamed body run (so the service and router add to it and start children under it),
    ended with the response's status: 4xx/5xx set the span's status to ERROR."""

    def __init__(self, app: ASGIApp, tracer: Tracer) -> None:
        self.app = app
        self.tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        operation = TRACED_PATHS.get(scope.get("path", "")) if scope["type"] == "http" else None
        if operation is None:
            await self.app(scope, receive, send)
            return
        parent = parent_context(_header(scope, b"traceparent"))
        span = self.tracer.start_span(
            operation,  # renamed "{operation} {model}" once the model is known (service.py)
            context=parent,
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": scope.get("method", ""),
                "url.path": scope["path"],
                "gen_ai.operation.name": operation,
            },
        )
        status = 500  # unless a response starts: the app failed before answering
        token = otel_context.attach(set_span_in_context(span))

        async def sent(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sent)
        except BaseException as exc:
            span.record_exception(exc)
            raise
        finally:
            otel_context.detach(token)
            span.set_attribute("http.response.status_code", status)
            if status >= 400:
                failed(span, status)
            span.end()


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def failed(span: Span, status: int) -> None:
    """``span`` ended in HTTP ``status`` (4xx/5xx; 499 when the client left)."""
    span.set_attribute("error.type", str(status))
    span.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))


def requested(
    span: Span,
    principal: Principal,
    request_id: str,
    operation: str,
    model: str,
    adapter: str | None,
    requests: Sequence[GenerateRequest] = (),
) -> None:
    """What a request asked for, on its server span (a no-op when tracing is off)."""
    if not span.is_recording():
        return
    span.update_name(f"{operation} {model}")
    span.set_attributes(
        {
            "gen_ai.operation.name": operation,
            "gen_ai.request.model": model,
            "atoll.request.id": request_id,
            "atoll.user": principal.user,
        }
    )
    if principal.project:
        span.set_attribute("atoll.project", principal.project)
    if adapter:
        span.set_attribute("atoll.adapter", adapter)
    if requests:
        params = requests[0].params
        span.set_attributes(
            {
                "gen_ai.request.max_tokens": params.max_new_tokens,
                "gen_ai.request.temperature": params.temperature,
                "gen_ai.request.top_p": params.top_p,
                "gen_ai.request.choice.count": len(requests),
            }
        )
        if params.seed is not None:
            span.set_attribute("gen_ai.request.seed", params.seed)


def answered(
    span: Span,
    operation: str,
    usage: Usage,
    status: int,
    finishes: Iterable[tuple[int, FinishEvent]] = (),
) -> None:
    """How a request ended, on its server span: the usage it was billed, its choices' finish
    reasons; a failure after its response began (a streamed error) marks the span too."""
    if not span.is_recording():
        return
    span.set_attribute("gen_ai.usage.input_tokens", usage.prompt_tokens)
    if operation in GENERATES:
        span.set_attribute("gen_ai.usage.output_tokens", usage.completion_tokens)
        ordered = sorted(finishes, key=lambda f: f[0])
        span.set_attribute("gen_ai.response.finish_reasons", [f.finish_reason for _, f in ordered])
    if status >= 400:
        failed(span, status)


def routing(tracer: Tracer, parent: otel_context.Context, what: str) -> Span:
    """The routing span of one choice (or one embedding call), a child of the request's span:
    its context is what the chosen node continues. Only under a recorded request span: the
    routes not traced (LoRAX's, vector stores' embeddings) and batch lines start none. A
    client span, as the node's is the server side of the same call."""
    if not get_current_span(parent).is_recording():
        return INVALID_SPAN
    return tracer.start_span(
        "route", context=parent, kind=SpanKind.CLIENT, attributes={"atoll.route.model": what}
    )


def attempt(span: Span, node: str, why: str) -> str | None:
    """``node`` is tried next, for reason ``why`` (``adapter loaded``, ``least loaded``, ``only
    node``, ``retry``); the traceparent to send it inside the sealed request (None: off)."""
    if not span.is_recording():
        return None
    span.add_event("attempt", {"atoll.route.node": node, "atoll.route.reason": why})
    span.set_attributes({"atoll.route.node": node, "atoll.route.reason": why})
    return traceparent(span)


def routed(span: Span, candidates: int, failures: Sequence[str], error: int | None) -> None:
    """The routing span's end: how many nodes could serve, the failures before the one that
    answered (each a retry), and the HTTP status when routing itself failed."""
    if span.is_recording():
        span.set_attributes(
            {"atoll.route.candidates": candidates, "atoll.route.retries": len(failures)}
        )
        if failures:
            span.set_attribute("atoll.route.failures", list(failures))
        if error is not None:
            failed(span, error)
    span.end()
