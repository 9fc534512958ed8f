"""The protocol's own error types: anything that goes wrong decoding or verifying bytes from the
network raises one of these, never a bare msgpack/nacl/KeyError."""


class ProtocolError(Exception):
    """A frame, handshake message or sealed payload is malformed, oversized or not authentic."""

    code = "protocol"

    def __init__(self, reason: str, code: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        if code is not None:
            self.code = code


class AuthError(ProtocolError):
    """Authentication failed: bad signature, expired or revoked credential, reused token."""

    code = "auth"


class ReplayError(ProtocolError):
    """A sealed payload was seen before, or is too old to be checked for replay."""

    code = "replay"
