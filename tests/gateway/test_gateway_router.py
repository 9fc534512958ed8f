"""The gateway's router over a real broker and real inference agents (echo backends, and an
OpenAI-compatible backend in front of a real fake upstream that can be switched to fail)."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from atoll.agent.discovery import Discovery, Status
from atoll.agent.runtime import AgentRuntime
from atoll.broker.server import BrokerServer
from atoll.plugins.gateway.errors import GatewayError
from atoll.plugins.gateway.router import ModelRouter, Route
from atoll.plugins.inference.contract import (
    FinishEvent,
    GenerateRequest,
    TokenEvent,
    TranscribeRequest,
    stream_generate,
)
from atoll.plugins.inference.echo_backend import EchoBackend
from atoll.plugins.inference.plugin import InferencePlugin
from atoll.protocol.frames import DEFAULT_MAX_MESSAGE
from support.fake_openai import BASE, FakeOpenAI, heard
from support.overlay import AgentFactory, eventually

KEY = "sk-island"
FAST = {"heartbeat": 0.2}


def echo(model: str = "m1", delay: float = 0.01) -> dict[str, Any]:
    return {"inference": {"backend": "echo", "echo": {"model": model, "delay": delay}}}


def upstream(fake: FakeOpenAI, **options: Any) -> dict[str, Any]:
    return {
        "inference": {"backend": "openai", "openai": {"url": fake.url, "api_key": KEY, **options}}
    }


def prompt(text: str = "one two three", **fields: Any) -> GenerateRequest:
    return GenerateRequest(prompt=text, **fields)


@dataclass
class Gateway:
    rt: AgentRuntime
    view: Discovery

    def router(self, **options: Any) -> ModelRouter:
        return ModelRouter(self.rt.agent, self.view, **options)

    def holds(self, node: str, adapter: str) -> bool:
        entry = self.view.entries.get(node)
        return entry is not None and adapter in entry.capabilities["inference"]["adapters"]

    async def see(self, *names: str) -> None:
        await eventually(
            lambda: {e.name for e in self.view.select(plugin="inference")} >= set(names)
        )


@pytest.fixture
async def gw(make_agent: AgentFactory) -> AsyncIterator[Gateway]:
    rt = await make_agent("gw", roles=("gateway",))
    view = await Discovery(rt.agent).start()
    yield Gateway(rt, view)
    await view.stop()


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    server = FakeOpenAI(api_key=KEY)
    await server.start()
    yield server
    await server.stop()


async def run(
    router: ModelRouter,
    request: GenerateRequest,
    labels: dict[str, str] | None = None,
    deadline=10.0,
) -> tuple[list[TokenEvent], FinishEvent, Route]:
    stream = router.stream(request, labels or {}, deadline)
    events = [e async for e in stream]
    *tokens, finish = events
    assert isinstance(finish, FinishEvent) and all(isinstance(t, TokenEvent) for t in tokens)
    return tokens, finish, stream.route  # type: ignore[return-value]


async def serve_directly(gw: Gateway, node: str, adapter: str) -> None:
    """Have ``node`` serve ``adapter`` once, so it holds it (echo lists adapters it served)."""
    request = prompt("warm", adapter=adapter)
    events = [e async for e in stream_generate(gw.rt.agent, f"{node}/inference", request)]
    assert events[-1].type == "finish" and events[-1].adapter == adapter


def text(tokens: list[TokenEvent]) -> str:
    return "".join(t.text for t in tokens)


def echo_backend(node: AgentRuntime) -> EchoBackend:
    """The echo backend of ``node``'s inference plugin."""
    plugin = node.host.plugins["inference"]
    assert isinstance(plugin, InferencePlugin) and isinstance(plugin.backend, EchoBackend)
    return plugin.backend


async def test_nodes_holding_the_adapter_come_first(make_agent: AgentFactory, gw: Gateway) -> None:
    await make_agent("n1", plugins=echo(), **FAST)
    await make_agent("n2", plugins=echo(), **FAST)
    await gw.see("n1", "n2")
    await serve_directly(gw, "n2", "alice/soap")
    await eventually(lambda: gw.holds("n2", "alice/soap"))  # announced at the next heartbeat
    router = gw.router()
    for _ in range(20):  # whatever the random draws
        assert [e.name for e in router.candidates("m1", "alice/soap", {})] == ["n2", "n1"]
    assert {e.name for e in router.candidates("m1", "bob/other", {})} == {"n1", "n2"}
    assert router.candidates("m2", "alice/soap", {}) == []  # nobody serves that base
    for _ in range(5):
        tokens, finish, route = await run(router, prompt(model="m1", adapter="alice/soap"))
        assert route.node == "n2" and route.retries == 0
        assert text(tokens) == "[alice/soap] one two three" and finish.adapter == "alice/soap"


async def test_load_spreads_over_equal_nodes(make_agent: AgentFactory, gw: Gateway) -> None:
    for name in ("n1", "n2"):
        await make_agent(name, plugins=echo(), **FAST)
    await gw.see("n1", "n2")
    router = gw.router()
    one_by_one: Counter[str | None] = Counter()
    for _ in range(20):
        *_, route = await run(router, prompt())
        one_by_one[route.node] += 1
    assert set(one_by_one) == {"n1", "n2"} and min(one_by_one.values()) >= 3, one_by_one
    # A burst, all routed before any heartbeat: the gateway counts what it has in flight, so
    # equal nodes take turns instead of the burst landing where the last heartbeat looked idle.
    await eventually(lambda: all(e.load["running"] == 0 for e in gw.view.select("inference")))
    streams = [router.stream(prompt("a b c d e f g h"), {}, 10.0) for _ in range(20)]
    await asyncio.gather(*(drain(s) for s in streams))
    burst = Counter(s.route.node for s in streams)
    assert burst == {"n1": 10, "n2": 10}, burst
    assert router.inflight == {}  # every stream gave its place back


async def drain(stream: AsyncIterator[Any]) -> None:
    async for _ in stream:
        pass


async def test_labels_policy_confines_requests(make_agent: AgentFactory, gw: Gateway) -> None:
    phi = await make_agent("phi1", plugins=echo(), labels={"phi": "true"}, **FAST)
    await make_agent("plain", plugins=echo(), **FAST)
    await gw.see("phi1", "plain")
    router = gw.router()
    policy = {"phi": "true"}
    assert [e.name for e in router.candidates("m1", None, policy)] == ["phi1"]
    assert router.candidates("m1", None, {"phi": "false"}) == []
    for _ in range(6):
        *_, route = await run(router, prompt(model="m1"), policy)
        assert route.node == "phi1"
    await phi.stop()
    await eventually(lambda: not router.candidates("m1", None, policy))
    with pytest.raises(GatewayError) as caught:
        await run(router, prompt(model="m1"), policy)
    assert caught.value.status == 503
    assert caught.value.message == "no inference node serves m1 with labels phi=true"
    *_, route = await run(router, prompt(model="m1"))  # no policy: the unlabelled node serves
    assert route.node == "plain"
    with pytest.raises(GatewayError, match=r"no inference node serves m9$") as caught:
        await run(router, prompt(model="m9"))
    assert caught.value.status == 503


async def test_a_stopped_node_is_routed_around(make_agent: AgentFactory, gw: Gateway) -> None:
    await make_agent("a", plugins=echo(), **FAST)
    b = await make_agent("b", plugins=echo(), **FAST)
    await gw.see("a", "b")
    await serve_directly(gw, "b", "alice/soap")
    await eventually(lambda: gw.holds("b", "alice/soap"))
    await b.stop()  # the favourite for this adapter is gone
    for _ in range(3):
        tokens, _, route = await run(gw.router(), prompt(adapter="alice/soap"))
        assert route.node == "a" and text(tokens).startswith("[alice/soap]")


async def test_a_request_waits_for_a_stale_node_to_be_heard_again(
    make_agent: AgentFactory, gw: Gateway
) -> None:
    """The only node of a model silent for a few beats (its broker restarting) is STALE, not
    gone: a request waits for it to be heard again instead of failing at once."""
    await make_agent("n1", plugins=echo(), **FAST)
    await gw.see("n1")
    router = gw.router(first_event_timeout=2.0)
    entry = gw.view.entries["n1"]
    entry.announced_at -= 1.0  # five beats of silence
    entry.status = gw.view.status(entry)
    assert entry.status is Status.STALE and router.candidates("m1", None, {}) == []
    tokens, _, route = await run(router, prompt(model="m1"))
    assert route.node == "n1" and route.retries == 0 and text(tokens) == "one two three"
    await gw.rt.agent.link.stop()  # we hear nobody now, but n1 keeps
    for entry in gw.view.entries.values():
        entry.announced_at -= 60.0
        entry.status = gw.view.status(entry)
    assert gw.view.select(plugin="inference", status=Status.STALE) == []
    with pytest.raises(GatewayError) as lost:  # LOST: no waiting
        await run(router, prompt(model="m1"))
    assert lost.value.status == 503 and "no inference node serves m1" in lost.value.message


async def test_a_node_dead_without_a_word_is_retried_elsewhere(
    make_agent: AgentFactory, gw: Gateway, broker: BrokerServer
) -> None:
    # A slow heartbeat: discovery still shows the dead node ACTIVE for several seconds.
    dead = await make_agent("dead", plugins=echo(), heartbeat=5.0)
    await make_agent("alive", plugins=echo(), **FAST)
    await gw.see("dead", "alive")
    await serve_directly(gw, "dead", "alice/soap")
    await dead.announcer.announce()
    await eventually(lambda: gw.holds("dead", "alice/soap"))
    assert dead.announcer._task is not None
    dead.announcer._task.cancel()
    await dead.agent.link.stop()
    # Once the broker has dropped its session (sending to it in the moment between its EOF and
    # its connection_lost trips a transport bug, reported separately).
    await eventually(lambda: "dead" not in broker.router.agents("acme"))
    router = gw.router(first_event_timeout=1.0)
    assert [e.name for e in router.candidates("m1", "alice/soap", {})] == ["dead", "alive"]
    loop = asyncio.get_running_loop()
    started = loop.time()
    tokens, finish, route = await run(router, prompt(adapter="alice/soap"))
    assert route.node == "alive" and route.retries == 1 and route.failures[0].startswith("dead:")
    assert finish.adapter == "alice/soap" and text(tokens).startswith("[alice/soap]")
    assert loop.time() - started < 4.0


@pytest.mark.parametrize(("status", "says"), [(503, "503"), (429, "429")])
async def test_failure_before_the_first_token_is_retried(
    make_agent: AgentFactory, gw: Gateway, fake: FakeOpenAI, status: int, says: str
) -> None:
    await make_agent("flaky", plugins=upstream(fake), **FAST)
    good = await make_agent("good", plugins=echo(model=BASE), **FAST)
    await gw.see("flaky", "good")
    assert gw.holds("flaky", "sql-lora")  # the upstream's LoRA module: flaky is tried first
    fake.fail_status = status
    request = prompt("hello there", model=BASE, adapter="sql-lora")
    stream = gw.router().stream(request, {}, 10.0)
    events = [e async for e in stream]
    assert [e.type for e in events] == ["token"] * 3 + ["finish"]  # exactly one finish
    assert text([e for e in events[:-1] if isinstance(e, TokenEvent)]) == "[sql-lora] hello there"
    route = stream.route
    assert route.node == "good" and route.retries == 1
    assert route.failures[0].startswith("flaky:") and says in route.failures[0]
    assert list(echo_backend(good).seen_adapters) == ["sql-lora"]
    # With a single attempt the failure is the caller's answer, with its honest status.
    with pytest.raises(GatewayError) as caught:
        await run(gw.router(attempts=1), request)
    assert caught.value.status == (429 if status == 429 else 503)
    assert caught.value.message.startswith("1 inference node(s) failed before answering: flaky:")
    assert caught.value.headers() == ({"Retry-After": "1"} if status == 429 else {})


async def test_the_requests_own_fault_is_not_retried(
    make_agent: AgentFactory, gw: Gateway, fake: FakeOpenAI
) -> None:
    await make_agent("strict", plugins=upstream(fake), **FAST)
    good = await make_agent("good", plugins=echo(model=BASE), **FAST)
    await gw.see("strict", "good")
    fake.fail_status = 400  # the upstream refuses the request itself: InvalidRequest
    with pytest.raises(GatewayError, match="switched to fail with 400") as caught:
        await run(gw.router(), prompt(model=BASE, adapter="sql-lora"))
    assert caught.value.status == 400
    assert echo_backend(good).seen_adapters == {}  # never tried elsewhere


async def test_deadline_is_504_and_the_node_stops(make_agent: AgentFactory, gw: Gateway) -> None:
    slow = await make_agent("slow", plugins=echo(delay=0.05), **FAST)
    await gw.see("slow")
    backend = echo_backend(slow)
    words = " ".join(f"w{i}" for i in range(100))  # 5 s of tokens
    stream = gw.router().stream(prompt(words), {}, 0.5)
    got: list[Any] = []
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(GatewayError, match=r"within its 0.5s deadline") as caught:
        async for event in stream:
            got.append(event)
    assert caught.value.status == 504 and 0 < len(got) < 100
    assert loop.time() - started < 2.0
    assert stream.route.node == "slow"
    # The node's stream was aborted: it stops well before its 5 s of tokens.
    await eventually(lambda: backend.running == 0, timeout=2.0)
    # A deadline shorter than the first token: 504 straight away, no other node tried.
    early = gw.router().stream(prompt(words), {}, 0.02)
    with pytest.raises(GatewayError) as caught:
        await anext(early)
    assert caught.value.status == 504 and early.route.retries == 0
    await eventually(lambda: backend.running == 0, timeout=2.0)


async def test_tokens_arrive_as_they_are_made(make_agent: AgentFactory, gw: Gateway) -> None:
    await make_agent("slow", plugins=echo(delay=0.1), **FAST)
    await gw.see("slow")
    loop = asyncio.get_running_loop()
    times: list[float] = []
    async for event in gw.router().stream(prompt("a b c d e f"), {}, 10.0):
        times.append(loop.time())
        if event.type == "token":
            assert len(times) <= 6
    assert len(times) == 7
    # Six tokens 0.1 s apart at the node: buffered whole, they would arrive together.
    assert times[5] - times[0] >= 0.3


async def test_calls_choose_embedders_and_transcribers(
    make_agent: AgentFactory, gw: Gateway, fake: FakeOpenAI
) -> None:
    await make_agent("e1", plugins=echo("m1"), **FAST)
    await make_agent("e2", plugins=echo("m2"), **FAST)
    await make_agent("ear", plugins=upstream(fake, transcription_model="whisper-1"), **FAST)
    await gw.see("e1", "e2", "ear")
    router = gw.router()
    for model, node in (("m1", "e1"), ("m2", "e2")):
        reply, route = await router.call("embed", {"input": ["a", "b"]}, model, {}, 5.0)
        assert route.node == node and reply["model"] == model and len(reply["embeddings"]) == 2
    _, route = await router.call("embed", {"input": ["a"]}, None, {}, 5.0)
    assert route.node in ("e1", "e2")  # any embedder (ear announces none)
    with pytest.raises(GatewayError, match=r"serves embeddings \(m9\)") as caught:
        await router.call("embed", {"input": ["a"]}, "m9", {}, 5.0)
    assert caught.value.status == 503
    with pytest.raises(GatewayError, match="invalid EmbedRequest") as caught:
        await router.call("embed", {"input": []}, "m1", {}, 5.0)
    assert caught.value.status == 400
    audio = b"RIFF" + bytes(range(256))
    reply, route = await router.call("transcribe", TranscribeRequest(audio=audio), None, {}, 5.0)
    assert route.node == "ear" and reply["text"] == heard(audio)
    _, route = await router.call("transcribe", {"audio": audio}, "whisper-1", {}, 5.0)
    assert route.node == "ear"
    # Past the broker's message limit: the audio crosses the data plane as a stream.
    big = os.urandom(DEFAULT_MAX_MESSAGE + 1)
    reply, _ = await router.call("transcribe", TranscribeRequest(audio=big), None, {}, 20.0)
    assert reply["text"] == heard(big)
    with pytest.raises(GatewayError, match=r"serves transcription \(whisper-9\)"):
        await router.call("transcribe", {"audio": audio}, "whisper-9", {}, 5.0)
    fake.fail_status = 503
    with pytest.raises(GatewayError, match="1 inference node") as caught:
        await router.call("transcribe", TranscribeRequest(audio=audio), None, {}, 5.0)
    assert caught.value.status == 503
    with pytest.raises(GatewayError, match="serves transcription with labels phi=true"):
        await router.call("transcribe", {"audio": audio}, None, {"phi": "true"}, 5.0)
    with pytest.raises(ValueError, match="embed or transcribe"):
        await router.call("generate", {}, None, {}, 5.0)  # type: ignore[arg-type]


async def test_a_failing_embedder_is_retried_elsewhere(
    make_agent: AgentFactory, gw: Gateway, fake: FakeOpenAI
) -> None:
    await make_agent("flaky", plugins=upstream(fake, embedding_model="m1"), **FAST)
    await make_agent("good", plugins=echo("m1"), **FAST)
    await gw.see("flaky", "good")
    fake.fail_status = 503
    router = gw.router()
    routes = []
    for _ in range(30):  # each call draws flaky first with odds 1/2
        reply, route = await router.call("embed", {"input": ["a"]}, "m1", {}, 5.0)
        assert route.node == "good" and reply["model"] == "m1"
        routes.append(route)
        if route.retries:
            break
    assert routes[-1].retries == 1 and routes[-1].failures[0].startswith("flaky:")


async def test_the_routing_span_names_each_attempt_and_why(
    make_agent: AgentFactory, gw: Gateway, fake: FakeOpenAI
) -> None:
    """With a tracer (the gateway's when it exports traces), a request's routing span, under
    the span current when it was routed: the node that served, why each node was tried, the
    failures; every attempt failed: an ERROR span with the status the caller gets."""
    await make_agent("flaky", plugins=upstream(fake), **FAST)
    await make_agent("good", plugins=echo(model=BASE), **FAST)
    await gw.see("flaky", "good")
    fake.fail_status = 503
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    router, once = gw.router(), gw.router(attempts=1)
    router.tracer = once.tracer = provider.get_tracer("test")
    request = prompt("hello there", model=BASE, adapter="sql-lora")
    with router.tracer.start_as_current_span("request") as parent:
        stream = router.stream(request, {}, 10.0)
        assert [e.type async for e in stream][-1] == "finish"
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "route"]
    assert span.parent is not None
    assert span.parent.span_id == parent.get_span_context().span_id
    attributes = dict(span.attributes or {})
    assert attributes["atoll.route.node"] == "good" and attributes["atoll.route.retries"] == 1
    reasons = [dict(e.attributes or {})["atoll.route.reason"] for e in span.events]
    assert reasons == ["adapter loaded", "retry"]
    failures = attributes["atoll.route.failures"]
    assert isinstance(failures, tuple) and failures[0].startswith("flaky:")
    assert span.status.status_code is StatusCode.UNSET

    exporter.clear()
    with once.tracer.start_as_current_span("request"), pytest.raises(GatewayError) as caught:
        async for _ in once.stream(request, {}, 10.0):
            pass
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "route"]
    assert span.status.status_code is StatusCode.ERROR
    assert dict(span.attributes or {})["error.type"] == str(caught.value.status)
    provider.shutdown()
