"""The deployment recipes in deploy/. The systemd units pass ``systemd-analyze verify`` with their
ExecStart rendered to this venv's ``atoll``, carry the hardening they promise at a low exposure
score, and run as the users the sysusers file creates. The broker, the storage agent and the
gateway agent run from the units' own command lines and environment, inside the units' seccomp
sandbox, with the shipped configs, under a temporary root (each host-specific value overridden as
``ATOLL_<SECTION>__<KEY>``), set up as docs/operators.md says: agents join over wss:// and answer
the operator's CLI. The Containerfile installs with the Makefile's setup commands, so the two
cannot drift apart."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from pydantic import BaseModel

from atoll.agent.config import load_broker_config, load_config
from atoll.plugins.gateway.plugin import GatewayConfig
from atoll.plugins.inference.plugin import InferenceConfig
from atoll.plugins.storage.plugin import StorageConfig
from atoll.plugins.training.plugin import TrainingConfig
from support import REPO
from support.net import ATOLL_CLI, free_port, self_signed
from support.units import (
    INSTALL_ATOLL,
    Sandbox,
    Section,
    analyze_verify,
    expand,
    exposure,
    parse_unit,
    unit_environment,
)

DEPLOY = REPO / "deploy"
BROKER_UNIT = "atoll-broker.service"
AGENT_UNIT = "atoll-agent@.service"
GPU_DROPIN = DEPLOY / "atoll-agent-gpu.conf"
VENV_ATOLL = Path(sys.executable).with_name("atoll")  # the console script `make setup` installs
PLUGIN_MODELS: dict[str, type[BaseModel]] = {
    "gateway": GatewayConfig,
    "inference": InferenceConfig,
    "storage": StorageConfig,
    "training": TrainingConfig,
}
EXPOSURE_MAX = 2.0  # `systemd-analyze security`: 1.1 (broker), 1.2 (agent), 1.4 (GPU agent)

systemd = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None or shutil.which("systemd-sysusers") is None,
    reason="systemd-analyze and systemd-sysusers come with Debian's systemd (.ci/run installs it)",
)


def service(unit: str) -> Section:
    return parse_unit((DEPLOY / unit).read_text())["Service"]


def render(unit: str, folder: Path, atoll: Path = VENV_ATOLL) -> Path:
    """``unit`` in ``folder`` with ExecStart's install path replaced by ``atoll``."""
    text = (DEPLOY / unit).read_text()
    assert f"ExecStart={INSTALL_ATOLL} " in text
    target = folder / unit
    target.write_text(text.replace(INSTALL_ATOLL, str(atoll)))
    return target


def rendered_units(folder: Path, atoll: Path = VENV_ATOLL) -> list[Path]:
    """The broker, and the agent template as instances store-1 and gpu-1 (with the GPU drop-in)."""
    render(AGENT_UNIT, folder, atoll)
    dropins = folder / "atoll-agent@gpu-1.service.d"
    dropins.mkdir()
    shutil.copy(GPU_DROPIN, dropins / "gpu.conf")
    return [
        render(BROKER_UNIT, folder, atoll),
        folder / "atoll-agent@store-1.service",
        folder / "atoll-agent@gpu-1.service",
    ]


# --- the units, as systemd reads them ------------------------------------------------------------


@systemd
def test_units_verify_clean(tmp_path: Path) -> None:
    assert analyze_verify(rendered_units(tmp_path)) == []


@systemd
def test_verify_reports_what_is_wrong(tmp_path: Path) -> None:
    """The check above can fail: a missing binary and a misspelt directive are reported."""
    units = rendered_units(tmp_path, atoll=tmp_path / "missing" / "atoll")
    broker = units[0]
    broker.write_text(broker.read_text().replace("ProtectSystem=", "ProtectSytem="))
    said = "\n".join(analyze_verify(units))
    assert "missing/atoll is not executable" in said
    assert "Unknown key 'ProtectSytem'" in said


@pytest.mark.parametrize("unit", [BROKER_UNIT, AGENT_UNIT])
def test_unit_is_hardened_and_keeps_state_where_systemd_gives_it(unit: str) -> None:
    s = service(unit)
    unit_section = parse_unit((DEPLOY / unit).read_text())["Unit"]
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "RestrictNamespaces": "yes",
        "SystemCallArchitectures": "native",
        "Restart": "on-failure",
        "ConfigurationDirectory": "atoll",
    }.items():
        assert s.get(key) == [value], (unit, key, s.get(key))
    families = set(" ".join(s["RestrictAddressFamilies"]).split())
    assert {"AF_INET", "AF_INET6"} <= families <= {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}
    assert s["SystemCallFilter"][0] == "@system-service"
    assert "@privileged" in s["SystemCallFilter"][1].removeprefix("~").split()
    restart = re.fullmatch(r"(\d+)s", s["RestartSec"][0])
    assert restart is not None and 1 <= int(restart.group(1)) <= 30
    for key in ("After", "Wants"):
        assert "network-online.target" in " ".join(unit_section[key]).split()
    # The data dir is the state directory, the config is in the configuration directory.
    (state,) = s["StateDirectory"]
    assert state.startswith("atoll/")
    argv = shlex.split(s["ExecStart"][0])
    assert argv[0] == INSTALL_ATOLL
    config = argv[argv.index("--config") + 1]
    assert config.startswith("%E/atoll/") and config.endswith(".toml")
    if unit == BROKER_UNIT:
        assert argv[1:2] == ["broker"] and argv[argv.index("--data-dir") + 1] == f"%S/{state}"
    else:
        assert argv[1:3] == ["agent", "run"] and config == "%E/atoll/agents/%i.toml"
        env = unit_environment(s, Path("/"), "gpu-1")
        assert env["ATOLL_AGENT__DATA_DIR"] == "/var/lib/atoll/agents/gpu-1"


def test_gpu_dropin_opens_gpus_only() -> None:
    """The drop-in changes the device policy and nothing else; the base unit stays strict."""
    dropin = parse_unit(GPU_DROPIN.read_text())
    assert set(dropin) == {"Service"}
    s = dropin["Service"]
    assert set(s) == {"PrivateDevices", "DevicePolicy", "DeviceAllow"}
    assert s["PrivateDevices"] == ["no"] and s["DevicePolicy"] == ["closed"]
    for allowed in s["DeviceAllow"]:
        assert re.fullmatch(r"char-nvidia[-a-z]* rw", allowed), allowed


@systemd
def test_exposure_stays_low(tmp_path: Path) -> None:
    scores = {unit.name: exposure(unit) for unit in rendered_units(tmp_path)}
    assert all(score <= EXPOSURE_MAX for score in scores.values()), scores
    # The GPU drop-in costs a little (devices), never the base unit's hardening.
    gpu, store = scores["atoll-agent@gpu-1.service"], scores["atoll-agent@store-1.service"]
    assert store < gpu <= store + 0.5, scores


@systemd
def test_sysusers_creates_the_units_users(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", str(DEPLOY / "atoll.sysusers")],
        check=True,
        capture_output=True,
        timeout=60,
    )
    passwd = (tmp_path / "etc/passwd").read_text().splitlines()
    users = {line.split(":")[0]: line.split(":") for line in passwd}
    groups = {line.split(":")[0] for line in (tmp_path / "etc/group").read_text().splitlines()}
    for unit in (BROKER_UNIT, AGENT_UNIT):
        s = service(unit)
        (user,), (group,) = s["User"], s["Group"]
        _, _, uid, _, _, home, shell = users[user]
        assert group in groups and int(uid) < 1000 and shell.endswith("nologin"), users[user]
        assert home.startswith("/var/lib/atoll/")


@systemd
def test_the_sandbox_the_runs_use_is_enforced() -> None:
    """What the runs below prove rests on this: under the broker's sandbox a foreign socket
    family, writable and executable memory and a @resources call are refused, as systemd would."""
    probe = (
        "import errno, mmap, os, socket\n"
        "def attempt(what, act):\n"
        "    try:\n"
        "        act()\n"
        "        print(what, 'ok')\n"
        "    except OSError as exc:\n"
        "        print(what, errno.errorcode[exc.errno])\n"
        "attempt('packet', lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW).close())\n"
        "attempt('wx', lambda: mmap.mmap(-1, 4096, prot=7).close())\n"
        "attempt('nice', lambda: os.nice(1))\n"
        "attempt('inet', lambda: socket.socket(socket.AF_INET6).close())\n"
    )
    argv = [sys.executable, "-c", probe]
    box = Sandbox.of(service(BROKER_UNIT))
    boxed = subprocess.run(box.command(argv), capture_output=True, text=True, timeout=60)
    plain = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert boxed.stdout.split("\n") == [
        "packet EAFNOSUPPORT",
        "wx EPERM",
        "nice EPERM",
        "inet ok",
        "",
    ], boxed.stderr
    assert {"wx ok", "nice ok", "inet ok"} <= set(plain.stdout.split("\n")), plain.stderr


# --- the shipped configs --------------------------------------------------------------------------


def test_broker_config_loads_and_serves_tls() -> None:
    b = load_broker_config(DEPLOY / "broker.toml", env={})
    assert b.data_dir is None  # the unit's --data-dir (its state directory) applies
    assert b.tls_cert is not None and b.tls_key is not None
    assert str(b.tls_key).startswith("/etc/atoll/")


@pytest.mark.parametrize("path", sorted((DEPLOY / "agents").glob("*.toml")), ids=lambda p: p.name)
def test_agent_config_loads_as_its_unit_instance(path: Path) -> None:
    env = unit_environment(service(AGENT_UNIT), Path("/"), path.stem)
    cfg = load_config(path, env)
    assert cfg.agent.name == path.stem  # atoll-agent@NAME reads agents/NAME.toml
    # The file names the state directory the unit gives it: the same run by hand.
    assert load_config(path, env={}).agent.data_dir == Path(env["ATOLL_AGENT__DATA_DIR"])
    assert all(url.startswith("wss://") for url in cfg.agent.brokers)
    assert cfg.plugins and set(cfg.plugins) <= set(PLUGIN_MODELS)
    for name, section in cfg.plugins.items():
        PLUGIN_MODELS[name].model_validate(section, context={"config_dir": path.parent})


# --- the units, run ------------------------------------------------------------------------------


@dataclass
class Deployment:
    """One host's filesystem under ``root`` and the operator's data dir: a broker identity
    issued into the broker's state directory, the shipped broker.toml installed, a certificate."""

    root: Path
    operator: Path
    cert: Path
    key: Path
    port: int = field(default_factory=free_port)
    running: list[asyncio.subprocess.Process] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"wss://127.0.0.1:{self.port}"

    async def start(self, unit: str, instance: str, env: dict[str, str], marker: str) -> str:
        """The unit's ExecStart, with its Environment= and ``env``, inside its sandbox and its
        directories made as systemd makes them, until its output shows ``marker``."""
        s = service(unit)
        for key, base in (("StateDirectory", "var/lib"), ("CacheDirectory", "var/cache")):
            for name in s.get(key, []):
                path = self.root / base / expand(name, self.root, instance)
                path.mkdir(parents=True, exist_ok=True)
        argv = [expand(word, self.root, instance) for word in shlex.split(s["ExecStart"][0])]
        assert argv[0] == INSTALL_ATOLL
        argv[0] = str(VENV_ATOLL)
        log = self.root / f"{unit}-{instance}.log"
        environ = os.environ | unit_environment(s, self.root, instance) | env
        with log.open("w") as out:
            proc = await asyncio.create_subprocess_exec(
                *Sandbox.of(s).command(argv), env=environ, stdout=out, stderr=subprocess.STDOUT
            )
        self.running.append(proc)
        for _ in range(300):  # bounded: 30 s
            if marker in (text := log.read_text()):
                return text
            if proc.returncode is not None:
                break
            await asyncio.sleep(0.1)
        raise AssertionError(f"{unit} ({instance}) did not start:\n{log.read_text()}")

    async def stop(self) -> list[int]:
        """SIGTERM, as `systemctl stop` sends: each process's exit status."""
        codes = []
        for proc in reversed(self.running):
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            try:
                codes.append(await asyncio.wait_for(proc.wait(), 20))
            except TimeoutError:
                proc.kill()
                codes.append(await proc.wait())
        return codes

    async def broker(self) -> str:
        env = {
            "ATOLL_BROKER__LISTEN": f"127.0.0.1:{self.port}",
            "ATOLL_BROKER__TLS_CERT": str(self.cert),
            "ATOLL_BROKER__TLS_KEY": str(self.key),
        }
        return await self.start(BROKER_UNIT, "", env, "listening on")


async def cli(*args: str | Path, env: dict[str, str] | None = None) -> str:
    """``atoll ARGS`` to its end, as the operator runs it: its output (it must succeed)."""
    proc = await asyncio.create_subprocess_exec(
        *ATOLL_CLI,
        *map(str, args),
        env=os.environ | (env or {}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, f"atoll {' '.join(map(str, args))}:\n{err.decode()}"
    return out.decode()


@pytest.fixture
async def deployment(tmp_path: Path) -> AsyncIterator[Deployment]:
    root, operator = tmp_path / "root", tmp_path / "operator"
    await cli("init", "-d", operator)
    await cli("broker", "issue", "-d", operator, "--name", "broker-1", "--out",
              root / "var/lib/atoll/broker")  # fmt: skip
    (root / "etc/atoll/agents").mkdir(parents=True)
    shutil.copy(DEPLOY / "broker.toml", root / "etc/atoll/broker.toml")
    cert, key = self_signed(tmp_path)
    it = Deployment(root, operator, cert, key)
    yield it
    await it.stop()


@systemd
async def test_broker_runs_from_its_unit(deployment: Deployment) -> None:
    text = await deployment.broker()
    assert f"broker broker-1 listening on {deployment.url}" in text
    # An agent joins over TLS; the broker keeps the enrollment in its state directory.
    token = (await cli("token", "create", "-d", deployment.operator, "--ttl", "10m")).strip()
    await cli("agent", "join", deployment.url, "--token", token, "--name", "probe",
              "-d", deployment.root / "joined", "--ca-file", deployment.cert)  # fmt: skip
    assert await deployment.stop() == [0]  # a clean stop: Restart=on-failure leaves it stopped
    state = deployment.root / "var/lib/atoll/broker/broker/state.sqlite"
    with closing(sqlite3.connect(state)) as db:
        assert db.execute("SELECT name FROM enrollments").fetchall() == [("probe",)]


async def enrol(deployment: Deployment, name: str, *roles: str) -> Path:
    """As the walk-through does: a token, `atoll agent join` into the instance's state
    directory, the config from deploy/agents/ installed. The state directory."""
    token = await cli("token", "create", "-d", deployment.operator, *(f"--role={r}" for r in roles))
    state = deployment.root / "var/lib/atoll/agents" / name
    await cli("agent", "join", deployment.url, "--token", token.strip(), "--name", name,
              "-d", state, "--ca-file", deployment.cert)  # fmt: skip
    shutil.copy(DEPLOY / f"agents/{name}.toml", deployment.root / f"etc/atoll/agents/{name}.toml")
    return state


@systemd
async def test_agents_run_from_their_unit(deployment: Deployment) -> None:
    """The storage host's agent and the operator host's gateway, as atoll-agent@store-1 and
    atoll-agent@gateway."""
    await deployment.broker()
    env = {
        "ATOLL_AGENT__BROKERS": json.dumps([deployment.url]),
        "ATOLL_AGENT__CA_FILE": str(deployment.cert),
    }
    store = await enrol(deployment, "store-1", "storage")
    text = await deployment.start(AGENT_UNIT, "store-1", env, "connected to")
    assert f"agent store-1 connected to {deployment.url}" in text
    assert "did not start" not in text
    gateway = await enrol(deployment, "gateway", "gateway", "training")
    http = free_port()
    env["ATOLL_PLUGINS__GATEWAY__LISTEN"] = f"127.0.0.1:{http}"
    text = await deployment.start(AGENT_UNIT, "gateway", env, "connected to")
    assert "did not start" not in text
    # The operator's CLI reaches them through the broker (trusting the broker's private CA).
    admin = ["-d", str(deployment.operator), "--broker", deployment.url]
    trust = {"SSL_CERT_FILE": str(deployment.cert)}
    assert json.loads(await cli("call", "store-1", "ping", *admin, env=trust))["agent"] == "store-1"
    adapters = await cli("call", "store-1/storage", "list_adapters", *admin, env=trust)
    assert json.loads(adapters) == []
    # The gateway answers with the admin key it wrote into its state directory.
    key = (gateway / "plugins/gateway/admin-key").read_text().strip()
    async with httpx.AsyncClient() as client:
        reply = await client.get(
            f"http://127.0.0.1:{http}/v1/models", headers={"Authorization": f"Bearer {key}"}
        )
    assert reply.status_code == 200 and reply.json()["object"] == "list"
    # Their data is in their state directories, whatever data_dir the files name.
    assert (store / "plugins" / "storage").is_dir()
    assert await deployment.stop() == [0, 0, 0]


# --- the container recipe -------------------------------------------------------------------------

IMAGE_VENV = "/opt/atoll/venv"
IMAGE_EXTRAS_LEFT_OUT = {"dev"}  # the test tools stay out of the image


def image_extras(m: re.Match[str]) -> str:
    """``.[a,b,dev]`` as the image installs it."""
    kept = [e for e in m.group(1).split(",") if e not in IMAGE_EXTRAS_LEFT_OUT]
    return f".[{','.join(kept)}]"


def make_setup_commands(makefile: str) -> list[str]:
    """The Makefile's setup recipe as an image runs it: the venv at IMAGE_VENV (made, not
    reused), the extras less IMAGE_EXTRAS_LEFT_OUT, and no stamp file; each as shlex joins it."""
    lines = makefile.split("\n")
    start = lines.index("$(STAMP): pyproject.toml") + 1
    commands = []
    for line in lines[start:]:
        if not line.startswith("\t"):
            break
        command = line.strip()
        if command.startswith("#") or command == "touch $(STAMP)":
            continue
        command = command.rpartition(" || ")[2]  # `test -x $(PY) || python3 -m venv ...`
        command = command.replace("$(PY)", f"{IMAGE_VENV}/bin/python")
        command = command.replace("$(VENV)", IMAGE_VENV)
        commands.append(shlex.join(shlex.split(re.sub(r"\.\[([\w,]+)\]", image_extras, command))))
    return commands


def containerfile_commands(containerfile: str) -> list[str]:
    """The Containerfile's RUN steps that install into the venv, each without the environment
    assignments in front of it (the torch index)."""
    commands = []
    for line in containerfile.replace("\\\n", " ").split("\n"):
        if line.startswith("RUN ") and IMAGE_VENV in line:
            words = shlex.split(line.removeprefix("RUN "))
            while re.fullmatch(r"[A-Z_]+=.*", words[0]):
                words.pop(0)
            commands.append(shlex.join(words))
    return commands


def test_containerfile_installs_as_make_setup() -> None:
    makefile = (REPO / "Makefile").read_text()
    image = containerfile_commands((DEPLOY / "Containerfile").read_text())
    setup = make_setup_commands(makefile)
    assert image == setup
    assert any("torch==" in c for c in setup)  # the recipe was found, torch in it
    # The comparison sees a drift: a new torch pin in the Makefile only.
    drifted = makefile.replace("torch==", "torch==9", 1)
    assert make_setup_commands(drifted) != image
