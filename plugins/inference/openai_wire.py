"""The OpenAI-compatible wire, as the openai backend speaks it: request bodies for the chat and
legacy completions routes, server-sent events folded into the contract's token events, tool calls
and usage, and an upstream's error replies as the platform's errors."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx

from atoll.agent.errors import AtollError, InvalidRequest
from atoll.plugins.inference.backend import stream_event
from atoll.plugins.inference.contract import (
    BackendUnavailable,
    FinishReason,
    GenerateRequest,
    Overloaded,
    SamplingParams,
    TokenEvent,
    Unsupported,
    Usage,
)
from atoll.plugins.storage.contract.adapters import AdapterNotFound

API_KEY_ENV = "ATOLL_OPENAI_API_KEY"
MAX_EVENT_CHARS = 4 * 1024 * 1024  # one SSE event; more means a broken upstream
MAX_TOOL_CALLS = 128
MAX_ERROR_CHARS = 1000
_MODEL_MISSING = re.compile(
    r"model.*(does not exist|not found|not exist)", re.IGNORECASE | re.DOTALL
)
_FINISH: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "abort": "abort",
    "content_filter": "abort",  # the text was cut short by the upstream, not finished
}


class StreamFold:
    """Folds one completion's SSE chunks into token events, tool calls, a finish reason and
    usage. The request asks for one choice (n=1), so only ``choices[0]`` is read."""

    def __init__(self, chat: bool, adapter: str | None) -> None:
        self.chat = chat
        self.adapter = adapter
        self.usage: Usage | None = None
        self.chunks = 0  # chunks that carried output: the token count when usage never comes
        self.done = False
        self._finish: str | None = None
        self._calls: dict[int, dict[str, Any]] = {}

    def feed(self, data: str) -> TokenEvent | None:
        chunk = stream_event(data, "the upstream")
        if "error" in chunk:
            raise _stream_error(chunk["error"], self.adapter)
        if isinstance(usage := chunk.get("usage"), dict):
            self.usage = Usage(
                prompt_tokens=_count(usage.get("prompt_tokens")),
                completion_tokens=_count(usage.get("completion_tokens")),
            )
        choices = chunk.get("choices")
        if not (isinstance(choices, list) and choices and isinstance(choices[0], dict)):
            return None  # the usage chunk has no choices
        choice = choices[0]
        if isinstance(reason := choice.get("finish_reason"), str):
            self._finish = reason
        if self.chat:
            raw = choice.get("delta")
            delta: dict[str, Any] = raw if isinstance(raw, dict) else {}
            text = delta.get("content")
            had_calls = self._add_calls(delta.get("tool_calls"))
        else:
            text, had_calls = choice.get("text"), False
        if not (isinstance(text, str) and text):
            self.chunks += had_calls
            return None
        self.chunks += 1
        return TokenEvent(text=text, logprob=self._logprob(choice.get("logprobs")))

    def _logprob(self, logprobs: Any) -> float | None:
        """The chunk's log-probability: the sum over its tokens (usually exactly one)."""
        if not isinstance(logprobs, dict):
            return None
        if self.chat:
            entries = logprobs.get("content") or []
            values = [e.get("logprob") for e in entries if isinstance(e, dict)]
        else:
            values = logprobs.get("token_logprobs") or []
        numbers = [float(v) for v in values if isinstance(v, int | float)]
        return sum(numbers) if numbers else None

    def _add_calls(self, deltas: Any) -> bool:
        """Tool-call deltas by index: id, type and name once, arguments in pieces."""
        if not isinstance(deltas, list):
            return False
        for d in deltas:
            if not isinstance(d, dict):
                continue
            index = d.get("index", 0)
            if not isinstance(index, int) or not 0 <= index < MAX_TOOL_CALLS:
                raise BackendUnavailable(f"the upstream sent a tool call with index {index!r}")
            call = self._calls.setdefault(
                index, {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
            )
            if isinstance(d.get("id"), str):
                call["id"] = d["id"]
            if isinstance(d.get("type"), str):
                call["type"] = d["type"]
            raw = d.get("function")
            fn: dict[str, Any] = raw if isinstance(raw, dict) else {}
            if isinstance(fn.get("name"), str) and fn["name"]:
                call["function"]["name"] = fn["name"]
            if isinstance(fn.get("arguments"), str):
                call["function"]["arguments"] += fn["arguments"]
        return bool(deltas)

    def tool_calls(self) -> list[dict[str, Any]] | None:
        return [self._calls[i] for i in sorted(self._calls)] or None

    def finish_reason(self) -> FinishReason:
        if self._finish is None and not self.done:
            raise BackendUnavailable("the upstream's stream ended before the completion finished")
        return _FINISH.get(self._finish or "stop", "stop")


async def sse_data(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """The data of each server-sent event (several ``data:`` lines joined by newlines, as the SSE
    spec says); other fields and comments carry nothing OpenAI uses. Bounded per event."""
    pending = ""
    parts: list[str] = []
    size = 0
    async for chunk in chunks:
        *lines, pending = (pending + chunk).split("\n")
        for line in lines:
            line = line.removesuffix("\r")
            if not line:  # a blank line ends the event
                if parts:
                    yield "\n".join(parts)
                parts, size = [], 0
            elif line.startswith("data:"):
                parts.append(line[5:].removeprefix(" "))
                size += len(parts[-1])
        if size + len(pending) > MAX_EVENT_CHARS:
            raise BackendUnavailable(
                f"the upstream sent a stream event over {MAX_EVENT_CHARS} chars"
            )
    if pending.startswith("data:"):
        parts.append(pending[5:].removeprefix(" ").removesuffix("\r"))
    if parts:
        yield "\n".join(parts)


def generate_body(request: GenerateRequest, model: str) -> tuple[str, dict[str, Any]]:
    body: dict[str, Any] = {
        "model": model,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": request.params.max_new_tokens,
    }
    if request.messages is not None:
        path = "chat/completions"
        body["messages"] = [m.model_dump(exclude_none=True) for m in request.messages]
        if request.logprobs:
            body["logprobs"] = True
    else:
        path = "completions"
        body["prompt"] = request.prompt
        if request.logprobs:  # the legacy API counts alternatives; the sampled token's comes too
            body["logprobs"] = 1
    body.update(_sampling(request.params))
    for key in ("tools", "tool_choice", "response_format"):
        if (value := getattr(request, key)) is not None:
            body[key] = value
    return path, body


def _sampling(p: SamplingParams) -> dict[str, Any]:
    """Only what differs from the defaults, so the upstream's own defaults (vLLM applies the
    model's generation_config) are not overridden. top_k and repetition_penalty are vLLM's extra
    body fields."""
    out: dict[str, Any] = {}
    if p.greedy:
        out["temperature"] = 0.0
    elif p.temperature != 1.0:
        out["temperature"] = p.temperature
    if p.top_p != 1.0:
        out["top_p"] = p.top_p
    if p.top_k != 0:
        out["top_k"] = p.top_k
    if p.repetition_penalty != 1.0:
        out["repetition_penalty"] = p.repetition_penalty
    if p.stop:
        out["stop"] = list(p.stop)
    if p.seed is not None:
        out["seed"] = p.seed
    if p.ignore_eos:
        out["ignore_eos"] = True  # vLLM's extra field
    return out


def status_error(status: int, message: str, adapter: str | None) -> AtollError:
    said = f"upstream HTTP {status}: {message}"
    if status in (401, 403):
        return BackendUnavailable(
            f"the upstream refused this island's API key (HTTP {status}: {message}); "
            f"the operator must fix {API_KEY_ENV}"
        )
    if status == 429:
        return Overloaded(said)
    model_missing = status == 404 or (400 <= status < 500 and _MODEL_MISSING.search(message))
    if model_missing and adapter is not None:
        return AdapterNotFound(f"the upstream does not serve adapter {adapter!r}: {message}")
    if status == 404 and not _MODEL_MISSING.search(message):
        return Unsupported(f"the upstream does not offer this route ({said})")
    if 400 <= status < 500:
        return InvalidRequest(said)
    return BackendUnavailable(said)


def _stream_error(error: Any, adapter: str | None) -> AtollError:
    """A ``data: {"error": ...}`` event: its code when it has one, else the upstream failed."""
    if isinstance(error, dict):
        code, message = error.get("code"), str(error.get("message") or error)
    else:
        code, message = None, str(error)
    status = code if isinstance(code, int) and 400 <= code < 600 else 500
    return status_error(status, message[:MAX_ERROR_CHARS], adapter)


def error_text(resp: httpx.Response) -> str:
    """The upstream's message from OpenAI's ``{"error": {"message"}}``, vLLM's flat
    ``{"message"}``, FastAPI's ``{"detail"}``, or the raw body."""
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:MAX_ERROR_CHARS] or resp.reason_phrase
    text: Any = body
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            text = error.get("message") or error
        else:
            text = error or body.get("message") or body.get("detail") or body
    return (text if isinstance(text, str) else json.dumps(text))[:MAX_ERROR_CHARS]


def json_object(resp: httpx.Response, what: str) -> dict[str, Any]:
    try:
        body = resp.json()
    except ValueError as e:
        raise BackendUnavailable(f"the upstream's {what} reply is not JSON") from e
    if not isinstance(body, dict):
        raise BackendUnavailable(f"the upstream's {what} reply is not a JSON object")
    return body


def _count(value: Any) -> int:
    return value if isinstance(value, int) and value >= 0 else 0
