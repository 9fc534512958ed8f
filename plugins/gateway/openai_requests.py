"""OpenAI's request bodies (chat completions, completions, embeddings) as pydantic models, and
pure functions translating them to the inference contract: inference_routes.py parses a body,
resolves its ``model`` and turns it into ``GenerateRequest``s with ``*_to_generate``.

Options this gateway cannot honour are refused with a 400 (``unsupported_parameter``):
presence/frequency penalties other than 0, ``logit_bias``, ``suffix``, ``best_of`` above 1 and
embedding ``dimensions``. ``echo``, token-id prompts and alternatives (``logprobs`` above 0 on
completions, ``top_logprobs`` on chat) go to the node, whose backend may refuse them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, model_validator

from atoll.plugins.gateway.bodies import (
    MAX_NEW_TOKENS,
    RequestBody,
    StopList,
    build,
    max_new_tokens,
    one_or_many,
    unsupported,
)
from atoll.plugins.gateway.errors import GatewayError
from atoll.plugins.inference.contract import (
    MAX_MIXTURE,
    MAX_PROMPT_CHARS,
    MAX_PROMPT_TOKENS,
    AdapterWeight,
    ChatMessage,
    EmbedRequest,
    GenerateRequest,
    MergeStrategy,
    Mixture,
    SamplingParams,
)

MAX_CHAT_CHOICES = 8
MAX_COMPLETION_CHOICES = 32  # prompts x n on /v1/completions
MAX_MESSAGES = 4096
MAX_TOOLS = 128  # OpenAI's own limit
MAX_EMBED_INPUTS = 2048  # EmbedRequest's bounds
MAX_EMBED_CHARS = 100_000
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default on /v1/completions; chat uses the contract's


def _prompts(value: Any) -> Any:
    """A completion's prompts, each text or token ids, one or many (as OpenAI takes them)."""
    if isinstance(value, list) and value and all(type(v) is int for v in value):
        return [value]
    return one_or_many(value)


def _texts(value: Any) -> Any:
    """Like ``one_or_many``, with a clear word for token arrays, which need the model's
    tokenizer that the gateway does not have."""
    value = one_or_many(value)
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


Content = Annotated[
    Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] | None, BeforeValidator(_content)
]
TokenIds = Annotated[
    list[Annotated[int, Field(strict=True, ge=0)]],
    Field(min_length=1, max_length=MAX_PROMPT_TOKENS),
]
Prompts = Annotated[
    list[Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]] | list[TokenIds],
    Field(min_length=1, max_length=MAX_COMPLETION_CHOICES),
    BeforeValidator(_prompts),
]
EmbedInputs = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=MAX_EMBED_CHARS)]],
    Field(min_length=1, max_length=MAX_EMBED_INPUTS),
    BeforeValidator(_texts),
]
ModelName = Annotated[str, Field(min_length=1, max_length=512)]


class RequestMessage(RequestBody):
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
        return build(
            ChatMessage,
            role="system" if self.role == "developer" else self.role,  # OpenAI's newer name
            content=self.content or "",
            name=self.name,
            tool_call_id=self.tool_call_id,
            tool_calls=self.tool_calls,
        )


class StreamOptions(RequestBody):
    include_usage: bool | None = None


class FunctionDefinition(RequestBody):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(RequestBody):
    type: Literal["function"]
    function: FunctionDefinition


class JsonSchemaFormat(RequestBody):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(RequestBody):
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


class _SamplingBody(RequestBody):
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
    # Atoll: a member of a compressed collection served by its original adapter instead.
    uncompressed: bool | None = None
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


class EmbeddingRequest(RequestBody):
    input: EmbedInputs
    model: ModelName
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(None, ge=1)
    user: str | None = Field(None, max_length=256)


# --- translation to the inference contract ---------------------------------------------------


def mixture_of(req: _SamplingBody) -> Mixture | None:
    """The request's ``adapters`` mixture, if it has one."""
    if not req.adapters:
        return None
    return build(
        Mixture,
        adapters=req.adapters,
        merge_strategy=req.merge_strategy or "linear",
        density=1.0 if req.density is None else req.density,
    )


def chat_to_generate(
    req: ChatCompletionRequest, base: str | None, adapter: str | None
) -> list[GenerateRequest]:
    """One request per choice (``n``); ``base`` and ``adapter`` are what ``model`` resolved to."""
    _refuse_common(req)
    max_new = req.max_tokens if req.max_completion_tokens is None else req.max_completion_tokens
    fmt = req.response_format
    template = build(
        GenerateRequest,
        messages=[m.to_contract() for m in req.messages],
        model=base,
        adapter=adapter,
        mixture=_mixture(req, adapter),
        uncompressed=bool(req.uncompressed),
        params=_sampling(req, max_new),
        tools=[t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None,
        tool_choice=req.tool_choice if req.tools else None,
        # "text" constrains nothing; dropping it lets backends without formats serve it.
        response_format=fmt.model_dump(by_alias=True, exclude_none=True)
        if fmt and fmt.type != "text"
        else None,
        logprobs=bool(req.logprobs),
        top_logprobs=req.top_logprobs or 0,
    )
    return _choices(template, req.choices_per_prompt)


def completion_to_generate(
    req: CompletionRequest, base: str | None, adapter: str | None
) -> list[GenerateRequest]:
    """One request per choice: ``n`` for each prompt in turn, as OpenAI numbers the choices."""
    _refuse_common(req)
    if req.suffix is not None:
        raise unsupported("suffix", "there is no insertion mode")
    if req.best_of is not None and req.best_of > 1:
        raise unsupported("best_of", "use n to get several completions")
    max_new = COMPLETION_DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
    mixture = _mixture(req, adapter)
    params = _sampling(req, max_new)
    out: list[GenerateRequest] = []
    for prompt in req.prompt:
        template = build(
            GenerateRequest,
            **({"prompt": prompt} if isinstance(prompt, str) else {"prompt_token_ids": prompt}),
            model=base,
            adapter=adapter,
            mixture=mixture,
            uncompressed=bool(req.uncompressed),
            params=params,
            logprobs=req.logprobs is not None,
            top_logprobs=req.logprobs or 0,
            echo=bool(req.echo),
        )
        out += _choices(template, req.choices_per_prompt)
    return out


def embedding_to_embed(req: EmbeddingRequest, model: str | None) -> EmbedRequest:
    if req.dimensions is not None:
        raise unsupported("dimensions", "embeddings come at the model's own size")
    return build(EmbedRequest, input=req.input, model=model)


def _refuse_common(req: _SamplingBody) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise unsupported(name, "only 0 is accepted; vLLM's repetition_penalty is available")
    if req.logit_bias:
        raise unsupported("logit_bias", "token ids are the node's business")


def _mixture(req: _SamplingBody, adapter: str | None) -> Mixture | None:
    mixture = mixture_of(req)
    if adapter is not None and mixture is not None:
        raise GatewayError(
            400, "to mix adapters, name their base model in 'model'", param="adapters"
        )
    return mixture


def _sampling(req: _SamplingBody, max_new: int | None) -> SamplingParams:
    return build(
        SamplingParams,
        **max_new_tokens(max_new),
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
