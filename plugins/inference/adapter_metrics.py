"""Per-adapter request metrics of the ``local`` backend, in the meaning of vLLM's
``vllm:lora_requests_info`` (which adapters have requests running, which have requests waiting).

vLLM puts the adapter lists into label values of one gauge; here each adapter is a label value of
``lora_requests_running`` / ``lora_requests_waiting`` (bounded: past ``limit`` adapters the rest
share ``other``, so thousands of adapters stay a bounded set of series), and the distinct counts
are plain gauges. Waiting spans the adapter's load and the engine's queue; running starts when
the row joins the batch. All updates happen on the event loop.
"""

from __future__ import annotations

from collections import Counter as Tally

from atoll.agent.metrics import BoundedLabel, MetricsRegistry

LABELLED_ADAPTERS = 64


class LoraRequests:
    def __init__(self, metrics: MetricsRegistry, limit: int = LABELLED_ADAPTERS) -> None:
        self.metrics = metrics
        self.label = BoundedLabel(limit)
        self.tally: dict[str, Tally[str]] = {"waiting": Tally(), "running": Tally()}
        self.adapters = {
            state: metrics.gauge(
                f"lora_adapters_{state}", f"Distinct adapters with requests {state}"
            )
            for state in self.tally
        }

    def arrive(self, adapter: str) -> Tracked:
        self.metrics.counter(
            "lora_requests", "Requests by adapter", {"adapter": self.label(adapter)}
        ).inc()
        self.move(adapter, None, "waiting")
        return Tracked(self, adapter)

    def move(self, adapter: str, src: str | None, dst: str | None) -> None:
        for state, delta in ((src, -1), (dst, 1)):
            if state is None:
                continue
            tally = self.tally[state]
            tally[adapter] += delta
            if not tally[adapter]:
                del tally[adapter]
            self.metrics.gauge(
                f"lora_requests_{state}",
                f"Requests {state} by adapter",
                {"adapter": self.label(adapter)},
            ).inc(delta)
            self.adapters[state].set(len(tally))


class Tracked:
    """One request's place: waiting (its adapter loading, or queued), running, then gone."""

    def __init__(self, owner: LoraRequests, adapter: str) -> None:
        self.owner, self.adapter = owner, adapter
        self.state: str | None = "waiting"

    def start(self) -> None:
        if self.state == "waiting":
            self.owner.move(self.adapter, "waiting", "running")
            self.state = "running"

    def end(self, tokens: int) -> None:
        if self.state is None:
            return
        self.owner.move(self.adapter, self.state, None)
        self.state = None
        if tokens:
            label = {"adapter": self.owner.label(self.adapter)}
            self.owner.metrics.counter("lora_tokens", "Completion tokens by adapter", label).inc(
                tokens
            )
