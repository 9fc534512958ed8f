"""The example deployments in configs/: every file loads, and each plugin section passes the
model its plugin validates it with; the standalone broker, the two-broker mesh and the island run
from their files with `atoll agent run`, the LoRAX pair, the trainer and the S3 storage node start
from theirs in-process (ports, data dirs and endpoints overridden as ``ATOLL_<SECTION>__<KEY>``);
a broken copy is refused with an error naming the key."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import boto3
import httpx
import pytest
from pydantic import BaseModel

from atoll.agent.config import AtollConfig, load_broker_config, load_config
from atoll.agent.errors import NoResponder
from atoll.agent.files import FilesConfig
from atoll.agent.metrics import MetricsRegistry
from atoll.agent.node import Agent
from atoll.agent.plugins import available_plugins
from atoll.agent.runtime import AgentRuntime
from atoll.agent.tunnel import TunnelConfig, TunnelPlugin
from atoll.broker.identity import issue_broker_dir
from atoll.broker.server import BrokerServer
from atoll.plugins.controller.plugin import ControllerConfig
from atoll.plugins.gateway.plugin import GatewayConfig
from atoll.plugins.inference.plugin import InferenceConfig, make_backend
from atoll.plugins.storage.contract.datasets import upload_dataset
from atoll.plugins.storage.plugin import StorageConfig
from atoll.plugins.training.plugin import TrainingConfig, TrainingPlugin
from atoll.tenancy.operator import OperatorStore
from support import REPO
from support.fake_lorax import FakeLorax
from support.net import ATOLL_CLI, free_port, moto_server
from support.overlay import AgentFactory

CONFIGS = REPO / "configs"
TENANT = "acme"

# What each example runs: (its plugins, whether it runs a broker). A new file needs a line here.
EXAMPLES: dict[str, tuple[set[str], bool]] = {
    "island.toml": ({"storage", "gateway", "training", "inference"}, True),
    "inference-gpu.toml": ({"inference"}, False),
    "lorax-host.toml": ({"tunnel"}, False),
    "inference-lorax.toml": ({"tunnel", "inference"}, False),
    "trainer.toml": ({"training"}, False),
    "storage-s3.toml": ({"storage"}, False),
    "mesh-a.toml": ({"storage"}, True),
    "mesh-b.toml": (set(), True),
}

# The model each plugin's start() validates its section with (kept in step with the installed
# plugins by test_examples_are_the_known_set).
MODELS: dict[str, type[BaseModel]] = {
    "files": FilesConfig,
    "tunnel": TunnelConfig,
    "inference": InferenceConfig,
    "storage": StorageConfig,
    "training": TrainingConfig,
    "gateway": GatewayConfig,
    "controller": ControllerConfig,
}
SECRET_NAMES = {"api_key", "api_token", "password", "secret", "token", "access_key", "secret_key"}


FROM_CONFIGS = {"config_dir": CONFIGS}  # relative plugin paths: as `agent run` reads these files


def validate_plugins(cfg: AtollConfig, data_dir: Path) -> dict[str, BaseModel]:
    """Each section AgentRuntime.start would start, through its plugin's model; the inference
    backend's own section through make_backend (which builds the backend, not starting it)."""
    out: dict[str, BaseModel] = {}
    for name, section in cfg.plugins.items():
        if name == "system" or not section.get("enabled", True):
            continue
        assert name in MODELS, f"no plugin {name!r}; installed: {', '.join(sorted(MODELS))}"
        own = {k: v for k, v in section.items() if k != "enabled"}  # the host's switch
        out[name] = model = MODELS[name].model_validate(own, context=FROM_CONFIGS)
        if isinstance(model, InferenceConfig):
            ctx = SimpleNamespace(
                data_dir=data_dir,
                metrics=MetricsRegistry(),
                settings=lambda m, raw: m.model_validate(raw, context=FROM_CONFIGS),
            )
            make_backend(model, ctx, None)  # type: ignore[arg-type]
    return out


def secret_keys(table: dict[str, Any]) -> list[str]:
    found = [k for k in table if k.lower() in SECRET_NAMES]
    return found + [k for v in table.values() if isinstance(v, dict) for k in secret_keys(v)]


BROKER = "broker.toml"  # the one standalone broker's file (`atoll broker --config`)


def test_examples_are_the_known_set() -> None:
    assert {p.name for p in CONFIGS.glob("*.toml")} == {*EXAMPLES, BROKER}
    assert set(MODELS) == set(available_plugins()) - {"system"}
    index = (CONFIGS / "README.md").read_text()
    assert all(f"`{name}`" in index for name in [*EXAMPLES, BROKER])
    configs = [load_config(CONFIGS / name, {}) for name in EXAMPLES]
    names = [c.agent.name for c in configs]  # one deployment on one machine: no clashes
    dirs = [c.agent.data_dir for c in configs]
    assert len(set(names)) == len(names) and len(set(dirs)) == len(dirs)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_loads_and_its_plugins_validate(name: str, tmp_path: Path) -> None:
    cfg = load_config(CONFIGS / name, {})  # as written: no environment overrides
    plugins, runs_broker = EXAMPLES[name]
    assert set(validate_plugins(cfg, tmp_path)) == plugins
    assert (cfg.broker is not None) == runs_broker
    # Loopback, data in the git-ignored data/ at the root, secrets from the environment only.
    assert cfg.agent.data_dir.is_relative_to(REPO / "data")
    urls = cfg.agent.brokers + (cfg.broker.peers if cfg.broker else [])
    assert all(u.startswith("ws://127.0.0.1:") for u in urls), urls
    if cfg.broker is not None:
        assert cfg.broker.listen.startswith("127.0.0.1:")
    assert secret_keys(cfg.plugins) == []


def test_broker_file_loads() -> None:
    b = load_broker_config(CONFIGS / BROKER, {})
    assert b.data_dir is not None and b.data_dir.is_relative_to(REPO / "data")
    assert b.listen.startswith("127.0.0.1:") and b.peers == [] and b.tls_cert is None
    with pytest.raises(ValueError, match="agent"):  # an agent's file is not a broker's
        load_broker_config(CONFIGS / "mesh-a.toml", {})


@pytest.mark.parametrize(
    ("name", "old", "new", "expected"),
    [
        ("broker.toml", "listen = ", "listne = ", ["broker.listne", "Extra inputs"]),
        ("island.toml", 'brokers = ["ws:', 'brokers = ["http:', ["must start with ws://"]),
        ("island.toml", 'listen = "127.0.0.1:8000"', 'listen = "8000"', ["listen", "HOST:PORT"]),
        ("inference-gpu.toml", "max_batch = 16", "max_bach = 16", ["max_bach", "Extra inputs"]),
        (
            "inference-gpu.toml",
            "max_batch = 16",
            "max_batch = 0",
            ["max_batch", "greater than or equal"],
        ),
        ("trainer.toml", 'mode = "trainer"', 'mode = "trainee"', ["mode", "'queue'"]),
        (
            "storage-s3.toml",
            'secret_key_env = "ATOLL_S3_SECRET"',
            'secret_key = "hunter2"',
            ["credentials never go in config files"],
        ),
    ],
)
def test_a_broken_example_is_refused_naming_the_key(
    name: str, old: str, new: str, expected: list[str], tmp_path: Path
) -> None:
    text = (CONFIGS / name).read_text()
    assert text.count(old) == 1, f"{old!r} is not once in {name}"
    broken = tmp_path / name
    broken.write_text(text.replace(old, new))
    with pytest.raises(ValueError) as refused:  # pydantic's and TOML's errors are ValueErrors
        if name == BROKER:
            load_broker_config(broken, {})
        else:
            validate_plugins(load_config(broken, {}), tmp_path)
    assert all(part in str(refused.value) for part in expected), str(refused.value)


# --- started from their files ------------------------------------------------------------------


def urls(*ports: int) -> str:
    """A TOML (and JSON) list of broker URLs, for an ATOLL_..._BROKERS/PEERS override."""
    return json.dumps([f"ws://127.0.0.1:{p}" for p in ports])


def broker_env(data_dir: Path, port: int, peer: int | None = None) -> dict[str, str]:
    """Overrides for an example that runs a broker: its data dir, listen port, peers and its own
    broker first in its list; no mDNS."""
    return {
        "ATOLL_AGENT__DATA_DIR": str(data_dir),
        "ATOLL_AGENT__BROKERS": urls(port) if peer is None else urls(port, peer),
        "ATOLL_BROKER__LISTEN": f"127.0.0.1:{port}",
        "ATOLL_BROKER__PEERS": urls() if peer is None else urls(peer),
        "ATOLL_BROKER__ADVERTISE": "false",
    }


async def issue(op: OperatorStore, data_dir: Path, name: str, roles: list[str]) -> None:
    """The identities an example that runs its own broker needs, made as its header says:
    `atoll agent issue ... --with-broker`."""
    proc = await asyncio.create_subprocess_exec(
        *ATOLL_CLI, "agent", "issue", "-d", str(op.root), "--tenant", TENANT, "--name", name,
        *(f"--role={r}" for r in roles), "--with-broker", "--out", str(data_dir),
        stderr=subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()


@pytest.fixture
async def processes() -> AsyncIterator[list[asyncio.subprocess.Process]]:
    running: list[asyncio.subprocess.Process] = []
    yield running
    for proc in running:
        if proc.returncode is None:
            proc.terminate()  # `agent run` stops its plugins, agent and broker on SIGTERM
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def run_cli(
    args: list[str], env: dict[str, str], log: Path, running: list[asyncio.subprocess.Process]
) -> str:
    """`atoll ARGS` with ``env`` overrides, until it says it is connected or listening."""
    with log.open("w") as out:
        proc = await asyncio.create_subprocess_exec(
            *ATOLL_CLI, *args, env=os.environ | env, stdout=out, stderr=subprocess.STDOUT
        )
    running.append(proc)
    for _ in range(300):  # bounded: 30 s
        text = log.read_text()
        if "connected to" in text or ("listening on" in text and args[0] == "broker"):
            return text
        if proc.returncode is not None:
            break
        await asyncio.sleep(0.1)
    raise AssertionError(f"atoll {' '.join(args)} did not start:\n{log.read_text()}")


async def agent_run(
    name: str, env: dict[str, str], log: Path, running: list[asyncio.subprocess.Process]
) -> str:
    """`atoll agent run --config configs/NAME` with ``env`` overrides, until it is connected."""
    return await run_cli(["agent", "run", "--config", str(CONFIGS / name)], env, log, running)


async def call_when_reachable(agent: Agent, address: str, method: str, params: Any = None) -> Any:
    """A call that may have to wait for the mesh to advertise ``address`` (bounded: 10 s)."""
    for _ in range(100):
        try:
            return await agent.call(address, method, params, timeout=10)  # a loaded CI machine
        except NoResponder:
            await asyncio.sleep(0.1)
    raise AssertionError(f"{address} unreachable for 10 s")


async def from_file(
    make_agent: AgentFactory, name: str, env: dict[str, str], *roles: str
) -> AgentRuntime:
    """The agent of configs/NAME with its plugins, as `atoll agent run` starts it (in-process)."""
    cfg = load_config(CONFIGS / name, env)
    rt = await make_agent(
        cfg.agent.name,
        roles=roles,
        brokers=cfg.agent.brokers,
        plugins=cfg.plugins,
        heartbeat=cfg.agent.heartbeat,
        metrics_interval=cfg.agent.metrics_interval,
        call_timeout=cfg.agent.call_timeout,
        config_dir=CONFIGS,
    )
    assert rt.host.errors == {}
    assert set(rt.host.plugins) == {"system", *cfg.plugins}
    return rt


async def test_standalone_broker_from_its_file(
    processes, operator: OperatorStore, make_agent: AgentFactory, tmp_path: Path
) -> None:
    data, port = tmp_path / "broker-1", free_port()
    issue_broker_dir(operator, data, "broker-1")
    env = {
        "ATOLL_BROKER__DATA_DIR": str(data),
        "ATOLL_BROKER__LISTEN": f"127.0.0.1:{port}",
        "ATOLL_BROKER__ADVERTISE": "false",
    }
    log = tmp_path / "log"
    text = await run_cli(["broker", "--config", str(CONFIGS / BROKER)], env, log, processes)
    assert f"broker broker-1 listening on ws://127.0.0.1:{port}" in text
    x = (await make_agent("x", brokers=[f"ws://127.0.0.1:{port}"])).agent
    await make_agent("y", brokers=[f"ws://127.0.0.1:{port}"])
    assert (await x.call("y", "ping"))["agent"] == "y"
    # The file holds the settings: options beside it are refused, naming them.
    mixed = await asyncio.create_subprocess_exec(
        *ATOLL_CLI, "broker", "--config", str(CONFIGS / BROKER), "--listen", "127.0.0.1:1",
        stderr=subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(mixed.communicate(), 30)
    assert mixed.returncode == 1 and b"drop --listen" in stderr


async def test_two_broker_mesh_from_its_files(
    processes, operator: OperatorStore, make_agent: AgentFactory, tmp_path: Path
) -> None:
    a, b = free_port(), free_port()
    await issue(operator, tmp_path / "mesh-a", "mesh-a", ["storage"])
    await issue(operator, tmp_path / "mesh-b", "mesh-b", ["agent"])
    env_a, env_b = broker_env(tmp_path / "mesh-a", a, b), broker_env(tmp_path / "mesh-b", b, a)
    await agent_run("mesh-a.toml", env_a, tmp_path / "a.log", processes)
    await agent_run("mesh-b.toml", env_b, tmp_path / "b.log", processes)
    x = (await make_agent("x", roles=("operator",), brokers=[f"ws://127.0.0.1:{a}"])).agent
    y = (await make_agent("y", roles=("operator",), brokers=[f"ws://127.0.0.1:{b}"])).agent
    # Each on its own broker, and RPCs cross the link both ways, to plain agents and to the
    # storage plugin that mesh-a.toml runs on campus A.
    assert x.link.url is not None and x.link.url.endswith(f":{a}")
    assert y.link.url is not None and y.link.url.endswith(f":{b}")
    assert (await call_when_reachable(y, "x", "ping"))["agent"] == "x"
    assert (await call_when_reachable(x, "y", "ping"))["agent"] == "y"
    assert await call_when_reachable(y, "mesh-a/storage", "list_adapters") == []
    info = await call_when_reachable(x, "mesh-b/system", "info")
    assert info["broker"] == f"ws://127.0.0.1:{b}"


async def test_island_from_its_file(
    processes, operator: OperatorStore, make_agent: AgentFactory, tmp_path: Path
) -> None:
    data, port, web = tmp_path / "island", free_port(), free_port()
    await issue(operator, data, "island", ["admin", "operator", "gateway", "storage", "training"])
    env = broker_env(data, port) | {
        "ATOLL_PLUGINS__GATEWAY__LISTEN": f"127.0.0.1:{web}",
        "ATOLL_PLUGINS__INFERENCE__BACKEND": "echo",  # the embedded model has its own tests
    }
    await agent_run("island.toml", env, tmp_path / "log", processes)
    admin = (await make_agent("admin", roles=("admin",), brokers=[f"ws://127.0.0.1:{port}"])).agent
    statuses = await admin.call("island/system", "plugins")
    assert {s["name"]: s["state"] for s in statuses} == {
        name: "running" for name in ("system", "storage", "gateway", "training", "inference")
    }
    key = (data / "plugins" / "gateway" / "admin-key").read_text()
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}) as http:
        for _ in range(50):  # bounded: until the gateway's discovery shows the node (5 s)
            models = (await http.get(f"http://127.0.0.1:{web}/v1/models")).json()
            if [m["id"] for m in models["data"]] == ["echo"]:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"the island's gateway lists {models}")


async def test_lorax_node_reaches_lorax_through_the_hosts_tunnel(
    make_agent: AgentFactory, broker: BrokerServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    lorax = await FakeLorax(token="lorax-secret").start()
    monkeypatch.setenv("ATOLL_LORAX_API_TOKEN", "lorax-secret")
    listen = free_port()
    try:
        joined = {"ATOLL_AGENT__BROKERS": json.dumps([broker.url])}
        host = await from_file(
            make_agent,
            "lorax-host.toml",
            joined | {"ATOLL_PLUGINS__TUNNEL__ALLOW": f'["127.0.0.1:{lorax.port}"]'},
            "agent",
        )
        tunnel = f'{{listen = "127.0.0.1:{listen}", to = "lorax-host:127.0.0.1:{lorax.port}"}}'
        node_env = joined | {
            "ATOLL_PLUGINS__TUNNEL__LISTEN": f"[{tunnel}]",
            "ATOLL_PLUGINS__INFERENCE__LORAX__URL": f"http://127.0.0.1:{listen}",
        }
        await from_file(make_agent, "inference-lorax.toml", node_env, "inference")
        gateway = (await make_agent("gw", roles=("gateway",))).agent
        request = {"prompt": "hi", "params": {"max_new_tokens": 4}}
        reply = await gateway.call("lorax-1/inference", "generate", request)
        assert reply["text"] == "".join(lorax.words)
        assert {r.headers.get("authorization") for r in lorax.requests} == {"Bearer lorax-secret"}
        tunnel_plugin = host.host.plugins["tunnel"]
        assert isinstance(tunnel_plugin, TunnelPlugin)
        assert tunnel_plugin.opened.value >= 1  # it went through lorax-host
    finally:
        await lorax.stop()


async def test_trainer_from_its_file(make_agent: AgentFactory, broker: BrokerServer) -> None:
    env = {"ATOLL_AGENT__BROKERS": json.dumps([broker.url])}
    rt = await from_file(make_agent, "trainer.toml", env, "training")
    plugin = rt.host.plugins["training"]
    assert isinstance(plugin, TrainingPlugin)
    assert plugin.status() == {"mode": "trainer", "training": []}
    caps = plugin.describe()["capabilities"]
    assert caps["trainer"] is True and caps["capacity"] == 1 and caps["device"] in ("cpu", "cuda")
    assert plugin.config.models == {"SmolLM2-135M-Instruct": "embedded"}


@pytest.fixture
def moto_s3() -> Iterator[str]:
    """moto's S3 server on a free loopback port."""
    pytest.importorskip("moto", reason="needs moto[server]")
    with moto_server() as url:
        yield url


async def test_storage_on_s3_from_its_file(
    make_agent: AgentFactory,
    broker: BrokerServer,
    moto_s3: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("ATOLL_S3_KEY", "test-key")  # the variables the file names
    monkeypatch.setenv("ATOLL_S3_SECRET", "test-secret")
    env = {
        "ATOLL_AGENT__BROKERS": json.dumps([broker.url]),
        "ATOLL_PLUGINS__STORAGE__S3__ENDPOINT_URL": moto_s3,
        "ATOLL_PLUGINS__STORAGE__S3__CREATE_BUCKET": "true",
    }
    rt = await from_file(make_agent, "storage-s3.toml", env, "storage")
    assert rt.host.plugins["storage"].describe()["capabilities"]["store"] == "s3"
    admin = (await make_agent("admin", roles=("admin",))).agent
    rows = tmp_path / "qa.jsonl"
    rows.write_text('{"instruction": "hi", "output": "hello"}\n')
    record = await upload_dataset(admin, "store-1", rows, "qa", "alice")
    client = boto3.client(
        "s3",
        endpoint_url=moto_s3,
        region_name="us-east-1",
        aws_access_key_id="test-key",
        aws_secret_access_key="test-secret",
    )
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="atoll")["Contents"]]
    assert f"atoll/datasets/{record.id}/original" in keys  # under the file's prefix
