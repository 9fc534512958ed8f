"""Who may see a file (a dataset in the storage agent's registry) or a job made from one: its
owner, the members of its project, administrators — and a project-scoped key only inside its
project. Shared by the fine-tuning and evaluation routes."""

from __future__ import annotations

from atoll.plugins.gateway.accounts import Accounts
from atoll.plugins.gateway.accounts.keys import Principal


def may_see(accounts: Accounts, principal: Principal, owner: str, project: str | None) -> bool:
    if principal.admin or owner == principal.user:
        return principal.project is None or project == principal.project
    if project is None:
        return False
    members = {m.user for m in accounts.members(project)}
    return principal.user in members and principal.project in (None, project)
