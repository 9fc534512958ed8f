"""The gateway's commands (`atoll keys|projects|users`): users, projects and API keys through
the gateway's admin methods, as a tenant admin. Registered under entry point group
``atoll.cli``."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from atoll.cli.admin import ISLAND, AdminTarget, admin_command
from atoll.cli.console import err, out, show
from atoll.cli.options import parse_duration
from atoll.plugins.gateway.contract import GatewayAdmin

keys = typer.Typer(help="Gateway API keys: shown once, stored hashed.")
projects = typer.Typer(help="Gateway projects: members, policy labels, limits.")
users = typer.Typer(help="Gateway users.")

Gateway = Annotated[str, typer.Option("--gateway", help="Agent running the gateway plugin.")]
RPM = Annotated[int | None, typer.Option("--rpm", help="Requests per minute.")]
TPM = Annotated[int | None, typer.Option("--tpm", help="Tokens per minute.")]
Concurrent = Annotated[int | None, typer.Option(help="Requests at once.")]


def limits_of(rpm: int | None, tpm: int | None, concurrent: int | None) -> dict[str, Any] | None:
    given = {"requests_per_min": rpm, "tokens_per_min": tpm, "concurrent": concurrent}
    return given if any(v is not None for v in given.values()) else None


@admin_command(keys, "create")
def keys_create(
    target: AdminTarget,
    user: str,
    project: Annotated[str | None, typer.Option(help="Scope the key to one project.")] = None,
    name: Annotated[str, typer.Option(help="What the key is for.")] = "",
    ttl: Annotated[str | None, typer.Option(help="Lifetime, e.g. 90d.")] = None,
    rpm: RPM = None,
    tpm: TPM = None,
    concurrent: Concurrent = None,
    gateway: Gateway = ISLAND,
) -> None:
    """Create an API key for USER; the key is printed once and never again."""
    ttl_s = parse_duration(ttl) if ttl else None
    limits = limits_of(rpm, tpm, concurrent)
    made = target.run(
        lambda a: GatewayAdmin(a, gateway).keys_create(user, project, name, ttl_s, limits)
    )
    out.print(made.key, highlight=False)
    err.print(f"key id {made.record['key_id']} for {user}: store the key now, it is not kept")


@admin_command(keys, "list")
def keys_list(
    target: AdminTarget,
    user: Annotated[str | None, typer.Option()] = None,
    project: Annotated[str | None, typer.Option()] = None,
    gateway: Gateway = ISLAND,
) -> None:
    """API keys (ids, owners, state; never the secrets)."""
    show(target.run(lambda a: GatewayAdmin(a, gateway).keys_list(user, project)))


@admin_command(keys, "revoke")
def keys_revoke(target: AdminTarget, key_id: str, gateway: Gateway = ISLAND) -> None:
    """Refuse the key from its next request on."""
    show(target.run(lambda a: GatewayAdmin(a, gateway).keys_revoke(key_id)))


@admin_command(keys, "rotate")
def keys_rotate(
    target: AdminTarget,
    key_id: str,
    grace: Annotated[str, typer.Option(help="How long the old key keeps working.")] = "1h",
    gateway: Gateway = ISLAND,
) -> None:
    """A new key replacing KEY_ID (printed once); the old one works for the grace period."""
    grace_s = parse_duration(grace)
    made = target.run(lambda a: GatewayAdmin(a, gateway).keys_rotate(key_id, grace_s))
    out.print(made.key, highlight=False)
    err.print(f"new key id {made.record['key_id']}; {key_id} stops working after {grace}")


@admin_command(projects, "create")
def projects_create(
    target: AdminTarget,
    name: str,
    label: Annotated[list[str], typer.Option(help="Policy label KEY=VALUE, e.g. phi=true.")] = [],  # noqa: B006
    store_prompts: Annotated[bool, typer.Option(help="Keep prompt text in the ledger.")] = False,
    rpm: RPM = None,
    tpm: TPM = None,
    concurrent: Concurrent = None,
    gateway: Gateway = ISLAND,
) -> None:
    """Create a project; its label(s) restrict which inference agents serve it."""
    labels = dict(item.partition("=")[::2] for item in label)
    limits = limits_of(rpm, tpm, concurrent)
    show(
        target.run(
            lambda a: GatewayAdmin(a, gateway).projects_create(name, labels, store_prompts, limits)
        )
    )


@admin_command(projects, "list")
def projects_list(target: AdminTarget, gateway: Gateway = ISLAND) -> None:
    """Projects with their members, labels and limits."""
    show(target.run(lambda a: GatewayAdmin(a, gateway).projects_list()))


@admin_command(projects, "add-member")
def projects_add_member(
    target: AdminTarget,
    project: str,
    user: str,
    role: Annotated[str, typer.Option(help="owner, member or viewer.")] = "member",
    gateway: Gateway = ISLAND,
) -> None:
    """Add USER to PROJECT (or change their role)."""
    show(target.run(lambda a: GatewayAdmin(a, gateway).projects_add_member(project, user, role)))


@admin_command(users, "create")
def users_create(
    target: AdminTarget,
    name: str,
    admin: Annotated[bool, typer.Option(help="A tenant-wide administrator.")] = False,
    gateway: Gateway = ISLAND,
) -> None:
    """Create a gateway user."""
    show(target.run(lambda a: GatewayAdmin(a, gateway).users_create(name, admin)))


@admin_command(users, "list")
def users_list(target: AdminTarget, gateway: Gateway = ISLAND) -> None:
    """Gateway users."""
    show(target.run(lambda a: GatewayAdmin(a, gateway).users_list()))
