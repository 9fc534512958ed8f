"""Users serve themselves under /me with their own keys (never another user's, never wider than
the calling key), and administrators get usage reports per user, project, model and adapter, as
JSON and CSV."""

from __future__ import annotations

import csv
import io

import httpx
import pytest

from atoll.plugins.gateway.contract import Limits
from support.island import Island
from support.overlay import AgentFactory


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
async def island(make_agent: AgentFactory) -> Island:
    isl = Island(make_agent)
    await isl.add_node("gpu1", model="echo")
    await (await isl.start_gateway(prices={"echo": {"input": 1000, "output": 2000}})).models_seen(
        "echo"
    )
    acc = isl.accounts
    for name in ("alice", "bob"):
        acc.create_user(name, actor="t")
    acc.create_project("lab", actor="t")
    acc.add_member("lab", "alice", "member", actor="t")
    acc.register_adapter("lab/notes", "echo", project="lab", actor="t")
    return isl


async def chat(http: httpx.AsyncClient, key: str, model: str = "echo") -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "one two three"}]}
    reply = await http.post("/v1/chat/completions", json=body, headers=bearer(key))
    assert reply.status_code == 200, reply.text


async def test_a_user_manages_their_own_keys_and_nobody_elses(island: Island) -> None:
    alice = island.key("alice", limits=Limits(requests_per_min=100), ttl_s=86400)
    bob = island.key("bob")
    async with httpx.AsyncClient(base_url=island.url, timeout=30) as http:
        made = await http.post("/me/keys", json={"name": "laptop"}, headers=bearer(alice))
        assert made.status_code == 200, made.text
        new = made.json()
        record = new["record"]
        assert new["key"].startswith("atk_") and record["user"] == "alice"
        # Never wider than the calling key: its limits kept, its lifetime not outlived.
        assert record["limits"]["requests_per_min"] == 100
        assert record["expires_at"] is not None
        narrowed = await http.post(
            "/me/keys", json={"limits": {"requests_per_min": 500, "concurrent": 2}},
            headers=bearer(alice),
        )  # fmt: skip
        assert narrowed.json()["record"]["limits"] == {
            "requests_per_min": 100, "tokens_per_min": None, "concurrent": 2,
        }  # fmt: skip
        too_long = await http.post("/me/keys", json={"ttl_s": 10**7}, headers=bearer(alice))
        assert too_long.status_code == 400 and "outlive" in too_long.text
        listed = (await http.get("/me/keys", headers=bearer(alice))).json()
        assert len(listed) == 3 and all(k["user"] == "alice" for k in listed)
        assert new["key"] not in str(listed)
        # Bob's key sees and touches nothing of alice's: her key ids are unknown to him.
        assert [k["user"] for k in (await http.get("/me/keys", headers=bearer(bob))).json()] == [
            "bob"
        ]
        for path in ("/me/keys/revoke", "/me/keys/rotate"):
            refused = await http.post(path, json={"key_id": record["key_id"]}, headers=bearer(bob))
            assert refused.status_code == 404, refused.text
        # Rotate, then revoke, her own.
        rotated = await http.post(
            "/me/keys/rotate", json={"key_id": record["key_id"], "grace_s": 0},
            headers=bearer(alice),
        )  # fmt: skip
        assert rotated.status_code == 200
        assert rotated.json()["record"]["expires_at"] == pytest.approx(record["expires_at"])
        assert (await http.get("/v1/models", headers=bearer(new["key"]))).status_code == 401
        fresh = rotated.json()["key"]
        assert (await http.get("/v1/models", headers=bearer(fresh))).status_code == 200
        gone = await http.post(
            "/me/keys/revoke", json={"key_id": rotated.json()["record"]["key_id"]},
            headers=bearer(alice),
        )  # fmt: skip
        assert gone.json()["state"] == "revoked"
        assert (await http.get("/v1/models", headers=bearer(fresh))).status_code == 401
        actors = {e.actor for e in island.accounts.audit_log(limit=4)}
        assert actors == {"alice"}


async def test_a_project_key_stays_in_its_project(island: Island) -> None:
    scoped = island.key("alice", "lab")
    mine = island.key("alice")
    bob = island.key("bob")
    async with httpx.AsyncClient(base_url=island.url, timeout=30) as http:
        wider = await http.post("/me/keys", json={"project": None}, headers=bearer(scoped))
        made = wider.json()
        assert made["record"]["project"] == "lab"  # none asked: its own project
        other = await http.post("/me/keys", json={"project": "elsewhere"}, headers=bearer(scoped))
        assert other.status_code == 403
        listed = (await http.get("/me/keys", headers=bearer(scoped))).json()
        assert {k["project"] for k in listed} == {"lab"}  # not alice's personal keys
        revoke_mine = await http.post(
            "/me/keys/revoke", json={"key_id": island.accounts.authenticate(mine).key_id},
            headers=bearer(scoped),
        )  # fmt: skip
        assert revoke_mine.status_code == 404
        # From her personal key: a key of her project, not of one she is not in.
        lab = await http.post("/me/keys", json={"project": "lab"}, headers=bearer(mine))
        assert lab.json()["record"]["project"] == "lab"
        bob_lab = await http.post("/me/keys", json={"project": "lab"}, headers=bearer(bob))
        assert bob_lab.status_code == 400 and "member" in bob_lab.text
        bad = await http.post("/me/keys", json={"name": 5}, headers=bearer(mine))
        assert bad.status_code == 422
        assert (await http.get("/me/keys")).status_code == 401


async def test_own_usage_and_budgets(island: Island) -> None:
    acc = island.accounts
    alice = island.key("alice", "lab")
    bob = island.key("bob")
    acc.set_budget("user", "alice", "tokens", "monthly", 10_000, actor="t")
    acc.set_budget("project", "lab", "cost", "total", 2.0, actor="t")
    acc.set_budget("user", "bob", "tokens", "daily", 500, actor="t")
    async with httpx.AsyncClient(base_url=island.url, timeout=30) as http:
        await chat(http, alice)
        await chat(http, alice, "lab/notes")
        await chat(http, bob)
        usage = (await http.get("/me/usage", headers=bearer(alice))).json()
        assert usage["requests"] == 2
        groups = {(g["model"], g["adapter"]): g for g in usage["groups"]}
        assert set(groups) == {("echo", None), ("echo", "lab/notes")}
        assert groups[("echo", None)]["prompt_tokens"] == 3
        assert groups[("echo", None)]["cost"] == pytest.approx(3 * 0.001 + 3 * 0.002)
        later = await http.get("/me/usage", params={"since": 4e9}, headers=bearer(alice))
        assert later.json()["requests"] == 0
        spreadsheet = await http.get("/me/usage", params={"format": "csv"}, headers=bearer(alice))
        assert spreadsheet.headers["content-type"].startswith("text/csv")
        assert len(list(csv.DictReader(io.StringIO(spreadsheet.text)))) == 2
        budgets = (await http.get("/me/budgets", headers=bearer(alice))).json()
        assert [b["id"] for b in budgets] == ["project:lab:cost:total", "user:alice:tokens:monthly"]
        assert (
            budgets[1]["remaining"] == 10_000 - usage["prompt_tokens"] - usage["completion_tokens"]
        )
        assert [b["id"] for b in (await http.get("/me/budgets", headers=bearer(bob))).json()] == [
            "user:bob:tokens:daily"
        ]
        bad = await http.get("/me/usage", params={"group_by": "prompt_text"}, headers=bearer(bob))
        assert bad.status_code == 400


async def test_admin_usage_reports_and_budget_routes(island: Island) -> None:
    alice = island.key("alice", "lab")
    bob = island.key("bob")
    admin = bearer(island.admin_key)
    async with httpx.AsyncClient(base_url=island.url, timeout=30) as http:
        await chat(http, alice)
        await chat(http, alice, "lab/notes")
        await chat(http, bob)
        report = await http.get("/admin/usage", params={"group_by": "user,project"}, headers=admin)
        body = report.json()
        assert body["requests"] == 3
        assert [(g["user"], g["project"], g["requests"]) for g in body["groups"]] == [
            ("alice", "lab", 2), ("bob", None, 1),
        ]  # fmt: skip
        by_adapter = await http.get(
            "/admin/usage", params={"group_by": "adapter", "format": "csv", "until": 4e9},
            headers=admin,
        )  # fmt: skip
        rows = list(csv.DictReader(io.StringIO(by_adapter.text)))
        assert sorted(r["adapter"] for r in rows) == ["", "lab/notes"]
        assert {"requests", "prompt_tokens", "completion_tokens", "cost"} <= set(rows[0])
        assert (await http.get("/admin/usage", headers=bearer(bob))).status_code == 403
        set_ = await http.post(
            "/admin/budgets",
            json={"scope": "user", "subject": "bob", "metric": "cost", "period": "weekly",
                  "limit": 1.5},
            headers=admin,
        )  # fmt: skip
        assert set_.status_code == 200 and set_.json()["id"] == "user:bob:cost:weekly"
        listed = (await http.get("/admin/budgets", params={"subject": "bob"}, headers=admin)).json()
        assert [(b["id"], b["limit"]) for b in listed] == [("user:bob:cost:weekly", 1.5)]
        for bad in (
            {"scope": "team", "subject": "bob", "limit": 1},
            {"scope": "user", "subject": "bob", "limit": -1},
            {"scope": "user", "subject": "nobody", "limit": 1},
        ):
            refused = await http.post("/admin/budgets", json=bad, headers=admin)
            assert refused.status_code in (404, 422), refused.text
        removed = await http.post(
            "/admin/budgets/remove", json={"id": "user:bob:cost:weekly"}, headers=admin
        )
        assert removed.json() == {"removed": "user:bob:cost:weekly"}
        assert (await http.post("/admin/budgets", json={}, headers=bearer(bob))).status_code == 403
