"""OpenAI's response bodies (chat completions, completions, embeddings, models) as pydantic
models, and whole responses built from a node's events (openai_streams.py sends them as they
come)."""

from __future__ import annotations

import base64
import json
import struct
import time
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from pydantic import BaseModel, Field, SerializerFunctionWrapHandler, model_serializer

from atoll.plugins.gateway.bodies import (
    Event,
    Finish,
    ModelKind,
    checked_finish,
    split_choice,
    usage_of,
)
from atoll.plugins.inference.contract import EmbedResult, FinishEvent, TokenEvent, Usage


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, usage: Usage) -> CompletionUsage:
        return cls(
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            total_tokens=usage.total_tokens,
        )


class TopLogprob(BaseModel):
    token: str
    bytes: list[int] | None
    logprob: float


class TokenLogprob(BaseModel):
    token: str
    bytes: list[int] | None
    logprob: float
    top_logprobs: list[TopLogprob] = Field(default_factory=list)  # empty unless asked for


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ToolCallDelta(ToolCall):
    index: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Finish
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: CompletionUsage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None

    @model_serializer(mode="wrap")
    def _present(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # OpenAI sends only what a delta carries: the role once, then content.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: Finish | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: CompletionUsage | None = None


class CompletionLogprobs(BaseModel):
    """A choice's tokens; with ``echo`` the prompt's come first, the very first one with no
    logprob and no alternatives (null), as OpenAI and vLLM give it."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int]


CompletionFinish = Literal["stop", "length"]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: CompletionFinish | None  # None on all but a choice's last chunk
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32, as OpenAI's SDK reads


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class CreateEmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    kind: ModelKind  # Atoll's: what it does
    parent: str | None = None  # an adapter's base model
    root: str | None = None  # vLLM's: the base model (the model itself for a base)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


# --- building responses from the node's events ------------------------------------------------


def token_logprob(event: TokenEvent) -> TokenLogprob | None:
    if event.logprob is None:
        return None
    top = [TopLogprob(token=t, bytes=list(t.encode()), logprob=v) for t, v in event.top or []]
    return TokenLogprob(
        token=event.text, bytes=list(event.text.encode()), logprob=event.logprob, top_logprobs=top
    )


def _chat_logprobs(events: Iterable[TokenEvent]) -> ChoiceLogprobs | None:
    entries = [e for e in map(token_logprob, events) if e is not None]
    return ChoiceLogprobs(content=entries) if entries else None


def tool_calls(finish: FinishEvent, tag: str) -> list[ToolCall]:
    """The node's tool calls (OpenAI's message shape; an upstream may leave out the id)."""
    calls = []
    for k, call in enumerate(finish.tool_calls or []):
        given = call.get("function")
        function = given if isinstance(given, dict) else {}
        arguments = function.get("arguments") or ""
        if not isinstance(arguments, str):  # some upstreams send the parsed object
            arguments = json.dumps(arguments)
        calls.append(
            ToolCall(
                id=call.get("id") or f"call_{tag}_{k}",
                function=FunctionCall(name=str(function.get("name") or ""), arguments=arguments),
            )
        )
    return calls


def completion_logprobs(events: Iterable[TokenEvent], offset: int) -> CompletionLogprobs | None:
    tokens: list[str] = []
    values: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for event in events:
        if event.logprob is not None or event.echo:
            tokens.append(event.text)
            values.append(event.logprob)
            # Two tokens may read the same (parts of one character): the likelier one stays.
            tops.append(None if event.top is None else dict(reversed(event.top)))
            offsets.append(offset)
        offset += len(event.text)
    if not tokens:
        return None
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=values,
        top_logprobs=tops if any(t is not None for t in tops) else None,
        text_offset=offsets,
    )


def chat_completion(
    request_id: str,
    model: str,
    choices: Sequence[Sequence[Event]],
    *,
    logprobs: bool = False,
    created: int | None = None,
) -> ChatCompletion:
    """A whole chat completion from each choice's events (all choices share one prompt)."""
    out = []
    finishes = []
    for index, events in enumerate(choices):
        tokens, finish = split_choice(events)
        finishes.append((index, finish))
        text = "".join(e.text for e in tokens)
        calls = tool_calls(finish, f"{request_id}_{index}")
        message = AssistantMessage(
            content=text or (None if calls else ""), tool_calls=calls or None
        )
        out.append(
            ChatChoice(
                index=index,
                message=message,
                finish_reason=checked_finish(finish),
                logprobs=_chat_logprobs(tokens) if logprobs else None,
            )
        )
    return ChatCompletion(
        id=f"chatcmpl-{request_id}",
        created=int(time.time()) if created is None else created,
        model=model,
        choices=out,
        usage=CompletionUsage.of(usage_of(finishes, per_prompt=max(len(choices), 1))),
    )


def completion(
    request_id: str,
    model: str,
    choices: Sequence[Sequence[Event]],
    *,
    per_prompt: int,
    logprobs: bool = False,
    created: int | None = None,
) -> Completion:
    """A whole text completion from each choice's events; ``per_prompt`` choices per prompt."""
    out = []
    finishes = []
    for index, events in enumerate(choices):
        tokens, finish = split_choice(events)
        finishes.append((index, finish))
        out.append(
            CompletionChoice(
                index=index,
                text="".join(e.text for e in tokens),
                finish_reason="length" if checked_finish(finish) == "length" else "stop",
                logprobs=completion_logprobs(tokens, 0) if logprobs else None,
            )
        )
    return Completion(
        id=f"cmpl-{request_id}",
        created=int(time.time()) if created is None else created,
        model=model,
        choices=out,
        usage=CompletionUsage.of(usage_of(finishes, per_prompt=per_prompt)),
    )


def embedding_response(
    result: EmbedResult, model: str, encoding_format: Literal["float", "base64"] | None = None
) -> CreateEmbeddingResponse:
    def encode(vector: list[float]) -> list[float] | str:
        if encoding_format != "base64":
            return vector
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()

    tokens = result.usage.prompt_tokens
    return CreateEmbeddingResponse(
        data=[Embedding(index=i, embedding=encode(v)) for i, v in enumerate(result.embeddings)],
        model=model,
        usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens),
    )
