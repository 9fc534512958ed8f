"""Absurd input is a 400 that names it and loses nothing: upload filenames that are ``..`` or
300 characters, a dataset row nested 200,000 deep, a 100,000-digit number, and the same inside
a JSON request body. The gateway and storage stay up and keep nothing of it."""

from __future__ import annotations

import httpx
import pytest

from conftest import AgentFactory, Island, eventually

DEEP = "[" * 200_000 + "]" * 200_000
HUGE = "1" * 100_000


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
    good = b'{"instruction": "q", "output": "a"}\n'
    cases = [
        ("..", good, "filename '..'"),
        ("x" * 300 + ".jsonl", good, "plain file name of 1-200 bytes"),
        ("deep.jsonl", (f'{{"instruction": "q", "output": "a", "x": {DEEP}}}\n').encode(),
         "line 1: not valid JSON: nested too deeply"),
        ("huge.jsonl", good + f'{{"instruction": "q", "output": "a", "n": {HUGE}}}\n'.encode(),
         "line 2: not valid JSON: a number of more than 4300 digits"),
    ]  # fmt: skip
    async with httpx.AsyncClient(base_url=isl.url, headers=auth, timeout=60) as http:
        for filename, body, message in cases:
            files = {"file": (filename, body, "application/jsonl")}
            reply = await http.post("/v1/files", files=files, data={"purpose": "fine-tune"})
            assert reply.status_code == 400, (filename[:20], reply.text[:300])
            assert message in reply.json()["error"]["message"]
        listed = await http.get("/v1/files")
        assert listed.status_code == 200 and listed.json()["data"] == []
        # still serving
        files = {"file": ("ok.jsonl", good, "application/jsonl")}
        ok = await http.post("/v1/files", files=files, data={"purpose": "fine-tune"})
        assert ok.status_code == 200, ok.text


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
        fine = await http.post(
            "/v1/chat/completions",
            json={"model": "echo", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert fine.status_code == 200
