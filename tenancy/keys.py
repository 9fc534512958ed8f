"""Ed25519 key files and printable public ids.

Private keys are written 0600 (created with that mode, then atomically renamed into place) and
refused on load if anyone but the owner can read them.
"""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

from nacl.signing import SigningKey

_HEADER = "ATOLL-ED25519-SEED-V1"
PREFIXES = {"operator": "O", "tenant": "T", "agent": "A", "broker": "B", "enroll": "E"}


def generate() -> SigningKey:
    return SigningKey.generate()


def write_secret(path: Path, data: bytes) -> None:
    """Write a secret file 0600, atomically: it never exists with wider permissions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_secret(path: Path) -> bytes:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PermissionError(f"{path} is readable by others (mode {oct(mode & 0o777)}); chmod 600")
    return path.read_bytes()


def save_key(path: Path, key: SigningKey) -> None:
    text = f"{_HEADER}\n{base64.b64encode(bytes(key)).decode()}\n"
    write_secret(path, text.encode())


def load_key(path: Path) -> SigningKey:
    lines = read_secret(path).decode().split()
    if len(lines) != 2 or lines[0] != _HEADER:
        raise ValueError(f"{path} is not an Atoll key file")
    return SigningKey(base64.b64decode(lines[1]))


def public_id(pub: bytes, kind: str) -> str:
    """NATS-style printable public key: a kind letter then base32 without padding."""
    return PREFIXES[kind] + base64.b32encode(pub).decode().rstrip("=")
