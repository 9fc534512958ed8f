"""Budgets that never overspend: the store's reservations and settlement (a clock moved by hand;
on SQLite and on PostgreSQL), then the gateway under 200 concurrent openai-SDK requests aimed at
a nearly spent budget."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import openai
import pytest

from atoll.plugins.gateway.accounts import Accounts
from atoll.plugins.gateway.accounts.budgets import NANO
from atoll.plugins.gateway.accounts.keys import Principal
from atoll.plugins.gateway.errors import GatewayError
from support.island import Island
from support.overlay import AgentFactory, eventually

SECRET = b"s" * 32
T0 = datetime(2026, 3, 31, 22, 0, tzinfo=UTC).timestamp()  # a Tuesday, two hours before April


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def acc(accounts_db: Path | str, clock: Clock) -> Iterator[Accounts]:
    accounts = Accounts(accounts_db, SECRET, clock=clock)
    accounts.create_user("alice", actor="root")
    accounts.create_project("p1", actor="root")
    accounts.add_member("p1", "alice", "member", actor="root")
    yield accounts
    accounts.close()


def who(acc: Accounts, project: str | None = None) -> Principal:
    return acc.authenticate(acc.create_key("alice", project, actor="root")[1])


def finish(acc: Accounts, p: Principal, rid: str, prompt: int, completion: int, cost: int = 0):
    row = acc.usage_row(p, rid, "m", None, prompt, completion, 200, 1.0, cost=cost)
    assert acc.insert_usage([row]) == [None]


def reserve(acc: Accounts, p: Principal, rid: str, tokens: int, cost: int = 0) -> None:
    acc.reserve(rid, p.key_id, p.user, p.project, tokens, cost, 60, "test")


def budget(acc: Accounts, ident: str):
    (found,) = [b for b in acc.list_budgets() if b.id == ident]
    return found


def test_reserve_holds_settle_charges_what_was_used(acc: Accounts) -> None:
    me = who(acc)
    acc.set_budget("user", "alice", "tokens", "daily", 100, actor="root")
    reserve(acc, me, "r1", 60)
    assert (
        budget(acc, "user:alice:tokens:daily").reserved,
        budget(acc, "user:alice:tokens:daily").remaining,
    ) == (60, 40)
    with pytest.raises(GatewayError) as refused:
        reserve(acc, me, "r2", 41)
    error = refused.value
    assert (error.status, error.code, error.type) == (429, "budget_exceeded", "insufficient_quota")
    assert (
        "budget user:alice:tokens:daily cannot cover this request: 40 of 100 tokens left"
        in error.message
    )
    assert "needs up to 41 (test)" in error.message
    assert "resets 2026-04-01T00:00:00Z (in 2 h 0 min)" in error.message
    assert error.body()["error"]["budget"]["remaining"] == 40
    assert error.headers() == {"x-should-retry": "false"}
    finish(acc, me, "r1", 10, 5)  # used 15 of the 60 it held
    b = budget(acc, "user:alice:tokens:daily")
    assert (b.spent, b.reserved, b.remaining) == (15, 0, 85)
    reserve(acc, me, "r2", 85)  # fits exactly
    acc.release("r2")  # never sent: nothing charged
    assert budget(acc, "user:alice:tokens:daily").remaining == 85


def test_every_applying_budget_is_checked_all_or_none(acc: Accounts) -> None:
    scoped = who(acc, "p1")
    acc.set_budget("key", scoped.key_id, "tokens", "total", 1000, actor="root")
    acc.set_budget("project", "p1", "cost", "monthly", 0.5, actor="root")
    acc.set_budget("user", "alice", "tokens", "weekly", 50, actor="root")
    with pytest.raises(GatewayError, match="user:alice:tokens:weekly"):
        reserve(acc, scoped, "r1", 60, cost=NANO // 10)
    assert all(b.reserved == 0 for b in acc.list_budgets())  # none held
    with pytest.raises(
        GatewayError, match=r"project:p1:cost:monthly cannot cover this request: 0\.5 of 0\.5 in"
    ):
        reserve(acc, scoped, "r1", 10, cost=NANO)
    reserve(acc, scoped, "r1", 10, cost=NANO // 10)
    assert [b.reserved for b in acc.list_budgets()] == [10, 0.1, 10]
    finish(acc, scoped, "r1", 3, 4, cost=NANO // 100)
    assert [b.spent for b in acc.list_budgets()] == [7, 0.01, 7]
    # Another key of alice's: her user budget applies, not the first key's nor the project's.
    mine = who(acc)
    finish(acc, mine, "r2", 20, 0)
    assert [b.spent for b in acc.list_budgets()] == [7, 0.01, 27]
    assert [b.id for b in acc.budgets_of(mine.key_id, "alice", None)] == [
        "user:alice:tokens:weekly"
    ]


def test_a_turns_rows_settle_together(acc: Accounts) -> None:
    """The ledger's batch (rows of two keys, one never reserved): every hold released, every
    applying budget charged the sum of its rows."""
    mine, scoped = who(acc), who(acc, "p1")
    acc.set_budget("user", "alice", "tokens", "daily", 1000, actor="root")
    acc.set_budget("project", "p1", "cost", "daily", 1, actor="root")
    reserve(acc, mine, "r1", 100)
    reserve(acc, scoped, "r2", 100, cost=NANO // 10)
    rows = [
        acc.usage_row(mine, "r1", "m", None, 10, 5, 200, 1.0),
        acc.usage_row(scoped, "r2", "m", None, 20, 0, 200, 1.0, cost=NANO // 100),
        acc.usage_row(scoped, "r3", "m", None, 1, 1, 200, 1.0, cost=3),
    ]
    assert acc.insert_usage(rows) == [None, None, None]
    user, project = budget(acc, "user:alice:tokens:daily"), budget(acc, "project:p1:cost:daily")
    assert (user.spent, user.reserved) == (37, 0)
    assert (round(project.spent * NANO), project.reserved) == (NANO // 100 + 3, 0)
    assert acc._read("SELECT COUNT(*) FROM reservations")[0][0] == 0


def test_periods_reset_and_in_flight_holds_carry_over(acc: Accounts, clock: Clock) -> None:
    me = who(acc)
    acc.set_budget("user", "alice", "tokens", "monthly", 100, actor="root")
    acc.set_budget("user", "alice", "tokens", "total", 1000, actor="root")
    finish(acc, me, "r1", 90, 0)
    reserve(acc, me, "r2", 10)
    with pytest.raises(GatewayError, match="resets 2026-04-01T00:00:00Z"):
        reserve(acc, me, "r3", 1)
    clock.now += 3 * 3600  # April now: the monthly budget starts afresh, the hold stays
    monthly = budget(acc, "user:alice:tokens:monthly")
    assert (monthly.spent, monthly.reserved, monthly.remaining) == (0, 10, 90)
    assert monthly.resets_at == datetime(2026, 5, 1, tzinfo=UTC).timestamp()
    reserve(acc, me, "r3", 90)
    finish(acc, me, "r2", 5, 5)  # settled in April, where its row is
    assert budget(acc, "user:alice:tokens:monthly").spent == 10
    assert budget(acc, "user:alice:tokens:total").spent == 100
    assert budget(acc, "user:alice:tokens:total").resets_at is None


def test_holds_of_a_request_that_never_settles_expire(acc: Accounts, clock: Clock) -> None:
    me = who(acc)
    acc.set_budget("user", "alice", "tokens", "total", 100, actor="root")
    reserve(acc, me, "lost", 100)  # its gateway died
    with pytest.raises(GatewayError):
        reserve(acc, me, "r1", 1)
    clock.now += 61
    reserve(acc, me, "r1", 100)
    assert budget(acc, "user:alice:tokens:total").reserved == 100


def test_a_key_budget_follows_its_rotation(acc: Accounts) -> None:
    old = who(acc)
    acc.set_budget("key", old.key_id, "tokens", "daily", 100, actor="root")
    finish(acc, old, "r1", 30, 0)
    reserve(acc, old, "r2", 20)  # in flight across the rotation
    _, plaintext = acc.rotate_key(old.key_id, grace_s=60, actor="root")
    new = acc.authenticate(plaintext)
    (moved,) = acc.list_budgets()
    assert (moved.id, moved.spent, moved.reserved) == (f"key:{new.key_id}:tokens:daily", 30, 20)
    finish(acc, old, "r2", 10, 0)  # the old key, in its grace period, spends from it
    reserve(acc, new, "r3", 60)
    with pytest.raises(GatewayError, match=f"key:{new.key_id}"):
        reserve(acc, old, "r4", 1)
    assert budget(acc, moved.id).spent == 40


def test_budget_changes_are_checked_and_audited(acc: Accounts) -> None:
    me = who(acc)
    set_ = acc.set_budget
    for call, status in [
        (lambda: set_("team", "alice", "tokens", "daily", 1, actor="r"), 400),
        (lambda: set_("user", "alice", "dollars", "daily", 1, actor="r"), 400),
        (lambda: set_("user", "alice", "tokens", "hourly", 1, actor="r"), 400),
        (lambda: set_("user", "alice", "tokens", "daily", -1, actor="r"), 400),
        (lambda: set_("user", "alice", "tokens", "daily", 1.5, actor="r"), 400),
        (lambda: set_("user", "nobody", "tokens", "daily", 1, actor="r"), 404),
        (lambda: set_("key", "k_00000000", "tokens", "daily", 1, actor="r"), 404),
        (lambda: acc.remove_budget("user:alice:tokens:daily", actor="r"), 404),
    ]:
        with pytest.raises(GatewayError) as info:
            call()
        assert info.value.status == status
    set_("key", me.key_id, "cost", "daily", 2.5, actor="root")
    set_("key", me.key_id, "cost", "daily", 3, actor="root")  # a new limit, same budget
    assert [(b.id, b.limit) for b in acc.list_budgets(subject=me.key_id)] == [
        (f"key:{me.key_id}:cost:daily", 3)
    ]
    acc.remove_budget(f"key:{me.key_id}:cost:daily", actor="root")
    assert acc.list_budgets() == []
    actions = [e.action for e in acc.audit_log(limit=3)]
    assert actions == ["budget.remove", "budget.set", "budget.set"]


def test_a_budget_set_or_removed_applies_from_the_next_request(acc: Accounts) -> None:
    """Whether a key is budgeted comes with its cached lookup: setting or removing a budget on
    the same store makes the next authentication read it again."""
    key = acc.create_key("alice", actor="root")[1]
    assert acc.authenticate(key).budgeted is False
    assert acc.authenticate(key).budgeted is False  # cached
    acc.set_budget("user", "alice", "tokens", "daily", 100, actor="root")
    assert acc.authenticate(key).budgeted is True
    acc.remove_budget("user:alice:tokens:daily", actor="root")
    assert acc.authenticate(key).budgeted is False


def test_two_handles_on_one_store_never_overspend(
    acc: Accounts, accounts_db: Path | str, clock: Clock
) -> None:
    """Two gateways' connections (as two processes would hold) reserving from 16 threads at once:
    the write lock serialises the check and the hold, so exactly what fits is admitted."""
    me = who(acc)
    acc.set_budget("user", "alice", "tokens", "total", 500, actor="root")
    other = Accounts(accounts_db, SECRET, clock=clock)  # one clock, as hosts on NTP
    admitted: list[str] = []

    def burst(handle: Accounts, prefix: str) -> None:
        for i in range(40):
            try:
                handle.reserve(f"{prefix}{i}", me.key_id, "alice", None, 10, 0, 60)
                admitted.append(f"{prefix}{i}")
            except GatewayError:
                pass

    try:
        threads = [
            threading.Thread(target=burst, args=(h, f"t{n}-"))
            for n, h in enumerate([acc, other] * 8)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(admitted) == 50  # 500 / 10, of 640 tries
        assert budget(acc, "user:alice:tokens:total").reserved == 500
    finally:
        other.close()


def test_an_older_database_gains_budgets(tmp_path: Path, clock: Clock) -> None:
    import sqlite3

    from atoll.plugins.gateway.accounts.store import SCHEMA

    path = tmp_path / "v1.sqlite"
    old = sqlite3.connect(path)
    old.executescript(SCHEMA + "PRAGMA user_version = 1;")
    old.execute("INSERT INTO users VALUES ('alice', 0, 1.0)")
    old.commit()
    old.close()
    acc = Accounts(path, SECRET, clock=clock)
    try:
        assert [u.name for u in acc.list_users()] == ["alice"]
        acc.set_budget("user", "alice", "tokens", "daily", 10, actor="root")
        assert acc.usage().cost == 0
    finally:
        acc.close()


# --- through the gateway ---------------------------------------------------------------------

PRICES = {"echo": {"input": 1000.0, "output": 3000.0}}  # per million tokens: 0.001 / 0.003 each
LIMIT = 10_000
LEFT = 2_000  # what is left of the budget when the burst comes
PROMPT = " ".join(["a"] * 20)  # 20 tokens to the echo model, at most 39 reserved (its bytes)


async def priced_island(make_agent: AgentFactory) -> Island:
    isl = Island(make_agent)
    await isl.add_node("gpu1", model="echo", delay=0.01)
    await (await isl.start_gateway(prices=PRICES)).models_seen("echo")
    return isl


def ledger_sum(acc: Accounts, since: float, user: str) -> tuple[int, float]:
    totals = acc.usage(user=user, since=since)
    return totals.prompt_tokens + totals.completion_tokens, totals.cost


async def test_200_concurrent_requests_never_overspend(make_agent: AgentFactory) -> None:
    isl = await priced_island(make_agent)
    acc = isl.accounts
    acc.create_user("alice", actor="t")
    acc.create_project("lab", actor="t")
    acc.add_member("lab", "alice", "member", actor="t")
    key = isl.key("alice", "lab")
    me = acc.authenticate(key)
    tokens = acc.set_budget("user", "alice", "tokens", "total", LIMIT, actor="t")
    # 0.08 a request spent, 0.099 held: this one may bite first as well.
    cost = acc.set_budget("project", "lab", "cost", "monthly", 4.5, actor="t")
    finish(acc, me, "earlier", LIMIT - LEFT, 0)  # nearly spent: 400 tokens left
    client = openai.AsyncOpenAI(base_url=f"{isl.url}/v1", api_key=key, max_retries=0)

    async def one(i: int) -> str:
        """20 tokens in, 20 out (59 reserved): the budget runs out by what is spent, not only
        by what is held. Every other request streams."""
        try:
            if i % 2:
                stream = await client.completions.create(
                    model="echo", prompt=PROMPT, max_tokens=20, stream=True
                )
                async for _ in stream:
                    pass
            else:
                await client.completions.create(model="echo", prompt=PROMPT, max_tokens=20)
            return "admitted"
        except openai.RateLimitError as exc:
            assert re.search(
                r"budget (user:alice:tokens:total|project:lab:cost:monthly) cannot", str(exc)
            ), exc
            return "refused"

    try:
        outcomes = await asyncio.gather(*(one(i) for i in range(200)))
    finally:
        await client.close()
    admitted, refused = outcomes.count("admitted"), outcomes.count("refused")
    spent = budget(acc, tokens.id)
    project = budget(acc, cost.id)
    used, charged = ledger_sum(acc, tokens.period_start, user="alice")
    print(
        f"\n200 requests: {admitted} admitted, {refused} refused; tokens budget {LIMIT}: spent "
        f"{spent.spent}, overspend {max(0, spent.spent - LIMIT)}; ledger {used} tokens = counter "
        f"{spent.spent}; cost ledger {charged} = counter {project.spent}"
    )
    assert admitted + refused == 200 and admitted > 0 and refused > 0
    assert spent.spent <= LIMIT and spent.reserved == 0  # zero overspend, nothing held
    assert used == spent.spent  # the ledger's sum is the counter, to the token
    assert acc.usage(user="alice").requests == admitted + 1  # refused ones reached no node
    assert project.spent <= project.limit and project.reserved == 0
    assert round(charged * NANO) == round(project.spent * NANO)  # to the nano-unit
    assert acc._read("SELECT COUNT(*) FROM reservations")[0][0] == 0


async def test_streams_cut_short_and_failures_settle_to_what_they_used(
    make_agent: AgentFactory,
) -> None:
    isl = Island(make_agent)
    await isl.add_node("gpu1", model="echo", delay=0.02)
    await (await isl.start_gateway(request_timeout=1.0)).models_seen("echo")
    acc = isl.accounts
    key = isl.key("bob")
    b = acc.set_budget("user", "bob", "tokens", "daily", 100_000, actor="t")
    words = " ".join(f"w{i}" for i in range(200))
    client = openai.AsyncOpenAI(base_url=f"{isl.url}/v1", api_key=key, max_retries=0)
    try:
        stream = await client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": words}], stream=True
        )
        got = 0
        async for chunk in stream:
            got += bool(chunk.choices and chunk.choices[0].delta.content)
            if got == 10:
                break
        await stream.close()  # the client leaves
        await eventually(lambda: acc.usage(user="bob").requests == 1)
        # The deadline (1 s) passes mid-stream: an error, charged what was sent.
        with pytest.raises(openai.APIError):
            async for _ in await client.completions.create(
                model="echo", prompt=words, max_tokens=250, stream=True
            ):
                pass
        await eventually(lambda: acc.usage(user="bob").requests == 2)
        statuses = sorted(r.status for r in acc.usage_rows(user="bob"))
        assert statuses == [499, 504]
        now = budget(acc, b.id)
        assert now.reserved == 0 and now.spent == ledger_sum(acc, b.period_start, user="bob")[0]
        assert 0 < now.spent < 2 * (len(words) + 250)
    finally:
        await client.close()


async def test_a_refusal_names_the_budget_over_http(make_agent: AgentFactory) -> None:
    isl = await priced_island(make_agent)
    key = isl.key("carol")
    isl.accounts.set_budget("user", "carol", "tokens", "daily", 200, actor="t")
    body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
    async with httpx.AsyncClient(base_url=isl.url, headers={"Authorization": f"Bearer {key}"}) as h:
        reply = await h.post("/v1/chat/completions", json=body)
        assert reply.status_code == 200, reply.text
        refused = await h.post("/v1/chat/completions", json=body | {"max_tokens": 1000})
    assert refused.status_code == 429 and refused.headers["x-should-retry"] == "false"
    error = refused.json()["error"]
    assert error["code"] == "budget_exceeded" and error["budget"]["id"] == "user:carol:tokens:daily"
    assert "max_tokens 1000" in error["message"] and "resets" in error["message"]
