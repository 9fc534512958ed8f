"""The lorax backend against a fake LoRAX server on loopback (tests/fake_lorax.py): requests as
LoRAX reads them, streamed and whole replies, lorax-client's quirks, every error mapped to the
platform's, a LoRAX that is loading or gone, adapters from storage, and LoRAX behind a tunnel."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pydantic
import pytest
from lorax import AsyncClient
from lorax import errors as lorax_errors
from lorax import types as lorax_types

from atoll.agent.errors import AtollError, DeadlineExceeded, InvalidRequest
from atoll.agent.tunnel import TunnelListener
from atoll.plugins.inference import lorax_backend
from atoll.plugins.inference.contract import (
    AdapterRejected,
    AdapterWeight,
    BackendUnavailable,
    ChatMessage,
    EmbedRequest,
    FinishEvent,
    GenerateRequest,
    Mixture,
    Overloaded,
    SamplingParams,
    TokenEvent,
    Unsupported,
)
from atoll.plugins.inference.lorax_backend import LoraxBackend, LoraxConfig
from atoll.plugins.inference.lorax_wire import render_chat
from atoll.plugins.storage.contract.adapters import AdapterNotFound
from support.fake_lorax import Failure, FakeLorax, bound_socket
from support.overlay import eventually

TOKEN = "s3cret-token"
BackendFactory = Callable[..., Awaitable[LoraxBackend]]


@pytest.fixture
async def lorax() -> AsyncIterator[FakeLorax]:
    fake = await FakeLorax(token=TOKEN).start()
    yield fake
    await fake.stop()


@pytest.fixture
async def make_backend(lorax: FakeLorax) -> AsyncIterator[BackendFactory]:
    started: list[LoraxBackend] = []

    async def make(fetch: Any = None, **options: Any) -> LoraxBackend:
        options = {"url": lorax.url, "api_token": TOKEN, **options}
        backend = LoraxBackend(LoraxConfig(**options), fetch)
        await backend.start()
        started.append(backend)
        return backend

    yield make
    for backend in started:
        await backend.stop()


async def run(
    backend: LoraxBackend, request: GenerateRequest
) -> tuple[list[TokenEvent], FinishEvent]:
    events = [e async for e in backend.generate(request)]
    *tokens, finish = events
    assert all(isinstance(t, TokenEvent) for t in tokens)
    assert isinstance(finish, FinishEvent)
    return tokens, finish  # type: ignore[return-value]


def parameters(fake: FakeLorax) -> dict[str, Any]:
    return fake.generations()[-1].body["parameters"]


async def test_streamed_chat_with_adapter_maps_sampling_and_usage(
    lorax: FakeLorax, make_backend: BackendFactory
) -> None:
    backend = await make_backend()
    messages = [
        ChatMessage(role="system", content="Be brief."),
        ChatMessage(role="user", content="Greet the world"),
    ]
    params = SamplingParams(
        max_new_tokens=10, temperature=0.7, top_p=0.9, top_k=40, repetition_penalty=1.1, seed=7
    )
    request = GenerateRequest(
        messages=messages, adapter="acme/greeter", adapter_source="s3", params=params
    )
    tokens, finish = await run(backend, request)

    sent = lorax.generations()[-1]
    assert sent.path == "/" and sent.body["stream"] is True
    assert sent.headers["authorization"] == f"Bearer {TOKEN}"
    prompt = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nGreet the world<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert sent.body["inputs"] == prompt
    p = sent.body["parameters"]
    assert p["adapter_id"] == "acme/greeter" and p["adapter_source"] == "s3"
    assert p["merged_adapters"] is None
    assert (p["do_sample"], p["temperature"], p["top_p"], p["top_k"]) == (True, 0.7, 0.9, 40)
    assert (p["repetition_penalty"], p["seed"], p["max_new_tokens"]) == (1.1, 7, 10)
    assert p["details"] is True and p["stop"] == []

    # The words, then LoRAX's special EOS token, whose text is not output.
    assert [t.text for t in tokens] == ["Hello", ",", " world", "!", ""]
    assert [t.token_id for t in tokens] == [100, 101, 102, 103, 2]
    assert [t.logprob for t in tokens] == [-0.25, -0.5, -0.75, -1.0, -0.01]
    assert finish.finish_reason == "stop"  # eos_token
    assert (finish.usage.prompt_tokens, finish.usage.completion_tokens) == (len(prompt.split()), 5)
    assert (finish.model, finish.adapter) == ("fake/base-7b", "acme/greeter")

    info = backend.info()
    assert (info.backend, info.base_model, info.models) == (
        "lorax",
        "fake/base-7b",
        ["fake/base-7b"],
    )
    assert (info.adapters, info.max_batch, info.running) == (["acme/greeter"], 128, 0)


async def test_whole_reply_greedy_prompt_with_default_adapter_source(
    lorax: FakeLorax, make_backend: BackendFactory
) -> None:
    backend = await make_backend(stream=False, adapter_source="pbase")
    params = SamplingParams(max_new_tokens=2, temperature=0.0, top_p=0.5, top_k=3)
    request = GenerateRequest(prompt="Say hi", adapter="repo/3", params=params)
    tokens, finish = await run(backend, request)

    sent = lorax.generations()[-1]
    assert sent.path == "/" and sent.body["stream"] is False and sent.body["inputs"] == "Say hi"
    p = sent.body["parameters"]
    assert (p["adapter_id"], p["adapter_source"]) == ("repo/3", "pbase")
    # Greedy: no temperature, top_p or top_k, which would make LoRAX sample.
    assert (p["do_sample"], p["temperature"], p["top_p"], p["top_k"]) == (False, None, None, None)
    assert p["repetition_penalty"] is None and p["seed"] is None
    assert [t.text for t in tokens] == ["Hello", ","]
    assert [t.logprob for t in tokens] == [-0.25, -0.5]
    assert finish.finish_reason == "length"
    assert (finish.usage.prompt_tokens, finish.usage.completion_tokens) == (2, 2)


@pytest.mark.parametrize("stream", [True, False])
async def test_stop_sequence_is_sent_and_cut_from_the_output(
    lorax: FakeLorax, make_backend: BackendFactory, stream: bool
) -> None:
    backend = await make_backend(stream=stream)
    request = GenerateRequest(prompt="go", params=SamplingParams(stop=[" world", "xyz"]))
    tokens, finish = await run(backend, request)
    assert parameters(lorax)["stop"] == [" world", "xyz"]
    # LoRAX includes the stop sequence in its output; the contract does not.
    assert [t.text for t in tokens] == ["Hello", ",", ""]
    assert finish.finish_reason == "stop" and finish.usage.completion_tokens == 3

    # Text that may begin a stop sequence is held back, and let go when it does not.
    request = GenerateRequest(prompt="go", params=SamplingParams(stop=["!?"]))
    tokens, finish = await run(backend, request)
    assert [t.text for t in tokens] == ["Hello", ",", " world", "", "!"]
    assert finish.finish_reason == "stop"


async def test_mixture_is_sent_as_merged_adapters_with_density(
    lorax: FakeLorax, make_backend: BackendFactory
) -> None:
    backend = await make_backend()
    mixture = Mixture(
        adapters=[AdapterWeight(id="med/a", weight=0.7), AdapterWeight(id="med/b", weight=0.3)],
        merge_strategy="ties",
        density=0.5,
    )
    _, finish = await run(backend, GenerateRequest(prompt="q", mixture=mixture))
    p = parameters(lorax)
    assert p["adapter_id"] is None and p["adapter_source"] == "hub"
    assert p["merged_adapters"] == {
        "ids": ["med/a", "med/b"],
        "weights": [0.7, 0.3],
        "merge_strategy": "ties",
        "density": 0.5,
        "majority_sign_method": "total",
    }
    assert finish.adapter == mixture.key()
    assert backend.info().adapters == ["med/b", "med/a"]

    # Linear merges still carry a density: lorax-client 0.6.3's MergedAdapters has no default.
    linear = Mixture(adapters=[AdapterWeight(id="med/a", weight=1.0)])
    await run(backend, GenerateRequest(prompt="q", mixture=linear))
    assert parameters(lorax)["merged_adapters"]["density"] == 1.0

    sent = len(lorax.generations())
    svd = Mixture(adapters=[AdapterWeight(id="med/a", weight=1.0)], merge_strategy="svd")
    with pytest.raises(Unsupported, match="svd"):
        await run(backend, GenerateRequest(prompt="q", mixture=svd))
    assert len(lorax.generations()) == sent  # refused before anything was sent


@pytest.mark.parametrize("stream", [True, False])
async def test_null_logprobs_survive(
    lorax: FakeLorax, make_backend: BackendFactory, stream: bool
) -> None:
    lorax.null_logprobs = True
    backend = await make_backend(stream=stream)
    tokens, finish = await run(backend, GenerateRequest(prompt="hi"))
    assert [t.logprob for t in tokens] == [None, -0.5, None, -1.0, -0.01]
    assert "".join(t.text for t in tokens) == "Hello, world!"
    assert finish.finish_reason == "stop"

    # lorax-client 0.6.3 itself cannot read such a stream: the reason this backend parses it.
    client = AsyncClient(lorax.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=1)
    with pytest.raises(lorax_errors.UnknownError):
        async for _ in client.generate_stream("hi"):
            pass


_ERROR_CASES = [
    (Failure(422, "Input validation error: inputs too long", "validation"), InvalidRequest),
    (Failure(429, "Model is overloaded", "overloaded"), Overloaded),
    (Failure(424, "Request failed during generation: CUDA out of memory", "generation"), None),
    (
        Failure(
            424,
            "Request failed during generation: Server error: 404 Client Error. Repository Not "
            "Found for url: https://huggingface.co/api/models/acme/greeter",
            "generation",
        ),
        AdapterNotFound,
    ),
    (
        Failure(424, "Server error: adapter rank 64 exceeds the maximum of 32", "generation"),
        AdapterRejected,
    ),
    (Failure(500, "Incomplete generation", "incomplete_generation"), BackendUnavailable),
    (Failure(429, "rate limit exceeded"), Overloaded),  # a proxy's, without error_type
    (Failure(400, "malformed body"), InvalidRequest),
    (Failure(502, "bad gateway"), BackendUnavailable),
    (Failure(503, "shard not ready"), BackendUnavailable),
    (Failure(504, "shard timed out"), DeadlineExceeded),
]


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize(("failure", "expected"), _ERROR_CASES)
async def test_lorax_errors_become_platform_errors(
    lorax: FakeLorax,
    make_backend: BackendFactory,
    stream: bool,
    failure: Failure,
    expected: type[AtollError] | None,
) -> None:
    failure.after = 1  # streamed: one token, then LoRAX's in-band error event
    lorax.fail = failure
    backend = await make_backend(stream=stream)
    request = GenerateRequest(prompt="hi", adapter="acme/greeter")
    got: list[Any] = []
    with pytest.raises(AtollError) as caught:
        async for event in backend.generate(request):
            got.append(event)
    assert type(caught.value) is (expected or BackendUnavailable)
    assert failure.error[:20] in caught.value.message
    in_band = stream and failure.error_type is not None
    assert len(got) == (1 if in_band else 0)
    assert backend.info().running == 0

    # Without an adapter in the request, a generation error is not an adapter's.
    if failure.error_type == "generation":
        with pytest.raises(BackendUnavailable):
            await run(backend, GenerateRequest(prompt="hi"))


async def test_wrong_api_token_is_a_clear_error_and_env_token_works(
    lorax: FakeLorax, make_backend: BackendFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = await make_backend(api_token="wrong")
    with pytest.raises(BackendUnavailable, match=r"refused this island's API token.*401"):
        await run(backend, GenerateRequest(prompt="hi"))
    health = await backend.health()
    assert not health.ok and "ATOLL_LORAX_API_TOKEN" in health.detail["error"]
    assert "wrong" not in repr(backend.config)  # the secret stays out of logs

    monkeypatch.setenv("ATOLL_LORAX_API_TOKEN", TOKEN)
    from_env = await make_backend(api_token=None)
    assert (await from_env.health()).ok
    _, finish = await run(from_env, GenerateRequest(prompt="hi"))
    assert finish.finish_reason == "stop"
    assert lorax.generations()[-1].headers["authorization"] == f"Bearer {TOKEN}"


async def test_loading_then_up_then_down() -> None:
    sock = bound_socket()  # LoRAX still loading: nothing accepts yet
    port = sock.getsockname()[1]
    config = LoraxConfig(url=f"http://127.0.0.1:{port}", base_model="cfg/base", health_interval=60)
    backend = LoraxBackend(config, None)
    await backend.start()  # does not fail
    fake = FakeLorax(model_id="real/base")
    try:
        health = await backend.health()
        assert not health.ok and "cannot reach LoRAX" in health.detail["error"]
        assert backend.info().base_model == "cfg/base"
        with pytest.raises(BackendUnavailable, match="cannot reach LoRAX"):
            await run(backend, GenerateRequest(prompt="hi"))

        await fake.start(sock)
        health = await backend.health()
        assert health.ok and health.detail["model_id"] == "real/base"
        assert backend.info().base_model == "real/base"
        _, finish = await run(backend, GenerateRequest(prompt="hi"))
        assert finish.model == "real/base"

        fake.unhealthy = True
        health = await backend.health()
        assert not health.ok and "unhealthy" in health.detail["error"]

        await fake.stop()
        assert not (await backend.health()).ok
        with pytest.raises(BackendUnavailable):
            await run(backend, GenerateRequest(prompt="hi"))
    finally:
        await backend.stop()
        await fake.stop()


async def test_start_does_not_wait_long_for_a_silent_lorax(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(lorax_backend, "START_WAIT", 0.2)
    silent = bound_socket()
    silent.listen()  # the kernel accepts connections; nothing ever answers
    port = silent.getsockname()[1]
    config = LoraxConfig(url=f"http://127.0.0.1:{port}", base_model="cfg/base", timeout=1.0)
    backend = LoraxBackend(config, None)
    try:
        started = time.monotonic()
        await backend.start()
        assert time.monotonic() - started < 0.8  # START_WAIT, not the 1 s timeout
        assert backend.info().base_model == "cfg/base"
        health = await backend.health()
        assert not health.ok and "sent nothing for 1.0s" in health.detail["error"]
    finally:
        await backend.stop()
        silent.close()


async def test_health_loop_refreshes_info(lorax: FakeLorax, make_backend: BackendFactory) -> None:
    backend = await make_backend(health_interval=0.05)
    assert backend.info().base_model == "fake/base-7b"
    lorax.model_id = "fake/base-restarted"
    await eventually(lambda: backend.info().base_model == "fake/base-restarted")


async def test_silence_beyond_the_timeout_is_a_deadline(
    lorax: FakeLorax, make_backend: BackendFactory
) -> None:
    backend = await make_backend(timeout=0.3)
    lorax.token_delay = 1.0
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match=r"0\.3s"):
        await run(backend, GenerateRequest(prompt="hi"))
    # Keep-alives are no tokens: a stream of only them still times out.
    lorax.token_delay, lorax.keepalive_only = 0.0, True
    with pytest.raises(DeadlineExceeded):
        await run(backend, GenerateRequest(prompt="hi"))
    assert time.monotonic() - started < 5


async def test_closing_the_stream_frees_the_request(
    lorax: FakeLorax, make_backend: BackendFactory
) -> None:
    backend = await make_backend()
    lorax.token_delay = 1.0
    stream = backend.generate(GenerateRequest(prompt="hi"))
    assert isinstance(stream, AsyncGenerator)  # so it can be closed
    first = await anext(stream)
    assert isinstance(first, TokenEvent) and first.text == "Hello"
    assert backend.info().running == 1
    started = time.monotonic()
    await stream.aclose()
    assert time.monotonic() - started < 0.5  # not waiting for LoRAX's next token
    assert backend.info().running == 0
    await eventually(lambda: lorax.open_streams == 0, timeout=2)  # LoRAX saw the client leave


async def test_adapters_from_storage_are_fetched_once_into_adapter_dir(
    lorax: FakeLorax, make_backend: BackendFactory, tmp_path: Path
) -> None:
    fetched: list[tuple[str, Path]] = []

    async def fetch(adapter_id: str, root: Path) -> Path:
        fetched.append((adapter_id, root))
        await asyncio.sleep(0.05)  # both requests arrive while this runs
        dest = root / adapter_id
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "adapter_config.json").write_text(json.dumps({"r": 8}))
        return dest

    backend = await make_backend(fetch=fetch, adapter_source="storage", adapter_dir=tmp_path)
    request = GenerateRequest(prompt="hi", adapter="users/ann/sql-v2")
    await asyncio.gather(run(backend, request), run(backend, request))
    assert fetched == [("users/ann/sql-v2", tmp_path)]  # one fetch for both
    dest = (tmp_path / "users/ann/sql-v2").resolve()
    for sent in lorax.generations():
        p = sent.body["parameters"]
        assert (p["adapter_id"], p["adapter_source"]) == (str(dest), "local")
    assert backend.info().adapters == ["users/ann/sql-v2"]  # the platform's id, not the path

    # A LoRAX error about the local path is still reported as that adapter's.
    lorax.fail = Failure(
        424, f"Server error: Can't find 'adapter_config.json' at '{dest}'", "generation"
    )
    with pytest.raises(AdapterNotFound, match="users/ann/sql-v2"):
        await run(backend, request)

    # Without a fetcher, storage adapters are refused, and nothing is sent.
    lorax.fail = None
    sent_before = len(lorax.generations())
    no_fetch = await make_backend(adapter_source="hub", adapter_dir=tmp_path)
    with pytest.raises(Unsupported, match="Atoll storage"):
        await run(no_fetch, GenerateRequest(prompt="hi", adapter="x", adapter_source="storage"))
    assert len(lorax.generations()) == sent_before


async def test_refusals_and_response_format(lorax: FakeLorax, make_backend: BackendFactory) -> None:
    backend = await make_backend()
    tool = {"type": "function", "function": {"name": "f", "parameters": {}}}
    with pytest.raises(Unsupported, match="tools"):
        await run(backend, GenerateRequest(prompt="hi", tools=[tool]))
    with pytest.raises(InvalidRequest, match="not 'other/model'"):
        await run(backend, GenerateRequest(prompt="hi", model="other/model"))
    sampled_greedy = SamplingParams(temperature=0.0, do_sample=True)
    with pytest.raises(InvalidRequest, match="greedy"):
        await run(backend, GenerateRequest(prompt="hi", params=sampled_greedy))
    with pytest.raises(InvalidRequest, match="inputs"):  # lorax-client's own validation
        await run(backend, GenerateRequest(prompt=""))
    with pytest.raises(Unsupported, match="grammar"):
        await run(backend, GenerateRequest(prompt="hi", response_format={"type": "grammar"}))
    with pytest.raises(InvalidRequest, match=r"json_schema\.schema"):
        await run(backend, GenerateRequest(prompt="hi", response_format={"type": "json_schema"}))
    assert lorax.generations() == []

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    await run(backend, GenerateRequest(prompt="hi", response_format=fmt))
    assert parameters(lorax)["response_format"] == {"type": "json_object", "schema": schema}
    await run(backend, GenerateRequest(prompt="hi", response_format={"type": "json_object"}))
    assert parameters(lorax)["response_format"] == {
        "type": "json_object",
        "schema": {"type": "object"},
    }
    await run(backend, GenerateRequest(prompt="hi", response_format={"type": "text"}))
    assert parameters(lorax)["response_format"] is None


def test_config_and_chat_templates() -> None:
    with pytest.raises(pydantic.ValidationError, match="http"):
        LoraxConfig(url="ftp://example.org")
    with pytest.raises(pydantic.ValidationError, match="adapter_dir"):
        LoraxConfig(url="http://127.0.0.1:1", adapter_source="storage")
    assert LoraxConfig(url="http://127.0.0.1:8080/").url == "http://127.0.0.1:8080"
    messages = [ChatMessage(role="system", content="S"), ChatMessage(role="user", content="U")]
    assert render_chat(messages, "plain") == "System: S\n\nUser: U\n\nAssistant:"
    assert render_chat(messages, "chatml").endswith("<|im_end|>\n<|im_start|>assistant\n")


async def test_plain_template_is_used_when_configured(
    lorax: FakeLorax, make_backend: BackendFactory
) -> None:
    backend = await make_backend(chat_template="plain")
    await run(backend, GenerateRequest(messages=[ChatMessage(role="user", content="Hi")]))
    assert lorax.generations()[-1].body["inputs"] == "User: Hi\n\nAssistant:"


async def test_embed_through_lorax_client(lorax: FakeLorax, make_backend: BackendFactory) -> None:
    backend = await make_backend()
    result = await backend.embed(EmbedRequest(input=["a b c", "hello"]))
    assert result.model == "fake/base-7b"
    raw = [[5.0, 2.0, 1.0], [5.0, 0.0, 1.0]]
    for got, want in zip(result.embeddings, raw, strict=True):
        norm = sum(x * x for x in want) ** 0.5
        assert got == pytest.approx([x / norm for x in want])
    sent = [r for r in lorax.requests if r.path == "/embed"]
    assert sorted(r.body["inputs"] for r in sent) == ["a b c", "hello"]
    assert all(r.headers["authorization"] == f"Bearer {TOKEN}" for r in sent)
    plain = await backend.embed(EmbedRequest(input=["a b c"], normalize=False))
    assert plain.embeddings == [raw[0]]

    wrong = await make_backend(api_token="wrong")
    with pytest.raises(BackendUnavailable, match="401"):
        await wrong.embed(EmbedRequest(input=["x"]))


async def test_the_fake_speaks_lorax_clients_wire(lorax: FakeLorax) -> None:
    """The fake's replies parse with lorax-client 0.6.3's own models and clients."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    client = AsyncClient(lorax.url, headers=headers, timeout=1)
    reply = await client.generate("hi there", max_new_tokens=3, adapter_id="a/b")
    assert reply.generated_text == "Hello, world" and reply.details is not None
    assert reply.details.finish_reason == "length" and reply.details.prompt_tokens == 2
    streamed = AsyncClient(f"{lorax.url}/generate_stream", headers=headers, timeout=1)
    events = [e async for e in streamed.generate_stream("hi")]
    assert events[-1].generated_text == "Hello, world!" and events[-1].token.special
    async with (
        aiohttp.ClientSession(headers=headers) as http,
        http.post(f"{lorax.url}/generate", json={"inputs": "x", "parameters": {}}) as resp,
    ):
        whole = lorax_types.Response.model_validate(await resp.json())
    assert whole.generated_text == "Hello, world!"
    with pytest.raises(lorax_errors.UnknownError, match="401"):
        await AsyncClient(lorax.url, timeout=1).generate("hi")


async def test_lorax_behind_an_atoll_tunnel(lorax: FakeLorax, make_agent) -> None:
    gateway = await make_agent("gateway", roles=("inference",))  # tunnels serve inference
    await make_agent("gpu", plugins={"tunnel": {"allow": [f"127.0.0.1:{lorax.port}"]}})
    listener = await TunnelListener(gateway.agent, "gpu", "127.0.0.1", lorax.port).start(
        "127.0.0.1", 0
    )
    host, port = listener.address
    backend = LoraxBackend(LoraxConfig(url=f"http://{host}:{port}", api_token=TOKEN), None)
    await backend.start()
    try:
        assert (await backend.health()).ok
        request = GenerateRequest(prompt="through the overlay", adapter="acme/greeter")
        tokens, finish = await run(backend, request)
        assert "".join(t.text for t in tokens) == "Hello, world!"
        assert finish.usage.prompt_tokens == 3
        assert parameters(lorax)["adapter_id"] == "acme/greeter"
        lorax.fail = Failure(429, "Model is overloaded", "overloaded")
        with pytest.raises(Overloaded):
            await run(backend, request)
    finally:
        await backend.stop()
        await listener.stop()
