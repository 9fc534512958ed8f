"""The gateway's administration over the overlay (what `atoll keys|projects|users` call as a
tenant admin): the method table the gateway serves (admin.py) and its typed client. Replies are
plain dicts of the records in accounts; a new key's secret appears once, in the reply that
creates it.

    RPC  users_create            {name, admin?}                         -> user
    RPC  users_list              {}                                     -> [user]
    RPC  identities_list         {user?}                                -> [identity]
    RPC  identities_link         {user, issuer, subject}                -> identity
    RPC  identities_unlink       {issuer, subject}                      -> identity
    RPC  projects_create         {name, labels?, store_prompts?, limits?} -> project
    RPC  projects_list           {}                                     -> [project + members]
    RPC  projects_add_member     {project, user, role?}                 -> [member]
    RPC  projects_remove_member  {project, user}                        -> [member]
    RPC  keys_create             {user, project?, name?, ttl_s?, limits?} -> {key, record}
    RPC  keys_list               {user?, project?}                      -> [key record]
    RPC  keys_revoke             {key_id}                               -> key record
    RPC  keys_rotate             {key_id, grace_s?}                     -> {key, record}
    RPC  adapters_register       {id, base_model, owner?, project?, public?} -> adapter access
    RPC  adapters_list           {}                                     -> [adapter access]
    RPC  usage                   {key_id?, project?, user?, since?, until?, group_by?}
                                                                        -> totals (+ groups)
    RPC  budgets_set             {scope, subject, metric?, period?, limit} -> budget
    RPC  budgets_list            {scope?, subject?}                     -> [budget]
    RPC  budgets_remove          {id}                                   -> {removed}
    RPC  audit                   {limit?, since?}                       -> [entry]
    RPC  audit_verify            {}                                     -> verdict
    RPC  retention_set           {project, prompts_s?, ledger_s?, datasets_s?} -> policy
    RPC  retention_list          {}                                     -> [policy]
    RPC  retention_purge         {dry_run?}                             -> purge report

Every method is for admin and operator agents only.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from atoll.agent.contract import Caller, Client, Method, NoParams, Strict, service_address

PLUGIN = "gateway"

Record = dict[str, Any]  # an accounts record as plain data


class Limits(BaseModel):
    """Limits of one key or one project; None: no limit of that kind."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests_per_min: int | None = Field(None, ge=1, le=10**7)
    tokens_per_min: int | None = Field(None, ge=1, le=10**12)
    concurrent: int | None = Field(None, ge=1, le=10**6)


class Price(BaseModel):
    """What a model's tokens cost, per million tokens of each type, in the deployment's currency:
    ``[plugins.gateway.prices."<base model or adapter id>"]`` in the gateway's config (an
    adapter's own price wins over its base's; to 1/1000 of a unit)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: float = Field(0.0, ge=0, le=10**6)  # prompt tokens
    output: float = Field(0.0, ge=0, le=10**6)  # completion tokens


class UserCreate(Strict):
    name: str
    admin: bool = False


class IdentityQuery(Strict):
    user: str | None = None


class IdentityRef(Strict):
    """An identity provider's account: its issuer URL and its subject (``sub``)."""

    issuer: str = Field(min_length=1, max_length=512)
    subject: str = Field(min_length=1, max_length=512)


class IdentityLink(IdentityRef):
    user: str


class ProjectCreate(Strict):
    name: str
    labels: dict[str, str] = {}
    store_prompts: bool = False
    limits: Limits | None = None


class MemberChange(Strict):
    project: str
    user: str
    role: Literal["owner", "member", "viewer"] = "member"


class KeyCreate(Strict):
    user: str
    project: str | None = None
    name: str = ""
    ttl_s: float | None = Field(None, gt=0)
    limits: Limits | None = None


class KeyQuery(Strict):
    user: str | None = None
    project: str | None = None


class KeyRef(Strict):
    key_id: str


class KeyRotate(Strict):
    key_id: str
    grace_s: float = Field(3600, ge=0)


class AdapterRegister(Strict):
    id: str
    base_model: str
    owner: str | None = None
    project: str | None = None
    public: bool = False


class UsageQuery(Strict):
    key_id: str | None = None
    project: str | None = None
    user: str | None = None
    since: float | None = None  # epoch seconds, included
    until: float | None = None  # excluded
    # Comma-separated columns to total by (user, project, key_id, model, adapter): a report.
    group_by: str | None = Field(None, max_length=100)
    format: Literal["json", "csv"] = "json"  # csv: the groups as a spreadsheet (HTTP only)


class OwnKeyCreate(Strict):
    """A key a user makes for themself (``POST /me/keys``): no user field, it is the caller's."""

    project: str | None = None
    name: str = ""
    ttl_s: float | None = Field(None, gt=0)
    limits: Limits | None = None


class OwnUsageQuery(Strict):
    since: float | None = None
    until: float | None = None
    group_by: str = Field("model,adapter", max_length=100)
    format: Literal["json", "csv"] = "json"


class BudgetSet(Strict):
    scope: Literal["key", "user", "project"]
    subject: str = Field(min_length=1, max_length=128)  # a key id, user or project name
    metric: Literal["tokens", "cost"] = "tokens"
    period: Literal["daily", "weekly", "monthly", "total"] = "monthly"
    limit: float = Field(ge=0)  # tokens, or currency units of the price table


class BudgetQuery(Strict):
    scope: Literal["key", "user", "project"] | None = None
    subject: str | None = None


class BudgetRef(Strict):
    id: str = Field(min_length=1, max_length=256)  # scope:subject:metric:period


class AuditQuery(Strict):
    limit: int = Field(100, ge=1, le=10_000)
    since: float | None = None


class RetentionSet(Strict):
    """A project's retention periods in seconds; a period left out (None) keeps those forever."""

    project: str
    prompts_s: float | None = Field(None, gt=0)  # prompt text in the ledger
    ledger_s: float | None = Field(None, gt=0)  # the ledger's rows
    datasets_s: float | None = Field(None, gt=0)  # datasets in storage, from their upload


class RetentionPurge(Strict):
    dry_run: bool = False  # True: report what would go, change nothing


class NewKey(BaseModel):
    """A key just made: its secret (shown this once) and its record."""

    key: str
    record: Record


# --- methods (a refusal of bad parameters names the method, as ``bad <method>: ...``) -----------

USERS_CREATE = Method[UserCreate, Record]("users_create", UserCreate, Record, "users_create")
USERS_LIST = Method[NoParams, list[Record]]("users_list", NoParams, list[Record], "users_list")
IDENTITIES_LIST = Method[IdentityQuery, list[Record]](
    "identities_list", IdentityQuery, list[Record], "identities_list"
)
IDENTITIES_LINK = Method[IdentityLink, Record](
    "identities_link", IdentityLink, Record, "identities_link"
)
IDENTITIES_UNLINK = Method[IdentityRef, Record](
    "identities_unlink", IdentityRef, Record, "identities_unlink"
)
PROJECTS_CREATE = Method[ProjectCreate, Record](
    "projects_create", ProjectCreate, Record, "projects_create"
)
PROJECTS_LIST = Method[NoParams, list[Record]](
    "projects_list", NoParams, list[Record], "projects_list"
)
PROJECTS_ADD_MEMBER = Method[MemberChange, list[Record]](
    "projects_add_member", MemberChange, list[Record], "projects_add_member"
)
PROJECTS_REMOVE_MEMBER = Method[MemberChange, list[Record]](
    "projects_remove_member", MemberChange, list[Record], "projects_remove_member"
)
KEYS_CREATE = Method[KeyCreate, NewKey]("keys_create", KeyCreate, NewKey, "keys_create")
KEYS_LIST = Method[KeyQuery, list[Record]]("keys_list", KeyQuery, list[Record], "keys_list")
KEYS_REVOKE = Method[KeyRef, Record]("keys_revoke", KeyRef, Record, "keys_revoke")
KEYS_ROTATE = Method[KeyRotate, NewKey]("keys_rotate", KeyRotate, NewKey, "keys_rotate")
ADAPTERS_REGISTER = Method[AdapterRegister, Record](
    "adapters_register", AdapterRegister, Record, "adapters_register"
)
ADAPTERS_LIST = Method[NoParams, list[Record]](
    "adapters_list", NoParams, list[Record], "adapters_list"
)
USAGE = Method[UsageQuery, Record]("usage", UsageQuery, Record, "usage")
AUDIT = Method[AuditQuery, list[Record]]("audit", AuditQuery, list[Record], "audit")
AUDIT_VERIFY = Method[NoParams, Record]("audit_verify", NoParams, Record, "audit_verify")
RETENTION_SET = Method[RetentionSet, Record]("retention_set", RetentionSet, Record, "retention_set")
RETENTION_LIST = Method[NoParams, list[Record]](
    "retention_list", NoParams, list[Record], "retention_list"
)
RETENTION_PURGE = Method[RetentionPurge, Record](
    "retention_purge", RetentionPurge, Record, "retention_purge"
)
BUDGETS_SET = Method[BudgetSet, Record]("budgets_set", BudgetSet, Record, "budgets_set")
BUDGETS_LIST = Method[BudgetQuery, list[Record]](
    "budgets_list", BudgetQuery, list[Record], "budgets_list"
)
BUDGETS_REMOVE = Method[BudgetRef, Record]("budgets_remove", BudgetRef, Record, "budgets_remove")

# Every admin method by name: what the gateway serves over the overlay and at /admin/*.
METHODS: dict[str, Method[Any, Any]] = {
    m.name: m
    for m in (
        USERS_CREATE,
        USERS_LIST,
        IDENTITIES_LIST,
        IDENTITIES_LINK,
        IDENTITIES_UNLINK,
        PROJECTS_CREATE,
        PROJECTS_LIST,
        PROJECTS_ADD_MEMBER,
        PROJECTS_REMOVE_MEMBER,
        KEYS_CREATE,
        KEYS_LIST,
        KEYS_REVOKE,
        KEYS_ROTATE,
        ADAPTERS_REGISTER,
        ADAPTERS_LIST,
        USAGE,
        AUDIT,
        AUDIT_VERIFY,
        RETENTION_SET,
        RETENTION_LIST,
        RETENTION_PURGE,
        BUDGETS_SET,
        BUDGETS_LIST,
        BUDGETS_REMOVE,
    )
}


class GatewayAdmin:
    """A tenant admin's typed client of one gateway's admin methods. Each builds its request
    through the method's model, so bad parameters are refused before they leave, in the words
    the gateway would use."""

    def __init__(self, caller: Caller, gateway: str, timeout: float | None = None) -> None:
        """``gateway``: an agent name (its gateway plugin) or an ``agent/plugin`` address."""
        self.client = Client(caller, service_address(gateway, PLUGIN), timeout)

    async def users_create(self, name: str, admin: bool = False) -> Record:
        request = USERS_CREATE.parse_params({"name": name, "admin": admin})
        return await self.client.invoke(USERS_CREATE, request)

    async def users_list(self) -> list[Record]:
        return await self.client.invoke(USERS_LIST, NoParams())

    async def identities_list(self, user: str | None = None) -> list[Record]:
        request = IDENTITIES_LIST.parse_params({"user": user})
        return await self.client.invoke(IDENTITIES_LIST, request)

    async def identities_link(self, user: str, issuer: str, subject: str) -> Record:
        request = IDENTITIES_LINK.parse_params({"user": user, "issuer": issuer, "subject": subject})
        return await self.client.invoke(IDENTITIES_LINK, request)

    async def identities_unlink(self, issuer: str, subject: str) -> Record:
        request = IDENTITIES_UNLINK.parse_params({"issuer": issuer, "subject": subject})
        return await self.client.invoke(IDENTITIES_UNLINK, request)

    async def projects_create(
        self,
        name: str,
        labels: dict[str, str] | None = None,
        store_prompts: bool = False,
        limits: Limits | dict[str, Any] | None = None,
    ) -> Record:
        request = PROJECTS_CREATE.parse_params(
            {"name": name, "labels": labels or {}, "store_prompts": store_prompts, "limits": limits}
        )
        return await self.client.invoke(PROJECTS_CREATE, request)

    async def projects_list(self) -> list[Record]:
        return await self.client.invoke(PROJECTS_LIST, NoParams())

    async def projects_add_member(self, project: str, user: str, role: str) -> list[Record]:
        request = PROJECTS_ADD_MEMBER.parse_params({"project": project, "user": user, "role": role})
        return await self.client.invoke(PROJECTS_ADD_MEMBER, request)

    async def keys_create(
        self,
        user: str,
        project: str | None = None,
        name: str = "",
        ttl_s: float | None = None,
        limits: Limits | dict[str, Any] | None = None,
    ) -> NewKey:
        request = KEYS_CREATE.parse_params(
            {"user": user, "project": project, "name": name, "ttl_s": ttl_s, "limits": limits}
        )
        return await self.client.invoke(KEYS_CREATE, request)

    async def keys_list(self, user: str | None = None, project: str | None = None) -> list[Record]:
        request = KEYS_LIST.parse_params({"user": user, "project": project})
        return await self.client.invoke(KEYS_LIST, request)

    async def keys_revoke(self, key_id: str) -> Record:
        return await self.client.invoke(KEYS_REVOKE, KEYS_REVOKE.parse_params({"key_id": key_id}))

    async def keys_rotate(self, key_id: str, grace_s: float) -> NewKey:
        request = KEYS_ROTATE.parse_params({"key_id": key_id, "grace_s": grace_s})
        return await self.client.invoke(KEYS_ROTATE, request)

    async def usage(self, **query: Any) -> Record:
        """Totals (and with ``group_by`` the groups) of the ledger: ``UsageQuery``'s fields."""
        return await self.client.invoke(USAGE, USAGE.parse_params(query))

    async def budgets_set(
        self, scope: str, subject: str, metric: str, period: str, limit: float
    ) -> Record:
        request = BUDGETS_SET.parse_params(
            {"scope": scope, "subject": subject, "metric": metric, "period": period,
             "limit": limit}
        )  # fmt: skip
        return await self.client.invoke(BUDGETS_SET, request)

    async def budgets_list(
        self, scope: str | None = None, subject: str | None = None
    ) -> list[Record]:
        request = BUDGETS_LIST.parse_params({"scope": scope, "subject": subject})
        return await self.client.invoke(BUDGETS_LIST, request)

    async def budgets_remove(self, budget: str) -> Record:
        return await self.client.invoke(BUDGETS_REMOVE, BUDGETS_REMOVE.parse_params({"id": budget}))

    async def audit_verify(self) -> Record:
        """The audit chain re-computed and its head's signature checked (``Verdict``'s fields)."""
        return await self.client.invoke(AUDIT_VERIFY, NoParams())

    async def retention_set(
        self,
        project: str,
        prompts_s: float | None = None,
        ledger_s: float | None = None,
        datasets_s: float | None = None,
    ) -> Record:
        request = RETENTION_SET.parse_params(
            {"project": project, "prompts_s": prompts_s, "ledger_s": ledger_s,
             "datasets_s": datasets_s}
        )  # fmt: skip
        return await self.client.invoke(RETENTION_SET, request)

    async def retention_list(self) -> list[Record]:
        return await self.client.invoke(RETENTION_LIST, NoParams())

    async def retention_purge(self, dry_run: bool) -> Record:
        request = RETENTION_PURGE.parse_params({"dry_run": dry_run})
        return await self.client.invoke(RETENTION_PURGE, request)
