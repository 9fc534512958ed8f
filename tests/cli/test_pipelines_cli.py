"""``atoll apply FILE`` and ``atoll pipelines list|status|diff|delete`` against a real broker, a
controller and an echo inference node: the commands find the active controller themselves, a
malformed file is refused before anything is sent. The plugin's command apps run in-process
(a worker thread: each command runs its own event loop)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import typer
from typer.testing import CliRunner, Result

from atoll.broker.server import BrokerServer
from atoll.plugins.controller import commands
from atoll.tenancy.operator import OperatorStore
from support.overlay import AgentFactory, eventually

PIPELINE = """\
name: llm
services:
  inf:
    plugin: inference
    replicas: all
    where: {labels: {gpu: "true"}}
    config: {backend: echo, echo: {model: MODEL}}
"""


async def test_apply_and_pipelines_commands(
    make_agent: AgentFactory, operator: OperatorStore, broker: BrokerServer, tmp_path: Path
) -> None:
    ctl = await make_agent(
        "ctl",
        roles=("controller",),
        labels={"gpu": "true"},  # it places on its own agent too (the island pipeline does)
        plugins={"controller": {"interval": 0.2}},
        heartbeat=0.2,
    )
    node = await make_agent("n1", roles=("inference",), labels={"gpu": "true"}, heartbeat=0.2)
    app = typer.Typer()
    app.add_typer(commands.apply, name="apply")
    app.add_typer(commands.pipelines, name="pipelines")
    target = ["-d", str(operator.root), "--tenant", "acme", "--broker", broker.url]

    async def atoll(*args: str) -> Result:
        run = CliRunner().invoke
        return await asyncio.wait_for(asyncio.to_thread(run, app, [*args, *target]), 60)

    spec = tmp_path / "llm.yaml"
    spec.write_text(PIPELINE.replace("MODEL", "m1"))
    for _ in range(50):  # until the controller sees itself in discovery
        result = await atoll("apply", str(spec))
        if result.exit_code == 0:
            break
        await asyncio.sleep(0.1)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["revision"] == 1

    def serves() -> str | None:
        """The model both agents serve (None: neither does)."""
        models = set()
        for rt in (ctl, node):
            plugin = rt.host.plugins.get("inference")
            models.add(None if plugin is None else str(plugin.ctx.config["echo"]["model"]))
        return models.pop() if len(models) == 1 else "(differ)"

    await eventually(lambda: serves() == "m1", 10)
    result = await atoll("pipelines", "list")
    assert result.exit_code == 0 and "llm" in result.output and "inference" in result.output
    result = await atoll("pipelines", "status", "llm")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["services"][0]["agents"] == ["ctl", "n1"]

    changed = tmp_path / "llm2.yaml"
    changed.write_text(PIPELINE.replace("MODEL", "m2"))
    result = await atoll("pipelines", "diff", str(changed))
    assert result.exit_code == 0, result.output
    (service,) = json.loads(result.output)["services"]
    assert (service["change"], service["fields"]) == ("changed", ["config"])

    bad = tmp_path / "bad.yaml"
    bad.write_text(PIPELINE.replace("where:", "wehre:"))
    result = await atoll("apply", str(bad))
    assert result.exit_code == 1 and "services.inf.wehre: Extra inputs" in result.output

    result = await atoll("pipelines", "delete", "llm")
    assert result.exit_code == 0 and json.loads(result.output)["deleting"] is True
    await eventually(lambda: serves() is None, 10)
