"""OpenAI's server-sent events for a request whose choices stream: one chunk per event as it
comes (``ChatStream``, ``CompletionStream``), then the usage when asked for and ``[DONE]``."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import Any

from pydantic import BaseModel

from atoll.plugins.gateway.bodies import Event, checked_finish, sse, usage_of
from atoll.plugins.gateway.errors import GatewayError
from atoll.plugins.gateway.openai_responses import (
    ChatCompletionChunk,
    ChoiceLogprobs,
    ChunkChoice,
    Completion,
    CompletionChoice,
    CompletionFinish,
    CompletionUsage,
    Delta,
    ToolCallDelta,
    completion_logprobs,
    token_logprob,
    tool_calls,
)
from atoll.plugins.inference.contract import FinishEvent, TokenEvent, Usage

DONE = b"data: [DONE]\n\n"


class _EventStream(ABC):
    """SSE for the interleaved events of a request's choices: ``chunks(index, event)`` for each
    event as it comes, then ``finish()``, or ``error(exc)`` to end the stream early."""

    def __init__(
        self,
        request_id: str,
        model: str,
        choices: int,
        *,
        per_prompt: int | None = None,
        include_usage: bool = False,
        logprobs: bool = False,
        created: int | None = None,
    ) -> None:
        self.request_id = request_id
        self.model = model
        self.choices = choices
        # Choices per prompt; None: they all share one prompt (the n choices of a chat).
        self.per_prompt = choices if per_prompt is None else per_prompt
        self.include_usage = include_usage
        self.logprobs = logprobs
        self.created = int(time.time()) if created is None else created
        self._started: set[int] = set()
        self._finishes: dict[int, FinishEvent] = {}

    @property
    def usage(self) -> Usage:
        """Over the choices finished so far."""
        return usage_of(self._finishes.items(), self.per_prompt)

    def chunks(self, index: int, event: Event) -> bytes:
        """The SSE bytes for one event of choice ``index`` (possibly none). A finish event the
        node aborted raises GatewayError: the caller then sends ``error(exc)``."""
        if not 0 <= index < self.choices or index in self._finishes:
            raise ValueError(f"no running choice {index}")
        out = b""
        if index not in self._started:
            self._started.add(index)
            out = self._start(index)
        if isinstance(event, FinishEvent):
            out += self._end(index, event)
            self._finishes[index] = event
            return out
        return out + self._token(index, event)

    def finish(self) -> bytes:
        """The usage chunk (``choices: []``) when asked for, then ``[DONE]``."""
        if len(self._finishes) != self.choices:
            raise ValueError("finish() before every choice finished")
        if not self.include_usage:
            return DONE
        return sse(self._usage_chunk(CompletionUsage.of(self.usage))) + DONE

    def error(self, exc: GatewayError) -> bytes:
        """A mid-stream error in OpenAI's shape; the stream ends after it."""
        return sse(exc.body())

    def _start(self, index: int) -> bytes:
        return b""

    @abstractmethod
    def _token(self, index: int, event: TokenEvent) -> bytes: ...

    @abstractmethod
    def _end(self, index: int, event: FinishEvent) -> bytes: ...

    @abstractmethod
    def _usage_chunk(self, usage: CompletionUsage) -> BaseModel: ...


class ChatStream(_EventStream):
    def _chunk(self, choice: ChunkChoice) -> bytes:
        return sse(
            ChatCompletionChunk(
                id=f"chatcmpl-{self.request_id}",
                created=self.created,
                model=self.model,
                choices=[choice],
            )
        )

    def _start(self, index: int) -> bytes:
        return self._chunk(ChunkChoice(index=index, delta=Delta(role="assistant", content="")))

    def _token(self, index: int, event: TokenEvent) -> bytes:
        entry = token_logprob(event) if self.logprobs else None
        if not event.text and entry is None:
            return b""  # text held back by the node: nothing to say yet
        logprobs = ChoiceLogprobs(content=[entry]) if entry else None
        return self._chunk(
            ChunkChoice(index=index, delta=Delta(content=event.text), logprobs=logprobs)
        )

    def _end(self, index: int, event: FinishEvent) -> bytes:
        reason = checked_finish(event)
        calls = tool_calls(event, f"{self.request_id}_{index}")
        out = b""
        if calls:
            deltas = [ToolCallDelta(index=k, **c.model_dump()) for k, c in enumerate(calls)]
            out = self._chunk(ChunkChoice(index=index, delta=Delta(tool_calls=deltas)))
        return out + self._chunk(ChunkChoice(index=index, delta=Delta(), finish_reason=reason))

    def _usage_chunk(self, usage: CompletionUsage) -> BaseModel:
        return ChatCompletionChunk(
            id=f"chatcmpl-{self.request_id}",
            created=self.created,
            model=self.model,
            choices=[],
            usage=usage,
        )


class CompletionStream(_EventStream):
    def __init__(
        self, request_id: str, model: str, choices: int, *, per_prompt: int, **options: Any
    ) -> None:
        super().__init__(request_id, model, choices, per_prompt=per_prompt, **options)
        self._offsets = [0] * choices  # text_offset of each choice's next token

    def _chunk(self, choice: CompletionChoice) -> bytes:
        # OpenAI streams completions in the shape of a whole one.
        return sse(
            Completion(
                id=f"cmpl-{self.request_id}",
                created=self.created,
                model=self.model,
                choices=[choice],
            )
        )

    def _token(self, index: int, event: TokenEvent) -> bytes:
        logprobs = completion_logprobs([event], self._offsets[index]) if self.logprobs else None
        self._offsets[index] += len(event.text)
        if not event.text and logprobs is None:
            return b""
        return self._chunk(
            CompletionChoice(index=index, text=event.text, finish_reason=None, logprobs=logprobs)
        )

    def _end(self, index: int, event: FinishEvent) -> bytes:
        reason: CompletionFinish = "length" if checked_finish(event) == "length" else "stop"
        return self._chunk(CompletionChoice(index=index, text="", finish_reason=reason))

    def _usage_chunk(self, usage: CompletionUsage) -> BaseModel:
        return Completion(
            id=f"cmpl-{self.request_id}",
            created=self.created,
            model=self.model,
            choices=[],
            usage=usage,
        )
