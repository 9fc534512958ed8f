"""Absurd input is a 400 that names it and loses nothing: upload filenames with ``..`` or ``/``
or of 300 characters, a dataset row nested 200,000 deep, a 100,000-digit number, and the same
inside a JSON request body. The gateway and storage stay up and keep nothing of it. Storage
refuses them itself (DatasetInvalid), whoever uploads."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import httpx
import pytest

from atoll.plugins.storage.contract.datasets import DatasetInvalid, list_datasets, upload_dataset
from atoll.plugins.storage.datasets import MAX_DEPTH, prepare
from support.island import Island, start_storage
from support.overlay import AgentFactory, eventually

DEEP = "[" * 200_000 + "]" * 200_000
HUGE = "1" * 100_000
GOOD = b'{"instruction": "q", "output": "a"}\n'
NAME_RULE = "give a plain file name of 1-200 bytes (no '/', '\\', '..' or control characters)"


def row(extra: str) -> bytes:
    return f'{{"instruction": "q", "output": "a", "x": {extra}}}\n'.encode()


def uploads(isl: Island) -> list[str]:
    return [a.target for a in isl.accounts.audit_log() if a.action == "file.upload"]


def staged() -> set[str]:
    """The gateway's upload staging folders now (each is removed once its upload ends)."""
    return {p.name for p in Path(tempfile.gettempdir()).glob("atoll-upload-*")}


async def island(make_agent: AgentFactory) -> Island:
    await make_agent("store", roles=("storage",), plugins={"storage": {}}, heartbeat=0.2)
    isl = Island(make_agent)
    await isl.add_node("gpu1")
    await (await isl.start_gateway()).models_seen("echo")
    view = isl.plugin.gateway.watch.discovery
    await eventually(lambda: bool(view.select(plugin="storage")))
    return isl


async def test_absurd_uploads_are_400s_that_name_the_problem(make_agent: AgentFactory) -> None:
    isl = await island(make_agent)
    auth = {"Authorization": f"Bearer {isl.key('alice')}"}
    cases = [
        ("..", GOOD, f"filename '..': {NAME_RULE}"),
        ("../../etc/cron.d/x.jsonl", GOOD, "filename '../../etc/cron.d/x.jsonl'"),
        ("sub/dir.jsonl", GOOD, "filename 'sub/dir.jsonl'"),
        ("x" * 300 + ".jsonl", GOOD, NAME_RULE),
        ("deep.jsonl", row(DEEP), f"deep.jsonl: line 1: nesting deeper than {MAX_DEPTH}"),
        ("huge.jsonl", GOOD + row(HUGE),
         "huge.jsonl: line 2: number too long (100000 characters; at most 100)"),
        ("deep.json", b"[" + GOOD.strip() + b",\n" + row(DEEP).strip() + b"]",
         f"deep.json: line 2: nesting deeper than {MAX_DEPTH}"),
    ]  # fmt: skip
    before = staged()
    async with httpx.AsyncClient(base_url=isl.url, headers=auth, timeout=60) as http:
        for filename, body, message in cases:
            files = {"file": (filename, body, "application/jsonl")}
            reply = await http.post("/v1/files", files=files, data={"purpose": "fine-tune"})
            assert reply.status_code == 400, (filename[:20], reply.text[:300])
            error = reply.json()["error"]
            assert message in error["message"]
            assert error["type"] == "invalid_request_error"
        listed = await http.get("/v1/files")
        assert listed.status_code == 200 and listed.json()["data"] == []  # nothing kept
        assert staged() == before  # nor anything left on the gateway's disk
        assert uploads(isl) == []  # no upload was recorded
        # Still serving, and the honest upload works.
        files = {"file": ("ok.jsonl", GOOD, "application/jsonl")}
        ok = await http.post("/v1/files", files=files, data={"purpose": "fine-tune"})
        assert ok.status_code == 200, ok.text
        assert ok.json()["filename"] == "ok.jsonl"
        assert [f["id"] for f in (await http.get("/v1/files")).json()["data"]] == [ok.json()["id"]]
        assert uploads(isl) == [ok.json()["id"]]


async def test_storage_refuses_them_itself(make_agent: AgentFactory, tmp_path: Path) -> None:
    """Any path into storage is covered: an agent that uploads without the gateway."""
    _, plugin = await start_storage(make_agent)
    uploader = (await make_agent("uploader", roles=("gateway",))).agent
    data = tmp_path / "data.jsonl"
    for filename, body, message in [
        ("..", GOOD, f"filename '..': {NAME_RULE}"),
        ("a..b.jsonl", GOOD, "filename 'a..b.jsonl'"),
        ("deep.jsonl", GOOD + row(DEEP), "line 2: nesting deeper than 64"),
        ("huge.jsonl", row("-" + HUGE + ".5e3"), "line 1: number too long"),
    ]:
        data.write_bytes(body)
        with pytest.raises(DatasetInvalid, match=re.escape(message)):
            await upload_dataset(uploader, "store", data, "d", "alice", filename=filename)
    assert await list_datasets(uploader, "store") == []
    assert await plugin.store.list("datasets/") == []
    assert list(plugin.incoming.iterdir()) == []
    data.write_bytes(GOOD)
    record = await upload_dataset(uploader, "store", data, "d", "alice", filename="ok.jsonl")
    assert record.rows == 1


def test_the_checks_are_bounded_and_spare_honest_rows() -> None:
    """Long strings of digits or brackets inside strings are text; 64 levels is still a row."""
    nested = "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1)  # the row's object is a level too
    honest = (
        '{"instruction": "' + "1" * 5000 + ' [[[[", "output": "' + "{" * 500 + '", '
        '"n": -12.5e3, "x": ' + nested + "}\n"
    ).encode()
    assert len(prepare(honest, "ok.jsonl").rows) == 1
    escaped = '{"instruction": "\\"' + "[" * 100 + '\\\\", "output": "a"}\n'
    assert len(prepare(escaped.encode() * 100, "ok.jsonl", dedup="none").rows) == 100
    too_deep = honest.replace(b'"x": [', b'"x": [[').replace(b"]}\n", b"]]}\n")
    with pytest.raises(DatasetInvalid, match=f"line 1: nesting deeper than {MAX_DEPTH}$"):
        prepare(too_deep, "ok.jsonl")
    # Unterminated strings full of escaped quotes: linear, and json's own message.
    hostile = ('{"instruction": "' + '\\"[' * 300_000 + "\n").encode()
    with pytest.raises(DatasetInvalid, match="line 1: not valid JSON"):
        prepare(hostile, "h.jsonl")


@pytest.mark.parametrize("value", [DEEP, HUGE], ids=["deep", "huge"])
async def test_absurd_request_bodies_are_400s(make_agent: AgentFactory, value: str) -> None:
    isl = Island(make_agent)
    await isl.add_node("gpu1")
    await (await isl.start_gateway()).models_seen("echo")
    auth = {"Authorization": f"Bearer {isl.key('alice')}", "Content-Type": "application/json"}
    body = '{"model": "echo", "messages": [{"role": "user", "content": "hi"}], "x": ' + value + "}"
    async with httpx.AsyncClient(base_url=isl.url, headers=auth, timeout=60) as http:
        reply = await http.post("/v1/chat/completions", content=body)
        assert reply.status_code == 400, reply.text[:300]
        assert reply.json()["error"]["message"]
        assert isl.accounts.usage_rows(user="alice") == []  # no request ran
        fine = await http.post(
            "/v1/chat/completions",
            json={"model": "echo", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert fine.status_code == 200
