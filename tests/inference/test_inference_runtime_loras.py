"""The ``openai`` backend pushing Atoll-stored adapters into a vLLM-shaped server over its runtime
LoRA API: fetched from the storage agent over the data plane into a directory the server reads,
loaded on first use under the Atoll id, the least recently used unloaded past ``max_loaded``, and
each refusal said clearly (no runtime API, the upstream's refusal, an adapter nobody stores)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from atoll.plugins.inference.contract import (
    AdapterRejected,
    FinishEvent,
    GenerateRequest,
    TokenEvent,
    Unsupported,
    stream_generate,
)
from atoll.plugins.storage.contract.adapters import AdapterNotFound, upload_adapter
from support.fake_openai import BASE, FakeOpenAI, chat_reply
from support.overlay import AgentFactory
from support.tiny_models import random_lora

KEY = "sk-island"


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    return {name: random_lora(root / name, BASE) for name in ("a", "b")}


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    server = FakeOpenAI(api_key=KEY)
    server.runtime_lora = True
    await server.start()
    yield server
    await server.stop()


async def island(
    make_agent: AgentFactory, fake: FakeOpenAI, stored: dict[str, Path], tmp_path: Path
) -> Any:
    """Storage holding alice/a and alice/b, a vLLM node pushing at most one, and a caller."""
    await make_agent("store", roles=("storage",), plugins={"storage": {}})
    openai = {
        "url": fake.url,
        "api_key": KEY,
        "push_adapters": True,
        "max_loaded": 1,
        "adapter_root": str(tmp_path / "shared-with-vllm"),
    }
    await make_agent(
        "gpu1", roles=("inference",), plugins={"inference": {"backend": "openai", "openai": openai}}
    )
    caller = await make_agent("gw", roles=("gateway",))
    for name, path in stored.items():
        await upload_adapter(caller.agent, "store/storage", path, f"alice/{name}", owner="alice")
    return caller.agent


async def ask(agent: Any, adapter: str) -> str:
    request = GenerateRequest(
        messages=[{"role": "user", "content": "hi"}],  # type: ignore[list-item]
        adapter=adapter,
        params={"temperature": 0, "max_new_tokens": 8},  # type: ignore[arg-type]
    )
    events = [e async for e in stream_generate(agent, "gpu1/inference", request)]
    assert isinstance(events[-1], FinishEvent) and events[-1].adapter == adapter
    return "".join(e.text for e in events if isinstance(e, TokenEvent))


async def test_stored_adapters_are_pushed_on_demand_and_the_oldest_unloaded(
    make_agent: AgentFactory, fake: FakeOpenAI, stored: dict[str, Path], tmp_path: Path
) -> None:
    agent = await island(make_agent, fake, stored, tmp_path)
    assert await ask(agent, "alice/a") == chat_reply("alice/a", [{"content": "hi"}])
    path = Path(fake.loaded["alice/a"])
    # The server was given a directory it can read: the stored files, under the shared root.
    assert path.is_relative_to(tmp_path / "shared-with-vllm")
    assert json.loads((path / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert (path / "adapter_model.safetensors").read_bytes() == (
        stored["a"] / "adapter_model.safetensors"
    ).read_bytes()
    assert await ask(agent, "alice/a")  # loaded once, used twice
    loads = [s for s in fake.seen if s.path == "/v1/load_lora_adapter"]
    assert [s.body["lora_name"] for s in loads] == ["alice/a"]
    # max_loaded = 1: b takes a's place.
    assert await ask(agent, "alice/b") == chat_reply("alice/b", [{"content": "hi"}])
    assert list(fake.loaded) == ["alice/b"]
    unloads = [s.body["lora_name"] for s in fake.seen if s.path == "/v1/unload_lora_adapter"]
    assert unloads == ["alice/a"]
    # The server's own --lora-modules are served as before, without a push.
    assert await ask(agent, "sql-lora") == chat_reply("sql-lora", [{"content": "hi"}])
    assert len([s for s in fake.seen if s.path == "/v1/load_lora_adapter"]) == 2
    info = await agent.call("gpu1/inference", "info", {})
    assert "alice/b" in info["adapters"]


async def test_refusals_are_clear(
    make_agent: AgentFactory, fake: FakeOpenAI, stored: dict[str, Path], tmp_path: Path
) -> None:
    agent = await island(make_agent, fake, stored, tmp_path)
    with pytest.raises(AdapterNotFound):
        await ask(agent, "alice/nobody-stores-this")
    fake.load_refusal = "LoRA rank 4 is greater than max_lora_rank 2"
    with pytest.raises(AdapterRejected, match="refused by the upstream: LoRA rank 4 is greater"):
        await ask(agent, "alice/a")
    fake.load_refusal = None
    fake.runtime_lora = False
    with pytest.raises(Unsupported, match="VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"):
        await ask(agent, "alice/a")
    fake.runtime_lora = True
    assert await ask(agent, "alice/a")  # and the node is still fine
