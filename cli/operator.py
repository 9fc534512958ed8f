"""The operator host's commands: its key, tenants and enrollment tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from atoll.cli.console import fail, out
from atoll.cli.options import LABEL_HELP, ROLE_NAMES, DataDir, parse_duration, parse_labels
from atoll.protocol.errors import ProtocolError
from atoll.tenancy.keys import public_id
from atoll.tenancy.operator import DEFAULT_TENANT, OperatorStore

commands = typer.Typer()
tenants = typer.Typer(help="Tenants: isolation boundaries with their own keys.")
tokens = typer.Typer(help="One-time enrollment tokens for agents.")


def operator_store(data_dir: Path) -> OperatorStore:
    """The operator's store in ``data_dir``; the command ends if it was never initialised."""
    op = OperatorStore(data_dir)
    if not op.initialised:
        fail(f"{data_dir} is not initialised: run `atoll init --data-dir {data_dir}`")
    return op


@commands.command()
def init(data_dir: DataDir) -> None:
    """Create the operator key and tenant 'default' (idempotent)."""
    op = OperatorStore(data_dir)
    made = op.init()
    pub = public_id(op.operator_pub, "operator")
    out.print(f"{'initialised' if made else 'already initialised'} {data_dir} (operator {pub})")


@tenants.command("create")
def tenant_create(name: str, data_dir: DataDir) -> None:
    """Create a tenant with its own signing key and feed key."""
    try:
        t = operator_store(data_dir).create_tenant(name)
    except (FileExistsError, ProtocolError) as exc:
        fail(str(exc))
    out.print(f"tenant {t.name} ({public_id(t.key.verify_key.encode(), 'tenant')})")


@tenants.command("list")
def tenant_list(data_dir: DataDir) -> None:
    for name in operator_store(data_dir).tenants():
        out.print(name)


@tokens.command("create")
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
