"""The gateway's own metrics, written to its plugin registry (so they ride its metrics feed and
its /metrics from the first scrape): counters by model, adapter and project, and latency and
token histograms under OpenTelemetry's GenAI semantic-convention names, translated to Prometheus
(dots to underscores, the unit as a suffix); docs/admins.md maps them."""

from __future__ import annotations

from atoll.agent.metrics import (
    REQUEST_DURATION_BUCKETS,
    TOKEN_BUCKETS,
    TPOT_BUCKETS,
    TTFT_BUCKETS,
    BoundedLabel,
    MetricsRegistry,
)
from atoll.plugins.inference.contract import Usage

DURATION = "gen_ai_server_request_duration_seconds"
TTFT = "gen_ai_server_time_to_first_token_seconds"
TPOT = "gen_ai_server_time_per_output_token_seconds"
TOKEN_USAGE = "gen_ai_client_token_usage"
GENERATES = ("chat", "text_completion")  # gen_ai.operation.name of the routes that stream tokens


class GatewayMetrics:
    def __init__(self, registry: MetricsRegistry, label_values: int) -> None:
        self.registry = registry
        # Callers name models, adapters and projects: beyond `label_values` distinct values each
        # becomes "other", so the series count stays bounded however many there are.
        self.bounded = {k: BoundedLabel(label_values) for k in ("model", "adapter", "project")}

    def record(
        self,
        project: str | None,
        operation: str,
        model: str,
        adapter: str | None,
        usage: Usage,
        status: int,
        latency: float,
        ttft: float | None = None,
        sequences: int = 1,
    ) -> None:
        """A finished request (``project``: its key's) into the metrics: counters by model,
        adapter and project; latency and token histograms by operation and model. A generate
        request's ``ttft`` and its ``sequences`` (choices decoded side by side) give its time per
        output token."""
        m, bounded = self.registry, self.bounded
        model = bounded["model"](model)
        labels = {
            "model": model,
            "adapter": bounded["adapter"](adapter or ""),
            "project": bounded["project"](project or ""),
        }
        genai = {"gen_ai_operation_name": operation, "gen_ai_request_model": model}
        error = "" if status == 200 else str(status)
        m.histogram(
            DURATION,
            "Time from a request's admission to its end (gen_ai.server.request.duration)",
            {**genai, "error_type": error},
            buckets=REQUEST_DURATION_BUCKETS,
        ).observe(latency)
        if status != 200:
            failed = {**labels, "status": error}
            m.counter("requests_failed", "API requests that ended in an error", failed).inc()
            return
        m.counter("requests", "API requests answered", labels).inc()
        m.counter("prompt_tokens", "Prompt tokens of answered requests", labels).inc(
            usage.prompt_tokens
        )
        m.counter("completion_tokens", "Completion tokens of answered requests", labels).inc(
            usage.completion_tokens
        )
        used = [("input", usage.prompt_tokens)]
        if operation in GENERATES:
            used.append(("output", usage.completion_tokens))
        for kind, tokens in used:
            m.histogram(
                TOKEN_USAGE,
                "Tokens per answered request, by type (gen_ai.client.token.usage)",
                {**genai, "gen_ai_token_type": kind},
                buckets=TOKEN_BUCKETS,
            ).observe(tokens)
        if ttft is None:
            return
        m.histogram(
            TTFT,
            "Time from admission to the first token (gen_ai.server.time_to_first_token)",
            genai,
            buckets=TTFT_BUCKETS,
        ).observe(ttft)
        per_sequence = usage.completion_tokens / sequences
        if per_sequence > 1:
            m.histogram(
                TPOT,
                "Time per output token after the first (gen_ai.server.time_per_output_token)",
                genai,
                buckets=TPOT_BUCKETS,
            ).observe((latency - ttft) / (per_sequence - 1))
