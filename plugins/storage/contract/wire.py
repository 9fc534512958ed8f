"""What the halves of the storage contract share: the plugin's name on the overlay, the field
types of their headers, a multi-file upload's file entry, the reply to a delete, their RPC
client, the error a damaged stored object gives, and the rotation of the keys objects are sealed
with."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, Field, StringConstraints

from atoll.agent.contract import Caller, Client, Method, NoParams, Strict, service_address
from atoll.agent.errors import AtollError

PLUGIN = "storage"

# A user or project name (the gateway's accounts), a job id: what records say they belong to.
OwnerName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")]


def _label(value: str, limit: int) -> str:
    if not 1 <= len(value) <= limit:
        raise ValueError(f"must be 1-{limit} characters")
    if value != value.strip():
        raise ValueError("must not start or end with spaces")
    if any(c in "/\\" or ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("must hold no '/', '\\' or control characters")
    return value


# A name people chose (a dataset's, a file's): free text within those bounds.
Label = Annotated[str, AfterValidator(lambda v: _label(v, 128))]
FileName = Annotated[str, AfterValidator(lambda v: _label(v, 255))]


class FileEntry(Strict):
    """One file of a multi-file upload's header (an adapter's, a resume state's): its name (each
    kind checks it is one of its own), size and sha256."""

    name: str
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Deleted(BaseModel):
    """The reply to ``delete_adapter`` and ``dataset_delete``."""

    deleted: bool


def storage_client(agent: Caller, storage: str, timeout: float | None) -> Client:
    """The RPC client of the storage plugin on ``storage`` (an agent, or ``agent/plugin``)."""
    return Client(agent, service_address(storage, PLUGIN), timeout)


class ObjectDamaged(AtollError):
    """A stored object fails its checks (altered, cut short, replaced, or its key is gone): it is
    refused, never served as wrong bytes."""


class KeysRotated(BaseModel):
    """The reply to ``keys_rotate``: the new current KEK, the data keys re-wrapped under it, the
    KEKs dropped from the keyring."""

    kek: str
    rewrapped: int
    retired: list[str]


ROTATE_KEYS: Method[NoParams, KeysRotated] = Method(
    "keys_rotate", NoParams, KeysRotated, "keys_rotate request"
)


async def rotate_keys(agent: Caller, storage: str, timeout: float | None = None) -> KeysRotated:
    """Rotate the storage agent's key-encryption key (admins and operators only)."""
    return await storage_client(agent, storage, timeout).invoke(ROTATE_KEYS, NoParams())
