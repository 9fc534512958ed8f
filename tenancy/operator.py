"""The operator's data dir: the operator key, tenants, their keys and feed keys.

Layout::

    D/operator.key  D/operator.pub
    D/tenants/<name>/tenant.key   tenant.claim   feed.keys   revocations/
    D/grants/<id>.grant   <id>.ungrant   (cross-tenant service grants, their revocations)
    D/broker/...                  (see atoll.broker.identity)

Whoever holds this directory can mint credentials, tokens and revocations; brokers and agents
need only ``operator.pub``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import msgpack
from nacl.signing import SigningKey

from atoll.protocol.errors import ProtocolError
from atoll.protocol.grants import Grant, check_grant_id, verify_grant
from atoll.protocol.subjects import check_name
from atoll.protocol.trust import now_ms
from atoll.tenancy import credentials as cred
from atoll.tenancy.keys import generate, load_key, read_secret, save_key, write_secret

DEFAULT_TENANT = "default"


@dataclass
class Tenant:
    name: str
    key: SigningKey
    claim: bytes
    feed_keys: dict[int, bytes]


class OperatorStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def initialised(self) -> bool:
        return (self.root / "operator.key").exists()

    def init(self) -> bool:
        """Create the operator key and tenant ``default`` if absent. True if anything was made."""
        made = False
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        if not self.initialised:
            key = generate()
            save_key(self.root / "operator.key", key)
            (self.root / "operator.pub").write_bytes(key.verify_key.encode())
            made = True
        if not self.tenant_dir(DEFAULT_TENANT).exists():
            self.create_tenant(DEFAULT_TENANT)
            made = True
        return made

    @property
    def operator_key(self) -> SigningKey:
        if not self.initialised:
            raise FileNotFoundError(f"{self.root} is not initialised: run `atoll init`")
        return load_key(self.root / "operator.key")

    @property
    def operator_pub(self) -> bytes:
        return (self.root / "operator.pub").read_bytes()

    def tenant_dir(self, name: str) -> Path:
        return self.root / "tenants" / check_name(name, "tenant name")

    def tenants(self) -> list[str]:
        base = self.root / "tenants"
        return sorted(p.name for p in base.iterdir()) if base.exists() else []

    def create_tenant(self, name: str) -> Tenant:
        d = self.tenant_dir(name)
        if d.exists():
            raise FileExistsError(f"tenant {name!r} already exists")
        key = generate()
        claim = cred.tenant_claim(self.operator_key, name, key.verify_key.encode())
        d.mkdir(parents=True, mode=0o700)
        save_key(d / "tenant.key", key)
        (d / "tenant.claim").write_bytes(claim)
        feed = {1: os.urandom(32)}
        write_secret(d / "feed.keys", msgpack.packb(feed))
        return Tenant(name, key, claim, feed)

    def tenant(self, name: str) -> Tenant:
        d = self.tenant_dir(name)
        if not d.exists():
            raise FileNotFoundError(f"no tenant {name!r} in {self.root}")
        feed = msgpack.unpackb(read_secret(d / "feed.keys"), strict_map_key=False)
        return Tenant(name, load_key(d / "tenant.key"), (d / "tenant.claim").read_bytes(), feed)

    def token(
        self,
        tenant: str,
        roles: list[str],
        ttl_s: int,
        region: str = "",
        cred_ttl_s: int = cred.CREDENTIAL_TTL_S,
        labels: dict[str, str] | None = None,
    ) -> cred.EnrollmentToken:
        t = self.tenant(tenant)
        return cred.enrollment_token(
            t.key,
            t.claim,
            self.operator_pub,
            t.feed_keys,
            tenant,
            roles,
            ttl_s,
            region,
            cred_ttl_s,
            labels,
        )

    def agent_credential(
        self,
        tenant: str,
        agent_pub: bytes,
        name: str,
        roles: list[str],
        region: str = "",
        ttl_s: int = cred.CREDENTIAL_TTL_S,
        labels: dict[str, str] | None = None,
    ) -> bytes:
        t = self.tenant(tenant)
        return cred.agent_credential(
            t.key, t.claim, agent_pub, name, tenant, roles, region, ttl_s, labels
        )

    def broker_credential(self, name: str, broker_pub: bytes) -> bytes:
        return cred.broker_credential(self.operator_key, name, broker_pub)

    def revoke(self, tenant: str, name: str = "", pub: bytes = b"") -> bytes:
        t = self.tenant(tenant)
        blob = cred.revocation(t.key, t.claim, tenant, name=name, pub=pub)
        rdir = self.tenant_dir(tenant) / "revocations"
        rdir.mkdir(exist_ok=True)
        (rdir / f"{now_ms()}-{name or pub.hex()[:16]}.rev").write_bytes(blob)
        return blob

    def revocations(self) -> list[bytes]:
        return [p.read_bytes() for p in sorted(self.root.glob("tenants/*/revocations/*.rev"))]

    # --- cross-tenant service grants (atoll.protocol.grants) ------------------------------------

    def grant(
        self,
        exporter: str,
        importer: str,
        services: list[dict[str, str]],
        roles: list[str],
        ttl_s: int,
    ) -> Grant:
        """Sign and keep a grant; both tenants must exist here. Raises ValueError (or AuthError:
        ProtocolError) for a grant brokers would refuse."""
        for tenant in (exporter, importer):
            if not self.tenant_dir(tenant).exists():
                raise ValueError(f"no tenant {tenant!r} in {self.root}")
        blob = cred.service_grant(self.operator_key, exporter, importer, services, roles, ttl_s)
        grant = verify_grant(blob, self.operator_pub)  # what brokers will say of it, said now
        gdir = self.root / "grants"
        gdir.mkdir(exist_ok=True, mode=0o700)
        (gdir / f"{grant.id}.grant").write_bytes(blob)
        return grant

    def grants(self) -> list[tuple[Grant | None, bytes, bool]]:
        """Every grant kept here: (the grant, or None once expired; its blob; revoked?)."""
        out: list[tuple[Grant | None, bytes, bool]] = []
        for path in sorted((self.root / "grants").glob("*.grant")):
            blob = path.read_bytes()
            try:
                grant: Grant | None = verify_grant(blob, self.operator_pub)
            except ProtocolError:
                grant = None
            out.append((grant, blob, path.with_suffix(".ungrant").exists()))
        return out

    def revoke_grant(self, grant_id: str) -> bytes:
        path = self.root / "grants" / f"{check_grant_id(grant_id)}.grant"
        if not path.exists():
            raise FileNotFoundError(f"no grant {grant_id!r} in {self.root}")
        blob = cred.grant_revocation(self.operator_key, grant_id)
        path.with_suffix(".ungrant").write_bytes(blob)
        return blob

    def grant_records(self) -> list[bytes]:
        """Grants and their revocations, for a broker started on this dir to honour."""
        return [p.read_bytes() for p in sorted((self.root / "grants").glob("*.*grant"))]
