"""OTLP traces across gateway → router → node: a real OTLP/HTTP receiver on loopback decodes what
a gateway and an echo inference node (both with ``otlp_traces_endpoint``) export while the openai
SDK drives the gateway; the spans' links, GenAI attributes and statuses are checked, and no prompt
text is in any of them. With tracing off nothing is started."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from pydantic import ValidationError

from atoll.agent.runtime import AgentRuntime
from atoll.plugins.gateway.plugin import GatewayConfig
from atoll.plugins.inference.plugin import InferenceConfig, InferencePlugin
from support.fake_openai import BASE, FakeOpenAI
from support.island import Island

SECRET = "zebra quartz marmalade"  # prompt text that must appear in no span
PROMPT: list[ChatCompletionMessageParam] = [{"role": "user", "content": f"say {SECRET}"}]
UPSTREAM_KEY = "sk-upstream"
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_PARENT = f"00-{CLIENT_TRACE}-00f067aa0ba902b7-01"
HOSTILE = [  # malformed traceparents: each is ignored, and its request starts a trace of its own
    "00-" + "z" * 200,
    f"00-{'0' * 32}-00f067aa0ba902b7-01",  # the all-zero trace id W3C calls invalid
    f"00-{CLIENT_TRACE}-{'0' * 16}-01",
    f"ff-{CLIENT_TRACE}-00f067aa0ba902b7-01",  # version ff is forbidden
    f"00-{CLIENT_TRACE.upper()}-00f067aa0ba902b7-01",
    f"00-{CLIENT_TRACE}-00f067aa0ba902b7-01-extra",
    ",".join([CLIENT_PARENT] * 50),  # a list of them
]


class Receiver:
    """An OTLP/HTTP traces endpoint on loopback: every exported span, decoded, with its
    service's name."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest.FromString(body)
                with receiver.lock:
                    for resource_spans in request.resource_spans:
                        resource = attributes(resource_spans.resource.attributes)
                        for scope in resource_spans.scope_spans:
                            for span in scope.spans:
                                receiver.spans.append(decoded(span, resource))
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"

    def named(self, name: str) -> list[dict[str, Any]]:
        with self.lock:
            return [s for s in self.spans if s["name"] == name]


def value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def attributes(kvs: Any) -> dict[str, Any]:
    return {kv.key: value(kv.value) for kv in kvs}


def decoded(span: Any, resource: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": span.name,
        "trace": span.trace_id.hex(),
        "id": span.span_id.hex(),
        "parent": span.parent_span_id.hex(),
        "attributes": attributes(span.attributes),
        "events": [e.name for e in span.events],
        "kind": span.kind,
        "error": span.status.code == Status.STATUS_CODE_ERROR,
        "service": resource["service.name"],
        "resource": resource,
    }


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.thread.start()
    yield r
    r.server.shutdown()
    r.server.server_close()


async def traced_island(make_agent: Any, endpoint: str | None) -> Island:
    isl = Island(make_agent)
    node = {"backend": "echo", "echo": {"model": "echo"}, "otlp_traces_endpoint": endpoint}
    isl.nodes["gpu1"] = await make_agent(
        "gpu1", roles=("inference",), plugins={"inference": node}, heartbeat=0.2
    )
    await (await isl.start_gateway(otlp_traces_endpoint=endpoint)).models_seen("echo")
    return isl


def inference(rt: AgentRuntime) -> InferencePlugin:
    plugin = rt.host.plugins["inference"]
    assert isinstance(plugin, InferencePlugin)
    return plugin


async def until(receiver: Receiver, isl: Island, check: Any, timeout: float = 10.0) -> None:
    """Flush both providers until ``check()`` holds (spans end after their responses)."""
    providers = [isl.plugin.tracing.provider]
    nodes = [inference(rt).tracing for rt in isl.nodes.values()]
    providers += [t.provider for t in nodes if t is not None]
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        for p in providers:
            await asyncio.to_thread(p.force_flush, 2000)
        if check():
            return
        if loop.time() > end:
            raise AssertionError(f"spans never arrived: {[s['name'] for s in receiver.spans]}")
        await asyncio.sleep(0.05)


def server_span(receiver: Receiver, request_id: str) -> dict[str, Any]:
    (span,) = [
        s
        for s in receiver.spans
        if s["service"] == "atoll-gateway" and s["attributes"].get("atoll.request.id") == request_id
    ]
    return span


def exporting() -> list[threading.Thread]:
    """The batch span processors' export threads running in this process."""
    return [t for t in threading.enumerate() if t.name.startswith("OtelBatchSpan")]


def children(receiver: Receiver, parent: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in receiver.spans if s["parent"] == parent["id"]]


async def test_a_request_is_one_trace_across_gateway_router_and_node(
    receiver: Receiver, make_agent: Any
) -> None:
    """(The receiver first: it outlives the agents, whose stop flushes their last spans.)"""
    isl = await traced_island(make_agent, receiver.url)
    acc = isl.accounts
    acc.create_user("alice", actor="test")
    acc.create_project("cardio", actor="test")
    acc.add_member("cardio", "alice", "member", actor="test")
    key = isl.key("alice", project="cardio")
    async with openai.AsyncOpenAI(base_url=f"{isl.url}/v1", api_key=key, max_retries=0) as api:
        chat = await api.chat.completions.create(
            model="echo", messages=PROMPT, max_tokens=50, temperature=0.5
        )
        stream = await api.chat.completions.create(
            model="echo", messages=PROMPT, stream=True, stream_options={"include_usage": True}
        )
        streamed_usage = None
        async for chunk in stream:
            streamed_usage = chunk.usage or streamed_usage
            streamed_id = chunk.id
        emb = await api.embeddings.create(model="echo", input=[SECRET, "two words"])
        with pytest.raises(openai.NotFoundError):
            await api.chat.completions.create(model="nowhere", messages=PROMPT)
        child = await api.chat.completions.create(
            model="echo", messages=PROMPT, extra_headers={"traceparent": CLIENT_PARENT}
        )
        hostile = [
            await api.chat.completions.create(
                model="echo",
                messages=PROMPT,
                extra_headers={"traceparent": bad, "tracestate": bad},
            )
            for bad in HOSTILE
        ]
    async with httpx.AsyncClient(base_url=isl.url) as http:  # bytes no str can say (obs-text)
        raw = await http.post(
            "/v1/chat/completions",
            headers=[(b"authorization", f"Bearer {key}".encode()), (b"traceparent", b"\xe9" * 55)],
            json={"model": "echo", "messages": PROMPT},
        )
        # LoRAX's routes are not traced: no gateway span, no routing span; the node's own span
        # starts a trace of its own
        lorax = await http.post(
            "/generate",
            headers={"Authorization": f"Bearer {key}"},
            json={"inputs": SECRET, "parameters": {"max_new_tokens": 4}},
        )
    assert raw.status_code == 200 and lorax.status_code == 200
    hostile_ids = [r.id.removeprefix("chatcmpl-") for r in hostile]
    hostile_ids.append(raw.json()["id"].removeprefix("chatcmpl-"))
    ids = {r.id.removeprefix("chatcmpl-") for r in (chat, child)} | set(hostile_ids)
    ids.add(streamed_id.removeprefix("chatcmpl-"))

    def complete() -> bool:
        gateway = [s for s in receiver.spans if s["service"] == "atoll-gateway"]
        served = {s["attributes"].get("atoll.request.id") for s in gateway}
        return (
            ids <= served
            and len(receiver.named("embeddings echo")) == 2  # the gateway's and the node's
            and len(receiver.named("chat")) == 1  # the 404: no model resolved, no rename
            and len(receiver.named("generate echo")) == 4 + len(hostile_ids)
        )

    await until(receiver, isl, complete)

    # chat: server span → routing span → the node's generate span, one trace
    assert chat.usage is not None
    server = server_span(receiver, chat.id.removeprefix("chatcmpl-"))
    assert server["name"] == "chat echo" and not server["error"]
    a = server["attributes"]
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == "echo"
    assert a["gen_ai.request.max_tokens"] == 50 and a["gen_ai.request.temperature"] == 0.5
    assert a["gen_ai.usage.input_tokens"] == chat.usage.prompt_tokens
    assert a["gen_ai.usage.output_tokens"] == chat.usage.completion_tokens
    assert a["gen_ai.response.finish_reasons"] == [chat.choices[0].finish_reason]
    assert a["atoll.user"] == "alice" and a["atoll.project"] == "cardio"
    assert a["http.response.status_code"] == 200
    assert server["resource"]["atoll.agent"] == "gw" and server["resource"]["atoll.tenant"]
    (route,) = children(receiver, server)
    assert route["name"] == "route" and route["trace"] == server["trace"]
    assert server["kind"] == Span.SPAN_KIND_SERVER and route["kind"] == Span.SPAN_KIND_CLIENT
    r = route["attributes"]
    assert r["atoll.route.node"] == "gpu1" and r["atoll.route.reason"] == "only node"
    assert r["atoll.route.retries"] == 0 and r["atoll.route.candidates"] == 1
    (node,) = children(receiver, route)
    assert node["service"] == "atoll-inference" and node["trace"] == server["trace"]
    assert node["name"] == "generate echo" and "first_token" in node["events"]
    assert node["kind"] == Span.SPAN_KIND_SERVER
    n = node["attributes"]
    assert n["gen_ai.usage.output_tokens"] == chat.usage.completion_tokens
    assert n["atoll.request.id"] == a["atoll.request.id"]
    latency = [n[f"gen_ai.latency.{k}"] for k in ("time_to_first_token", "time_in_model_decode")]
    assert all(x >= 0 for x in latency) and sum(latency) == pytest.approx(n["gen_ai.latency.e2e"])
    assert node["resource"]["atoll.agent"] == "gpu1"

    # streamed: the usage the stream reported
    assert streamed_usage is not None
    streamed = server_span(receiver, streamed_id.removeprefix("chatcmpl-"))
    s = streamed["attributes"]
    assert s["gen_ai.usage.output_tokens"] == streamed_usage.completion_tokens
    assert s["gen_ai.usage.input_tokens"] == streamed_usage.prompt_tokens
    (route,) = children(receiver, streamed)
    assert [x["name"] for x in children(receiver, route)] == ["generate echo"]

    # embeddings: the node's span continues the gateway's routing span too
    (gw_emb,) = [s for s in receiver.named("embeddings echo") if s["service"] == "atoll-gateway"]
    assert gw_emb["attributes"]["gen_ai.usage.input_tokens"] == emb.usage.prompt_tokens
    assert "gen_ai.usage.output_tokens" not in gw_emb["attributes"]
    (route,) = children(receiver, gw_emb)
    (node_emb,) = children(receiver, route)
    assert node_emb["service"] == "atoll-inference" and node_emb["trace"] == gw_emb["trace"]

    # the 404: an error span with the HTTP status, no routing under it
    (missing,) = receiver.named("chat")
    assert missing["error"] and missing["attributes"]["http.response.status_code"] == 404
    assert missing["attributes"]["error.type"] == "404" and not children(receiver, missing)

    # a client's traceparent: the server span is its child; a malformed one starts a new trace
    joined = server_span(receiver, child.id.removeprefix("chatcmpl-"))
    assert joined["trace"] == CLIENT_TRACE and joined["parent"] == "00f067aa0ba902b7"
    for request_id in hostile_ids:
        fresh = server_span(receiver, request_id)
        assert fresh["parent"] == "" and fresh["trace"] != CLIENT_TRACE and not fresh["error"]

    servers = {s["id"] for s in receiver.spans if s["service"] == "atoll-gateway"}
    servers -= {s["id"] for s in receiver.named("route")}
    assert all(r["parent"] in servers for r in receiver.named("route"))
    (alone,) = [s for s in receiver.named("generate echo") if not s["parent"]]
    assert alone["attributes"]["atoll.request.id"] not in ids

    for span in receiver.spans:  # no prompt text anywhere
        assert SECRET not in repr(span), span


async def test_a_plugins_stop_flushes_its_last_spans(receiver: Receiver, make_agent: Any) -> None:
    """No flush by the test and no wait: the spans are out once the plugins have stopped (the
    batch processor alone would hold them for its 5 s delay), and the exporters' threads end."""
    isl = await traced_island(make_agent, receiver.url)
    assert len(exporting()) == 2  # the gateway's and the node's
    key = isl.key("carol")
    async with openai.AsyncOpenAI(base_url=f"{isl.url}/v1", api_key=key, max_retries=0) as api:
        reply = await api.chat.completions.create(model="echo", messages=PROMPT)
    assert isl.gateway is not None
    await isl.gateway.host.remove("gateway")
    await isl.nodes["gpu1"].host.remove("inference")
    server = server_span(receiver, reply.id.removeprefix("chatcmpl-"))
    (route,) = children(receiver, server)
    assert [s["service"] for s in children(receiver, route)] == ["atoll-inference"]
    assert not exporting()


async def test_with_tracing_off_nothing_is_started(make_agent: Any) -> None:
    isl = await traced_island(make_agent, None)
    assert isl.plugin.tracing is None
    assert inference(isl.nodes["gpu1"]).tracing is None
    key = isl.key("bob")
    async with openai.AsyncOpenAI(base_url=f"{isl.url}/v1", api_key=key, max_retries=0) as api:
        await api.chat.completions.create(model="echo", messages=PROMPT)
    assert not exporting()
    async with httpx.AsyncClient(base_url=isl.url) as http:  # a traceparent is just ignored
        reply = await http.post(
            "/v1/chat/completions",
            headers={"Authorization": f"Bearer {key}", "traceparent": CLIENT_PARENT},
            json={"model": "echo", "messages": PROMPT},
        )
    assert reply.status_code == 200


def test_the_sdk_and_exporter_are_imported_only_when_tracing_is_on() -> None:
    """Off costs not even the imports: the plugins load OpenTelemetry's API alone."""
    code = (
        "import sys, atoll.plugins.gateway.plugin, atoll.plugins.inference.plugin\n"
        "print([m for m in sys.modules if m.startswith(('opentelemetry.sdk', "
        "'opentelemetry.exporter'))])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("model", [GatewayConfig, InferenceConfig])
@pytest.mark.parametrize(
    "url", ["collector:4318", "ftp://collector/v1/traces", "http:///v1/traces", "http://c:99999/"]
)
def test_a_bad_endpoint_is_refused_with_a_clear_error(model: Any, url: str) -> None:
    with pytest.raises(ValidationError, match="otlp_traces_endpoint"):
        model.model_validate({"otlp_traces_endpoint": url})


async def test_an_openai_compatible_upstream_is_sent_the_nodes_span(
    receiver: Receiver, make_agent: Any
) -> None:
    """A node in front of an OpenAI-compatible server (vLLM) sends it its own span's
    traceparent, so a tracing upstream's spans land under the node's in the same trace."""
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    await fake.start()
    try:
        isl = Island(make_agent)
        upstream = {"url": fake.url, "api_key": UPSTREAM_KEY}
        node = {"backend": "openai", "openai": upstream, "otlp_traces_endpoint": receiver.url}
        isl.nodes["vllm"] = await make_agent(
            "vllm", roles=("inference",), plugins={"inference": node}, heartbeat=0.2
        )
        await (await isl.start_gateway(otlp_traces_endpoint=receiver.url)).models_seen(BASE)
        key = isl.key("dave")
        async with openai.AsyncOpenAI(base_url=f"{isl.url}/v1", api_key=key, max_retries=0) as api:
            reply = await api.chat.completions.create(model=BASE, messages=PROMPT)
        request_id = reply.id.removeprefix("chatcmpl-")
        await until(receiver, isl, lambda: len(receiver.named(f"generate {BASE}")) == 1)
        (node_span,) = receiver.named(f"generate {BASE}")
        assert node_span["attributes"]["atoll.request.id"] == request_id
        sent = fake.last("/v1/chat/completions").headers["traceparent"]
        assert sent.startswith(f"00-{node_span['trace']}-{node_span['id']}-")
    finally:
        await fake.stop()
