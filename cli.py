"""The ``atoll`` command."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.live import Live
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from atoll import eventloop, logs
from atoll.agent.config import BrokerSection, load_broker_config, load_config
from atoll.agent.discovery import Discovery
from atoll.agent.errors import AtollError, ConnectionLost
from atoll.agent.files import get_file, put_file
from atoll.agent.identity import AgentKeys
from atoll.agent.node import Agent
from atoll.agent.prometheus import prometheus_text
from atoll.agent.runtime import AgentRuntime
from atoll.agent.top import SORT_KEYS, render_top
from atoll.agent.tunnel import TunnelListener, parse_target
from atoll.agent.watch import TenantWatch
from atoll.broker.advertise import discover as discover_brokers
from atoll.broker.identity import issue_broker_dir
from atoll.broker.server import BrokerServer
from atoll.eventloop import DEFAULT_IDLE_SPIN_US, MAX_IDLE_SPIN_US
from atoll.protocol.errors import ProtocolError
from atoll.protocol.subjects import check_name
from atoll.tenancy.credentials import KNOWN_ROLES, EnrollmentToken
from atoll.tenancy.keys import public_id
from atoll.tenancy.operator import DEFAULT_TENANT, OperatorStore
from atoll.transport import client_tls, server_tls
from atoll.tuning import tune_process

ROLE_NAMES = ", ".join(sorted(KNOWN_ROLES))
app = typer.Typer(help="Atoll: many customised LLMs across islands of GPUs.", no_args_is_help=True)
tenant_app = typer.Typer(help="Tenants: isolation boundaries with their own keys.")
token_app = typer.Typer(help="One-time enrollment tokens for agents.")
agent_app = typer.Typer(help="Join, run and revoke agents.")


@app.callback()
def _process_setup() -> None:
    tune_process()


app.add_typer(tenant_app, name="tenant")
app.add_typer(token_app, name="token")
app.add_typer(agent_app, name="agent")

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def default_data_dir() -> Path:
    return Path(os.environ.get("ATOLL_DATA_DIR", "~/.atoll")).expanduser()


DataDir = Annotated[
    Path,
    typer.Option(
        "--data-dir",
        "-d",
        help="Operator data dir (env ATOLL_DATA_DIR).",
        default_factory=default_data_dir,
    ),
]


IdleSpin = Annotated[
    int,
    typer.Option(
        min=0,
        max=MAX_IDLE_SPIN_US,
        help="Microseconds to busy-poll after network I/O before sleeping (0: never).",
    ),
]


def fail(message: str) -> None:
    err.print(f"[red]error:[/red] {message}")
    raise typer.Exit(1)


def parse_duration(text: str) -> int:
    """'90s', '30m', '1h', '7d' -> seconds."""
    m = re.fullmatch(r"(\d+)([smhd]?)", text.strip())
    if not m:
        raise typer.BadParameter(f"{text!r} is not a duration like 90s, 30m, 1h, 7d")
    return int(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def parse_listen(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise typer.BadParameter(f"{text!r} is not HOST:PORT")
    return host, int(port)


def run_async(coro: Any, idle_spin_us: int = DEFAULT_IDLE_SPIN_US) -> Any:
    try:
        return eventloop.run(coro, idle_spin_us)
    except (AtollError, ProtocolError) as exc:
        fail(str(exc))
    except FileNotFoundError as exc:
        fail(str(exc))


async def wait_for_signal(agent: Agent | None = None) -> None:
    """Until Ctrl-C/SIGTERM, or until brokers refuse ``agent`` for good (then exit non-zero)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    waits = [asyncio.create_task(stop.wait())]
    if agent is not None:
        waits.append(asyncio.create_task(agent.link.refused.wait()))
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for w in waits:
        w.cancel()
    if agent is not None and agent.link.fatal is not None:
        raise ConnectionLost(f"broker refused agent {agent.name}: {agent.link.fatal.reason}")


def operator_store(data_dir: Path) -> OperatorStore:
    op = OperatorStore(data_dir)
    if not op.initialised:
        fail(f"{data_dir} is not initialised: run `atoll init --data-dir {data_dir}`")
    return op


# --- operator ------------------------------------------------------------------------------------


@app.command()
def init(data_dir: DataDir) -> None:
    """Create the operator key and tenant 'default' (idempotent)."""
    op = OperatorStore(data_dir)
    made = op.init()
    pub = public_id(op.operator_pub, "operator")
    out.print(f"{'initialised' if made else 'already initialised'} {data_dir} (operator {pub})")


@tenant_app.command("create")
def tenant_create(name: str, data_dir: DataDir) -> None:
    """Create a tenant with its own signing key and feed key."""
    try:
        t = operator_store(data_dir).create_tenant(name)
    except (FileExistsError, ProtocolError) as exc:
        fail(str(exc))
    out.print(f"tenant {t.name} ({public_id(t.key.verify_key.encode(), 'tenant')})")


@tenant_app.command("list")
def tenant_list(data_dir: DataDir) -> None:
    for name in operator_store(data_dir).tenants():
        out.print(name)


@token_app.command("create")
def token_create(
    data_dir: DataDir,
    tenant: Annotated[str, typer.Option(help="Tenant the agent joins.")] = DEFAULT_TENANT,
    role: Annotated[list[str] | None, typer.Option(help=f"Role(s): {ROLE_NAMES}.")] = None,
    ttl: Annotated[str, typer.Option(help="How long the token can be redeemed.")] = "1h",
    region: Annotated[str, typer.Option(help="Region (island) the agent must claim.")] = "",
    cred_ttl: Annotated[str, typer.Option(help="Lifetime of the credential it yields.")] = "30d",
    label: Annotated[list[str] | None, typer.Option(help=LABEL_HELP)] = None,
) -> None:
    """Create a one-time enrollment token (a secret: hand it to one operator). It redeems one
    agent name with one key; its roles, region and labels are signed into the credential."""
    try:
        token = operator_store(data_dir).token(
            tenant,
            role or ["agent"],
            parse_duration(ttl),
            region,
            parse_duration(cred_ttl),
            parse_labels(label),
        )
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    out.print(token.encode(), soft_wrap=True)


LABEL_HELP = "Policy label KEY=VALUE (repeatable), e.g. phi=true: signed, so routing trusts it."


def parse_labels(items: list[str] | None) -> dict[str, str]:
    labels = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"label {item!r}: use KEY=VALUE")
        labels[key] = value
    return labels


# --- agents --------------------------------------------------------------------------------------


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


@agent_app.command("join")
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


@agent_app.command("issue")
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


@agent_app.command("run")
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


@contextlib.asynccontextmanager
async def admin_session(op: OperatorStore, tenant: str, brokers: list[str]) -> AsyncIterator[Agent]:
    """A short-lived admin identity minted with the tenant key, for CLI actions."""
    keys = AgentKeys.issue(op, tenant, f"cli-{secrets.token_hex(4)}", ["admin"], ttl_s=600)
    agent = Agent(keys, brokers, backoff_max=0.5)
    try:
        yield await agent.start(wait=10)
    finally:
        await agent.stop()


@agent_app.command("revoke")
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

    async def push() -> None:
        async with admin_session(op, tenant, broker) as agent:
            await agent.send_revocation(blob)
            await agent.flush()  # a round trip: the broker has processed it

    if broker:
        run_async(push())
        out.print(f"brokers notified: {', '.join(broker)}")


Tenant = Annotated[str, typer.Option(help="Tenant to act in.")]
BrokerUrl = Annotated[str, typer.Option("--broker", help="Broker URL.")]
LOCAL_BROKER = "ws://127.0.0.1:7400"


@app.command()
def call(
    address: Annotated[str, typer.Argument(help="agent or agent/plugin")],
    method: str,
    data_dir: DataDir,
    params: Annotated[str, typer.Option(help="JSON parameters.")] = "null",
    tenant: Tenant = DEFAULT_TENANT,
    broker: BrokerUrl = LOCAL_BROKER,
    timeout: Annotated[float, typer.Option()] = 30.0,
) -> None:
    """Call an RPC method on an agent and print the JSON result (admin identity)."""
    op = operator_store(data_dir)

    async def main() -> Any:
        async with admin_session(op, tenant, [broker]) as agent:
            return await agent.call(address, method, json.loads(params), timeout=timeout)

    out.print_json(json.dumps(run_async(main()), default=str))


async def watch_once(op: OperatorStore, tenant: str, broker: str) -> list[dict[str, Any]]:
    async with admin_session(op, tenant, [broker]) as agent:
        return (await TenantWatch(agent).start()).rows()


@app.command()
def agents(
    data_dir: DataDir,
    tenant: Tenant = DEFAULT_TENANT,
    broker: BrokerUrl = LOCAL_BROKER,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """The tenant's agents: region, plugins, status and age of their last heartbeat."""
    rows = run_async(watch_once(operator_store(data_dir), tenant, broker))
    for row in rows:
        row.pop("metrics")
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table("agent", "region", "plugins", "status", "last heartbeat", box=None)
    for row in rows:
        table.add_row(
            row["name"],
            row["region"] or "-",
            ",".join(row["plugins"]),
            row["status"],
            f"{row['age_s']:.1f}s ago",
        )
    out.print(table)


@app.command()
def metrics(
    data_dir: DataDir,
    tenant: Tenant = DEFAULT_TENANT,
    broker: BrokerUrl = LOCAL_BROKER,
    prometheus: Annotated[bool, typer.Option(help="Prometheus text instead of JSON.")] = False,
) -> None:
    """One snapshot of every agent's metrics feed (JSON, or Prometheus text)."""
    rows = run_async(watch_once(operator_store(data_dir), tenant, broker))
    feeds = {row["name"]: row["metrics"] for row in rows if row["metrics"]}
    if prometheus:
        sys.stdout.write(prometheus_text(feeds))
    else:
        out.print_json(json.dumps(feeds, default=str))


@app.command()
def top(
    data_dir: DataDir,
    tenant: Tenant = DEFAULT_TENANT,
    broker: BrokerUrl = LOCAL_BROKER,
    sort: Annotated[str, typer.Option(help=f"Sort by: {', '.join(SORT_KEYS)}.")] = "name",
    refresh: Annotated[float, typer.Option(help="Seconds between redraws.")] = 1.0,
    once: Annotated[bool, typer.Option(help="Print one frame and exit.")] = False,
) -> None:
    """A live view of the tenant's agents: status, CPU, memory, GPU and plugin figures."""
    if sort not in SORT_KEYS:
        fail(f"unknown sort key {sort!r}; valid: {', '.join(SORT_KEYS)}")
    op = operator_store(data_dir)

    async def main() -> None:
        async with admin_session(op, tenant, [broker]) as agent:
            watch = await TenantWatch(agent).start()
            if once:  # piped output gets room for every column rather than 80 squeezed ones
                wide = out if out.is_terminal else Console(width=200)
                wide.print(render_top(watch.rows(), sort))
                return
            with Live(render_top(watch.rows(), sort), console=out, screen=False) as live:
                stop = asyncio.create_task(wait_for_signal())
                while not stop.done():
                    await asyncio.wait([stop], timeout=refresh)
                    live.update(render_top(watch.rows(), sort))

    run_async(main())


def remote_spec(text: str) -> tuple[str, str] | None:
    """``AGENT:PATH`` -> (agent, path); None for a local path."""
    agent, sep, path = text.partition(":")
    if not sep or "/" in agent or not agent:
        return None
    try:
        check_name(agent, "agent name")
    except ProtocolError:
        return None
    return agent, path


@app.command()
def cp(
    src: Annotated[str, typer.Argument(help="PATH or AGENT:PATH")],
    dst: Annotated[str, typer.Argument(help="AGENT:PATH or PATH")],
    data_dir: DataDir,
    tenant: Tenant = DEFAULT_TENANT,
    broker: BrokerUrl = LOCAL_BROKER,
    retries: Annotated[int, typer.Option(help="Reconnects to ride out before giving up.")] = 10,
) -> None:
    """Copy a file to or from an agent (within its files plugin's dirs), encrypted end to end,
    verified by sha256, resumed after a broken connection."""
    remote_src, remote_dst = remote_spec(src), remote_spec(dst)
    if (remote_src is None) == (remote_dst is None):
        fail("exactly one side must be AGENT:PATH")
    if remote_dst is not None and not Path(src).is_file():
        fail(f"no file {src}")
    op = operator_store(data_dir)

    async def main() -> int:
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
        )
        async with admin_session(op, tenant, [broker]) as agent:
            with Progress(*columns, console=err) as bar:
                task = bar.add_task(f"{src} -> {dst}", total=None)

                def progress(done: int, total: int) -> None:
                    bar.update(task, completed=done, total=total)

                if remote_dst is not None:
                    return await put_file(
                        agent, remote_dst[0], Path(src), remote_dst[1], progress, retries
                    )
                assert remote_src is not None
                return await get_file(
                    agent, remote_src[0], remote_src[1], Path(dst), progress, retries
                )

    moved = run_async(main())
    out.print(f"copied {src} -> {dst} ({moved} bytes transferred, sha256 verified)")


@app.command()
def tunnel(
    listen: Annotated[str, typer.Option(help="Local HOST:PORT to accept connections on.")],
    to: Annotated[str, typer.Option(help="AGENT:HOST:PORT the agent connects to.")],
    data_dir: DataDir,
    tenant: Tenant = DEFAULT_TENANT,
    broker: BrokerUrl = LOCAL_BROKER,
) -> None:
    """Forward local TCP connections through the overlay to HOST:PORT as seen from AGENT (its
    tunnel plugin must allow that destination)."""
    l_host, l_port = parse_listen(listen)
    try:
        agent_name, host, port = parse_target(to)
    except ValueError as exc:
        fail(str(exc))
    op = operator_store(data_dir)

    async def main() -> None:
        async with admin_session(op, tenant, [broker]) as agent:
            listener = await TunnelListener(agent, agent_name, host, port).start(l_host, l_port)
            bound = listener.address
            out.print(
                f"tunnel {bound[0]}:{bound[1]} -> {agent_name} -> {host}:{port}  (Ctrl-C stops)"
            )
            try:
                await wait_for_signal(agent)
            finally:
                await listener.stop()

    run_async(main())


# --- brokers and the all-in-one island -----------------------------------------------------------

broker_app = typer.Typer(
    help="Run a broker, or issue a broker identity for another host.", invoke_without_command=True
)
app.add_typer(broker_app, name="broker")


async def start_broker(b: BrokerSection, data_dir: Path, ca_file: Path | None) -> BrokerServer:
    """A broker as a ``[broker]`` section says (``data_dir``/``ca_file`` where it names none)."""
    server = BrokerServer.from_data_dir(
        b.data_dir or data_dir,
        max_message=b.max_message,
        queue_limit=b.queue_limit,
        ssl_context=server_tls(b.tls_cert, b.tls_key) if b.tls_cert and b.tls_key else None,
        peers=b.peers,
        peer_ssl=client_tls(b.ca_file or ca_file),
        advertise=b.advertise,
    )
    await server.start(*parse_listen(b.listen))
    out.print(f"broker {server.keys.name} listening on {server.url}")
    return server


@broker_app.callback()
def broker_run(
    ctx: typer.Context,
    data_dir: DataDir,
    config: Annotated[
        Path | None, typer.Option(help="A file with a [broker] section, instead of the options.")
    ] = None,
    listen: Annotated[str, typer.Option(help="HOST:PORT to listen on.")] = "127.0.0.1:7400",
    tls_cert: Annotated[Path | None, typer.Option(help="PEM certificate: serve wss://")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM private key for --tls-cert")] = None,
    advertise: Annotated[bool, typer.Option(help="Advertise on the LAN over mDNS.")] = True,
    peer: Annotated[
        list[str] | None, typer.Option(help="Peer broker URL to link with (repeatable).")
    ] = None,
    ca_file: Annotated[Path | None, typer.Option(help="CA bundle for wss:// peers.")] = None,
    idle_spin_us: IdleSpin = DEFAULT_IDLE_SPIN_US,
) -> None:
    """Run a broker until Ctrl-C."""
    if ctx.invoked_subcommand is not None:
        return
    try:
        if config is not None:
            given = [f"--{p.replace('_', '-')}" for p in BROKER_OPTIONS if _given(ctx, p)]
            if given:
                fail(f"--config holds the broker's settings: drop {', '.join(given)}")
            section = load_broker_config(config)
        else:
            section = BrokerSection(
                listen=listen,
                peers=peer or [],
                advertise=advertise,
                tls_cert=tls_cert,
                tls_key=tls_key,
                ca_file=ca_file,
                idle_spin_us=idle_spin_us,
            )
    except (OSError, ValueError) as exc:
        fail(f"{config or 'broker'}: {exc}")
    logs.setup()

    async def main() -> None:
        server = await start_broker(section, data_dir, None)
        try:
            await wait_for_signal()
        finally:
            await server.stop()

    run_async(main(), section.idle_spin_us)


BROKER_OPTIONS = ("listen", "tls_cert", "tls_key", "advertise", "peer", "ca_file", "idle_spin_us")


def _given(ctx: typer.Context, param: str) -> bool:
    source = ctx.get_parameter_source(param)
    return source is not None and source.name == "COMMANDLINE"


@broker_app.command("issue")
def broker_issue(
    data_dir: DataDir,
    name: Annotated[str, typer.Option(help="Broker name.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Data dir to create for that broker.")],
) -> None:
    """Create a broker key and operator-signed credential to copy to a broker host."""
    issue_broker_dir(operator_store(data_dir), out_dir, name)
    out.print(f"broker identity for {name} in {out_dir}: run `atoll broker --data-dir {out_dir}`")


ISLAND = "island"


@app.command()
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
    if inference not in ("local", "echo", "none"):
        fail(f"--inference must be local, echo or none, not {inference!r}")
    host, port = parse_listen(listen)
    logs.setup(os.environ.get("ATOLL_LOG_LEVEL", "WARNING"))
    op = OperatorStore(data_dir)
    if op.init():
        out.print(f"initialised {data_dir}")
    agent_dir = data_dir / "agents" / ISLAND
    roles = ["admin", "operator", "gateway", "storage", "training"]  # it runs every plugin
    try:
        keys = AgentKeys.load(agent_dir)
        if set(keys.ident.roles) != set(roles):  # a data dir from an older release
            raise FileNotFoundError
    except FileNotFoundError:
        keys = AgentKeys.issue(op, DEFAULT_TENANT, ISLAND, roles)
        keys.save(agent_dir)

    async def main() -> None:
        server = await BrokerServer.from_data_dir(data_dir, advertise=advertise).start(host, port)
        plugins: dict[str, dict[str, Any]] = {
            "storage": {},
            "gateway": {"listen": gateway},
            "training": {"mode": "both", "queue": f"{ISLAND}/training"},
        }
        if inference != "none":
            local = {"model": model}
            plugins["inference"] = {
                "backend": inference,
                "local": local,
                "storage": "island/storage",
            }
        rt = await AgentRuntime.start(
            agent_dir,
            [server.url],
            plugins,
            keys=keys,
            heartbeat=heartbeat,
            metrics_interval=metrics_interval,
        )
        # The island watches its tenant and publishes liveness changes on discovery.events.*
        liveness = await Discovery(rt.agent, publish_events=True).start()
        out.print(f"[bold]atoll island up[/bold] (data dir {data_dir})")
        out.print(f"  broker   {server.url}")
        out.print(f"  agent    {rt.agent.name} (tenant {rt.agent.tenant})")
        for status in rt.host.statuses():
            if status["name"] != "system":
                detail = status.get("error") or status.get("model") or status.get("url") or ""
                out.print(f"  plugin   {status['name']}: {status['state']} {detail}".rstrip())
        if "gateway" in rt.host.plugins:
            gw = rt.host.plugins["gateway"]
            out.print(f"  gateway  {gw.url}/v1  (OpenAI- and LoRAX-compatible API)")
            out.print(f"  web UI   {gw.url}/ui/")
            key_file = gw.ctx.data_dir / "admin-key"
            if gw.new_admin_key:  # the first run: shown here once, and kept 0600 for scripts
                key = gw.new_admin_key
                out.print(f"  admin    API key [bold]{key}[/bold] (also in {key_file})")
            else:
                out.print(f"  admin    API key in {key_file}")
        out.print("  try      atoll call island ping   |   Ctrl-C to stop")
        try:
            await wait_for_signal(rt.agent)
        finally:
            await liveness.stop()
            await rt.stop()
            await server.stop()
            out.print("stopped")

    with contextlib.suppress(KeyboardInterrupt):
        run_async(main(), idle_spin_us)


# --- gateway administration: users, projects, API keys (RPC to the gateway plugin) -----------

keys_app = typer.Typer(help="Gateway API keys: shown once, stored hashed.")
projects_app = typer.Typer(help="Gateway projects: members, policy labels, limits.")
users_app = typer.Typer(help="Gateway users.")
app.add_typer(keys_app, name="keys")
app.add_typer(projects_app, name="projects")
app.add_typer(users_app, name="users")
Gateway = Annotated[str, typer.Option("--gateway", help="Agent running the gateway plugin.")]


def gateway_call(
    data_dir: Path, tenant: str, broker: str, gateway: str, method: str, params: dict[str, Any]
) -> Any:
    op = operator_store(data_dir)

    async def main() -> Any:
        async with admin_session(op, tenant, [broker]) as agent:
            return await agent.call(f"{gateway}/gateway", method, params)

    try:
        return run_async(main())
    except AtollError as exc:
        fail(exc.message)


def show(result: Any) -> None:
    out.print_json(json.dumps(result, default=str))


def limits_of(rpm: int | None, tpm: int | None, concurrent: int | None) -> dict[str, Any] | None:
    given = {"requests_per_min": rpm, "tokens_per_min": tpm, "concurrent": concurrent}
    return given if any(v is not None for v in given.values()) else None


RPM = Annotated[int | None, typer.Option("--rpm", help="Requests per minute.")]
TPM = Annotated[int | None, typer.Option("--tpm", help="Tokens per minute.")]
Concurrent = Annotated[int | None, typer.Option(help="Requests at once.")]


@keys_app.command("create")
def keys_create(
    user: str,
    data_dir: DataDir,
    project: Annotated[str | None, typer.Option(help="Scope the key to one project.")] = None,
    name: Annotated[str, typer.Option(help="What the key is for.")] = "",
    ttl: Annotated[str | None, typer.Option(help="Lifetime, e.g. 90d.")] = None,
    rpm: RPM = None,
    tpm: TPM = None,
    concurrent: Concurrent = None,
    tenant: Tenant = DEFAULT_TENANT,
    broker: BrokerUrl = LOCAL_BROKER,
    gateway: Gateway = ISLAND,
) -> None:
    """Create an API key for USER; the key is printed once and never again."""
    params = {"user": user, "project": project, "name": name}
    params |= {
        "ttl_s": parse_duration(ttl) if ttl else None,
        "limits": limits_of(rpm, tpm, concurrent),
    }
    result = gateway_call(data_dir, tenant, broker, gateway, "keys_create", params)
    out.print(result["key"], highlight=False)
    err.print(f"key id {result['record']['key_id']} for {user}: store the key now, it is not kept")


@keys_app.command("list")
def keys_list(
    data_dir: DataDir,
    user: Annotated[str | None, typer.Option()] = None,
    project: Annotated[str | None, typer.Option()] = None,
    tenant: Tenant = DEFAULT_TENANT,
    broker: BrokerUrl = LOCAL_BROKER,
    gateway: Gateway = ISLAND,
) -> None:
    """API keys (ids, owners, state; never the secrets)."""
    show(
        gateway_call(
            data_dir, tenant, broker, gateway, "keys_list", {"user": user, "project": project}
        )
    )


@keys_app.command("revoke")
def keys_revoke(
    key_id: str,
    data_dir: DataDir,
    tenant: Tenant = DEFAULT_TENANT,
    broker: BrokerUrl = LOCAL_BROKER,
    gateway: Gateway = ISLAND,
) -> None:
    """Refuse the key from its next request on."""
    show(gateway_call(data_dir, tenant, broker, gateway, "keys_revoke", {"key_id": key_id}))


@keys_app.command("rotate")
def keys_rotate(
    key_id: str,
    data_dir: DataDir,
    grace: Annotated[str, typer.Option(help="How long the old key keeps working.")] = "1h",
    tenant: Tenant = DEFAULT_TENANT,
    broker: BrokerUrl = LOCAL_BROKER,
    gateway: Gateway = ISLAND,
) -> None:
    """A new key replacing KEY_ID (printed once); the old one works for the grace period."""
    params = {"key_id": key_id, "grace_s": parse_duration(grace)}
    result = gateway_call(data_dir, tenant, broker, gateway, "keys_rotate", params)
    out.print(result["key"], highlight=False)
    err.print(f"new key id {result['record']['key_id']}; {key_id} stops working after {grace}")


@projects_app.command("create")
def projects_create(
    name: str,
    data_dir: DataDir,
    label: Annotated[list[str], typer.Option(help="Policy label KEY=VALUE, e.g. phi=true.")] = [],  # noqa: B006
    store_prompts: Annotated[bool, typer.Option(help="Keep prompt text in the ledger.")] = False,
    rpm: RPM = None,
    tpm: TPM = None,
    concurrent: Concurrent = None,
    tenant: Tenant = DEFAULT_TENANT,
    broker: BrokerUrl = LOCAL_BROKER,
    gateway: Gateway = ISLAND,
) -> None:
    """Create a project; its label(s) restrict which inference agents serve it."""
    labels = dict(item.partition("=")[::2] for item in label)
    params = {"name": name, "labels": labels, "store_prompts": store_prompts}
    params["limits"] = limits_of(rpm, tpm, concurrent)
    show(gateway_call(data_dir, tenant, broker, gateway, "projects_create", params))


@projects_app.command("list")
def projects_list(
    data_dir: DataDir,
    tenant: Tenant = DEFAULT_TENANT,
    broker: BrokerUrl = LOCAL_BROKER,
    gateway: Gateway = ISLAND,
) -> None:
    """Projects with their members, labels and limits."""
    show(gateway_call(data_dir, tenant, broker, gateway, "projects_list", {}))


@projects_app.command("add-member")
def projects_add_member(
    project: str,
    user: str,
    data_dir: DataDir,
    role: Annotated[str, typer.Option(help="owner, member or viewer.")] = "member",
    tenant: Tenant = DEFAULT_TENANT,
    broker: BrokerUrl = LOCAL_BROKER,
    gateway: Gateway = ISLAND,
) -> None:
    """Add USER to PROJECT (or change their role)."""
    params = {"project": project, "user": user, "role": role}
    show(gateway_call(data_dir, tenant, broker, gateway, "projects_add_member", params))


@users_app.command("create")
def users_create(
    name: str,
    data_dir: DataDir,
    admin: Annotated[bool, typer.Option(help="A tenant-wide administrator.")] = False,
    tenant: Tenant = DEFAULT_TENANT,
    broker: BrokerUrl = LOCAL_BROKER,
    gateway: Gateway = ISLAND,
) -> None:
    """Create a gateway user."""
    params = {"name": name, "admin": admin}
    show(gateway_call(data_dir, tenant, broker, gateway, "users_create", params))


@users_app.command("list")
def users_list(
    data_dir: DataDir,
    tenant: Tenant = DEFAULT_TENANT,
    broker: BrokerUrl = LOCAL_BROKER,
    gateway: Gateway = ISLAND,
) -> None:
    """Gateway users."""
    show(gateway_call(data_dir, tenant, broker, gateway, "users_list", {}))


# --- datasets and training jobs (storage and training plugins, as a tenant admin) -------------

datasets_app = typer.Typer(help="Datasets in the storage agent's registry (immutable, versioned).")
train_app = typer.Typer(help="LoRA training jobs on the training queue.")
app.add_typer(datasets_app, name="datasets")
app.add_typer(train_app, name="train")
Storage = Annotated[str, typer.Option("--storage", help="Agent running the storage plugin.")]
Queue = Annotated[str, typer.Option("--queue", help="Agent running the training queue.")]
Owner = Annotated[str, typer.Option(help="The user it belongs to.")]


def admin_run(data_dir: Path, tenant: str, broker: str, work: Any) -> Any:
    """``await work(agent)`` as a short-lived tenant admin; platform errors end the command."""
    op = operator_store(data_dir)

    async def main() -> Any:
        async with admin_session(op, tenant, [broker]) as agent:
            return await work(agent)

    return run_async(main())


@datasets_app.command("upload")
def datasets_upload(
    path: Path,
    data_dir: DataDir,
    owner: Owner,
    name: Annotated[str | None, typer.Option(help="Dataset name (default: the file's).")] = None,
    project: Annotated[str | None, typer.Option()] = None,
    format: Annotated[str | None, typer.Option(help="alpaca, sharegpt, chat or text.")] = None,
    tenant: Tenant = DEFAULT_TENANT,
    broker: BrokerUrl = LOCAL_BROKER,
    storage: Storage = ISLAND,
) -> None:
    """Upload, validate and register a dataset (a new version if NAME exists)."""
    from atoll.plugins.storage.contract import upload_dataset

    async def work(agent: Agent) -> Any:
        return await upload_dataset(
            agent,
            storage,
            path,
            name or path.stem,
            owner,
            project,
            format,  # type: ignore[arg-type]
        )

    show(admin_run(data_dir, tenant, broker, work).model_dump(mode="json"))


@datasets_app.command("list")
def datasets_list(
    data_dir: DataDir,
    owner: Annotated[str | None, typer.Option()] = None,
    tenant: Tenant = DEFAULT_TENANT,
    broker: BrokerUrl = LOCAL_BROKER,
    storage: Storage = ISLAND,
) -> None:
    """Registered datasets: id, name, version, format, rows, tokens."""
    from atoll.plugins.storage.contract import list_datasets

    records = admin_run(data_dir, tenant, broker, lambda a: list_datasets(a, storage, owner))
    table = Table("id", "name", "v", "format", "rows", "tokens", "owner", box=None)
    for r in records:
        table.add_row(r.id, r.name, str(r.version), r.format, str(r.rows), str(r.tokens), r.owner)
    out.print(table)


@datasets_app.command("show")
def datasets_show(
    dataset_id: str,
    data_dir: DataDir,
    tenant: Tenant = DEFAULT_TENANT,
    broker: BrokerUrl = LOCAL_BROKER,
    storage: Storage = ISLAND,
) -> None:
    """One dataset's metadata and de-duplication report."""
    from atoll.plugins.storage.contract import describe_dataset

    record = admin_run(data_dir, tenant, broker, lambda a: describe_dataset(a, storage, dataset_id))
    show(record.model_dump(mode="json"))


@datasets_app.command("delete")
def datasets_delete(
    dataset_id: str,
    data_dir: DataDir,
    tenant: Tenant = DEFAULT_TENANT,
    broker: BrokerUrl = LOCAL_BROKER,
    storage: Storage = ISLAND,
) -> None:
    """Delete a dataset version."""
    from atoll.plugins.storage.contract import delete_dataset

    admin_run(data_dir, tenant, broker, lambda a: delete_dataset(a, storage, dataset_id))
    out.print(f"deleted {dataset_id}")


@train_app.command("submit")
def train_submit(
    data_dir: DataDir,
    owner: Owner,
    model: Annotated[str, typer.Option(help="Base model (as inference nodes serve it).")],
    dataset: Annotated[list[str], typer.Option(help="Dataset id(s).")],
    project: Annotated[str | None, typer.Option()] = None,
    option: Annotated[
        list[str], typer.Option(help="Any Table I option KEY=VALUE (JSON values), repeatable.")
    ] = [],  # noqa: B006
    tenant: Tenant = DEFAULT_TENANT,
    broker: BrokerUrl = LOCAL_BROKER,
    queue: Queue = ISLAND,
) -> None:
    """Queue a LoRA training job; prints its id."""
    from atoll.plugins.training.contract import submit_job

    options: dict[str, Any] = {"model_name_or_path": model, "dataset": dataset}
    for item in option:
        key, sep, value = item.partition("=")
        if not sep:
            fail(f"--option {item!r} is not KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    job = admin_run(
        data_dir, tenant, broker, lambda a: submit_job(a, queue, owner, options, project)
    )
    out.print(job.id, highlight=False)


@train_app.command("list")
def train_list(
    data_dir: DataDir,
    owner: Annotated[str | None, typer.Option()] = None,
    tenant: Tenant = DEFAULT_TENANT,
    broker: BrokerUrl = LOCAL_BROKER,
    queue: Queue = ISLAND,
) -> None:
    """Training jobs, newest first."""
    from atoll.plugins.training.contract import list_jobs

    jobs = admin_run(data_dir, tenant, broker, lambda a: list_jobs(a, queue, owner))
    table = Table("id", "state", "owner", "model", "trainer", "adapter", box=None)
    for j in jobs:
        model = j.options.model_name_or_path
        table.add_row(j.id, j.state, j.owner, model, j.trainer or "", j.adapter_id or j.error or "")
    out.print(table)


@train_app.command("status")
def train_status(
    job_id: str,
    data_dir: DataDir,
    tenant: Tenant = DEFAULT_TENANT,
    broker: BrokerUrl = LOCAL_BROKER,
    queue: Queue = ISLAND,
) -> None:
    """One job: state, timestamps, progress, final statistics."""
    from atoll.plugins.training.contract import get_job

    show(admin_run(data_dir, tenant, broker, lambda a: get_job(a, queue, job_id)).model_dump())


@train_app.command("cancel")
def train_cancel(
    job_id: str,
    data_dir: DataDir,
    tenant: Tenant = DEFAULT_TENANT,
    broker: BrokerUrl = LOCAL_BROKER,
    queue: Queue = ISLAND,
) -> None:
    """Cancel a job (its training process is stopped)."""
    from atoll.plugins.training.contract import cancel_job

    job = admin_run(data_dir, tenant, broker, lambda a: cancel_job(a, queue, job_id))
    out.print(f"{job.id}: {job.state}")


@train_app.command("logs")
def train_logs(
    job_id: str,
    data_dir: DataDir,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Until the job ends.")] = False,
    tenant: Tenant = DEFAULT_TENANT,
    broker: BrokerUrl = LOCAL_BROKER,
    queue: Queue = ISLAND,
) -> None:
    """A job's events; with --follow, a live progress bar with the loss until it ends."""
    from atoll.plugins.training.contract import follow_events, get_job, job_events

    async def work(agent: Agent) -> str:
        if not follow:
            for event in await job_events(agent, queue, job_id):
                out.print(event.get("message", event), highlight=False)
            return (await get_job(agent, queue, job_id)).state
        columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[loss]}"))
        with Progress(*columns, console=err, transient=False) as bar:
            task = bar.add_task(job_id, total=None, loss="")
            async for event in follow_events(agent, queue, job_id):
                if event.get("type") == "log":
                    loss = event.get("loss")
                    bar.update(
                        task,
                        total=event.get("max_steps"),
                        completed=event.get("step", 0),
                        loss=f"loss {loss:.4f}" if isinstance(loss, float) else "",
                    )
                elif event.get("message"):
                    bar.console.print(event["message"], highlight=False)
        return (await get_job(agent, queue, job_id)).state

    state = admin_run(data_dir, tenant, broker, work)
    out.print(f"{job_id}: {state}")
    if follow and state != "completed":
        raise typer.Exit(1)


def main() -> None:  # pragma: no cover - console entry
    sys.exit(app())


if __name__ == "__main__":
    main()
