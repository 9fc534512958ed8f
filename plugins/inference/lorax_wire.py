"""LoRAX's wire, as the lorax backend speaks it: requests built and errors classified with
lorax-client 0.6.3's own models (``Parameters``, ``Request``, ``MergedAdapters``,
``parse_error``), reply models that take what a real LoRAX sends, chat rendered as LoRAX's plain
``inputs``, and LoRAX's failures as the platform's errors. No I/O here beyond reading a reply.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal, TypeVar

import aiohttp
import pydantic
from lorax import errors as lorax_errors
from lorax import types as lorax_types

from atoll.agent.errors import AtollError, DeadlineExceeded, InvalidRequest
from atoll.plugins.inference.contract import (
    AdapterRejected,
    BackendUnavailable,
    ChatMessage,
    FinishReason,
    GenerateRequest,
    Overloaded,
    SamplingParams,
    Unsupported,
)
from atoll.plugins.storage.contract.adapters import AdapterNotFound

API_TOKEN_ENV = "ATOLL_LORAX_API_TOKEN"
MAX_ERROR_CHARS = 1000
MAX_ERROR_BODY = 64 * 1024
FINISH_REASONS: dict[str, FinishReason] = {
    "length": "length",
    "eos_token": "stop",
    "stop_sequence": "stop",
}
# How LoRAX words a failed adapter download: HF hub 404s, missing local paths, missing S3 keys.
_NOT_FOUND = re.compile(
    r"not found|404|does not exist|no such file|can't find|cannot find|no local weights|nosuchkey",
    re.IGNORECASE,
)
# lorax-client's error classes (from the server's error_type, else the HTTP status) -> ours.
# A GenerationError naming the request's adapter is an adapter failure: see adapter_failure.
ERRORS: dict[type[Exception], type[AtollError]] = {
    lorax_errors.ValidationError: InvalidRequest,
    lorax_errors.BadRequestError: InvalidRequest,
    lorax_errors.UnprocessableEntityError: InvalidRequest,
    lorax_errors.OverloadedError: Overloaded,
    lorax_errors.RateLimitExceededError: Overloaded,
    lorax_errors.ShardTimeoutError: DeadlineExceeded,
    lorax_errors.ShardNotReadyError: BackendUnavailable,
    lorax_errors.GenerationError: BackendUnavailable,
    lorax_errors.IncompleteGenerationError: BackendUnavailable,
    lorax_errors.NotFoundError: BackendUnavailable,
    lorax_errors.UnknownError: BackendUnavailable,
}
M = TypeVar("M", bound=pydantic.BaseModel)


# lorax-client 0.6.3 declares Token.logprob a float, but LoRAX sends null for some tokens.
class ReplyToken(lorax_types.Token):
    logprob: float | None = None


class ReplyDetails(lorax_types.Details):
    prefill: list[lorax_types.InputToken] = []
    tokens: list[ReplyToken]


class Reply(lorax_types.Response):
    details: ReplyDetails | None = None


class StreamReply(lorax_types.StreamResponse):
    token: ReplyToken


class StopTrimmer:
    """LoRAX's output includes the stop sequence that ended it; the contract's (like OpenAI's)
    does not. Text that may be the start of a stop sequence is held back until it is not, and
    the stop sequence is dropped at the end."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.held = ""

    def feed(self, text: str) -> str:
        self.held += text
        keep = max(
            (k for s in self.stops for k in range(1, len(s) + 1) if self.held.endswith(s[:k])),
            default=0,
        )
        out, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        return out

    def finish(self, stopped: bool) -> str:
        out, self.held = self.held, ""
        if stopped:
            for s in self.stops:
                if out.endswith(s):
                    return out[: -len(s)]
        return out


def render_chat(messages: list[ChatMessage], template: Literal["chatml", "plain"]) -> str:
    """Chat messages as one prompt ending where the assistant's reply begins."""
    if template == "chatml":
        turns = [f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in messages]
        return "".join(turns) + "<|im_start|>assistant\n"
    turns = [f"{m.role.capitalize()}: {m.content}\n\n" for m in messages]
    return "".join(turns) + "Assistant:"


def request_body(
    request: GenerateRequest,
    adapter_params: dict[str, Any],
    chat_template: Literal["chatml", "plain"],
    stream: bool,
) -> dict[str, Any]:
    """lorax-client's Request, as its clients send it."""
    if request.tools:
        raise Unsupported("the lorax backend does not call tools")
    if request.messages is not None:
        inputs = render_chat(request.messages, chat_template)
    else:
        inputs = request.prompt or ""
    try:
        parameters = lorax_types.Parameters(
            **adapter_params,
            **_sampling(request.params),
            response_format=_response_format(request.response_format),
            details=True,
        )
        wire = lorax_types.Request(inputs=inputs, parameters=parameters, stream=stream)
    except (lorax_errors.ValidationError, pydantic.ValidationError) as e:
        raise InvalidRequest(f"LoRAX would refuse this request: {e}") from e
    return wire.model_dump(mode="json", by_alias=True)


def _sampling(p: SamplingParams) -> dict[str, Any]:
    """Greedy sends no temperature, top_p or top_k: LoRAX samples whenever one is set."""
    if p.ignore_eos:
        raise Unsupported("LoRAX has no ignore_eos")
    out: dict[str, Any] = {"max_new_tokens": p.max_new_tokens, "stop": list(p.stop), "seed": p.seed}
    if p.repetition_penalty != 1.0:
        out["repetition_penalty"] = p.repetition_penalty
    if p.greedy:
        return {**out, "do_sample": False}
    if p.temperature == 0.0:
        raise InvalidRequest("temperature 0 means greedy decoding; it cannot go with do_sample")
    out.update(do_sample=True, temperature=p.temperature)
    if p.top_p < 1.0:
        out["top_p"] = p.top_p
    if p.top_k > 0:
        out["top_k"] = p.top_k
    return out


def _response_format(fmt: dict[str, Any] | None) -> lorax_types.ResponseFormat | None:
    """OpenAI's ``json_schema`` / ``json_object`` (or LoRAX's own ``{type, schema}``) as LoRAX's
    schema-constrained ``json_object``; ``text`` is no constraint."""
    if fmt is None or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise InvalidRequest("response_format json_schema needs json_schema.schema (an object)")
        return lorax_types.ResponseFormat(type="json_object", schema=schema)
    if fmt.get("type") == "json_object":
        schema = fmt.get("schema", {"type": "object"})
        if not isinstance(schema, dict):
            raise InvalidRequest("response_format schema must be a JSON object")
        return lorax_types.ResponseFormat(type="json_object", schema=schema)
    raise Unsupported(f"LoRAX has no response_format {fmt.get('type')!r}")


def adapter_ids(request: GenerateRequest) -> tuple[str, ...]:
    if request.adapter is not None:
        return (request.adapter,)
    if request.mixture is not None:
        return tuple(a.id for a in request.mixture.adapters)
    return ()


def map_lorax_error(e: Exception, adapters: dict[str, str]) -> AtollError:
    message = str(e)[:MAX_ERROR_CHARS] or type(e).__name__
    if isinstance(e, lorax_errors.GenerationError) and (failed := adapter_failure(e, adapters)):
        return failed
    return ERRORS.get(type(e), BackendUnavailable)(f"LoRAX: {message}")


def adapter_failure(e: Exception, adapters: dict[str, str]) -> AtollError | None:
    """LoRAX reports a failed adapter download or load as a generation error whose message
    names the adapter (as LoRAX got it) or says "adapter"."""
    message = str(e)[:MAX_ERROR_CHARS]
    named = any(a in message for pair in adapters.items() for a in pair)
    if not adapters or not (named or "adapter" in message.lower()):
        return None
    ids = ", ".join(adapters)
    if _NOT_FOUND.search(message):
        return AdapterNotFound(f"LoRAX found no adapter {ids}: {message}")
    return AdapterRejected(f"LoRAX could not load adapter {ids}: {message}")


async def status_error(resp: aiohttp.ClientResponse) -> Exception:
    """A non-200 reply as lorax-client's error for LoRAX's ``{"error", "error_type"}`` (mapped
    by the backend's _transport_errors), or ours for a refused token."""
    text = (await resp.content.read(MAX_ERROR_BODY)).decode(errors="replace")
    if resp.status in (401, 403):
        return BackendUnavailable(
            f"LoRAX refused this island's API token (HTTP {resp.status}: "
            f"{text[:MAX_ERROR_CHARS]}); the operator must fix {API_TOKEN_ENV}"
        )
    try:
        payload = json.loads(text)
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        payload = {"error": text[:MAX_ERROR_CHARS] or resp.reason or ""}
    return lorax_errors.parse_error(resp.status, payload)


async def json_reply(resp: aiohttp.ClientResponse, what: str) -> Any:
    if resp.status != 200:
        raise await status_error(resp)
    try:
        return json.loads(await resp.read())
    except ValueError as e:
        raise BackendUnavailable(f"LoRAX's {what} reply is not JSON") from e


def parse_reply(model: type[M], data: Any, what: str) -> M:
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as e:
        raise BackendUnavailable(f"LoRAX's {what} is malformed: {e}") from e
