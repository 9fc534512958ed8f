"""End-to-end sealing of payloads (sans-I/O).

Direct messages use NaCl Box (X25519 + XSalsa20-Poly1305) between the two agents' keys;
publications use SecretBox with the tenant feed key, which brokers never hold. Both go through
``crypto_secretbox`` with a precomputed key (Box "afternm" is exactly that; the "easy" calls
give the same bytes without the zero-padding copies).

A sealed payload is ``nonce(24) || ciphertext``; the nonce is a per-process random epoch (16
bytes) plus a counter (8 bytes), so it never repeats and lets the receiver reject replays with a
sliding window. The plaintext is an envelope ``[src, to, sent_ms, body]`` binding the clear header
(sender address, destination or subject) to the ciphertext: a broker that re-routes or re-labels a
sealed payload is caught when it is opened.
"""

from __future__ import annotations

import os
import time
from typing import Any

import msgpack
from nacl import bindings

# libsodium through PyNaCl's own cffi handle (the library PyNaCl ships and wraps): for a small
# message its Python wrappers cost more than the cipher (a format string and checks per call,
# ~40% of a subscriber's time per publication), and our inputs are checked where they are made.
from nacl._sodium import ffi as _ffi
from nacl._sodium import lib as _sodium

from atoll.protocol.errors import ProtocolError, ReplayError
from atoll.protocol.frames import pack

NONCE_SIZE = 24
MAC_SIZE = 16
KEY_SIZE = 32
EPOCH_SIZE = 16
MAX_AGE_MS = 300_000  # older envelopes are refused: their replay state may be gone
WINDOW = 2048  # out-of-order tolerance in messages (mesh paths may reorder)


def box_key(own_ed25519_seed_sk: bytes, peer_ed25519_pk: bytes) -> bytes:
    """The Box shared key between an agent's Ed25519 secret key (64 bytes) and a peer's key."""
    try:
        sk = bindings.crypto_sign_ed25519_sk_to_curve25519(own_ed25519_seed_sk)
        pk = bindings.crypto_sign_ed25519_pk_to_curve25519(peer_ed25519_pk)
        return bindings.crypto_box_beforenm(pk, sk)
    except Exception as exc:
        raise ProtocolError(f"unusable peer key: {exc}") from None


class Sealer:
    """Seals envelopes with unique nonces: random epoch per process, then a counter."""

    def __init__(self) -> None:
        self.epoch = os.urandom(EPOCH_SIZE)
        self._counter = 0

    def seal(self, key: bytes, src: str, to: str, body: Any, now_ms: int | None = None) -> bytes:
        """Seal ``body`` (any msgpack value: packed once, inside the envelope)."""
        self._counter += 1
        nonce = self.epoch + self._counter.to_bytes(8, "big")
        sent = int(time.time() * 1000) if now_ms is None else now_ms
        return nonce + secretbox(pack([src, to, sent, body]), nonce, key)


def secretbox(message: bytes, nonce: bytes, key: bytes) -> bytes:
    """XSalsa20-Poly1305 (NaCl's ``crypto_secretbox_easy``): MAC || ciphertext."""
    if len(key) != KEY_SIZE or len(nonce) != NONCE_SIZE:
        raise ProtocolError("secretbox needs a 32-byte key and a 24-byte nonce")
    size = len(message) + MAC_SIZE
    out = _ffi.new("unsigned char[]", size)
    _sodium.crypto_secretbox_easy(out, message, len(message), nonce, key)
    boxed: bytes = _ffi.buffer(out, size)[:]
    return boxed


def secretbox_open(boxed: bytes, nonce: bytes, key: bytes) -> bytes | None:
    """The message ``secretbox`` sealed, or None if ``boxed`` fails authentication."""
    if len(key) != KEY_SIZE or len(nonce) != NONCE_SIZE:
        raise ProtocolError("secretbox needs a 32-byte key and a 24-byte nonce")
    size = len(boxed) - MAC_SIZE
    if size < 0:
        return None
    out = _ffi.new("unsigned char[]", max(size, 1))
    if _sodium.crypto_secretbox_open_easy(out, boxed, len(boxed), nonce, key) != 0:
        return None
    message: bytes = _ffi.buffer(out, size)[:]
    return message


def open_sealed(key: bytes, data: bytes, src: str, to: str) -> tuple[bytes, int, Any]:
    """Open a sealed payload; return (nonce, sent_ms, body). The envelope must name src and to."""
    if len(data) < NONCE_SIZE + MAC_SIZE:
        raise ProtocolError("sealed payload too short")
    nonce = data[:NONCE_SIZE]
    plain = secretbox_open(data[NONCE_SIZE:], nonce, key)
    if plain is None:
        raise ProtocolError("sealed payload failed authentication", code="tampered")
    try:
        env = msgpack.unpackb(plain, raw=False, strict_map_key=False, max_ext_len=0)
    except Exception:
        raise ProtocolError("sealed envelope undecodable") from None
    if type(env) is not list or len(env) != 4:
        raise ProtocolError("sealed envelope malformed")
    e_src, e_to, sent, body = env
    if e_src != src or e_to != to:
        raise ProtocolError(
            f"sealed envelope names {e_src!r}->{e_to!r}, frame says {src!r}->{to!r}",
            code="misrouted",
        )
    if type(sent) is not int:
        raise ProtocolError("sealed envelope malformed")
    return nonce, sent, body


class ReplayGuard:
    """Rejects envelopes seen before (per sender and epoch, sliding window) or too old."""

    _MASK = (1 << WINDOW) - 1

    def __init__(self, max_age_ms: int = MAX_AGE_MS, max_epochs: int = 65536) -> None:
        self.max_age_ms = max_age_ms
        self.max_epochs = max_epochs
        # Insertion-ordered: when full, the oldest epoch goes (a replay into it is then refused
        # as unknown-and-old only if it is also past max_age; epochs are per process start).
        self._state: dict[tuple[Any, bytes], list[int]] = {}

    def check(self, sender: Any, nonce: bytes, sent_ms: int, now_ms: int | None = None) -> None:
        now = int(time.time() * 1000) if now_ms is None else now_ms
        if abs(now - sent_ms) > self.max_age_ms:
            raise ReplayError(f"envelope sent {abs(now - sent_ms)} ms from now: outside the window")
        key = (sender, nonce[:EPOCH_SIZE])
        counter = int.from_bytes(nonce[EPOCH_SIZE:], "big")
        st = self._state.get(key)
        if st is None:
            if len(self._state) >= self.max_epochs:
                del self._state[next(iter(self._state))]
            self._state[key] = [counter, 1]
            return
        high, mask = st
        if counter > high:
            shift = counter - high
            st[0] = counter
            if shift == 1 and mask == self._MASK:
                return  # in order, nothing missing: the window stays full (no 2048-bit shifts)
            st[1] = ((mask << shift) | 1) & self._MASK if shift < WINDOW else 1
        elif high - counter >= WINDOW:
            raise ReplayError("envelope too far behind the replay window")
        else:
            bit = 1 << (high - counter)
            if mask & bit:
                raise ReplayError("replayed envelope")
            st[1] = mask | bit
