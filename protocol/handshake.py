"""The session handshake (sans-I/O).

    broker -> agent  HELLO   {v, nonce_b, broker credential, max message size, t}
    agent  -> broker AUTH    {agent credential, nonce_a, sig_a, t}
    broker -> agent  WELCOME {sig_b, session id}

``sig_a`` signs both nonces and the broker's key, so an AUTH can neither be replayed nor relayed
to another broker; ``sig_b`` signs both nonces and the agent's key, proving the broker holds the
key its operator-signed credential names. Each side is a small state machine fed frames.

``t`` is each side's wall clock (ms). End-to-end envelopes are refused past ``MAX_AGE_MS`` of
age, so an island whose clock drifted would otherwise be cut off in silence: each side measures
the other's offset, and a broker refuses an agent or peer broker whose clock differs from its own
by more than ``MAX_CLOCK_SKEW_MS``, saying by how much (code ``clock-skew``, retried: fixing the
clock lets it in). Two agents admitted by brokers that agree then differ by well under the
envelope window.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from typing import Any

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from atoll.protocol.errors import AuthError, ProtocolError
from atoll.protocol.frames import VERSION, Frame, FrameType, encode_frame, pack, unpack_map
from atoll.protocol.trust import (
    AgentIdentity,
    BrokerIdentity,
    now_ms,
    verify_agent,
    verify_broker,
)

NONCE = 32
AUTH_CONTEXT = b"atoll-auth-v1"
WELCOME_CONTEXT = b"atoll-welcome-v1"
MAX_CLOCK_SKEW_MS = 60_000  # a quarter of the envelope window (seal.MAX_AGE_MS is 300 s)


def _expect(frame: Frame, ftype: FrameType) -> dict[str, Any]:
    if frame.type is FrameType.ERROR:
        raise AuthError(frame.header.get("reason", "refused"), code=frame.header.get("code"))
    if frame.type is not ftype:
        raise ProtocolError(f"expected {ftype.name} during handshake, got {frame.type.name}")
    return unpack_map(frame.payload, ftype.name, 64 * 1024)


def _bytes(msg: dict[str, Any], field: str, size: int | None = None) -> bytes:
    value = msg.get(field)
    if not isinstance(value, bytes) or (size is not None and len(value) != size):
        raise ProtocolError(f"handshake field {field!r} missing or malformed")
    return value


def _clock(msg: dict[str, Any]) -> int | None:
    """The sender's wall clock from a HELLO or AUTH (absent: not measured)."""
    t = msg.get("t")
    if t is None:
        return None
    if type(t) is not int or not 0 <= t < 2**53:
        raise ProtocolError("handshake field 't' malformed")
    return t


def skew_reason(skew_ms: int, whose: str, of: str) -> str:
    """Why a handshake with this much clock offset is refused, in a reader's words."""
    side = "ahead of" if skew_ms > 0 else "behind"
    return (
        f"the clock of {whose} is {abs(skew_ms) / 1000:.0f} s {side} {of}'s "
        f"(at most {MAX_CLOCK_SKEW_MS // 1000} s allowed): synchronise the host clocks (NTP)"
    )


def _verify(pub: bytes, data: bytes, sig: bytes, who: str) -> None:
    try:
        VerifyKey(pub).verify(data, sig)
    except (BadSignatureError, ValueError, TypeError):
        raise AuthError(f"{who} signature does not verify") from None


@dataclass
class Welcome:
    broker: BrokerIdentity
    session: str
    max_message: int
    skew_ms: int | None = None  # our clock minus the broker's, as measured at HELLO


class ServerHandshake:
    """The broker's side. The peer is an agent, or (``"peer": true`` in AUTH) another broker of
    the same operator linking into the mesh."""

    def __init__(self, key: SigningKey, credential: bytes, operator_pub: bytes, max_message: int):
        self.key = key
        self.credential = credential
        self.operator_pub = operator_pub
        self.max_message = max_message
        self.nonce = os.urandom(NONCE)
        self.peer: AgentIdentity | BrokerIdentity | None = None
        self.skew_ms: int | None = None  # the peer's clock minus ours, measured at AUTH
        self.verified: AgentIdentity | BrokerIdentity | None = None  # even if then refused
        self._peer_nonce = b""

    def hello(self, now: int | None = None) -> bytes:
        body = {
            "v": VERSION,
            "nonce": self.nonce,
            "cred": self.credential,
            "max": self.max_message,
            "t": now_ms() if now is None else now,
        }
        return encode_frame(FrameType.HELLO, {}, pack(body))

    def receive_auth(self, frame: Frame, now: int | None = None) -> AgentIdentity | BrokerIdentity:
        """Verify the AUTH and the peer's clock; the caller then applies revocation and
        enrollment policy. A clock too far off is an AuthError with code ``clock-skew``, raised
        only once the credential and signature verify (strangers learn nothing of our clock)."""
        if self.peer is not None:
            raise ProtocolError("handshake already complete")
        msg = _expect(frame, FrameType.AUTH)
        nonce_a = _bytes(msg, "nonce", NONCE)
        sig = _bytes(msg, "sig", 64)
        ident: AgentIdentity | BrokerIdentity
        if msg.get("peer") is True:
            ident = verify_broker(msg.get("cred"), self.operator_pub)
        else:
            ident = verify_agent(msg.get("cred"), self.operator_pub)
        _verify(
            ident.pub,
            AUTH_CONTEXT + self.nonce + nonce_a + self.key.verify_key.encode(),
            sig,
            "peer broker" if isinstance(ident, BrokerIdentity) else "agent",
        )
        self.verified = ident
        t = _clock(msg)
        if t is not None:
            self.skew_ms = t - (now_ms() if now is None else now)
            if abs(self.skew_ms) > MAX_CLOCK_SKEW_MS:
                whose = (
                    f"broker {ident.name!r}"
                    if isinstance(ident, BrokerIdentity)
                    else (f"agent {ident.name!r}")
                )
                raise AuthError(skew_reason(self.skew_ms, whose, "this broker"), code="clock-skew")
        self.peer = ident
        self._peer_nonce = nonce_a
        return ident

    def welcome(self) -> bytes:
        if self.peer is None:
            raise ProtocolError("no verified AUTH yet")
        data = WELCOME_CONTEXT + self._peer_nonce + self.nonce + self.peer.pub
        body = {"sig": self.key.sign(data).signature, "session": secrets.token_hex(8)}
        return encode_frame(FrameType.WELCOME, {}, pack(body))


class ClientHandshake:
    """The connecting side: an agent, or with ``peer=True`` a broker dialling a mesh peer."""

    def __init__(
        self, key: SigningKey, credential: bytes, operator_pub: bytes, peer: bool = False
    ) -> None:
        self.key = key
        self.credential = credential
        self.operator_pub = operator_pub
        self.as_peer = peer
        self.nonce = os.urandom(NONCE)
        self._broker: BrokerIdentity | None = None
        self._broker_nonce = b""
        self._max = 0
        self.skew_ms: int | None = None  # our clock minus the broker's, measured at HELLO

    def receive_hello(self, frame: Frame, now: int | None = None) -> bytes:
        msg = _expect(frame, FrameType.HELLO)
        if type(msg.get("v")) is not int or msg["v"] != VERSION:
            raise ProtocolError(f"broker speaks protocol version {msg.get('v')!r}", code="version")
        self._broker_nonce = _bytes(msg, "nonce", NONCE)
        self._broker = verify_broker(msg.get("cred"), self.operator_pub)
        max_message = msg.get("max")
        if type(max_message) is not int or max_message < 1024:
            raise ProtocolError("broker announced no usable message size")
        self._max = max_message
        clock = now_ms() if now is None else now
        t = _clock(msg)
        if t is not None:
            self.skew_ms = clock - t
        data = AUTH_CONTEXT + self._broker_nonce + self.nonce + self._broker.pub
        body: dict[str, Any] = {
            "cred": self.credential,
            "nonce": self.nonce,
            "sig": self.key.sign(data).signature,
            "t": clock,
        }
        if self.as_peer:
            body["peer"] = True
        return encode_frame(FrameType.AUTH, {}, pack(body))

    def receive_welcome(self, frame: Frame) -> Welcome:
        if self._broker is None:
            raise ProtocolError("WELCOME before HELLO")
        msg = _expect(frame, FrameType.WELCOME)
        data = WELCOME_CONTEXT + self.nonce + self._broker_nonce + self.key.verify_key.encode()
        _verify(self._broker.pub, data, _bytes(msg, "sig", 64), "broker")
        session = msg.get("session")
        if not isinstance(session, str):
            raise ProtocolError("WELCOME lacks a session id")
        return Welcome(self._broker, session, self._max, self.skew_ms)
