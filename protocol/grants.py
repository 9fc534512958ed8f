"""Cross-tenant service grants, verified (sans-I/O).

A tenant is an isolation boundary; a grant is the one way through it, as a NATS service export
and import: the **operator** signs that tenant ``importer`` may call the named services of tenant
``exporter``'s agents (a plugin, optionally only for one base model), that the importer's callers
hold the listed roles on the exporter's side (those of them they hold at home: a grant widens no
agent), until an expiry. Tenants cannot sign grants: an
import that only the two tenants agreed on would let a tenant admin widen what another tenant's
agents accept, and brokers already trust exactly one key, the operator's.

Unlike NATS, where the exporting account's JWT lists its exports and the importing account's
JWT its imports (each signed by its own account key, both re-issued to change), one record says
both sides: Atoll's tenants do not sign anything brokers enforce, and one record is one thing
to revoke. A revocation is another operator-signed record naming the grant's id; brokers keep
revocations so a grant seen again later stays dead.

Blobs: ``{"grant": [claims, sig]}`` and ``{"ungrant": [claims, sig]}``, msgpack + Ed25519 as
credentials are. Times are integer milliseconds since the epoch.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from atoll.protocol.errors import AuthError, ProtocolError
from atoll.protocol.frames import unpack_map
from atoll.protocol.subjects import check_name
from atoll.protocol.trust import MAX_CREDENTIAL, ROLES, check_time, now_ms, open_signed

# Roles a grant may hand to another tenant's callers: never the roles that administer a tenant
# (an importer must not become the exporter's admin) nor the operator's.
GRANTABLE_ROLES = ROLES - {"admin", "operator"}
MAX_SERVICES = 16
_ID = re.compile(r"[A-Za-z0-9_\-]{1,64}")
_MODEL = re.compile(r"[A-Za-z0-9_.:/\-]{1,128}")


MAX_PEER_GRANTS = 16  # grants joining two tenants that an agent's key may come with


@dataclass(frozen=True)
class Service:
    """One exported service: a plugin, and the one base model it is limited to ("" any)."""

    plugin: str
    base_model: str = ""


@dataclass(frozen=True)
class Grant:
    id: str
    exporter: str
    importer: str
    services: tuple[Service, ...]
    roles: tuple[str, ...]  # the most an importer's caller holds there: those it holds at home
    iat: int
    exp: int
    blob: bytes

    def exports(self, plugin: str | None) -> bool:
        return plugin is not None and any(s.plugin == plugin for s in self.services)

    def exports_any(self, roles: tuple[str, ...]) -> bool:
        """Does it export a plugin named like one of ``roles``? (an agent's signed roles say
        which plugins it was enrolled to serve)"""
        return any(s.plugin in roles for s in self.services)

    def allows(self, plugin: str, base_model: str) -> bool:
        """Does it cover ``plugin`` for ``base_model``? (what only the callee can check: the
        model is in the sealed payload)"""
        return any(
            s.plugin == plugin and (not s.base_model or s.base_model == base_model)
            for s in self.services
        )

    def live(self, now: int) -> bool:
        return self.exp > now


@dataclass(frozen=True)
class GrantRevocation:
    id: str
    at: int
    blob: bytes


def check_model(model: str) -> str:
    if not isinstance(model, str) or not _MODEL.fullmatch(model):
        raise ProtocolError(f"invalid base model {model!r}: 1-128 of A-Z a-z 0-9 _ . : / -")
    return model


def check_grant_id(grant_id: str) -> str:
    if not isinstance(grant_id, str) or not _ID.fullmatch(grant_id):
        raise ProtocolError(f"invalid grant id {grant_id!r}")
    return grant_id


def _claims(blob: Any, field: str, operator_pub: bytes, kind: str) -> dict[str, Any]:
    if not isinstance(blob, bytes):
        raise AuthError(f"{kind} missing")
    try:
        outer = unpack_map(blob, kind, MAX_CREDENTIAL)
    except ProtocolError as exc:
        raise AuthError(exc.reason) from None
    return open_signed(outer.get(field), operator_pub, kind)


def _service(raw: Any) -> Service:
    if not isinstance(raw, dict) or not set(raw) <= {"plugin", "base_model"}:
        raise AuthError("grant service malformed")
    model = raw.get("base_model", "")
    plugin = check_name(raw.get("plugin", ""), "plugin name")
    return Service(plugin, "" if model == "" else check_model(model))


def verify_grant(blob: Any, operator_pub: bytes, now: int | None = None) -> Grant:
    """The grant in ``blob``, signed by the operator and in force at ``now``; AuthError else."""
    now = now_ms() if now is None else now
    claims = _claims(blob, "grant", operator_pub, "grant")
    try:
        check_time(claims, "grant", now)
        if not claims["exp"]:
            raise AuthError("a grant must expire")
        services = claims.get("services")
        roles = claims.get("roles")
        if not isinstance(services, list) or not 0 < len(services) <= MAX_SERVICES:
            raise AuthError(f"a grant exports 1-{MAX_SERVICES} services")
        if not isinstance(roles, list) or not roles or not set(roles) <= GRANTABLE_ROLES:
            raise AuthError(f"grant roles must be some of {sorted(GRANTABLE_ROLES)}")
        exporter = check_name(claims.get("exporter", ""), "tenant name")
        importer = check_name(claims.get("importer", ""), "tenant name")
        if exporter == importer:
            raise AuthError("a grant joins two different tenants")
        return Grant(
            id=check_grant_id(claims.get("id", "")),
            exporter=exporter,
            importer=importer,
            services=tuple(_service(s) for s in services),
            roles=tuple(sorted(set(roles))),
            iat=claims["iat"],
            exp=claims["exp"],
            blob=blob,
        )
    except AuthError:
        raise
    except (ProtocolError, TypeError) as exc:
        raise AuthError(f"grant malformed: {getattr(exc, 'reason', exc)}") from None


def verify_grant_revocation(blob: Any, operator_pub: bytes) -> GrantRevocation:
    claims = _claims(blob, "ungrant", operator_pub, "ungrant")
    at = claims.get("iat")
    if type(at) is not int:
        raise AuthError("grant revocation has no time")
    try:
        return GrantRevocation(check_grant_id(claims.get("id", "")), at, blob)
    except ProtocolError as exc:
        raise AuthError(exc.reason) from None


def verify_record(blob: Any, operator_pub: bytes) -> Grant | GrantRevocation:
    """A grant or a grant's revocation, whichever ``blob`` holds (what brokers are sent)."""
    if isinstance(blob, bytes) and len(blob) <= MAX_CREDENTIAL:
        try:
            if "ungrant" in unpack_map(blob, "grant record", MAX_CREDENTIAL):
                return verify_grant_revocation(blob, operator_pub)
        except ProtocolError as exc:
            raise AuthError(exc.reason) from None
    return verify_grant(blob, operator_pub)


def calling_grant(
    grants: Sequence[Grant], caller_tenant: str, plugin: str | None, now: int
) -> Grant | str:
    """The grant under which an agent of another tenant calls ``plugin`` here, or why it may
    not. Only a tenant that imports from ours calls into it, through a live grant exporting the
    plugin; a tenant ours imports from answers our calls and starts none (its brokers pass its
    replies, so the callee is what refuses its requests). Brokers checked the same; the callee
    checks again so that a broker is not all that stands between another tenant and a plugin."""
    imported = [g for g in grants if g.importer == caller_tenant]
    if not imported:
        return (
            f"tenant {caller_tenant!r} imports nothing from this tenant: its agents answer "
            "calls made to them and make none here"
        )
    live = [g for g in imported if g.live(now)]
    if not live:
        return f"grant {imported[0].id} has expired"
    for grant in live:
        if grant.exports(plugin):
            return grant
    return f"grant {live[0].id} does not export {plugin or 'system'!r} to {caller_tenant!r}"
    if not grant.live(now):
        return f"grant {grant.id} has expired"
    if not grant.exports(plugin):
        return f"grant {grant.id} does not export {plugin or 'system'!r} to {grant.importer!r}"
    return None
