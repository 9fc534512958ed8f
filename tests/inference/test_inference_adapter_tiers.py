"""The adapter tiers below the pool's slots on the local backend: decoded adapters kept in host
memory (bounded in bytes) come back without their files, fetched directories on disk (bounded in
bytes) are removed least recently used first but never under a loaded adapter, each load is
counted by the tier it came from — and every request's answer is the adapter's own."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from atoll.agent.metrics import MetricsRegistry
from atoll.plugins.inference.adapter_tiers import DiskTier, HostTier, weights_bytes
from atoll.plugins.inference.contract import AdapterInfo
from atoll.plugins.inference.local_backend import LocalBackend, LocalConfig
from atoll.plugins.inference.pool import read_adapter
from atoll.plugins.storage.contract.adapters import AdapterNotFound
from support.local_node import run
from support.tiny_models import build_tiny_model, make_adapter

GREEDY = {"temperature": 0, "max_new_tokens": 4}
IDS = [f"u{i}/ad" for i in range(4)]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    base = build_tiny_model(root / "tiny-llama")
    for i, adapter_id in enumerate(IDS):
        make_adapter(base, root / "stored" / adapter_id, seed=i)
    return {"base": base, "stored": root / "stored"}


async def start(models: dict[str, Path], tmp_path: Path, **config: Any) -> LocalBackend:
    """A node with one slot whose adapters come "from storage": copied into its data dir, as
    the plugin's fetch does, and counted in ``fetched``."""
    fetched: list[str] = []

    async def fetch(adapter_id: str, root: Path) -> Path:
        dest = root / adapter_id
        if (dest / "adapter_config.json").is_file():
            return dest
        source = models["stored"] / adapter_id
        if not source.is_dir():
            raise AdapterNotFound(f"no adapter {adapter_id}")
        shutil.copytree(source, dest)
        fetched.append(adapter_id)
        return dest

    options = {"model": str(models["base"]), "embeddings": False, "adapter_cache": 1}
    backend = LocalBackend(
        LocalConfig.model_validate(options | config), tmp_path, fetch, MetricsRegistry()
    )
    backend.fetched = fetched  # type: ignore[attr-defined]
    await backend.start()
    return backend


def tier_counts(backend: LocalBackend) -> dict[str, float]:
    assert backend.cache is not None
    return {tier: c.value for tier, c in backend.cache.found.items()}


async def answer(backend: LocalBackend, adapter_id: str) -> list[int]:
    ids, _, finish = await run(backend, prompt="Hello there", adapter=adapter_id, params=GREEDY)
    assert finish.adapter == adapter_id
    return ids


async def test_the_host_tier_serves_an_evicted_adapter_without_its_files(
    models: dict[str, Path], tmp_path: Path
) -> None:
    size = weights_bytes(read_adapter(models["stored"] / IDS[0], dtype=torch.float32))
    backend = await start(models, tmp_path, host_cache_bytes=2 * size)
    try:
        first = {a: await answer(backend, a) for a in IDS[:2]}  # a in, then b evicts it
        assert tier_counts(backend) == {"slots": 0, "host": 0, "disk": 0, "storage": 2}
        # a again: its decoded weights are still in host memory; its files are not needed.
        shutil.rmtree(tmp_path / "adapters" / IDS[0])
        assert await answer(backend, IDS[0]) == first[IDS[0]]
        assert tier_counts(backend)["host"] == 1
        assert await answer(backend, IDS[0]) == first[IDS[0]]  # and now from its slot
        assert tier_counts(backend)["slots"] == 1
        # c and d push a and b out of the host tier (two adapters fit): b comes from disk.
        for adapter_id in IDS[2:]:
            await answer(backend, adapter_id)
        assert backend.cache is not None and backend.cache.host.bytes <= 2 * size
        assert await answer(backend, IDS[1]) == first[IDS[1]]
        assert tier_counts(backend)["disk"] == 1
        assert backend.fetched == IDS  # type: ignore[attr-defined]  # each fetched once
    finally:
        await backend.stop()


async def test_the_disk_tier_stays_in_its_bytes_and_keeps_what_is_loaded(
    models: dict[str, Path], tmp_path: Path
) -> None:
    one = sum(f.stat().st_size for f in (models["stored"] / IDS[0]).iterdir())
    backend = await start(models, tmp_path, host_cache_bytes=0, disk_cache_bytes=2 * one + 100)
    try:
        first = {a: await answer(backend, a) for a in IDS[:3]}
        on_disk = sorted(
            p.parent.relative_to(tmp_path / "adapters").as_posix()
            for p in (tmp_path / "adapters").glob("**/adapter_config.json")
        )
        assert on_disk == IDS[1:3]  # the least recently used went; the loaded one stayed
        assert backend.cache is not None and backend.cache.disk.bytes <= 2 * one + 100
        assert await answer(backend, IDS[0]) == first[IDS[0]]  # fetched again
        assert backend.fetched == [*IDS[:3], IDS[0]]  # type: ignore[attr-defined]
        assert tier_counts(backend)["storage"] == 4
    finally:
        await backend.stop()


def test_a_restarted_node_knows_its_disk_and_the_host_tier_its_bound(tmp_path: Path) -> None:
    for i, name in enumerate(["old/a", "new/b"]):
        folder = tmp_path / name
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text("{}")
        (folder / "adapter_model.safetensors").write_bytes(b"x" * 1000)
        stamp = 1_000_000 + i
        os.utime(folder / "adapter_config.json", (stamp, stamp))
    disk = DiskTier(tmp_path, capacity=1500)
    assert disk.holds("old/a") and disk.holds("new/b") and disk.bytes == 2004
    assert disk.trim(keep=()) == ["old/a"]
    assert not (tmp_path / "old/a").exists() and (tmp_path / "new/b").exists()
    host = HostTier(capacity=10, pin=False)
    host.put(_info("x"), {})  # zero bytes: fits
    assert host.get("x") is not None and host.get("y") is None


def _info(adapter_id: str) -> AdapterInfo:
    return AdapterInfo(id=adapter_id, base_model="b", rank=4, target_modules=["q_proj"])
