"""The ``openai`` inference backend against a real fake OpenAI-compatible server on loopback:
streams on adapters-as-model-names, sampling mapped, tool calls assembled, usage, embeddings,
multipart transcription, each upstream error mapped, and an upstream that comes up late."""

from __future__ import annotations

import asyncio
import json
import math
import os
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from pydantic import ValidationError

from atoll.agent.errors import DeadlineExceeded, InvalidRequest
from atoll.plugins.inference.contract import (
    BackendUnavailable,
    EmbedRequest,
    FinishEvent,
    GenerateRequest,
    Overloaded,
    SamplingParams,
    TokenEvent,
    TranscribeRequest,
    Unsupported,
)
from atoll.plugins.inference.openai_backend import OpenAIBackend, OpenAIConfig
from atoll.plugins.inference.openai_wire import MAX_EVENT_CHARS, sse_data
from atoll.plugins.storage.contract.adapters import AdapterNotFound
from support.fake_openai import (
    ADAPTERS,
    BASE,
    EMBEDDER,
    FakeOpenAI,
    chat_reply,
    completion_reply,
    embedding,
    heard,
    logprob,
    pieces,
    tool_arguments,
    words,
)
from support.net import free_port

KEY = "sk-island"
Make = Callable[..., Awaitable[OpenAIBackend]]


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    server = FakeOpenAI(api_key=KEY)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def make() -> AsyncIterator[Make]:
    started: list[OpenAIBackend] = []

    async def build(url: str, **options: Any) -> OpenAIBackend:
        backend = OpenAIBackend(OpenAIConfig(url=url, **{"api_key": KEY, **options}))
        await backend.start()
        started.append(backend)
        return backend

    yield build
    for backend in started:
        await backend.stop()


async def run(backend: OpenAIBackend, **request: Any) -> tuple[list[TokenEvent], FinishEvent]:
    events = [e async for e in backend.generate(GenerateRequest(**request))]
    *tokens, finish = events
    assert all(isinstance(t, TokenEvent) for t in tokens)
    assert isinstance(finish, FinishEvent)
    return tokens, finish  # type: ignore[return-value]


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]


# --- generate -----------------------------------------------------------------------------


async def test_chat_stream_on_an_adapter_maps_sampling(fake: FakeOpenAI, make: Make) -> None:
    backend = await make(fake.url)
    params = {
        "max_new_tokens": 50,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 40,
        "repetition_penalty": 1.1,
        "stop": ["END"],
        "seed": 7,
    }
    messages = chat("how many rows")
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    tokens, finish = await run(
        backend,
        messages=messages,
        adapter="sql-lora",
        params=params,
        request_id="req-1",
        traceparent=traceparent,
    )
    expected = chat_reply("sql-lora", messages)
    assert [t.text for t in tokens] == pieces(expected)
    assert finish.finish_reason == "stop"
    assert (finish.model, finish.adapter, finish.tool_calls) == (BASE, "sql-lora", None)
    assert finish.usage.prompt_tokens == words("be brief how many rows")
    assert finish.usage.completion_tokens == len(pieces(expected))
    seen = fake.last("/v1/chat/completions")
    assert seen.headers["authorization"] == f"Bearer {KEY}"
    assert seen.headers["x-request-id"] == "req-1"
    assert seen.headers["traceparent"] == traceparent  # a tracing vLLM continues the trace
    sent = seen.body
    assert sent["model"] == "sql-lora"
    assert sent["messages"] == messages
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert sent["max_tokens"] == 50
    assert (sent["temperature"], sent["top_p"], sent["top_k"]) == (0.7, 0.9, 40)
    assert (sent["repetition_penalty"], sent["stop"], sent["seed"]) == (1.1, ["END"], 7)
    assert "logprobs" not in sent and "tools" not in sent


async def test_defaults_are_not_sent_and_greedy_is_temperature_zero(
    fake: FakeOpenAI, make: Make
) -> None:
    backend = await make(fake.url)
    tokens, finish = await run(backend, messages=chat("hi"))
    assert "".join(t.text for t in tokens) == chat_reply(BASE, chat("hi"))
    assert (finish.model, finish.adapter) == (BASE, None)
    seen = fake.last("/v1/chat/completions")
    assert "traceparent" not in seen.headers and "x-request-id" not in seen.headers
    sent = seen.body
    assert sent["model"] == BASE  # discovered from /models: no model configured
    for key in ("temperature", "top_p", "top_k", "repetition_penalty", "stop", "seed"):
        assert key not in sent
    await run(backend, messages=chat("hi"), params={"temperature": 0.0})
    assert fake.last("/v1/chat/completions").body["temperature"] == 0.0
    await run(backend, messages=chat("hi"), params={"temperature": 0.8, "do_sample": False})
    assert fake.last("/v1/chat/completions").body["temperature"] == 0.0


async def test_completion_stream_with_logprobs_stops_at_length(
    fake: FakeOpenAI, make: Make
) -> None:
    backend = await make(fake.url)
    prompt = "once upon a time there was"
    tokens, finish = await run(
        backend, prompt=prompt, adapter="chat-lora", logprobs=True, params={"max_new_tokens": 3}
    )
    expected = pieces(completion_reply("chat-lora", prompt))[:3]
    assert [t.text for t in tokens] == expected
    assert [t.logprob for t in tokens] == [logprob(p) for p in expected]
    assert finish.finish_reason == "length"
    assert (finish.usage.prompt_tokens, finish.usage.completion_tokens) == (words(prompt), 3)
    sent = fake.last("/v1/completions").body
    assert (sent["model"], sent["prompt"], sent["max_tokens"], sent["logprobs"]) == (
        "chat-lora",
        prompt,
        3,
        1,
    )


async def test_chat_logprobs(fake: FakeOpenAI, make: Make) -> None:
    backend = await make(fake.url)
    tokens, _ = await run(backend, messages=chat("count to three"), logprobs=True)
    assert fake.last("/v1/chat/completions").body["logprobs"] is True
    assert [t.logprob for t in tokens] == [logprob(t.text) for t in tokens]
    assert len(tokens) == len(pieces(chat_reply(BASE, chat("count to three"))))


async def test_tool_calls_are_assembled_from_deltas(fake: FakeOpenAI, make: Make) -> None:
    backend = await make(fake.url, model=BASE)
    tools = [
        {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}
        for name in ("lookup", "weather")
    ]
    messages = chat("rain in Lexington?")
    tokens, finish = await run(
        backend,
        messages=messages,
        tools=tools,
        tool_choice="auto",
        response_format={"type": "json_object"},
    )
    assert tokens == []
    assert finish.finish_reason == "tool_calls"
    assert finish.tool_calls == [
        {
            "id": f"call_{i}",
            "type": "function",
            "function": {"name": name, "arguments": tool_arguments(messages, name)},
        }
        for i, name in enumerate(("lookup", "weather"))
    ]
    assert json.loads(finish.tool_calls[1]["function"]["arguments"])["tool"] == "weather"
    sent = fake.last("/v1/chat/completions").body
    assert (sent["tools"], sent["tool_choice"]) == (tools, "auto")
    assert sent["response_format"] == {"type": "json_object"}
    assert finish.usage.completion_tokens > 0


async def test_usage_without_the_usage_chunk(fake: FakeOpenAI, make: Make) -> None:
    backend = await make(fake.url)
    fake.send_usage = False
    messages = chat("tell me more")
    tokens, finish = await run(backend, messages=messages)
    assert finish.usage.completion_tokens == len(tokens) == len(pieces(chat_reply(BASE, messages)))
    assert finish.usage.prompt_tokens == words("be brief tell me more")  # from /tokenize
    assert fake.last("/tokenize").body["messages"] == messages
    fake.tokenize = False
    _, finish = await run(backend, prompt="x" * 40)
    assert finish.usage.prompt_tokens == 10  # ~4 characters per token


async def test_closing_the_stream_frees_the_request(fake: FakeOpenAI, make: Make) -> None:
    backend = await make(fake.url)
    stream = backend.generate(GenerateRequest(prompt="a b c d e f"))
    assert isinstance(stream, AsyncGenerator)  # so it can be closed
    first = await anext(stream)
    assert isinstance(first, TokenEvent)
    assert backend.info().running == 1
    await stream.aclose()
    assert backend.info().running == 0


async def test_stop_ends_a_running_stream_with_an_error(fake: FakeOpenAI, make: Make) -> None:
    backend = await make(fake.url)
    stream = backend.generate(
        GenerateRequest(prompt="w " * 900, params=SamplingParams(max_new_tokens=1000))
    )
    assert isinstance(await anext(stream), TokenEvent)
    await backend.stop()
    with pytest.raises(BackendUnavailable):
        for _ in range(2000):  # the fake has at most ~900 more chunks to send
            await anext(stream)


async def test_sse_parsing_across_fragments() -> None:
    async def fragments(parts: list[str]) -> AsyncIterator[str]:
        for part in parts:
            yield part

    raw = 'data: {"a":\r\n: a comment\r\nevent: x\r\ndata:1}\r\n\r\ndata: [DONE]'
    split = [raw[i : i + 3] for i in range(0, len(raw), 3)]  # cuts lines and CRLFs apart
    got = [data async for data in sse_data(fragments(split))]
    assert got == ['{"a":\n1}', "[DONE]"]
    huge = ["data: " + "x" * 1024 * 1024] * (MAX_EVENT_CHARS // (1024 * 1024) + 1)
    with pytest.raises(BackendUnavailable, match="over"):
        _ = [data async for data in sse_data(fragments(huge))]


# --- embeddings and transcription ---------------------------------------------------------


async def test_embeddings(fake: FakeOpenAI, make: Make) -> None:
    backend = await make(fake.url, embedding_model=EMBEDDER)
    inputs = ["first text", "the second one here"]
    result = await backend.embed(EmbedRequest(input=inputs))
    assert result.model == EMBEDDER
    assert result.usage.prompt_tokens == 2 + 4
    for text, vector in zip(inputs, result.embeddings, strict=True):
        raw = embedding(text)
        norm = math.sqrt(sum(x * x for x in raw))
        assert vector == pytest.approx([x / norm for x in raw])  # in input order, unit length
    assert fake.last("/v1/embeddings").body == {
        "model": EMBEDDER,
        "input": inputs,
        "encoding_format": "float",
    }
    unnormalised = await backend.embed(EmbedRequest(input=["x"], model=BASE, normalize=False))
    assert unnormalised.embeddings == [embedding("x")] and unnormalised.model == BASE


async def test_transcription_is_a_real_multipart_upload(fake: FakeOpenAI, make: Make) -> None:
    backend = await make(fake.url, transcription_model="whisper-1")
    audio = os.urandom(50_000)
    result = await backend.transcribe(
        TranscribeRequest(
            audio=audio,
            filename="/tmp/../clip.wav",
            language="de",
            prompt="names: Atoll",
            temperature=0.2,
        )
    )
    assert result.text == heard(audio) and result.body == {"text": heard(audio)}
    assert result.model == "whisper-1"
    form = fake.last("/v1/audio/transcriptions").body
    assert form == {
        "model": "whisper-1",
        "language": "de",
        "prompt": "names: Atoll",
        "response_format": "json",
        "temperature": 0.2,
        "filename": "clip.wav",
        "content_type": "audio/x-wav",
        "size": len(audio),
    }
    verbose = await backend.transcribe(
        TranscribeRequest(audio=audio, response_format="verbose_json", model="whisper-large")
    )
    assert verbose.text == heard(audio) and verbose.body["segments"][0]["text"] == heard(audio)
    assert fake.last("/v1/audio/transcriptions").body["model"] == "whisper-large"
    srt = await backend.transcribe(TranscribeRequest(audio=audio, response_format="srt"))
    assert srt.text.startswith("1\n00:00:00,000 --> ") and heard(audio) in srt.text
    assert srt.body is None
    text = await backend.transcribe(TranscribeRequest(audio=audio, response_format="text"))
    assert text.text == heard(audio) + "\n"
    # A translation goes to the upstream's translations route, with no language (English out).
    english = await backend.transcribe(
        TranscribeRequest(
            audio=audio, task="translate", language="de", response_format="verbose_json"
        )
    )
    assert english.body["task"] == "translate" and english.text == heard(audio)
    assert fake.last("/v1/audio/translations").body["language"] is None


async def test_no_transcription_model_is_unsupported(fake: FakeOpenAI, make: Make) -> None:
    backend = await make(fake.url)
    with pytest.raises(Unsupported, match="transcription"):
        await backend.transcribe(TranscribeRequest(audio=b"RIFF"))
    assert not any(s.path == "/v1/audio/transcriptions" for s in fake.seen)


# --- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error", "says"),
    [
        (429, Overloaded, "429"),
        (500, BackendUnavailable, "500"),
        (502, BackendUnavailable, "502"),
        (503, BackendUnavailable, "503"),
        (400, InvalidRequest, "switched to fail with 400"),
        (422, InvalidRequest, "switched to fail with 422"),
        (403, BackendUnavailable, "refused this island's API key"),
    ],
)
async def test_upstream_statuses_are_mapped(
    fake: FakeOpenAI, make: Make, status: int, error: type[Exception], says: str
) -> None:
    backend = await make(fake.url)
    fake.fail_status = status
    with pytest.raises(error, match=says):
        await run(backend, messages=chat("hi"))
    with pytest.raises(error, match=says):
        await backend.embed(EmbedRequest(input=["hi"]))


async def test_bad_requests_carry_the_upstream_message(fake: FakeOpenAI, make: Make) -> None:
    backend = await make(fake.url)
    with pytest.raises(InvalidRequest, match="max_tokens must be at most 1000"):
        await run(backend, prompt="hi", params={"max_new_tokens": 5000})
    with pytest.raises(InvalidRequest, match="The model `ghost` does not exist"):
        await run(backend, prompt="hi", model="ghost")
    with pytest.raises(InvalidRequest, match="tools"):
        await run(backend, prompt="hi", tools=[{"type": "function"}])
    with pytest.raises(Unsupported, match="mixture"):
        await run(backend, prompt="hi", mixture={"adapters": [{"id": "sql-lora", "weight": 1}]})


async def test_unknown_adapter_is_adapter_not_found(fake: FakeOpenAI, make: Make) -> None:
    backend = await make(fake.url)
    with pytest.raises(AdapterNotFound, match="nope"):
        await run(backend, messages=chat("hi"), adapter="nope")
    assert fake.last("/v1/chat/completions").body["model"] == "nope"


async def test_missing_route_is_unsupported(fake: FakeOpenAI, make: Make) -> None:
    backend = await make(fake.url)
    fake.missing.add("/v1/embeddings")
    with pytest.raises(Unsupported, match="Not Found"):
        await backend.embed(EmbedRequest(input=["hi"]))


async def test_wrong_key_blames_the_island_not_the_user(fake: FakeOpenAI, make: Make) -> None:
    backend = await make(fake.url, api_key="sk-wrong")
    with pytest.raises(BackendUnavailable, match=r"refused this island's API key.*401"):
        await run(backend, messages=chat("hi"))
    health = await backend.health()
    assert not health.ok and "401" in health.detail["error"]


async def test_api_key_from_the_environment(
    fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ATOLL_OPENAI_API_KEY", KEY)
    config = OpenAIConfig(url=fake.url)
    assert KEY not in repr(config)
    backend = OpenAIBackend(config)
    await backend.start()
    try:
        _, finish = await run(backend, prompt="hello")
        assert finish.finish_reason == "stop"
    finally:
        await backend.stop()


async def test_mid_stream_error_raises_after_the_tokens_so_far(
    fake: FakeOpenAI, make: Make
) -> None:
    backend = await make(fake.url)
    fake.fail_midstream = True
    got: list[TokenEvent] = []
    request = GenerateRequest.model_validate({"messages": chat("a b c d e")})
    with pytest.raises(BackendUnavailable, match="engine died"):
        async for event in backend.generate(request):
            assert isinstance(event, TokenEvent)  # no finish: the stream fails
            got.append(event)
    assert [e.text for e in got] == pieces(chat_reply(BASE, chat("a b c d e")))[:2]
    assert backend.info().running == 0


async def test_silent_upstream_is_deadline_exceeded(fake: FakeOpenAI, make: Make) -> None:
    backend = await make(fake.url, timeout=0.3)
    fake.delay = 1.0
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(DeadlineExceeded, match=r"silent for 0\.3s"):
        await run(backend, messages=chat("hi"))
    assert loop.time() - began < 0.9


@pytest.mark.parametrize(
    "options",
    [
        {"url": "ftp://127.0.0.1/v1"},
        {"url": "not a url"},
        {"url": "http://127.0.0.1:8000/v1", "timeout": 0},
        {"url": "http://127.0.0.1:8000/v1", "secret": "x"},
    ],
)
def test_bad_config_is_refused(options: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        OpenAIConfig(**options)


# --- health, info, and an upstream that starts late ---------------------------------------


async def test_info_and_health(fake: FakeOpenAI, make: Make) -> None:
    backend = await make(fake.url, embedding_model=EMBEDDER, transcription_model="whisper-1")
    info = backend.info()
    assert info.backend == "openai" and info.base_model == BASE
    assert info.models == [BASE, *ADAPTERS]
    assert info.adapters == list(ADAPTERS) and info.max_adapters == 2
    assert info.embeddings == EMBEDDER and info.transcription == "whisper-1"
    assert [(a.id, a.base_model) for a in backend.adapters()] == [(a, BASE) for a in ADAPTERS]
    health = await backend.health()
    assert health.ok and health.backend == "openai"
    assert health.detail["models"] == 3 and health.detail["health_status"] == 200
    fake.health_status = 503  # the engine died behind a live HTTP server
    assert not (await backend.health()).ok
    fake.health_status = 404  # a server without /health is judged by /models alone
    assert (await backend.health()).ok


async def test_upstream_down_then_up(make: Make) -> None:
    late = FakeOpenAI(api_key=KEY, port=free_port())
    backend = await make(late.url)  # start() must not fail while the upstream is down
    info = backend.info()
    assert info.models == [] and info.base_model == ""
    health = await backend.health()
    assert not health.ok and "cannot reach" in health.detail["error"]
    with pytest.raises(BackendUnavailable, match="cannot reach"):
        await run(backend, messages=chat("hi"))
    with pytest.raises(BackendUnavailable, match="cannot reach"):
        await run(backend, messages=chat("hi"), adapter="sql-lora", model=BASE)
    await late.start()
    try:
        health = await backend.health()
        assert health.ok and health.detail["base_model"] == BASE
        assert backend.info().adapters == list(ADAPTERS)
        _, finish = await run(backend, messages=chat("hi"), adapter="sql-lora")
        assert finish.finish_reason == "stop" and finish.model == BASE
    finally:
        await late.stop()
