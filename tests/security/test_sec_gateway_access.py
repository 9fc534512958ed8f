"""Inside a project at the gateway: viewers read only, members change what is theirs, project
owners and administrators anything; an administrator's project-scoped key is a plain key of that
project (no admin API); key ids that exist and ids that do not take the same lookup path.

Each attack runs against a real gateway on loopback; each refusal is a 403 in OpenAI's error
shape naming what is missing, and the test then checks that nothing changed where it would have:
storage's datasets, the queue's jobs, the accounts and the audit log."""

from __future__ import annotations

import hmac
import json
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from atoll.plugins.storage.contract.datasets import list_datasets
from atoll.plugins.training.contract import list_jobs
from support.island import Island
from support.overlay import AgentFactory, eventually

ROWS = [{"instruction": f"Say {i}.", "output": f"{i}."} for i in range(8)]


async def queue_island(make_agent: AgentFactory) -> Island:
    """Storage, a training queue with no trainer (jobs stay queued), an echo node, a gateway."""
    await make_agent("store", roles=("storage",), plugins={"storage": {}}, heartbeat=0.2)
    queue = {"training": {"mode": "queue"}}
    await make_agent("trainer", roles=("training",), plugins=queue, heartbeat=0.2)
    isl = Island(make_agent)
    await isl.add_node("gpu1")
    await (await isl.start_gateway()).models_seen("echo")
    view = isl.plugin.gateway.watch.discovery
    await eventually(lambda: bool(view.select(plugin="storage") and view.select(plugin="training")))
    return isl


def ward(isl: Island) -> dict[str, str]:
    """Project ward: olga owns it, alice and bob are members, vic views; root2 is a tenant
    administrator and a member. Their keys scoped to ward, and vic's and root2's unscoped."""
    acc = isl.accounts
    acc.create_project("ward", actor="test")
    acc.create_user("root2", admin=True, actor="test")
    people = {"olga": "owner", "alice": "member", "bob": "member", "vic": "viewer"}
    for user, role in (people | {"root2": "member"}).items():
        if user != "root2":
            acc.create_user(user, actor="test")
        acc.add_member("ward", user, role, actor="test")
    keys = {u: isl.key(u, "ward") for u in [*people, "root2"]}
    keys["vic-unscoped"] = isl.key("vic")
    keys["root2-unscoped"] = isl.key("root2")
    return keys


def client(isl: Island, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{isl.url}/v1", api_key=key, max_retries=0)


async def held(isl: Island) -> tuple[list[tuple[str, str | None]], list[tuple[str, str]]]:
    """What storage and the queue hold, asked directly (not through the gateway's filters)."""
    gw = isl.plugin.gateway
    files = sorted((r.id, r.project) for r in await list_datasets(gw.agent, gw.storage_address()))
    jobs = sorted((r.id, str(r.state)) for r in await list_jobs(gw.agent, gw.queue_address()))
    return files, jobs


def refused(exc: pytest.ExceptionInfo[openai.PermissionDeniedError], *needs: str) -> str:
    """The refusal is a 403 in OpenAI's shape whose message names what is missing."""
    assert exc.value.status_code == 403
    error = exc.value.body
    assert isinstance(error, dict), error
    assert error["type"] == "permission_error" and error["code"] == "permission_denied", error
    for words in needs:
        assert words in error["message"], error["message"]
    return error["message"]


async def test_project_viewers_read_only_and_members_change_their_own(
    make_agent: AgentFactory, tmp_path: Path
) -> None:
    isl = await queue_island(make_agent)
    acc = isl.accounts
    keys = ward(isl)
    data = tmp_path / "ward.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    alice, bob, vic, olga = (client(isl, keys[u]) for u in ("alice", "bob", "vic", "olga"))
    vic_unscoped = client(isl, keys["vic-unscoped"])
    try:
        # A viewer uploads nothing and starts nothing in the project.
        audit = len(acc.audit_log(limit=1000))
        with pytest.raises(openai.PermissionDeniedError) as exc:
            await vic.files.create(file=data.open("rb"), purpose="fine-tune")
        refused(exc, "'vic' may not change project 'ward' as a viewer", "owner or member")
        assert [f async for f in vic.files.list()] == []
        assert await held(isl) == ([], [])  # storage never saw the upload
        upload = await alice.files.create(file=data.open("rb"), purpose="fine-tune")
        with pytest.raises(openai.PermissionDeniedError) as exc:
            await vic.fine_tuning.jobs.create(model="echo", training_file=upload.id)
        refused(exc, "as a viewer", "viewers read only")
        assert [j async for j in vic.fine_tuning.jobs.list()] == []
        assert (await held(isl))[1] == []  # nothing was queued
        job = await alice.fine_tuning.jobs.create(model="echo", training_file=upload.id)
        # The viewer still reads what the project has.
        assert [f.id async for f in vic.files.list()] == [upload.id]
        assert (await vic.files.retrieve(upload.id)).id == upload.id
        assert (await vic.fine_tuning.jobs.retrieve(job.id)).status == "queued"
        assert [j.id async for j in vic_unscoped.fine_tuning.jobs.list()] == [job.id]
        # Nobody but its maker, a project owner or an admin cancels a job or deletes a file:
        # not a viewer (with the project's key or an unscoped one), not another member, not an
        # administrator's project-scoped key (a plain member key there).
        before, audit = await held(isl), len(acc.audit_log(limit=1000))
        for who in ("vic", "vic-unscoped", "bob", "root2"):
            outsider = client(isl, keys[who])
            try:
                with pytest.raises(openai.PermissionDeniedError) as exc:
                    await outsider.fine_tuning.jobs.cancel(job.id)
                refused(exc, "needs the project role owner")
                with pytest.raises(openai.PermissionDeniedError) as exc:
                    await outsider.files.delete(upload.id)
                refused(exc, "needs the project role owner")
            finally:
                await outsider.close()
        assert await held(isl) == before
        assert len(acc.audit_log(limit=1000)) == audit
        assert (await alice.fine_tuning.jobs.retrieve(job.id)).status == "queued"
        assert [f.id async for f in alice.files.list()] == [upload.id]
        # A member changes her own; the project's owner and an administrator's unscoped key
        # anything.
        second = await alice.fine_tuning.jobs.create(model="echo", training_file=upload.id)
        third = await alice.fine_tuning.jobs.create(model="echo", training_file=upload.id)
        assert (await alice.fine_tuning.jobs.cancel(second.id)).status == "cancelled"
        assert (await olga.fine_tuning.jobs.cancel(job.id)).status == "cancelled"
        root2 = client(isl, keys["root2-unscoped"])
        try:
            assert (await root2.fine_tuning.jobs.cancel(third.id)).status == "cancelled"
        finally:
            await root2.close()
        assert (await olga.files.delete(upload.id)).deleted
        files, jobs = await held(isl)
        assert files == [] and {state for _, state in jobs} == {"cancelled"}
        actions = [e.action for e in acc.audit_log(limit=50)]
        assert actions.count("fine_tuning.cancel") == 3 and actions.count("file.delete") == 1
    finally:
        for c in (alice, bob, vic, olga, vic_unscoped):
            await c.close()


async def test_a_viewer_s_refusals_come_before_any_work(
    make_agent: AgentFactory, tmp_path: Path
) -> None:
    """The write check runs first: a viewer learns nothing from validation (model names, file
    ids) and storage is never called for an upload that is refused."""
    isl = await queue_island(make_agent)
    keys = ward(isl)
    data = tmp_path / "ward.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    async with httpx.AsyncClient(base_url=isl.url, timeout=30) as http:
        auth = {"Authorization": f"Bearer {keys['vic']}"}
        upload = {"file": ("d.jsonl", data.read_bytes())}
        job = {"model": "no-such-model", "training_file": "ds-nope"}
        attempts: list[dict[str, Any]] = [
            {"method": "POST", "url": "/v1/files", "files": upload},
            {"method": "POST", "url": "/v1/fine_tuning/jobs", "json": job},
        ]
        for attempt in attempts:
            reply = await http.request(headers=auth, **attempt)
            assert reply.status_code == 403, reply.text
            error = reply.json()["error"]
            assert error["code"] == "permission_denied" and "viewers read only" in error["message"]
    assert await held(isl) == ([], [])


async def test_a_project_scoped_admin_key_has_no_admin_api(make_agent: AgentFactory) -> None:
    isl = await Island(make_agent).start_gateway()
    acc = isl.accounts
    acc.create_project("lab", actor="test")
    acc.create_user("root2", admin=True, actor="test")
    acc.create_user("bob", actor="test")
    acc.add_member("lab", "root2", "owner", actor="test")
    scoped = isl.key("root2", "lab")
    keys_before = [k.key_id for k in acc.list_keys()]
    audit_before = acc.audit_log(limit=1000)
    users_before = acc.list_users()
    async with httpx.AsyncClient(base_url=isl.url) as http:
        auth = {"Authorization": f"Bearer {scoped}"}
        for method, path, body in (
            ("GET", "/admin/users", None),
            ("POST", "/admin/keys", {"user": "bob", "name": "minted"}),
            ("POST", "/admin/users", {"name": "eve", "admin": True}),
            ("POST", "/admin/members", {"project": "lab", "user": "bob", "role": "owner"}),
            ("POST", "/admin/adapters", {"id": "lab/x", "base_model": "echo", "public": True}),
            ("GET", "/admin/usage", None),
            ("GET", "/metrics", None),
            ("GET", "/admin/feed", None),
        ):
            reply = await http.request(method, path, headers=auth, json=body)
            assert reply.status_code == 403, (path, reply.text)
            error = reply.json()["error"]
            assert error["type"] == "permission_error" and error["code"] == "permission_denied"
            assert "not an administrator" in error["message"]
            assert "with no project scope" in error["message"]  # what is missing
        # Nothing changed: no key minted, no user, no membership, no adapter, no audit entry.
        assert [k.key_id for k in acc.list_keys()] == keys_before
        assert acc.list_users() == users_before
        assert [m.user for m in acc.members("lab")] == ["root2"]
        assert acc.adapter("lab/x") is None
        assert acc.audit_log(limit=1000) == audit_before
        # The scoped key is a plain key of lab: /ui/session says so.
        session = (await http.get("/ui/session", headers=auth)).json()
        assert (session["project"], session["admin"]) == ("lab", False)
        # The same administrator without a project scope keeps the admin API.
        full = {"Authorization": f"Bearer {isl.key('root2')}"}
        assert (await http.get("/admin/users", headers=full)).status_code == 200
        minted = await http.post("/admin/keys", headers=full, json={"user": "bob", "name": "ok"})
        assert minted.status_code == 200, minted.text


def test_known_and_unknown_key_ids_take_the_same_lookup_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Structure, not timing: a known id with a wrong secret and an unknown id make the same
    database queries, the same cache lookups and one constant-time compare each."""
    from atoll.plugins.gateway.accounts import Accounts
    from atoll.plugins.gateway.accounts import keys as accounts_module
    from atoll.plugins.gateway.errors import GatewayError

    acc = Accounts(tmp_path / "gw.sqlite", b"s" * 32)
    acc.create_user("alice", actor="test")
    _, key = acc.create_key("alice", actor="test")
    key_id = key.split("_")[1]
    queries: list[str] = []
    compares: list[tuple[int, int]] = []
    lookups: list[str] = []

    constant_time = hmac.compare_digest

    def compare(a: bytes, b: bytes) -> bool:
        compares.append((len(a), len(b)))
        return constant_time(a, b)

    key_rows = acc._key_rows

    def traced_key_rows(key_id: str) -> list[dict[str, Any]]:
        lookups.append(key_id)
        return key_rows(key_id)

    monkeypatch.setattr(accounts_module.hmac, "compare_digest", compare)
    monkeypatch.setattr(acc, "_key_rows", traced_key_rows)

    def attempt(plaintext: str) -> tuple[int, int, list[tuple[int, int]], GatewayError]:
        for trace in (queries, compares, lookups):
            trace.clear()
        with pytest.raises(GatewayError) as exc:
            acc.authenticate(plaintext)
        key_queries = sum("FROM api_keys" in q for q in queries)
        return key_queries, len(lookups), list(compares), exc.value

    db = acc._db
    assert isinstance(db, sqlite3.Connection)  # SQLite's: its statements can be traced
    db.set_trace_callback(queries.append)
    known_wrong = f"atk_{key_id}_{'x' * 32}"
    unknown = f"atk_{'0' * len(key_id)}_{'x' * 32}"
    # The first time each id is seen costs one query, whether it exists or not; after that none.
    # Each goes through the one lookup and one compare of equal-length digests, and is answered
    # with the same words.
    for expected_queries in (1, 0):
        seen = [attempt(known_wrong), attempt(unknown)]
        for queried, looked_up, compared, error in seen:
            assert (queried, looked_up) == (expected_queries, 1)
            assert len(compared) == 1 and compared[0][0] == compared[0][1] == 32
            assert (error.status, error.message, error.code) == (
                401,
                "unknown API key",
                "invalid_api_key",
            )
    # The right secret still works.
    assert acc.authenticate(key).user == "alice"
    acc.close()
