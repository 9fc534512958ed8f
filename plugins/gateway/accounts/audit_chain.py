"""The audit log's hash chain and its signed head.

Each row stores ``prev`` (the previous row's hash) and ``hash`` = sha256(prev + the row's
canonical content), so editing a row breaks its own hash and removing or inserting one breaks the
next row's link. The chain's end lives in one ``audit_head`` row (last seq, row count, last hash),
signed, and updated in the same transaction as every insert: removing rows from the end shows as
a head that names more rows than there are, and rewriting the whole chain needs the signing key.
Writers take the head row's lock first (an ``UPDATE``): two gateways on one database serialise on
it, as they already do on the store's write lock (SQLite's, or PostgreSQL's advisory lock).

The head is signed with an Ed25519 key derived (HKDF) from the gateway's key-hashing secret, not
with the agent's identity: every gateway sharing the database already shares that secret (API
keys are hashed with it), so all of them sign with one key, which lives as long as the database
and not as long as one agent's enrollment; the secret is a 0600 file beside the accounts
database, out of the database's reach, so someone who can write the database (a DBA, a restored
backup) cannot forge a head.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey

from atoll.plugins.gateway.accounts.database import Connection
from atoll.plugins.gateway.errors import GatewayError

GENESIS = "0" * 64  # the ``prev`` of the first row
HEAD_ID = "audit"
BATCH = 1000  # rows read per statement while verifying


def signing_key(secret: bytes) -> SigningKey:
    """The head's signing key, derived from the gateway's secret (see the module's docstring)."""
    seed = HKDF(hashes.SHA256(), 32, salt=None, info=b"atoll audit head signing key v1")
    return SigningKey(seed.derive(secret))


def row_hash(
    prev: str, seq: int, at: float, actor: str, action: str, target: str, detail: str
) -> str:
    """``detail`` as the stored JSON text; ``at`` to the microsecond, so a float's printing never
    matters (a double holds epoch microseconds exactly)."""
    content = json.dumps(
        [seq, round(at * 1_000_000), actor, action, target, detail], separators=(",", ":")
    )
    return hashlib.sha256(f"{prev}\n{content}".encode()).hexdigest()


def head_message(seq: int, count: int, last: str) -> bytes:
    return f"atoll-audit-head/1 {seq} {count} {last}".encode()


def append(
    db: Connection, key: SigningKey, at: float, actor: str, action: str, target: str,
    detail: str,
) -> None:  # fmt: skip
    """Add one row and move the signed head, inside the caller's transaction."""
    # The lock first: a second writer waits here until the first commits, then reads its head.
    locked = db.execute("UPDATE audit_head SET count = count + 1 WHERE id = ?", (HEAD_ID,))
    if locked.rowcount != 1:
        raise GatewayError(
            500,
            "the audit log's chain head is missing: the database was altered outside the "
            "gateway (run `atoll audit verify`)",
            "api_error",
            code="audit_chain_broken",
        )
    count, prev = db.execute(
        "SELECT count, hash FROM audit_head WHERE id = ?", (HEAD_ID,)
    ).fetchone()
    # Past any row planted beyond the head, so writes go on (verify still names that row).
    (seq,) = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM audit").fetchone()
    digest = row_hash(prev, seq, at, actor, action, target, detail)
    db.execute(
        "INSERT INTO audit (seq, at, actor, action, target, detail, prev, hash) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (seq, at, actor, action, target, detail, prev, digest),
    )
    signature = key.sign(head_message(seq, count, digest)).signature.hex()
    db.execute(
        "UPDATE audit_head SET seq = ?, hash = ?, signature = ? WHERE id = ?",
        (seq, digest, signature, HEAD_ID),
    )


def start(db: Connection, key: SigningKey) -> None:
    """Chain the rows written before the log was chained (all of them, in seq order) and write
    the signed head: the data half of the schema step that added the chain, in its transaction."""
    prev, seq, count = GENESIS, 0, 0
    rows = db.execute(
        "SELECT seq, at, actor, action, target, detail FROM audit ORDER BY seq"
    ).fetchall()
    for seq, at, actor, action, target, detail in rows:
        digest = row_hash(prev, seq, at, actor, action, target, detail)
        db.execute("UPDATE audit SET prev = ?, hash = ? WHERE seq = ?", (prev, digest, seq))
        prev, count = digest, count + 1
    signature = key.sign(head_message(seq, count, prev)).signature.hex()
    db.execute(
        "INSERT INTO audit_head (id, seq, count, hash, signature) VALUES (?, ?, ?, ?, ?)",
        (HEAD_ID, seq, count, prev, signature),
    )


@dataclass(frozen=True)
class Verdict:
    """What ``verify`` found: ``ok``, or the first bad row (``bad_seq``; None where the fault is
    the head's, or rows missing from the end) and why."""

    ok: bool
    rows: int  # rows checked
    head_seq: int
    head_count: int
    bad_seq: int | None
    problem: str | None
    public_key: str  # hex: the key the head must be signed with


def verify(read: Callable[[str, tuple[Any, ...]], list[Any]], key: SigningKey) -> Verdict:
    """Walk the chain in seq order. ``read(sql, args)`` runs one query (the store's, taking its
    lock per statement: rows up to the head never change, so batches need no one transaction)."""
    public = key.verify_key.encode().hex()
    heads = read("SELECT seq, count, hash, signature FROM audit_head WHERE id = ?", (HEAD_ID,))
    if not heads:
        return Verdict(False, 0, 0, 0, None, "the signed chain head is missing", public)
    head_seq, head_count, head_hash, signature = heads[0]

    def bad(rows: int, seq: int | None, problem: str) -> Verdict:
        return Verdict(False, rows, head_seq, head_count, seq, problem, public)

    try:
        key.verify_key.verify(
            head_message(head_seq, head_count, head_hash), bytes.fromhex(signature)
        )
    except (BadSignatureError, ValueError):
        return bad(0, None, "the chain head's signature does not verify: the head was rewritten")
    prev, last, rows = GENESIS, 0, 0
    while True:
        batch = read(
            "SELECT seq, at, actor, action, target, detail, prev, hash FROM audit "
            "WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
            (last, head_seq, BATCH),
        )
        for seq, at, actor, action, target, detail, row_prev, digest in batch:
            if digest is None or row_prev is None:
                return bad(
                    rows, seq, f"row {seq} is not chained: it was inserted outside the gateway"
                )
            if row_hash(row_prev, seq, at, actor, action, target, detail) != digest:
                return bad(rows, seq, f"row {seq} does not match its hash: it was edited")
            if row_prev != prev:
                return bad(
                    rows, seq,
                    f"row {seq} does not follow row {last}: a row between them was removed, or "
                    "one was inserted or replaced",
                )  # fmt: skip
            prev, last, rows = digest, seq, rows + 1
        if len(batch) < BATCH:
            break
    if rows != head_count or prev != head_hash:
        return bad(
            rows, None,
            f"the log ends at row {last} after {rows} rows, but the signed head says {head_count} "
            f"rows ending at row {head_seq}: rows were removed from the end",
        )  # fmt: skip
    beyond = read("SELECT MIN(seq) FROM audit WHERE seq > ?", (head_seq,))
    if beyond and beyond[0][0] is not None:
        # A row written while this ran moved the head on; any other is not the gateway's.
        (now_seq,) = read("SELECT seq FROM audit_head WHERE id = ?", (HEAD_ID,))[0]
        if beyond[0][0] > now_seq:
            return bad(
                rows, beyond[0][0], f"row {beyond[0][0]} lies beyond the signed head: inserted"
            )
    return Verdict(True, rows, head_seq, head_count, None, None, public)
