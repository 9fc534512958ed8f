"""The inference plugin's service, as other plugins (the gateway) see it: method names, message
schemas and errors. Importing this file pulls in no torch and no backend.

Overlay surface of an agent's ``inference`` plugin:

    RPC   generate        GenerateRequest          -> GenerateResult
    RPC   embed           EmbedRequest             -> EmbedResult
    RPC   adapters        {}                       -> list[AdapterInfo]
    RPC   load_adapter    AdapterRef               -> AdapterInfo
    RPC   unload_adapter  AdapterRef               -> {"unloaded": bool}
    RPC   pin_adapter     AdapterRef + {pinned}    -> AdapterInfo
    RPC   info            {}                       -> NodeInfo
    RPC   health          {}                       -> Health
    STREAM generate       GenerateRequest          -> one JSON line per GenerateEvent
    STREAM transcribe     TranscribeHeader         -> ``size`` audio bytes in; ``{"delta": text}``
                                                      lines (``stream``), a TranscribeResult line

Each RPC is a ``Method`` in the table below: the plugin serves it from there, and a caller
calls it through ``Client(agent, "node/inference").invoke(EMBED, request)``. A stream's last
line is always a ``finish`` event (or the stream is reset with an error). Audio rides the data
plane as a transcribe stream's body, in chunks under the window's flow control: one RPC message
would be refused past the broker's 8 MiB.
(Over 400 lines: the contract is the one file a caller imports, so every message of the service
is here.)
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Callable
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, Field, model_validator

from atoll.agent.contract import Method, NoParams, Strict
from atoll.agent.errors import AtollError
from atoll.agent.streams import Stream, StreamReset
from atoll.agent.transfer import Reader, open_transfer, send_bytes, write_line

if TYPE_CHECKING:
    from atoll.agent.node import Overlay

PLUGIN = "inference"
MAX_PROMPT_CHARS = 1_000_000
MAX_PROMPT_TOKENS = 131_072  # a prompt given as token ids
MAX_TOP_LOGPROBS = 20  # alternatives per token, as OpenAI's chat API allows
MAX_STOP_SEQUENCES = 8
MAX_MIXTURE = 8
MAX_AUDIO_BYTES = 200 * 1024 * 1024  # one transcription's audio file
MAX_RESULT_BYTES = 64 * 1024 * 1024  # a transcription's reply line (a verbose_json of hours)
MergeStrategy = Literal["linear", "ties", "dare_linear", "dare_ties", "svd"]
FinishReason = Literal["stop", "length", "tool_calls", "abort"]


# --- errors (rebuilt by class name on the caller's side once this module is imported) ----------
# A node also answers AdapterNotFound, which storage defines (storage owns adapters):
# ``atoll.plugins.storage.contract.adapters``.


class AdapterRejected(AtollError):
    """The adapter exists but this node refuses to load it (wrong base, too large, corrupt)."""


class Overloaded(AtollError):
    """The node's queue is full; try another node or later."""


class BackendUnavailable(AtollError):
    """The backend (a LoRAX or OpenAI-compatible server) cannot be reached or is unhealthy."""


class Unsupported(AtollError):
    """This backend does not offer that operation or option."""


# --- requests -------------------------------------------------------------------------------


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field(max_length=MAX_PROMPT_CHARS)
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class SamplingParams(Strict):
    """Sampling as transformers and LoRAX understand it; temperature 0 means greedy."""

    max_new_tokens: int = Field(default=256, ge=1, le=32768)
    temperature: float = Field(default=1.0, ge=0.0, le=10.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)  # 0: no top-k cut
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    stop: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(
        default_factory=list, max_length=MAX_STOP_SEQUENCES
    )
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    do_sample: bool | None = None  # None: sample iff temperature > 0
    ignore_eos: bool = False  # decode max_new_tokens whatever the model says (benchmarks)

    @property
    def greedy(self) -> bool:
        return self.do_sample is False or (self.do_sample is None and self.temperature == 0.0)


class AdapterWeight(Strict):
    id: str = Field(min_length=1, max_length=256)
    weight: float = Field(ge=-10.0, le=10.0)


class Mixture(Strict):
    """A weighted combination of adapters, merged into one adapter (LoRAX ``merged_adapters``)."""

    adapters: list[AdapterWeight] = Field(min_length=1, max_length=MAX_MIXTURE)
    merge_strategy: MergeStrategy = "linear"
    density: float = Field(1.0, gt=0.0, le=1.0)  # ties/dare: fraction of weights kept
    majority_sign_method: Literal["total", "frequency"] = "total"

    @model_validator(mode="after")
    def _distinct(self) -> Mixture:
        ids = [a.id for a in self.adapters]
        if len(set(ids)) != len(ids):
            raise ValueError("a mixture names each adapter once")
        return self

    def key(self) -> str:
        """The cache key: the same mixture always merges to the same adapter."""
        body = self.model_dump(mode="json")
        body["adapters"] = sorted(body["adapters"], key=lambda a: a["id"])
        return "mix:" + json.dumps(body, sort_keys=True, separators=(",", ":"))


# The W3C trace context of the gateway's routing span (version 00), sent only when the gateway
# exports traces: it rides inside the sealed payload, never in the broker-visible header.
Traceparent = Annotated[str, Field(pattern=r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")]


class GenerateRequest(Strict):
    """One completion: a raw ``prompt``, the same as ``prompt_token_ids`` (used as given: no
    special tokens added) or chat ``messages`` (rendered with the model's template), on the base
    model, one ``adapter`` or a ``mixture``. ``echo`` sends the prompt's tokens back first, each
    with its logprob under the model (what lm-evaluation-harness scores with);
    ``top_logprobs`` adds that many most likely alternatives to each token's logprob.
    ``continuation`` scores a text after the prompt or messages instead of generating: the
    events are its tokens (``echo``) with their logprobs, then the finish."""

    prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    prompt_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, min_length=1, max_length=MAX_PROMPT_TOKENS
    )
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    model: str | None = None  # a base model id; None: this node's base
    adapter: str | None = Field(None, min_length=1, max_length=256)
    adapter_source: Literal["storage", "local", "hub", "s3"] | None = None
    mixture: Mixture | None = None
    # A member of a compressed collection loaded on the node is served by its core; True: by
    # the original adapter (the fallback).
    uncompressed: bool = False
    params: SamplingParams = Field(default_factory=SamplingParams)
    # Passed to backends that support them (an OpenAI-compatible upstream); others refuse.
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    continuation: str | None = Field(None, min_length=1, max_length=MAX_PROMPT_CHARS)
    request_id: str | None = Field(None, max_length=128)
    traceparent: Traceparent | None = None

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        given = [x is not None for x in (self.prompt, self.prompt_token_ids, self.messages)]
        if sum(given) != 1:
            raise ValueError("give exactly one of prompt, prompt_token_ids or messages")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs")
        if self.echo and self.messages is not None:
            raise ValueError("echo is for prompts, not messages")
        if self.continuation is not None and self.echo:
            raise ValueError("a continuation is scored on its own: no echo of the prompt")
        if self.adapter is not None and self.mixture is not None:
            raise ValueError("give an adapter or a mixture, not both")
        return self


class EmbedRequest(Strict):
    input: list[Annotated[str, Field(max_length=100_000)]] = Field(min_length=1, max_length=2048)
    model: str | None = None
    normalize: bool = True
    traceparent: Traceparent | None = None


class TranscribeOptions(Strict):
    """What to do with an audio file: ``task`` transcribe keeps its language, translate gives
    English (``/v1/audio/translations``)."""

    filename: str = Field("audio.wav", max_length=256)
    model: str | None = Field(None, max_length=256)
    task: Literal["transcribe", "translate"] = "transcribe"
    language: str | None = Field(None, min_length=2, max_length=32)
    prompt: str | None = Field(None, max_length=4096)
    response_format: Literal["json", "text", "verbose_json", "srt", "vtt"] = "json"
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    stream: bool = False  # partial text as it is heard (backends that can: the local one)


class TranscribeRequest(TranscribeOptions):
    """The options and the audio, as a backend takes them."""

    audio: bytes = Field(min_length=1, max_length=MAX_AUDIO_BYTES)


class TranscribeHeader(TranscribeOptions):
    """A transcribe stream's parameters: the options and how many audio bytes follow."""

    size: int = Field(ge=1, le=MAX_AUDIO_BYTES)


class AdapterRef(Strict):
    id: str = Field(min_length=1, max_length=256)
    pinned: bool | None = None


class CollectionRef(Strict):
    id: str = Field(min_length=1, max_length=256)  # in storage: "collections/<user>/<name>"


# --- replies --------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class TokenEvent(BaseModel):
    """Newly decoded text (possibly empty while a multi-byte character or a possible stop
    sequence is held back) and the token it came from."""

    type: Literal["token"] = "token"
    text: str
    token_id: int | None = None
    logprob: float | None = None  # None for a prompt's first token: nothing comes before it
    top: list[tuple[str, float]] | None = None  # the most likely tokens there, best first
    echo: bool = False  # a token of the prompt (GenerateRequest.echo), not a generated one


class FinishEvent(BaseModel):
    type: Literal["finish"] = "finish"
    finish_reason: FinishReason
    usage: Usage
    model: str
    adapter: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


GenerateEvent = Annotated[TokenEvent | FinishEvent, Field(discriminator="type")]


class GenerateResult(BaseModel):
    text: str
    finish_reason: FinishReason
    usage: Usage
    model: str
    adapter: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    logprobs: list[float] | None = None


class EmbedResult(BaseModel):
    model: str
    embeddings: list[list[float]]
    usage: Usage


class TranscribeResult(BaseModel):
    model: str
    text: str  # for text, srt and vtt: the whole reply
    body: Any = None  # json and verbose_json: the reply's object (segments, duration, ...)


class AdapterInfo(BaseModel):
    id: str
    base_model: str
    rank: int
    target_modules: list[str]
    pinned: bool = False
    loaded: bool = True
    size_bytes: int = 0
    load_seconds: float = 0.0
    mixture: bool = False


class NodeInfo(BaseModel):
    backend: str
    base_model: str
    models: list[str]  # what generate accepts as ``model``
    adapters: list[str]  # loaded now
    max_batch: int
    max_adapters: int  # adapters kept loaded (cache capacity)
    queue_depth: int = 0
    running: int = 0
    tokens_per_s: float = 0.0
    embeddings: str | None = None  # the embedding model, if this node embeds
    transcription: str | None = None  # the transcription model, if this node transcribes
    # Compressed collections loaded (compression.py), each with the members it serves
    collections: dict[str, list[str]] = Field(default_factory=dict)


def described(info: NodeInfo) -> dict[str, Any]:
    """What a node says of itself in discovery: its announcement in its own tenant, and what
    an importing tenant's gateway makes of its ``info`` (``atoll.agent.imports``)."""
    return {
        "capabilities": {
            "backend": info.backend,
            "base_model": info.base_model,
            "models": info.models,
            "adapters": info.adapters,
            "max_batch": info.max_batch,
            "max_adapters": info.max_adapters,
            "embeddings": info.embeddings,
            "transcription": info.transcription,
            "collections": info.collections,
        },
        "load": {
            "queue_depth": info.queue_depth,
            "running": info.running,
            "tokens_per_s": info.tokens_per_s,
        },
    }


class Health(BaseModel):
    ok: bool
    backend: str
    detail: dict[str, Any] = Field(default_factory=dict)


class Unloaded(BaseModel):
    unloaded: bool  # False: it was not loaded


class CollectionInfo(BaseModel):
    id: str
    base_model: str
    rank: int
    members: list[str]


# --- methods ----------------------------------------------------------------------------------

# Refusals name the request model ("invalid GenerateRequest: ..."): no ``what``.
GENERATE = Method[GenerateRequest, GenerateResult]("generate", GenerateRequest, GenerateResult)
EMBED = Method[EmbedRequest, EmbedResult]("embed", EmbedRequest, EmbedResult)
# Served as a stream, not an RPC: the audio is its body (``transcribe`` below).
TRANSCRIBE = Method[TranscribeHeader, TranscribeResult](
    "transcribe", TranscribeHeader, TranscribeResult
)
ADAPTERS = Method[NoParams, list[AdapterInfo]]("adapters", NoParams, list[AdapterInfo])
LOAD_ADAPTER = Method[AdapterRef, AdapterInfo]("load_adapter", AdapterRef, AdapterInfo)
UNLOAD_ADAPTER = Method[AdapterRef, Unloaded]("unload_adapter", AdapterRef, Unloaded)
PIN_ADAPTER = Method[AdapterRef, AdapterInfo]("pin_adapter", AdapterRef, AdapterInfo)
# What a node holds in memory for every caller: its operators' to change (PLUGIN_MANAGERS)
LOAD_COLLECTION = Method[CollectionRef, CollectionInfo](
    "load_collection", CollectionRef, CollectionInfo
)
UNLOAD_COLLECTION = Method[CollectionRef, Unloaded]("unload_collection", CollectionRef, Unloaded)
INFO = Method[NoParams, NodeInfo]("info", NoParams, NodeInfo)
HEALTH = Method[NoParams, Health]("health", NoParams, Health)
GENERATE_STREAM = GENERATE.name  # the stream service: the RPC's name and parameters


def parse_event(line: bytes | str) -> TokenEvent | FinishEvent:
    """One line of a generate stream."""
    data = json.loads(line)
    if data.get("type") == "finish":
        return FinishEvent.model_validate(data)
    return TokenEvent.model_validate(data)


# --- calling an inference node over the overlay -------------------------------------------------


async def stream_generate(
    agent: Overlay, address: str, request: GenerateRequest
) -> AsyncGenerator[TokenEvent | FinishEvent, None]:
    """Generate on the node at ``address`` (``agent/inference``), yielding events as they come.
    Leaving the iteration early aborts the stream, and the node stops generating."""
    params = request.model_dump(mode="json", exclude_none=True)
    stream = await agent.open_stream(address, GENERATE_STREAM, params)
    finished = False
    try:
        buffer = b""
        while not finished:
            chunk = await stream.read()
            if not chunk:
                raise StreamReset("the inference stream ended before its finish event")
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                event = parse_event(line)
                finished = event.type == "finish"
                yield event
    finally:
        if finished:
            await stream.close()
        else:
            stream.abort(StreamReset("the caller stopped reading"))


async def transcribe(
    agent: Overlay,
    address: str,
    request: TranscribeRequest,
    idle: float,
    on_delta: Callable[[str], None] | None = None,
) -> TranscribeResult:
    """Transcribe on the node at ``address``: the options open a transcribe stream, the audio
    follows in chunks, and the node's last JSON line is the result (an error resets the stream);
    ``on_delta`` is given each partial text line before it (sent when ``request.stream``).
    ``idle``: the longest any step (sending, or the node working) may take."""
    header = TranscribeHeader(**request.model_dump(exclude={"audio"}), size=len(request.audio))
    params = header.model_dump(mode="json", exclude_none=True)
    async with open_transfer(agent, address, TRANSCRIBE.name, params, idle) as stream:
        await send_bytes(stream, _pieces(request.audio), len(request.audio), idle)
        await stream.write_eof()
        reader = Reader(stream, idle)
        while isinstance(delta := (line := await reader.line(MAX_RESULT_BYTES)).get("delta"), str):
            if on_delta is not None:
                on_delta(delta)
        return TRANSCRIBE.check_reply(line)


async def _pieces(data: bytes, size: int = 1024 * 1024) -> AsyncGenerator[bytes, None]:
    view = memoryview(data)
    for start in range(0, len(view), size):
        yield bytes(view[start : start + size])


async def reply_delta(stream: Stream, text: str) -> None:
    """The node's side of a transcribe stream: one partial text."""
    await write_line(stream, {"delta": text})


async def reply_transcription(stream: Stream, result: TranscribeResult) -> None:
    """The node's side of a transcribe stream's end: the result as its last line."""
    await write_line(stream, result.model_dump(mode="json"))
