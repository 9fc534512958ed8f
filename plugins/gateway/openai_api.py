"""The HTTP bodies of the gateway's OpenAI- and LoRAX-compatible API as pydantic models, and pure
functions translating them to and from the inference contract. No FastAPI and no I/O here: app.py
parses a body with ``parse_body``, turns it into ``GenerateRequest``s with ``*_to_generate``, and
turns the node's events back into JSON or SSE with the builders at the end.

Request models check JSON types strictly (no "1" for 1) but ignore unknown top-level fields, as
OpenAI does, because SDKs send extras. A body that breaks the schema is a 422 naming the field; a
well-formed option this gateway cannot honour is a 400 with code ``unsupported_parameter``, raised
by the translation functions: presence/frequency penalties other than 0, ``logit_bias``,
``top_logprobs`` above 0 (nodes report the sampled token's logprob only), ``echo``, ``suffix``,
``best_of`` above 1, embedding ``dimensions``, and LoRAX's ``adapter_source``, ``api_token``,
``truncate``, ``typical_p``, ``watermark``, ``decoder_input_details``, ``return_k_alternatives``.
"""

from __future__ import annotations

import base64
import json
import struct
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)

from atoll.plugins.gateway.errors import GatewayError
from atoll.plugins.inference.contract import (
    MAX_MIXTURE,
    MAX_PROMPT_CHARS,
    MAX_STOP_SEQUENCES,
    AdapterWeight,
    ChatMessage,
    EmbedRequest,
    EmbedResult,
    FinishEvent,
    GenerateRequest,
    MergeStrategy,
    Mixture,
    SamplingParams,
    TokenEvent,
    Usage,
)

Event = TokenEvent | FinishEvent
B = TypeVar("B", bound=BaseModel)

MAX_CHAT_CHOICES = 8
MAX_COMPLETION_CHOICES = 32  # prompts x n on /v1/completions
MAX_MESSAGES = 4096
MAX_TOOLS = 128  # OpenAI's own limit
MAX_NEW_TOKENS = 32768  # SamplingParams' bound
MAX_EMBED_INPUTS = 2048  # EmbedRequest's bounds
MAX_EMBED_CHARS = 100_000
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default on /v1/completions; chat uses the contract's
UNKNOWN_TOKEN_ID = -1  # LoRAX tokens need an id; some backends report none
DONE = b"data: [DONE]\n\n"


# --- parsing ------------------------------------------------------------------------------------


def parse_body(model: type[B], body: bytes | str | Mapping[str, Any]) -> B:
    """A request body as ``model``: bad JSON or a non-object is a 400, a field that breaks the
    schema a 422 naming the field."""
    try:
        if isinstance(body, bytes | str):
            return model.model_validate_json(body)
        return model.model_validate(body)
    except ValidationError as exc:
        raise _invalid(exc, 422) from None


def _invalid(exc: ValidationError, status: int) -> GatewayError:
    errors = exc.errors(include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        return GatewayError(400, f"the body is not valid JSON: {first['ctx']['error']}")
    if not first["loc"] and first["type"] in ("model_type", "model_attributes_type"):
        return GatewayError(400, "the body must be a JSON object")
    param = ".".join(str(part) for part in first["loc"]) or None
    message = first["msg"].removeprefix("Value error, ")
    if param:
        message = f"{param}: {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more)"
    return GatewayError(status, message, code="invalid_value", param=param)


def _build(kind: type[B], /, **fields: Any) -> B:
    """A contract object; should the contract be stricter than the API models, a clear 400."""
    try:
        return kind(**fields)
    except ValidationError as exc:
        raise _invalid(exc, 400) from None


def _unsupported(param: str, why: str) -> GatewayError:
    return GatewayError(
        400, f"{param} is not supported: {why}", code="unsupported_parameter", param=param
    )


# --- request bodies -----------------------------------------------------------------------------


def _one_or_many(value: Any) -> Any:
    """OpenAI's "a string or a list of strings" fields, always as a list."""
    if value is None or isinstance(value, list):
        return value
    if isinstance(value, str):
        return [value]
    raise ValueError("must be a string or a list of strings")


def _texts(value: Any) -> Any:
    """Like ``_one_or_many``, with a clear word for token arrays, which need the model's
    tokenizer that the gateway does not have."""
    value = _one_or_many(value)
    if isinstance(value, list) and any(type(v) is int or isinstance(v, list) for v in value):
        raise ValueError("token arrays are not supported; send text")
    return value


def _content(value: Any) -> Any:
    """Message content: a string, or a list of text parts joined by newlines (as vLLM does)."""
    if not isinstance(value, list):
        return value
    texts = []
    for part in value:
        if not isinstance(part, dict):
            raise ValueError("content parts must be objects")
        if part.get("type") != "text":
            raise ValueError(f"content parts of type {part.get('type')!r} are not supported")
        if not isinstance(part.get("text"), str):
            raise ValueError("a text content part needs a string 'text'")
        texts.append(part["text"])
    return "\n".join(texts)


Stop = Annotated[str, Field(min_length=1, max_length=256)]
StopList = Annotated[
    Annotated[list[Stop], Field(max_length=MAX_STOP_SEQUENCES)] | None,
    BeforeValidator(_one_or_many),
]
Content = Annotated[
    Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] | None, BeforeValidator(_content)
]
Prompts = Annotated[
    list[Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]],
    Field(min_length=1, max_length=MAX_COMPLETION_CHOICES),
    BeforeValidator(_texts),
]
EmbedInputs = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=MAX_EMBED_CHARS)]],
    Field(min_length=1, max_length=MAX_EMBED_INPUTS),
    BeforeValidator(_texts),
]
ModelName = Annotated[str, Field(min_length=1, max_length=512)]


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class RequestMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Content = None
    name: str | None = Field(None, max_length=256)
    tool_call_id: str | None = Field(None, max_length=256)
    tool_calls: list[dict[str, Any]] | None = Field(None, max_length=MAX_TOOLS)

    @model_validator(mode="after")
    def _complete(self) -> RequestMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        return self

    def to_contract(self) -> ChatMessage:
        return _build(
            ChatMessage,
            role="system" if self.role == "developer" else self.role,  # OpenAI's newer name
            content=self.content or "",
            name=self.name,
            tool_call_id=self.tool_call_id,
            tool_calls=self.tool_calls,
        )


class StreamOptions(_Body):
    include_usage: bool | None = None


class FunctionDefinition(_Body):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class JsonSchemaFormat(_Body):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is given exactly when type is 'json_schema'")
        return self


def _tool_choice(value: Any) -> Any:
    if value is None or value in ("none", "auto", "required"):
        return value
    named = isinstance(value, dict) and value.get("type") == "function"
    function = value.get("function") if named else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or not name:
        raise ValueError(
            "must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name'}}"
        )
    return {"type": "function", "function": {"name": name}}


class _SamplingBody(_Body):
    """What chat and completion requests share."""

    model: ModelName
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1, le=MAX_CHAT_CHOICES)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: StopList = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    seed: int | None = Field(None, ge=0, lt=2**63)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = Field(None, max_length=256)
    # Atoll: a weighted mixture of adapters on the base that ``model`` names.
    adapters: list[AdapterWeight] | None = Field(None, min_length=1, max_length=MAX_MIXTURE)
    merge_strategy: MergeStrategy | None = None
    density: float | None = Field(None, gt=0.0, le=1.0)
    # vLLM's extras.
    top_k: int | None = Field(None, ge=-1)  # -1 or 0: no cut
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    ignore_eos: bool | None = None

    @model_validator(mode="after")
    def _consistent(self) -> _SamplingBody:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if self.adapters is None and (self.merge_strategy or self.density is not None):
            raise ValueError("merge_strategy and density need adapters")
        ids = [a.id for a in self.adapters or []]
        if len(set(ids)) != len(ids):
            raise ValueError("adapters names each adapter once")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def choices_per_prompt(self) -> int:
        return self.n or 1


class ChatCompletionRequest(_SamplingBody):
    messages: list[RequestMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Annotated[Any, BeforeValidator(_tool_choice)] = None

    @model_validator(mode="after")
    def _chat_consistent(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.tool_choice not in (None, "none") and not self.tools:
            raise ValueError("tool_choice needs tools")
        return self


class CompletionRequest(_SamplingBody):
    prompt: Prompts
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=20)

    @model_validator(mode="after")
    def _bounded(self) -> CompletionRequest:
        if len(self.prompt) * self.choices_per_prompt > MAX_COMPLETION_CHOICES:
            raise ValueError(f"prompts times n must be at most {MAX_COMPLETION_CHOICES}")
        return self


class EmbeddingRequest(_Body):
    input: EmbedInputs
    model: ModelName
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(None, ge=1)
    user: str | None = Field(None, max_length=256)


class LoraxMergedAdapters(_Body):
    ids: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(
        min_length=1, max_length=MAX_MIXTURE
    )
    # The contract's bounds (AdapterWeight): out of them is the caller's error, not ours.
    weights: list[Annotated[float, Field(ge=-10.0, le=10.0)]] = Field(
        min_length=1, max_length=MAX_MIXTURE
    )
    merge_strategy: MergeStrategy | None = None
    density: float | None = Field(None, gt=0.0, le=1.0)
    majority_sign_method: Literal["total", "frequency"] | None = None

    @model_validator(mode="after")
    def _paired(self) -> LoraxMergedAdapters:
        if len(self.ids) != len(self.weights):
            raise ValueError("ids and weights must have the same length")
        if len(set(self.ids)) != len(self.ids):
            raise ValueError("ids names each adapter once")
        return self


class LoraxResponseFormat(_Body):
    type: Literal["json_object"]
    schema_: dict[str, Any] = Field(alias="schema")


class LoraxParameters(_Body):
    """lorax-client 0.6.3's ``Parameters``, every field of which it sends (most as null)."""

    adapter_id: str | None = Field(None, min_length=1, max_length=256)
    adapter_source: str | None = None
    merged_adapters: LoraxMergedAdapters | None = None
    api_token: str | None = None
    do_sample: bool | None = None
    max_new_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    ignore_eos_token: bool | None = None
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    return_full_text: bool | None = None
    stop: StopList = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    temperature: float | None = Field(None, gt=0.0, le=10.0)  # LoRAX: greedy is do_sample false
    top_k: int | None = Field(None, gt=0)
    top_p: float | None = Field(None, gt=0.0, lt=1.0)
    truncate: int | None = None
    typical_p: float | None = None
    best_of: int | None = Field(None, ge=1)
    watermark: bool | None = None
    details: bool | None = None
    decoder_input_details: bool | None = None
    return_k_alternatives: int | None = None
    response_format: LoraxResponseFormat | None = None

    @model_validator(mode="after")
    def _one_adapter(self) -> LoraxParameters:
        if self.adapter_id is not None and self.merged_adapters is not None:
            raise ValueError("give at most one of adapter_id and merged_adapters")
        return self

    @property
    def sampling(self) -> bool:
        """LoRAX (as TGI) samples when asked to or when any sampling knob is set."""
        return bool(self.do_sample) or (
            self.temperature not in (None, 1.0) or self.top_k is not None or self.top_p is not None
        )


class LoraxRequest(_Body):
    inputs: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    parameters: LoraxParameters | None = None
    stream: bool | None = None

    @property
    def params(self) -> LoraxParameters:
        return self.parameters or LoraxParameters()


# --- translation to the inference contract ---------------------------------------------------


def mixture_of(req: _SamplingBody) -> Mixture | None:
    """The request's ``adapters`` mixture, if it has one."""
    if not req.adapters:
        return None
    return _build(
        Mixture,
        adapters=req.adapters,
        merge_strategy=req.merge_strategy or "linear",
        density=1.0 if req.density is None else req.density,
    )


def lorax_mixture(req: LoraxRequest) -> Mixture | None:
    merged = req.params.merged_adapters
    if merged is None:
        return None
    return _build(
        Mixture,
        adapters=[
            AdapterWeight(id=i, weight=w)
            for i, w in zip(merged.ids, merged.weights, strict=True)  # lengths checked
        ],
        merge_strategy=merged.merge_strategy or "linear",
        density=1.0 if merged.density is None else merged.density,
        majority_sign_method=merged.majority_sign_method or "total",
    )


def chat_to_generate(
    req: ChatCompletionRequest, base: str | None, adapter: str | None
) -> list[GenerateRequest]:
    """One request per choice (``n``); ``base`` and ``adapter`` are what ``model`` resolved to."""
    _refuse_common(req)
    if req.top_logprobs:
        raise _unsupported("top_logprobs", "nodes report only the sampled token's logprob")
    max_new = req.max_tokens if req.max_completion_tokens is None else req.max_completion_tokens
    fmt = req.response_format
    template = _build(
        GenerateRequest,
        messages=[m.to_contract() for m in req.messages],
        model=base,
        adapter=adapter,
        mixture=_mixture(req, adapter),
        params=_sampling(req, max_new),
        tools=[t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None,
        tool_choice=req.tool_choice if req.tools else None,
        # "text" constrains nothing; dropping it lets backends without formats serve it.
        response_format=fmt.model_dump(by_alias=True, exclude_none=True)
        if fmt and fmt.type != "text"
        else None,
        logprobs=bool(req.logprobs),
    )
    return _choices(template, req.choices_per_prompt)


def completion_to_generate(
    req: CompletionRequest, base: str | None, adapter: str | None
) -> list[GenerateRequest]:
    """One request per choice: ``n`` for each prompt in turn, as OpenAI numbers the choices."""
    _refuse_common(req)
    if req.echo:
        raise _unsupported("echo", "the prompt is not returned with the completion")
    if req.suffix is not None:
        raise _unsupported("suffix", "there is no insertion mode")
    if req.best_of is not None and req.best_of > 1:
        raise _unsupported("best_of", "use n to get several completions")
    if req.logprobs:
        raise _unsupported("logprobs", "only 0 (the sampled token's logprob) is available")
    max_new = COMPLETION_DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
    mixture = _mixture(req, adapter)
    params = _sampling(req, max_new)
    out: list[GenerateRequest] = []
    for prompt in req.prompt:
        template = _build(
            GenerateRequest,
            prompt=prompt,
            model=base,
            adapter=adapter,
            mixture=mixture,
            params=params,
            logprobs=req.logprobs is not None,
        )
        out += _choices(template, req.choices_per_prompt)
    return out


def lorax_to_generate(req: LoraxRequest, base: str | None, adapter: str | None) -> GenerateRequest:
    """``adapter`` is what ``parameters.adapter_id`` resolved to in the gateway's registry."""
    p = req.params
    refused = {
        "adapter_source": "adapters come from the gateway's registry",
        "api_token": "authenticate with 'Authorization: Bearer <key>'",
        "truncate": "prompts are not truncated",
        "typical_p": "typical decoding is not available",
        "return_k_alternatives": "nodes report only the sampled token",
    }
    for name, why in refused.items():
        if getattr(p, name) is not None:
            raise _unsupported(name, why)
    if p.watermark:
        raise _unsupported("watermark", "watermarking is not available")
    if p.decoder_input_details:
        raise _unsupported("decoder_input_details", "prompt token details are not available")
    if p.best_of is not None and p.best_of > 1:
        raise _unsupported("best_of", "one sequence is generated per request")
    mixture = lorax_mixture(req)
    if adapter is not None and mixture is not None:
        raise GatewayError(400, "give at most one of adapter_id and merged_adapters")
    fmt = p.response_format
    return _build(
        GenerateRequest,
        prompt=req.inputs,
        model=base,
        adapter=adapter,
        mixture=mixture,
        params=_build(
            SamplingParams,
            **_max_new(p.max_new_tokens),
            temperature=p.temperature or 1.0,
            top_p=p.top_p or 1.0,
            top_k=p.top_k or 0,
            repetition_penalty=p.repetition_penalty or 1.0,
            stop=p.stop or [],
            seed=p.seed,
            do_sample=p.sampling,
            ignore_eos=bool(p.ignore_eos_token),
        ),
        response_format=fmt.model_dump(by_alias=True) if fmt else None,
        logprobs=bool(p.details),  # details list each token's logprob
    )


def embedding_to_embed(req: EmbeddingRequest, model: str | None) -> EmbedRequest:
    if req.dimensions is not None:
        raise _unsupported("dimensions", "embeddings come at the model's own size")
    return _build(EmbedRequest, input=req.input, model=model)


def _refuse_common(req: _SamplingBody) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise _unsupported(name, "only 0 is accepted; vLLM's repetition_penalty is available")
    if req.logit_bias:
        raise _unsupported("logit_bias", "token ids are the node's business")


def _mixture(req: _SamplingBody, adapter: str | None) -> Mixture | None:
    mixture = mixture_of(req)
    if adapter is not None and mixture is not None:
        raise GatewayError(
            400, "to mix adapters, name their base model in 'model'", param="adapters"
        )
    return mixture


def _max_new(value: int | None) -> dict[str, int]:
    return {} if value is None else {"max_new_tokens": value}


def _sampling(req: _SamplingBody, max_new: int | None) -> SamplingParams:
    return _build(
        SamplingParams,
        **_max_new(max_new),
        temperature=1.0 if req.temperature is None else req.temperature,  # OpenAI's default
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=max(req.top_k or 0, 0),
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        stop=req.stop or [],
        seed=req.seed,
        ignore_eos=bool(req.ignore_eos),
    )


def _choices(template: GenerateRequest, n: int) -> list[GenerateRequest]:
    """``n`` copies; with a seed, choice i gets seed + i, else every choice would be the same."""
    seed = template.params.seed
    if seed is None:
        return [template.model_copy() for _ in range(n)]
    return [
        template.model_copy(
            update={"params": template.params.model_copy(update={"seed": (seed + i) % 2**63})}
        )
        for i in range(n)
    ]


# --- responses ----------------------------------------------------------------------------------


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


class TokenLogprob(BaseModel):
    token: str
    bytes: list[int] | None
    logprob: float
    top_logprobs: list[dict[str, Any]] = Field(default_factory=list)  # never asked for


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


ChatFinish = Literal["stop", "length", "tool_calls"]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: ChatFinish
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
    finish_reason: ChatFinish | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: CompletionUsage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None  # None on all but a choice's last chunk
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None


CompletionChunk = Completion  # OpenAI streams completions in the same shape


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
    parent: str | None = None  # an adapter's base model
    root: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


LoraxFinish = Literal["length", "eos_token", "stop_sequence"]


class LoraxToken(BaseModel):
    id: int
    text: str
    logprob: float  # lorax-client refuses null
    special: bool = False


class LoraxStreamDetails(BaseModel):
    finish_reason: LoraxFinish
    prompt_tokens: int
    generated_tokens: int
    seed: int | None = None


class LoraxDetails(LoraxStreamDetails):
    prefill: list[LoraxToken] = Field(default_factory=list)
    tokens: list[LoraxToken]


class LoraxResponse(BaseModel):
    generated_text: str
    details: LoraxDetails | None = None


class LoraxStreamResponse(BaseModel):
    token: LoraxToken
    generated_text: str | None = None  # on the last message only
    details: LoraxStreamDetails | None = None  # on the last message only


# --- building responses from the node's events ------------------------------------------------


def sse(obj: BaseModel | Mapping[str, Any]) -> bytes:
    """One server-sent event carrying ``obj`` as JSON (which has no raw newlines)."""
    if isinstance(obj, BaseModel):
        text = obj.model_dump_json()
    else:
        text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    return b"data: " + text.encode() + b"\n\n"


def usage_of(finishes: Iterable[tuple[int, FinishEvent]], per_prompt: int = 1) -> Usage:
    """Tokens of a request from its choices' finish events, by choice index: as OpenAI bills n
    choices, each prompt once (choices ``k*per_prompt .. (k+1)*per_prompt-1`` share prompt k),
    every completion."""
    prompts: dict[int, int] = {}
    completion = 0
    for index, event in finishes:
        group = index // per_prompt
        prompts[group] = max(prompts.get(group, 0), event.usage.prompt_tokens)
        completion += event.usage.completion_tokens
    return Usage(prompt_tokens=sum(prompts.values()), completion_tokens=completion)


def _checked_finish(event: FinishEvent) -> ChatFinish:
    if event.finish_reason == "abort":
        raise GatewayError(
            503, "the inference node aborted the generation before it finished", code="aborted"
        )
    return event.finish_reason


def _split(events: Sequence[Event]) -> tuple[list[TokenEvent], FinishEvent]:
    last = events[-1] if events else None
    if not isinstance(last, FinishEvent):
        raise ValueError("a choice's events end with its finish event")
    tokens = [e for e in events[:-1] if isinstance(e, TokenEvent)]
    if len(tokens) != len(events) - 1:
        raise ValueError("a choice has one finish event")
    return tokens, last


def _token_logprob(event: TokenEvent) -> TokenLogprob | None:
    if event.logprob is None:
        return None
    return TokenLogprob(token=event.text, bytes=list(event.text.encode()), logprob=event.logprob)


def _chat_logprobs(events: Iterable[TokenEvent]) -> ChoiceLogprobs | None:
    entries = [e for e in map(_token_logprob, events) if e is not None]
    return ChoiceLogprobs(content=entries) if entries else None


def _tool_calls(finish: FinishEvent, tag: str) -> list[ToolCall]:
    """The node's tool calls (OpenAI's message shape; an upstream may leave out the id)."""
    calls = []
    for k, call in enumerate(finish.tool_calls or []):
        function = call.get("function") if isinstance(call.get("function"), dict) else {}
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


def _completion_logprobs(events: Iterable[TokenEvent], offset: int) -> CompletionLogprobs | None:
    tokens: list[str] = []
    values: list[float] = []
    offsets: list[int] = []
    for event in events:
        if event.logprob is not None:
            tokens.append(event.text)
            values.append(event.logprob)
            offsets.append(offset)
        offset += len(event.text)
    if not tokens:
        return None
    return CompletionLogprobs(tokens=tokens, token_logprobs=values, text_offset=offsets)


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
        tokens, finish = _split(events)
        finishes.append((index, finish))
        text = "".join(e.text for e in tokens)
        calls = _tool_calls(finish, f"{request_id}_{index}")
        message = AssistantMessage(
            content=text or (None if calls else ""), tool_calls=calls or None
        )
        out.append(
            ChatChoice(
                index=index,
                message=message,
                finish_reason=_checked_finish(finish),
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
        tokens, finish = _split(events)
        finishes.append((index, finish))
        out.append(
            CompletionChoice(
                index=index,
                text="".join(e.text for e in tokens),
                finish_reason="length" if _checked_finish(finish) == "length" else "stop",
                logprobs=_completion_logprobs(tokens, 0) if logprobs else None,
            )
        )
    return Completion(
        id=f"cmpl-{request_id}",
        created=int(time.time()) if created is None else created,
        model=model,
        choices=out,
        usage=CompletionUsage.of(usage_of(finishes, per_prompt=per_prompt)),
    )


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
        entry = _token_logprob(event) if self.logprobs else None
        if not event.text and entry is None:
            return b""  # text held back by the node: nothing to say yet
        logprobs = ChoiceLogprobs(content=[entry]) if entry else None
        return self._chunk(
            ChunkChoice(index=index, delta=Delta(content=event.text), logprobs=logprobs)
        )

    def _end(self, index: int, event: FinishEvent) -> bytes:
        reason = _checked_finish(event)
        calls = _tool_calls(event, f"{self.request_id}_{index}")
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
        return sse(
            Completion(
                id=f"cmpl-{self.request_id}",
                created=self.created,
                model=self.model,
                choices=[choice],
            )
        )

    def _token(self, index: int, event: TokenEvent) -> bytes:
        logprobs = _completion_logprobs([event], self._offsets[index]) if self.logprobs else None
        self._offsets[index] += len(event.text)
        if not event.text and logprobs is None:
            return b""
        return self._chunk(
            CompletionChoice(index=index, text=event.text, finish_reason=None, logprobs=logprobs)
        )

    def _end(self, index: int, event: FinishEvent) -> bytes:
        reason = "length" if _checked_finish(event) == "length" else "stop"
        return self._chunk(CompletionChoice(index=index, text="", finish_reason=reason))

    def _usage_chunk(self, usage: CompletionUsage) -> BaseModel:
        return Completion(
            id=f"cmpl-{self.request_id}",
            created=self.created,
            model=self.model,
            choices=[],
            usage=usage,
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


def _lorax_finish(event: FinishEvent) -> LoraxFinish:
    # The contract's "stop" does not say whether a stop sequence or the EOS token ended it.
    return "length" if _checked_finish(event) == "length" else "eos_token"


def _lorax_token(event: TokenEvent) -> LoraxToken:
    return LoraxToken(
        id=UNKNOWN_TOKEN_ID if event.token_id is None else event.token_id,
        text=event.text,
        logprob=0.0 if event.logprob is None else event.logprob,
    )


def _lorax_seed(req: LoraxRequest) -> int | None:
    return req.params.seed if req.params.sampling else None  # LoRAX reports it when sampling


def lorax_response(req: LoraxRequest, events: Sequence[Event]) -> LoraxResponse:
    """LoRAX's whole reply (``/generate``; its ``/`` route wraps it in a one-item list)."""
    tokens, finish = _split(events)
    prefix = req.inputs if req.params.return_full_text else ""
    text = prefix + "".join(e.text for e in tokens)
    details = None
    if req.params.details:
        details = LoraxDetails(
            finish_reason=_lorax_finish(finish),
            prompt_tokens=finish.usage.prompt_tokens,
            generated_tokens=finish.usage.completion_tokens,
            seed=_lorax_seed(req),
            tokens=[_lorax_token(e) for e in tokens],
        )
    return LoraxResponse(generated_text=text, details=details)


class LoraxStream:
    """SSE of LoRAX's ``generate_stream``: one message per token; the finish event becomes a last
    special empty token carrying ``generated_text`` and (when asked for) ``details``, so no token
    waits for the next to learn whether it is the last. No ``[DONE]``, as LoRAX."""

    def __init__(self, req: LoraxRequest) -> None:
        self.req = req
        self._text = [req.inputs] if req.params.return_full_text else []
        self.finished: FinishEvent | None = None

    def chunks(self, event: Event) -> bytes:
        if self.finished is not None:
            raise ValueError("the stream has finished")
        if isinstance(event, TokenEvent):
            self._text.append(event.text)
            return sse(LoraxStreamResponse(token=_lorax_token(event)))
        reason = _lorax_finish(event)
        self.finished = event
        details = None
        if self.req.params.details:
            details = LoraxStreamDetails(
                finish_reason=reason,
                prompt_tokens=event.usage.prompt_tokens,
                generated_tokens=event.usage.completion_tokens,
                seed=_lorax_seed(self.req),
            )
        last = LoraxToken(id=UNKNOWN_TOKEN_ID, text="", logprob=0.0, special=True)
        return sse(
            LoraxStreamResponse(token=last, generated_text="".join(self._text), details=details)
        )

    def error(self, exc: GatewayError) -> bytes:
        return sse(lorax_error(exc, mid_stream=True))


def lorax_error(exc: GatewayError, *, mid_stream: bool = False) -> dict[str, str]:
    """LoRAX's error body: lorax-client picks its exception by ``error_type``, else by status."""
    if mid_stream:
        kind = "generation"
    elif exc.status in (400, 413, 422):
        kind = "validation"
    elif exc.code == "overloaded":
        kind = "overloaded"
    else:
        kind = exc.type
    return {"error": exc.message, "error_type": kind}
