"""The gateway's admin RPC over the overlay (contract.py): tenant admins and operators manage
users, projects, keys, adapter access and retention, and verify the audit log; every change
lands in the audit log with the caller's agent name as its actor."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel

from atoll.agent.contract import NoParams
from atoll.agent.errors import InvalidRequest, NoSuchMethod
from atoll.plugins.gateway import contract as c
from atoll.plugins.gateway.errors import GatewayError
from atoll.plugins.gateway.retention import purge
from atoll.plugins.gateway.service import Gateway
from atoll.protocol.session import CallInfo
from atoll.tenancy.permissions import ADMINS


def plain(value: Any) -> Any:
    """Records as msgpack-able data."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


async def settle(result: Any) -> Any:
    """A handler's result, awaited where it is work done off the event loop."""
    return await result if inspect.isawaitable(result) else result


class AdminRPC:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.accounts = gateway.accounts

    def methods(
        self,
    ) -> dict[str, tuple[Callable[[Any, CallInfo], Awaitable[Any]], tuple[str, ...]]]:
        """Every admin method, callable by admin and operator agents only (the CLI's)."""
        return {name: (self._wrap(name), ADMINS) for name in c.METHODS}

    def _wrap(self, name: str) -> Callable[[Any, CallInfo], Awaitable[Any]]:
        method = c.METHODS[name]
        handler = getattr(self, name, None)
        if handler is None:
            raise NoSuchMethod(f"gateway admin method {name!r} is not implemented")

        async def call(params: Any, info: CallInfo) -> Any:
            args = method.parse_params(params)  # refused as the CLI's client refuses it
            try:
                return plain(await settle(handler(args, info.caller.name)))
            except GatewayError as exc:  # the same words the HTTP admin API would give
                raise InvalidRequest(exc.message, {"status": exc.status}) from None

        return call

    def users_create(self, p: c.UserCreate, actor: str) -> Any:
        return self.accounts.create_user(p.name, p.admin, actor=actor)

    def users_list(self, _: NoParams, actor: str) -> Any:
        return self.accounts.list_users()

    def identities_list(self, p: c.IdentityQuery, actor: str) -> Any:
        return self.accounts.list_identities(p.user)

    def identities_link(self, p: c.IdentityLink, actor: str) -> Any:
        return self.accounts.link_identity(p.user, p.issuer, p.subject, actor=actor)

    def identities_unlink(self, p: c.IdentityRef, actor: str) -> Any:
        return self.accounts.unlink_identity(p.issuer, p.subject, actor=actor)

    def projects_create(self, p: c.ProjectCreate, actor: str) -> Any:
        return self.accounts.create_project(
            p.name, p.labels, p.store_prompts, p.limits, actor=actor
        )

    def projects_list(self, _: NoParams, actor: str) -> Any:
        return [
            {**plain(p), "members": plain(self.accounts.members(p.name))}
            for p in self.accounts.list_projects()
        ]

    def projects_add_member(self, p: c.MemberChange, actor: str) -> Any:
        self.accounts.add_member(p.project, p.user, p.role, actor=actor)
        return self.accounts.members(p.project)

    def projects_remove_member(self, p: c.MemberChange, actor: str) -> Any:
        self.accounts.remove_member(p.project, p.user, actor=actor)
        return self.accounts.members(p.project)

    def keys_create(self, p: c.KeyCreate, actor: str) -> Any:
        record, key = self.accounts.create_key(
            p.user, p.project, p.name, p.ttl_s, p.limits, actor=actor
        )
        return {"key": key, "record": plain(record)}

    def keys_list(self, p: c.KeyQuery, actor: str) -> Any:
        return self.accounts.list_keys(p.user, p.project)

    def keys_revoke(self, p: c.KeyRef, actor: str) -> Any:
        return self.accounts.revoke_key(p.key_id, actor=actor)

    def keys_rotate(self, p: c.KeyRotate, actor: str) -> Any:
        record, key = self.accounts.rotate_key(p.key_id, p.grace_s, actor=actor)
        return {"key": key, "record": plain(record)}

    def adapters_register(self, p: c.AdapterRegister, actor: str) -> Any:
        return self.accounts.register_adapter(
            p.id, p.base_model, p.owner, p.project, p.public, actor=actor
        )

    def adapters_list(self, _: NoParams, actor: str) -> Any:
        return self.accounts.list_adapters()

    def usage(self, p: c.UsageQuery, actor: str) -> Any:
        query = (p.key_id, p.project, p.user, p.since, p.until)
        totals: dict[str, Any] = plain(self.accounts.usage(*query))
        if p.group_by is not None:
            groups = [g.strip() for g in p.group_by.split(",")]
            totals["groups"] = self.accounts.usage_report(groups, *query)
        return totals

    def budgets_set(self, p: c.BudgetSet, actor: str) -> Any:
        return self.accounts.set_budget(
            p.scope, p.subject, p.metric, p.period, p.limit, actor=actor
        )

    def budgets_list(self, p: c.BudgetQuery, actor: str) -> Any:
        return self.accounts.list_budgets(p.scope, p.subject)

    def budgets_remove(self, p: c.BudgetRef, actor: str) -> Any:
        self.accounts.remove_budget(p.id, actor=actor)
        return {"removed": p.id}

    def audit(self, p: c.AuditQuery, actor: str) -> Any:
        return self.accounts.audit_log(p.limit, p.since)

    def audit_verify(self, _: NoParams, actor: str) -> Any:
        # In a thread: it reads the whole log (the store's lock is taken per batch).
        return asyncio.to_thread(self.accounts.verify_audit)

    def retention_set(self, p: c.RetentionSet, actor: str) -> Any:
        return self.accounts.set_retention(
            p.project, p.prompts_s, p.ledger_s, p.datasets_s, actor=actor
        )

    def retention_list(self, _: NoParams, actor: str) -> Any:
        return self.accounts.list_retention()

    def retention_purge(self, p: c.RetentionPurge, actor: str) -> Any:
        return purge(self.gateway, p.dry_run, actor)
