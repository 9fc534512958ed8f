"""`atoll me ...`: what users do with their own API key, over the gateway's HTTP API (``/me``):
their keys, their usage and what is left of their budgets. No operator data dir: the key is
the credential. Registered under entry point group ``atoll.cli``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from atoll.cli.console import err, fail, out, show
from atoll.cli.options import parse_duration
from atoll.plugins.gateway.commands import AsCsv, By, Since, Until, parse_time

me = typer.Typer(help="Your own gateway keys, usage and budgets, with your API key.")

Url = Annotated[
    str,
    typer.Option("--url", envvar="ATOLL_GATEWAY_URL", help="The gateway (ATOLL_GATEWAY_URL)."),
]
Key = Annotated[
    str,
    typer.Option(
        "--key",
        envvar=["ATOLL_API_KEY", "OPENAI_API_KEY"],
        help="Your API key (ATOLL_API_KEY or OPENAI_API_KEY).",
        show_default=False,
    ),
]
LOCAL = "http://127.0.0.1:8000"


def call(url: str, key: str, method: str, path: str, **options: Any) -> httpx.Response:
    """One request with the key; a refusal ends the command with the gateway's words."""
    try:
        reply = httpx.request(
            method,
            url.rstrip("/") + path,
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
            **options,
        )
    except httpx.HTTPError as exc:
        fail(f"{url}: {exc}")
    if reply.is_error:
        try:
            message = reply.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = reply.text
        fail(f"{reply.status_code}: {message}")
    return reply


def upload_rows(url: str, key: str, data: Path) -> str:
    """Upload ``data`` (chat rows) as a file of the key's; its id."""
    with data.open("rb") as f:
        files = {"file": (data.name, f)}
        uploaded = call(url, key, "POST", "/v1/files", data={"purpose": "fine-tune"}, files=files)
    return str(uploaded.json()["id"])


def until_done(url: str, key: str, path: str, what: str, poll_s: float = 1.0) -> dict[str, Any]:
    """Poll the run at ``path`` until it ends; a run that did not succeed ends the command."""
    report: dict[str, Any] = call(url, key, "GET", path).json()
    while report["status"] in ("queued", "running"):
        time.sleep(poll_s)
        report = call(url, key, "GET", path).json()
    if report["status"] != "succeeded":
        why = (report.get("error") or {}).get("message")
        fail(f"{what} {report['id']} {report['status']}: {why}")
    return report


@me.command("keys")
def keys(key: Key, url: Url = LOCAL) -> None:
    """Your keys (a project-scoped key: its project's), never their secrets."""
    show(call(url, key, "GET", "/me/keys").json())


@me.command("create-key")
def create_key(
    key: Key,
    project: Annotated[str | None, typer.Option(help="Scope it to one of your projects.")] = None,
    name: Annotated[str, typer.Option(help="What the key is for.")] = "",
    ttl: Annotated[str | None, typer.Option(help="Lifetime, e.g. 90d.")] = None,
    url: Url = LOCAL,
) -> None:
    """A new key of yours, printed once (its id on stderr)."""
    body = {"project": project, "name": name, "ttl_s": parse_duration(ttl) if ttl else None}
    made = call(url, key, "POST", "/me/keys", json=body).json()
    out.print(made["key"], highlight=False)
    err.print(f"key id {made['record']['key_id']}: store the key now, it is not kept")


@me.command("rotate-key")
def rotate_key(
    key: Key,
    key_id: str,
    grace: Annotated[str, typer.Option(help="How long the old key keeps working.")] = "1h",
    url: Url = LOCAL,
) -> None:
    """A new key replacing one of yours (printed once); the old one works for the grace."""
    body = {"key_id": key_id, "grace_s": parse_duration(grace)}
    made = call(url, key, "POST", "/me/keys/rotate", json=body).json()
    out.print(made["key"], highlight=False)
    err.print(f"new key id {made['record']['key_id']}; {key_id} stops working after {grace}")


@me.command("revoke-key")
def revoke_key(key: Key, key_id: str, url: Url = LOCAL) -> None:
    """Refuse one of your keys from its next request on."""
    show(call(url, key, "POST", "/me/keys/revoke", json={"key_id": key_id}).json())


@me.command("usage")
def usage(
    key: Key,
    since: Since = None,
    until: Until = None,
    by: By = "model,adapter",
    as_csv: AsCsv = False,
    url: Url = LOCAL,
) -> None:
    """Your usage over a period: totals and groups (by model and adapter)."""
    params: dict[str, Any] = {"group_by": by, "format": "csv" if as_csv else "json"}
    if since:
        params["since"] = parse_time(since)
    if until:
        params["until"] = parse_time(until)
    reply = call(url, key, "GET", "/me/usage", params=params)
    if as_csv:
        out.print(reply.text, end="", highlight=False, markup=False)
    else:
        show(reply.json())


@me.command("budgets")
def budgets(key: Key, url: Url = LOCAL) -> None:
    """The budgets your requests are checked against: spent, held, left, when they reset."""
    show(call(url, key, "GET", "/me/budgets").json())
