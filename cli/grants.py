"""``atoll grant``: the operator's cross-tenant service grants (``atoll.protocol.grants``).

Only the operator signs them (tenants cannot): created, listed and revoked from the operator's
data dir, and pushed to a broker, which floods them across the mesh as it does revocations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from atoll.agent.node import Agent
from atoll.cli.admin import AdminTarget
from atoll.cli.console import fail, out
from atoll.cli.operator import operator_store
from atoll.cli.options import DataDir, parse_duration
from atoll.protocol.errors import ProtocolError
from atoll.protocol.grants import GRANTABLE_ROLES
from atoll.tenancy.operator import DEFAULT_TENANT

_ROLES = ", ".join(sorted(GRANTABLE_ROLES))
commands = typer.Typer(help="Cross-tenant service grants, signed by the operator.")
Brokers = Annotated[
    list[str], typer.Option("--broker", help="Broker(s) to push it to now (the mesh floods it).")
]


def parse_service(text: str) -> dict[str, str]:
    """``plugin`` or ``plugin:base-model`` (plugin names hold no ':')."""
    plugin, sep, model = text.partition(":")
    return {"plugin": plugin, "base_model": model} if sep else {"plugin": plugin}


def _push(data_dir: Path, brokers: list[str], blob: bytes) -> None:
    """Push ``blob`` as a short-lived agent of tenant ``default``: any agent may carry an
    operator-signed record, whose signature is what brokers check."""

    async def push(agent: Agent) -> None:
        await agent.send_grant(blob)
        await agent.flush()  # a round trip: the broker has taken (or refused) it

    AdminTarget(data_dir, DEFAULT_TENANT, brokers).run(push)
    out.print(f"brokers notified: {', '.join(brokers)}")


@commands.command("create")
def grant_create(
    data_dir: DataDir,
    exporter: Annotated[str, typer.Option(help="Tenant whose agents serve.")],
    importer: Annotated[str, typer.Option(help="Tenant whose callers may use them.")],
    service: Annotated[
        list[str], typer.Option(help="Exported service: PLUGIN or PLUGIN:BASE_MODEL (repeat).")
    ],
    role: Annotated[
        list[str] | None,
        typer.Option(
            help=f"Roles the importer's callers hold: {', '.join(sorted(GRANTABLE_ROLES))}."
        ),
    ] = None,
    ttl: Annotated[str, typer.Option(help="How long the grant lasts.")] = "30d",
    broker: Brokers = [],  # noqa: B006  # typer reads the default
) -> None:
    """Let IMPORTER's callers use SERVICE of EXPORTER's agents; prints the grant's id."""
    op = operator_store(data_dir)
    try:
        services = [parse_service(s) for s in service]
        grant = op.grant(exporter, importer, services, role or ["gateway"], parse_duration(ttl))
    except (ValueError, ProtocolError) as exc:
        fail(str(getattr(exc, "reason", exc)))
    out.print(f"grant {grant.id}: {importer} may use {', '.join(service)} of {exporter}")
    if broker:
        _push(data_dir, broker, grant.blob)


@commands.command("list")
def grant_list(data_dir: DataDir) -> None:
    """Every grant kept in the operator's data dir, with its state."""
    for grant, _blob, revoked in operator_store(data_dir).grants():
        if grant is None:
            out.print("(expired grant)")
            continue
        services = ", ".join(
            s.plugin + (f":{s.base_model}" if s.base_model else "") for s in grant.services
        )
        state = "revoked" if revoked else "active"
        out.print(
            f"{grant.id}  {grant.importer} -> {grant.exporter}  {services}  "
            f"roles {','.join(grant.roles)}  {state}"
        )


@commands.command("revoke")
def grant_revoke(
    grant_id: str,
    data_dir: DataDir,
    broker: Brokers = [],  # noqa: B006
) -> None:
    """Revoke grant GRANT_ID: every broker that hears of it cuts it at the next message."""
    op = operator_store(data_dir)
    try:
        blob = op.revoke_grant(grant_id)
    except (FileNotFoundError, ProtocolError) as exc:
        fail(str(getattr(exc, "reason", exc)))
    out.print(f"revoked grant {grant_id}")
    if broker:
        _push(data_dir, broker, blob)
