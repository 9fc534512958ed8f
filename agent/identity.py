"""An agent's own identity on disk: its key, its credential chain, the operator key it trusts
and the tenant's feed keys (secrets: the identity file is 0600 like the key)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import msgpack
from nacl.signing import SigningKey

from atoll.protocol.trust import AgentIdentity, verify_agent
from atoll.tenancy.credentials import CREDENTIAL_TTL_S, EnrollmentToken
from atoll.tenancy.keys import generate, load_key, read_secret, save_key, write_secret
from atoll.tenancy.operator import OperatorStore

KEY_FILE = "agent.key"
IDENTITY_FILE = "identity.msgpack"


@dataclass
class AgentKeys:
    key: SigningKey
    credential: bytes
    operator_pub: bytes
    feed_keys: dict[int, bytes]

    @property
    def ident(self) -> AgentIdentity:
        return verify_agent(self.credential, self.operator_pub)

    def save(self, data_dir: Path) -> None:
        data_dir = Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        save_key(data_dir / KEY_FILE, self.key)
        blob = msgpack.packb(
            {"cred": self.credential, "op": self.operator_pub, "feed": self.feed_keys}
        )
        write_secret(data_dir / IDENTITY_FILE, blob)

    @classmethod
    def load(cls, data_dir: Path) -> AgentKeys:
        data_dir = Path(data_dir)
        if not (data_dir / IDENTITY_FILE).exists():
            raise FileNotFoundError(
                f"no agent identity in {data_dir}: run `atoll agent join URL --token T` first"
            )
        obj = msgpack.unpackb(read_secret(data_dir / IDENTITY_FILE), strict_map_key=False)
        return cls(load_key(data_dir / KEY_FILE), obj["cred"], obj["op"], obj["feed"])

    @classmethod
    def from_token(cls, token: EnrollmentToken, name: str) -> AgentKeys:
        key = generate()
        cred = token.redeem(key.verify_key.encode(), name)
        return cls(key, cred, token.operator_pub, token.feed_keys)

    @classmethod
    def issue(
        cls,
        operator: OperatorStore,
        tenant: str,
        name: str,
        roles: list[str],
        region: str = "",
        ttl_s: int = CREDENTIAL_TTL_S,
        labels: dict[str, str] | None = None,
    ) -> AgentKeys:
        """Mint an identity directly with the tenant key (all-in-one hosts, admin tools)."""
        key = generate()
        cred = operator.agent_credential(
            tenant, key.verify_key.encode(), name, roles, region, ttl_s, labels
        )
        return cls(key, cred, operator.operator_pub, operator.tenant(tenant).feed_keys)
