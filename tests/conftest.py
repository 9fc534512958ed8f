"""Shared fixtures: a real operator data dir, a real broker on a loopback port, real agents."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection, connect

from atoll.agent.identity import AgentKeys
from atoll.agent.runtime import AgentRuntime
from atoll.broker.router import Session
from atoll.broker.server import BrokerServer
from atoll.plugins.storage.plugin import StoragePlugin
from atoll.protocol.frames import Frame, decode_message
from atoll.protocol.handshake import ClientHandshake
from atoll.tenancy.operator import OperatorStore


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


AgentFactory = Callable[..., Awaitable[AgentRuntime]]


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


async def raw_session(
    operator: OperatorStore,
    broker: BrokerServer,
    name: str,
    max_size: int | None = None,
    roles: tuple[str, ...] = ("agent",),
) -> ClientConnection:
    """A hand-driven authenticated websocket, to send frames no real agent would."""
    keys = AgentKeys.issue(operator, "acme", name, list(roles))
    ws = await connect(broker.url, compression=None, max_size=max_size)
    hs = ClientHandshake(keys.key, keys.credential, keys.operator_pub)
    (hello,) = decode_message(await ws.recv())
    await ws.send(hs.receive_hello(hello))
    (welcome,) = decode_message(await ws.recv())
    hs.receive_welcome(welcome)
    return ws


Tap = Callable[[Session, Frame], Frame | None]


def intercept(broker: BrokerServer, tap: Tap) -> Callable[[], None]:
    """Play a compromised broker: ``tap`` sees every frame an agent sends before the router
    does, and a Frame it returns is routed instead. Returns the undo."""
    router = broker.router
    route = router.handle

    def handle(session: Session, frame: Frame) -> None:
        route(session, tap(session, frame) or frame)

    router.handle = handle
    return lambda: delattr(router, "handle")


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``check`` until true; bounded in time."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not check():
        if loop.time() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


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


class Island:
    """A gateway agent and echo inference agents on the test broker, with the admin API key."""

    def __init__(self, make_agent: AgentFactory) -> None:
        self.make_agent = make_agent
        self.nodes: dict[str, AgentRuntime] = {}
        self.gateway: AgentRuntime | None = None

    async def add_node(
        self, name: str, model: str = "echo", delay: float = 0.0, **options
    ) -> AgentRuntime:
        config = {"backend": "echo", "echo": {"model": model, "delay": delay}}
        options = {"heartbeat": 0.2, "metrics_interval": 0.5} | options
        rt = await self.make_agent(
            name, roles=("inference",), plugins={"inference": config}, **options
        )
        self.nodes[name] = rt
        return rt

    async def start_gateway(self, **config) -> Island:
        gateway = {"listen": "127.0.0.1:0"} | config
        self.gateway = await self.make_agent(
            "gw",
            roles=("gateway",),
            plugins={"gateway": gateway},
            heartbeat=0.2,
            metrics_interval=0.5,
        )
        return self

    @property
    def plugin(self):
        assert self.gateway is not None
        return self.gateway.host.plugins["gateway"]

    @property
    def url(self) -> str:
        return self.plugin.url

    @property
    def accounts(self):
        return self.plugin.accounts

    @property
    def admin_key(self) -> str:
        return (self.plugin.ctx.data_dir / "admin-key").read_text()

    def key(self, user: str, project: str | None = None, **options) -> str:
        """A fresh API key for ``user`` (created, with the user, if needed)."""
        if user not in {u.name for u in self.accounts.list_users()}:
            self.accounts.create_user(user, actor="test")
        return self.accounts.create_key(user, project, actor="test", **options)[1]

    async def models_seen(self, model: str, timeout: float = 5.0) -> None:
        """Until the gateway's discovery shows a node serving ``model``."""
        await eventually(lambda: model in self.plugin.gateway.base_models(), timeout)


async def start_storage(
    make_agent: AgentFactory, name: str = "store", **config: object
) -> tuple[AgentRuntime, StoragePlugin]:
    """An agent with a storage plugin (``config`` its section); (its runtime, the plugin)."""
    rt = await make_agent(name, roles=("storage",))  # only storage announces adapters
    plugin = StoragePlugin()
    await rt.host.add("storage", config, plugin=plugin)
    return rt, plugin


async def training_island(make_agent: AgentFactory, tmp_path: Path) -> Island:
    """Storage, a training queue with its trainer, an inference node serving a tiny random
    model ("tiny-llama") and a gateway: the whole fine-tuning loop, each part an agent."""
    from tiny_models import build_tiny_model

    base = build_tiny_model(tmp_path / "tiny-llama")
    await make_agent("store", roles=("storage",), plugins={"storage": {}}, heartbeat=0.2)
    trainer = {
        "mode": "both",
        "device": "cpu",
        "heartbeat": 0.3,
        "poll": 0.5,
        "models": {"tiny-llama": str(base)},  # the overlay's name for the base model
        "model_cache": str(tmp_path / "models"),
    }
    await make_agent("trainer", roles=("training",), plugins={"training": trainer}, heartbeat=0.2)
    local = {"model": str(base), "embeddings": False}
    await make_agent(
        "gpu", roles=("inference",), plugins={"inference": {"local": local}}, heartbeat=0.2
    )
    isl = Island(make_agent)
    await (await isl.start_gateway()).models_seen("tiny-llama")
    await eventually(lambda: bool(isl.plugin.gateway.watch.discovery.select(plugin="training")))
    return isl


@pytest.fixture
async def gw_island(make_agent: AgentFactory) -> Island:
    """Two echo inference nodes (model "echo") and a started gateway."""
    isl = Island(make_agent)
    await isl.add_node("gpu1")
    await isl.add_node("gpu2")
    await isl.start_gateway()
    await isl.models_seen("echo")
    return isl
