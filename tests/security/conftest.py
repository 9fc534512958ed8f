"""The security tests' own fixture: two brokers meshed, for what must hold across a mesh."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from atoll.broker.identity import issue_broker_dir
from atoll.broker.server import BrokerServer
from atoll.tenancy.operator import OperatorStore
from support.overlay import eventually


async def start_broker(op: OperatorStore, tmp: Path, name: str, peers: list[str]) -> BrokerServer:
    d = tmp / name
    issue_broker_dir(op, d, name)
    server = BrokerServer.from_data_dir(d, peers=peers, mesh_refresh=0.5)
    return await server.start("127.0.0.1", 0)


@pytest.fixture
async def mesh(
    operator: OperatorStore, tmp_path: Path
) -> AsyncIterator[tuple[BrokerServer, BrokerServer]]:
    """Brokers b1 and b2, linked."""
    b1 = await start_broker(operator, tmp_path, "b1", [])
    b2 = await start_broker(operator, tmp_path, "b2", [b1.url])
    await eventually(lambda: bool(b1.mesh.state.next_hops()) and bool(b2.mesh.state.next_hops()))
    yield b1, b2
    for b in (b2, b1):
        await b.stop()
