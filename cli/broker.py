"""``atoll broker``: run a broker, or issue a broker identity for another host."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from atoll import logs
from atoll.agent.config import BrokerSection, load_broker_config
from atoll.broker.identity import issue_broker_dir
from atoll.broker.server import BrokerServer
from atoll.cli.console import fail, out
from atoll.cli.loop import run_async, wait_for_signal
from atoll.cli.operator import operator_store
from atoll.cli.options import DataDir, IdleSpin, parse_listen
from atoll.eventloop import DEFAULT_IDLE_SPIN_US
from atoll.transport import client_tls, server_tls

brokers = typer.Typer(
    help="Run a broker, or issue a broker identity for another host.", invoke_without_command=True
)
# The options a --config file replaces (naming one beside it is an error).
BROKER_OPTIONS = ("listen", "tls_cert", "tls_key", "advertise", "peer", "ca_file", "idle_spin_us")


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
        kept_ttl=b.kept_ttl_s,
    )
    await server.start(*parse_listen(b.listen))
    return server


def listening(server: BrokerServer) -> str:
    return f"broker {server.keys.name} listening on {server.url}"


@brokers.callback()
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
            options = {
                "listen": listen,
                "peers": peer or [],
                "advertise": advertise,
                "tls_cert": tls_cert,
                "tls_key": tls_key,
                "ca_file": ca_file,
                "idle_spin_us": idle_spin_us,
            }
            section = BrokerSection.model_validate(options)  # checked as a file's section is
    except (OSError, ValueError) as exc:
        fail(f"{config or 'broker'}: {exc}")
    logs.setup()

    async def main() -> None:
        server = await start_broker(section, data_dir, None)
        out.print(listening(server))
        try:
            await wait_for_signal()
        finally:
            await server.stop()

    run_async(main(), section.idle_spin_us)


def _given(ctx: typer.Context, param: str) -> bool:
    source = ctx.get_parameter_source(param)
    return source is not None and source.name == "COMMANDLINE"


@brokers.command("issue")
def broker_issue(
    data_dir: DataDir,
    name: Annotated[str, typer.Option(help="Broker name.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Data dir to create for that broker.")],
) -> None:
    """Create a broker key and operator-signed credential to copy to a broker host."""
    issue_broker_dir(operator_store(data_dir), out_dir, name)
    out.print(f"broker identity for {name} in {out_dir}: run `atoll broker --data-dir {out_dir}`")
