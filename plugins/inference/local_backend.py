"""The ``local`` backend: transformers on this machine's CPU or GPU, many adapters on one base
model, continuously batched (see engine.py), adapters loaded on first use (adapters.py) into
slots of an adapter pool (pool.py), mixtures merged by peft off the serving model (mixtures.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from atoll.agent.config import ConfigPath
from atoll.agent.errors import AtollError, InvalidRequest
from atoll.agent.metrics import MetricsRegistry
from atoll.plugins.basemodels import ModelSpec, model_id, resolve_model
from atoll.plugins.inference.adapter_checks import AdapterLimits, same_model, validate_adapter
from atoll.plugins.inference.adapter_metrics import LoraRequests
from atoll.plugins.inference.adapter_tiers import DiskTier, HostTier, pinnable
from atoll.plugins.inference.adapters import AdapterCache, LoadedAdapter
from atoll.plugins.inference.backend import AdapterFetcher, Backend, Partial
from atoll.plugins.inference.collections import CollectionSlots, LoadedCollection
from atoll.plugins.inference.compression import CollectionWeights, read_collection
from atoll.plugins.inference.contract import (
    AdapterInfo,
    AdapterRejected,
    CollectionInfo,
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
)
from atoll.plugins.inference.engine import Engine, Row
from atoll.plugins.inference.mixtures import merge
from atoll.plugins.inference.pool import BASE, AdapterPool, describe_shapes, read_adapter
from atoll.plugins.inference.sampling import Sampler
from atoll.plugins.inference.textstream import TextStream
from atoll.plugins.inference.whisper import Transcriber
from atoll.plugins.storage.contract.adapters import is_collection

# When a tokenizer has no chat template of its own (a bare base model).
FALLBACK_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class LocalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: ModelSpec = "embedded"  # "embedded", a Hugging Face model directory, or a .gguf file
    device: str = "auto"  # "auto" picks cuda when present
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    max_batch: int = Field(16, ge=1, le=1024)
    max_adapters_per_batch: int = Field(8, ge=1)
    max_prefill_tokens: int = Field(4096, ge=16)
    max_queue: int = Field(256, ge=1)
    adapter_cache: int = Field(32, ge=1)  # adapters kept loaded: the pool's slots
    # The tiers below the slots (adapter_tiers.py), in bytes: decoded adapters in host memory,
    # then adapter directories fetched to this node's disk.
    host_cache_bytes: int = Field(1 << 30, ge=0)
    disk_cache_bytes: int = Field(20 << 30, ge=0)
    limits: AdapterLimits = AdapterLimits()
    embeddings: bool = True  # serve embed() with the MiniLM model
    # A transformers Whisper directory (model, processor): transcription and translation,
    # loaded on first use; None: this node does not transcribe.
    transcription: ConfigPath | None = None
    # Compressed collections (compression.py) loaded at start, each a storage id
    # ("collections/...", fetched like an adapter) or a directory: a request naming one of their
    # members is served by its core unless it asks for ``uncompressed``.
    collections: list[str] = []


class LocalBackend(Backend):
    kind = "local"
    scores_prompts = True

    def __init__(
        self, config: LocalConfig, data_dir: Path, fetch: AdapterFetcher, metrics: MetricsRegistry
    ) -> None:
        self.config = config
        self.data_dir = data_dir
        self.fetch = fetch
        self.metrics = metrics
        self.engine: Engine | None = None
        self.cache: AdapterCache | None = None
        self.embedder: Any = None
        self.transcriber: Transcriber | None = None
        self.model_id = model_id(config.model)

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        cfg = self.config
        path = await asyncio.to_thread(resolve_model, cfg.model, self.data_dir / "models")
        device = (
            cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
        )
        dtype = {
            "auto": torch.bfloat16 if device.startswith("cuda") else torch.float32,
            "float32": torch.float32,
            "float16": torch.float16,
            "bfloat16": torch.bfloat16,
        }[cfg.dtype]

        def load() -> tuple[Any, Any]:
            # Any: transformers wraps ``to`` so that type checkers take it for an unbound function.
            model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
            model = model.to(device).eval()
            tokenizer = AutoTokenizer.from_pretrained(path)
            return model, tokenizer

        model, self.tokenizer = await asyncio.to_thread(load)
        self.device = device
        self.context = int(getattr(model.config, "max_position_embeddings", 2048))
        self.shapes = describe_shapes(model)
        self.aliases = (str(path), str(cfg.model))  # other names the base is known by
        self.stop_ids = frozenset(_eos_ids(model, self.tokenizer))
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else min(self.stop_ids, default=0)
        self.engine = Engine(
            model,
            pad_id=pad,
            device=device,
            max_batch=cfg.max_batch,
            max_adapters=cfg.max_adapters_per_batch,
            max_prefill_tokens=cfg.max_prefill_tokens,
        )
        pool = AdapterPool(
            model,
            cfg.limits.allowed_targets,
            slots=cfg.adapter_cache,
            max_rank=cfg.limits.max_rank,
            activate=self.engine.call,
        )
        self.engine.pool = pool
        self.collections = CollectionSlots(
            model, set(pool.layers), activate=self.engine.call, on_loader=pool.on_loader
        )
        self.engine.collections = self.collections
        self.engine.start()
        targets = {m: s for m, s in self.shapes.items() if m in pool.layers}
        self.cache = AdapterCache(
            pool,
            root=self.data_dir / "adapters",
            fetch=self.fetch,
            validate=lambda p, i: validate_adapter(
                p, i, self.model_id, self.shapes, cfg.limits, aliases=self.aliases
            ),
            read=lambda p: read_adapter(p, pool.dtype),
            merge=lambda parts, mixture: merge(parts, mixture, targets, pool.dtype),
            metrics=self.metrics,
            host=HostTier(cfg.host_cache_bytes, pin=device.startswith("cuda") and pinnable()),
            disk=DiskTier(self.data_dir / "adapters", cfg.disk_cache_bytes),
        )
        self.tokens = self.metrics.counter("tokens_generated", "Completion tokens generated")
        self.lora_requests = LoraRequests(self.metrics)
        for artefact in cfg.collections:
            if is_collection(artefact):
                await self.load_collection(artefact)
            else:
                await self.load_collection_dir(Path(artefact))
        if cfg.embeddings:
            from atoll.plugins.inference.embeddings import Embedder

            self.embedder = Embedder()  # loads on first use
        if cfg.transcription is not None:
            if not (cfg.transcription / "config.json").is_file():
                raise ValueError(f"transcription: {cfg.transcription} holds no model (config.json)")
            self.transcriber = Transcriber(cfg.transcription, device, dtype)

    async def stop(self) -> None:
        if self.engine is not None:
            await asyncio.to_thread(self.engine.stop)
        if self.cache is not None:
            await asyncio.to_thread(self.cache.pool.close)

    # --- generation --------------------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent | FinishEvent]:
        engine, cache = self._ready()
        if request.tools or request.tool_choice or request.response_format:
            raise Unsupported("the local backend does not do tools or response_format")
        if request.model is not None and not same_model(request.model, self.model_id):
            raise InvalidRequest(f"this node serves {self.model_id!r}, not {request.model!r}")
        if request.adapter_source not in (None, "storage", "local"):
            raise Unsupported(
                f"the local backend loads adapters from storage, not {request.adapter_source}"
            )
        if engine.queue_depth >= self.config.max_queue:
            raise Overloaded(f"{engine.queue_depth} requests are waiting on this node")
        prompt = await asyncio.to_thread(self._encode, request)
        scoring = request.continuation is not None
        before = len(prompt)  # with a continuation: its tokens come after these
        if request.continuation is not None:
            prompt += self.tokenizer(request.continuation, add_special_tokens=False)["input_ids"]
        params = request.params
        room = self.context - len(prompt)
        if room < 1:
            raise InvalidRequest(
                f"the prompt has {len(prompt)} tokens; this model's context is {self.context}"
            )
        key = request.adapter or (request.mixture.key() if request.mixture else None)
        tracked = self.lora_requests.arrive(key) if key else None
        entry: LoadedAdapter | None = None
        held = self._member(request)
        produced = 0
        loop = asyncio.get_running_loop()
        try:
            if held is not None:
                held[0].refs += 1
            elif request.adapter is not None:
                entry = await cache.acquire(request.adapter)
            elif request.mixture is not None:
                entry = await cache.acquire_mixture(request.mixture)
        except BaseException:
            if tracked is not None:
                tracked.end(0)
            raise
        queue: asyncio.Queue[TokenEvent | FinishEvent | AtollError] = asyncio.Queue()

        def emit(event: TokenEvent | FinishEvent | AtollError) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed under a stopping node
                loop.call_soon_threadsafe(queue.put_nowait, event)

        row = Row(
            prompt=prompt,
            slot=entry.slot if entry else BASE,
            sampler=Sampler(params),
            text=TextStream(self.tokenizer, params.stop),
            max_new=1 if scoring else min(params.max_new_tokens, room),
            stop_ids=frozenset() if params.ignore_eos else self.stop_ids,
            emit=emit,
            model=self.model_id,
            adapter_id=entry.info.id if entry else request.adapter if held else None,
            member=(held[0].weights.name, held[1]) if held else None,
            logprobs=request.logprobs or scoring,
            top=request.top_logprobs,
            echo=request.echo or scoring,
            on_start=(lambda: loop.call_soon_threadsafe(tracked.start)) if tracked else None,
        )
        echoed = 0
        try:
            engine.submit(row)
            while True:
                event = await queue.get()
                if isinstance(event, AtollError):
                    raise event
                if scoring and event.type == "token":
                    echoed += event.echo
                    if event.echo and echoed > before:
                        yield event  # a continuation token; the prompt's and the one made stay
                    continue
                if event.type == "finish":
                    if scoring:  # the token made to end the row is nobody's answer
                        event.usage.completion_tokens = 0
                    produced = event.usage.completion_tokens
                    self.tokens.inc(produced)
                yield event
                if event.type == "finish":
                    return
        finally:
            engine.cancel(row)
            if tracked is not None:
                tracked.end(produced)
            if entry is not None:
                cache.release(entry)
            if held is not None:
                held[0].refs -= 1

    def _encode(self, request: GenerateRequest) -> list[int]:
        tok = self.tokenizer
        if request.prompt_token_ids is not None:
            vocab = len(tok)
            if bad := [t for t in request.prompt_token_ids if t >= vocab]:
                raise InvalidRequest(f"token id {bad[0]} is not in this model's {vocab} tokens")
            return list(request.prompt_token_ids)
        if request.messages is None:
            return tok(request.prompt, add_special_tokens=True)["input_ids"]
        messages = [m.model_dump(exclude_none=True) for m in request.messages]
        template = None if tok.chat_template else FALLBACK_TEMPLATE
        return tok.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, chat_template=template
        )

    # --- adapters ----------------------------------------------------------------------------

    def adapters(self) -> list[AdapterInfo]:
        return self.cache.infos() if self.cache else []

    async def load_adapter(self, adapter_id: str) -> AdapterInfo:
        return await self._ready()[1].load(adapter_id)

    async def unload_adapter(self, adapter_id: str) -> bool:
        return await self._ready()[1].unload(adapter_id)

    async def pin_adapter(self, adapter_id: str, pinned: bool) -> AdapterInfo:
        return self._ready()[1].pin(adapter_id, pinned)

    def _member(self, request: GenerateRequest) -> tuple[LoadedCollection, int] | None:
        """The loaded collection and core that serve the request's adapter, unless it asked
        for the original (``uncompressed``) or names none."""
        if request.adapter is None or request.uncompressed:
            return None
        return self.collections.member(request.adapter)

    async def load_collection(self, collection_id: str) -> CollectionInfo:
        """Fetch stored collection ``collection_id`` (``collections/...``) and load it under
        that id: two users' collections of one name stay apart."""
        if not is_collection(collection_id):
            raise InvalidRequest(f"{collection_id!r} is not a collection (collections/...)")
        path = await self.fetch(collection_id, self.data_dir / "adapters")
        weights = await self.load_collection_dir(path, collection_id)
        return CollectionInfo(
            id=weights.name, base_model=weights.base_model, rank=weights.rank,
            members=weights.members,
        )  # fmt: skip

    async def load_collection_dir(self, path: Path, name: str | None = None) -> CollectionWeights:
        """Load (or replace) the compressed collection in directory ``path`` (as ``name``, else
        as its manifest names it): checked whole on the loader thread, then visible between
        two steps; AdapterRejected if it is not fit."""
        _, cache = self._ready()
        cfg = self.config
        shapes = {m: s for m, s in self.shapes.items() if m in cache.pool.layers}

        def read() -> CollectionWeights:
            weights = read_collection(path, shapes, cfg.limits.max_rank, cache.pool.dtype)
            weights.name = name or weights.name
            base = weights.base_model
            names = (self.model_id, *self.aliases)
            if cfg.limits.check_base_name and base and not any(same_model(base, n) for n in names):
                raise AdapterRejected(
                    f"collection {weights.name!r} is for {base!r}, this node serves "
                    f"{self.model_id!r}"
                )
            return weights

        loaded = await asyncio.wrap_future(self.collections.load(read))
        return loaded.weights

    async def unload_collection(self, name: str) -> bool:
        engine, _ = self._ready()
        return bool(await asyncio.wrap_future(engine.call(self.collections.unload(name))))

    # --- the rest ----------------------------------------------------------------------------

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        if self.embedder is None:
            return await super().embed(request)
        return await self.embedder.embed(request)

    async def transcribe(
        self, request: TranscribeRequest, partial: Partial | None = None
    ) -> TranscribeResult:
        if self.transcriber is None:
            return await super().transcribe(request)
        return await self.transcriber.transcribe(request, partial if request.stream else None)

    def info(self) -> NodeInfo:
        engine = self.engine
        return NodeInfo(
            backend=self.kind,
            base_model=self.model_id,
            models=[self.model_id],
            adapters=[a.id for a in self.adapters() if not a.mixture],
            max_batch=self.config.max_batch,
            max_adapters=self.config.adapter_cache,
            queue_depth=engine.queue_depth if engine else 0,
            running=engine.running if engine else 0,
            tokens_per_s=round(engine.tokens_per_s(), 2) if engine else 0.0,
            embeddings=self.embedder.model_id if self.embedder is not None else None,
            transcription=self.transcriber.model_id if self.transcriber is not None else None,
            collections={  # a copy first: the engine thread changes the dict
                name: loaded.weights.members
                for name, loaded in (list(self.collections.loaded.items()) if engine else [])
            },
        )

    async def health(self) -> Health:
        alive = self.engine is not None and self.engine.alive
        return Health(ok=alive, backend=self.kind, detail={"device": getattr(self, "device", None)})

    def _ready(self) -> tuple[Engine, AdapterCache]:
        if self.engine is None or self.cache is None:
            raise Unsupported("the local backend has not started")
        return self.engine, self.cache


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return ids
