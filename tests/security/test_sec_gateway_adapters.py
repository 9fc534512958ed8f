"""Adapter ownership from the source of truth. A hostile agent claimed ``alice/ft-<job>`` on
``adapters.new`` before the real adapter landed. The gateway now treats a publication only as a
hint naming an adapter: its source must be the configured storage agent or one discovery lists
with the storage plugin, and owner, project and visibility come from that agent's record (a
registration that disagrees is corrected). Here the attacker even holds the storage role (so the
broker lets it publish) and answers ``describe_adapter`` with a forged record: it is never asked.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from atoll.agent.runtime import AgentRuntime
from atoll.plugins.gateway import plugin as gateway_plugin
from atoll.plugins.storage.contract.adapters import ADAPTERS_NEW, DESCRIBE_ADAPTER, upload_adapter
from atoll.protocol.session import CallInfo
from support.island import Island, models
from support.overlay import AgentFactory, eventually

BASE = "atoll-test/tiny-llama"


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real LoRA adapter as peft saves it, for a tiny random base named BASE."""
    from support.tiny_models import random_lora  # torch and peft: only when used

    return random_lora(tmp_path_factory.mktemp("peft") / "adapter", BASE)


async def rogue_storage(make_agent: AgentFactory) -> tuple[AgentRuntime, list[Any]]:
    """An agent with the storage role (the broker lets it publish on adapters.new) but no
    storage plugin, answering describe_adapter with a forged record; the calls it got."""
    rogue = await make_agent("rogue", roles=("storage",), heartbeat=0.2)
    asked: list[Any] = []

    async def forged(params: Any, info: CallInfo) -> dict[str, Any]:
        asked.append(params)
        return {
            "id": params["id"], "base_model": BASE, "rank": 4, "target_modules": ["q_proj"],
            "files": [], "size_bytes": 0, "uploader": "rogue", "created": 0.0,
            "owner": "bob", "project": None, "public": True,
        }  # fmt: skip

    rogue.agent.handle("storage", DESCRIBE_ADAPTER.name, forged, ("gateway",))
    return rogue, asked


async def claim(rogue: AgentRuntime, *adapter_ids: str) -> None:
    for adapter_id in adapter_ids:
        await rogue.agent.publish(ADAPTERS_NEW, {"id": adapter_id, "owner": "bob", "public": True})
    await rogue.agent.flush()  # at the broker before anything published after this


async def island(make_agent: AgentFactory, **gateway: Any) -> Island:
    """A storage agent ("store", its plugin announced from the start) and a gateway."""
    await make_agent("store", roles=("storage",), plugins={"storage": {}}, heartbeat=0.2)
    isl = await Island(make_agent).start_gateway(**gateway)
    view = isl.plugin.gateway.watch.discovery
    await eventually(lambda: bool(view.select(plugin="storage")))
    return isl


def holder(isl: Island, adapter_id: str) -> tuple[str | None, str | None, bool] | None:
    found = isl.accounts.adapter(adapter_id)
    return None if found is None else (found.owner, found.project, found.public)


@pytest.mark.parametrize("configured", [True, False], ids=["configured-storage", "discovery"])
async def test_a_hint_from_an_agent_that_is_not_storage_changes_nothing(
    make_agent: AgentFactory,
    adapter_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    configured: bool,
) -> None:
    # An unknown source is waited for while discovery may still be learning of it: shortened.
    monkeypatch.setattr(gateway_plugin, "ADAPTER_LOOKUP_TIMEOUT", 1.0)
    isl = await island(make_agent, **({"storage": "store"} if configured else {}))
    alice, bob = isl.key("alice"), isl.key("bob")
    trainer = (await make_agent("trainer", roles=("training",))).agent
    # alice's adapter, registered honestly from storage's record.
    await upload_adapter(trainer, "store", adapter_dir, "alice/ft-0", owner="alice")
    await eventually(lambda: holder(isl, "alice/ft-0") is not None)
    audit = isl.accounts.audit_log(limit=1000)
    rogue, asked = await rogue_storage(make_agent)
    # The claim on an adapter about to land, and on one already registered.
    await claim(rogue, "alice/ft-1", "alice/ft-0")
    # The real adapter lands after the claims (one subscriber, in order): storage's record wins.
    await upload_adapter(trainer, "store", adapter_dir, "alice/ft-1", owner="alice")
    await eventually(lambda: holder(isl, "alice/ft-1") is not None, timeout=10)
    # Hints from a source discovery does not list wait aside, bounded, then are refused.
    await eventually(lambda: not isl.plugin._hints_waiting, timeout=10)
    assert asked == []  # the forger was never asked
    assert holder(isl, "alice/ft-0") == holder(isl, "alice/ft-1") == ("alice", None, False)
    assert {"alice/ft-0", "alice/ft-1"} <= await models(isl, alice)
    assert not {"alice/ft-0", "alice/ft-1"} & await models(isl, bob)
    new_entries = isl.accounts.audit_log(limit=1000)[: -len(audit)]
    assert [(e.actor, e.action, e.target) for e in new_entries] == [
        ("store/storage", "adapter.register", "alice/ft-1")
    ]


async def test_a_registration_that_disagrees_with_storage_is_corrected(
    make_agent: AgentFactory, adapter_dir: Path
) -> None:
    isl = await island(make_agent)
    for user in ("alice", "bob"):
        isl.key(user)
    isl.accounts.create_project("lab", actor="test")
    isl.accounts.add_member("lab", "alice", "member", actor="test")
    trainer = (await make_agent("trainer", roles=("training",))).agent
    # Registered wrongly before (the old first come, first served): bob's, public.
    for adapter_id in ("lab/ft-2", "alice/ft-3"):
        isl.accounts.register_adapter(adapter_id, BASE, owner="bob", public=True, actor="test")
    await upload_adapter(trainer, "store", adapter_dir, "lab/ft-2", owner="alice", project="lab")
    await upload_adapter(trainer, "store", adapter_dir, "alice/ft-3", owner="alice")
    await eventually(lambda: holder(isl, "alice/ft-3") == ("alice", None, False))
    assert holder(isl, "lab/ft-2") == (None, "lab", False)  # a project's: no user owner
    updates = [e for e in isl.accounts.audit_log(limit=50) if e.action == "adapter.update"]
    assert {(e.actor, e.target) for e in updates} == {
        ("store/storage", "lab/ft-2"),
        ("store/storage", "alice/ft-3"),
    }


async def test_a_hint_for_an_adapter_storage_does_not_have_registers_nothing(
    make_agent: AgentFactory,
) -> None:
    isl = await island(make_agent)
    isl.key("alice")
    store = await make_agent("store2", roles=("storage",), plugins={"storage": {}}, heartbeat=0.2)
    view = isl.plugin.gateway.watch.discovery
    await eventually(lambda: len(view.select(plugin="storage")) == 2)
    # Even a real storage agent's publication is only a hint: its record is what counts.
    await store.agent.publish(ADAPTERS_NEW, {"id": "alice/ghost", "owner": "alice", "public": True})
    await store.agent.flush()
    await asyncio.sleep(0.5)
    assert holder(isl, "alice/ghost") is None
    assert not [e for e in isl.accounts.audit_log(limit=50) if e.target == "alice/ghost"]


async def test_a_storage_agent_discovery_learns_of_late_is_still_heard(
    make_agent: AgentFactory, adapter_dir: Path
) -> None:
    """The honest path when the storage plugin starts after its agent announced itself: the
    hint waits (bounded) for discovery's next announcement instead of being refused."""
    isl = await Island(make_agent).start_gateway()
    isl.key("alice")
    late = await make_agent("late", roles=("storage",), heartbeat=1.0)
    await late.host.add("storage", {})  # listed in discovery from its next heartbeat on
    trainer = (await make_agent("trainer", roles=("training",))).agent
    await upload_adapter(trainer, "late", adapter_dir, "alice/ft-4", owner="alice")
    await eventually(lambda: holder(isl, "alice/ft-4") == ("alice", None, False), timeout=10)
