"""The trust chain, verified (sans-I/O): signed claims, agent and broker identities, revocations.

A claim is a msgpack map signed with Ed25519, carried as ``[body, signature]``. The chain follows
NATS accounts: the operator signs tenant claims and broker claims; a tenant signs agent claims
directly, or signs an enrollment grant whose one-time key signs the agent claim of whoever
redeems the token. Brokers and agents hold only the operator public key and verify the whole
chain themselves, so nothing a broker relays can be forged without a tenant key. Issuing claims
is ``atoll.tenancy.credentials``'s business; this module only checks them.

Times are integer milliseconds since the epoch.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

import msgpack
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from atoll.protocol.errors import AuthError, ProtocolError
from atoll.protocol.frames import unpack_map
from atoll.protocol.subjects import check_name

# The roles a credential may carry: a fixed vocabulary, signed into credentials (what each may
# do is ``atoll.tenancy.permissions``' table).
ROLES = frozenset(
    {
        "agent", "admin", "operator", "inference", "training", "storage", "gateway", "user",
        "controller",  # keeps declarative pipelines running: manages other agents' plugins
    }
)  # fmt: skip
CLOCK_SKEW_MS = 120_000
MAX_CREDENTIAL = 16 * 1024
MAX_LABELS = 32
_LABEL_KEY = re.compile(r"[a-z0-9][a-z0-9_.\-]{0,62}")
_LABEL_VALUE = re.compile(r"[A-Za-z0-9_.:\-]{0,64}")


def now_ms() -> int:
    return int(time.time() * 1000)


def open_signed(blob: Any, signer: bytes, kind: str) -> dict[str, Any]:
    """Verify a ``[body, sig]`` blob against ``signer``; return its claims of the given kind."""
    if not isinstance(blob, bytes) or len(blob) > MAX_CREDENTIAL:
        raise AuthError(f"{kind} claim missing or oversized")
    try:
        body, sig = msgpack.unpackb(blob, raw=False, max_array_len=2, max_map_len=0, max_ext_len=0)
        VerifyKey(signer).verify(body, sig)
    except BadSignatureError:
        raise AuthError(f"{kind} claim has a bad signature") from None
    except Exception:
        raise AuthError(f"{kind} claim is malformed") from None
    try:
        claims = unpack_map(body, f"{kind} claim", MAX_CREDENTIAL)
    except ProtocolError as exc:
        raise AuthError(exc.reason) from None
    if claims.get("k") != kind:
        raise AuthError(f"expected a {kind} claim, got {claims.get('k')!r}")
    return claims


def _need(claims: dict[str, Any], field: str, kind: type) -> Any:
    value = claims.get(field)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise AuthError(f"claim field {field!r} missing or of the wrong type")
    return value


def check_time(claims: dict[str, Any], what: str, now: int) -> None:
    iat = _need(claims, "iat", int)
    exp = _need(claims, "exp", int)
    if iat > now + CLOCK_SKEW_MS:
        raise AuthError(f"{what} is issued in the future")
    if exp and exp <= now:
        raise AuthError(f"{what} expired {(now - exp) // 1000} s ago", code="expired")


def check_labels(labels: dict[str, str]) -> dict[str, str]:
    """Policy labels (``phi=true``, ``site=eu``): signed into tokens and credentials, so policy
    routing never trusts what an agent says of itself."""
    if not isinstance(labels, dict) or len(labels) > MAX_LABELS:
        raise ValueError(f"labels must be a map of at most {MAX_LABELS} entries")
    for k, v in labels.items():
        if not (isinstance(k, str) and _LABEL_KEY.fullmatch(k)):
            raise ValueError(f"label name {k!r}: use a-z, 0-9, '_', '-', '.' (1-63 chars)")
        if not (isinstance(v, str) and _LABEL_VALUE.fullmatch(v)):
            raise ValueError(f"label {k}={v!r}: use A-Z, a-z, 0-9, '_', '-', '.', ':' (0-64 chars)")
    return dict(sorted(labels.items()))


@dataclass(frozen=True)
class AgentIdentity:
    pub: bytes
    name: str
    tenant: str
    roles: tuple[str, ...]
    region: str
    iat: int
    exp: int
    grant: str  # enrollment token id, "" when signed by the tenant key directly
    credential: bytes  # the verified chain, handed to peers that want to seal to this agent
    labels: dict[str, str]  # signed policy labels (phi, site, ...)
    grant_exp: int = 0  # when the token expires: brokers refuse a first redemption after it

    def has_role(self, *roles: str) -> bool:
        return any(r in self.roles for r in roles)


@dataclass(frozen=True)
class Revocation:
    tenant: str
    name: str
    pub: bytes
    before: int
    blob: bytes

    def covers(self, ident: AgentIdentity) -> bool:
        if ident.tenant != self.tenant or ident.iat > self.before:
            return False
        return (not self.name or self.name == ident.name) and (
            not self.pub or self.pub == ident.pub
        )


def grant_claims(grant: dict[str, Any]) -> dict[str, Any]:
    """Type-check an enrollment grant's fields (a tenant key holder could sign anything)."""
    for field, kind in (
        ("iat", int),
        ("exp", int),
        ("roles", list),
        ("region", str),
        ("cred_ttl", int),
        ("jti", str),
        ("pub", bytes),
        ("tenant", str),
        ("labels", dict),
    ):
        _need(grant, field, kind)
    if not all(isinstance(r, str) for r in grant["roles"]) or len(grant["pub"]) != 32:
        raise AuthError("enrollment grant malformed")
    if not grant["jti"]:  # an empty id would read as "no token" and skip the one-use check
        raise AuthError("enrollment grant has no id")
    return grant


def _chain(blob: Any, what: str) -> dict[str, Any]:
    if not isinstance(blob, bytes):
        raise AuthError(f"{what} missing")
    try:
        return unpack_map(blob, what, MAX_CREDENTIAL)
    except ProtocolError as exc:
        raise AuthError(exc.reason) from None


def _tenant(chain: dict[str, Any], operator_pub: bytes, now: int) -> dict[str, Any]:
    claims = open_signed(chain.get("tenant"), operator_pub, "tenant")
    check_time(claims, "tenant", now)
    _need(claims, "name", str)
    if len(_need(claims, "pub", bytes)) != 32:
        raise AuthError("tenant key malformed")
    return claims


def verify_agent(blob: Any, operator_pub: bytes, now: int | None = None) -> AgentIdentity:
    now = now_ms() if now is None else now
    chain = _chain(blob, "agent credential")
    tenant = _tenant(chain, operator_pub, now)
    signer = tenant["pub"]
    grant_id = ""
    grant = None
    if chain.get("grant") is not None:
        grant = grant_claims(open_signed(chain["grant"], tenant["pub"], "enroll"))
        if grant["tenant"] != tenant["name"]:
            raise AuthError("enrollment grant is for another tenant")
        signer = grant["pub"]
        grant_id = grant["jti"]
    claims = open_signed(chain.get("agent"), signer, "agent")
    check_time(claims, "credential", now)
    roles = _need(claims, "roles", list)
    if not roles or not all(isinstance(r, str) and r in ROLES for r in roles):
        raise AuthError("credential roles malformed")
    if grant is not None:
        if claims.get("grant") != grant_id:
            raise AuthError("credential does not match its enrollment grant")
        if not (grant["iat"] <= claims["iat"] <= grant["exp"]):
            raise AuthError("credential was minted outside its token's validity", code="expired")
        ttl_ms = grant["cred_ttl"] * 1000
        if ttl_ms and not (claims["exp"] and claims["exp"] - claims["iat"] <= ttl_ms):
            raise AuthError("credential outlives the lifetime its token allows")
        if not set(roles) <= set(grant["roles"]):
            raise AuthError("credential claims roles its token did not grant")
        if grant["region"] and claims.get("region") != grant["region"]:
            raise AuthError("credential claims a region its token did not grant")
        if claims.get("labels") != grant["labels"]:
            raise AuthError("credential claims labels its token did not grant")
    if claims.get("tenant") != tenant["name"]:
        raise AuthError("credential names another tenant")
    pub = _need(claims, "pub", bytes)
    if len(pub) != 32:
        raise AuthError("agent key malformed")
    name = _need(claims, "name", str)
    try:
        check_name(name, "agent name")
        labels = check_labels(_need(claims, "labels", dict))
    except ProtocolError as exc:
        raise AuthError(exc.reason) from None
    except ValueError as exc:
        raise AuthError(f"credential labels malformed: {exc}") from None
    return AgentIdentity(
        pub=pub,
        name=name,
        tenant=tenant["name"],
        roles=tuple(roles),
        region=_need(claims, "region", str),
        # The redeemer signs its own claim and so picks its "iat"; the last time the tenant
        # itself signed is the grant's, which is what revocations must compare against.
        iat=grant["iat"] if grant is not None else claims["iat"],
        exp=claims["exp"],
        grant=grant_id,
        credential=blob,
        labels=labels,
        grant_exp=grant["exp"] if grant is not None else 0,
    )


@dataclass(frozen=True)
class BrokerIdentity:
    pub: bytes
    name: str


def verify_broker(blob: Any, operator_pub: bytes, now: int | None = None) -> BrokerIdentity:
    now = now_ms() if now is None else now
    chain = _chain(blob, "broker credential")
    claims = open_signed(chain.get("broker"), operator_pub, "broker")
    check_time(claims, "broker credential", now)
    pub = _need(claims, "pub", bytes)
    if len(pub) != 32:
        raise AuthError("broker key malformed")
    return BrokerIdentity(pub=pub, name=_need(claims, "name", str))


def verify_revocation(blob: Any, operator_pub: bytes, now: int | None = None) -> Revocation:
    now = now_ms() if now is None else now
    chain = _chain(blob, "revocation")
    tenant = _tenant(chain, operator_pub, now)
    claims = open_signed(chain.get("revoke"), tenant["pub"], "revoke")
    if claims.get("tenant") != tenant["name"]:
        raise AuthError("revocation names another tenant")
    return Revocation(
        tenant=tenant["name"],
        name=_need(claims, "name", str),
        pub=_need(claims, "pub", bytes),
        before=_need(claims, "iat", int),
        blob=blob,
    )
