"""What every inference backend offers the plugin. The plugin owns the overlay side (RPC, streams,
discovery, metrics); a backend only turns requests into tokens."""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from atoll.plugins.inference.contract import (
    AdapterInfo,
    BackendUnavailable,
    CollectionInfo,
    EmbedRequest,
    EmbedResult,
    FinishEvent,
    GenerateRequest,
    Health,
    NodeInfo,
    TokenEvent,
    TranscribeRequest,
    TranscribeResult,
    Unsupported,
)

# Given by the plugin to backends that load adapters themselves: make adapter ``id`` available
# under the directory ``root`` (fetched from the storage agent over the data plane, unless already
# there or found in a configured local directory) and return the adapter's own directory.
AdapterFetcher = Callable[[str, Path], Awaitable[Path]]
Partial = Callable[[str], None]  # a piece of a transcription's text, as soon as it is heard


class Backend(ABC):
    kind: str = ""
    # Whether ``generate`` takes prompt token ids, echoes prompts with their logprobs and reports
    # alternatives (``top_logprobs``); the plugin refuses those requests for backends that don't.
    scores_prompts: bool = False

    async def start(self) -> None:  # noqa: B027 - an optional hook
        """Load models, open clients; raise to refuse starting."""

    async def stop(self) -> None:  # noqa: B027 - an optional hook
        """Release what ``start`` took; requests still running end with an error."""

    @abstractmethod
    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent | FinishEvent]:
        """Token events, then exactly one finish event. Cancelling the iteration (closing the
        async generator) frees the request's place at once."""

    @abstractmethod
    def info(self) -> NodeInfo: ...

    @abstractmethod
    async def health(self) -> Health: ...

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        raise Unsupported(f"the {self.kind} backend does not embed")

    async def transcribe(
        self, request: TranscribeRequest, partial: Partial | None = None
    ) -> TranscribeResult:
        """The whole transcription; with ``request.stream``, a backend that can hands
        ``partial`` each piece of text as it is heard (on the event loop)."""
        raise Unsupported(f"the {self.kind} backend does not transcribe audio")

    def adapters(self) -> list[AdapterInfo]:
        return []

    async def load_adapter(self, adapter_id: str) -> AdapterInfo:
        raise Unsupported(f"the {self.kind} backend manages its own adapters")

    async def unload_adapter(self, adapter_id: str) -> bool:
        raise Unsupported(f"the {self.kind} backend manages its own adapters")

    async def pin_adapter(self, adapter_id: str, pinned: bool) -> AdapterInfo:
        raise Unsupported(f"the {self.kind} backend manages its own adapters")

    async def load_collection(self, collection_id: str) -> CollectionInfo:
        raise Unsupported(f"the {self.kind} backend serves no compressed collections")

    async def unload_collection(self, collection_id: str) -> bool:
        raise Unsupported(f"the {self.kind} backend serves no compressed collections")


def stream_event(raw: bytes | str, sender: str) -> dict[str, Any]:
    """One event an upstream server (``sender``, as errors name it) streamed, as the JSON object
    it must be; BackendUnavailable otherwise."""
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise BackendUnavailable(f"{sender} sent a malformed stream event: {e}") from e
    if not isinstance(data, dict):
        raise BackendUnavailable(f"{sender} sent a stream event that is not a JSON object")
    return data


def unit_vector(vector: list[float]) -> list[float]:
    """``vector`` scaled to length 1 (a zero vector stays as it is)."""
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector] if norm > 0 else vector
