"""Reaching agents directly over the overlay as a tenant admin: an RPC call, a file copy, a TCP
tunnel."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from atoll.agent.files import get_file, put_file
from atoll.agent.node import Agent
from atoll.agent.tunnel import TunnelListener, parse_target
from atoll.cli.admin import AdminTarget, admin_command
from atoll.cli.console import err, fail, out, show
from atoll.cli.loop import wait_for_signal
from atoll.cli.options import parse_listen
from atoll.protocol.errors import ProtocolError
from atoll.protocol.subjects import check_name

commands = typer.Typer()


@admin_command(commands)
def call(
    target: AdminTarget,
    address: Annotated[str, typer.Argument(help="agent or agent/plugin")],
    method: str,
    params: Annotated[str, typer.Option(help="JSON parameters.")] = "null",
    timeout: Annotated[float, typer.Option()] = 30.0,
) -> None:
    """Call an RPC method on an agent and print the JSON result (admin identity)."""

    async def rpc(agent: Agent) -> Any:
        return await agent.call(address, method, json.loads(params), timeout=timeout)

    show(target.run(rpc))


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


@admin_command(commands)
def cp(
    target: AdminTarget,
    src: Annotated[str, typer.Argument(help="PATH or AGENT:PATH")],
    dst: Annotated[str, typer.Argument(help="AGENT:PATH or PATH")],
    retries: Annotated[int, typer.Option(help="Reconnects to ride out before giving up.")] = 10,
) -> None:
    """Copy a file to or from an agent (within its files plugin's dirs), encrypted end to end,
    verified by sha256, resumed after a broken connection."""
    remote_src, remote_dst = remote_spec(src), remote_spec(dst)
    if (remote_src is None) == (remote_dst is None):
        fail("exactly one side must be AGENT:PATH")
    if remote_dst is not None and not Path(src).is_file():
        fail(f"no file {src}")

    async def copy(agent: Agent) -> int:
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=err) as bar:
            task = bar.add_task(f"{src} -> {dst}", total=None)

            def progress(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            if remote_dst is not None:
                return await put_file(
                    agent, remote_dst[0], Path(src), remote_dst[1], progress, retries
                )
            assert remote_src is not None
            return await get_file(agent, remote_src[0], remote_src[1], Path(dst), progress, retries)

    moved = target.run(copy)
    out.print(f"copied {src} -> {dst} ({moved} bytes transferred, sha256 verified)")


@admin_command(commands)
def tunnel(
    target: AdminTarget,
    listen: Annotated[str, typer.Option(help="Local HOST:PORT to accept connections on.")],
    to: Annotated[str, typer.Option(help="AGENT:HOST:PORT the agent connects to.")],
) -> None:
    """Forward local TCP connections through the overlay to HOST:PORT as seen from AGENT (its
    tunnel plugin must allow that destination)."""
    l_host, l_port = parse_listen(listen)
    try:
        agent_name, host, port = parse_target(to)
    except ValueError as exc:
        fail(str(exc))

    async def forward(agent: Agent) -> None:
        listener = await TunnelListener(agent, agent_name, host, port).start(l_host, l_port)
        bound = listener.address
        out.print(f"tunnel {bound[0]}:{bound[1]} -> {agent_name} -> {host}:{port}  (Ctrl-C stops)")
        try:
            await wait_for_signal(agent)
        finally:
            await listener.stop()

    target.run(forward)
