"""Adapter takeover: a member agent claimed ``alice/ft-<job>`` on ``adapters.new`` before the real
adapter landed (alice got 404 on her own model, bob saw it in his /v1/models). The broker now
lets only storage publish there, and the gateway takes owner, project and visibility from the
storage agent's record, never from the publication, correcting a registration that disagrees."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from atoll.agent.errors import Forbidden
from atoll.plugins.storage.contract.adapters import ADAPTERS_NEW, upload_adapter
from conftest import AgentFactory, Island, eventually, start_storage

BASE = "atoll-test/tiny-llama"


async def models(isl: Island, key: str) -> set[str]:
    async with httpx.AsyncClient() as client:
        reply = await client.get(f"{isl.url}/v1/models", headers={"Authorization": f"Bearer {key}"})
    reply.raise_for_status()
    return {m["id"] for m in reply.json()["data"]}


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    """A real LoRA adapter as peft saves it, for a tiny random base named BASE."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    model.name_or_path = BASE  # becomes base_model_name_or_path
    out = tmp_path / "adapter"
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(out, save_embedding_layers=False)
    return out


async def test_only_storage_says_whose_an_adapter_is(
    make_agent: AgentFactory, adapter_dir: Path
) -> None:
    await start_storage(make_agent)
    isl = await Island(make_agent).start_gateway()
    alice, bob = isl.key("alice"), isl.key("bob")
    mallory = await make_agent("gpu-evil", roles=("inference",))
    # The claim ahead of the real adapter is refused where it is sent.
    with pytest.raises(Forbidden, match=r"may not publish 'adapters\.new'"):
        await mallory.agent.publish(ADAPTERS_NEW, {"id": "alice/ft-1", "owner": "bob"})
    # A registration that went wrong before (the old first-come-first-served) is corrected by
    # the real upload's announcement: storage's record wins.
    isl.accounts.register_adapter("alice/ft-1", BASE, owner="bob", public=True, actor="test")
    assert "alice/ft-1" in await models(isl, bob)
    trainer = (await make_agent("trainer", roles=("training",))).agent
    await upload_adapter(trainer, "store", adapter_dir, "alice/ft-1", owner="alice")
    await eventually(lambda: isl.accounts.adapter("alice/ft-1").owner == "alice")
    fixed = isl.accounts.adapter("alice/ft-1")
    assert (fixed.owner, fixed.project, fixed.public) == ("alice", None, False)
    assert "alice/ft-1" in await models(isl, alice)
    assert "alice/ft-1" not in await models(isl, bob)


async def test_a_hint_for_an_adapter_storage_does_not_have_registers_nothing(
    make_agent: AgentFactory,
) -> None:
    store, _ = await start_storage(make_agent)
    isl = await Island(make_agent).start_gateway()
    isl.key("alice")
    # Even the storage agent's own publication is only a hint: the record is what counts.
    await store.agent.publish(ADAPTERS_NEW, {"id": "alice/ghost", "owner": "alice", "public": True})
    await asyncio.sleep(0.5)
    assert isl.accounts.adapter("alice/ghost") is None
