"""Retention per project: the ledger's prompt texts and rows past their periods purged (a dry run
counting the same, changing nothing), then datasets in storage through a live gateway and
`atoll retention purge [--dry-run]`; every purge audited; only admins may."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import httpx
import pytest
from typer import Typer
from typer.testing import CliRunner

from atoll.broker.server import BrokerServer
from atoll.plugins.gateway.accounts import Accounts
from atoll.plugins.gateway.commands import retention
from atoll.plugins.gateway.errors import GatewayError
from atoll.plugins.storage.contract.datasets import list_datasets, upload_dataset
from atoll.tenancy.operator import OperatorStore
from support.island import Island, start_storage
from support.overlay import AgentFactory

DAY = 86400.0
T0 = 1_700_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def test_prompts_and_ledger_rows_past_their_periods_are_purged(accounts_db: Path | str) -> None:
    clock = Clock()
    acc = Accounts(accounts_db, b"s" * 32, clock=clock)
    acc.create_user("alice", actor="root")
    for project in ("p", "q"):
        acc.create_project(project, store_prompts=True, actor="root")
        acc.add_member(project, "alice", "member", actor="root")
    keys = {p: acc.authenticate(acc.create_key("alice", p, actor="root")[1]) for p in ("p", "q")}
    for age_days in (100, 40, 20, 1):  # one request per project at each age
        clock.now = T0 - age_days * DAY
        for project, key in keys.items():
            row = acc.usage_row(key, f"{project}{age_days}", "m", None, 1, 1, 200, 1.0, "hello")
            assert acc.insert_usage([row]) == [None]
    clock.now = T0
    acc.set_retention("p", 30 * DAY, 90 * DAY, None, actor="root")

    dry = acc.purge_ledger(True, actor="root")
    assert {p: (r.prompts, r.ledger_rows) for p, r in dry.items()} == {"p": (2, 1)}
    assert len(acc.usage_rows(project="p")) == 4  # nothing changed

    done = acc.purge_ledger(False, actor="root")
    assert {p: (r.prompts, r.ledger_rows) for p, r in done.items()} == {"p": (2, 1)}
    kept = {r.request_id: r.prompt_text for r in acc.usage_rows(project="p")}
    assert kept == {"p40": None, "p20": "hello", "p1": "hello"}  # p100 removed
    assert all(r.prompt_text == "hello" for r in acc.usage_rows(project="q"))  # no policy
    again = acc.purge_ledger(False, actor="root")
    assert (again["p"].prompts, again["p"].ledger_rows) == (0, 0)
    log = [(e.action, e.target, e.detail) for e in acc.audit_log(limit=2)]
    assert log[0] == ("retention.purge", "p", {"prompts": 2, "ledger_rows": 1})
    assert log[1][:2] == ("retention.set", "p")
    assert acc.verify_audit().ok

    with pytest.raises(GatewayError, match="prompts_s must be a period") as bad:
        acc.set_retention("p", 0, None, None, actor="root")
    assert bad.value.status == 400
    with pytest.raises(GatewayError) as missing:
        acc.set_retention("nope", DAY, None, None, actor="root")
    assert missing.value.status == 404
    acc.set_retention("p", None, None, None, actor="root")  # no period: no policy
    assert acc.list_retention() == []
    acc.close()


async def test_datasets_past_their_period_are_purged_through_storage(
    tmp_path: Path, make_agent: AgentFactory, operator: OperatorStore, broker: BrokerServer
) -> None:
    _, store = await start_storage(make_agent)
    isl = await Island(make_agent).start_gateway(storage="store")
    for project in ("p", "q"):
        isl.accounts.create_project(project, actor="root")
    gw = isl.plugin.gateway.agent
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"text": "a note"}) + "\n")
    uploaded = {
        name: await upload_dataset(gw, "store", data, name, "alice", project=project)
        for name, project in (("old-p", "p"), ("new-p", "p"), ("old-q", "q"))
    }
    registry = sqlite3.connect(store.ctx.data_dir / "registry.sqlite")
    with registry:  # uploaded 100 days ago, as far as the registry knows
        for name in ("old-p", "old-q"):
            registry.execute(
                "UPDATE datasets SET created = created - ? WHERE id = ?",
                (100 * DAY, uploaded[name].id),
            )
    isl.accounts.set_retention("p", None, None, 30 * DAY, actor="root")

    app = Typer()
    app.add_typer(retention, name="retention")
    target = ["-d", str(operator.root), "--tenant", "acme", "--broker", broker.url]

    async def purge(*flags: str) -> dict:
        argv = ["retention", "purge", *flags, *target, "--gateway", "gw"]
        result = await asyncio.to_thread(CliRunner().invoke, app, argv)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    report = await purge("--dry-run")
    assert report["dry_run"] and report["projects"] == {
        "p": {"prompts": 0, "ledger_rows": 0, "datasets": [uploaded["old-p"].id]}
    }
    assert {r.name for r in await list_datasets(gw, "store")} == {"old-p", "new-p", "old-q"}
    report = await purge()
    assert report["projects"]["p"]["datasets"] == [uploaded["old-p"].id]
    assert {r.name for r in await list_datasets(gw, "store")} == {"new-p", "old-q"}
    gone = isl.accounts.audit_log(limit=1)[0]
    assert (gone.action, gone.target) == ("retention.purge_dataset", uploaded["old-p"].id)
    assert (await purge())["projects"]["p"]["datasets"] == []

    # Who may not: a user's key; an admin's key may, over HTTP too.
    async with httpx.AsyncClient(base_url=isl.url) as http:
        for key, status in ((isl.key("bob"), 403), (isl.admin_key, 200)):
            reply = await http.post(
                "/admin/retention/purge",
                json={"dry_run": True},
                headers={"Authorization": f"Bearer {key}"},
            )
            assert reply.status_code == status, reply.text
        bad = await http.post(
            "/admin/retention",
            json={"project": "p", "ledger_s": -1},
            headers={"Authorization": f"Bearer {isl.admin_key}"},
        )
        assert bad.status_code == 422 and "ledger_s" in bad.text
