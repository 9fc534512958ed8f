"""The gateway's budget, usage and self-service commands, run in-process (typer's runner, in a
thread beside the test's event loop) against a real island: admin ones over the overlay as a
tenant admin, `atoll me` over HTTP with the user's own key."""

from __future__ import annotations

import asyncio
import json

import httpx
from typer import Typer
from typer.testing import CliRunner, Result

from atoll.broker.server import BrokerServer
from atoll.plugins.gateway.commands import budgets, usage
from atoll.plugins.gateway.me_commands import me
from atoll.tenancy.operator import OperatorStore
from support.island import Island
from support.overlay import AgentFactory

RUNNER = CliRunner()
ATOLL = Typer()  # as `atoll` adds the entry points' apps (a one-command app stays a group)
ATOLL.add_typer(usage, name="usage")


async def run(app: Typer, *args: str, env: dict[str, str] | None = None) -> Result:
    return await asyncio.to_thread(RUNNER.invoke, app, list(args), env=env)


async def test_budgets_usage_and_me_from_the_cli(
    make_agent: AgentFactory, operator: OperatorStore, broker: BrokerServer
) -> None:
    isl = Island(make_agent)
    await isl.add_node("gpu1", model="echo")
    await (await isl.start_gateway()).models_seen("echo")
    key = isl.key("alice")
    target = [
        "-d",
        str(operator.root),
        "--tenant",
        "acme",
        "--broker",
        broker.url,
        "--gateway",
        "gw",
    ]
    made = await run(
        budgets, "set", "--user", "alice", "--tokens", "50", "--period", "daily", *target
    )
    assert made.exit_code == 0, made.output
    assert json.loads(made.stdout)["id"] == "user:alice:tokens:daily"
    both = await run(budgets, "set", "--user", "alice", "--project", "x", "--tokens", "5", *target)
    assert both.exit_code != 0 and "exactly one" in both.output
    async with httpx.AsyncClient(base_url=isl.url, timeout=30) as http:
        body = {"model": "echo", "prompt": "a b c", "max_tokens": 3}
        reply = await http.post(
            "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        )
        assert reply.status_code == 200, reply.text
    listed = json.loads((await run(budgets, "list", "--user", "alice", *target)).stdout)
    assert [(b["id"], b["spent"]) for b in listed] == [("user:alice:tokens:daily", 6)]
    report = await run(
        ATOLL, "usage", "report", "--by", "user,model", "--since", "1d", "--csv", *target
    )
    assert report.exit_code == 0, report.output
    assert (
        report.stdout.splitlines()[0] == "user,model,requests,prompt_tokens,completion_tokens,cost"
    )
    assert report.stdout.splitlines()[1].startswith("alice,echo,1,3,3,")
    env = {"ATOLL_GATEWAY_URL": isl.url, "ATOLL_API_KEY": key}
    mine = json.loads((await run(me, "budgets", env=env)).stdout)
    assert mine[0]["remaining"] == 44
    new_key = (await run(me, "create-key", "--name", "cli", env=env)).stdout.strip()
    assert new_key.startswith("atk_")
    keys = json.loads((await run(me, "keys", env=env)).stdout)
    assert sorted(k["name"] for k in keys) == ["", "cli"]
    own = json.loads((await run(me, "usage", env=env)).stdout)
    assert own["groups"][0]["model"] == "echo" and own["requests"] == 1
    cli_id = next(k["key_id"] for k in keys if k["name"] == "cli")
    revoked = json.loads((await run(me, "revoke-key", cli_id, env=env)).stdout)
    assert revoked["state"] == "revoked"
    other = await run(me, "revoke-key", "k_00000000", env=env)
    assert other.exit_code == 1 and "404" in other.output
    removed = await run(budgets, "remove", "user:alice:tokens:daily", *target)
    assert removed.exit_code == 0, removed.output
