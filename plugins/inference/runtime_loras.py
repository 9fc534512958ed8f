"""Atoll-stored adapters pushed into a vLLM server on demand, through vLLM's runtime LoRA API
(``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``; the server runs with
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``), so a vLLM island serves every stored adapter, not
only its ``--lora-modules``.

An adapter is fetched from the storage agent into a directory the vLLM server reads at the same
path (same host), checked with the same rule storage and the local backend apply
(``unservable``), then loaded under its Atoll id. At most ``max_loaded`` pushed adapters stay
loaded: the least recently used one not serving a request is unloaded to make room (vLLM keeps
its own GPU/CPU LoRA caches below that; this bounds what the server holds at all)."""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

from atoll.plugins.inference.backend import AdapterFetcher
from atoll.plugins.inference.contract import AdapterRejected, BackendUnavailable, Unsupported
from atoll.plugins.inference.openai_wire import error_text
from atoll.plugins.storage.contract.adapters import CONFIG_FILE, unservable

ALREADY = "has already been loaded"  # vLLM's words for a name it holds


class RuntimeLoras:
    """The adapters this node pushed into the upstream, least recently used first."""

    def __init__(
        self,
        fetch: AdapterFetcher,
        root: Path,
        max_loaded: int,
        post: Callable[[str, dict[str, str]], Awaitable[httpx.Response]],
    ) -> None:
        self._fetch = fetch
        self._root = root
        self._max = max_loaded
        self._post = post  # POST a JSON body to a path under the upstream's /v1
        self._loaded: OrderedDict[str, None] = OrderedDict()
        self._in_use: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.loads = 0
        self.unloads = 0

    @property
    def loaded(self) -> list[str]:
        return list(self._loaded)

    async def acquire(self, adapter_id: str) -> None:
        """Make ``adapter_id`` loaded in the upstream and hold it there until ``release``."""
        self._in_use[adapter_id] = self._in_use.get(adapter_id, 0) + 1
        try:
            await self._load(adapter_id)
        except BaseException:
            self.release(adapter_id)
            raise

    def release(self, adapter_id: str) -> None:
        left = self._in_use.get(adapter_id, 0) - 1
        if left > 0:
            self._in_use[adapter_id] = left
        else:
            self._in_use.pop(adapter_id, None)

    async def unload(self, adapter_id: str) -> bool:
        """Unload a pushed adapter (False: this node did not push it)."""
        if adapter_id not in self._loaded:
            return False
        await self._unload(adapter_id)
        return True

    async def _load(self, adapter_id: str) -> None:
        lock = self._locks.setdefault(adapter_id, asyncio.Lock())
        async with lock:  # one fetch and load per adapter, however many requests wait on it
            if adapter_id in self._loaded:
                self._loaded.move_to_end(adapter_id)
                return
            path = await self._fetch(adapter_id, self._root)
            config = await asyncio.to_thread(_read_config, path, adapter_id)
            if problem := unservable(config):
                raise AdapterRejected(f"adapter {adapter_id!r} refused: {problem}")
            await self._make_room()
            body = {"lora_name": adapter_id, "lora_path": str(path)}
            resp = await self._post("load_lora_adapter", body)
            text = error_text(resp) if resp.status_code != 200 else ""
            if resp.status_code == 404 and ALREADY not in text:
                raise Unsupported(
                    "the upstream has no runtime LoRA loading (start vLLM with "
                    f"VLLM_ALLOW_RUNTIME_LORA_UPDATING=True): {text}"
                )
            if resp.status_code >= 500:
                raise BackendUnavailable(f"the upstream failed to load {adapter_id!r}: {text}")
            if resp.status_code != 200 and ALREADY not in text:
                raise AdapterRejected(f"adapter {adapter_id!r} refused by the upstream: {text}")
            self._loaded[adapter_id] = None
            self.loads += 1

    async def _make_room(self) -> None:
        """Unload least recently used adapters no request holds until one more fits (all in
        use: the upstream holds one more for a while)."""
        while len(self._loaded) >= self._max:
            idle = next((a for a in self._loaded if a not in self._in_use), None)
            if idle is None:
                return
            await self._unload(idle)

    async def _unload(self, adapter_id: str) -> None:
        resp = await self._post("unload_lora_adapter", {"lora_name": adapter_id})
        # 404: the upstream lost it already (restarted): either way it is not loaded.
        if resp.status_code not in (200, 404):
            raise BackendUnavailable(
                f"the upstream failed to unload {adapter_id!r}: {error_text(resp)}"
            )
        self._loaded.pop(adapter_id, None)
        self.unloads += 1


def _read_config(path: Path, adapter_id: str) -> dict[str, object]:
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise AdapterRejected(f"adapter {adapter_id!r} refused: {CONFIG_FILE}: {exc}") from None
    if not isinstance(config, dict):
        raise AdapterRejected(f"adapter {adapter_id!r} refused: {CONFIG_FILE} is no object")
    return config
