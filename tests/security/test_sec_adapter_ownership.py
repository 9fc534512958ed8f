"""Adapter takeover: a member agent claimed ``alice/ft-<job>`` on ``adapters.new`` before the real
adapter landed (alice got 404 on her own model, bob saw it in his /v1/models). The broker now
lets only storage publish there, and the gateway takes owner, project and visibility from the
storage agent's record, never from the publication, correcting a registration that disagrees."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from atoll.agent.errors import Forbidden
from atoll.plugins.storage.contract.adapters import ADAPTERS_NEW, upload_adapter
from support.island import Island, models, start_storage
from support.overlay import AgentFactory, eventually

BASE = "atoll-test/tiny-llama"


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    """A real LoRA adapter as peft saves it, for a tiny random base named BASE."""
    from support.tiny_models import random_lora  # torch and peft: only when used

    return random_lora(tmp_path / "adapter", BASE)


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
