"""The ``lorax`` backend: generation through a LoRAX server (predibase/lorax), which batches many
LoRA adapters on one base model, loads them itself (hub, S3, a local directory) and merges
weighted mixtures (``merged_adapters``). LoRAX may sit behind an ``atoll tunnel`` listener.

The wire is lorax-client's (``lorax_wire.py``): ``POST <url>`` with ``"stream"`` in the body and
``Authorization: Bearer <api_token>``. The HTTP exchange is done here on one aiohttp session,
because the client's reply models refuse what a real LoRAX sends (a token whose ``logprob`` is
null) and the client opens a new session per call.

Chat messages become LoRAX's plain-text ``inputs`` through a fixed template (``chat_template``:
ChatML, or "Role: text" lines): LoRAX's /info does not expose the model's own template.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Literal

import aiohttp
import pydantic
from aiohttp.http_exceptions import LineTooLong
from lorax import AsyncClient
from lorax import errors as lorax_errors
from lorax import types as lorax_types
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from atoll.agent.config import ConfigPath
from atoll.agent.errors import AtollError, DeadlineExceeded, InvalidRequest
from atoll.logs import EventLogger
from atoll.plugins.inference.backend import AdapterFetcher, Backend, stream_event, unit_vector
from atoll.plugins.inference.contract import (
    BackendUnavailable,
    EmbedRequest,
    EmbedResult,
    FinishEvent,
    GenerateRequest,
    Health,
    NodeInfo,
    TokenEvent,
    Unsupported,
    Usage,
)
from atoll.plugins.inference.lorax_wire import (
    API_TOKEN_ENV,
    ERRORS,
    FINISH_REASONS,
    Reply,
    StopTrimmer,
    StreamReply,
    adapter_ids,
    json_reply,
    map_lorax_error,
    parse_reply,
    request_body,
    status_error,
)

MAX_EVENT_BYTES = 4 * 1024 * 1024  # one SSE line; the final one carries the whole text
EMBED_CONCURRENCY = 8
START_WAIT = 5.0  # seconds start() waits for LoRAX's first answer


class LoraxConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str  # LoRAX's base URL, e.g. http://127.0.0.1:8080 (or an atoll tunnel listener)
    api_token: str | None = Field(None, repr=False)  # else env ATOLL_LORAX_API_TOKEN
    timeout: float = Field(60.0, gt=0.0, le=3600.0)  # seconds for a reply, or between tokens
    base_model: str | None = None  # reported while /info is unreachable
    adapter_source: Literal["hub", "local", "s3", "pbase", "storage"] = "hub"
    adapter_dir: ConfigPath | None = (
        None  # adapters fetched from Atoll storage go here: LoRAX reads
    )
    health_interval: float = Field(30.0, gt=0.0)  # LoRAX's /health runs a one-token generation
    stream: bool = True  # False: one non-streamed reply per request (for SSE-buffering proxies)
    chat_template: Literal["chatml", "plain"] = "chatml"
    max_adapters: int = Field(128, ge=1, le=100_000)  # recent adapters reported as loaded

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("url must be http(s)://host[:port][/path], e.g. http://127.0.0.1:8080")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _storage_needs_dir(self) -> LoraxConfig:
        if self.adapter_source == "storage" and self.adapter_dir is None:
            raise ValueError("adapter_source 'storage' needs an adapter_dir that LoRAX can read")
        return self


class LoraxBackend(Backend):
    kind = "lorax"

    def __init__(self, config: LoraxConfig, fetch: AdapterFetcher | None = None) -> None:
        self.config = config
        self._fetch = fetch
        token = config.api_token or os.environ.get(API_TOKEN_ENV) or None
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._session: aiohttp.ClientSession | None = None
        self._info: dict[str, Any] = {}  # LoRAX's last /info
        self._recent: OrderedDict[str, None] = OrderedDict()  # adapters used, oldest first
        self._fetching: dict[str, asyncio.Future[Path]] = {}
        self._running = 0
        self._health_task: asyncio.Task[None] | None = None
        self._checked = asyncio.Event()  # the first health check is done
        self._log = EventLogger("inference.lorax", url=config.url)

    # --- lifecycle and node description -------------------------------------------------------

    async def start(self) -> None:
        # No connection limit: LoRAX is the queue, and answers 429 when it is full.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            headers=self._headers,
            timeout=aiohttp.ClientTimeout(
                total=None, connect=self.config.timeout, sock_read=self.config.timeout
            ),
        )
        self._health_task = asyncio.create_task(self._health_loop())
        # Wait a little for the first check, so info() names the model; a LoRAX still loading
        # its model (or slow to answer) does not hold up the agent: health says when it is up.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._checked.wait(), START_WAIT)

    async def stop(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
            self._health_task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def info(self) -> NodeInfo:
        base = self._base_model()
        concurrent = self._info.get("max_concurrent_requests")
        return NodeInfo(
            backend=self.kind,
            base_model=base or "",
            models=[base] if base else [],
            adapters=list(reversed(self._recent)),  # most recent first
            max_batch=concurrent if isinstance(concurrent, int) and concurrent > 0 else 1,
            max_adapters=self.config.max_adapters,
            running=self._running,
        )

    async def health(self) -> Health:
        """GET /info (cached for ``info()``) then /health, which LoRAX answers by generating."""
        detail: dict[str, Any] = {"url": self.config.url}
        try:
            with self._transport_errors("health check"):
                async with self._http().get(f"{self.config.url}/info") as resp:
                    info = await json_reply(resp, "info")
                if not isinstance(info, dict):
                    raise BackendUnavailable("LoRAX's /info reply is not a JSON object")
                self._info = info
                detail.update(model_id=info.get("model_id"), version=info.get("version"))
                async with self._http().get(f"{self.config.url}/health") as resp:
                    if resp.status != 200:
                        raise await status_error(resp)
        except AtollError as e:
            return Health(ok=False, backend=self.kind, detail={**detail, "error": e.message})
        return Health(ok=True, backend=self.kind, detail=detail)

    async def _health_loop(self) -> None:
        ok: bool | None = None
        while True:  # until stop() cancels it; each check is bounded by the timeout
            health = await self.health()
            self._checked.set()
            if health.ok and ok is not True:
                self._log.info("lorax.up", model=health.detail.get("model_id"))
            elif not health.ok and ok is not False:
                self._log.warning("lorax.down", error=health.detail.get("error"))
            ok = health.ok
            await asyncio.sleep(self.config.health_interval)

    # --- generate -----------------------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent | FinishEvent]:
        base = self._check_model(request.model)
        wire_ids, adapter_params = await self._adapter_params(request)
        body = request_body(request, adapter_params, self.config.chat_template, self.config.stream)
        named = dict(zip(adapter_ids(request), wire_ids, strict=True))
        mix = request.mixture
        trimmer = StopTrimmer(request.params.stop)
        if self.config.stream:
            replies = self._stream(body, request.params.max_new_tokens)
        else:
            replies = self._once(body)
        self._running += 1
        try:
            # aclosing: a caller that stops reading closes LoRAX's connection at once, and LoRAX
            # then drops the request.
            with self._transport_errors("generate", named):
                async with contextlib.aclosing(replies) as events:
                    async for reply in events:
                        token, end = reply.token, reply.details
                        text = trimmer.feed("" if token.special else token.text)
                        if end is not None:
                            text += trimmer.finish(end.finish_reason == "stop_sequence")
                        yield TokenEvent(text=text, token_id=token.id, logprob=token.logprob)
                        if end is not None:
                            self._remember(adapter_ids(request))
                            yield FinishEvent(
                                finish_reason=FINISH_REASONS[end.finish_reason],
                                usage=Usage(
                                    prompt_tokens=end.prompt_tokens,
                                    completion_tokens=end.generated_tokens,
                                ),
                                model=base,
                                adapter=request.adapter or (mix.key() if mix else None),
                            )
                            return
            raise BackendUnavailable("LoRAX's reply ended before its final event")
        finally:
            self._running -= 1

    async def _stream(
        self, body: dict[str, Any], max_tokens: int
    ) -> AsyncGenerator[StreamReply, None]:
        """Server-sent events, one JSON object per ``data:`` line. LoRAX reports errors met
        after the stream began (adapter load failures included) as a ``data: {"error"}`` event.
        Bounded: one event per token asked for, each within ``timeout`` (keep-alives do not
        count as tokens)."""
        loop = asyncio.get_running_loop()
        async with self._http().post(self.config.url, json=body) as resp:
            if resp.status != 200:
                raise await status_error(resp)
            last_data = loop.time()
            events = 0
            while line := await resp.content.readline(max_line_length=MAX_EVENT_BYTES):
                if not line.startswith(b"data:"):  # blank separators and ":" keep-alives
                    if loop.time() - last_data > self.config.timeout:
                        raise TimeoutError(f"no token for {self.config.timeout}s")
                    continue
                last_data = loop.time()
                events += 1
                if events > max_tokens + 1:
                    raise BackendUnavailable("LoRAX sent more tokens than max_new_tokens")
                data = stream_event(line[5:], "LoRAX")
                if "error" in data:
                    raise lorax_errors.parse_error(resp.status, data)
                yield parse_reply(StreamReply, data, "stream event")

    async def _once(self, body: dict[str, Any]) -> AsyncGenerator[StreamReply, None]:
        """One non-streamed reply (``POST /`` answers a one-element list, as api-inference did),
        replayed as the stream's events so both paths share the rest."""
        async with self._http().post(self.config.url, json=body) as resp:
            payload = await json_reply(resp, "generate")
        if not (isinstance(payload, list) and payload):
            raise BackendUnavailable("LoRAX's generate reply is not a one-element list")
        reply = parse_reply(Reply, payload[0], "generate reply")
        if reply.details is None or not reply.details.tokens:
            raise BackendUnavailable("LoRAX's generate reply has no token details")
        *head, last = reply.details.tokens
        for token in head:
            yield StreamReply(token=token)
        end = lorax_types.StreamDetails(
            finish_reason=reply.details.finish_reason,
            prompt_tokens=reply.details.prompt_tokens,
            generated_tokens=reply.details.generated_tokens,
            seed=reply.details.seed,
        )
        yield StreamReply(token=last, generated_text=reply.generated_text, details=end)

    # --- embeddings ---------------------------------------------------------------------------

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        """LoRAX's /embed (one text per call) through lorax-client, whose AsyncClient multiplies
        its timeout by 60."""
        base = self._check_model(request.model)
        client = AsyncClient(
            self.config.url, headers=self._headers, timeout=self.config.timeout / 60
        )
        gate = asyncio.Semaphore(EMBED_CONCURRENCY)

        async def one(text: str) -> list[float]:
            async with gate:
                reply = await client.embed(text)
            if not reply.embeddings:
                raise BackendUnavailable("LoRAX returned no embedding (is it an embedding model?)")
            return unit_vector(reply.embeddings) if request.normalize else reply.embeddings

        with self._transport_errors("embed"):
            try:
                vectors = await asyncio.gather(*(one(text) for text in request.input))
            except pydantic.ValidationError as e:
                raise BackendUnavailable(f"LoRAX's embed reply is malformed: {e}") from e
        return EmbedResult(model=base, embeddings=vectors, usage=Usage())

    # --- plumbing -----------------------------------------------------------------------------

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise BackendUnavailable("the lorax backend is not started")
        return self._session

    def _base_model(self) -> str | None:
        model_id = self._info.get("model_id")
        return model_id if isinstance(model_id, str) and model_id else self.config.base_model

    def _check_model(self, model: str | None) -> str:
        base = self._base_model()
        if model is not None and base is not None and model != base:
            raise InvalidRequest(f"this node serves base model {base!r}, not {model!r}")
        return model or base or "unknown"

    def _remember(self, adapter_ids: tuple[str, ...]) -> None:
        for adapter_id in adapter_ids:
            self._recent[adapter_id] = None
            self._recent.move_to_end(adapter_id)
        while len(self._recent) > self.config.max_adapters:
            self._recent.popitem(last=False)

    async def _adapter_params(self, request: GenerateRequest) -> tuple[list[str], dict[str, Any]]:
        """The adapter ids as LoRAX is to read them, and the Parameters fields naming them.
        Adapters from Atoll storage are fetched into adapter_dir and named by path ("local")."""
        ids = list(adapter_ids(request))
        if not ids:
            return [], {}
        source = request.adapter_source or self.config.adapter_source
        if source == "storage":
            ids = [str(await self._local_copy(i)) for i in ids]
            source = "local"
        mix = request.mixture
        if mix is None:
            return ids, {"adapter_id": ids[0], "adapter_source": source}
        if mix.merge_strategy == "svd":
            raise Unsupported("LoRAX cannot merge adapters with 'svd'; use linear, ties or dare_*")
        merged = lorax_types.MergedAdapters(
            ids=ids,
            weights=[a.weight for a in mix.adapters],
            merge_strategy=mix.merge_strategy,
            density=mix.density,  # no default in lorax-client 0.6.3: always given
            majority_sign_method=mix.majority_sign_method,
        )
        return ids, {"merged_adapters": merged, "adapter_source": source}

    async def _local_copy(self, adapter_id: str) -> Path:
        """Adapter ``adapter_id``'s directory under adapter_dir, made there by the plugin's
        fetcher (which reuses what is already on disk); concurrent requests share one fetch."""
        if self._fetch is None or self.config.adapter_dir is None:
            raise Unsupported(
                "this lorax backend cannot fetch adapters from Atoll storage "
                "(it needs an adapter_dir and the plugin's fetcher)"
            )
        pending = self._fetching.get(adapter_id)
        if pending is None:
            pending = asyncio.ensure_future(self._fetch(adapter_id, self.config.adapter_dir))
            self._fetching[adapter_id] = pending
            pending.add_done_callback(lambda _: self._fetching.pop(adapter_id, None))
        # shield: one request giving up does not cancel the fetch others wait for
        return (await asyncio.shield(pending)).resolve()

    @contextlib.contextmanager
    def _transport_errors(
        self, what: str, adapters: dict[str, str] | None = None
    ) -> Iterator[None]:
        """aiohttp's and lorax-client's failures as the platform's errors; ``adapters`` maps the
        request's adapter ids to the names LoRAX got (a local path for a storage adapter)."""
        try:
            yield
        except TimeoutError as e:  # before OSError: aiohttp's timeouts are both
            raise DeadlineExceeded(
                f"LoRAX at {self.config.url} sent nothing for {self.config.timeout}s during {what}"
            ) from e
        except aiohttp.ClientConnectorError as e:
            raise BackendUnavailable(f"cannot reach LoRAX at {self.config.url}: {e}") from e
        except (aiohttp.ClientError, OSError) as e:
            raise BackendUnavailable(f"the connection to LoRAX failed during {what}: {e!r}") from e
        except LineTooLong as e:
            raise BackendUnavailable(f"LoRAX sent an event over {MAX_EVENT_BYTES} bytes") from e
        except tuple(ERRORS) as e:
            raise map_lorax_error(e, adapters or {}) from e
