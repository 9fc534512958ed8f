"""The ``echo`` backend: deterministic tokens at no compute cost, so benchmarks and tests measure
the platform's own overhead (overlay, gateway, streaming) and nothing else.

It answers with the words of the prompt (the last message of a chat), one token per word, after
the adapter's name in brackets; embeddings are vectors derived from a hash of each input.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

from pydantic import BaseModel, ConfigDict, Field

from atoll.plugins.inference.backend import Backend
from atoll.plugins.inference.contract import (
    EmbedRequest,
    EmbedResult,
    FinishEvent,
    FinishReason,
    GenerateRequest,
    Health,
    NodeInfo,
    TokenEvent,
    Usage,
)


class EchoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = "echo"
    delay: float = Field(0.0, ge=0.0, le=10.0)  # seconds per token, to imitate a slow model
    max_batch: int = Field(64, ge=1)
    dimensions: int = Field(8, ge=1, le=4096)  # of the embeddings


class EchoBackend(Backend):
    kind = "echo"

    def __init__(self, config: EchoConfig) -> None:
        self.config = config
        self.running = 0
        self.seen_adapters: dict[str, None] = {}  # in order of first use

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent | FinishEvent]:
        # A request holds exactly one of messages and prompt.
        source = request.messages[-1].content if request.messages else request.prompt or ""
        words = source.split()
        adapter = request.adapter or (request.mixture.key() if request.mixture else None)
        if adapter:
            self.seen_adapters[adapter] = None
            words = [f"[{adapter}]", *words]
        limit = request.params.max_new_tokens
        reason: FinishReason = "length" if len(words) > limit else "stop"
        text = ""
        completed = 0
        self.running += 1
        try:
            for i, word in enumerate(words[:limit]):
                candidate = text + (word if i == 0 else " " + word)
                cuts = [candidate.find(s) for s in request.params.stop if s in candidate]
                end = min(cuts) if cuts else len(candidate)
                if self.config.delay:
                    await asyncio.sleep(self.config.delay)
                if end > len(text):
                    yield TokenEvent(text=candidate[len(text) : end], token_id=i)
                    completed += 1
                text = candidate[:end]
                if cuts:
                    reason = "stop"
                    break
        finally:
            self.running -= 1
        yield FinishEvent(
            finish_reason=reason,
            usage=Usage(prompt_tokens=len(source.split()), completion_tokens=completed),
            model=self.config.model,
            adapter=adapter,
        )

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        dims = self.config.dimensions
        vectors = []
        for text in request.input:
            digest = hashlib.sha256(text.encode()).digest() * (1 + dims // 32)
            vec = [(b - 127.5) / 127.5 for b in digest[:dims]]
            if request.normalize:
                norm = sum(v * v for v in vec) ** 0.5 or 1.0
                vec = [v / norm for v in vec]
            vectors.append(vec)
        tokens = sum(len(t.split()) for t in request.input)
        return EmbedResult(
            model=self.config.model, embeddings=vectors, usage=Usage(prompt_tokens=tokens)
        )

    def info(self) -> NodeInfo:
        return NodeInfo(
            backend=self.kind,
            base_model=self.config.model,
            models=[self.config.model],
            adapters=list(self.seen_adapters)[-64:],
            max_batch=self.config.max_batch,
            max_adapters=0,
            running=self.running,
            embeddings=self.config.model,
        )

    async def health(self) -> Health:
        return Health(ok=True, backend=self.kind)
