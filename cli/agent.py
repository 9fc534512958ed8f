"""``atoll agent``: join an agent to a tenant, mint its identity, run it, revoke it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from atoll import logs
from atoll.agent.config import load_config
from atoll.agent.identity import AgentKeys
from atoll.agent.node import Agent
from atoll.agent.runtime import AgentRuntime
from atoll.broker.advertise import discover as discover_brokers
from atoll.broker.identity import issue_broker_dir
from atoll.cli.admin import AdminTarget
from atoll.cli.broker import listening, start_broker
from atoll.cli.console import err, fail, out
from atoll.cli.loop import run_async, wait_for_signal
from atoll.cli.operator import operator_store
from atoll.cli.options import (
    LABEL_HELP,
    ROLE_NAMES,
    DataDir,
    default_data_dir,
    parse_duration,
    parse_labels,
)
from atoll.protocol.errors import ProtocolError
from atoll.tenancy.credentials import EnrollmentToken
from atoll.tenancy.operator import DEFAULT_TENANT
from atoll.transport import client_tls

agents = typer.Typer(help="Join, run and revoke agents.")


def agent_config_text(name: str, brokers: list[str], ca_file: Path | None = None) -> str:
    urls = ", ".join(json.dumps(u) for u in brokers)
    ca = f"ca_file = {json.dumps(str(ca_file.resolve()))}\n" if ca_file else ""
    return (
        "# Written by `atoll agent join`; run with `atoll agent run --config THIS_FILE`.\n"
        "[agent]\n"
        f'name = "{name}"\n'
        'data_dir = "."  # relative to this file: key, credential, plugin data\n'
        f"brokers = [{urls}]  # tried in order, with failover\n{ca}\n"
        "[plugins.system]\n"
    )


@agents.command("join")
def agent_join(
    token: Annotated[str, typer.Option(help="Enrollment token from `atoll token create`.")],
    name: Annotated[str, typer.Option(help="This agent's name in its tenant.")],
    url: Annotated[str | None, typer.Argument(help="Broker URL, ws://host:port")] = None,
    discover: Annotated[bool, typer.Option(help="Find a broker on the LAN (mDNS).")] = False,
    mdns_interface: Annotated[
        list[str] | None, typer.Option(help="Interface address to browse on (repeatable).")
    ] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", "-d")] = None,
    ca_file: Annotated[Path | None, typer.Option(help="CA bundle for a wss:// broker.")] = None,
) -> None:
    """Redeem an enrollment token at a broker and write this agent's identity and config."""
    if (url is None) == (not discover):
        fail("give a broker URL or --discover (not both)")
    if url is None:
        found = run_async(discover_brokers(3.0, mdns_interface))
        if not found:
            fail("no broker advertises _atoll._tcp.local. on this network")
        url = found[0]
        out.print(f"found broker {url}" + (f" (also: {', '.join(found[1:])})" if found[1:] else ""))
    data_dir = data_dir or default_data_dir() / "agents" / name
    try:
        tok = EnrollmentToken.decode(token)
        keys = AgentKeys.from_token(tok, name)
    except ProtocolError as exc:
        fail(f"token refused: {exc.reason}")

    async def redeem() -> None:
        agent = Agent(keys, [url], backoff_max=0.5, ssl_context=client_tls(ca_file))
        try:
            await agent.start(wait=10)
        finally:
            await agent.stop()

    run_async(redeem())
    keys.save(data_dir)
    config = data_dir / "agent.toml"
    config.write_text(agent_config_text(name, [url], ca_file))
    ident = keys.ident
    out.print(f"joined tenant {ident.tenant} as {ident.name} ({', '.join(ident.roles)})")
    out.print(f"run it with: atoll agent run --config {config}")


@agents.command("issue")
def agent_issue(
    data_dir: DataDir,
    name: Annotated[str, typer.Option(help="Agent name.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Data dir to create for that agent.")],
    tenant: Annotated[str, typer.Option(help="Tenant of the agent.")] = DEFAULT_TENANT,
    role: Annotated[list[str] | None, typer.Option(help=f"Role(s): {ROLE_NAMES}.")] = None,
    region: Annotated[str, typer.Option(help="Region (island) of the agent.")] = "",
    cred_ttl: Annotated[str, typer.Option(help="Lifetime of the credential.")] = "30d",
    label: Annotated[list[str] | None, typer.Option(help=LABEL_HELP)] = None,
    with_broker: Annotated[
        bool, typer.Option(help="Also a broker identity of that name, for a [broker] section.")
    ] = False,
) -> None:
    """Mint an agent identity with the tenant key on the operator host (as `broker issue` does
    for brokers), for an agent that runs its own island's broker and so has none to join
    through first. Copy DIR to the agent's host; elsewhere, prefer a token and `agent join`."""
    op = operator_store(data_dir)
    try:
        ttl = parse_duration(cred_ttl)
        labels = parse_labels(label)
        AgentKeys.issue(op, tenant, name, role or ["agent"], region, ttl, labels).save(out_dir)
        if with_broker:
            issue_broker_dir(op, out_dir, name)
    except (ValueError, FileNotFoundError, ProtocolError) as exc:
        fail(str(exc))
    out.print(f"agent identity for {name} (tenant {tenant}) in {out_dir}")


@agents.command("run")
def agent_run(config: Annotated[Path, typer.Option(help="Agent TOML config.")]) -> None:
    """Run an agent with the plugins its config enables, until Ctrl-C."""
    try:
        cfg = load_config(config)
    except (OSError, ValueError) as exc:
        fail(f"config {config}: {exc}")
    logs.setup(cfg.agent.log_level)

    async def main() -> None:
        server = None
        if cfg.broker is not None:  # this agent also runs a broker for its island
            server = await start_broker(cfg.broker, cfg.agent.data_dir, cfg.agent.ca_file)
            out.print(listening(server))
        rt = await AgentRuntime.start(
            cfg.agent.data_dir,
            cfg.agent.brokers,
            cfg.plugins,
            call_timeout=cfg.agent.call_timeout,
            ssl_context=client_tls(cfg.agent.ca_file),
            heartbeat=cfg.agent.heartbeat,
            metrics_interval=cfg.agent.metrics_interval,
            config_dir=config.resolve().parent,
        )
        out.print(f"agent {rt.agent.name} connected to {rt.agent.link.url}")
        for name, reason in rt.host.errors.items():
            err.print(f"[yellow]plugin {name} did not start:[/yellow] {reason}", markup=True)
        try:
            await wait_for_signal(rt.agent)
        finally:
            await rt.stop()
            if server is not None:
                await server.stop()

    run_async(main(), cfg.agent.idle_spin_us)


@agents.command("revoke")
def agent_revoke(
    name: str,
    data_dir: DataDir,
    tenant: Annotated[str, typer.Option()] = DEFAULT_TENANT,
    broker: Annotated[list[str], typer.Option(help="Broker(s) to notify now.")] = [],  # noqa: B006
) -> None:
    """Revoke every credential of agent NAME issued so far; brokers cut it off."""
    op = operator_store(data_dir)
    blob = op.revoke(tenant, name=name)
    out.print(f"revoked {name} in tenant {tenant} (kept in {op.tenant_dir(tenant)})")

    async def push(agent: Agent) -> None:
        await agent.send_revocation(blob)
        await agent.flush()  # a round trip: the broker has processed it

    if broker:  # the brokers to notify are the admin target's here, and optional
        AdminTarget(data_dir, tenant, broker).run(push)
        out.print(f"brokers notified: {', '.join(broker)}")
