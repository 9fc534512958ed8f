"""The gateway's accounts store (real SQLite files, and real PostgreSQL databases: each store test
runs on both) and its rate limiter, with a clock the tests move by hand."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from atoll.plugins.gateway.accounts import Accounts
from atoll.plugins.gateway.accounts.adapters import AdapterAccess, policy_labels
from atoll.plugins.gateway.accounts.keys import Principal
from atoll.plugins.gateway.accounts.ledger import Ledger
from atoll.plugins.gateway.contract import Limits
from atoll.plugins.gateway.errors import GatewayError
from atoll.plugins.gateway.limits import RateLimiter
from atoll.plugins.inference.contract import AdapterWeight, Mixture

SECRET = b"s" * 32
T0 = 1_700_000_000.0


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def acc(accounts_db: Path | str, clock: Clock) -> Iterator[Accounts]:
    accounts = Accounts(accounts_db, SECRET, clock=clock)
    yield accounts
    accounts.close()


# Ledger.usage_row's positional fields: principal, request id, model, adapter, prompt and
# completion tokens, status, latency (ms).
UsageFields = tuple[Principal, str, str, str | None, int, int, int, float]


def record(acc: Accounts, *row: *UsageFields, prompt_text: str | None = None) -> None:
    """One ledger row written now, or the reason it was refused raised."""
    (refused_row,) = acc.insert_usage([acc.usage_row(*row, prompt_text=prompt_text)])
    if refused_row is not None:
        raise refused_row


def refused(
    status: int, call: Callable[..., object], *args: object, **kwargs: object
) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        call(*args, **kwargs)
    assert info.value.status == status, info.value.message
    return info.value


def tenant(acc: Accounts) -> None:
    """alice: member of p1; bob: viewer of p1; carol: owner of p2; dave: admin; erin: nobody.
    Adapters: one public, one of alice's own, one of p1 (phi), one of p2."""
    for user in ("alice", "bob", "carol", "erin"):
        acc.create_user(user, actor="root")
    acc.create_user("dave", admin=True, actor="root")
    acc.create_project("p1", labels={"phi": "true"}, store_prompts=True, actor="root")
    acc.create_project("p2", actor="root")
    acc.add_member("p1", "alice", "member", actor="root")
    acc.add_member("p1", "bob", "viewer", actor="root")
    acc.add_member("p2", "carol", "owner", actor="root")
    acc.register_adapter("pub/a", "SmolLM2-135M-Instruct", public=True, actor="root")
    acc.register_adapter("alice/own", "SmolLM2-135M-Instruct", owner="alice", actor="root")
    acc.register_adapter("p1/x", "SmolLM2-135M-Instruct", project="p1", actor="root")
    acc.register_adapter("p2/y", "SmolLM2-135M-Instruct", project="p2", actor="root")


def principal(acc: Accounts, user: str, project: str | None = None) -> Principal:
    _, plaintext = acc.create_key(user, project, actor="root")
    return acc.authenticate(plaintext)


# --- keys ------------------------------------------------------------------------------------


def test_key_is_shown_once_and_stored_only_as_its_hmac(
    acc: Accounts, accounts_db: Path | str
) -> None:
    acc.create_user("alice", actor="root")
    record, plaintext = acc.create_key("alice", name="laptop", actor="root")
    found = re.fullmatch(r"atk_([0-9a-f]{8})_([A-Za-z0-9_-]{32})", plaintext)
    assert found and record.key_id == f"k_{found.group(1)}"
    listed = acc.list_keys(user="alice")
    assert [k.key_id for k in listed] == [record.key_id]
    assert found.group(2) not in repr(listed) and found.group(2) not in repr(record)
    digest = hmac.new(SECRET, plaintext.encode(), hashlib.sha256).digest()
    if isinstance(accounts_db, str):  # PostgreSQL: every column of the key's row
        (row,) = acc._read("SELECT * FROM api_keys")
        stored = b"".join(v if isinstance(v, bytes) else str(v).encode() for v in row)
    else:
        acc.close()  # checkpoints the WAL into the main file
        files = accounts_db.parent.glob("accounts.sqlite*")
        stored = b"".join(p.read_bytes() for p in files)
        assert stat.S_IMODE(accounts_db.stat().st_mode) == 0o600
    assert plaintext.encode() not in stored and found.group(2).encode() not in stored
    assert digest in stored  # what is kept instead


def test_authenticate_gives_the_principal(acc: Accounts) -> None:
    tenant(acc)
    p = principal(acc, "alice", "p1")
    assert p.user == "alice" and p.project == "p1" and not p.admin
    assert p.labels == {"phi": "true"} and p.store_prompts
    d = principal(acc, "dave")
    assert d.admin and d.project is None and d.labels == {} and not d.store_prompts
    # Changes are seen by the next request: nothing is cached.
    acc.set_admin("dave", False, actor="root")
    acc.update_project("p1", labels={"region": "eu"}, store_prompts=False, actor="root")
    _, plaintext = acc.create_key("alice", "p1", actor="root")
    again = acc.authenticate(plaintext)
    assert again.labels == {"region": "eu"} and not again.store_prompts
    _, plaintext = acc.create_key("dave", actor="root")
    assert not acc.authenticate(plaintext).admin


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "sk-abc",
        "atk_3f9a1c2b",
        "atk_3f9a1c2b_" + "a" * 31,
        "atk_3f9a1c2b_" + "a" * 33,
        "atk_3F9A1C2B_" + "a" * 32,
        "atk_3f9a1c2b_" + "a" * 31 + "!",
        "atk_3f9a1c2b_" + "a" * 32 + "\n",
        None,
    ],
)
def test_malformed_keys_are_refused(acc: Accounts, bad: object) -> None:
    err = refused(401, acc.authenticate, bad)
    assert "malformed" in err.message and err.code == "invalid_api_key"


def test_unknown_revoked_and_expired_keys_are_refused(acc: Accounts, clock: Clock) -> None:
    acc.create_user("alice", actor="root")
    record, plaintext = acc.create_key("alice", actor="root")
    err = refused(401, acc.authenticate, "atk_00000000_" + "a" * 32)
    assert err.message == "unknown API key"
    # The right public id with a wrong secret reads the same: ids do not leak.
    forged = plaintext[:13] + ("b" if plaintext[13] != "b" else "c") + plaintext[14:]
    assert refused(401, acc.authenticate, forged).message == "unknown API key"

    acc.authenticate(plaintext)
    acc.revoke_key(record.key_id, actor="root")
    err = refused(401, acc.authenticate, plaintext)
    assert err.code == "key_revoked" and "revoked" in err.message
    assert plaintext not in err.message
    assert acc.list_keys()[0].state == "revoked"

    short, short_plain = acc.create_key("alice", ttl_s=60, actor="root")
    clock.advance(59.9)
    assert acc.authenticate(short_plain).key_id == short.key_id
    clock.advance(0.1)
    err = refused(401, acc.authenticate, short_plain)
    assert err.code == "key_expired" and "expired" in err.message
    assert {k.key_id: k.state for k in acc.list_keys()}[short.key_id] == "expired"
    refused(404, acc.revoke_key, "k_00000000", actor="root")


def test_rotation_keeps_the_old_key_for_its_grace_period(acc: Accounts, clock: Clock) -> None:
    tenant(acc)
    old, old_plain = acc.create_key(
        "alice", "p1", name="ci", ttl_s=86400, limits=Limits(concurrent=2), actor="root"
    )
    clock.advance(100)
    new, new_plain = acc.rotate_key(old.key_id, grace_s=600, actor="root")
    assert new_plain != old_plain and new.key_id != old.key_id
    assert (new.user, new.project, new.name, new.limits) == ("alice", "p1", "ci", old.limits)
    assert new.expires_at == clock.now + 86400  # the same lifetime, from now
    clock.advance(599)
    assert acc.authenticate(old_plain).key_id == old.key_id
    assert acc.authenticate(new_plain).key_id == new.key_id
    clock.advance(1)
    err = refused(401, acc.authenticate, old_plain)
    assert err.code == "key_rotated" and new.key_id in err.message
    assert acc.authenticate(new_plain).key_id == new.key_id
    listed = {k.key_id: k for k in acc.list_keys(project="p1")}
    assert listed[old.key_id].state == "rotated" and listed[old.key_id].rotated_to == new.key_id
    assert refused(400, acc.rotate_key, old.key_id, actor="root").message.endswith(new.key_id)
    # grace 0: the old key is refused at once; a revoked key does not rotate.
    _, now_plain = acc.rotate_key(new.key_id, grace_s=0, actor="root")
    refused(401, acc.authenticate, new_plain)
    acc.authenticate(now_plain)
    revoked, _ = acc.create_key("alice", actor="root")
    acc.revoke_key(revoked.key_id, actor="root")
    assert "revoked" in refused(400, acc.rotate_key, revoked.key_id, actor="root").message
    refused(400, acc.rotate_key, revoked.key_id, grace_s=-1, actor="root")


def test_last_used_is_written_at_most_once_a_minute(acc: Accounts, clock: Clock) -> None:
    acc.create_user("alice", actor="root")
    _, plaintext = acc.create_key("alice", actor="root")
    assert acc.list_keys()[0].last_used is None
    acc.authenticate(plaintext)
    assert acc.list_keys()[0].last_used == T0
    clock.advance(59)
    acc.authenticate(plaintext)
    assert acc.list_keys()[0].last_used == T0
    clock.advance(1)
    acc.authenticate(plaintext)
    assert acc.list_keys()[0].last_used == T0 + 60


def test_project_scoped_keys(acc: Accounts) -> None:
    tenant(acc)
    err = refused(400, acc.create_key, "erin", "p1", actor="root")
    assert err.code == "not_a_member"
    refused(404, acc.create_key, "alice", "nope", actor="root")
    refused(404, acc.create_key, "zed", actor="root")
    _, plaintext = acc.create_key("bob", "p1", actor="root")  # viewers may hold one (to list)
    acc.authenticate(plaintext)
    acc.remove_member("p1", "bob", actor="root")
    err = refused(403, acc.authenticate, plaintext)
    assert err.code == "not_a_member" and "p1" in err.message
    refused(404, acc.remove_member, "p1", "bob", actor="root")


# --- the adapter access registry --------------------------------------------------------------


def test_adapter_access_rules(acc: Accounts) -> None:
    tenant(acc)
    acc.add_member("p2", "dave", "viewer", actor="root")  # so dave may hold a p2 key
    who = {
        "alice": principal(acc, "alice"),
        "bob": principal(acc, "bob"),
        "carol": principal(acc, "carol"),
        "dave": principal(acc, "dave"),
        "erin": principal(acc, "erin"),
        "alice@p1": principal(acc, "alice", "p1"),
        "dave@p2": principal(acc, "dave", "p2"),
    }
    everything = ["alice/own", "p1/x", "p2/y", "pub/a"]
    visible = {
        "alice": ["alice/own", "p1/x", "pub/a"],
        "bob": ["p1/x", "pub/a"],
        "carol": ["p2/y", "pub/a"],
        "dave": everything,
        "erin": ["pub/a"],
        "alice@p1": ["p1/x", "pub/a"],  # a scoped key: not even alice's own adapter
        "dave@p2": ["p2/y", "pub/a"],  # the scope binds an admin's key too
    }
    # A viewer sees a project's adapters, may not use them; an administrator's key scoped to a
    # project is a plain key of that project (dave is a viewer of p2).
    only_listed = {("bob", "p1/x"), ("dave@p2", "p2/y")}
    for name, p in who.items():
        assert [a.id for a in acc.visible_adapters(p)] == visible[name], name
        for adapter_id in [*everything, "no/such"]:
            if adapter_id not in visible[name]:
                err = refused(404, acc.check_use, p, adapter_id)
                # Exactly the answer for an adapter that does not exist: no ids leak.
                assert err.message == (
                    f"the model {adapter_id!r} does not exist or you do not have access to it"
                )
            elif (name, adapter_id) in only_listed:
                err = refused(403, acc.check_use, p, adapter_id)
                assert "viewer" in err.message
            else:
                assert acc.check_use(p, adapter_id).id == adapter_id


def test_adapter_registry_changes(acc: Accounts) -> None:
    tenant(acc)
    alice = principal(acc, "alice")
    carol = principal(acc, "carol")
    access = acc.adapter("p1/x")
    assert access == AdapterAccess(
        "p1/x", "SmolLM2-135M-Instruct", None, "p1", False, {"phi": "true"}, T0
    )
    moved = acc.update_adapter("alice/own", owner=None, project="p2", actor="root")
    assert (moved.owner, moved.project) == (None, "p2")
    refused(404, acc.check_use, alice, "alice/own")
    assert acc.check_use(carol, "alice/own").project == "p2"
    acc.update_adapter("p1/x", public=True, actor="root")
    assert acc.check_use(carol, "p1/x").public
    acc.unregister_adapter("p1/x", actor="root")
    assert acc.adapter("p1/x") is None
    refused(404, acc.check_use, alice, "p1/x")
    refused(404, acc.unregister_adapter, "p1/x", actor="root")
    refused(404, acc.update_adapter, "p1/x", public=True, actor="root")
    refused(400, acc.update_adapter, "p2/y", actor="root")  # nothing to change
    refused(400, acc.update_adapter, "p2/y", owner="carol", actor="root")  # both holders
    refused(400, acc.update_adapter, "p2/y", project=None, actor="root")  # no holder left
    refused(409, acc.register_adapter, "p2/y", "m", project="p2", actor="root")
    refused(400, acc.register_adapter, "base:adapter", "m", public=True, actor="root")
    refused(400, acc.register_adapter, "a/../b", "m", public=True, actor="root")
    refused(400, acc.register_adapter, "ok/id", "bad:base", public=True, actor="root")
    refused(400, acc.register_adapter, "ok/id", "m", actor="root")  # no holder
    refused(404, acc.register_adapter, "ok/id", "m", owner="zed", actor="root")
    refused(404, acc.register_adapter, "ok/id", "m", project="nope", actor="root")


def test_named_mixtures_are_seen_as_files_are(acc: Accounts) -> None:
    tenant(acc)
    mix = Mixture(adapters=[AdapterWeight(id="p1/x", weight=0.5)], merge_strategy="ties")
    saved = acc.save_mixture("p1/mix", "SmolLM2-135M-Instruct", mix, "alice", "p1", actor="alice")
    acc.save_mixture("alice/mine", "SmolLM2-135M-Instruct", mix, "alice", None, actor="alice")
    assert acc.visible_mixture(principal(acc, "alice"), "p1/mix") == saved
    assert acc.visible_mixture(principal(acc, "bob"), "p1/mix") == saved  # a p1 viewer sees it
    assert acc.visible_mixture(principal(acc, "bob"), "alice/mine") is None
    assert acc.visible_mixture(principal(acc, "carol"), "p1/mix") is None
    assert acc.visible_mixture(principal(acc, "alice", "p1"), "alice/mine") is None  # scoped
    assert [m.id for m in acc.visible_mixtures(principal(acc, "dave"))] == ["alice/mine", "p1/mix"]
    assert saved.mixture == mix and saved.created == T0
    refused(409, acc.save_mixture, "p1/mix", "m", mix, "alice", None, actor="alice")
    refused(409, acc.save_mixture, "p2/y", "m", mix, "carol", None, actor="carol")  # an adapter's
    refused(409, acc.register_adapter, "p1/mix", "m", public=True, actor="root")  # a mixture's
    refused(400, acc.save_mixture, "a/../b", "m", mix, "alice", None, actor="alice")
    acc.delete_mixture("p1/mix", actor="alice")
    assert acc.visible_mixture(principal(acc, "dave"), "p1/mix") is None
    refused(404, acc.delete_mixture, "p1/mix", actor="alice")
    actions = [e.action for e in acc.audit_log()]
    assert actions.count("mixture.save") == 2 and "mixture.delete" in actions


def test_policy_labels_follow_the_adapters_project(acc: Accounts) -> None:
    tenant(acc)
    acc.create_project("p3", labels={"phi": "false"}, actor="root")
    acc.add_member("p3", "alice", "member", actor="root")
    acc.register_adapter("p3/z", "SmolLM2-135M-Instruct", project="p3", actor="root")
    alice = principal(acc, "alice")
    phi = acc.check_use(alice, "p1/x")
    # A phi project's adapter stays on phi nodes even through a key of no project.
    assert policy_labels(alice, phi) == {"phi": "true"}
    assert policy_labels(alice, acc.check_use(alice, "pub/a")) == {}
    err = refused(400, policy_labels, alice, phi, acc.check_use(alice, "p3/z"))
    assert err.code == "policy_conflict"


# --- validation, ledger, audit, persistence --------------------------------------------------


def test_bad_input_gets_a_clear_error(acc: Accounts) -> None:
    for bad in ("", "Alice", "-x", "a" * 65, "a b", "ä", None):
        assert "invalid user name" in refused(400, acc.create_user, bad, actor="root").message
    acc.create_user("alice", actor="root")
    refused(409, acc.create_user, "alice", actor="root")
    refused(404, acc.set_admin, "zed", True, actor="root")
    refused(400, acc.create_project, "p", labels={"": "x"}, actor="root")
    refused(400, acc.create_project, "p", labels={"k": "\n"}, actor="root")
    refused(400, acc.create_project, "p", labels={f"k{i}": "v" for i in range(33)}, actor="root")
    acc.create_project("p", actor="root")
    refused(409, acc.create_project, "p", actor="root")
    refused(400, acc.update_project, "p", actor="root")
    refused(404, acc.update_project, "q", store_prompts=True, actor="root")
    refused(400, acc.add_member, "p", "alice", "boss", actor="root")
    refused(404, acc.add_member, "q", "alice", "member", actor="root")
    refused(404, acc.add_member, "p", "zed", "member", actor="root")
    refused(404, acc.members, "q")
    refused(400, acc.create_key, "alice", ttl_s=0, actor="root")
    refused(400, acc.create_key, "alice", name="x" * 101, actor="root")
    with pytest.raises(ValueError, match="actor"):
        acc.create_user("bob", actor="")
    with pytest.raises(ValueError, match="16 bytes"):
        Accounts(Path("unused"), b"short")


def test_usage_ledger_totals(acc: Accounts, clock: Clock) -> None:
    tenant(acc)
    in_p1 = principal(acc, "alice", "p1")  # p1 keeps prompts
    mine = principal(acc, "alice")
    other = principal(acc, "carol", "p2")
    record(acc, in_p1, "r1", "SmolLM2", "p1/x", 10, 5, 200, 12.5, prompt_text="hi")
    record(acc, mine, "r2", "SmolLM2", None, 7, 3, 200, 8.0, prompt_text="secret")
    clock.advance(100)
    record(acc, in_p1, "r3", "SmolLM2", "p1/x", 1, 0, 503, 1.0)
    record(acc, other, "r4", "SmolLM2", "p2/y", 100, 50, 200, 30.0, prompt_text="x")
    assert acc.usage(key_id=in_p1.key_id).__dict__ == {
        "requests": 2,
        "prompt_tokens": 11,
        "completion_tokens": 5,
        "cost": 0.0,
    }
    assert acc.usage(project="p1") == acc.usage(key_id=in_p1.key_id)
    alice = acc.usage(user="alice")
    assert (alice.requests, alice.prompt_tokens, alice.completion_tokens) == (3, 18, 8)
    everyone = acc.usage()
    assert (everyone.requests, everyone.prompt_tokens, everyone.completion_tokens) == (4, 118, 58)
    recent = acc.usage(since=T0 + 50)
    assert (recent.requests, recent.prompt_tokens) == (2, 101)
    assert acc.usage(user="erin").requests == 0
    rows = acc.usage_rows()
    assert [r.request_id for r in rows] == ["r1", "r2", "r3", "r4"]
    # The prompt is kept only for a project that opted in.
    assert [r.prompt_text for r in rows] == ["hi", None, None, None]
    assert (rows[2].status, rows[2].latency_ms, rows[2].at) == (503, 1.0, T0 + 100)
    page = acc.usage_rows(user="alice", after=rows[0].seq, limit=1)
    assert [r.request_id for r in page] == ["r2"]
    with pytest.raises(ValueError, match="already in the ledger"):
        record(acc, mine, "r1", "SmolLM2", None, 1, 1, 200, 1.0)
    with pytest.raises(ValueError, match="non-negative"):
        record(acc, mine, "r9", "SmolLM2", None, -1, 1, 200, 1.0)
    with pytest.raises(ValueError, match="HTTP status"):
        record(acc, mine, "r9", "SmolLM2", None, 1, 1, 42, 1.0)
    assert acc.usage().requests == 4


async def test_ledger_commits_a_turns_rows_at_once_and_refuses_only_a_clash(
    acc: Accounts, monkeypatch: pytest.MonkeyPatch
) -> None:
    tenant(acc)
    mine = principal(acc, "alice")
    commits: list[str] = []
    commit = acc._database.commit

    def counted(notify: bool = True) -> None:
        commits.append("COMMIT")
        commit(notify)

    monkeypatch.setattr(acc._database, "commit", counted)
    ledger = Ledger(acc)

    def row(request_id: str) -> tuple:
        return acc.usage_row(mine, request_id, "SmolLM2", None, 2, 3, 200, 1.0)

    await asyncio.gather(*(ledger.write(row(f"a{i}")) for i in range(5)))
    assert len(commits) == 1 and acc.usage().requests == 5  # five requests, one transaction
    results = await asyncio.gather(
        *(ledger.write(row(rid)) for rid in ("b1", "a2", "b2")), return_exceptions=True
    )
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], ValueError) and "already in the ledger" in str(results[1])
    assert [r.request_id for r in acc.usage_rows()][5:] == ["b1", "b2"]


def test_every_admin_action_is_audited(acc: Accounts, clock: Clock) -> None:
    acc.create_user("alice", actor="root")
    acc.set_admin("alice", True, actor="root")
    acc.create_project("p", labels={"phi": "true"}, actor="alice")
    acc.update_project("p", limits=Limits(requests_per_min=5), actor="alice")
    acc.add_member("p", "alice", "owner", actor="alice")
    record, plaintext = acc.create_key("alice", "p", actor="alice")
    new, new_plain = acc.rotate_key(record.key_id, actor="alice")
    acc.revoke_key(new.key_id, actor="alice")
    acc.revoke_key(new.key_id, actor="alice")  # changes nothing: no second row
    acc.register_adapter("p/a", "m", project="p", actor="alice")
    acc.update_adapter("p/a", public=True, actor="alice")
    acc.unregister_adapter("p/a", actor="alice")
    acc.remove_member("p", "alice", actor="alice")
    acc.audit("alice", "gateway.reload", "config", {"why": "test"})
    refused(409, acc.create_user, "alice", actor="root")  # a refused change writes no row
    log = acc.audit_log()
    assert [(e.action, e.target) for e in reversed(log)] == [
        ("user.create", "alice"),
        ("user.set_admin", "alice"),
        ("project.create", "p"),
        ("project.update", "p"),
        ("member.add", "p"),
        ("key.create", record.key_id),
        ("key.rotate", record.key_id),
        ("key.revoke", new.key_id),
        ("adapter.register", "p/a"),
        ("adapter.update", "p/a"),
        ("adapter.unregister", "p/a"),
        ("member.remove", "p"),
        ("gateway.reload", "config"),
    ]
    assert [e.actor for e in reversed(log)][:3] == ["root", "root", "alice"]
    by_action = {e.action: e.detail for e in log}
    assert by_action["project.update"] == {
        "limits": {"requests_per_min": 5, "tokens_per_min": None, "concurrent": None}
    }
    assert by_action["key.rotate"] == {"new_key": new.key_id, "grace_s": 3600}
    assert by_action["member.add"] == {"user": "alice", "role": "owner"}
    text = repr(log)
    assert plaintext[13:] not in text and new_plain[13:] not in text  # no secrets in the log
    assert [e.action for e in acc.audit_log(limit=2)] == ["gateway.reload", "member.remove"]
    clock.advance(10)
    acc.audit("root", "x", "y", {})
    assert [e.action for e in acc.audit_log(since=T0 + 5)] == ["x"]
    refused(400, acc.audit_log, limit=0)


def test_a_refused_change_leaves_nothing_behind(acc: Accounts) -> None:
    tenant(acc)
    record, _ = acc.create_key("bob", "p1", actor="root")
    acc.remove_member("p1", "bob", actor="root")
    keys, log = len(acc.list_keys()), len(acc.audit_log(limit=1000))
    refused(400, acc.rotate_key, record.key_id, actor="root")  # bob left p1: no new key
    assert len(acc.list_keys()) == keys and len(acc.audit_log(limit=1000)) == log
    assert acc.list_keys(user="bob")[0].rotated_to is None


def test_everything_survives_a_reopen(accounts_db: Path | str, clock: Clock) -> None:
    acc = Accounts(accounts_db, SECRET, clock=clock)
    tenant(acc)
    _, plaintext = acc.create_key("alice", "p1", limits=Limits(tokens_per_min=9), actor="root")
    p = acc.authenticate(plaintext)
    record(acc, p, "r1", "SmolLM2", "p1/x", 3, 4, 200, 5.0)
    acc.update_project("p1", limits=Limits(concurrent=3), actor="root")
    before = (acc.list_users(), acc.list_projects(), acc.members("p1"), acc.list_keys())
    adapters, log = acc.visible_adapters(p), acc.audit_log()
    acc.close()

    again = Accounts(accounts_db, SECRET, clock=clock)
    assert (again.list_users(), again.list_projects(), again.members("p1"), again.list_keys()) == (
        before
    )
    assert again.visible_adapters(p) == adapters and again.audit_log() == log
    assert again.authenticate(plaintext) == p
    assert again.usage(project="p1").completion_tokens == 4
    now = again.authenticate(plaintext)  # limits as read for a request made now
    assert again.limits_for(now) == (Limits(tokens_per_min=9), Limits(concurrent=3))
    again.close()
    # Digests are bound to the secret: another secret knows no key. A database that gateways
    # share refuses a gateway with another secret outright (its copy of the file is wrong).
    if isinstance(accounts_db, str):
        with pytest.raises(RuntimeError, match="key-hashing secret"):
            Accounts(accounts_db, b"t" * 32, clock=clock)
        return
    other = Accounts(accounts_db, b"t" * 32, clock=clock)
    refused(401, other.authenticate, plaintext)
    other.close()


def test_two_handles_on_one_store_see_each_others_changes(
    accounts_db: Path | str, clock: Clock
) -> None:
    """A second process (here: a second connection) revoking a key: refused at once."""
    first = Accounts(accounts_db, SECRET, clock=clock)
    second = Accounts(accounts_db, SECRET, clock=clock)
    first.create_user("alice", actor="root")
    record, plaintext = second.create_key("alice", actor="root")
    first.authenticate(plaintext)
    second.revoke_key(record.key_id, actor="root")
    refused(401, first.authenticate, plaintext)
    first.close()
    second.close()


# --- rate limits -----------------------------------------------------------------------------


def who(key: str = "k_1", project: str | None = None) -> Principal:
    return Principal(key, "alice", project, False, {}, False)


def test_requests_per_minute(clock: Clock) -> None:
    limiter = RateLimiter(clock=clock)
    limits = Limits(requests_per_min=3)
    for _ in range(3):
        limiter.admit(who(), limits, None).done(1)
        clock.advance(10)
    err = refused(429, limiter.admit, who(), limits, None)
    assert "key k_1" in err.message and "3 requests per minute" in err.message
    assert err.retry_after == pytest.approx(30)  # the first request leaves the window at T0+60
    assert err.headers() == {"Retry-After": "30"} and err.code == "rate_limit_exceeded"
    limiter.admit(who("k_2"), limits, None)  # another key has its own window
    clock.advance(29.5)
    assert refused(429, limiter.admit, who(), limits, None).retry_after == pytest.approx(0.5)
    clock.advance(0.5)
    limiter.admit(who(), limits, None)
    refused(429, limiter.admit, who(), limits, None)


def test_tokens_per_minute_count_finished_requests(clock: Clock) -> None:
    limiter = RateLimiter(clock=clock)
    limits = Limits(tokens_per_min=100)
    first = limiter.admit(who(), limits, None)
    running = limiter.admit(who(), limits, None)
    first.done(60)
    clock.advance(5)
    limiter.admit(who(), limits, None).done(39)  # 99 < 100: still admitted
    clock.advance(5)
    limiter.admit(who(), limits, None).done(1)  # 100: at the limit now
    err = refused(429, limiter.admit, who(), limits, None)
    assert "100 tokens in the last minute" in err.message
    assert err.retry_after == pytest.approx(50)  # the 60 tokens of T0 leave at T0+60
    running.done(500)  # counted when it finishes
    clock.advance(50)
    assert refused(429, limiter.admit, who(), limits, None).retry_after == pytest.approx(10)
    clock.advance(10)
    limiter.admit(who(), limits, None)


def test_concurrency_is_released_by_done_and_on_exceptions(clock: Clock) -> None:
    limiter = RateLimiter(clock=clock)
    limits = Limits(concurrent=2)
    one = limiter.admit(who(), limits, None)
    limiter.admit(who(), limits, None)
    err = refused(429, limiter.admit, who(), limits, None)
    assert "2 requests running" in err.message and err.retry_after == 1
    one.done(5)
    one.done(5)  # idempotent: frees one slot only
    limiter.admit(who(), limits, None)
    refused(429, limiter.admit, who(), limits, None)
    with pytest.raises(ValueError):
        one.done(-1)


async def test_permit_as_a_context_manager_frees_its_slot(clock: Clock) -> None:
    limiter = RateLimiter(clock=clock)
    limits = Limits(concurrent=1, tokens_per_min=10)
    with pytest.raises(RuntimeError), limiter.admit(who(), limits, None):
        raise RuntimeError("backend failed")
    async with limiter.admit(who(), limits, None) as permit:
        refused(429, limiter.admit, who(), limits, None)
        permit.done(10)  # the body reports its tokens; leaving adds nothing more
    err = refused(429, limiter.admit, who(), limits, None)
    assert "10 tokens" in err.message  # the slot is free, the tokens are spent


def test_key_and_project_limits_both_apply(clock: Clock) -> None:
    limiter = RateLimiter(clock=clock)
    key, project = Limits(requests_per_min=5), Limits(requests_per_min=2)
    limiter.admit(who("k_1", "p"), key, project)
    clock.advance(20)
    limiter.admit(who("k_2", "p"), key, project)  # another key of the same project
    err = refused(429, limiter.admit, who("k_1", "p"), key, project)
    assert "project p" in err.message and err.retry_after == pytest.approx(40)
    limiter.admit(who("k_3", "q"), key, project)  # another project
    # Both refuse: the answer names the limit that frees last.
    strict_key = Limits(requests_per_min=1)
    clock.advance(30)  # the project's window frees in 10 s, k_2's own in 30 s
    err = refused(429, limiter.admit, who("k_2", "p"), strict_key, project)
    assert "key k_2" in err.message and err.retry_after == pytest.approx(30)
    with pytest.raises(ValueError, match="no project"):
        limiter.admit(who("k_1"), None, project)
    limiter.admit(who("k_9"), None, None).done(10**9)  # no limits: always admitted


def test_idle_windows_are_dropped(clock: Clock) -> None:
    limiter = RateLimiter(clock=clock)
    limits = Limits(requests_per_min=1000, concurrent=10)
    held = limiter.admit(who("k_held", "p"), limits, limits)
    for i in range(50):
        limiter.admit(who(f"k_{i}"), limits, None).done(3)
    assert len(limiter) == 52
    clock.advance(61)
    limiter.admit(who("k_new"), limits, None)
    assert len(limiter) == 3  # k_held and p keep a running request; k_new
    held.done(1)
    clock.advance(61)
    limiter.admit(who("k_new"), limits, None)
    assert len(limiter) == 1


async def test_accounts_feed_the_limiter(acc: Accounts, clock: Clock) -> None:
    tenant(acc)
    acc.update_project("p1", limits=Limits(requests_per_min=1), actor="root")
    _, plaintext = acc.create_key("alice", "p1", limits=Limits(concurrent=5), actor="root")
    p = acc.authenticate(plaintext)
    limiter = RateLimiter(clock=clock)
    async with limiter.admit(p, *acc.limits_for(p)) as permit:
        permit.done(3)
    err = refused(429, limiter.admit, p, *acc.limits_for(p))
    assert "project p1" in err.message
