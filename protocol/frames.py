"""Wire frames.

A websocket binary message carries one or more concatenated frames; each frame is a msgpack
array ``[version, type, header, payload]``. The header is a small map of clear routing fields the
broker needs; the payload is opaque bytes (sealed end to end for MSG and PUB). Every field is
bounded and type-checked on decode so a hostile peer can only ever cause a ``ProtocolError``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from atoll.protocol.errors import ProtocolError

VERSION = 1
MAX_HEADER_KEYS = 12
MAX_STR = 256
MAX_FRAMES_PER_MESSAGE = 4096
DEFAULT_MAX_MESSAGE = 8 * 1024 * 1024


class FrameType(enum.IntEnum):
    HELLO = 1  # broker -> agent: version, broker credential, nonce
    AUTH = 2  # agent -> broker: credential chain, signature over both nonces
    WELCOME = 3  # broker -> agent: broker's signature, session limits
    ERROR = 4  # either way: code + reason; fatal ones are followed by a close
    MSG = 5  # direct message to an agent address; payload sealed with NaCl Box
    PUB = 6  # publication on a tenant subject; payload sealed with the tenant feed key
    SUB = 7  # agent -> broker: subscribe sid to a subject pattern
    UNSUB = 8  # agent -> broker: drop sid
    KEYREQ = 9  # agent -> broker: ask for a peer's credential (to seal to it)
    KEYRESP = 10  # broker -> agent: the peer's credential, verified again by the agent
    REVOKE = 11  # agent -> broker: a tenant-signed revocation to enforce and keep
    NORESP = 12  # broker -> agent: nothing at that address; header id names the message
    PEER_STATE = 13  # broker -> broker: link-state advertisement (agents, interest, peers)
    RELAY = 14  # broker -> broker: an agent frame forwarded across the mesh
    SYNC = 15  # broker -> broker: flooded control state (revocations, redeemed tokens)
    GRANT = 16  # agent -> broker: an operator-signed cross-tenant grant or its revocation


# Each header field: (python type, bound). Strings are bounded in characters, bytes in length,
# ints in absolute value.
_FIELDS: dict[str, tuple[type[Any], int]] = {
    "id": (int, 2**63),  # sender-chosen message id (NORESP refers to it; mesh de-duplication)
    "src": (str, MAX_STR),  # sender address, stamped by the broker, never trusted from agents
    "dst": (str, MAX_STR),  # destination address "agent" or "agent/plugin"
    "subj": (str, MAX_STR),  # pub/sub subject or pattern
    "sid": (int, 2**31),  # subscription id, per connection
    "kid": (int, 2**31),  # tenant feed key id the payload is sealed with
    "ttl": (int, 256),  # hop limit (mesh): brokers derive it from the mesh's diameter
    "code": (str, 64),  # error code
    "reason": (str, 1024),  # human-readable error reason
    "name": (str, MAX_STR),  # agent name (KEYREQ/KEYRESP)
    "fatal": (bool, 1),  # the sender closes the connection after this ERROR
    "keep": (bool, 1),  # PUB: brokers keep the last one per subject for new subscribers
    "tenant": (str, MAX_STR),  # RELAY: the tenant the inner frame belongs to
    "origin": (str, MAX_STR),  # mesh: the broker a relayed/flooded frame started at
    "seq": (int, 2**63),  # mesh: sequence number of a link-state advertisement
    "to": (str, MAX_STR),  # RELAY: the agent a NORESP/KEYRESP goes back to
}

_REQUIRED: dict[FrameType, tuple[str, ...]] = {
    FrameType.HELLO: (),
    FrameType.AUTH: (),
    FrameType.WELCOME: (),
    FrameType.ERROR: ("code", "reason"),
    FrameType.MSG: ("id", "dst"),
    FrameType.PUB: ("id", "subj", "kid"),
    FrameType.SUB: ("sid", "subj"),
    FrameType.UNSUB: ("sid",),
    FrameType.KEYREQ: ("name",),
    FrameType.KEYRESP: ("name",),
    FrameType.REVOKE: (),
    FrameType.NORESP: ("id", "dst", "reason"),
    FrameType.PEER_STATE: ("origin", "seq"),
    FrameType.RELAY: ("tenant", "origin", "ttl"),
    FrameType.SYNC: ("origin",),
    FrameType.GRANT: (),
}


@dataclass(slots=True)
class Frame:
    type: FrameType
    header: dict[str, Any] = field(default_factory=dict)
    payload: bytes = b""
    raw: bytes = field(default=b"", compare=False, repr=False)  # as received, to forward as is

    def encode(self) -> bytes:
        return encode_frame(self.type, self.header, self.payload)


# One packer: the event loop is single-threaded.
_pack: Callable[[Any], bytes] = msgpack.Packer(use_bin_type=True).pack
_TYPES = {int(t): t for t in FrameType}
_WIRE = {t: int(t) for t in FrameType}  # msgpack packs an IntEnum on a slow path (+25%)


def encode_frame(ftype: FrameType, header: dict[str, Any], payload: bytes = b"") -> bytes:
    return _pack([VERSION, _WIRE[ftype], header, payload])


def _no_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack extension type {code} is not allowed")


def _check_header(ftype: FrameType, header: Any) -> dict[str, Any]:
    if type(header) is not dict:
        raise ProtocolError("frame header must be a map")
    if len(header) > MAX_HEADER_KEYS:
        raise ProtocolError("frame header has too many fields")
    for key, value in header.items():
        spec = _FIELDS.get(key)
        if spec is None:
            raise ProtocolError(f"unknown header field {key!r}")
        kind, bound = spec
        if type(value) is kind:  # exact types: msgpack yields no subclasses
            if kind is int:
                if -bound < value < bound:
                    continue
            elif kind is bool or len(value) <= bound:
                continue
        raise ProtocolError(f"header field {key!r} must be a {kind.__name__} within {bound}")
    for key in _REQUIRED[ftype]:
        if key not in header:
            raise ProtocolError(f"{ftype.name} frame lacks header field {key!r}")
    return header


_LIMITS: dict[str, Any] = {
    "raw": False,
    "use_list": True,
    "strict_map_key": True,
    "max_str_len": 4096,
    "max_array_len": 4,
    "max_map_len": MAX_HEADER_KEYS,
    "max_ext_len": 0,
    "ext_hook": _no_ext,
}


def decode_message(
    data: bytes | bytearray | memoryview | str,
    max_size: int = DEFAULT_MAX_MESSAGE,
    keep_raw: bool = True,
) -> list[Frame]:
    """Decode every frame of one websocket message (text messages are refused); raise
    ProtocolError on anything off.

    ``keep_raw`` keeps each frame's bytes (brokers forward them); agents skip the copies.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError("frames travel in binary messages only")
    if len(data) > max_size:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the limit of {max_size}")
    if not data:
        raise ProtocolError("empty message")
    try:  # the common case, one frame per message, without building an Unpacker
        obj = msgpack.unpackb(data, max_bin_len=max_size, **_LIMITS)
    except Exception:  # several frames (ExtraData) or bad input: the careful path says which
        return _decode_many(data, max_size, keep_raw)
    return [_to_frame(obj, bytes(data) if keep_raw else b"")]


def _decode_many(
    data: bytes | bytearray | memoryview, max_size: int, keep_raw: bool
) -> list[Frame]:
    unpacker = msgpack.Unpacker(max_buffer_size=max(len(data), 1), max_bin_len=max_size, **_LIMITS)
    frames: list[Frame] = []
    consumed = 0  # bytes of complete frames: tell() also counts a half-read trailing frame
    try:
        unpacker.feed(data)
        for obj in unpacker:
            start, consumed = consumed, unpacker.tell()
            frames.append(_to_frame(obj, bytes(data[start:consumed]) if keep_raw else b""))
            if len(frames) > MAX_FRAMES_PER_MESSAGE:
                raise ProtocolError("too many frames in one message")
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises a zoo of types on hostile input
        raise ProtocolError(f"undecodable frame: {type(exc).__name__}") from None
    if consumed != len(data):
        raise ProtocolError("truncated frame")
    return frames


def _to_frame(obj: Any, raw: bytes) -> Frame:
    if type(obj) is not list or len(obj) != 4:
        raise ProtocolError("a frame is a 4-element array")
    version, ftype, header, payload = obj
    if version != VERSION or type(version) is not int:
        raise ProtocolError(f"unsupported protocol version {version!r}", code="version")
    ft = _TYPES.get(ftype) if type(ftype) is int else None
    if ft is None:
        raise ProtocolError(f"unknown frame type {ftype!r}")
    if type(payload) is not bytes:
        raise ProtocolError("frame payload must be bytes")
    return Frame(ft, _check_header(ft, header), payload, raw)


def pack(obj: Any) -> bytes:
    """msgpack for structured payloads inside frames (handshake, sealed bodies)."""
    return _pack(obj)


def unpack_map(data: bytes, what: str, max_size: int = DEFAULT_MAX_MESSAGE) -> dict[str, Any]:
    """Decode a msgpack map from untrusted bytes, bounded, raising ProtocolError."""
    if len(data) > max_size:
        raise ProtocolError(f"{what} exceeds {max_size} bytes")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_bin_len=max_size,
            max_str_len=max_size,
            max_array_len=1024,
            max_map_len=1024,
            max_ext_len=0,
            ext_hook=_no_ext,
        )
    except ProtocolError:
        raise
    except Exception as exc:
        raise ProtocolError(f"undecodable {what}: {type(exc).__name__}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what} must be a map")
    return obj
