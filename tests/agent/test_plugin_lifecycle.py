"""Operators change an agent's plugins remotely (the system plugin's ``plugin_*`` methods, and
``atoll plugins``): configs checked by the plugin's own model before anything changes, a failed
start rolled back to the previous config with the reason kept, refusal for every role but the
operator's, and the changes kept across the agent's restart. Real broker and agents."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from atoll.agent.errors import Forbidden, InvalidRequest
from atoll.agent.files import put_file
from atoll.agent.node import Agent
from atoll.agent.plugins import REMOTE_CHANGES
from atoll.agent.runtime import AgentRuntime
from atoll.broker.server import BrokerServer
from atoll.tenancy.operator import OperatorStore
from support.overlay import AgentFactory


def echo(model: str) -> dict[str, Any]:
    return {"backend": "echo", "echo": {"model": model}}


def state(statuses: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((s for s in statuses if s["name"] == name), None)


async def test_operators_change_plugins_remotely_and_the_agent_keeps_it(
    make_agent: AgentFactory, broker: BrokerServer, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    node = await make_agent("node", roles=("inference",), plugins={"inference": echo("m1")})
    op = (await make_agent("op", roles=("operator",))).agent
    admin = (await make_agent("adm", roles=("admin",))).agent

    async def system(caller: Agent, method: str, params: Any) -> Any:
        return await caller.call("node/system", method, params, timeout=30)

    files = {"name": "files", "config": {"dirs": [str(shared)]}}
    for role_agent in (admin, node.agent):  # a tenant admin, the agent itself: not operators
        with pytest.raises(Forbidden, match="may not use 'plugin_add'"):
            await system(role_agent, "plugin_add", files)
    with pytest.raises(
        InvalidRequest, match=r"^bad plugin 'files' config: extra: Extra inputs are not permitted$"
    ):
        await system(op, "plugin_add", {"name": "files", "config": {"dirs": [], "extra": 1}})
    with pytest.raises(InvalidRequest, match=r"no plugin 'nosuch'; installed: .*files"):
        await system(op, "plugin_add", {"name": "nosuch"})
    for method in ("plugin_remove", "plugin_restart", "plugin_reconfigure"):
        with pytest.raises(InvalidRequest, match="system plugin is part of the agent"):
            await system(op, method, {"name": "system"})
    with pytest.raises(InvalidRequest, match="not running here: add it"):
        await system(op, "plugin_reconfigure", files)
    assert state(await system(admin, "plugins", None), "files") is None  # nothing changed

    statuses = await system(op, "plugin_add", files)
    assert state(statuses, "files") == {"name": "files", "state": "running"}
    local = tmp_path / "note.txt"
    local.write_text("hello")
    await put_file(admin, "node", local, str(shared / "note.txt"))  # it serves: an admin puts
    assert (shared / "note.txt").read_text() == "hello"

    # A config the model accepts but the plugin cannot start with: back on the old one.
    bad = {"name": "inference", "config": {"backend": "echo", "echo": {"delay": "slow"}}}
    with pytest.raises(
        InvalidRequest, match=r"(?s)did not start with that config.*previous config"
    ):
        await system(op, "plugin_reconfigure", bad)
    inference = state(await system(admin, "plugins", None), "inference")
    assert inference is not None and inference["state"] == "running"
    assert "delay" in inference["last_error"]
    assert (await admin.call("node/inference", "info"))["base_model"] == "m1"
    await system(op, "plugin_reconfigure", {"name": "inference", "config": echo("m2")})
    assert (await admin.call("node/inference", "info"))["base_model"] == "m2"
    assert "last_error" not in (state(await system(admin, "plugins", None), "inference") or {})
    await system(op, "plugin_remove", {"name": "files"})
    with pytest.raises(InvalidRequest, match="not running here"):
        await system(op, "plugin_restart", {"name": "files"})
    await system(op, "plugin_restart", {"name": "inference"})
    assert (shared / ".." / REMOTE_CHANGES).exists() is False  # kept in the agent's own dir
    kept = node.host.data_dir / REMOTE_CHANGES
    assert kept.stat().st_mode & 0o777 == 0o600  # configs may hold secrets

    # Restarted from its config file (inference m1, no files): what it was told wins.
    await node.stop()
    node = await AgentRuntime.start(
        node.host.data_dir, [broker.url], {"inference": echo("m1")}, keys=node.agent.keys
    )
    try:
        assert (await admin.call("node/inference", "info"))["base_model"] == "m2"
        assert state(await system(admin, "plugins", None), "files") is None
    finally:
        await node.stop()


async def test_atoll_plugins_acts_as_the_operator(
    make_agent: AgentFactory, operator: OperatorStore, broker: BrokerServer, tmp_path: Path
) -> None:
    await make_agent("node", roles=("inference",), plugins={"inference": echo("m1")})
    admin = (await make_agent("adm", roles=("admin",))).agent
    section = tmp_path / "inference.toml"
    section.write_text('backend = "echo"\n[echo]\nmodel = "m3"\n')

    async def atoll(*args: str) -> tuple[int, str]:
        where = ["-d", str(operator.root), "--tenant", "acme", "--broker", broker.url]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "atoll.cli", "plugins", *args, *where,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        return proc.returncode or 0, out.decode()

    code, out = await atoll("reconfigure", "node", "inference", "--config", str(section))
    assert code == 0, out
    inference = state(json.loads(out), "inference")
    assert inference is not None and inference["state"] == "running"
    assert (await admin.call("node/inference", "info"))["base_model"] == "m3"
    code, out = await atoll("list", "node")
    assert code == 0 and state(json.loads(out), "system") is not None
    code, out = await atoll("add", "node", "files", "--set", '{"dirs": "x"}')
    assert code == 1 and "plugin 'files' config" in out
