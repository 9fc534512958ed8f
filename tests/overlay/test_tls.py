"""wss:// between agents and a broker, with a private CA; an agent that does not trust the
broker's certificate is refused before any credential leaves it."""

from __future__ import annotations

from pathlib import Path

import pytest

from atoll.agent.errors import ConnectionLost
from atoll.agent.identity import AgentKeys
from atoll.agent.node import Agent
from atoll.broker.server import BrokerServer
from atoll.tenancy.permissions import ANY
from atoll.transport import client_tls, server_tls
from support.net import self_signed


async def test_agents_over_wss(tmp_path: Path, operator) -> None:
    cert, key = self_signed(tmp_path)
    server = BrokerServer.from_data_dir(operator.root, ssl_context=server_tls(cert, key))
    await server.start()
    assert server.url.startswith("wss://")
    agents = []
    try:
        for name in ("alpha", "beta"):
            keys = AgentKeys.issue(operator, "acme", name, ["agent"])
            agents.append(await Agent(keys, [server.url], ssl_context=client_tls(cert)).start(5))
        alpha = agents[0]

        async def echo(params, call):
            return params

        agents[1].handle("t", "echo", echo, ANY)
        assert await alpha.call("beta/t", "echo", "over tls") == "over tls"

        untrusting = Agent(
            AgentKeys.issue(operator, "acme", "gamma", ["agent"]),
            [server.url],
            ssl_context=client_tls(None),
        )
        agents.append(untrusting)
        with pytest.raises(ConnectionLost, match="CERTIFICATE_VERIFY_FAILED"):
            await untrusting.start(wait=1.5)
    finally:
        for a in agents:
            await a.stop()
        await server.stop()
