"""Signed claims and the trust chain (sans-I/O).

A claim is a msgpack map signed with Ed25519, carried as ``[body, signature]``. The chain follows
NATS accounts: the operator signs tenant claims and broker claims; a tenant signs agent claims
directly, or signs an enrollment grant whose one-time key signs the agent claim of whoever
redeems the token. Brokers and agents hold only the operator public key and verify the whole
chain themselves, so nothing a broker relays can be forged without a tenant key.

Times are integer milliseconds since the epoch.
"""

from __future__ import annotations

import base64
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

import msgpack
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from atoll.protocol.errors import AuthError, ProtocolError
from atoll.protocol.frames import pack, unpack_map
from atoll.protocol.subjects import check_name
from atoll.tenancy.permissions import ROLES as KNOWN_ROLES

TOKEN_PREFIX = "atoll1."
CLOCK_SKEW_MS = 120_000
MAX_CREDENTIAL = 16 * 1024
MAX_LABELS = 32
_LABEL_KEY = re.compile(r"[a-z0-9][a-z0-9_.\-]{0,62}")
_LABEL_VALUE = re.compile(r"[A-Za-z0-9_.:\-]{0,64}")


def now_ms() -> int:
    return int(time.time() * 1000)


def sign(key: SigningKey, claims: dict[str, Any]) -> bytes:
    body = pack(claims)
    return pack([body, key.sign(body).signature])


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


def _check_time(claims: dict[str, Any], what: str, now: int) -> None:
    iat = _need(claims, "iat", int)
    exp = _need(claims, "exp", int)
    if iat > now + CLOCK_SKEW_MS:
        raise AuthError(f"{what} is issued in the future")
    if exp and exp <= now:
        raise AuthError(f"{what} expired {(now - exp) // 1000} s ago", code="expired")


# --- issuing -----------------------------------------------------------------------------------


def tenant_claim(operator: SigningKey, name: str, tenant_pub: bytes) -> bytes:
    check_name(name, "tenant name")
    claims = {"k": "tenant", "name": name, "pub": tenant_pub, "iat": now_ms(), "exp": 0}
    return sign(operator, claims)


def broker_credential(operator: SigningKey, name: str, broker_pub: bytes, ttl_s: int = 0) -> bytes:
    iat = now_ms()
    exp = iat + ttl_s * 1000 if ttl_s else 0
    claims = {"k": "broker", "name": name, "pub": broker_pub, "iat": iat, "exp": exp}
    return pack({"broker": sign(operator, claims)})


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


def _check_roles(roles: list[str]) -> list[str]:
    bad = [r for r in roles if r not in KNOWN_ROLES]
    if bad or not roles:
        raise ValueError(f"unknown roles {bad}; choose from {sorted(KNOWN_ROLES)}")
    return sorted(set(roles))


def agent_claims(
    agent_pub: bytes,
    name: str,
    tenant: str,
    roles: list[str],
    region: str,
    ttl_s: int,
    grant: str = "",
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    check_name(name, "agent name")
    iat = now_ms()
    return {
        "k": "agent",
        "pub": agent_pub,
        "name": name,
        "tenant": tenant,
        "roles": _check_roles(roles),
        "region": region,
        "labels": check_labels(labels or {}),
        "iat": iat,
        "exp": iat + ttl_s * 1000 if ttl_s else 0,
        "grant": grant,
    }


def agent_credential(
    tenant_key: SigningKey,
    tenant_claim_blob: bytes,
    agent_pub: bytes,
    name: str,
    tenant: str,
    roles: list[str],
    region: str = "",
    ttl_s: int = 30 * 86400,
    labels: dict[str, str] | None = None,
) -> bytes:
    """A credential signed directly by the tenant key (its holder needs no token)."""
    claims = agent_claims(agent_pub, name, tenant, roles, region, ttl_s, labels=labels)
    return pack({"tenant": tenant_claim_blob, "agent": sign(tenant_key, claims)})


@dataclass(frozen=True)
class EnrollmentToken:
    """What a one-time enrollment token carries (it is a secret: it holds the grant's key)."""

    tenant_claim: bytes
    grant: bytes
    grant_seed: bytes
    operator_pub: bytes
    feed_keys: dict[int, bytes]
    tenant: str
    roles: list[str]
    region: str
    cred_ttl_s: int
    jti: str
    labels: dict[str, str]

    def encode(self) -> str:
        raw = pack(
            {
                "tenant": self.tenant_claim,
                "grant": self.grant,
                "seed": self.grant_seed,
                "op": self.operator_pub,
                "feed": self.feed_keys,
            }
        )
        return TOKEN_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str, now: int | None = None) -> EnrollmentToken:
        text = text.strip()
        if not text.startswith(TOKEN_PREFIX):
            raise AuthError("not an Atoll enrollment token")
        body = text[len(TOKEN_PREFIX) :]
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
            obj = msgpack.unpackb(raw, raw=False, strict_map_key=False, max_ext_len=0)
            op = obj["op"]
            tclaims = open_signed(obj["tenant"], op, "tenant")
            grant = _grant_claims(open_signed(obj["grant"], tclaims["pub"], "enroll"))
            feed = obj["feed"]
            seed = obj["seed"]
            if not (isinstance(seed, bytes) and len(seed) == 32):
                raise AuthError("enrollment token key is malformed")
            if not feed or not all(
                type(k) is int and isinstance(v, bytes) and len(v) == 32 for k, v in feed.items()
            ):
                raise AuthError("enrollment token feed keys are malformed")
        except AuthError:
            raise
        except Exception:
            raise AuthError("enrollment token is malformed") from None
        _check_time(grant, "enrollment token", now_ms() if now is None else now)
        if SigningKey(seed).verify_key.encode() != grant["pub"]:
            raise AuthError("enrollment token key does not match its grant")
        return cls(
            tenant_claim=obj["tenant"],
            grant=obj["grant"],
            grant_seed=seed,
            operator_pub=op,
            feed_keys=feed,
            tenant=tclaims["name"],
            roles=list(grant["roles"]),
            region=grant["region"],
            cred_ttl_s=grant["cred_ttl"],
            jti=grant["jti"],
            labels=grant["labels"],
        )

    def redeem(self, agent_pub: bytes, name: str) -> bytes:
        """Mint the agent credential this token allows (its labels exactly the token's).
        Brokers enforce the token's one use: one name, one key."""
        claims = agent_claims(
            agent_pub,
            name,
            self.tenant,
            self.roles,
            self.region,
            self.cred_ttl_s,
            self.jti,
            self.labels,
        )
        return pack(
            {
                "tenant": self.tenant_claim,
                "grant": self.grant,
                "agent": sign(SigningKey(self.grant_seed), claims),
            }
        )


def enrollment_token(
    tenant_key: SigningKey,
    tenant_claim_blob: bytes,
    operator_pub: bytes,
    feed_keys: dict[int, bytes],
    tenant: str,
    roles: list[str],
    ttl_s: int,
    region: str = "",
    cred_ttl_s: int = 30 * 86400,
    labels: dict[str, str] | None = None,
) -> EnrollmentToken:
    grant_key = SigningKey.generate()
    iat = now_ms()
    jti = secrets.token_hex(12)
    claims = {
        "k": "enroll",
        "tenant": tenant,
        "pub": grant_key.verify_key.encode(),
        "roles": _check_roles(roles),
        "region": region,
        "iat": iat,
        "exp": iat + ttl_s * 1000,
        "cred_ttl": cred_ttl_s,
        "jti": jti,
        "labels": check_labels(labels or {}),
    }
    return EnrollmentToken(
        tenant_claim=tenant_claim_blob,
        grant=sign(tenant_key, claims),
        grant_seed=bytes(grant_key),
        operator_pub=operator_pub,
        feed_keys=dict(feed_keys),
        tenant=tenant,
        roles=claims["roles"],
        region=region,
        cred_ttl_s=cred_ttl_s,
        jti=jti,
        labels=claims["labels"],
    )


def revocation(
    tenant_key: SigningKey, tenant_claim_blob: bytes, tenant: str, name: str = "", pub: bytes = b""
) -> bytes:
    """Revoke every credential of agent ``name`` (or key ``pub``) issued up to now."""
    if not name and not pub:
        raise ValueError("a revocation names an agent or a key")
    claims = {"k": "revoke", "tenant": tenant, "name": name, "pub": pub, "iat": now_ms(), "exp": 0}
    return pack({"tenant": tenant_claim_blob, "revoke": sign(tenant_key, claims)})


# --- verifying ---------------------------------------------------------------------------------


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


def _grant_claims(grant: dict[str, Any]) -> dict[str, Any]:
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
    _check_time(claims, "tenant", now)
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
        grant = _grant_claims(open_signed(chain["grant"], tenant["pub"], "enroll"))
        if grant["tenant"] != tenant["name"]:
            raise AuthError("enrollment grant is for another tenant")
        signer = grant["pub"]
        grant_id = grant["jti"]
    claims = open_signed(chain.get("agent"), signer, "agent")
    _check_time(claims, "credential", now)
    roles = _need(claims, "roles", list)
    if not roles or not all(isinstance(r, str) and r in KNOWN_ROLES for r in roles):
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
    _check_time(claims, "broker credential", now)
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
