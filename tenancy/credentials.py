"""Issuing signed claims (sans-I/O): tenant claims, broker and agent credentials, enrollment
tokens and revocations, the claims ``atoll.protocol.trust`` verifies.

A claim is a msgpack map signed with Ed25519, carried as ``[body, signature]``; the operator signs
tenant and broker claims, a tenant signs agent claims directly or an enrollment grant whose
one-time key signs the agent claim of whoever redeems the token.

Times are integer milliseconds since the epoch.
"""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass
from typing import Any

import msgpack
from nacl.signing import SigningKey

from atoll.protocol.errors import AuthError
from atoll.protocol.frames import pack
from atoll.protocol.subjects import check_name
from atoll.protocol.trust import ROLES, check_labels, check_time, grant_claims, now_ms, open_signed

TOKEN_PREFIX = "atoll1."
CREDENTIAL_TTL_S = 30 * 86400  # an agent credential's lifetime unless the issuer says otherwise


def sign(key: SigningKey, claims: dict[str, Any]) -> bytes:
    body = pack(claims)
    return pack([body, key.sign(body).signature])


def tenant_claim(operator: SigningKey, name: str, tenant_pub: bytes) -> bytes:
    check_name(name, "tenant name")
    claims = {"k": "tenant", "name": name, "pub": tenant_pub, "iat": now_ms(), "exp": 0}
    return sign(operator, claims)


def broker_credential(operator: SigningKey, name: str, broker_pub: bytes, ttl_s: int = 0) -> bytes:
    iat = now_ms()
    exp = iat + ttl_s * 1000 if ttl_s else 0
    claims = {"k": "broker", "name": name, "pub": broker_pub, "iat": iat, "exp": exp}
    return pack({"broker": sign(operator, claims)})


def _check_roles(roles: list[str]) -> list[str]:
    bad = [r for r in roles if r not in ROLES]
    if bad or not roles:
        raise ValueError(f"unknown roles {bad}; choose from {sorted(ROLES)}")
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
    ttl_s: int = CREDENTIAL_TTL_S,
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
            grant = grant_claims(open_signed(obj["grant"], tclaims["pub"], "enroll"))
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
        check_time(grant, "enrollment token", now_ms() if now is None else now)
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
    cred_ttl_s: int = CREDENTIAL_TTL_S,
    labels: dict[str, str] | None = None,
) -> EnrollmentToken:
    grant_key = SigningKey.generate()
    iat = now_ms()
    jti = secrets.token_hex(12)
    claims: dict[str, Any] = {
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


def service_grant(
    operator: SigningKey,
    exporter: str,
    importer: str,
    services: list[dict[str, str]],
    roles: list[str],
    ttl_s: int,
) -> bytes:
    """An operator-signed grant (``atoll.protocol.grants``): ``importer``'s callers may use
    ``services`` of ``exporter``'s agents, holding ``roles`` there, for ``ttl_s`` seconds."""
    if ttl_s <= 0:
        raise ValueError("a grant must expire: give it a lifetime")
    iat = now_ms()
    claims = {
        "k": "grant",
        "id": secrets.token_hex(8),
        "exporter": check_name(exporter, "tenant name"),
        "importer": check_name(importer, "tenant name"),
        "services": services,
        "roles": sorted(set(roles)),
        "iat": iat,
        "exp": iat + ttl_s * 1000,
    }
    return pack({"grant": sign(operator, claims)})


def grant_revocation(operator: SigningKey, grant_id: str) -> bytes:
    claims = {"k": "ungrant", "id": grant_id, "iat": now_ms(), "exp": 0}
    return pack({"ungrant": sign(operator, claims)})
