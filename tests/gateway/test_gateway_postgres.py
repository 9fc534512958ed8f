"""Two gateways on one PostgreSQL database (a throwaway cluster): a key revoked through one is
refused by the other at once, a budget holds across both under 200 concurrent requests, the
ledger has one row per request; and what is PostgreSQL's alone: the SQL translated, a v1 schema
migrated, a dropped connection made again, a writer kept waiting answered 503, a bad
``database`` refused."""

from __future__ import annotations

import asyncio
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import openai
import psycopg
import pydantic
import pytest

from atoll.plugins.gateway.accounts import Accounts
from atoll.plugins.gateway.accounts import changes as changes_module
from atoll.plugins.gateway.accounts import postgres as postgres_store
from atoll.plugins.gateway.accounts.postgres import PostgresDatabase, translate
from atoll.plugins.gateway.accounts.rate_shares import Share
from atoll.plugins.gateway.accounts.store import SCHEMA, SCHEMA_VERSION
from atoll.plugins.gateway.contract import Limits
from atoll.plugins.gateway.errors import GatewayError
from atoll.plugins.gateway.limits import RateLimiter
from atoll.plugins.gateway.plugin import GatewayConfig
from atoll.tenancy.keys import read_secret, write_secret
from support import postgres
from support.island import Island
from support.overlay import AgentFactory, eventually

pytestmark = postgres.needed
SECRET = b"s" * 32


async def two_gateways(make_agent: AgentFactory, tmp_path: Path, database: str) -> list[Island]:
    """An echo node and two gateways on ``database``, the second with the first's secret (as an
    operator copies it): two Islands, one per gateway."""
    first = Island(make_agent)
    await first.add_node("gpu1", model="echo", delay=0.01)
    await (await first.start_gateway(database=database)).models_seen("echo")
    secret = read_secret(first.plugin.ctx.data_dir / "gateway.secret")
    write_secret(tmp_path / "agents/acme/gw2/plugins/gateway/gateway.secret", secret)
    second = Island(make_agent)
    second.gateway = await make_agent(
        "gw2",
        roles=("gateway",),
        plugins={"gateway": {"listen": "127.0.0.1:0", "database": database}},
        heartbeat=0.2,
    )
    await second.models_seen("echo")
    return [first, second]


async def test_a_key_revoked_through_one_gateway_is_refused_by_the_other(
    make_agent: AgentFactory, tmp_path: Path, pg_database: str
) -> None:
    a, b = await two_gateways(make_agent, tmp_path, pg_database)
    key = a.key("alice")
    assert not (b.plugin.ctx.data_dir / "admin-key").exists()  # one admin, made by the first
    body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(headers=headers) as http:
        for isl in (a, b):
            reply = await http.post(f"{isl.url}/v1/chat/completions", json=body)
            assert reply.status_code == 200, reply.text
        (record,) = a.accounts.list_keys(user="alice")
        a.accounts.revoke_key(record.key_id, actor="test")
        refused = await http.post(f"{b.url}/v1/chat/completions", json=body)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "key_revoked"
    rows = a.accounts.usage_rows(user="alice")  # one ledger row per answered request
    assert len(rows) == len({r.request_id for r in rows}) == 2


async def test_a_budget_holds_across_two_gateways(
    make_agent: AgentFactory, tmp_path: Path, pg_database: str
) -> None:
    """200 concurrent requests, alternately through each gateway, at a budget that 33 holds
    fill (59 tokens each): zero overspend, the ledger's sum is the counter, one row per admitted
    request. Both gateways share this test's event loop, so their transactions alternate;
    test_two_handles_on_one_store_never_overspend races two connections from 16 threads."""
    a, b = await two_gateways(make_agent, tmp_path, pg_database)
    acc = a.accounts
    key = a.key("alice")
    budget = acc.set_budget("user", "alice", "tokens", "total", 2_000, actor="t")
    prompt = " ".join(["a"] * 20)  # 20 tokens to echo: 20 in, up to 20 out, 59 reserved
    clients = [
        openai.AsyncOpenAI(base_url=f"{isl.url}/v1", api_key=key, max_retries=0) for isl in (a, b)
    ]

    async def one(i: int) -> str:
        try:
            await clients[i % 2].completions.create(model="echo", prompt=prompt, max_tokens=20)
            return "admitted"
        except openai.RateLimitError as exc:
            assert "budget user:alice:tokens:total cannot" in str(exc), exc
            return "refused"

    try:
        outcomes = await asyncio.gather(*(one(i) for i in range(200)))
    finally:
        for client in clients:
            await client.close()
    admitted = outcomes.count("admitted")
    (now,) = b.accounts.list_budgets()
    totals = b.accounts.usage(user="alice")
    print(f"\ntwo gateways, 200 requests: {admitted} admitted, spent {now.spent} of 2000")
    assert 0 < admitted < 200
    assert now.spent <= budget.limit and now.reserved == 0  # zero overspend, nothing held
    assert totals.prompt_tokens + totals.completion_tokens == now.spent  # to the token
    rows = acc.usage_rows(user="alice")
    assert len(rows) == len({r.request_id for r in rows}) == admitted == totals.requests


def knows_others(limiter: RateLimiter) -> bool:
    return bool(limiter._others)


async def test_a_rate_limit_holds_across_two_gateways(
    make_agent: AgentFactory, tmp_path: Path, pg_database: str
) -> None:
    """A key allowed 4 requests a minute: 2 through each gateway, then, once the gateways have
    exchanged what they admitted, a fifth is refused by both (alone, each would admit 4)."""
    a, b = await two_gateways(make_agent, tmp_path, pg_database)
    key = a.key("alice", limits=Limits(requests_per_min=4))
    body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}) as http:
        for isl in (a, a, b, b):
            reply = await http.post(f"{isl.url}/v1/chat/completions", json=body)
            assert reply.status_code == 200, reply.text
        for limiter in (a.plugin.gateway.limiter, b.plugin.gateway.limiter):
            await eventually(partial(knows_others, limiter), timeout=5)  # the next exchange
        for isl in (a, b):
            refused = await http.post(f"{isl.url}/v1/chat/completions", json=body)
            assert refused.status_code == 429, refused.text
            assert "at its limit of 4 requests per minute" in refused.json()["error"]["message"]
            assert float(refused.headers["retry-after"]) >= 1
    assert len(a.accounts.usage_rows(user="alice")) == 4


def test_a_gateway_no_longer_heard_from_stops_counting(pg_database: str) -> None:
    """What a gateway wrote counts for the others until it is ``stale_s`` old; each exchange
    replaces the writer's own rows."""
    now = [1000.0]
    acc = Accounts(pg_database, SECRET, clock=lambda: now[0])
    scope = ("key", "k_1")
    try:
        assert acc.share_rates("gw-a", {scope: Share(3, 30, 1)}, stale_s=5) == {}
        assert acc.share_rates("gw-b", {scope: Share(1, 10, 0)}, 5) == {scope: Share(3, 30, 1)}
        now[0] += 2
        acc.share_rates("gw-a", {scope: Share(2, 20, 0)}, 5)  # replaces its 3 by 2
        assert acc.share_rates("gw-c", {}, 5) == {scope: Share(3, 30, 0)}  # a's 2 + b's 1
        now[0] += 4  # b last wrote 6 s ago: stale
        assert acc.share_rates("gw-c", {}, 5) == {scope: Share(2, 20, 0)}
    finally:
        acc.close()


def test_the_sql_is_translated_and_sqlite_only_spellings_are_refused() -> None:
    assert translate(
        "SELECT user, 'user?', \"x:y\" FROM members WHERE user = :user AND role LIKE '%a'"
    ) == (
        'SELECT "user", \'user?\', "x:y" FROM members WHERE "user" = %(user)s '
        "AND role LIKE '%%a'",
        False,
    )
    assert translate("CREATE TABLE t (seq INTEGER PRIMARY KEY, b BLOB, at REAL, s TEXT)") == (
        "CREATE TABLE t (seq BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, b BYTEA, "
        'at DOUBLE PRECISION, s TEXT COLLATE "C")',
        False,
    )
    assert translate("SELECT 'TEXT' FROM t WHERE a = ?") == (
        "SELECT 'TEXT' FROM t WHERE a = %s",
        False,
    )
    # A value whose first use cannot tell the server its type: bound client-side.
    assert translate("SELECT 1 FROM t WHERE (:at IS NULL OR at >= :at)")[1] is True
    assert translate("SELECT 1 FROM t WHERE (at >= :at OR :at IS NULL)")[1] is False
    for sqlite_only in ("INSERT OR IGNORE INTO t VALUES (1)", "PRAGMA user_version"):
        with pytest.raises(ValueError, match="SQLite's alone"):
            translate(sqlite_only)


def test_a_version_1_database_is_migrated(pg_database: str) -> None:
    old = PostgresDatabase(pg_database)
    old.begin()
    assert old.schema_version() == 0  # an empty database
    for statement in SCHEMA.split(";"):
        if statement.strip():
            old.execute(statement)
    old.execute("INSERT INTO users VALUES ('alice', false, 1.0)")
    old.set_schema_version(1)
    old.commit()
    old.close()
    acc = Accounts(pg_database, SECRET)
    try:
        assert [u.name for u in acc.list_users()] == ["alice"]
        acc.set_budget("user", "alice", "tokens", "daily", 10, actor="root")
        assert acc.usage().cost == 0
        assert acc._read("SELECT version FROM atoll_store")[0][0] == SCHEMA_VERSION
    finally:
        acc.close()


def test_a_dropped_connection_is_made_again(pg_cluster: postgres.Cluster, pg_database: str) -> None:
    """The server ends the store's connection (a restart, an idle timeout): the next call
    connects afresh, and a write transaction cut short leaves nothing behind."""
    acc = Accounts(pg_database, SECRET)
    try:
        acc.create_user("alice", actor="root")
        with pg_cluster.connect(pg_database) as admin:
            (pid,) = acc._read("SELECT pg_backend_pid()")[0]
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            assert [u.name for u in acc.list_users()] == ["alice"]  # a read, reconnected
            (pid,) = acc._read("SELECT pg_backend_pid()")[0]
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            acc.create_user("bob", actor="root")  # BEGIN is safe to send again
            with pytest.raises(GatewayError) as down, acc._tx() as db:
                db.execute("INSERT INTO users VALUES ('carol', false, 1.0)")
                (pid,) = db.execute("SELECT pg_backend_pid()").fetchone()
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
                db.execute("SELECT 1")  # in a transaction: not sent again, the error raised
            assert down.value.status == 503 and "unavailable" in down.value.message
        assert [u.name for u in acc.list_users()] == ["alice", "bob"]
    finally:
        acc.close()


async def test_keys_are_cached_until_another_gateway_changes_something(
    pg_cluster: postgres.Cluster, pg_database: str
) -> None:
    """A gateway answers a key it has read from its cache (no round trip for the key) until
    any write but those that change nothing cached commits, through whichever gateway: once
    heard_all has read every notification sent before it, the entry is stale. While its
    listening connection is down nothing is cached, so a change it could not hear is never
    missed; the connection is made again within KEEP_S."""
    one, two = Accounts(pg_database, SECRET), Accounts(pg_database, SECRET)
    await two.listen()
    try:
        one.create_user("alice", actor="root")
        key, other, third = (one.create_key("alice", actor="root")[1] for _ in range(3))
        assert await two.heard_all() and two.authenticate_cached(key) is None  # never read
        me = two.authenticate(key)
        assert await two.heard_all() and two.authenticate_cached(key) == me  # now cached

        # The ledger's writes change nothing cached: no notification.
        row = one.usage_row(me, "r1", "m", None, 1, 1, 200, 1.0)
        assert one.insert_usage([row]) == [None]
        assert await two.heard_all() and two.authenticate_cached(key) == me

        # A revocation through the other store: stale at the very next barrier, no waiting.
        one.revoke_key(me.key_id, actor="root")
        assert await two.heard_all() and two.authenticate_cached(key) is None
        with pytest.raises(GatewayError) as revoked:
            two.authenticate(key)
        assert revoked.value.code == "key_revoked"

        # The listening connection ends (the server restarted, say): nothing is cached ...
        cached = two.authenticate(other)
        assert await two.heard_all() and two.authenticate_cached(other) == cached
        database = two._database
        assert isinstance(database, PostgresDatabase)
        listening = database.changes._conn
        assert listening is not None
        with pg_cluster.connect(pg_database) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (listening.pgconn.backend_pid,))
        assert not await two.heard_all() and database.data_version() is None
        # ... so a revocation it cannot hear is not missed: the key is read afresh.
        one.revoke_key(cached.key_id, actor="root")
        assert two.authenticate_cached(other) is None
        with pytest.raises(GatewayError) as unheard:
            two.authenticate(other)
        assert unheard.value.code == "key_revoked"
        for _ in range(40):  # bounded: the connection is made again within KEEP_S (1 s)
            if await two.heard_all():
                break
            await asyncio.sleep(0.1)
        assert two.authenticate(third) == two.authenticate_cached(third)  # caching again
    finally:
        await two.unlisten()
        one.close()
        two.close()


async def test_a_gateway_no_request_comes_to_still_reads_its_notifications(
    pg_database: str,
) -> None:
    """Its listener reads them every KEEP_S: left unread, they would pile up in the server's
    queue, which, full, refuses every commit that notifies."""
    one, two = Accounts(pg_database, SECRET), Accounts(pg_database, SECRET)
    await two.listen()
    try:
        database = two._database
        assert isinstance(database, PostgresDatabase)
        before = database.data_version()
        assert before is not None
        for i in range(20):
            one.create_user(f"user{i}", actor="root")  # a notification each
        for _ in range(30):  # bounded: KEEP_S is 1 s
            if (database.data_version() or 0) >= before + 20:
                break
            await asyncio.sleep(0.1)
        assert (database.data_version() or 0) >= before + 20
    finally:
        await two.unlisten()
        one.close()
        two.close()


async def test_a_listener_that_cannot_be_made_is_tried_again_every_second(
    pg_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server refusing the listening connection: nothing cached, no request waits on it, and
    it is tried again every KEEP_S (shortened here) until it is made."""
    monkeypatch.setattr(changes_module, "KEEP_S", 0.1)
    tries: list[str] = []
    connect = psycopg.AsyncConnection.connect

    async def refused(*args: Any, **kw: Any) -> Any:
        tries.append("connect")
        if len(tries) < 3:
            raise psycopg.OperationalError("too many connections")
        return await connect(*args, **kw)

    monkeypatch.setattr(psycopg.AsyncConnection, "connect", refused)
    acc = Accounts(pg_database, SECRET)
    await acc.listen()
    try:
        assert not await acc.heard_all() and acc._database.data_version() is None
        for _ in range(30):  # bounded
            if await acc.heard_all():
                break
            await asyncio.sleep(0.05)
        assert tries == ["connect"] * 3 and acc._database.data_version() is not None
    finally:
        await acc.unlisten()
        acc.close()


def test_a_writer_kept_waiting_for_the_lock_is_answered_503(
    pg_cluster: postgres.Cluster, pg_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another gateway holding the write lock (stuck mid-transaction): a write here gives up
    after the lock timeout (shortened for the test) with a 503, and works once it is let go."""
    monkeypatch.setattr(postgres_store, "LOCK_TIMEOUT", "50ms")
    acc = Accounts(pg_database, SECRET)
    try:
        with pg_cluster.connect(pg_database) as stuck:
            stuck.execute("BEGIN")
            stuck.execute("SELECT pg_advisory_xact_lock(%s)", (postgres_store.WRITE_LOCK,))
            with pytest.raises(GatewayError) as waited:
                acc.create_user("alice", actor="root")
            assert waited.value.status == 503 and waited.value.headers()["Retry-After"] == "1"
            stuck.execute("ROLLBACK")
        acc.create_user("alice", actor="root")
        assert [u.name for u in acc.list_users()] == ["alice"]
    finally:
        acc.close()


def test_database_must_be_a_postgresql_url() -> None:
    assert GatewayConfig(database="postgresql://gw@db.example/atoll").database
    for bad in ("/var/lib/atoll/gateway.sqlite", "mysql://gw@db/atoll", ""):
        with pytest.raises(pydantic.ValidationError, match="postgresql:// URL"):
            GatewayConfig(database=bad)
