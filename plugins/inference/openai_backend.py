"""The ``openai`` backend: a proxy to an OpenAI-compatible server on the island (vLLM serving each
``--lora-modules name=path`` adapter as a model name, a Whisper server, ...). The upstream batches
and holds its adapters; this backend maps requests, streams and errors onto the contract. With
``push_adapters`` it also loads Atoll-stored adapters into a vLLM upstream on demand
(runtime_loras.py)."""

from __future__ import annotations

import contextlib
import math
import mimetypes
import os
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePath
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator

from atoll.agent.config import ConfigPath
from atoll.agent.errors import AtollError, DeadlineExceeded, InvalidRequest
from atoll.logs import EventLogger
from atoll.plugins.inference.backend import AdapterFetcher, Backend, Partial, unit_vector
from atoll.plugins.inference.contract import (
    AdapterInfo,
    BackendUnavailable,
    EmbedRequest,
    EmbedResult,
    FinishEvent,
    GenerateRequest,
    Health,
    NodeInfo,
    Overloaded,
    TokenEvent,
    TranscribeRequest,
    TranscribeResult,
    Unsupported,
    Usage,
)
from atoll.plugins.inference.openai_wire import (
    API_KEY_ENV,
    StreamFold,
    error_text,
    generate_body,
    json_object,
    sse_data,
    status_error,
)
from atoll.plugins.inference.runtime_loras import RuntimeLoras

MAX_MODELS = 10_000


class OpenAIConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str  # the API base, e.g. http://127.0.0.1:8000/v1
    api_key: str | None = Field(None, repr=False)  # else env ATOLL_OPENAI_API_KEY
    model: str | None = None  # the upstream's base model; None: the first of GET /models
    timeout: float = Field(120.0, gt=0.0, le=3600.0)  # per connect / read / write, in seconds
    transcription_model: str | None = None
    embedding_model: str | None = None
    max_batch: int = Field(256, ge=1, le=100_000)  # announced; vLLM's default max_num_seqs
    # vLLM's runtime LoRA API: adapters from Atoll's storage fetched into ``adapter_root`` (which
    # the vLLM server must read at the same path; default: the plugin's data dir) and loaded on
    # first use, at most ``max_loaded`` at once.
    push_adapters: bool = False
    adapter_root: ConfigPath | None = None
    max_loaded: int = Field(64, ge=1, le=100_000)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        try:
            url = httpx.URL(value)
        except httpx.InvalidURL as e:
            raise ValueError(f"not a URL: {e}") from e
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("url must be http(s)://host[:port]/..., e.g. http://127.0.0.1:8000/v1")
        return value.rstrip("/")


class OpenAIBackend(Backend):
    kind = "openai"

    def __init__(
        self, config: OpenAIConfig, fetch: AdapterFetcher | None = None, data_dir: Path = Path()
    ) -> None:
        self.config = config
        self.pushed: RuntimeLoras | None = None
        if config.push_adapters:
            if fetch is None:
                raise ValueError("push_adapters needs the plugin's adapter fetcher")
            root = Path(config.adapter_root or data_dir / "adapters").resolve()
            self.pushed = RuntimeLoras(fetch, root, config.max_loaded, self._post_json)
        self._api_key = config.api_key or os.environ.get(API_KEY_ENV) or None
        self._root = config.url.removesuffix("/v1")  # where vLLM keeps /health and /tokenize
        self._client: httpx.AsyncClient | None = None
        self._models: list[dict[str, Any]] = []  # the upstream's /models entries, last seen
        self._running = 0
        self._log = EventLogger("inference.openai", url=config.url)

    # --- lifecycle and node description -------------------------------------------------------

    async def start(self) -> None:
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        self._client = httpx.AsyncClient(
            base_url=self.config.url + "/",
            headers=headers,
            timeout=httpx.Timeout(self.config.timeout),
            limits=httpx.Limits(max_connections=self.config.max_batch),
        )
        try:
            await self._refresh_models()
        except AtollError as e:  # the upstream may still be loading its model: health will tell
            self._log.warning("openai.upstream_not_ready", error=e.message)

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def info(self) -> NodeInfo:
        adapters = [a.id for a in self.adapters()]
        return NodeInfo(
            backend=self.kind,
            base_model=self._known_base() or "",
            models=[m["id"] for m in self._models],
            adapters=adapters,
            max_batch=self.config.max_batch,
            max_adapters=len(adapters),  # vLLM keeps its LoRA modules; it loads no others for us
            running=self._running,
            embeddings=self.config.embedding_model,
            transcription=self.config.transcription_model,
        )

    def adapters(self) -> list[AdapterInfo]:
        """The upstream's models that derive from another: vLLM lists a LoRA module with its
        base as ``parent``; other servers may only give a ``root`` other than the base's."""
        base = self._known_base()
        base_root = next((m.get("root") for m in self._models if m["id"] == base), None)
        others = {base, self.config.embedding_model, self.config.transcription_model}
        found = []
        for m in self._models:
            parent, root = m.get("parent"), m.get("root")
            derived = parent not in (None, m["id"]) or (
                root is not None and base_root is not None and root != base_root
            )
            if derived and m["id"] not in others:
                owner = parent if isinstance(parent, str) else base or ""
                # rank and targets are the upstream's secret; 0 and [] say "unknown"
                found.append(AdapterInfo(id=m["id"], base_model=owner, rank=0, target_modules=[]))
        listed = {a.id for a in found}
        for pushed in self.pushed.loaded if self.pushed else []:  # before /models shows them
            if pushed not in listed:
                found.append(
                    AdapterInfo(id=pushed, base_model=base or "", rank=0, target_modules=[])
                )
        return found

    async def health(self) -> Health:
        detail: dict[str, Any] = {"url": self.config.url}
        try:
            await self._refresh_models()
            with self._transport_errors("health"):
                probe = await self._http().get(f"{self._root}/health")
        except AtollError as e:
            return Health(ok=False, backend=self.kind, detail={**detail, "error": e.message})
        # vLLM answers /health 200 when its engine runs; a server without the route says 404
        ok = probe.status_code == 200 or probe.status_code == 404
        detail.update(
            base_model=self._known_base(),
            models=len(self._models),
            adapters=len(self.adapters()),
            health_status=probe.status_code,
        )
        return Health(ok=ok, backend=self.kind, detail=detail)

    # --- generate -----------------------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent | FinishEvent]:
        if request.mixture is not None:
            raise Unsupported("the openai backend cannot merge adapters into a mixture")
        if request.prompt is not None and (request.tools or request.tool_choice is not None):
            raise InvalidRequest("tools and tool_choice need chat messages, not a raw prompt")
        held = None  # an adapter pushed into the upstream, held there while this runs
        if self.pushed is not None and request.adapter and not self._serves(request.adapter):
            held = request.adapter
            await self.pushed.acquire(held)
        try:
            # Closed with this generator, so a caller leaving frees the upstream request at once.
            async with contextlib.aclosing(self._generate(request)) as events:
                async for event in events:
                    yield event
        finally:
            if held is not None and self.pushed is not None:
                self.pushed.release(held)

    async def _generate(
        self, request: GenerateRequest
    ) -> AsyncGenerator[TokenEvent | FinishEvent, None]:
        base = request.model or await self._base_model()
        path, body = generate_body(request, request.adapter or base)
        headers = {"X-Request-Id": request.request_id} if request.request_id else {}
        if request.traceparent:  # a vLLM upstream exporting traces continues this one
            headers["traceparent"] = request.traceparent
        fold = StreamFold(chat=request.messages is not None, adapter=request.adapter)
        self._running += 1
        try:
            with self._transport_errors("generate"):
                async with self._http().stream("POST", path, json=body, headers=headers) as resp:
                    if resp.status_code != 200:
                        await resp.aread()
                        raise status_error(resp.status_code, error_text(resp), request.adapter)
                    async for data in sse_data(resp.aiter_text()):
                        if data.strip() == "[DONE]":
                            fold.done = True
                            break
                        token = fold.feed(data)
                        if token is not None:
                            yield token
            usage = fold.usage or await self._fallback_usage(body, fold.chunks)
            yield FinishEvent(
                finish_reason=fold.finish_reason(),
                usage=usage,
                model=base,
                adapter=request.adapter,
                tool_calls=fold.tool_calls(),
            )
        finally:
            self._running -= 1

    async def _fallback_usage(self, body: dict[str, Any], chunks: int) -> Usage:
        """Usage for an upstream that ignored ``include_usage``. Such servers send one token per
        chunk, so the chunk count is the completion's tokens. The prompt's count comes from the
        upstream's own tokenizer (vLLM's /tokenize); without one, ~4 characters per token."""
        query = {k: body[k] for k in ("model", "messages", "prompt") if k in body}
        count: Any = None
        try:
            with self._transport_errors("tokenize"):
                resp = await self._http().post(f"{self._root}/tokenize", json=query)
            if resp.status_code == 200:
                count = resp.json().get("count")
        except (AtollError, ValueError, AttributeError):
            count = None
        if not isinstance(count, int) or count < 0:
            if "messages" in query:
                chars = sum(len(m.get("content", "")) for m in query["messages"])
            else:
                chars = len(query["prompt"])
            count = math.ceil(chars / 4)
        return Usage(prompt_tokens=count, completion_tokens=chunks)

    # --- embeddings and transcription ---------------------------------------------------------

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        model = request.model or self.config.embedding_model or await self._base_model()
        body = {"model": model, "input": request.input, "encoding_format": "float"}
        reply = json_object(await self._send("POST", "embeddings", "embed", json=body), "embed")
        try:
            rows = sorted(reply["data"], key=lambda row: row["index"])
            vectors = [[float(x) for x in row["embedding"]] for row in rows]
            prompt_tokens = int((reply.get("usage") or {}).get("prompt_tokens") or 0)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise BackendUnavailable(f"the upstream's embeddings reply is malformed: {e!r}") from e
        if len(vectors) != len(request.input):
            raise BackendUnavailable(
                f"the upstream returned {len(vectors)} embeddings for {len(request.input)} inputs"
            )
        if request.normalize:
            vectors = [unit_vector(v) for v in vectors]
        return EmbedResult(
            model=model, embeddings=vectors, usage=Usage(prompt_tokens=prompt_tokens)
        )

    async def transcribe(
        self, request: TranscribeRequest, partial: Partial | None = None
    ) -> TranscribeResult:
        """The upstream's reply whole (no partial text: it is asked for no stream)."""
        if self.config.transcription_model is None:
            raise Unsupported("this node has no transcription model (transcription_model unset)")
        model = request.model or self.config.transcription_model
        form: dict[str, str] = {"model": model, "response_format": request.response_format}
        translate = request.task == "translate"
        if request.language is not None and not translate:  # a translation's is always English
            form["language"] = request.language
        if request.prompt is not None:
            form["prompt"] = request.prompt
        if request.temperature is not None:
            form["temperature"] = str(request.temperature)
        name = PurePath(request.filename).name or "audio"
        mime = mimetypes.guess_type(name)[0] or "application/octet-stream"
        files = {"file": (name, request.audio, mime)}
        route = "audio/translations" if translate else "audio/transcriptions"
        resp = await self._send("POST", route, request.task, data=form, files=files)
        if request.response_format not in ("json", "verbose_json"):
            return TranscribeResult(model=model, text=resp.text)  # text, srt, vtt: the text itself
        body = json_object(resp, "transcription")
        if not isinstance(body.get("text"), str):
            raise BackendUnavailable("the upstream's transcription reply has no text")
        return TranscribeResult(model=model, text=body["text"], body=body)

    # --- adapters pushed into the upstream -----------------------------------------------------

    def _serves(self, adapter_id: str) -> bool:
        """The upstream's own adapter (its --lora-modules), not one this node pushes."""
        pushed = self.pushed.loaded if self.pushed else []
        return adapter_id not in pushed and any(m["id"] == adapter_id for m in self._models)

    async def load_adapter(self, adapter_id: str) -> AdapterInfo:
        if self.pushed is None:
            return await super().load_adapter(adapter_id)
        await self.pushed.acquire(adapter_id)
        self.pushed.release(adapter_id)
        await self._refresh_models()
        base = await self._base_model()
        return AdapterInfo(id=adapter_id, base_model=base, rank=0, target_modules=[])

    async def unload_adapter(self, adapter_id: str) -> bool:
        if self.pushed is None:
            return await super().unload_adapter(adapter_id)
        return await self.pushed.unload(adapter_id)

    async def _post_json(self, path: str, body: dict[str, str]) -> httpx.Response:
        with self._transport_errors(path):
            return await self._http().post(path, json=body)

    # --- plumbing -----------------------------------------------------------------------------

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            raise BackendUnavailable("the openai backend is not started")
        return self._client

    def _known_base(self) -> str | None:
        if self.config.model:
            return self.config.model
        bases = [m["id"] for m in self._models if m.get("parent") is None]
        return (bases or [m["id"] for m in self._models] or [None])[0]

    async def _base_model(self) -> str:
        """The base model, asking the upstream once more if it was not up at start."""
        base = self._known_base()
        if base is None:
            await self._refresh_models()
            base = self._known_base()
        if base is None:
            raise BackendUnavailable("the upstream lists no models and no model is configured")
        return base

    async def _refresh_models(self) -> None:
        reply = json_object(await self._send("GET", "models", "list models"), "models")
        data = reply.get("data")
        if not isinstance(data, list):
            raise BackendUnavailable("the upstream's /models reply has no data list")
        self._models = [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)][
            :MAX_MODELS
        ]

    async def _send(self, method: str, path: str, what: str, **kw: Any) -> httpx.Response:
        with self._transport_errors(what):
            resp = await self._http().request(method, path, **kw)
        if not 200 <= resp.status_code < 300:
            raise status_error(resp.status_code, error_text(resp), None)
        return resp

    @contextmanager
    def _transport_errors(self, what: str) -> Iterator[None]:
        """httpx's failures as the platform's errors."""
        try:
            yield
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            raise BackendUnavailable(f"cannot reach the upstream at {self.config.url}: {e}") from e
        except httpx.PoolTimeout as e:
            raise Overloaded(
                f"all {self.config.max_batch} upstream connections stayed busy "
                f"for {self.config.timeout}s"
            ) from e
        except httpx.TimeoutException as e:
            raise DeadlineExceeded(
                f"the upstream went silent for {self.config.timeout}s during {what}"
            ) from e
        except httpx.TransportError as e:
            raise BackendUnavailable(f"the upstream connection failed during {what}: {e!r}") from e
