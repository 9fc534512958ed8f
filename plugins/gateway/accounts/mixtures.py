"""Named mixtures: a weighted mixture of adapters saved under a name and called like a model.

A mixture is a recipe, not weights: the nodes merge it from its adapters when it is first used,
so calling one still needs the right to use each of its adapters (the gateway checks them on
every request). Who sees a named mixture is the rule for files and jobs: its creator, the members
of its project (one saved with a project's key belongs to that project), administrators, and a
project-scoped key only inside its project. Names share the adapters' id space: one name is one
model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from atoll.plugins.gateway.accounts.audit import write_audit
from atoll.plugins.gateway.accounts.database import Row
from atoll.plugins.gateway.accounts.keys import Principal
from atoll.plugins.gateway.accounts.store import Store, check_actor, exists, not_found
from atoll.plugins.gateway.errors import GatewayError
from atoll.plugins.inference.contract import Mixture
from atoll.plugins.storage.contract.adapters import adapter_id_problem

COLS = "m.id, m.base_model, m.owner, m.project, m.spec, m.search, m.created"
# Who sees it (named parameters :scope, :admin, :user), as file_access.may_see says for files.
VISIBLE = """
    (:scope IS NULL OR m.project = :scope)
    AND (:admin OR m.owner = :user
         OR m.project IN (SELECT project FROM members WHERE user = :user))
"""


@dataclass(frozen=True)
class SavedMixture:
    id: str
    base_model: str
    owner: str
    project: str | None
    mixture: Mixture
    search: str | None  # the mixture search that found it
    created: float


def check_mixture_name(name: str) -> None:
    problem = adapter_id_problem(name)  # one id space with adapters: the same rule
    if problem:
        raise GatewayError(400, problem.replace("adapter", "mixture"), param="name")


def _saved(row: Row) -> SavedMixture:
    mixture_id, base, owner, project, spec, search, created = tuple(row)[:7]
    return SavedMixture(
        mixture_id, base, owner, project, Mixture.model_validate(json.loads(spec)), search, created
    )


def _who(principal: Principal) -> dict[str, Any]:
    return {"scope": principal.project, "admin": principal.admin, "user": principal.user}


class MixtureRegistry(Store):
    def save_mixture(
        self,
        id: str,
        base_model: str,
        mixture: Mixture,
        owner: str,
        project: str | None,
        search: str | None = None,
        *,
        actor: str,
    ) -> SavedMixture:
        check_mixture_name(id)
        check_actor(actor)
        now = self._clock()
        spec = mixture.model_dump_json()
        with self._tx() as db:
            taken = db.execute(
                "SELECT 1 FROM adapters WHERE id = ? UNION SELECT 1 FROM mixtures WHERE id = ?",
                (id, id),
            ).fetchone()
            if taken:
                raise exists("model", id)
            db.execute(
                "INSERT INTO mixtures VALUES (?, ?, ?, ?, ?, ?, ?)",
                (id, base_model, owner, project, spec, search, now),
            )
            detail = {"base_model": base_model, "project": project, "mixture": json.loads(spec)}
            write_audit(db, self._audit_key, now, actor, "mixture.save", id, detail)
        return SavedMixture(id, base_model, owner, project, mixture, search, now)

    def delete_mixture(self, id: str, *, actor: str) -> None:
        check_actor(actor)
        now = self._clock()
        with self._tx() as db:
            if db.execute("DELETE FROM mixtures WHERE id = ?", (id,)).rowcount == 0:
                raise not_found("mixture", id)
            write_audit(db, self._audit_key, now, actor, "mixture.delete", id, {})

    def visible_mixture(self, principal: Principal, id: str) -> SavedMixture | None:
        """The named mixture if this caller may see it; None if unknown or invisible."""
        rows = self._read(
            f"SELECT {COLS} FROM mixtures m WHERE m.id = :id AND {VISIBLE}",
            _who(principal) | {"id": id},
        )
        return _saved(rows[0]) if rows else None

    def visible_mixtures(self, principal: Principal) -> list[SavedMixture]:
        rows = self._read(
            f"SELECT {COLS} FROM mixtures m WHERE {VISIBLE} ORDER BY m.id", _who(principal)
        )
        return [_saved(r) for r in rows]
