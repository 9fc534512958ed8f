"""The tenant's live state as an admin sees it: its agents, their metrics feed, ``atoll top``."""

from __future__ import annotations

import asyncio
import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from atoll.agent.node import Agent
from atoll.agent.prometheus import prometheus_text
from atoll.agent.top import SORT_KEYS, render_top
from atoll.agent.watch import TenantWatch
from atoll.cli.admin import AdminTarget, admin_command
from atoll.cli.console import fail, out, show
from atoll.cli.loop import wait_for_signal

commands = typer.Typer()


async def snapshot(agent: Agent) -> list[dict[str, Any]]:
    """One row per agent of the tenant: its discovery entry and its latest metrics."""
    return (await TenantWatch(agent).start()).rows()


@admin_command(commands)
def agents(
    target: AdminTarget,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """The tenant's agents: region, plugins, status and age of their last heartbeat."""
    rows = target.run(snapshot)
    for row in rows:
        row.pop("metrics")
    if as_json:
        show(rows)
        return
    table = Table("agent", "region", "plugins", "status", "last heartbeat", box=None)
    refused = any("refused" in row for row in rows)
    if refused:
        table.add_column("refused")
    for row in rows:
        cells = [
            row["name"],
            row["region"] or "-",
            ",".join(row["plugins"]),
            row["status"],
            f"{row['age_s']:.1f}s ago",
        ]
        table.add_row(*cells, *([row.get("refused", "")] if refused else []))
    out.print(table)


@admin_command(commands)
def metrics(
    target: AdminTarget,
    prometheus: Annotated[bool, typer.Option(help="Prometheus text instead of JSON.")] = False,
) -> None:
    """One snapshot of every agent's metrics feed (JSON, or Prometheus text)."""
    feeds = {row["name"]: row["metrics"] for row in target.run(snapshot) if row["metrics"]}
    if prometheus:
        sys.stdout.write(prometheus_text(feeds))
    else:
        show(feeds)


@admin_command(commands)
def top(
    target: AdminTarget,
    sort: Annotated[str, typer.Option(help=f"Sort by: {', '.join(SORT_KEYS)}.")] = "name",
    refresh: Annotated[float, typer.Option(help="Seconds between redraws.")] = 1.0,
    once: Annotated[bool, typer.Option(help="Print one frame and exit.")] = False,
) -> None:
    """A live view of the tenant's agents: status, CPU, memory, GPU and plugin figures."""
    if sort not in SORT_KEYS:
        fail(f"unknown sort key {sort!r}; valid: {', '.join(SORT_KEYS)}")

    async def view(agent: Agent) -> None:
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

    target.run(view)
