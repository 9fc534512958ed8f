"""A broker's parts without sockets: connected agents as the router sees them, frames as they
come off the wire, and verified identities of the test operator."""

from __future__ import annotations

from typing import Any

from nacl.signing import SigningKey

from atoll.protocol.frames import Frame, FrameType, decode_message, encode_frame
from atoll.protocol.trust import AgentIdentity, verify_agent
from atoll.tenancy.operator import OperatorStore


class FakeSession:
    """A connected agent as the router sees it: records what the router sends it."""

    _ids = iter(range(1, 1_000_000))

    def __init__(self, ident: AgentIdentity) -> None:
        self.id = next(self._ids)
        self.ident = ident
        self.subs: dict[int, str] = {}
        self.sent: list[bytes] = []
        self.closed: tuple[str, str] | None = None

    def send(self, data: bytes) -> None:
        self.sent.append(data)

    def close(self, code: str, reason: str) -> None:
        self.closed = (code, reason)

    def frames(self) -> list[Frame]:
        """Everything received so far, decoded, and forget it."""
        out = [f for data in self.sent for f in decode_message(data)]
        self.sent.clear()
        return out


def frame(ftype: FrameType, header: dict[str, Any], payload: bytes = b"") -> Frame:
    """A frame as the broker receives it off the wire (checked, with its raw bytes)."""
    (f,) = decode_message(encode_frame(ftype, header, payload))
    return f


def identity(
    op: OperatorStore,
    name: str,
    roles: tuple[str, ...] = ("agent",),
    tenant: str = "acme",
    key: SigningKey | None = None,
) -> AgentIdentity:
    """A real credential of the test operator for ``name``, as its verified identity."""
    pub = (key or SigningKey.generate()).verify_key.encode()
    return verify_agent(op.agent_credential(tenant, pub, name, list(roles)), op.operator_pub)
