"""Users, projects and who is a member of which project with which role."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from atoll.plugins.gateway.accounts.audit import write_audit
from atoll.plugins.gateway.accounts.database import Row
from atoll.plugins.gateway.accounts.store import (
    KEEP,
    Keep,
    Store,
    check_actor,
    exists,
    limits_from,
    limits_json,
    not_found,
    require,
    short,
)
from atoll.plugins.gateway.contract import Limits
from atoll.plugins.gateway.errors import GatewayError

NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
LABEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}")
ROLES = ("owner", "member", "viewer")
USING_ROLES = ("owner", "member")  # viewers may list a project's adapters, not use them
WRITING_ROLES = USING_ROLES  # viewers read only: no uploads, jobs or deletions in the project
MAX_LABELS = 32
MAX_LABEL_VALUE = 128
PROJECT_COLS = "name, labels, store_prompts, limits, created"


@dataclass(frozen=True)
class UserRecord:
    name: str
    admin: bool
    created: float


@dataclass(frozen=True)
class ProjectRecord:
    name: str
    labels: dict[str, str]
    store_prompts: bool
    limits: Limits | None
    created: float


@dataclass(frozen=True)
class Member:
    user: str
    role: str


def _check_name(kind: str, value: object) -> str:
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise GatewayError(
            400,
            f"invalid {kind} name {short(value)}: 1-64 characters of a-z 0-9 . _ -, "
            "starting with a letter or digit",
            param=kind,
        )
    return value


def _check_labels(labels: object) -> dict[str, str]:
    if not isinstance(labels, dict) or len(labels) > MAX_LABELS:
        raise GatewayError(400, f"labels must be a mapping of at most {MAX_LABELS} entries")
    for key, value in labels.items():
        if not isinstance(key, str) or not LABEL_KEY.fullmatch(key):
            raise GatewayError(400, f"invalid label name {short(key)}", param="labels")
        if not isinstance(value, str) or len(value) > MAX_LABEL_VALUE or not value.isprintable():
            raise GatewayError(400, f"invalid value for label {key!r}", param="labels")
    return dict(labels)


def _project(row: Row) -> ProjectRecord:
    name, labels, store_prompts, limits, created = row
    return ProjectRecord(
        name, json.loads(labels), bool(store_prompts), limits_from(limits), created
    )


class UsersAndProjects(Store):
    def create_user(self, name: str, admin: bool = False, *, actor: str) -> UserRecord:
        _check_name("user", name)
        check_actor(actor)
        now = self._clock()
        with self._tx() as db:
            if db.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone():
                raise exists("user", name)
            db.execute("INSERT INTO users VALUES (?, ?, ?)", (name, bool(admin), now))
            write_audit(
                db, self._audit_key, now, actor, "user.create", name, {"admin": bool(admin)}
            )
        return UserRecord(name, bool(admin), now)

    def list_users(self) -> list[UserRecord]:
        rows = self._read("SELECT name, admin, created FROM users ORDER BY name")
        return [UserRecord(n, bool(a), c) for n, a, c in rows]

    def set_admin(self, name: str, admin: bool, *, actor: str) -> None:
        check_actor(actor)
        now = self._clock()
        with self._tx() as db:
            cur = db.execute("UPDATE users SET admin = ? WHERE name = ?", (bool(admin), name))
            if cur.rowcount == 0:
                raise not_found("user", name)
            write_audit(
                db, self._audit_key, now, actor, "user.set_admin", name, {"admin": bool(admin)}
            )

    def create_project(
        self,
        name: str,
        labels: dict[str, str] | None = None,
        store_prompts: bool = False,
        limits: Limits | None = None,
        *,
        actor: str,
    ) -> ProjectRecord:
        _check_name("project", name)
        labels = _check_labels(labels or {})
        check_actor(actor)
        now = self._clock()
        with self._tx() as db:
            if db.execute("SELECT 1 FROM projects WHERE name = ?", (name,)).fetchone():
                raise exists("project", name)
            db.execute(
                "INSERT INTO projects VALUES (?, ?, ?, ?, ?)",
                (name, json.dumps(labels), bool(store_prompts), limits_json(limits), now),
            )
            detail = {
                "labels": labels,
                "store_prompts": bool(store_prompts),
                "limits": None if limits is None else limits.model_dump(),
            }
            write_audit(db, self._audit_key, now, actor, "project.create", name, detail)
        return ProjectRecord(name, labels, bool(store_prompts), limits, now)

    def update_project(
        self,
        name: str,
        *,
        actor: str,
        labels: dict[str, str] | Keep = KEEP,
        store_prompts: bool | Keep = KEEP,
        limits: Limits | Keep | None = KEEP,
    ) -> ProjectRecord:
        """Change what is given; ``limits=None`` removes the project's limits."""
        check_actor(actor)
        changes: dict[str, Any] = {}  # column -> stored value
        detail: dict[str, Any] = {}
        if not isinstance(labels, Keep):
            detail["labels"] = _check_labels(labels)
            changes["labels"] = json.dumps(detail["labels"])
        if not isinstance(store_prompts, Keep):
            detail["store_prompts"] = changes["store_prompts"] = bool(store_prompts)
        if not isinstance(limits, Keep):
            detail["limits"] = None if limits is None else limits.model_dump()
            changes["limits"] = limits_json(limits)
        if not changes:
            raise GatewayError(400, "nothing to update")
        now = self._clock()
        with self._tx() as db:
            sets = ", ".join(f"{column} = ?" for column in changes)
            cur = db.execute(
                f"UPDATE projects SET {sets} WHERE name = ?", (*changes.values(), name)
            )
            if cur.rowcount == 0:
                raise not_found("project", name)
            write_audit(db, self._audit_key, now, actor, "project.update", name, detail)
            row = db.execute(f"SELECT {PROJECT_COLS} FROM projects WHERE name = ?", (name,))
            return _project(row.fetchone())

    def list_projects(self) -> list[ProjectRecord]:
        rows = self._read(f"SELECT {PROJECT_COLS} FROM projects ORDER BY name")
        return [_project(r) for r in rows]

    def add_member(self, project: str, user: str, role: str, *, actor: str) -> None:
        """Add ``user`` to ``project`` with ``role``, or change the role of a member."""
        if role not in ROLES:
            raise GatewayError(400, f"role must be one of {', '.join(ROLES)}", param="role")
        check_actor(actor)
        now = self._clock()
        with self._tx() as db:
            require(db, "project", project)
            require(db, "user", user)
            db.execute(
                "INSERT INTO members VALUES (?, ?, ?) "
                "ON CONFLICT (project, user) DO UPDATE SET role = excluded.role",
                (project, user, role),
            )
            detail = {"user": user, "role": role}
            write_audit(db, self._audit_key, now, actor, "member.add", project, detail)

    def remove_member(self, project: str, user: str, *, actor: str) -> None:
        check_actor(actor)
        now = self._clock()
        with self._tx() as db:
            cur = db.execute("DELETE FROM members WHERE project = ? AND user = ?", (project, user))
            if cur.rowcount == 0:
                raise GatewayError(
                    404, f"{user!r} is not a member of project {project!r}", code="not_a_member"
                )
            write_audit(db, self._audit_key, now, actor, "member.remove", project, {"user": user})

    def memberships(self, user: str) -> dict[str, str]:
        """The projects ``user`` belongs to, with their role in each."""
        rows = self._read(
            "SELECT project, role FROM members WHERE user = ? ORDER BY project", (user,)
        )
        return dict(rows)

    def members(self, project: str) -> list[Member]:
        if not self._read("SELECT 1 FROM projects WHERE name = ?", (project,)):
            raise not_found("project", project)
        rows = self._read(
            "SELECT user, role FROM members WHERE project = ? ORDER BY user", (project,)
        )
        return [Member(u, r) for u, r in rows]
