"""Who may see and change a file (a dataset in the storage agent's registry), a job or run made
from one, or a named mixture: its owner, the members of its project, administrators — and a
project-scoped key only inside its project. Shared by the fine-tuning, evaluation and mixture
routes."""

from __future__ import annotations

from atoll.plugins.gateway.accounts import Accounts
from atoll.plugins.gateway.accounts.keys import Principal
from atoll.plugins.gateway.accounts.users import WRITING_ROLES
from atoll.plugins.gateway.errors import GatewayError


def may_see(accounts: Accounts, principal: Principal, owner: str, project: str | None) -> bool:
    if principal.admin or owner == principal.user:
        return principal.project is None or project == principal.project
    if project is None:
        return False
    members = {m.user for m in accounts.members(project)}
    return principal.user in members and principal.project in (None, project)


def may_write(
    accounts: Accounts, principal: Principal, project: str | None, owner: str | None = None
) -> None:
    """Create in ``project`` (owner None), or change something ``owner`` made there: viewers
    read only; members change their own; project owners and administrators anything (403
    otherwise)."""
    if principal.admin or (project is None and owner in (None, principal.user)):
        return
    role = _role_in(accounts, principal, project) if project is not None else None
    if role == "owner" or (role in WRITING_ROLES and owner in (None, principal.user)):
        return
    what = f"project {project!r}" if project else f"{owner!r}'s files and jobs"
    needs = "owner" if owner not in (None, principal.user) else "owner or member"
    raise GatewayError(
        403,
        f"{principal.user!r} may not change {what}"
        + (f" as a {role}" if role else "")
        + f": that needs the project role {needs} (viewers read only)",
        code="permission_denied",
    )


def _role_in(accounts: Accounts, principal: Principal, project: str) -> str | None:
    if principal.project is not None:
        return principal.role if project == principal.project else None
    return next((m.role for m in accounts.members(project) if m.user == principal.user), None)
