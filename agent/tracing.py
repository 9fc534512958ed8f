"""Optional OpenTelemetry traces for plugins: one tracer provider per plugin that asks for one,
exporting OTLP over HTTP/protobuf in batches, and the W3C ``traceparent`` a request carries
across the overlay.

Off by default: a plugin without an endpoint gets ``NO_TRACER``, OpenTelemetry's no-op tracer
(no provider, no exporter, no thread; its spans are non-recording singletons), so traced code
has no branch of its own. A provider is the plugin's own rather than the process-wide global:
several agents may share one process (tests, ``atoll up``), each with its own service name
and resource, and a plugin's stop flushes and shuts down only what it started.

The trace context crosses the overlay inside the end-to-end sealed payload (a ``traceparent``
field of the request a contract defines), never in the broker-visible header. The core knows
no plugin: plugins name their service and what they put in spans.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit

from opentelemetry.context import Context
from opentelemetry.trace import NoOpTracer, Span, Tracer, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from atoll.protocol.trust import AgentIdentity

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

NO_TRACER: Final[Tracer] = NoOpTracer()
# One export, its retries included: what a collector that is down costs a plugin's stop (per
# batch of 512 spans still queued).
EXPORT_TIMEOUT_S = 5.0
MAX_TRACEPARENT = 55  # "00-" + 32 + "-" + 16 + "-" + 2: the only version-00 length

_PROPAGATOR = TraceContextTextMapPropagator()


def check_endpoint(url: str | None) -> str | None:
    """A config's ``otlp_traces_endpoint``: an http(s) URL with a host (the collector's OTLP/HTTP
    traces path, usually ``http://collector:4318/v1/traces``); None stays off."""
    if url is None:
        return None
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"otlp_traces_endpoint {url!r} is not an http(s) URL with a host "
            "(e.g. http://collector:4318/v1/traces)"
        )
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number in range
    except ValueError as exc:
        raise ValueError(f"otlp_traces_endpoint {url!r}: {exc}") from None
    return url


class Tracing:
    """A plugin's tracer provider: spans batched to ``endpoint`` under ``service`` (e.g.
    ``atoll-gateway``), with the agent's name, tenant and region on every span's resource."""

    def __init__(self, endpoint: str, service: str, agent: AgentIdentity) -> None:
        # The SDK and exporter (protobuf, requests) are imported only when tracing is on.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        resource = Resource.create(
            {
                "service.name": service,
                "service.instance.id": f"{agent.name}@{agent.tenant}",
                "atoll.agent": agent.name,
                "atoll.tenant": agent.tenant,
                "atoll.region": agent.region,
            }
        )
        self.provider: TracerProvider = TracerProvider(resource=resource)
        exporter = OTLPSpanExporter(endpoint=endpoint, timeout=EXPORT_TIMEOUT_S)
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer: Tracer = self.provider.get_tracer("atoll")

    def close(self) -> None:
        """Export what is queued and end the exporter's thread: the batch processor's shutdown
        drains its queue first (a force_flush before it would only repeat that, and its
        timeout is not honoured by this SDK version)."""
        self.provider.shutdown()


def start_tracing(endpoint: str | None, service: str, agent: AgentIdentity) -> Tracing | None:
    """A provider when ``endpoint`` is set; None (trace nothing, start nothing) otherwise."""
    return Tracing(endpoint, service, agent) if endpoint else None


def traceparent(span: Span) -> str | None:
    """``span``'s W3C traceparent, to carry in a request; None for a non-recording span (tracing
    off), so nothing is sent then."""
    if not span.is_recording():
        return None
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, set_span_in_context(span))
    return carrier.get("traceparent")


def parent_context(value: str | None) -> Context | None:
    """The context a received ``traceparent`` names, to start a child span in; None when there
    is none or it is malformed (a client's header: anything odd is ignored, never an error)."""
    if not value or len(value) > MAX_TRACEPARENT:
        return None
    context = _PROPAGATOR.extract({"traceparent": value})
    return context if context else None
