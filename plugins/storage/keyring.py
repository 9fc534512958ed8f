"""The storage agent's key-encryption keys (KEKs): the tenant's keys that wrap each object's data
key (envelope encryption, sealed_store.py).

They are random 256-bit keys in one file, ``<plugin data dir>/keyring.json``, written 0600 and
refused if anyone else may read it, not keys derived from an operator's master secret: a storage
agent belongs to one tenant, so its file is that tenant's keyring (it names the tenant, and a
keyring copied to another tenant's agent is refused); no secret has to sit in a config file or an
environment variable; and rotation is adding a version, which needs nothing from the operator.
Back the file up with the registry: without it the sealed objects cannot be read. Objects in S3
are sealed before they leave the host, so the bucket's operator never holds a key.

Rotation (``rotate``) adds a new current KEK; the data keys are then re-wrapped under it and the
old KEKs retired (``retire``) once no data key needs them — the objects are never rewritten.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from atoll.plugins.storage.contract.wire import ObjectDamaged
from atoll.tenancy.keys import read_secret, write_secret

KEYRING_FILE = "keyring.json"
NONCE = 12


class Keyring:
    def __init__(self, path: Path, tenant: str, keys: dict[str, bytes], current: str) -> None:
        self.path = path
        self.tenant = tenant
        self.keys = keys  # KEK id -> key
        self.current = current

    @classmethod
    def open(cls, path: Path, tenant: str) -> Keyring:
        """The keyring at ``path``, made with one KEK on first use."""
        if not path.exists():
            ring = cls(path, tenant, {}, "")
            ring.rotate()
            return ring
        try:
            data = json.loads(read_secret(path))
            keys = {k: base64.b64decode(v) for k, v in data["keys"].items()}
            ring = cls(path, data["tenant"], keys, data["current"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path} is not a storage keyring: {exc}") from None
        if ring.tenant != tenant:
            raise ValueError(
                f"{path} is the keyring of tenant {ring.tenant!r}, and this agent is in {tenant!r}"
            )
        if ring.current not in keys or any(len(k) != 32 for k in keys.values()):
            raise ValueError(f"{path} is not a storage keyring: bad keys")
        return ring

    def _save(self) -> None:
        data = {
            "tenant": self.tenant,
            "current": self.current,
            "keys": {k: base64.b64encode(v).decode() for k, v in self.keys.items()},
        }
        write_secret(self.path, json.dumps(data, indent=1).encode())

    def rotate(self) -> str:
        """Add a new KEK and make it current (the old ones stay until retired); its id."""
        number = 1 + max((int(k.rpartition("-")[2]) for k in self.keys), default=0)
        kek_id = f"{self.tenant}-{number}"
        self.keys[kek_id] = secrets.token_bytes(32)
        self.current = kek_id
        self._save()
        return kek_id

    def retire(self, keep: set[str]) -> list[str]:
        """Drop the KEKs that are neither current nor in ``keep``; their ids."""
        gone = sorted(k for k in self.keys if k != self.current and k not in keep)
        for kek_id in gone:
            del self.keys[kek_id]
        if gone:
            self._save()
        return gone

    def wrap(self, data_key: bytes, key: str) -> tuple[str, bytes]:
        """(the current KEK's id, ``data_key`` sealed under it for object ``key``)."""
        nonce = os.urandom(NONCE)
        aad = f"{self.current}\n{key}".encode()
        return self.current, nonce + ChaCha20Poly1305(self.keys[self.current]).encrypt(
            nonce, data_key, aad
        )

    def unwrap(self, kek_id: str, wrapped: bytes, key: str) -> bytes:
        kek = self.keys.get(kek_id)
        if kek is None:
            raise ObjectDamaged(
                f"stored object {key!r}: its data key is wrapped by {kek_id!r}, which is not in "
                f"the keyring {self.path}"
            )
        try:
            aad = f"{kek_id}\n{key}".encode()
            return ChaCha20Poly1305(kek).decrypt(wrapped[:NONCE], wrapped[NONCE:], aad)
        except InvalidTag:
            raise ObjectDamaged(
                f"stored object {key!r}: its wrapped data key was altered"
            ) from None
