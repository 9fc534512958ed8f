"""Services answer only the roles that need them: a compromised inference node (or any member
agent) cannot read datasets, an agent's files or open tunnels, and no member reaches a GPU node
around the gateway. The agent checks the caller's signed roles before any handler runs."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from atoll.agent.errors import AtollError, Forbidden
from atoll.agent.files import get_file
from atoll.agent.tunnel import TunnelListener
from atoll.plugins.storage.contract.datasets import (
    describe_dataset,
    fetch_dataset,
    list_datasets,
    upload_dataset,
)
from support.overlay import AgentFactory

MARKER = "alice's marker row 7c1e"


async def test_an_inference_node_cannot_read_datasets(
    make_agent: AgentFactory, tmp_path: Path
) -> None:
    await make_agent("store", roles=("storage",), plugins={"storage": {}})
    gw = await make_agent("gw", roles=("gateway",))
    rows = tmp_path / "alice.jsonl"
    rows.write_text(
        '{"messages": [{"role": "user", "content": "q"}, '
        f'{{"role": "assistant", "content": "{MARKER}"}}]}}\n'
    )
    record = await upload_dataset(gw.agent, "store", rows, "secret-set", owner="alice")
    gpu = await make_agent("gpu-1", roles=("inference",))
    dest = tmp_path / "stolen.jsonl"
    attempts = (
        list_datasets(gpu.agent, "store"),
        describe_dataset(gpu.agent, "store", record.id),
        fetch_dataset(gpu.agent, "store", record.id, dest),
    )
    for attempt in attempts:
        with pytest.raises(AtollError, match="needs one of the roles") as caught:
            await attempt
        assert "inference" in str(caught.value)
    assert not dest.exists() and not any(p.name.startswith(".") for p in tmp_path.iterdir())
    # the honest path: a trainer fetches what it trains on
    trainer = await make_agent("trainer", roles=("training",))
    await fetch_dataset(trainer.agent, "store", record.id, dest)
    assert MARKER in dest.read_text()


async def test_files_answer_operators_only(make_agent: AgentFactory, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "weights.bin").write_bytes(b"w" * 1000)
    await make_agent("box", plugins={"files": {"dirs": [str(shared)]}})
    gpu = await make_agent("gpu-1", roles=("inference",))
    with pytest.raises(Forbidden, match="needs one of the roles admin, operator"):
        await get_file(gpu.agent, "box", str(shared / "weights.bin"), tmp_path / "got.bin")
    assert not (tmp_path / "got.bin").exists()
    ops = await make_agent("ops", roles=("operator",))
    await get_file(ops.agent, "box", str(shared / "weights.bin"), tmp_path / "got.bin")
    assert (tmp_path / "got.bin").read_bytes() == b"w" * 1000


async def test_tunnels_answer_inference_and_operators_only(make_agent: AgentFactory) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"pong:" + await reader.readline())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        await make_agent("lorax-host", plugins={"tunnel": {"allow": [f"127.0.0.1:{port}"]}})

        async def through(agent_rt) -> tuple[bytes, list[str]]:
            listener = TunnelListener(agent_rt.agent, "lorax-host", "127.0.0.1", port)
            await listener.start("127.0.0.1", 0)
            try:
                reader, writer = await asyncio.open_connection(*listener.address)
                writer.write(b"ping\n")
                await writer.drain()
                data = await asyncio.wait_for(reader.read(100), 5)
                writer.close()
                return data, listener.errors
            finally:
                await listener.stop()

        member = await make_agent("member", roles=("agent",))
        data, errors = await through(member)
        assert data == b"" and "needs one of the roles inference" in errors[-1]
        gpu = await make_agent("gpu-1", roles=("inference",))
        assert await through(gpu) == (b"pong:ping\n", [])
    finally:
        server.close()
        await server.wait_closed()


async def test_no_member_calls_a_gpu_node_around_the_gateway(make_agent: AgentFactory) -> None:
    config = {"backend": "echo", "echo": {"model": "m1"}}
    await make_agent("gpu-1", roles=("inference",), plugins={"inference": config})
    for roles in (("agent",), ("inference",), ("storage",), ("training",), ("user",)):
        member = await make_agent(f"m-{roles[0]}", roles=roles)
        for method in ("generate", "embed", "load_adapter", "info"):
            with pytest.raises(Forbidden, match="needs one of the roles gateway, admin"):
                await member.agent.call("gpu-1/inference", method, {"prompt": "hi"})
    gw = await make_agent("gw", roles=("gateway",))
    request = {"prompt": "hi", "params": {"max_new_tokens": 4}}
    reply = await gw.agent.call("gpu-1/inference", "generate", request)
    assert reply["finish_reason"]
    # What a node holds in memory for everyone is its operators' to change, not a gateway's.
    for caller in (member, gw):
        for method in ("load_collection", "unload_collection"):
            with pytest.raises(Forbidden, match="needs one of the roles operator, controller"):
                await caller.agent.call("gpu-1/inference", method, {"id": "collections/a/b"})


async def test_adapter_weights_answer_the_roles_that_serve_or_train(
    make_agent: AgentFactory, tmp_path: Path
) -> None:
    from atoll.plugins.storage.contract.adapters import fetch_adapter, list_adapters

    await make_agent("store", roles=("storage",), plugins={"storage": {}})
    for roles in (("agent",), ("storage",), ("user",)):
        member = await make_agent(f"m-{roles[0]}", roles=roles)
        with pytest.raises(AtollError, match="needs one of the roles inference, training"):
            await fetch_adapter(member.agent, "store", "alice/x", tmp_path / "x")
        with pytest.raises(Forbidden, match="needs one of the roles inference, training"):
            await list_adapters(member.agent, "store")
    assert not (tmp_path / "x").exists()
    gpu = await make_agent("gpu-1", roles=("inference",))
    assert await list_adapters(gpu.agent, "store") == []
