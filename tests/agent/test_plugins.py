"""The plugin host: entry points, lifecycle, per-plugin config and data dir, RPC by address."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest

from atoll.agent.errors import Forbidden, NoSuchMethod
from atoll.agent.node import Agent, Overlay
from atoll.agent.plugins import Plugin, PluginContext, available_plugins, rpc
from atoll.protocol.session import CallInfo
from atoll.tenancy.permissions import ANY


class Counter(Plugin):
    name = "counter"

    async def start(self, ctx) -> None:
        await super().start(ctx)
        self.step = int(ctx.config.get("step", 1))
        self.file = ctx.data_dir / "count"
        self.count = int(self.file.read_text()) if self.file.exists() else 0

    async def stop(self) -> None:
        self.file.write_text(str(self.count))

    def status(self) -> dict[str, Any]:
        return {"count": self.count}

    @rpc(roles=ANY)
    async def bump(self, params: Any, call: CallInfo) -> int:
        self.count += self.step
        await self.ctx.publish(f"app.counter.{self.ctx.identity.name}", self.count)
        return self.count

    @rpc("reset", roles=("admin",))  # the agent checks: the handler runs for admins only
    async def reset_(self, params: Any, call: CallInfo) -> int:
        assert call.caller.has_role("admin")
        self.count = 0
        return 0


@pytest.mark.parametrize("impl", [Agent, PluginContext])
def test_agent_and_plugin_context_are_both_an_overlay(impl: type) -> None:
    """Helpers typed ``Overlay`` take either (no type checker runs here): each method takes the
    protocol's parameters in order, with the same defaults; extras (``src``) come after."""
    for name in ("call", "open_stream", "publish", "subscribe", "wait_connected"):
        want = list(inspect.signature(getattr(Overlay, name)).parameters.values())
        have = list(inspect.signature(getattr(impl, name)).parameters.values())
        assert [(p.name, p.default) for p in have[: len(want)]] == [
            (p.name, p.default) for p in want
        ], f"{impl.__name__}.{name}"
        assert all(p.default is not inspect.Parameter.empty for p in have[len(want) :])


def test_system_plugin_is_an_entry_point() -> None:
    assert available_plugins()["system"].value == "atoll.agent.system_plugin:SystemPlugin"


async def test_plugin_lifecycle_config_and_roles(make_agent) -> None:
    node = await make_agent("node")
    user = await make_agent("user")
    admin = await make_agent("boss", roles=("admin",))
    await node.host.add("counter", {"step": 5}, plugin=Counter())
    sub = await user.agent.subscribe("app.counter.*")
    await user.agent.flush()
    assert await user.agent.call("node/counter", "bump") == 5
    pub = await sub.next(timeout=5)
    assert (pub.subject, pub.src, pub.data) == ("app.counter.node", "node/counter", 5)
    with pytest.raises(Forbidden, match=r"'user' .* needs one of the roles admin"):
        await user.agent.call("node/counter", "reset")
    assert await admin.agent.call("node/counter", "reset") == 0
    with pytest.raises(Forbidden, match="needs one of the roles admin, operator"):
        await user.agent.call("node", "plugins")
    statuses = await admin.agent.call("node", "plugins")
    assert {"name": "counter", "state": "running", "count": 0} in statuses
    await user.agent.call("node/counter", "bump")
    await node.host.remove("counter")
    with pytest.raises(NoSuchMethod):
        await user.agent.call("node/counter", "bump")
    # State kept in the plugin's own data dir survives a restart of the plugin.
    again = await node.host.add("counter", {"step": 1}, plugin=Counter())
    assert again.count == 5
    with pytest.raises(KeyError, match="no plugin 'nope'"):
        await node.host.add("nope")


async def test_bad_plugin_config_is_refused_clearly(make_agent) -> None:
    from pydantic import ValidationError

    node = await make_agent("node")
    with pytest.raises(ValidationError, match="dirs"):
        await node.host.add("files", {"dirs": "not-a-list"})
    with pytest.raises(ValidationError, match="is not host:port"):
        await node.host.add("tunnel", {"allow": ["nohostport"]})
    with pytest.raises(ValidationError, match="AGENT:HOST:PORT"):
        await node.host.add("tunnel", {"listen": [{"listen": "127.0.0.1:1", "to": "x"}]})
    statuses = node.host.statuses()
    failed = {s["name"]: s for s in statuses if s["state"] == "failed"}
    assert failed["tunnel"]["error"].startswith("ValidationError")
    assert "files" in failed and (await node.agent.call("node", "ping"))["pong"] is True
    await node.host.add("tunnel", {"allow": ["127.0.0.1:*"]})  # fixed config: it loads
    assert "tunnel" not in node.host.errors


async def test_enabled_is_the_hosts_switch_for_every_plugin(make_agent) -> None:
    node = await make_agent(
        "node",
        plugins={
            "inference": {"enabled": True, "backend": "echo"},  # its model has no `enabled`
            "files": {"enabled": False, "dirs": []},
        },
    )
    assert node.host.errors == {}
    assert set(node.host.plugins) == {"system", "inference"}


async def test_relative_paths_in_plugin_sections_are_relative_to_the_config_file(
    make_agent, tmp_path: Path
) -> None:
    """As `atoll agent run` starts them: `[agent]` paths were always relative to the file; the
    plugins' own path settings are too, whatever the working directory."""
    conf = tmp_path / "etc" / "atoll"
    elsewhere = tmp_path / "elsewhere"
    node = await make_agent(
        "node",
        config_dir=conf,
        plugins={
            "files": {"dirs": ["shared", str(elsewhere)]},
            "storage": {"root": "objects"},
            "inference": {"backend": "echo", "adapter_dirs": ["adapters", "~/models"]},
        },
    )
    assert node.host.errors == {}
    files, storage, inference = (node.host.plugins[n] for n in ("files", "storage", "inference"))
    assert files.roots == [conf / "shared", elsewhere]  # absolute paths stay as they are
    assert (conf / "shared").is_dir() and elsewhere.is_dir()
    assert storage.store.inner.root == conf / "objects"  # under the sealing layer
    assert inference.adapter_dirs == [conf / "adapters", Path("~/models").expanduser()]


def test_model_specs_and_paths_of_backend_and_trainer_sections_follow_the_config_file(
    tmp_path: Path,
) -> None:
    from atoll.plugins.inference.local_backend import LocalConfig
    from atoll.plugins.inference.lorax_backend import LoraxConfig
    from atoll.plugins.training.plugin import TrainingConfig

    where = {"config_dir": tmp_path}
    assert LocalConfig.model_validate({}, context=where).model == "embedded"
    local = LocalConfig.model_validate({"model": "models/tiny.gguf"}, context=where)
    assert local.model == str(tmp_path / "models" / "tiny.gguf")
    lorax = LoraxConfig.model_validate(
        {"url": "http://127.0.0.1:1", "adapter_source": "storage", "adapter_dir": "lorax"},
        context=where,
    )
    assert lorax.adapter_dir == tmp_path / "lorax"
    training = TrainingConfig.model_validate(
        {"workdir": "work", "models": {"a": "embedded", "b": "/srv/m", "c": "m/c"}},
        context=where,
    )
    assert training.workdir == tmp_path / "work" and training.model_cache is None
    assert training.models == {"a": "embedded", "b": "/srv/m", "c": str(tmp_path / "m" / "c")}
    # Without a config file (plugins set up in code, as `atoll up` does) nothing is rewritten.
    assert LocalConfig.model_validate({"model": "models/tiny.gguf"}).model == "models/tiny.gguf"
