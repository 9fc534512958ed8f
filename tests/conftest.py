"""Shared fixtures: a real operator data dir, a real broker on a loopback port, real agents.

The helpers they are built on, and that tests import, are in ``support/``."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from playwright.async_api import Browser

from atoll.agent.identity import AgentKeys
from atoll.agent.runtime import AgentRuntime
from atoll.broker.server import BrokerServer
from atoll.tenancy.operator import OperatorStore
from support import oidc, postgres
from support.browser import chromium
from support.island import Island
from support.overlay import AgentFactory


@pytest.fixture
def operator(tmp_path: Path) -> OperatorStore:
    op = OperatorStore(tmp_path / "operator")
    op.init()
    op.create_tenant("acme")
    op.create_tenant("globex")
    return op


@pytest.fixture
async def broker(operator: OperatorStore) -> AsyncIterator[BrokerServer]:
    server = BrokerServer.from_data_dir(operator.root)
    await server.start("127.0.0.1", 0)
    yield server
    await server.stop()


@pytest.fixture
async def make_agent(
    operator: OperatorStore, broker: BrokerServer, tmp_path: Path
) -> AsyncIterator[AgentFactory]:
    started: list[AgentRuntime] = []

    async def make(
        name: str,
        tenant: str = "acme",
        roles: tuple[str, ...] = ("agent",),
        brokers: list[str] | None = None,
        labels: dict[str, str] | None = None,
        **options,
    ) -> AgentRuntime:
        keys = AgentKeys.issue(operator, tenant, name, list(roles), labels=labels)
        rt = await AgentRuntime.start(
            tmp_path / "agents" / tenant / name,
            brokers or [broker.url],
            keys=keys,
            **options,
        )
        started.append(rt)
        return rt

    yield make
    for rt in reversed(started):
        await rt.stop()


@pytest.fixture(scope="session")
def embedded_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, float]:
    """The embedded SmolLM2 converted once per test run: (its directory, a planted leftover of a
    "crashed" conversion, seconds the conversion took)."""
    from atoll.plugins.basemodels import cache_name, embedded_gguf, resolve_model

    cache = tmp_path_factory.mktemp("model-cache")
    leftover = cache / f".{cache_name(embedded_gguf())}.tmp-crashed"  # from a "crashed" run
    leftover.mkdir()
    (leftover / "config.json").write_text("{}")
    started = time.monotonic()
    entry = resolve_model("embedded", cache)
    return entry, leftover, time.monotonic() - started


@pytest.fixture
async def gw_island(make_agent: AgentFactory) -> Island:
    """Two echo inference nodes (model "echo") and a started gateway."""
    isl = Island(make_agent)
    await isl.add_node("gpu1")
    await isl.add_node("gpu2")
    await isl.start_gateway()
    await isl.models_seen("echo")
    return isl


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[postgres.Cluster]:
    """One throwaway PostgreSQL cluster for the whole run (a database per test in it)."""
    with postgres.cluster() as started:
        yield started


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=postgres.needed)])
def accounts_db(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    """Where a test's accounts store lives, once per dialect: a SQLite file's path, or a fresh
    PostgreSQL database's URL."""
    if request.param == "sqlite":
        return tmp_path / "accounts.sqlite"
    return request.getfixturevalue("pg_cluster").new_database()


@pytest.fixture
def pg_database(pg_cluster: postgres.Cluster) -> str:
    """A fresh PostgreSQL database's URL."""
    return pg_cluster.new_database()


@pytest.fixture
def oidc_provider() -> Iterator[oidc.Provider]:
    """A real OpenID Connect provider on a loopback port (single sign-on tests)."""
    with oidc.provider() as started:
        yield started


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """Debian's chromium, headless (web UI tests)."""
    async with chromium() as started:
        yield started
