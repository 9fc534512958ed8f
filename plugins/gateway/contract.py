"""The gateway's administration over the overlay (what `atoll keys|projects|users|adapters` call
as a tenant admin): method names and parameters. Replies are plain dicts of the records in
accounts.py; a new key's secret appears once, in the reply that creates it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

PLUGIN = "gateway"


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Limits(BaseModel):
    """Limits of one key or one project; None: no limit of that kind."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests_per_min: int | None = Field(None, ge=1, le=10**7)
    tokens_per_min: int | None = Field(None, ge=1, le=10**12)
    concurrent: int | None = Field(None, ge=1, le=10**6)


class UserCreate(_Params):
    name: str
    admin: bool = False


class ProjectCreate(_Params):
    name: str
    labels: dict[str, str] = {}
    store_prompts: bool = False
    limits: Limits | None = None


class MemberChange(_Params):
    project: str
    user: str
    role: Literal["owner", "member", "viewer"] = "member"


class KeyCreate(_Params):
    user: str
    project: str | None = None
    name: str = ""
    ttl_s: float | None = Field(None, gt=0)
    limits: Limits | None = None


class KeyQuery(_Params):
    user: str | None = None
    project: str | None = None


class KeyRef(_Params):
    key_id: str


class KeyRotate(_Params):
    key_id: str
    grace_s: float = Field(3600, ge=0)


class AdapterRegister(_Params):
    id: str
    base_model: str
    owner: str | None = None
    project: str | None = None
    public: bool = False


class UsageQuery(_Params):
    key_id: str | None = None
    project: str | None = None
    user: str | None = None
    since: float | None = None


class AuditQuery(_Params):
    limit: int = Field(100, ge=1, le=10_000)
    since: float | None = None


# method name -> its parameters
METHODS: dict[str, type[_Params] | None] = {
    "users_create": UserCreate,
    "users_list": None,
    "projects_create": ProjectCreate,
    "projects_list": None,
    "projects_add_member": MemberChange,
    "projects_remove_member": MemberChange,
    "keys_create": KeyCreate,
    "keys_list": KeyQuery,
    "keys_revoke": KeyRef,
    "keys_rotate": KeyRotate,
    "adapters_register": AdapterRegister,
    "adapters_list": None,
    "usage": UsageQuery,
    "audit": AuditQuery,
}
