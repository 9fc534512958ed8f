"""Who may see and use which adapter: the registry of adapters by owner, project or public, and
the one visibility rule. An adapter the caller may not see is answered 404, exactly like one that
does not exist, so ids of other projects do not leak; one the caller may see but not use (a
project viewer's) is answered 403."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from atoll.plugins.gateway.accounts.audit import write_audit
from atoll.plugins.gateway.accounts.database import Connection, Row
from atoll.plugins.gateway.accounts.keys import Principal
from atoll.plugins.gateway.accounts.store import (
    KEEP,
    Keep,
    Store,
    check_actor,
    exists,
    not_found,
    require,
    short,
)
from atoll.plugins.gateway.accounts.users import USING_ROLES
from atoll.plugins.gateway.errors import GatewayError
from atoll.plugins.storage.contract.adapters import adapter_id_problem

MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,199}")  # no ':', the API's base:adapter
ADAPTER_COLS = "a.id, a.base_model, a.owner, a.project, a.public, p.labels, a.created"
ADAPTER_FROM = "adapters a LEFT JOIN projects p ON p.name = a.project"
# The one visibility rule, in SQL (named parameters :scope, :admin, :user). A project-scoped key
# sees its project's and public adapters only, even an admin's key: the scope is what its holder
# asked for. Within that scope, admins see everything.
VISIBLE = """
    (:scope IS NULL OR a.public OR a.project = :scope)
    AND (:admin OR a.public OR a.owner = :user
         OR a.project IN (SELECT project FROM members WHERE user = :user))
"""


@dataclass(frozen=True)
class AdapterAccess:
    id: str
    base_model: str
    owner: str | None
    project: str | None
    public: bool
    labels: dict[str, str]  # routing policy of the adapter's project; {} if none
    created: float


def policy_labels(principal: Principal, *adapters: AdapterAccess) -> dict[str, str]:
    """Labels a node must carry to serve a request: the policy of the key's project and of each
    used adapter's project (a phi project's adapter stays on phi nodes whoever calls it)."""
    merged = dict(principal.labels)
    for access in adapters:
        for key, value in access.labels.items():
            if merged.setdefault(key, value) != value:
                raise GatewayError(
                    400,
                    f"routing policies conflict: label {key!r} must be both {merged[key]!r} and "
                    f"{value!r} (adapter {access.id!r})",
                    code="policy_conflict",
                )
    return merged


def _check_adapter_id(value: object) -> None:
    problem = adapter_id_problem(value)  # the platform's one adapter-id rule (storage, nodes)
    if problem:
        raise GatewayError(400, problem, param="id")


def _check_base_model(value: object) -> str:
    if not isinstance(value, str) or not MODEL_ID.fullmatch(value):
        raise GatewayError(
            400,
            f"base model {short(value)} must be 1-200 characters of letters, digits and ._/-",
            param="base_model",
        )
    return value


def _check_holder(db: Connection, owner: str | None, project: str | None, public: bool) -> None:
    if owner is not None and project is not None:
        raise GatewayError(400, "an adapter belongs to a user or to a project, not both")
    if owner is None and project is None and not public:
        raise GatewayError(400, "an adapter needs an owner, a project, or public=True")
    if owner is not None:
        require(db, "user", owner)
    if project is not None:
        require(db, "project", project)


def _adapter(row: Row) -> AdapterAccess:
    adapter_id, base, owner, project, public, labels, created = tuple(row)[:7]
    labels_map = json.loads(labels) if labels else {}
    return AdapterAccess(adapter_id, base, owner, project, bool(public), labels_map, created)


def _who(principal: Principal) -> dict[str, Any]:
    return {"scope": principal.project, "admin": principal.admin, "user": principal.user}


class AdapterRegistry(Store):
    def register_adapter(
        self,
        id: str,
        base_model: str,
        owner: str | None = None,
        project: str | None = None,
        public: bool = False,
        *,
        actor: str,
    ) -> AdapterAccess:
        _check_adapter_id(id)
        _check_base_model(base_model)
        check_actor(actor)
        now = self._clock()
        with self._tx() as db:
            _check_holder(db, owner, project, public)
            if db.execute("SELECT 1 FROM adapters WHERE id = ?", (id,)).fetchone():
                raise exists("adapter", id)
            if db.execute("SELECT 1 FROM mixtures WHERE id = ?", (id,)).fetchone():
                raise exists("model", id)  # a named mixture's: one name is one model
            db.execute(
                "INSERT INTO adapters VALUES (?, ?, ?, ?, ?, ?)",
                (id, base_model, owner, project, bool(public), now),
            )
            detail = {
                "base_model": base_model,
                "owner": owner,
                "project": project,
                "public": bool(public),
            }
            write_audit(db, self._audit_key, now, actor, "adapter.register", id, detail)
            row = db.execute(f"SELECT {ADAPTER_COLS} FROM {ADAPTER_FROM} WHERE a.id = ?", (id,))
            return _adapter(row.fetchone())

    def update_adapter(
        self,
        id: str,
        *,
        actor: str,
        base_model: str | Keep = KEEP,
        owner: str | Keep | None = KEEP,
        project: str | Keep | None = KEEP,
        public: bool | Keep = KEEP,
    ) -> AdapterAccess:
        """Change what is given; moving an adapter from a user to a project takes
        ``owner=None, project=...``."""
        check_actor(actor)
        changes: dict[str, Any] = {}
        if not isinstance(base_model, Keep):
            changes["base_model"] = _check_base_model(base_model)
        if not isinstance(owner, Keep):
            changes["owner"] = owner
        if not isinstance(project, Keep):
            changes["project"] = project
        if not isinstance(public, Keep):
            changes["public"] = bool(public)
        if not changes:
            raise GatewayError(400, "nothing to update")
        now = self._clock()
        with self._tx() as db:
            row = db.execute("SELECT owner, project, public FROM adapters WHERE id = ?", (id,))
            found = row.fetchone()
            if found is None:
                raise not_found("adapter", id)
            after = dict(zip(("owner", "project", "public"), found, strict=True)) | changes
            _check_holder(db, after["owner"], after["project"], bool(after["public"]))
            sets = ", ".join(f"{column} = ?" for column in changes)
            db.execute(f"UPDATE adapters SET {sets} WHERE id = ?", (*changes.values(), id))
            write_audit(db, self._audit_key, now, actor, "adapter.update", id, changes)
            row = db.execute(f"SELECT {ADAPTER_COLS} FROM {ADAPTER_FROM} WHERE a.id = ?", (id,))
            return _adapter(row.fetchone())

    def unregister_adapter(self, id: str, *, actor: str) -> None:
        check_actor(actor)
        now = self._clock()
        with self._tx() as db:
            if db.execute("DELETE FROM adapters WHERE id = ?", (id,)).rowcount == 0:
                raise not_found("adapter", id)
            write_audit(db, self._audit_key, now, actor, "adapter.unregister", id, {})

    def adapter(self, id: str) -> AdapterAccess | None:
        rows = self._read(f"SELECT {ADAPTER_COLS} FROM {ADAPTER_FROM} WHERE a.id = ?", (id,))
        return _adapter(rows[0]) if rows else None

    def list_adapters(self) -> list[AdapterAccess]:
        """Every registered adapter (for admins)."""
        rows = self._read(f"SELECT {ADAPTER_COLS} FROM {ADAPTER_FROM} ORDER BY a.id", ())
        return [_adapter(r) for r in rows]

    def visible_adapters(self, principal: Principal) -> list[AdapterAccess]:
        """What ``/v1/models`` shows this caller (usable or, for a viewer, only listable)."""
        rows = self._read(
            f"SELECT {ADAPTER_COLS} FROM {ADAPTER_FROM} WHERE {VISIBLE} ORDER BY a.id",
            _who(principal),
        )
        return [_adapter(r) for r in rows]

    def check_use(self, principal: Principal, adapter_id: str) -> AdapterAccess:
        """The adapter if this caller may use it; 404 if it is unknown or invisible to them, 403
        if they may only see it."""
        rows = self._read(
            f"SELECT {ADAPTER_COLS}, (SELECT role FROM members m WHERE m.project = a.project "
            f"AND m.user = :user) FROM {ADAPTER_FROM} WHERE a.id = :id AND {VISIBLE}",
            _who(principal) | {"id": adapter_id},
        )
        if not rows:
            raise GatewayError(
                404,
                f"the model {adapter_id!r} does not exist or you do not have access to it",
                code="model_not_found",
                param="model",
            )
        access, role = _adapter(rows[0]), rows[0][-1]
        if principal.admin or access.public or access.owner == principal.user:
            return access
        if role in USING_ROLES:
            return access
        raise GatewayError(
            403,
            f"{principal.user!r} is a {role} of project {access.project!r}: its adapters may be "
            "listed, not used",
            code="permission_denied",
            param="model",
        )
