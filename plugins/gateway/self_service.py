"""Users serve themselves, with any valid key of theirs, under ``/me``: list, create, rotate and
revoke their own keys, see their own usage and what is left of their budgets. A key acts only for
its own user, and never wider than itself:

- a project-scoped key sees and makes only keys of its project (an unscoped key of an
  administrator is an admin key: a scoped key must not mint one);
- an unscoped key may make keys for the user or for a project the user belongs to;
- a new key keeps the calling key's limits (it may only narrow them) and does not outlive it;
  a rotated key's successor expires when it would have;
- another user's key id is answered 404, as an id that does not exist.

Budgets are an administrator's: a user's and a project's bind every key of them, self-made ones
included; a key's budget binds that key alone."""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations.
from typing import Any

from fastapi import FastAPI, Request

from atoll.plugins.gateway import contract as c
from atoll.plugins.gateway.accounts.keys import KeyRecord, Principal
from atoll.plugins.gateway.admin import plain
from atoll.plugins.gateway.bodies import parse_body
from atoll.plugins.gateway.contract import Limits
from atoll.plugins.gateway.errors import GatewayError
from atoll.plugins.gateway.service import Gateway


def install(app: FastAPI, gw: Gateway, user: Any, as_csv: Any) -> None:
    """Add ``/me/*``; ``user`` is app.py's authenticated-caller dependency, ``as_csv`` its CSV
    rendering of a usage report."""
    accounts = gw.accounts

    def own_key(p: Principal, key_id: str) -> KeyRecord:
        for record in accounts.list_keys(p.user, p.project):
            if record.key_id == key_id:
                return record
        raise GatewayError(404, f"no key {key_id!r}", code="key_not_found", param="key_id")

    @app.get("/me", tags=["self-service"])
    async def whoami(principal: user) -> Any:
        """Who the key acts for, and the projects it may make keys in (with the user's role)."""
        p: Principal = principal
        projects = accounts.memberships(p.user)
        if p.project is not None:
            projects = {p.project: projects.get(p.project, "")}
        return {"user": p.user, "project": p.project, "admin": p.admin, "key_id": p.key_id,
                "projects": projects}  # fmt: skip

    @app.get("/me/keys", tags=["self-service"])
    async def my_keys(principal: user) -> Any:
        """The caller's user's keys (a project-scoped key: its project's only), never secrets."""
        p: Principal = principal
        return plain(accounts.list_keys(p.user, p.project))

    @app.post("/me/keys", tags=["self-service"])
    async def make_key(principal: user, body: c.OwnKeyCreate) -> Any:
        """A new key of the caller's user: ``{key, record}``, the key shown this once."""
        p: Principal = principal
        project = body.project if p.project is None else (body.project or p.project)
        if p.project is not None and project != p.project:
            raise GatewayError(
                403,
                f"API key {p.key_id} is scoped to project {p.project!r}: it makes keys of that "
                "project only",
                code="permission_denied",
                param="project",
            )
        caller = own_key(p, p.key_id)
        limits = _narrowed(caller.limits, body.limits)
        ttl_s = body.ttl_s
        if caller.expires_at is not None:
            left = caller.expires_at - accounts.now()
            if ttl_s is not None and ttl_s > left:
                raise GatewayError(
                    400,
                    f"ttl_s: a key may not outlive the key that makes it ({p.key_id} expires in "
                    f"{left:.0f} s)",
                    param="ttl_s",
                )
            ttl_s = ttl_s or left
        # create_key refuses a project the user is not a member of (400 not_a_member).
        record, key = accounts.create_key(p.user, project, body.name, ttl_s, limits, actor=p.user)
        return {"key": key, "record": plain(record)}

    @app.post("/me/keys/rotate", tags=["self-service"])
    async def rotate_key(principal: user, body: c.KeyRotate) -> Any:
        """A new key for one of the caller's own, expiring when it would have; the old one
        works for ``grace_s``."""
        p: Principal = principal
        own_key(p, body.key_id)
        record, key = accounts.rotate_key(body.key_id, body.grace_s, actor=p.user, keep_expiry=True)
        return {"key": key, "record": plain(record)}

    @app.post("/me/keys/revoke", tags=["self-service"])
    async def revoke_key(principal: user, body: c.KeyRef) -> Any:
        """Refuse one of the caller's own keys from its next request on (itself included)."""
        p: Principal = principal
        own_key(p, body.key_id)
        return plain(accounts.revoke_key(body.key_id, actor=p.user))

    @app.get("/me/usage", tags=["self-service"])
    async def my_usage(principal: user, request: Request) -> Any:
        """The caller's user's usage (a project-scoped key: in its project) over a period,
        totalled and grouped (by model and adapter unless ``group_by`` says otherwise)."""
        p: Principal = principal
        q = parse_body(c.OwnUsageQuery, dict(request.query_params))
        groups = [g.strip() for g in q.group_by.split(",")]
        query = (None, p.project, p.user, q.since, q.until)
        report: dict[str, Any] = plain(accounts.usage(*query))
        report["groups"] = accounts.usage_report(groups, *query)
        return as_csv(report) if q.format == "csv" else report

    @app.get("/me/budgets", tags=["self-service"])
    async def my_budgets(principal: user) -> Any:
        """Every budget the caller's requests are checked against, with what is left."""
        p: Principal = principal
        return plain(accounts.budgets_of(p.key_id, p.user, p.project))


def _narrowed(mine: Limits | None, asked: Limits | None) -> Limits | None:
    """The calling key's limits, each narrowed to what is asked (never widened)."""
    if asked is None:
        return mine
    if mine is None:
        return asked
    fields = {}
    for name in Limits.model_fields:
        have, want = getattr(mine, name), getattr(asked, name)
        fields[name] = want if have is None else have if want is None else min(have, want)
    return Limits(**fields)
