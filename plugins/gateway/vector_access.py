"""Who reads and changes what in the vector stores (vector_stores.py): the policy a store or
file is labelled with, the scope a caller reads with, and who may change a store.

``private`` is its owner's only, ``project`` its project members', ``tenant`` every user's. The
policy defaults from the key (a project's key: ``project``; else ``private``); the reserved
attribute or metadata key ``atoll_policy`` sets it. A project-scoped key reads its project's and
the tenant's records only; a key without a project its user's own, its projects' and the
tenant's. Viewers of a project read only.
"""

from __future__ import annotations

from typing import get_args

from atoll.plugins.gateway.accounts import Accounts
from atoll.plugins.gateway.accounts.keys import Principal
from atoll.plugins.gateway.accounts.users import WRITING_ROLES
from atoll.plugins.gateway.errors import GatewayError
from atoll.plugins.storage.contract.vectors import Labels, Policy, ReadScope

POLICY_KEY = "atoll_policy"  # in a store's metadata or a file's attributes


def policy_asked(value: object, principal: Principal, param: str) -> Policy:
    """The policy asked for (None: the key's default); a 400 for one it cannot have."""
    if value is None:
        return "project" if principal.project is not None else "private"
    if value not in get_args(Policy):
        raise GatewayError(
            400, f"{POLICY_KEY} is one of private, project, tenant; not {value!r}", param=param
        )
    if value == "project" and principal.project is None:
        raise GatewayError(400, f"{POLICY_KEY} 'project' needs a key of that project", param=param)
    return value  # type: ignore[return-value]


def read_scope(accounts: Accounts, principal: Principal) -> ReadScope:
    if principal.project is not None:
        projects = [principal.project]
    else:
        projects = list(accounts.memberships(principal.user))
    personal = principal.project is None
    return ReadScope(
        user=principal.user, projects=projects, personal=personal, admin=principal.admin
    )


def write_labels(principal: Principal, policy: Policy) -> Labels:
    if principal.project is not None and principal.role not in WRITING_ROLES:
        raise GatewayError(
            403,
            f"{principal.user!r} is a {principal.role} of project {principal.project!r}: "
            "viewers read only",
            code="permission_denied",
        )
    return Labels(owner=principal.user, project=principal.project, policy=policy)


def may_change(accounts: Accounts, principal: Principal, labels: Labels) -> bool:
    if principal.admin or labels.owner == principal.user:
        return True
    if labels.project is None or principal.project not in (None, labels.project):
        return False
    return accounts.memberships(principal.user).get(labels.project) == "owner"
