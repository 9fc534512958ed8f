"""What the gateway's two API dialects (openai_requests.py and openai_responses.py for OpenAI's,
lorax_api.py for LoRAX's) share: parsing a request body, the strict base of request models,
building inference-contract objects with a clear error, and reading a node's events back into
SSE and usage. No FastAPI and no I/O here.

Request models check JSON types strictly (no "1" for 1) but ignore unknown top-level fields, as
OpenAI does, because SDKs send extras. A body that breaks the schema is a 422 naming the field; a
well-formed option this gateway cannot honour is a 400 with code ``unsupported_parameter``
(``unsupported``), raised by the translation functions.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from atoll.plugins.gateway.errors import GatewayError
from atoll.plugins.inference.contract import MAX_STOP_SEQUENCES, FinishEvent, TokenEvent, Usage

Event = TokenEvent | FinishEvent
Finish = Literal["stop", "length", "tool_calls"]  # how a choice may end, but aborted
B = TypeVar("B", bound=BaseModel)

# What a model listed by /v1/models does (Atoll's field beside OpenAI's).
ModelKind = Literal["chat", "adapter", "mixture", "embedding", "transcription"]

MAX_NEW_TOKENS = 32768  # SamplingParams' bound


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


def build(kind: type[B], /, **fields: Any) -> B:
    """A contract object; should the contract be stricter than the API models, a clear 400."""
    try:
        return kind(**fields)
    except ValidationError as exc:
        raise _invalid(exc, 400) from None


def unsupported(param: str, why: str) -> GatewayError:
    return GatewayError(
        400, f"{param} is not supported: {why}", code="unsupported_parameter", param=param
    )


def max_new_tokens(value: int | None) -> dict[str, int]:
    """SamplingParams' ``max_new_tokens`` when the caller set it (else the contract's default)."""
    return {} if value is None else {"max_new_tokens": value}


def one_or_many(value: Any) -> Any:
    """OpenAI's "a string or a list of strings" fields, always as a list."""
    if value is None or isinstance(value, list):
        return value
    if isinstance(value, str):
        return [value]
    raise ValueError("must be a string or a list of strings")


Stop = Annotated[str, Field(min_length=1, max_length=256)]
StopList = Annotated[
    Annotated[list[Stop], Field(max_length=MAX_STOP_SEQUENCES)] | None,
    BeforeValidator(one_or_many),
]


class RequestBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


# --- a node's events ------------------------------------------------------------------------


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


def checked_finish(event: FinishEvent) -> Finish:
    if event.finish_reason == "abort":
        raise GatewayError(
            503, "the inference node aborted the generation before it finished", code="aborted"
        )
    return event.finish_reason


def split_choice(events: Sequence[Event]) -> tuple[list[TokenEvent], FinishEvent]:
    """A choice's token events and the finish event that ends them."""
    last = events[-1] if events else None
    if not isinstance(last, FinishEvent):
        raise ValueError("a choice's events end with its finish event")
    tokens = [e for e in events[:-1] if isinstance(e, TokenEvent)]
    if len(tokens) != len(events) - 1:
        raise ValueError("a choice has one finish event")
    return tokens, last
