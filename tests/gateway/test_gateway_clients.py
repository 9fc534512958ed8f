"""The gateway driven by real third-party clients on loopback: langchain-openai (chat, streaming,
embeddings), lorax-client (sync and async, adapters, merged adapters, its error classes), the
openai SDK (embeddings and a multipart transcription through an ``openai``-backend node to a fake
upstream), and schemathesis fuzzing every route of the gateway's own OpenAPI schema."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import httpx
import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from langchain_openai import ChatOpenAI, OpenAIEmbeddings
from lorax import AsyncClient, Client
from lorax import errors as lorax_errors
from lorax.types import MergedAdapters
from pydantic import SecretStr
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Ok

from atoll.plugins.inference.contract import AdapterWeight, EmbedRequest, Mixture
from atoll.plugins.inference.echo_backend import EchoBackend, EchoConfig
from support.fake_openai import EMBEDDER, FakeOpenAI, embedding, heard
from support.island import Island
from support.overlay import AgentFactory, eventually

UPSTREAM_KEY = "sk-upstream"
SOAP = "alice/soap-notes"
SQL = "alice/sql"
CLINIC = "clinic/notes"  # an adapter of project "clinic", where carol is only a viewer
TIMEOUT = 30.0  # seconds any one client call may take


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def tokens_of(words: list[str], adapter: str | None = None) -> list[str]:
    """The echo backend's tokens for a prompt's words: one per word, the adapter's tag first."""
    words = [f"[{adapter}]", *words] if adapter else words
    return [w if i == 0 else " " + w for i, w in enumerate(words)]


@pytest.fixture
async def island(make_agent: AgentFactory) -> Island:
    """Two echo nodes and a gateway serving its schema (``docs``: off by default), with alice's
    two adapters, bob, and carol viewing project clinic's."""
    gw_island = Island(make_agent)
    await gw_island.add_node("gpu1")
    await gw_island.add_node("gpu2")
    await gw_island.start_gateway(docs=True)
    await gw_island.models_seen("echo")
    accounts = gw_island.accounts
    gw_island.key("bob")
    gw_island.key("carol")
    gw_island.key("alice")
    accounts.register_adapter(SOAP, base_model="echo", owner="alice", actor="t")
    accounts.register_adapter(SQL, base_model="echo", owner="alice", actor="t")
    accounts.create_project("clinic", actor="t")
    accounts.add_member("clinic", "carol", "viewer", actor="t")
    accounts.register_adapter(CLINIC, base_model="echo", project="clinic", actor="t")
    # Storage and a training queue, so the files and fine-tuning routes have their services.
    await gw_island.make_agent("store", roles=("storage",), plugins={"storage": {}}, heartbeat=0.2)
    await gw_island.make_agent(
        "queue", roles=("training",), plugins={"training": {"mode": "queue"}}, heartbeat=0.2
    )
    discovery = gw_island.plugin.gateway.watch.discovery
    await eventually(
        lambda: bool(discovery.select(plugin="storage") and discovery.select(plugin="training"))
    )
    return gw_island


@pytest.fixture
async def upstream(island: Island) -> AsyncIterator[FakeOpenAI]:
    """A fake OpenAI-compatible server and an inference node (``openai`` backend) in front of it,
    serving embeddings (EMBEDDER) and transcription (whisper-1)."""
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    await fake.start()
    config = {
        "url": fake.url,
        "api_key": UPSTREAM_KEY,
        "embedding_model": EMBEDDER,
        "transcription_model": "whisper-1",
    }
    await island.make_agent(
        "oai",
        roles=("inference",),
        plugins={"inference": {"backend": "openai", "openai": config}},
        heartbeat=0.2,
    )
    await island.models_seen("fake-base")
    yield fake
    await fake.stop()


# --- langchain-openai -----------------------------------------------------------------------
# Its models take field names as well as the aliases its docs show (base_url, api_key, model,
# timeout): field names here, the signature pydantic's mypy plugin gives a model that populates
# by name.


async def test_langchain_chat_invoke_and_stream_on_an_adapter(island: Island) -> None:
    chat = ChatOpenAI(
        openai_api_base=f"{island.url}/v1",
        openai_api_key=SecretStr(island.key("alice")),
        model_name=SOAP,
        max_retries=0,
        request_timeout=TIMEOUT,
        stream_usage=True,
    )
    reply = await asyncio.to_thread(chat.invoke, "write the visit note")
    expected = tokens_of(["write", "the", "visit", "note"], SOAP)
    assert reply.content == "".join(expected)
    assert reply.response_metadata["finish_reason"] == "stop"
    assert reply.response_metadata["model_name"] == SOAP
    assert reply.usage_metadata is not None
    assert (reply.usage_metadata["input_tokens"], reply.usage_metadata["output_tokens"]) == (4, 5)

    chunks = [c async for c in chat.astream("write the visit note")]
    assert [c.content for c in chunks if c.content] == expected  # one chunk per token
    whole = chunks[0]
    for c in chunks[1:]:
        whole += c
    assert whole.content == "".join(expected)
    assert whole.usage_metadata is not None and whole.usage_metadata["total_tokens"] == 9

    base = chat.model_copy(update={"model_name": "echo"})
    assert (await base.ainvoke("no adapter here")).content == "no adapter here"


async def test_langchain_stream_delivers_tokens_as_they_are_made(island: Island) -> None:
    await island.add_node("slow", model="slow", delay=0.3)
    await island.models_seen("slow")
    chat = ChatOpenAI(
        openai_api_base=f"{island.url}/v1",
        openai_api_key=SecretStr(island.key("alice")),
        model_name="slow",
        max_retries=0,
    )
    arrivals: list[tuple[float, str]] = []
    async for chunk in chat.astream("one two three four"):
        if chunk.content:
            arrivals.append((time.monotonic(), str(chunk.content)))
    assert [text for _, text in arrivals] == tokens_of(["one", "two", "three", "four"])
    # The node makes a token every 0.3 s: a buffered response would deliver them all at once.
    assert arrivals[-1][0] - arrivals[0][0] >= 0.5


async def test_langchain_errors_are_openai_errors(island: Island) -> None:
    url = f"{island.url}/v1"
    wrong = ChatOpenAI(
        openai_api_base=url, openai_api_key=SecretStr("sk-wrong"), model_name="echo", max_retries=0
    )
    with pytest.raises(openai.AuthenticationError):
        await wrong.ainvoke("hi")
    bob = ChatOpenAI(
        openai_api_base=url,
        openai_api_key=SecretStr(island.key("bob")),
        model_name=SOAP,
        max_retries=0,
    )
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        await bob.ainvoke("hi")  # alice's private adapter is invisible to bob
    carol = ChatOpenAI(
        openai_api_base=url,
        openai_api_key=SecretStr(island.key("carol")),
        model_name=CLINIC,
        max_retries=0,
    )
    with pytest.raises(openai.PermissionDeniedError, match="viewer"):
        await carol.ainvoke("hi")


async def test_langchain_embeddings(island: Island) -> None:
    embedder = OpenAIEmbeddings(
        openai_api_base=f"{island.url}/v1",
        openai_api_key=SecretStr(island.key("alice")),
        model="echo",
        check_embedding_ctx_length=False,  # else tiktoken downloads its encodings
        max_retries=0,
    )
    texts = ["the first document", "a second one", "third"]
    oracle = EchoBackend(EchoConfig())
    expected = (await oracle.embed(EmbedRequest(input=[*texts, "a query"]))).embeddings
    vectors = await asyncio.to_thread(embedder.embed_documents, texts)
    assert len(vectors) == 3 and all(len(v) == 8 for v in vectors)
    for got, want in zip(vectors, expected[:3], strict=True):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-7)
    assert await embedder.aembed_query("a query") == pytest.approx(expected[3], rel=1e-6, abs=1e-7)


# --- lorax-client ---------------------------------------------------------------------------


def mixture_tag(merged: MergedAdapters) -> str:
    """The echo backend's first token for a mixture: the contract's cache key of it."""
    mixture = Mixture(
        adapters=[
            AdapterWeight(id=i, weight=w) for i, w in zip(merged.ids, merged.weights, strict=True)
        ],
        merge_strategy=merged.merge_strategy or "linear",
        density=merged.density,
    )
    return mixture.key()


async def test_lorax_client_generate_and_stream(island: Island) -> None:
    client = Client(island.url, headers=bearer(island.key("alice")), timeout=int(TIMEOUT))
    reply = await asyncio.to_thread(
        client.generate, "hello there world", adapter_id=SOAP, details=True, max_new_tokens=10
    )
    expected = tokens_of(["hello", "there", "world"], SOAP)
    assert reply.generated_text == "".join(expected)
    details = reply.details
    assert details is not None
    assert (details.finish_reason.value, details.prompt_tokens, details.generated_tokens) == (
        "eos_token",
        3,
        4,
    )
    assert [t.text for t in details.tokens] == expected
    assert [t.id for t in details.tokens] == [0, 1, 2, 3]

    short = await asyncio.to_thread(
        client.generate, "hello there world", adapter_id=SOAP, max_new_tokens=2, details=False
    )
    assert short.generated_text == "".join(expected[:2]) and short.details is None
    cut = await asyncio.to_thread(client.generate, "hello there world", max_new_tokens=2)
    assert cut.details is not None and cut.details.finish_reason.value == "length"

    def stream() -> list[Any]:
        return list(client.generate_stream("hello there world", adapter_id=SOAP, details=True))

    events = await asyncio.to_thread(stream)
    *tokens, last = events
    assert [e.token.text for e in tokens] == expected
    assert all(e.generated_text is None and not e.token.special for e in tokens)
    assert last.token.special and last.generated_text == "".join(expected)
    assert last.details is not None and last.details.generated_tokens == 4
    assert last.details.finish_reason.value == "eos_token"


async def test_lorax_client_merged_adapters(island: Island) -> None:
    client = Client(island.url, headers=bearer(island.key("alice")), timeout=int(TIMEOUT))
    merged = MergedAdapters(ids=[SOAP, SQL], weights=[0.7, 0.3], merge_strategy="ties", density=0.5)
    reply = await asyncio.to_thread(client.generate, "merge us", merged_adapters=merged)
    assert reply.generated_text == "".join(tokens_of(["merge", "us"], mixture_tag(merged)))

    def stream() -> list[str]:
        events = client.generate_stream("merge us", merged_adapters=merged)
        return [e.token.text for e in events if not e.token.special]

    assert await asyncio.to_thread(stream) == tokens_of(["merge", "us"], mixture_tag(merged))


async def test_lorax_client_errors(island: Island) -> None:
    wrong = Client(island.url, headers=bearer("sk-wrong"), timeout=int(TIMEOUT))
    with pytest.raises(lorax_errors.UnknownError, match="401"):  # LoRAX has no class for 401
        await asyncio.to_thread(wrong.generate, "hi")
    bob = Client(island.url, headers=bearer(island.key("bob")), timeout=int(TIMEOUT))
    with pytest.raises(lorax_errors.NotFoundError, match="does not exist"):
        await asyncio.to_thread(bob.generate, "hi", adapter_id=SOAP)
    merged = MergedAdapters(ids=[SOAP, SQL], weights=[0.5, 0.5], density=1.0)
    with pytest.raises(lorax_errors.NotFoundError):  # every part of a mixture is checked
        await asyncio.to_thread(bob.generate, "hi", merged_adapters=merged)
    carol = Client(island.url, headers=bearer(island.key("carol")), timeout=int(TIMEOUT))
    # lorax-client names every 403 ShardNotReadyError; the message is the gateway's
    with pytest.raises(lorax_errors.ShardNotReadyError, match="viewer"):
        await asyncio.to_thread(carol.generate, "hi", adapter_id=CLINIC)

    def stream_refused() -> None:
        list(bob.generate_stream("hi", adapter_id=SOAP))

    with pytest.raises(lorax_errors.NotFoundError):
        await asyncio.to_thread(stream_refused)
    with pytest.raises(lorax_errors.ValidationError, match="adapter_source"):
        await asyncio.to_thread(bob.generate, "hi", adapter_source="hub")


async def test_lorax_async_client(island: Island) -> None:
    minutes = TIMEOUT / 60  # AsyncClient multiplies its timeout by 60
    client = AsyncClient(island.url, headers=bearer(island.key("alice")), timeout=minutes)
    reply = await client.generate("async hello", adapter_id=SQL, details=True)
    expected = tokens_of(["async", "hello"], SQL)
    assert reply.generated_text == "".join(expected)
    assert reply.details is not None and [t.text for t in reply.details.tokens] == expected
    streamed = [e async for e in client.generate_stream("async hello", adapter_id=SQL)]
    assert [e.token.text for e in streamed[:-1]] == expected
    assert streamed[-1].generated_text == "".join(expected)
    merged = MergedAdapters(ids=[SQL, SOAP], weights=[1.0, 2.0], density=0.9)
    mixed = await client.generate("mixed", merged_adapters=merged)
    assert mixed.generated_text == "".join(tokens_of(["mixed"], mixture_tag(merged)))

    bob = AsyncClient(island.url, headers=bearer(island.key("bob")), timeout=minutes)
    with pytest.raises(lorax_errors.NotFoundError):
        await bob.generate("hi", adapter_id=SQL)
    with pytest.raises(lorax_errors.NotFoundError):
        _ = [e async for e in bob.generate_stream("hi", adapter_id=SQL)]


async def test_lorax_out_of_range_merge_weight_is_a_validation_error(island: Island) -> None:
    """Found by the fuzzer: a weight outside the contract's [-10, 10] was a 500."""
    client = AsyncClient(island.url, headers=bearer(island.admin_key), timeout=TIMEOUT / 60)
    merged = MergedAdapters(ids=[SQL], weights=[11.0], density=1.0)
    with pytest.raises(lorax_errors.ValidationError, match="weight"):
        await client.generate("hi", merged_adapters=merged)
    with pytest.raises(lorax_errors.ValidationError, match="weight"):
        _ = [e async for e in client.generate_stream("hi", merged_adapters=merged)]


# --- openai SDK through an openai-backend node -------------------------------------------------


async def test_openai_sdk_embeddings_via_an_openai_node(
    island: Island, upstream: FakeOpenAI
) -> None:
    async with openai.AsyncOpenAI(
        base_url=f"{island.url}/v1", api_key=island.key("alice"), max_retries=0
    ) as client:
        await check_embeddings(client, upstream)


async def check_embeddings(client: openai.AsyncOpenAI, upstream: FakeOpenAI) -> None:
    texts = ["first text", "the second one here"]
    # Unasked, the SDK requests base64 and decodes it itself.
    formats: list[Literal["float"] | openai.Omit] = [openai.omit, "float"]
    for encoding_format in formats:
        reply = await client.embeddings.create(
            model=EMBEDDER, input=texts, encoding_format=encoding_format
        )
        assert reply.model == EMBEDDER and [d.index for d in reply.data] == [0, 1]
        assert reply.usage.prompt_tokens == 2 + 4
        for text, item in zip(texts, reply.data, strict=True):
            raw = embedding(text)
            norm = sum(x * x for x in raw) ** 0.5
            assert item.embedding == pytest.approx([x / norm for x in raw], rel=1e-6)
        assert upstream.last("/v1/embeddings").body["input"] == texts
    echo = await client.embeddings.create(model="echo", input="routed by model name")
    assert len(echo.data[0].embedding) == 8  # the echo nodes' size, not the upstream's 4


async def test_openai_sdk_unknown_embedding_model_is_not_found(island: Island) -> None:
    """Found by the fuzzer: a model no node serves was a 503 (which clients retry), where chat
    answers 404 for the same name."""
    key = island.key("alice")
    async with openai.AsyncOpenAI(base_url=f"{island.url}/v1", api_key=key, max_retries=0) as c:
        with pytest.raises(openai.NotFoundError):
            await c.embeddings.create(model="no-such-model", input="a")
        with pytest.raises(openai.NotFoundError):
            await c.completions.create(model="no-such-model", prompt="a")


async def test_openai_sdk_lists_and_retrieves_every_model_a_key_may_use(
    island: Island, upstream: FakeOpenAI
) -> None:
    """Clients pick models from the list (LangChain helpers, chat front-ends): chat bases,
    the caller's adapters, embedding and transcription models, each with its kind; another
    user's adapter is as absent as one that does not exist."""
    url = f"{island.url}/v1"
    async with openai.AsyncOpenAI(base_url=url, api_key=island.key("alice"), max_retries=0) as c:
        listed = {m.id: m for m in (await c.models.list()).data}
        kinds = {i: (m.model_extra or {}).get("kind") for i, m in listed.items()}
        assert kinds == {
            "echo": "chat", "fake-base": "chat", SOAP: "adapter", SQL: "adapter",
            EMBEDDER: "embedding", "whisper-1": "transcription",
        }  # fmt: skip
        soap = await c.models.retrieve(SOAP)  # an id with a slash
        assert soap.id == SOAP and soap.owned_by == "alice"
        assert (soap.model_extra or {})["parent"] == "echo"
        assert (await c.models.retrieve("whisper-1")).id == "whisper-1"
        for hidden in (CLINIC, "no-such-model"):  # carol's project's; nobody's
            with pytest.raises(openai.NotFoundError, match="does not exist"):
                await c.models.retrieve(hidden)
        with pytest.raises(openai.NotFoundError, match="no transcription model 'whisper-9'"):
            await c.audio.transcriptions.create(model="whisper-9", file=("a.wav", b"RIFF"))
    async with openai.AsyncOpenAI(base_url=url, api_key=island.key("carol"), max_retries=0) as c:
        assert (await c.models.retrieve(CLINIC)).owned_by == "clinic"


async def test_openai_sdk_transcription_is_a_multipart_upload_end_to_end(
    island: Island, upstream: FakeOpenAI
) -> None:
    url = f"{island.url}/v1"
    async with openai.AsyncOpenAI(base_url=url, api_key=island.key("alice"), max_retries=0) as c:
        await check_transcriptions(c, upstream)
    async with openai.AsyncOpenAI(base_url=url, api_key="sk-wrong", max_retries=0) as wrong:
        with pytest.raises(openai.AuthenticationError):
            await wrong.audio.transcriptions.create(model="whisper-1", file=("a.wav", b"RIFF"))


async def check_transcriptions(client: openai.AsyncOpenAI, upstream: FakeOpenAI) -> None:
    audio = os.urandom(200_000)
    result = await client.audio.transcriptions.create(
        model="whisper-1",
        file=("clip.wav", audio, "audio/wav"),
        language="de",
        prompt="names: Atoll",
        temperature=0.2,
    )
    assert result.text == heard(audio)
    form = upstream.last("/v1/audio/transcriptions").body
    assert form == {
        "model": "whisper-1",
        "language": "de",
        "prompt": "names: Atoll",
        "response_format": "json",
        "temperature": 0.2,
        "filename": "clip.wav",
        "content_type": "audio/x-wav",
        "size": len(audio),  # every byte crossed gateway, overlay and node
    }
    verbose = await client.audio.transcriptions.create(
        model="whisper-1", file=("clip.wav", audio), response_format="verbose_json"
    )
    assert verbose.text == heard(audio) and verbose.segments is not None
    assert verbose.segments[0].text == heard(audio)
    text = await client.audio.transcriptions.create(
        model="whisper-1", file=("clip.wav", audio), response_format="text"
    )
    assert text.strip() == heard(audio)


# --- schemathesis against /openapi.json -------------------------------------------------------

# /admin/feed is an endless SSE stream: schemathesis' transport reads a whole body, so it would
# wait forever; test_admin_feed covers it. Other streams (chat, completions, LoRAX) end.
ENDLESS = {"GET /admin/feed"}
# Query fields the GET admin routes read by hand (the schema does not declare them).
QUERY_FIELDS = ["user", "project", "key_id", "since", "limit"]
queries = st.dictionaries(
    st.sampled_from(QUERY_FIELDS) | st.text(max_size=4),
    st.text(max_size=12) | st.integers().map(str) | st.floats().map(str),
    max_size=4,
)


def fuzz(
    url: str, headers: dict[str, str], budget: int, schema_key: str
) -> dict[str, dict[int, int]]:
    """Every operation of the live schema (read with ``schema_key``), positive and negative
    cases, ``budget`` cases in all shared by the operations (at least 10 each: the run's time
    stays bounded as routes are added); the statuses seen per operation. Every 5xx is collected
    (not just the first), then reported together."""
    document = httpx.get(f"{url}/openapi.json", headers=bearer(schema_key), timeout=TIMEOUT)
    schema = schemathesis.openapi.from_dict(document.raise_for_status().json())
    seen: dict[str, dict[int, int]] = {}
    failures: dict[tuple[str, int], str] = {}
    operations = sum(len(methods) for methods in document.json()["paths"].values())
    examples = max(10, budget // max(1, operations))
    config = settings(
        max_examples=examples,
        deadline=None,
        database=None,  # no replay of past runs' examples: each run explores afresh
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],  # report cases as found, no shrinking
    )
    for result in schema.get_all_operations():
        assert isinstance(result, Ok)
        operation = result.ok()
        if operation.label in ENDLESS:
            continue
        parametrised = bool(operation.body) or any(operation.iter_parameters())
        for mode in GenerationMode if parametrised else [GenerationMode.POSITIVE]:

            @config
            @given(case=operation.as_strategy(generation_mode=mode), query=queries)
            def call(case: Any, query: dict[str, str]) -> None:
                params = query if case.method == "GET" else None
                response = case.call(base_url=url, headers=headers, params=params, timeout=20)
                label = case.operation.label
                statuses = seen.setdefault(label, {})
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                try:
                    case.validate_response(response, checks=[not_a_server_error], headers=headers)
                except FailureGroup as exc:
                    failures.setdefault((label, response.status_code), str(exc))

            try:
                call()
            except Unsatisfiable:
                # Some operations have no invalid input schemathesis can build (a path id whose
                # schema is any string); their valid inputs are still generated above/below.
                if mode is not GenerationMode.NEGATIVE:
                    raise
    assert not failures, "server errors:\n\n" + "\n\n".join(failures.values())
    return seen


async def test_openapi_schema_refs_resolve(island: Island) -> None:
    """A ``$ref`` that points nowhere makes clients and fuzzers blind to that body."""
    async with httpx.AsyncClient(timeout=TIMEOUT) as http:
        anonymous = await http.get(f"{island.url}/openapi.json")
        assert anonymous.status_code == 401  # the schema needs a key; /docs is not served
        assert (await http.get(f"{island.url}/docs")).status_code in (401, 404)
        reply = await http.get(f"{island.url}/openapi.json", headers=bearer(island.admin_key))
        assert reply.headers["content-security-policy"].startswith("default-src 'none'")
        document = reply.json()
    broken = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str):
                target: Any = document
                for part in ref.removeprefix("#/").split("/"):
                    target = target.get(part) if isinstance(target, dict) else None
                if target is None:
                    broken.append(f"{where}: {ref}")
            for key, value in node.items():
                walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}/{i}")

    walk(document, "")
    assert not broken, json.dumps(broken, indent=1)


@pytest.mark.timeout(300)  # a hang guard: 2,000 cases over the routes, on a busy machine
async def test_openapi_fuzz_with_the_admin_key_never_5xx(
    island: Island, upstream: FakeOpenAI
) -> None:
    key = island.admin_key
    seen = await asyncio.to_thread(fuzz, island.url, bearer(key), 2000, key)
    assert len(seen) >= 20  # every route was reached
    for label in ("GET /v1/models", "GET /admin/usage"):
        assert 200 in seen[label], (label, seen[label])  # fuzzing got past validation too
    # A made-up transcription model is a 404 from the service: past validation all the same.
    label = "POST /v1/audio/transcriptions"
    assert seen[label].keys() - {400, 422}, (label, seen[label])


# One valid request per inference route: refused without a key, answered with one.
VALID: dict[str, dict[str, Any]] = {  # httpx.post's keyword arguments
    "/v1/chat/completions": {
        "json": {"model": "echo", "messages": [{"role": "user", "content": "a"}]}
    },
    "/v1/completions": {"json": {"model": "echo", "prompt": "a"}},
    "/v1/embeddings": {"json": {"model": "echo", "input": "a"}},
    "/v1/audio/transcriptions": {
        "data": {"model": "whisper-1"},
        "files": {"file": ("a.wav", b"RIFF")},
    },
    "/": {"json": {"inputs": "a", "parameters": {"adapter_id": SOAP}}},
    "/generate": {"json": {"inputs": "a", "parameters": {"adapter_id": SOAP}}},
    "/generate_stream": {"json": {"inputs": "a", "parameters": {"adapter_id": SOAP}}},
}


@pytest.mark.timeout(240)  # a hang guard: 800 cases over the routes, on a busy machine
async def test_openapi_fuzz_without_a_key_is_refused(island: Island, upstream: FakeOpenAI) -> None:
    seen = await asyncio.to_thread(fuzz, island.url, {}, 800, island.admin_key)
    assert set(seen.pop("GET /health")) == {200}
    for label, statuses in seen.items():
        # FastAPI validates a typed body before the route runs, so a malformed one is a 400/422
        # even without a key, and one over the size limit a 413 (never read, whoever sends it);
        # nothing else gets through.
        admin_only = label.split()[1].startswith(("/admin", "/metrics"))
        allowed = {401} if admin_only else {400, 401, 413, 422}
        if "{" in label:  # a path parameter drawn empty or with a '/..' routes nowhere
            allowed.add(404)
        assert set(statuses) <= allowed, (label, statuses)
    async with httpx.AsyncClient(base_url=island.url, timeout=TIMEOUT) as http:
        for path, request in VALID.items():
            refused = await http.post(path, **request)
            assert refused.status_code == 401, (path, refused.text)
            assert "API key" in refused.text
            answered = await http.post(path, headers=bearer(island.admin_key), **request)
            assert answered.status_code == 200, (path, answered.text)


async def test_admin_feed(island: Island) -> None:
    async with httpx.AsyncClient(base_url=island.url, timeout=TIMEOUT) as http:
        assert (await http.get("/admin/feed")).status_code == 401
        user = await http.get("/admin/feed", headers=bearer(island.key("bob")))
        assert user.status_code == 403
        names: set[str] = set()
        headers = bearer(island.admin_key)
        async with (
            asyncio.timeout(TIMEOUT),
            http.stream("GET", "/admin/feed", headers=headers) as response,
        ):
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            async for line in response.aiter_lines():  # the first frame is sent at once
                if line.startswith("data: "):
                    names = {row["name"] for row in json.loads(line[6:])["agents"]}
                    break
    assert {"gpu1", "gpu2", "gw"} <= names
