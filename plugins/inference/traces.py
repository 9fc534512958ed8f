"""An inference node's OTLP traces (``otlp_traces_endpoint``; agent/tracing.py sets the provider
up): a span per generate or embed request, continuing the trace whose ``traceparent`` the
gateway's routing span sent inside the sealed request (a request without one starts a trace).

A generate span says when the first event came (a ``first_token`` event, and
``gen_ai.latency.time_to_first_token``: the wait for a batch slot and the prefill, which the
backends do not report apart), how long decoding took after it
(``gen_ai.latency.time_in_model_decode``) and the whole (``gen_ai.latency.e2e``), in seconds,
under the names vLLM's spans use, with the tokens and finish reason; never prompt or completion
text. An OpenAI-compatible upstream (a vLLM server) is sent the span's ``traceparent`` header,
so its own spans, if it exports any, continue the trace.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer

from atoll.agent.tracing import parent_context, traceparent
from atoll.plugins.inference.contract import (
    EmbedRequest,
    EmbedResult,
    FinishEvent,
    GenerateRequest,
    TokenEvent,
)

EmbedCall = Callable[[EmbedRequest], Awaitable[EmbedResult]]


class GenerateTrace:
    """The span of one generation on this node, fed its events as they are made."""

    def __init__(
        self, tracer: Tracer, request: GenerateRequest, base_model: str, queue_depth: int
    ) -> None:
        adapter = request.adapter or (request.mixture.key() if request.mixture else None)
        self.span = tracer.start_span(
            f"generate {base_model}",
            context=parent_context(request.traceparent),
            kind=SpanKind.SERVER,
            attributes={
                "gen_ai.operation.name": "generate",
                "gen_ai.request.model": base_model,
                "gen_ai.request.max_tokens": request.params.max_new_tokens,
                "gen_ai.request.temperature": request.params.temperature,
                "atoll.request.id": request.request_id or "",
                "atoll.adapter": adapter or "",
                "atoll.queue_depth": queue_depth,  # requests waiting when this one came
            },
        )
        self.started = time.perf_counter()
        self.first: float | None = None
        self.finished = False

    @property
    def traceparent(self) -> str | None:
        return traceparent(self.span)

    def event(self, event: TokenEvent | FinishEvent, now: float) -> None:
        if self.first is None:
            self.first = now
            self.span.add_event("first_token")
            self.span.set_attribute("gen_ai.latency.time_to_first_token", now - self.started)
        if isinstance(event, FinishEvent):
            self.finished = True
            self.span.set_attributes(
                {
                    "gen_ai.usage.input_tokens": event.usage.prompt_tokens,
                    "gen_ai.usage.output_tokens": event.usage.completion_tokens,
                    "gen_ai.response.finish_reasons": [event.finish_reason],
                    "gen_ai.response.model": event.model,
                    "gen_ai.latency.time_in_model_decode": now - self.first,
                    "gen_ai.latency.e2e": now - self.started,
                }
            )

    def end(self, error: BaseException | None) -> None:
        """``error``: why the generation stopped (a fault, or the caller leaving); once the
        finish event is out, the caller closing the events is no failure."""
        if error is not None and not self.finished:
            self.span.set_attribute("error.type", type(error).__name__)
            self.span.set_status(Status(StatusCode.ERROR, str(error)[:200]))
        self.span.end()


async def traced_embed(tracer: Tracer, request: EmbedRequest, embed: EmbedCall) -> EmbedResult:
    """``embed(request)`` inside its span, continuing the gateway's trace."""
    with tracer.start_as_current_span(
        "embeddings",
        context=parent_context(request.traceparent),
        kind=SpanKind.SERVER,
        attributes={"gen_ai.operation.name": "embeddings", "atoll.inputs": len(request.input)},
    ) as span:
        result = await embed(request)
        span.update_name(f"embeddings {result.model}")
        span.set_attributes(
            {
                "gen_ai.request.model": result.model,
                "gen_ai.usage.input_tokens": result.usage.prompt_tokens,
            }
        )
        return result
