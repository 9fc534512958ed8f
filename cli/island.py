"""``atoll up``: the all-in-one island of ``configs/island.toml`` (a broker, and one agent with
the plugins the file lists) on this machine, with the command's options in place of the file's
ports, timings and inference backend."""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from atoll import logs
from atoll.agent.config import AtollConfig, load_config
from atoll.agent.discovery import Discovery
from atoll.agent.identity import AgentKeys
from atoll.agent.runtime import AgentRuntime
from atoll.cli.broker import start_broker
from atoll.cli.console import fail, out
from atoll.cli.loop import run_async, wait_for_signal
from atoll.cli.options import DataDir, IdleSpin, parse_listen
from atoll.eventloop import DEFAULT_IDLE_SPIN_US
from atoll.tenancy.operator import DEFAULT_TENANT, OperatorStore

commands = typer.Typer()
ISLAND_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "island.toml"
ROLES = ["admin", "operator", "gateway", "storage", "training"]  # it runs every plugin
INFERENCE = ("local", "echo", "none")


def island_config(
    data_dir: Path,
    *,
    listen: str,
    advertise: bool,
    heartbeat: float,
    metrics_interval: float,
    idle_spin_us: int,
    inference: str,
    model: str,
    gateway: str,
) -> AtollConfig:
    """The island's file with the options of `atoll up` in place of its values: the broker's
    identity in the operator's ``data_dir``, the agent's under ``data_dir/agents/<name>``."""
    cfg = load_config(ISLAND_CONFIG, {})  # the options, not the environment, override it
    if cfg.broker is None:
        raise ValueError("no [broker] section: the island runs its own broker")
    agent = cfg.agent.model_copy(
        update={
            "data_dir": data_dir / "agents" / cfg.agent.name,
            "heartbeat": heartbeat,
            "metrics_interval": metrics_interval,
            "idle_spin_us": idle_spin_us,
        }
    )
    broker = cfg.broker.model_copy(
        update={"data_dir": data_dir, "listen": listen, "advertise": advertise}
    )
    plugins = copy.deepcopy(cfg.plugins)
    _update(plugins, "gateway", {"listen": gateway})
    if inference == "none":
        plugins.pop("inference", None)
    else:  # a model path on the command line is relative to where the command runs
        spec = model if model == "embedded" else str(Path(model).expanduser().resolve())
        _update(plugins, "inference", {"backend": inference})
        _update(plugins.get("inference", {}), "local", {"model": spec})
    return cfg.model_copy(update={"agent": agent, "broker": broker, "plugins": plugins})


def _update(sections: dict[str, Any], name: str, values: dict[str, Any]) -> None:
    """``values`` into section ``name`` if the file has that section (the file holds the set)."""
    if name in sections:
        sections[name].update(values)


def island_keys(op: OperatorStore, name: str, agent_dir: Path) -> AgentKeys:
    """The island agent's identity, minted with the tenant key on its first run."""
    try:
        keys = AgentKeys.load(agent_dir)
        if set(keys.ident.roles) == set(ROLES):
            return keys
    except FileNotFoundError:
        pass
    keys = AgentKeys.issue(op, DEFAULT_TENANT, name, ROLES)  # (again, for an older data dir)
    keys.save(agent_dir)
    return keys


def show_statuses(statuses: list[dict[str, Any]]) -> None:
    """Each plugin's line, from what it says of itself; the gateway's addresses and admin key."""
    for status in statuses:
        if status["name"] != "system":
            detail = status.get("error") or status.get("model") or status.get("url") or ""
            out.print(f"  plugin   {status['name']}: {status['state']} {detail}".rstrip())
    gateway = next((s for s in statuses if s["name"] == "gateway" and "url" in s), None)
    if gateway is None:
        return
    out.print(f"  gateway  {gateway['url']}/v1  (OpenAI- and LoRAX-compatible API)")
    out.print(f"  web UI   {gateway['url']}/ui/")
    key_file = Path(gateway["admin_key_file"])
    if gateway["new_admin_key"]:  # the first run: shown here once, and kept 0600 for scripts
        out.print(f"  admin    API key [bold]{key_file.read_text()}[/bold] (also in {key_file})")
    else:
        out.print(f"  admin    API key in {key_file}")


@commands.command()
def up(
    data_dir: DataDir,
    listen: Annotated[str, typer.Option(help="Broker HOST:PORT.")] = "127.0.0.1:7400",
    heartbeat: Annotated[float, typer.Option(help="Seconds between announcements.")] = 5.0,
    metrics_interval: Annotated[float, typer.Option(help="Seconds between metrics.")] = 5.0,
    advertise: Annotated[bool, typer.Option(help="Advertise the broker over mDNS.")] = True,
    inference: Annotated[
        str, typer.Option(help="Inference backend: local, echo (no model), or none.")
    ] = "local",
    model: Annotated[
        str, typer.Option(help="Model of the local backend: embedded, a directory or a .gguf.")
    ] = "embedded",
    gateway: Annotated[
        str, typer.Option("--gateway", help="Gateway HOST:PORT (OpenAI-compatible API).")
    ] = "127.0.0.1:8000",
    idle_spin_us: IdleSpin = DEFAULT_IDLE_SPIN_US,
) -> None:
    """Start the all-in-one island: a broker and an agent with the storage and inference
    plugins on this machine (the first run converts the embedded model, about 30 s)."""
    if inference not in INFERENCE:
        fail(f"--inference must be local, echo or none, not {inference!r}")
    parse_listen(listen)
    try:
        cfg = island_config(
            data_dir,
            listen=listen,
            advertise=advertise,
            heartbeat=heartbeat,
            metrics_interval=metrics_interval,
            idle_spin_us=idle_spin_us,
            inference=inference,
            model=model,
            gateway=gateway,
        )
    except (OSError, ValueError) as exc:
        fail(f"config {ISLAND_CONFIG}: {exc}")
    logs.setup(os.environ.get("ATOLL_LOG_LEVEL", cfg.agent.log_level))
    op = OperatorStore(data_dir)
    if op.init():
        out.print(f"initialised {data_dir}")
    keys = island_keys(op, cfg.agent.name, cfg.agent.data_dir)

    async def main() -> None:
        assert cfg.broker is not None  # island_config made sure
        server = await start_broker(cfg.broker, data_dir, None)
        rt = await AgentRuntime.start(
            cfg.agent.data_dir,
            [server.url],
            cfg.plugins,
            keys=keys,
            call_timeout=cfg.agent.call_timeout,
            heartbeat=cfg.agent.heartbeat,
            metrics_interval=cfg.agent.metrics_interval,
            config_dir=ISLAND_CONFIG.parent,
        )
        # The island watches its tenant and publishes liveness changes on discovery.events.*
        liveness = await Discovery.shared(rt.agent, publish_events=True).start()
        out.print(f"[bold]atoll island up[/bold] (data dir {data_dir})")
        out.print(f"  broker   {server.url}")
        out.print(f"  agent    {rt.agent.name} (tenant {rt.agent.tenant})")
        show_statuses(rt.host.statuses())
        out.print("  try      atoll call island ping   |   Ctrl-C to stop")
        try:
            await wait_for_signal(rt.agent)
        finally:
            await liveness.stop()
            await rt.stop()
            await server.stop()
            out.print("stopped")

    with contextlib.suppress(KeyboardInterrupt):
        run_async(main(), cfg.agent.idle_spin_us)
