"""LoRAX's API at the gateway (``/``, ``/generate``, ``/generate_stream``, as lorax-client 0.6.3
speaks it): its request body, its translation to the inference contract, and its replies and
server-sent events built from a node's events.

Options this gateway cannot honour are refused with a 400 (``unsupported_parameter``):
``adapter_source``, ``api_token``, ``truncate``, ``typical_p``, ``watermark``,
``decoder_input_details``, ``return_k_alternatives`` and ``best_of`` above 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, model_validator

from atoll.plugins.gateway.bodies import (
    MAX_NEW_TOKENS,
    Event,
    RequestBody,
    StopList,
    build,
    checked_finish,
    max_new_tokens,
    split_choice,
    sse,
    unsupported,
)
from atoll.plugins.gateway.errors import GatewayError
from atoll.plugins.inference.contract import (
    MAX_MIXTURE,
    MAX_PROMPT_CHARS,
    AdapterWeight,
    FinishEvent,
    GenerateRequest,
    MergeStrategy,
    Mixture,
    SamplingParams,
    TokenEvent,
)

UNKNOWN_TOKEN_ID = -1  # LoRAX tokens need an id; some backends report none


class LoraxMergedAdapters(RequestBody):
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


class LoraxResponseFormat(RequestBody):
    type: Literal["json_object"]
    schema_: dict[str, Any] = Field(alias="schema")


class LoraxParameters(RequestBody):
    """lorax-client 0.6.3's ``Parameters``, every field of which it sends (most as null)."""

    adapter_id: str | None = Field(default=None, min_length=1, max_length=256)
    adapter_source: str | None = None
    merged_adapters: LoraxMergedAdapters | None = None
    api_token: str | None = None
    do_sample: bool | None = None
    max_new_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    ignore_eos_token: bool | None = None
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    return_full_text: bool | None = None
    stop: StopList = None
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    # LoRAX: greedy is do_sample false, not temperature 0.
    temperature: float | None = Field(default=None, gt=0.0, le=10.0)
    top_k: int | None = Field(default=None, gt=0)
    top_p: float | None = Field(default=None, gt=0.0, lt=1.0)
    truncate: int | None = None
    typical_p: float | None = None
    best_of: int | None = Field(default=None, ge=1)
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


class LoraxRequest(RequestBody):
    inputs: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    parameters: LoraxParameters | None = None
    stream: bool | None = None

    @property
    def params(self) -> LoraxParameters:
        return self.parameters or LoraxParameters()


# --- translation to the inference contract ---------------------------------------------------


def lorax_mixture(req: LoraxRequest) -> Mixture | None:
    merged = req.params.merged_adapters
    if merged is None:
        return None
    return build(
        Mixture,
        adapters=[
            AdapterWeight(id=i, weight=w)
            for i, w in zip(merged.ids, merged.weights, strict=True)  # lengths checked
        ],
        merge_strategy=merged.merge_strategy or "linear",
        density=1.0 if merged.density is None else merged.density,
        majority_sign_method=merged.majority_sign_method or "total",
    )


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
            raise unsupported(name, why)
    if p.watermark:
        raise unsupported("watermark", "watermarking is not available")
    if p.decoder_input_details:
        raise unsupported("decoder_input_details", "prompt token details are not available")
    if p.best_of is not None and p.best_of > 1:
        raise unsupported("best_of", "one sequence is generated per request")
    mixture = lorax_mixture(req)
    if adapter is not None and mixture is not None:
        raise GatewayError(400, "give at most one of adapter_id and merged_adapters")
    fmt = p.response_format
    return build(
        GenerateRequest,
        prompt=req.inputs,
        model=base,
        adapter=adapter,
        mixture=mixture,
        params=build(
            SamplingParams,
            **max_new_tokens(p.max_new_tokens),
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


# --- replies --------------------------------------------------------------------------------


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


def _lorax_finish(event: FinishEvent) -> LoraxFinish:
    # The contract's "stop" does not say whether a stop sequence or the EOS token ended it.
    return "length" if checked_finish(event) == "length" else "eos_token"


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
    tokens, finish = split_choice(events)
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
