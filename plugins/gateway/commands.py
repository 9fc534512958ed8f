"""The gateway's commands (`atoll keys|projects|users|budgets|usage|audit|retention`): users,
projects, API keys, budgets, usage reports, the audit log's verification and retention through
the gateway's admin methods, as a tenant admin. Registered
under entry point group ``atoll.cli``; what users do with their own key is me_commands.py's."""

from __future__ import annotations

import csv
import sys
import time
from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from atoll.cli.admin import ISLAND, AdminTarget, admin_command
from atoll.cli.console import err, out, show
from atoll.cli.options import parse_duration
from atoll.plugins.gateway.contract import GatewayAdmin

keys = typer.Typer(help="Gateway API keys: shown once, stored hashed.")
projects = typer.Typer(help="Gateway projects: members, policy labels, limits.")
users = typer.Typer(help="Gateway users.")
budgets = typer.Typer(help="Gateway budgets: tokens or cost per key, user or project and period.")
usage = typer.Typer(help="Gateway usage reports (chargeback).")
audit = typer.Typer(help="The gateway's audit log: hash-chained, its head signed.")
retention = typer.Typer(help="How long projects' prompts, ledger rows and datasets are kept.")

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


@admin_command(users, "identities")
def users_identities(
    target: AdminTarget,
    user: Annotated[str | None, typer.Option(help="Only this user's.")] = None,
    gateway: Gateway = ISLAND,
) -> None:
    """Which identity provider accounts (single sign-on) log in as which users."""
    show(target.run(lambda a: GatewayAdmin(a, gateway).identities_list(user)))


@admin_command(users, "link")
def users_link(
    target: AdminTarget,
    user: str,
    issuer: Annotated[str, typer.Option(help="The provider's issuer URL.")],
    subject: Annotated[str, typer.Option(help="The account's subject (its ID token's sub).")],
    gateway: Gateway = ISLAND,
) -> None:
    """Make an identity provider's account log in as USER (e.g. one the provider made anew)."""
    show(target.run(lambda a: GatewayAdmin(a, gateway).identities_link(user, issuer, subject)))


@admin_command(users, "unlink")
def users_unlink(
    target: AdminTarget,
    issuer: Annotated[str, typer.Option(help="The provider's issuer URL.")],
    subject: Annotated[str, typer.Option(help="The account's subject (its ID token's sub).")],
    gateway: Gateway = ISLAND,
) -> None:
    """Stop an identity provider's account logging in as its user (its keys stay: revoke them)."""
    show(target.run(lambda a: GatewayAdmin(a, gateway).identities_unlink(issuer, subject)))


def parse_time(text: str) -> float:
    """A date (``2026-01-31``, UTC midnight), epoch seconds, or a duration ago (``30d``)."""
    try:
        return datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC).timestamp()
    except ValueError:
        pass
    if text.replace(".", "", 1).isdigit() and len(text) > 6:
        return float(text)
    return time.time() - parse_duration(text)


def print_csv(rows: list[dict[str, Any]]) -> None:
    if rows:
        writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


Since = Annotated[
    str | None, typer.Option(help="From: a date (2026-01-31, UTC), epoch seconds or 30d ago.")
]
Until = Annotated[str | None, typer.Option(help="To (not included), as --since.")]
By = Annotated[
    str, typer.Option("--by", help="Total by columns: user,project,key_id,model,adapter.")
]
AsCsv = Annotated[bool, typer.Option("--csv", help="The groups as CSV.")]


def subject_of(user: str | None, project: str | None, key: str | None) -> tuple[str, str]:
    given = [(s, v) for s, v in (("user", user), ("project", project), ("key", key)) if v]
    if len(given) != 1:
        raise typer.BadParameter("name exactly one of --user, --project, --key")
    return given[0]


@admin_command(budgets, "set")
def budgets_set(
    target: AdminTarget,
    user: Annotated[str | None, typer.Option(help="A user's budget.")] = None,
    project: Annotated[str | None, typer.Option(help="A project's budget.")] = None,
    key: Annotated[str | None, typer.Option(help="A key's budget (its k_ id).")] = None,
    tokens: Annotated[int | None, typer.Option(help="Tokens per period.")] = None,
    cost: Annotated[float | None, typer.Option(help="Cost per period (price table units).")] = None,
    period: Annotated[str, typer.Option(help="daily, weekly, monthly or total.")] = "monthly",
    gateway: Gateway = ISLAND,
) -> None:
    """Set a budget (a new limit for one that exists; what is spent stays)."""
    scope, subject = subject_of(user, project, key)
    if (tokens is None) == (cost is None):
        raise typer.BadParameter("give exactly one of --tokens, --cost")
    metric, limit = ("tokens", float(tokens)) if tokens is not None else ("cost", float(cost or 0))
    show(
        target.run(
            lambda a: GatewayAdmin(a, gateway).budgets_set(scope, subject, metric, period, limit)
        )
    )


@admin_command(budgets, "list")
def budgets_list(
    target: AdminTarget,
    user: Annotated[str | None, typer.Option()] = None,
    project: Annotated[str | None, typer.Option()] = None,
    key: Annotated[str | None, typer.Option()] = None,
    gateway: Gateway = ISLAND,
) -> None:
    """Budgets with what is spent, held by requests in flight, left, and when they reset."""
    given = [(s, v) for s, v in (("user", user), ("project", project), ("key", key)) if v]
    scope, subject = subject_of(user, project, key) if given else (None, None)
    show(target.run(lambda a: GatewayAdmin(a, gateway).budgets_list(scope, subject)))


@admin_command(budgets, "remove")
def budgets_remove(target: AdminTarget, budget_id: str, gateway: Gateway = ISLAND) -> None:
    """Remove a budget by its id (scope:subject:metric:period)."""
    show(target.run(lambda a: GatewayAdmin(a, gateway).budgets_remove(budget_id)))


@admin_command(usage, "report")
def usage_report(
    target: AdminTarget,
    user: Annotated[str | None, typer.Option()] = None,
    project: Annotated[str | None, typer.Option()] = None,
    key: Annotated[str | None, typer.Option(help="A key id (k_...).")] = None,
    since: Since = None,
    until: Until = None,
    by: By = "user,project,model,adapter",
    as_csv: AsCsv = False,
    gateway: Gateway = ISLAND,
) -> None:
    """Usage totals over a period, grouped (JSON, or the groups as CSV for chargeback)."""
    query = {
        "user": user, "project": project, "key_id": key, "group_by": by,
        "since": parse_time(since) if since else None,
        "until": parse_time(until) if until else None,
    }  # fmt: skip
    report = target.run(lambda a: GatewayAdmin(a, gateway).usage(**query))
    if as_csv:
        print_csv(report["groups"])
    else:
        show(report)


@admin_command(audit, "verify")
def audit_verify(target: AdminTarget, gateway: Gateway = ISLAND) -> None:
    """Re-compute the audit log's hash chain and check its signed head; exit 1 naming the first
    bad row if a row was edited, removed or inserted."""
    verdict = target.run(lambda a: GatewayAdmin(a, gateway).audit_verify())
    show(verdict)
    if not verdict["ok"]:
        err.print(f"audit log NOT intact: {verdict['problem']}")
        raise typer.Exit(1)
    err.print(f"audit log intact: {verdict['rows']} rows, head signed by {verdict['public_key']}")


Period = Annotated[str | None, typer.Option(help="Kept this long (e.g. 30d); left out: forever.")]


@admin_command(retention, "set")
def retention_set(
    target: AdminTarget,
    project: str,
    prompts: Period = None,
    ledger: Period = None,
    datasets: Period = None,
    gateway: Gateway = ISLAND,
) -> None:
    """Set PROJECT's periods (all three replaced): prompt text in the ledger, the ledger's rows,
    datasets in storage from their upload. None given: the project keeps everything."""
    periods = [parse_duration(p) if p else None for p in (prompts, ledger, datasets)]
    show(target.run(lambda a: GatewayAdmin(a, gateway).retention_set(project, *periods)))


@admin_command(retention, "list")
def retention_list(target: AdminTarget, gateway: Gateway = ISLAND) -> None:
    """Projects' retention periods (seconds)."""
    show(target.run(lambda a: GatewayAdmin(a, gateway).retention_list()))


@admin_command(retention, "purge")
def retention_purge(
    target: AdminTarget,
    dry_run: Annotated[bool, typer.Option(help="Report what would go; change nothing.")] = False,
    gateway: Gateway = ISLAND,
) -> None:
    """Purge what is past its period in every project with a policy, and report it."""
    show(target.run(lambda a: GatewayAdmin(a, gateway).retention_purge(dry_run)))
