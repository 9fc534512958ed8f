"""The inference plugin: one backend (chosen by config) served on the overlay — RPC and token
streams for the gateway, capabilities and load for discovery, figures for the metrics feed.

Only callers whose credential carries one of ``callers`` roles may use it (every method and the
generate stream declare them; the agent checks before a handler runs): users reach models
through the gateway, which checks their API keys and per-adapter rights; an arbitrary agent of
the tenant must not bypass that by calling a GPU node directly.
(Over 400 lines: each RPC's handler is a few lines of checks, metrics and tracing around the
backend's call, and reads best beside the others; the work is in the backends.)
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from atoll.agent.config import ConfigPath
from atoll.agent.contract import Method
from atoll.agent.errors import Forbidden, InvalidRequest, NoResponder
from atoll.agent.metrics import REQUEST_DURATION_BUCKETS, TPOT_BUCKETS, TTFT_BUCKETS
from atoll.agent.plugins import Plugin, PluginContext, rpc
from atoll.agent.streams import Stream
from atoll.agent.tracing import check_endpoint, start_tracing
from atoll.agent.transfer import Reader, idle_deadline
from atoll.plugins.inference.backend import Backend
from atoll.plugins.inference.contract import (
    ADAPTERS,
    EMBED,
    GENERATE,
    GENERATE_STREAM,
    HEALTH,
    INFO,
    LOAD_ADAPTER,
    LOAD_COLLECTION,
    PIN_ADAPTER,
    TRANSCRIBE,
    UNLOAD_ADAPTER,
    UNLOAD_COLLECTION,
    AdapterRef,
    GenerateRequest,
    GenerateResult,
    TranscribeRequest,
    Unloaded,
    Unsupported,
    described,
    reply_delta,
    reply_transcription,
)
from atoll.plugins.inference.traces import GenerateTrace, traced_embed
from atoll.plugins.storage.contract.adapters import (
    AdapterNotFound,
    check_adapter_id,
    fetch_adapter,
)
from atoll.protocol.session import CallInfo
from atoll.tenancy.permissions import PLUGIN_MANAGERS

MAX_UNSENT_LINES = 256  # a generate stream's events held for a slow reader before generation waits


class InferenceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backend: Literal["local", "lorax", "openai", "echo"] = "local"
    # Each backend's own section, validated by that backend (so a LoRAX node never imports torch).
    local: dict[str, Any] = {}
    lorax: dict[str, Any] = {}
    openai: dict[str, Any] = {}
    echo: dict[str, Any] = {}
    # Where adapters come from: local directories first (``<dir>/<id>/``), then the storage
    # agent (``agent/storage``; None: any agent discovery shows offering the storage plugin).
    adapter_dirs: list[ConfigPath] = []
    storage: str | None = None
    callers: list[str] = Field(default_factory=lambda: ["gateway", "admin", "operator"])
    # OTLP/HTTP traces of generate and embed requests (traces.py), continuing the gateway's;
    # e.g. "http://collector:4318/v1/traces". None: no tracing at all.
    otlp_traces_endpoint: str | None = None

    @field_validator("otlp_traces_endpoint")
    @classmethod
    def _otlp(cls, v: str | None) -> str | None:
        return check_endpoint(v)


def make_backend(config: InferenceConfig, ctx: PluginContext, fetch: Any) -> Backend:
    if config.backend == "local":
        from atoll.plugins.inference.local_backend import LocalBackend, LocalConfig

        return LocalBackend(
            ctx.settings(LocalConfig, config.local), ctx.data_dir, fetch, ctx.metrics
        )
    if config.backend == "lorax":
        from atoll.plugins.inference.lorax_backend import LoraxBackend, LoraxConfig

        return LoraxBackend(ctx.settings(LoraxConfig, config.lorax), fetch)
    if config.backend == "openai":
        from atoll.plugins.inference.openai_backend import OpenAIBackend, OpenAIConfig

        return OpenAIBackend(ctx.settings(OpenAIConfig, config.openai), fetch, ctx.data_dir)
    from atoll.plugins.inference.echo_backend import EchoBackend, EchoConfig

    return EchoBackend(ctx.settings(EchoConfig, config.echo))


class InferencePlugin(Plugin):
    name = "inference"
    config_model = InferenceConfig

    async def start(self, ctx: PluginContext) -> None:
        await super().start(ctx)
        self.config = config = ctx.settings(InferenceConfig)
        self.adapter_dirs = [d.resolve() for d in config.adapter_dirs]
        self.storage = ctx.finder("storage")  # unless configured: found when first needed
        self.backend = make_backend(config, ctx, self.fetch_adapter)
        await self.backend.start()
        self.tracing = start_tracing(config.otlp_traces_endpoint, "atoll-inference", ctx.identity)
        m = ctx.metrics
        self.requests = m.counter("requests", "Generate requests served")
        self.failures = m.counter("requests_failed", "Generate requests that failed")
        self.latency = m.histogram(
            "request_seconds", "Generate time, request to finish", buckets=REQUEST_DURATION_BUCKETS
        )
        self.ttft = m.histogram(
            "time_to_first_token_seconds", "Time to the first token", buckets=TTFT_BUCKETS
        )
        self.tpot = m.histogram(
            "time_per_output_token_seconds",
            "Generate time per output token after the first",
            buckets=TPOT_BUCKETS,
        )
        self.queue = m.gauge("queue_depth", "Requests waiting for a batch slot")
        self.running = m.gauge("running", "Requests in the running batch")
        self.rate = m.gauge("tokens_per_second", "Completion tokens per second, last 10 s")
        self._gauges = asyncio.create_task(self._refresh_gauges())
        ctx.serve_stream(GENERATE_STREAM, self._generate_stream, roles=lambda p: p.config.callers)
        ctx.serve_stream(TRANSCRIBE.name, self._transcribe_stream, roles=lambda p: p.config.callers)

    async def stop(self) -> None:
        self._gauges.cancel()
        await self.backend.stop()
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.close)

    def describe(self) -> dict[str, Any]:
        return described(self.backend.info())

    def status(self) -> dict[str, Any]:
        info = self.backend.info()
        return {"backend": info.backend, "model": info.base_model, "adapters": len(info.adapters)}

    async def _refresh_gauges(self) -> None:
        while True:
            info = self.backend.info()
            self.queue.set(info.queue_depth)
            self.running.set(info.running)
            self.rate.set(info.tokens_per_s)
            await asyncio.sleep(1.0)

    # --- generation --------------------------------------------------------------------------

    def _granted(self, call: CallInfo) -> None:
        """A caller of another tenant comes through a grant, which may be limited to one base
        model: only a node serving that base may answer it (brokers cannot see the model)."""
        grant = call.grant
        if grant is not None and call.caller.tenant == grant.importer:
            base = self.backend.info().base_model
            if not grant.allows(self.name, base):
                raise Forbidden(f"grant {grant.id} does not cover base model {base!r}")

    def _imported(self, tenant: str, tokens: int) -> None:
        """Usage of a tenant importing this node through a grant, labelled with that tenant
        (its own gateway's ledger records it as any request)."""
        m, by = self.ctx.metrics, {"tenant": tenant}
        m.counter("imported_requests", "Requests of importing tenants", by).inc()
        m.counter("imported_tokens", "Completion tokens of importing tenants", by).inc(tokens)

    async def _events(self, request: GenerateRequest, call: CallInfo):
        if not self.backend.scores_prompts and (
            request.echo
            or request.prompt_token_ids is not None
            or request.top_logprobs
            or request.continuation is not None
        ):
            raise Unsupported(
                f"the {self.backend.kind} backend takes no token ids, echoes no prompt, scores "
                "no continuation and reports no alternatives (top_logprobs)"
            )
        started = time.perf_counter()
        first: float | None = None  # when the first event came
        traced = self._trace(request)
        error: BaseException | None = None
        if traced is not None:  # the upstream (an OpenAI-compatible server) continues our span
            request = request.model_copy(update={"traceparent": traced.traceparent})
        try:
            async for event in self.backend.generate(request):
                now = time.perf_counter()
                if traced is not None:
                    traced.event(event, now)
                if first is None:
                    first = now
                    self.ttft.observe(now - started)
                if event.type == "finish":  # callers may stop iterating at this event
                    self.requests.inc()
                    if call.grant is not None:
                        self._imported(call.caller.tenant, event.usage.completion_tokens)
                    self.latency.observe(now - started)
                    if event.usage.completion_tokens > 1:
                        self.tpot.observe((now - first) / (event.usage.completion_tokens - 1))
                yield event
        except Exception as exc:
            self.failures.inc()
            error = exc
            raise
        except BaseException as exc:  # cancelled, or closed early: the caller left
            error = exc
            raise
        finally:
            if traced is not None:
                traced.end(error)

    def _trace(self, request: GenerateRequest) -> GenerateTrace | None:
        if self.tracing is None:
            return None
        info = self.backend.info()
        return GenerateTrace(self.tracing.tracer, request, info.base_model, info.queue_depth)

    async def _generate_stream(self, stream: Stream, params: Any, call: CallInfo) -> None:
        """One JSON line per event. Lines come out as soon as they are made, but the ones made
        together (a backend yielding several events without waiting: a stop sequence released,
        the last token and the finish, a burst of SSE chunks) leave as one stream message."""
        self._granted(call)
        request = self._generate_request(params)
        lines: asyncio.Queue[bytes | None] = asyncio.Queue(MAX_UNSENT_LINES)
        writer = asyncio.create_task(self._write_lines(stream, lines))

        async def offer(line: bytes | None) -> bool:
            """Queue ``line`` (waiting while a slow reader's lines fill the queue); False once
            the writer has stopped (the caller went away)."""
            if not lines.full():
                lines.put_nowait(line)
                return not writer.done()
            put = asyncio.ensure_future(lines.put(line))
            await asyncio.wait({put, writer}, return_when=asyncio.FIRST_COMPLETED)
            if not put.done():
                put.cancel()
            return put.done() and not put.cancelled() and not writer.done()

        events = self._events(request, call)
        try:
            async for event in events:
                if not await offer(event.model_dump_json(exclude_none=True).encode() + b"\n"):
                    break
        except BaseException:
            writer.cancel()
            raise
        finally:
            await events.aclose()
        await offer(None)
        await writer

    @staticmethod
    async def _write_lines(stream: Stream, lines: asyncio.Queue[bytes | None]) -> None:
        while True:
            batch = [await lines.get()]
            while not lines.empty():
                batch.append(lines.get_nowait())
            done = batch[-1] is None
            data = b"".join(line for line in batch if line is not None)
            if data:
                await stream.write(data)
            if done:
                return

    @rpc(GENERATE.name, roles=lambda p: p.config.callers)
    async def generate(self, params: Any, call: CallInfo) -> dict[str, Any]:
        self._granted(call)
        request = self._generate_request(params)
        parts: list[str] = []
        logprobs: list[float] = []
        async for event in self._events(request, call):
            if event.type == "token":
                parts.append(event.text)
                if event.logprob is not None:
                    logprobs.append(event.logprob)
                continue
            result = GenerateResult(
                text="".join(parts),
                finish_reason=event.finish_reason,
                usage=event.usage,
                model=event.model,
                adapter=event.adapter,
                tool_calls=event.tool_calls,
                logprobs=logprobs if request.logprobs else None,
            )
            return result.model_dump(mode="json")
        raise InvalidRequest("the backend ended without a finish event")

    @rpc(EMBED.name, roles=lambda p: p.config.callers)
    async def embed(self, params: Any, call: CallInfo) -> dict[str, Any]:
        request = EMBED.parse_params(params)
        if self.tracing is None:
            result = await self.backend.embed(request)
        else:
            result = await traced_embed(self.tracing.tracer, request, self.backend.embed)
        return result.model_dump(mode="json")

    async def _transcribe_stream(self, stream: Stream, params: Any, call: CallInfo) -> None:
        """The options came with the open; the audio follows (exactly ``size`` bytes, each
        chunk within the idle deadline), then the result goes back as one line."""
        header = TRANSCRIBE.parse_params(params)
        reader = Reader(stream)
        parts: list[bytes] = []
        left = header.size
        with idle_deadline("receiving audio", reader.idle):
            while left:
                chunk = await reader.read(left)
                if not chunk:
                    raise InvalidRequest(f"the audio ended {left} bytes short of {header.size}")
                parts.append(chunk)
                left -= len(chunk)
        options = header.model_dump(exclude={"size"})
        request = TranscribeRequest(**options, audio=b"".join(parts))
        pieces: asyncio.Queue[str | None] = asyncio.Queue()  # a few, one per 30 s window

        async def send_pieces() -> None:
            while (piece := await pieces.get()) is not None:
                await reply_delta(stream, piece)

        sender = asyncio.create_task(send_pieces())
        try:
            result = await self.backend.transcribe(request, pieces.put_nowait)
        except BaseException:
            sender.cancel()
            raise
        pieces.put_nowait(None)
        await sender
        await reply_transcription(stream, result)

    # --- adapters and node -------------------------------------------------------------------

    @rpc(ADAPTERS.name, roles=lambda p: p.config.callers)
    async def adapters(self, params: Any, call: CallInfo) -> list[dict[str, Any]]:
        return [a.model_dump(mode="json") for a in self.backend.adapters()]

    @rpc(LOAD_ADAPTER.name, roles=lambda p: p.config.callers)
    async def load_adapter(self, params: Any, call: CallInfo) -> dict[str, Any]:
        ref = self._ref(LOAD_ADAPTER, params)
        info = await self.backend.load_adapter(ref.id)
        if ref.pinned is not None:
            info = await self.backend.pin_adapter(ref.id, ref.pinned)
        return info.model_dump(mode="json")

    @rpc(UNLOAD_ADAPTER.name, roles=lambda p: p.config.callers)
    async def unload_adapter(self, params: Any, call: CallInfo) -> dict[str, Any]:
        ref = self._ref(UNLOAD_ADAPTER, params)
        return Unloaded(unloaded=await self.backend.unload_adapter(ref.id)).model_dump()

    @rpc(PIN_ADAPTER.name, roles=lambda p: p.config.callers)
    async def pin_adapter(self, params: Any, call: CallInfo) -> dict[str, Any]:
        ref = self._ref(PIN_ADAPTER, params)
        info = await self.backend.pin_adapter(ref.id, True if ref.pinned is None else ref.pinned)
        return info.model_dump(mode="json")

    # Discovery shows a change at the next heartbeat; until then the router may send a member's
    # requests elsewhere, where its original serves them.
    @rpc(LOAD_COLLECTION.name, roles=PLUGIN_MANAGERS)
    async def load_collection(self, params: Any, call: CallInfo) -> dict[str, Any]:
        ref = LOAD_COLLECTION.parse_params(params)
        check_adapter_id(ref.id)
        return (await self.backend.load_collection(ref.id)).model_dump(mode="json")

    @rpc(UNLOAD_COLLECTION.name, roles=PLUGIN_MANAGERS)
    async def unload_collection(self, params: Any, call: CallInfo) -> dict[str, Any]:
        ref = UNLOAD_COLLECTION.parse_params(params)
        return Unloaded(unloaded=await self.backend.unload_collection(ref.id)).model_dump()

    @rpc(INFO.name, roles=lambda p: p.config.callers)
    async def info(self, params: Any, call: CallInfo) -> dict[str, Any]:
        return self.backend.info().model_dump(mode="json")

    @rpc(HEALTH.name, roles=lambda p: p.config.callers)
    async def health(self, params: Any, call: CallInfo) -> dict[str, Any]:
        return (await self.backend.health()).model_dump(mode="json")

    @staticmethod
    def _generate_request(params: Any) -> GenerateRequest:
        request = GENERATE.parse_params(params)
        for adapter_id in [request.adapter] if request.adapter else []:
            check_adapter_id(adapter_id)
        for part in request.mixture.adapters if request.mixture else []:
            check_adapter_id(part.id)
        return request

    @staticmethod
    def _ref(method: Method[AdapterRef, Any], params: Any) -> AdapterRef:
        ref = method.parse_params(params)
        check_adapter_id(ref.id)
        return ref

    # --- fetching adapters -------------------------------------------------------------------

    async def fetch_adapter(self, adapter_id: str, root: Path) -> Path:
        """An adapter's directory: a configured local one, one fetched before, or fetched now
        from the storage agent over the data plane."""
        check_adapter_id(adapter_id)
        for d in self.adapter_dirs:
            candidate = d / adapter_id
            if (candidate / "adapter_config.json").is_file():
                return candidate
        dest = root / adapter_id
        if (dest / "adapter_config.json").is_file():
            return dest
        if self.config.storage:
            return await fetch_adapter(self.ctx, self.config.storage, adapter_id, dest)
        try:
            return await fetch_adapter(self.ctx, await self._storage(), adapter_id, dest)
        except NoResponder:  # the storage agent found before is gone: look again, once
            self.storage.forget()
            return await fetch_adapter(self.ctx, await self._storage(), adapter_id, dest)

    async def _storage(self) -> str:
        try:
            return await self.storage.address()
        except NoResponder:
            raise AdapterNotFound("no storage agent is online to fetch adapters from") from None
