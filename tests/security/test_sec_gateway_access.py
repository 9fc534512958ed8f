"""Inside a project at the gateway: viewers read only, members change what is theirs, project
owners and administrators anything; an administrator's project-scoped key is a plain key of that
project; key ids that exist and ids that do not take the same lookup path."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import httpx
import openai
import pytest

from conftest import AgentFactory, Island, eventually

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


def client(isl: Island, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{isl.url}/v1", api_key=key, max_retries=0)


async def test_project_viewers_read_only_and_members_change_their_own(
    make_agent: AgentFactory, tmp_path: Path
) -> None:
    isl = await queue_island(make_agent)
    acc = isl.accounts
    acc.create_project("ward", actor="test")
    for user, role in (
        ("olga", "owner"),
        ("alice", "member"),
        ("bob", "member"),
        ("vic", "viewer"),
    ):
        acc.create_user(user, actor="test")
        acc.add_member("ward", user, role, actor="test")
    keys = {u: isl.key(u, "ward") for u in ("olga", "alice", "bob", "vic")}
    data = tmp_path / "ward.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    alice, bob, vic, olga = (client(isl, keys[u]) for u in ("alice", "bob", "vic", "olga"))
    try:
        # A viewer uploads nothing and starts nothing in the project.
        with pytest.raises(openai.PermissionDeniedError, match="viewers read only"):
            await vic.files.create(file=data.open("rb"), purpose="fine-tune")
        assert [f async for f in vic.files.list()] == []
        upload = await alice.files.create(file=data.open("rb"), purpose="fine-tune")
        with pytest.raises(openai.PermissionDeniedError, match="as a viewer"):
            await vic.fine_tuning.jobs.create(model="echo", training_file=upload.id)
        assert [j async for j in vic.fine_tuning.jobs.list()] == []  # nothing was queued
        job = await alice.fine_tuning.jobs.create(model="echo", training_file=upload.id)
        # The viewer still reads what the project has.
        assert [f.id async for f in vic.files.list()] == [upload.id]
        assert (await vic.fine_tuning.jobs.retrieve(job.id)).status == "queued"
        # Nobody but its maker, a project owner or an admin cancels a job or deletes a file.
        for outsider in (vic, bob):
            with pytest.raises(openai.PermissionDeniedError, match="needs the project role owner"):
                await outsider.fine_tuning.jobs.cancel(job.id)
            with pytest.raises(openai.PermissionDeniedError, match="needs the project role owner"):
                await outsider.files.delete(upload.id)
        assert (await alice.fine_tuning.jobs.retrieve(job.id)).status == "queued"
        assert [f.id async for f in alice.files.list()] == [upload.id]
        # A member changes her own; the project's owner anything.
        second = await alice.fine_tuning.jobs.create(model="echo", training_file=upload.id)
        assert (await alice.fine_tuning.jobs.cancel(second.id)).status == "cancelled"
        assert (await olga.fine_tuning.jobs.cancel(job.id)).status == "cancelled"
        assert (await olga.files.delete(upload.id)).deleted
        audit = [e.action for e in acc.audit_log(limit=50)]
        assert audit.count("fine_tuning.cancel") == 2 and audit.count("file.delete") == 1
    finally:
        for c in (alice, bob, vic, olga):
            await c.close()


async def test_a_project_scoped_admin_key_has_no_admin_api(make_agent: AgentFactory) -> None:
    isl = await Island(make_agent).start_gateway()
    acc = isl.accounts
    acc.create_project("lab", actor="test")
    acc.create_user("root2", admin=True, actor="test")
    acc.create_user("bob", actor="test")
    acc.add_member("lab", "root2", "owner", actor="test")
    scoped = isl.key("root2", "lab")
    keys_before = len(acc.list_keys())
    async with httpx.AsyncClient(base_url=isl.url) as http:
        auth = {"Authorization": f"Bearer {scoped}"}
        for method, path, body in (
            ("GET", "/admin/users", None),
            ("POST", "/admin/keys", {"user": "bob", "name": "minted"}),
            ("POST", "/admin/users", {"name": "eve", "admin": True}),
        ):
            reply = await http.request(method, path, headers=auth, json=body)
            assert reply.status_code == 403, (path, reply.text)
            assert "not an administrator" in reply.json()["error"]["message"]
        assert len(acc.list_keys()) == keys_before
        assert "eve" not in {u.name for u in acc.list_users()}
        # The same administrator without a project scope keeps the admin API.
        full = {"Authorization": f"Bearer {isl.key('root2')}"}
        assert (await http.get("/admin/users", headers=full)).status_code == 200


def test_known_and_unknown_key_ids_take_the_same_lookup_path(tmp_path: Path) -> None:
    from atoll.plugins.gateway.accounts import Accounts
    from atoll.plugins.gateway.errors import GatewayError

    acc = Accounts(tmp_path / "gw.sqlite", b"s" * 32)
    acc.create_user("alice", actor="test")
    _, key = acc.create_key("alice", actor="test")
    key_id = key.split("_")[1]
    queries: list[str] = []

    def lookups(attempt: str) -> int:
        queries.clear()
        with pytest.raises(GatewayError, match="unknown API key"):
            acc.authenticate(attempt)
        return sum("FROM api_keys" in q for q in queries)

    db: sqlite3.Connection = acc._db
    db.set_trace_callback(queries.append)
    known_wrong = f"atk_{key_id}_{'x' * 32}"
    unknown = f"atk_{'0' * len(key_id)}_{'x' * 32}"
    # The first time each id is seen costs one query, whether it exists or not; after that none.
    assert lookups(known_wrong) == lookups(unknown) == 1
    assert lookups(known_wrong) == lookups(unknown) == 0
    acc.close()
