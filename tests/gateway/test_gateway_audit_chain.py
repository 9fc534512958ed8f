"""The audit log's hash chain and signed head: rows edited, removed (middle and end) or inserted
behind the store's back (SQL on a connection of its own, in SQLite and PostgreSQL) are found, by
the store and by `atoll audit verify` against a live gateway; only admins may ask."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer import Typer
from typer.testing import CliRunner

from atoll.agent.errors import Forbidden
from atoll.broker.server import BrokerServer
from atoll.plugins.gateway.accounts import Accounts
from atoll.plugins.gateway.accounts.audit_chain import row_hash
from atoll.plugins.gateway.accounts.database import open_database
from atoll.plugins.gateway.accounts.store import MIGRATIONS, SCHEMA
from atoll.plugins.gateway.commands import audit
from atoll.plugins.gateway.contract import GatewayAdmin
from atoll.tenancy.operator import OperatorStore
from support.island import Island
from support.overlay import AgentFactory

SECRET = b"s" * 32
ATOLL = Typer()
ATOLL.add_typer(audit, name="audit")


def logged(where: Path | str, actions: int = 5) -> Accounts:
    """Accounts with ``actions`` audited changes, rows 1..actions."""
    acc = Accounts(where, SECRET)
    for i in range(actions):
        acc.create_user(f"u{i}", actor="root")
    return acc


def behind_the_store(where: Path | str, sql: str, args: tuple[Any, ...] = ()) -> Any:
    """Run ``sql`` on a connection of its own (committed at once); a SELECT's first row."""
    database = open_database(where)
    try:
        cursor = database.connection.execute(sql, args)
        return cursor.fetchone() if sql.startswith("SELECT") else None
    finally:
        database.close()


def test_an_intact_log_verifies(accounts_db: Path | str, tmp_path: Path) -> None:
    acc = logged(accounts_db)
    verdict = acc.verify_audit()
    assert verdict.ok and verdict.rows == 5 and verdict.head_seq == 5 and verdict.problem is None
    assert verdict.public_key == acc._audit_key.verify_key.encode().hex()
    empty = Accounts(tmp_path / "empty.sqlite", SECRET).verify_audit()
    assert empty.ok and empty.rows == 0


def test_an_edited_row_is_named(accounts_db: Path | str) -> None:
    path = accounts_db
    acc = logged(path)
    behind_the_store(path, """UPDATE audit SET detail = '{"admin": true}' WHERE seq = 3""")
    verdict = acc.verify_audit()
    assert not verdict.ok and verdict.bad_seq == 3 and "edited" in (verdict.problem or "")
    assert verdict.rows == 2  # the rows before it are fine


def test_an_edited_row_rehashed_breaks_the_next_link(accounts_db: Path | str) -> None:
    path = accounts_db
    acc = logged(path)
    seq, at, action, target, prev = behind_the_store(
        path, "SELECT seq, at, action, target, prev FROM audit WHERE seq = 2"
    )
    forged = row_hash(prev, seq, at, "mallory", action, target, "{}")
    behind_the_store(
        path, "UPDATE audit SET actor = 'mallory', detail = '{}', hash = ? WHERE seq = 2", (forged,)
    )
    verdict = acc.verify_audit()
    assert (
        not verdict.ok
        and verdict.bad_seq == 3
        and "does not follow row 2" in (verdict.problem or "")
    )


def test_a_removed_middle_row_is_found(accounts_db: Path | str) -> None:
    path = accounts_db
    acc = logged(path)
    behind_the_store(path, "DELETE FROM audit WHERE seq = 3")
    verdict = acc.verify_audit()
    assert not verdict.ok and verdict.bad_seq == 4
    assert "does not follow row 2" in (verdict.problem or "")


def test_a_removed_last_row_is_found_by_the_signed_head(accounts_db: Path | str) -> None:
    path = accounts_db
    acc = logged(path)
    behind_the_store(path, "DELETE FROM audit WHERE seq = 5")
    verdict = acc.verify_audit()
    assert not verdict.ok and verdict.bad_seq is None
    assert "says 5 rows ending at row 5" in (verdict.problem or "")
    assert "removed from the end" in (verdict.problem or "")
    # Pulling the head back to row 4 as well needs the signing key.
    (h4,) = behind_the_store(path, "SELECT hash FROM audit WHERE seq = 4")
    behind_the_store(path, "UPDATE audit_head SET seq = 4, count = 4, hash = ?", (h4,))
    verdict = acc.verify_audit()
    assert not verdict.ok and "signature does not verify" in (verdict.problem or "")


def test_an_inserted_row_is_found(accounts_db: Path | str) -> None:
    path = accounts_db
    acc = logged(path)
    behind_the_store(
        path,
        "INSERT INTO audit (seq, at, actor, action, target, detail) "
        "VALUES (6, 1.0, 'root', 'user.create', 'ghost', '{}')",
    )
    verdict = acc.verify_audit()
    assert (
        not verdict.ok
        and verdict.bad_seq == 6
        and "beyond the signed head" in (verdict.problem or "")
    )
    # Slipped in between two rows, chained to the one before: the rows after it were renumbered
    # to make room, and each row's hash covers its seq.
    behind_the_store(path, "DELETE FROM audit WHERE seq = 6")
    behind_the_store(path, "UPDATE audit SET seq = seq + 100 WHERE seq >= 3")
    behind_the_store(path, "UPDATE audit SET seq = seq - 99 WHERE seq >= 100")
    (prev,) = behind_the_store(path, "SELECT hash FROM audit WHERE seq = 2")
    h = row_hash(prev, 3, 1.0, "root", "user.create", "ghost", "{}")
    behind_the_store(
        path,
        "INSERT INTO audit VALUES (3, 1.0, 'root', 'user.create', 'ghost', '{}', ?, ?)",
        (prev, h),
    )
    verdict = acc.verify_audit()
    assert not verdict.ok and verdict.bad_seq == 4 and verdict.rows == 3
    # Writes go on after a failed verification, past the planted rows (which stay visible).
    acc.create_user("later", actor="root")
    assert acc.audit_log(limit=1)[0].seq == 7
    assert acc.verify_audit().bad_seq == 4


def test_rows_before_the_chain_are_chained_by_the_migration(tmp_path: Path) -> None:
    path = tmp_path / "v2.sqlite"
    old = sqlite3.connect(path)
    old.executescript(SCHEMA + MIGRATIONS[0] + "PRAGMA user_version = 2;")
    for seq in (1, 2, 7):  # a gap, as deletions before the chain may have left
        old.execute(
            "INSERT INTO audit VALUES (?, ?, 'root', 'user.create', ?, '{}')",
            (seq, 1.5 * seq, f"u{seq}"),
        )
    old.commit()
    old.close()
    acc = Accounts(path, SECRET)
    acc.create_user("alice", actor="root")
    verdict = acc.verify_audit()
    assert verdict.ok and verdict.rows == 4 and verdict.head_seq == 8
    assert [e.seq for e in acc.audit_log()] == [8, 7, 2, 1]


def test_two_stores_on_one_database_serialise_on_the_head(accounts_db: Path | str) -> None:
    """Two gateways on one database: their rows interleave into one chain."""
    one, two = Accounts(accounts_db, SECRET), Accounts(accounts_db, SECRET)

    def write(acc: Accounts, who: str) -> None:
        for i in range(20):
            acc.audit(who, "test.write", f"{who}{i}", {})

    threads = [threading.Thread(target=write, args=(a, w)) for a, w in ((one, "a"), (two, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    verdict = one.verify_audit()
    assert verdict.ok and verdict.rows == 40
    assert [e.seq for e in two.audit_log(limit=100)] == list(range(40, 0, -1))
    for acc in (one, two):
        acc.close()
    if isinstance(accounts_db, Path):  # (PostgreSQL refuses a gateway with another secret)
        # Another secret derives another key: that gateway's signature check fails.
        other = Accounts(accounts_db, b"t" * 32)
        assert "signature does not verify" in (other.verify_audit().problem or "")
        other.close()


async def test_atoll_audit_verify_against_a_live_gateway(
    make_agent: AgentFactory, operator: OperatorStore, broker: BrokerServer
) -> None:
    isl = await Island(make_agent).start_gateway()
    for user in ("alice", "bob", "carol"):
        isl.key(user)  # a user.create and a key.create row each
    target = [
        "-d",
        str(operator.root),
        "--tenant",
        "acme",
        "--broker",
        broker.url,
        "--gateway",
        "gw",
    ]
    runner = CliRunner()

    def run() -> tuple[int, dict, str]:
        result = runner.invoke(ATOLL, ["audit", "verify", *target])
        return result.exit_code, json.loads(result.stdout), result.stderr

    code, verdict, said = await asyncio.to_thread(run)
    assert code == 0 and verdict["ok"] and verdict["rows"] >= 6, said
    assert "audit log intact" in said
    db = isl.plugin.ctx.data_dir / "gateway.sqlite"
    (seq,) = sqlite3.connect(db).execute("SELECT seq FROM audit WHERE target = 'bob'").fetchone()
    behind_the_store(db, f"UPDATE audit SET actor = 'nobody' WHERE seq = {seq}")
    code, verdict, said = await asyncio.to_thread(run)
    assert code == 1 and verdict["bad_seq"] == seq
    assert f"row {seq} does not match its hash" in said

    # Who may not: a user's key over HTTP, a plain agent over the overlay.
    async with httpx.AsyncClient(base_url=isl.url) as http:
        for key, status in ((isl.key("dave"), 403), (isl.admin_key, 200)):
            reply = await http.get(
                "/admin/audit/verify", headers={"Authorization": f"Bearer {key}"}
            )
            assert reply.status_code == status, reply.text
        assert reply.json()["bad_seq"] == seq
    plain = await make_agent("plain")
    with pytest.raises(Forbidden):
        await GatewayAdmin(plain.agent, "gw").audit_verify()
