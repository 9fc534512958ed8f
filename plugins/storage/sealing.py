"""The sealed object format: one object's bytes encrypted in chunks under its own data key, so a
multi-GB object streams through in constant memory and every chunk is checked before any of its
bytes are used. Pure functions and classes over bytes (no I/O).

    header  MAGIC (8) | version (1) | chunk size (4, big-endian) | object id (16, random)
    chunks  ChaCha20-Poly1305(data key, nonce, plaintext chunk, AD = header + object key)

Every chunk but the last holds exactly ``chunk size`` plaintext bytes; the last holds 0 to
``chunk size`` (an empty object is one empty last chunk). The nonce is the chunk's index (8 bytes,
big-endian), three zero bytes, and a final flag (1 on the last chunk): a chunk moved to another
place, a chunk dropped, an object cut at any byte (its new last chunk was not sealed as last) or
extended, and an object moved under another key (the AD) all fail authentication. A data key seals
one object only (a fresh one per put), so counter nonces never repeat under a key.
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from atoll.plugins.storage.contract.wire import ObjectDamaged

MAGIC = b"\x89ATSEAL\n"  # not text: an uploaded file that begins so is all but impossible
VERSION = 1
CHUNK = 1024 * 1024  # plaintext bytes per chunk
TAG = 16
HEADER = struct.Struct(">8sBI16s")


def header(object_id: bytes, chunk: int = CHUNK) -> bytes:
    return HEADER.pack(MAGIC, VERSION, chunk, object_id)


def is_sealed(head: bytes) -> bool:
    """Whether an object starting with ``head`` (at least the magic's length) is sealed."""
    return head.startswith(MAGIC)


def _nonce(index: int, final: bool) -> bytes:
    return index.to_bytes(8, "big") + b"\0\0\0" + (b"\1" if final else b"\0")


def sealed_size(plain: int, chunk: int = CHUNK) -> int:
    """The sealed object's size for ``plain`` bytes of plaintext."""
    chunks = max(1, -(-plain // chunk))
    return HEADER.size + plain + chunks * TAG


class Sealer:
    """Seal a stream: ``header()`` first, then what each ``feed`` and the one ``finish`` give."""

    def __init__(self, data_key: bytes, object_id: bytes, key: str, chunk: int = CHUNK) -> None:
        self._aead = ChaCha20Poly1305(data_key)
        self.header = header(object_id, chunk)
        self._ad = self.header + key.encode()
        self._chunk = chunk
        self._buffer = bytearray()
        self._index = 0

    def _seal(self, plain: bytes | bytearray, final: bool) -> bytes:
        sealed = self._aead.encrypt(_nonce(self._index, final), bytes(plain), self._ad)
        self._index += 1
        return sealed

    def feed(self, data: bytes) -> bytes:
        """Sealed chunks for what is complete; a chunk is held until more follows it, since
        only the end of the stream says which chunk is last."""
        self._buffer += data
        out, at = [], 0
        while len(self._buffer) - at > self._chunk:
            out.append(self._seal(self._buffer[at : at + self._chunk], final=False))
            at += self._chunk
        del self._buffer[:at]  # once: a large feed is not shifted chunk by chunk
        return b"".join(out)

    def finish(self) -> bytes:
        return self._seal(self._buffer, final=True)


class Opener:
    """Open a sealed stream (header included): ``feed`` gives the plaintext of each complete
    chunk, ``finish`` that of the last, or ObjectDamaged naming the object and chunk."""

    def __init__(self, data_key: bytes, key: str, object_id: bytes | None = None) -> None:
        self._data_key = data_key
        self._key = key
        self._object_id = object_id  # the one its key record names; None: not checked
        self._aead: ChaCha20Poly1305 | None = None
        self._ad = b""
        self._frame = 0
        self._buffer = bytearray()
        self._index = 0

    def _damaged(self, why: str) -> ObjectDamaged:
        return ObjectDamaged(f"stored object {self._key!r} is damaged: {why}")

    def _start(self) -> None:
        magic, version, chunk, object_id = HEADER.unpack_from(self._buffer)
        if magic != MAGIC or version != VERSION or chunk < 1:
            raise self._damaged("its header is not a sealed object's")
        if self._object_id is not None and object_id != self._object_id:
            raise self._damaged("it is not the object its data key was made for (replaced)")
        self._ad = bytes(self._buffer[: HEADER.size]) + self._key.encode()
        self._frame = chunk + TAG
        self._aead = ChaCha20Poly1305(self._data_key)
        del self._buffer[: HEADER.size]

    def _open(self, sealed: bytes | bytearray, final: bool) -> bytes:
        assert self._aead is not None
        try:
            plain = self._aead.decrypt(_nonce(self._index, final), bytes(sealed), self._ad)
        except InvalidTag:
            raise self._damaged(
                f"chunk {self._index} fails authentication (the bytes were altered, or the "
                "object was cut short)"
            ) from None
        self._index += 1
        return plain

    def feed(self, data: bytes) -> bytes:
        self._buffer += data
        if self._aead is None:
            if len(self._buffer) < HEADER.size:
                return b""
            self._start()
        out, at = [], 0
        while len(self._buffer) - at > self._frame:  # more follows this frame: not the last
            out.append(self._open(self._buffer[at : at + self._frame], final=False))
            at += self._frame
        del self._buffer[:at]
        return b"".join(out)

    def finish(self) -> bytes:
        if self._aead is None:
            raise self._damaged("it is shorter than a sealed object's header (cut short)")
        if len(self._buffer) < TAG:
            raise self._damaged(f"it ends inside chunk {self._index} (cut short)")
        return self._open(self._buffer, final=True)
