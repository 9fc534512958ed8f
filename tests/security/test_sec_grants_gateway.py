"""A grant end to end through the gateway: acme's gateway (broker b1) serves a chat from
globex's echo node (broker b2) that an operator-signed grant exports to acme, for one base
model; the openai SDK drives it, acme's ledger records it, globex's node labels the usage with
acme, and a revocation stops it at once."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from atoll.agent.errors import Forbidden
from atoll.agent.identity import AgentKeys
from atoll.agent.runtime import AgentRuntime
from atoll.tenancy.operator import OperatorStore
from support.island import Island, models
from support.overlay import AgentFactory, eventually

PROMPT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello across tenants"}]


def factory(op: OperatorStore, tmp: Path, tenant: str, url: str, started: list) -> AgentFactory:
    async def make(name: str, roles: tuple[str, ...] = ("agent",), **options) -> AgentRuntime:
        keys = AgentKeys.issue(op, tenant, name, list(roles))
        rt = await AgentRuntime.start(tmp / tenant / name, [url], keys=keys, **options)
        started.append(rt)
        return rt

    return make


@pytest.fixture
async def islands(operator, mesh, tmp_path):
    b1, b2 = mesh
    started: list[AgentRuntime] = []
    acme = Island(factory(operator, tmp_path, "acme", b1.url, started))
    globex = Island(factory(operator, tmp_path, "globex", b2.url, started))
    await acme.add_node("own", model="acme-echo")
    await acme.start_gateway()
    await globex.add_node("node", model="shared-echo")
    await globex.add_node("other", model="private-echo")
    admin = await factory(operator, tmp_path, "globex", b2.url, started)("ops", ("admin",))
    yield acme, globex, admin.agent, (b1, b2)
    for rt in reversed(started):
        await rt.stop()


def client(isl: Island, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{isl.url}/v1", api_key=key, max_retries=0)


async def test_chat_through_an_imported_node_then_revoked(islands, operator) -> None:
    acme, globex, admin, brokers = islands
    key = acme.key("alice")
    await acme.models_seen("acme-echo")
    assert "shared-echo" not in await models(acme, key)  # nothing imported yet
    grant = operator.grant(
        "globex", "acme", [{"plugin": "inference", "base_model": "shared-echo"}], ["gateway"], 600
    )
    await admin.send_grant(grant.blob)
    await admin.flush()
    await eventually(lambda: all(b.router.grants.linking("acme", "globex") for b in brokers))
    # The gateway sees only the exported node serving the granted base, under its tenant.
    assert await acme.plugin.imports.refresh() == ["node@globex"]
    assert "shared-echo" in await models(acme, key)
    assert "private-echo" not in await models(acme, key)

    reply = await client(acme, key).chat.completions.create(
        model="shared-echo", messages=PROMPT, max_tokens=4
    )
    assert reply.choices[0].message.content and reply.usage is not None
    # Usage is the importer's: its ledger records the request, the exporter labels it acme.
    rows = acme.accounts.usage_rows(key_id=acme.accounts.authenticate(key).key_id)
    assert [(r.model, r.status) for r in rows] == [("shared-echo", 200)]
    node = globex.nodes["node"].host.plugins["inference"]
    families = node.ctx.metrics.snapshot()
    (series,) = next(f["series"] for n, f in families.items() if n.endswith("imported_requests"))
    assert series["labels"] == {"tenant": "acme"} and series["value"] == 1

    # A node of another base refuses the grant's callers itself (brokers cannot see models).
    gateway = acme.gateway
    assert gateway is not None
    with pytest.raises(Forbidden, match="does not cover base model 'private-echo'"):
        await gateway.agent.call("other@globex/inference", "generate", {"prompt": "hi"}, timeout=5)

    operator_revocation = operator.revoke_grant(grant.id)
    await admin.send_grant(operator_revocation)
    await eventually(lambda: all(not b.router.grants.linking("acme", "globex") for b in brokers))
    with pytest.raises(openai.APIStatusError):
        await client(acme, key).chat.completions.create(
            model="shared-echo", messages=PROMPT, max_tokens=4
        )
    # Its own models are untouched.
    own = await client(acme, key).chat.completions.create(
        model="acme-echo", messages=PROMPT, max_tokens=4
    )
    assert own.choices[0].message.content


def imported_requests(isl: Island, node: str) -> float:
    families = isl.nodes[node].host.plugins["inference"].ctx.metrics.snapshot()
    found = [f["series"] for n, f in families.items() if n.endswith("imported_requests")]
    return sum(s["value"] for s in found[0]) if found else 0.0


async def test_own_nodes_first_unless_imports_are_preferred(islands, operator) -> None:
    acme, globex, admin, brokers = islands
    await acme.add_node("mine", model="shared-echo")  # acme serves the granted base itself
    grant = operator.grant("globex", "acme", [{"plugin": "inference"}], ["gateway"], 600)
    await admin.send_grant(grant.blob)
    await admin.flush()
    await eventually(lambda: all(b.router.grants.linking("acme", "globex") for b in brokers))
    await acme.plugin.imports.refresh()
    await acme.models_seen("shared-echo")
    key = acme.key("bob")

    async def chat() -> None:
        await client(acme, key).chat.completions.create(
            model="shared-echo", messages=PROMPT, max_tokens=2
        )

    for _ in range(3):
        await chat()
    assert imported_requests(globex, "node") == 0  # its own node served every one
    acme.plugin.gateway.router.prefer_imported = True  # the gateway's imports = "prefer"
    for _ in range(3):
        await chat()
    assert imported_requests(globex, "node") == 3
