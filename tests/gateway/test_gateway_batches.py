"""OpenAI's Batch API through the gateway, driven by the openai SDK on echo nodes: a batch that
goes on through a gateway restart (each line once in the output, once in the ledger), files and
errors in OpenAI's shape, who may see and cancel a batch, and batch lines yielding to
interactive requests."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Literal

import openai
import pytest
from openai.types import Batch
from typer.testing import CliRunner

from atoll.agent.runtime import AgentRuntime
from atoll.broker.server import BrokerServer
from atoll.plugins.gateway.batch_commands import batches
from atoll.plugins.gateway.batch_gate import Gate
from atoll.plugins.gateway.contract import Limits
from support.island import Island, start_storage
from support.overlay import AgentFactory, eventually

CHAT: Literal["/v1/chat/completions"] = "/v1/chat/completions"


def sdk(isl: Island, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{isl.url}/v1", api_key=key, max_retries=0)


def chat_line(custom_id: str, text: str, model: str = "echo") -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": text}]}
    return {"custom_id": custom_id, "method": "POST", "url": CHAT, "body": body}


def jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


async def upload(client: openai.AsyncOpenAI, path: Path) -> str:
    return (await client.files.create(file=path.open("rb"), purpose="batch")).id


async def ended(client: openai.AsyncOpenAI, batch_id: str) -> Batch:
    """The batch once it has ended (polled: bounded in count and time)."""
    for _ in range(600):
        batch = await client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            return batch
        await asyncio.sleep(0.05)
    raise AssertionError(f"batch {batch_id} still {batch.status}")


async def lines_of(client: openai.AsyncOpenAI, file_id: str | None) -> list[dict[str, Any]]:
    assert file_id is not None
    content = await client.files.content(file_id)
    return [json.loads(line) for line in content.text.splitlines()]


@pytest.fixture
async def island(make_agent: AgentFactory) -> Island:
    await start_storage(make_agent)
    isl = Island(make_agent)
    await isl.add_node("gpu1", delay=0.02)
    await isl.start_gateway(batch_concurrency=2)
    await isl.models_seen("echo")
    return isl


async def test_a_batch_goes_on_through_a_gateway_restart(
    island: Island, broker: BrokerServer, tmp_path: Path
) -> None:
    alice = island.key("alice")
    n = 16
    texts = {f"req-{i}": f"line {i} of the batch" for i in range(n)}
    path = jsonl(tmp_path / "in.jsonl", [chat_line(c, t) for c, t in texts.items()])
    async with sdk(island, alice) as client:
        file_id = await upload(client, path)
        made = await client.batches.create(
            input_file_id=file_id,
            endpoint=CHAT,
            completion_window="24h",
            metadata={"run": "restart"},
        )
        assert (made.status, made.request_counts and made.request_counts.total) == (
            "validating",
            n,
        )
        done_file = island.plugin.ctx.data_dir / "batches" / f"{made.id}.done.jsonl"
        await eventually(lambda: done_file.exists() and done_file.read_text().count("\n") >= 3)
    stopped, agent_dir = island.gateway, island.plugin.ctx.data_dir.parent.parent
    assert stopped is not None
    await stopped.stop()  # the lines running finish; no more start
    done_before = done_file.read_text().count("\n")
    assert 3 <= done_before < n

    # The same agent again (its keys, its data directory), with a new gateway process.
    island.gateway = await AgentRuntime.start(
        agent_dir,
        [broker.url],
        {"gateway": {"listen": "127.0.0.1:0", "batch_concurrency": 2}},
        keys=stopped.agent.keys,
        heartbeat=0.2,
    )
    try:
        await finish_after_restart(island, alice, made.id, texts)
    finally:
        await island.gateway.stop()


async def finish_after_restart(
    island: Island, alice: str, batch_id: str, texts: dict[str, str]
) -> None:
    n = len(texts)
    async with sdk(island, alice) as client:
        batch = await ended(client, batch_id)
        assert batch.status == "completed", batch
        assert batch.request_counts is not None
        assert (batch.request_counts.completed, batch.request_counts.failed) == (n, 0)
        assert batch.metadata == {"run": "restart"} and batch.error_file_id is None
        assert batch.in_progress_at and batch.finalizing_at and batch.completed_at
        out = await lines_of(client, batch.output_file_id)
        described = await client.files.retrieve(batch.output_file_id or "")
    assert described.purpose == "batch_output"
    assert [line["custom_id"] for line in out] == list(texts)  # each once, in input order
    for line in out:
        assert line["error"] is None and line["response"]["status_code"] == 200
        reply = line["response"]["body"]
        assert reply["object"] == "chat.completion"
        assert reply["choices"][0]["message"]["content"] == texts[line["custom_id"]]
        assert line["response"]["request_id"] == reply["id"].removeprefix("chatcmpl-")
    rows = island.accounts.usage_rows(user="alice")
    assert len(rows) == n and {r.status for r in rows} == {200}
    assert {r.request_id for r in rows} == {line["response"]["request_id"] for line in out}
    assert not list((island.plugin.ctx.data_dir / "batches").glob(f"{batch_id}.*.jsonl"))


async def test_files_and_errors_in_openai_shape(island: Island, tmp_path: Path) -> None:
    alice = island.key("alice")
    async with sdk(island, alice) as client:
        # Refused at upload, naming the line.
        for rows, said in (
            ([chat_line("a", "x"), chat_line("a", "y")], "line 2: custom_id 'a' is also on line 1"),
            ([chat_line("a", "x"), {**chat_line("b", "y"), "method": "GET"}], "line 2: method"),
            (
                [chat_line("a", "x"), {**chat_line("b", "y"), "url": "/v1/embeddings"}],
                "line 2: url '/v1/embeddings' differs from the first line's",
            ),
            ([chat_line("a", "x"), {**chat_line("b", "y"), "body": {"model": "echo"}}], "line 2"),
            ([{**chat_line("a", "x"), "body": {**chat_line("a", "x")["body"], "stream": True}}],
             "line 1: stream is not supported"),
        ):  # fmt: skip
            with pytest.raises(openai.BadRequestError) as refused:
                await upload(client, jsonl(tmp_path / "bad.jsonl", rows))
            assert said in str(refused.value), refused.value
        bad_purpose = client.files.create(file=b"x", purpose="vision")
        with pytest.raises(openai.BadRequestError, match="purpose"):
            await bad_purpose

        # A line's own error is that line's result, not the batch's failure.
        rows = [chat_line("ok", "hello there"), chat_line("missing", "hi", model="no-such")]
        mixed = await client.batches.create(
            input_file_id=await upload(client, jsonl(tmp_path / "mixed.jsonl", rows)),
            endpoint=CHAT,
            completion_window="24h",
        )
        batch = await ended(client, mixed.id)
        assert batch.status == "completed" and batch.request_counts is not None
        assert (batch.request_counts.completed, batch.request_counts.failed) == (1, 1)
        [good] = await lines_of(client, batch.output_file_id)
        [error] = await lines_of(client, batch.error_file_id)
        assert good["custom_id"] == "ok" and good["response"]["body"]["choices"]
        assert (error["custom_id"], error["response"]["status_code"]) == ("missing", 404)
        assert error["response"]["body"]["error"]["code"] == "model_not_found"

        # Completions and embeddings, each through its own route's reply.
        for endpoint, body, check in (
            ("/v1/completions", {"model": "echo", "prompt": "one two"}, "text_completion"),
            ("/v1/embeddings", {"model": "echo", "input": ["a b", "c"]}, "list"),
        ):
            line = {"custom_id": "x", "method": "POST", "url": endpoint, "body": body}
            made = await client.batches.create(
                input_file_id=await upload(client, jsonl(tmp_path / "one.jsonl", [line])),
                endpoint=endpoint,  # type: ignore[arg-type]
                completion_window="24h",
            )
            batch = await ended(client, made.id)
            [result] = await lines_of(client, batch.output_file_id)
            assert result["response"]["body"]["object"] == check, result

        # A file for another endpoint fails the batch, naming the line.
        line = {"custom_id": "x", "method": "POST", "url": "/v1/completions", "body": {}}
        line["body"] = {"model": "echo", "prompt": "p"}
        other = await upload(client, jsonl(tmp_path / "other.jsonl", [line]))
        made = await client.batches.create(
            input_file_id=other, endpoint=CHAT, completion_window="24h"
        )
        failed = await ended(client, made.id)
        assert failed.status == "failed" and failed.errors and failed.errors.data
        assert failed.errors.data[0].line == 1 and "one endpoint per batch" in str(
            failed.errors.data[0].message
        )

        # Bad creates: clear 4xx, nothing kept.
        tuning = await client.files.create(
            file=jsonl(tmp_path / "t.jsonl", [{"text": "just text"}]).open("rb"),
            purpose="fine-tune",
        )
        before = len((await client.batches.list()).data)
        unprocessable = openai.UnprocessableEntityError
        for kwargs, error_type in (
            ({"input_file_id": tuning.id}, openai.BadRequestError),
            ({"input_file_id": "ds-000000000000"}, openai.NotFoundError),
            ({"input_file_id": other, "completion_window": "1h"}, unprocessable),
            ({"input_file_id": other, "endpoint": "/v1/moderations"}, unprocessable),
        ):
            with pytest.raises(error_type):
                await client.batches.create(
                    **{"endpoint": CHAT, "completion_window": "24h", **kwargs}  # type: ignore[arg-type]
                )
        assert len((await client.batches.list()).data) == before
        page = await client.batches.list(limit=2)
        assert len(page.data) == 2 and page.has_more
        rest = await client.batches.list(limit=100, after=page.data[-1].id)
        assert len(rest.data) == before - 2
        assert not {b.id for b in rest.data} & {b.id for b in page.data}


async def test_who_may_see_and_cancel_a_batch(island: Island, tmp_path: Path) -> None:
    alice, bob = island.key("alice"), island.key("bob")
    rows = [chat_line(f"r{i}", "a few words to say slowly " * 4) for i in range(40)]
    async with (
        sdk(island, alice) as a,
        sdk(island, bob) as b,
        sdk(island, island.admin_key) as admin,
    ):
        file_id = await upload(a, jsonl(tmp_path / "slow.jsonl", rows))
        with pytest.raises(openai.NotFoundError):  # not bob's file
            await b.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
        made = await a.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
        with pytest.raises(openai.NotFoundError):
            await b.batches.retrieve(made.id)
        with pytest.raises(openai.NotFoundError):
            await b.batches.cancel(made.id)
        assert (await b.batches.list()).data == []
        assert (await admin.batches.retrieve(made.id)).id == made.id

        cancelling = await a.batches.cancel(made.id)
        assert cancelling.status == "cancelling" and cancelling.cancelling_at
        batch = await ended(a, made.id)
        assert batch.status == "cancelled" and batch.cancelled_at
        assert batch.request_counts is not None
        assert batch.request_counts.total == 40
        assert batch.request_counts.completed + batch.request_counts.failed == 40
        errors = await lines_of(a, batch.error_file_id)
        assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
        assert len(errors) == 40 - batch.request_counts.completed
        with pytest.raises(openai.ConflictError):
            await a.batches.cancel(made.id)
        with pytest.raises(openai.NotFoundError):  # not bob's results either
            await b.files.content(batch.error_file_id or "")
    ledger = island.accounts.usage(user="alice").requests
    assert ledger == batch.request_counts.completed  # only the lines that ran were metered


async def test_batch_lines_yield_to_interactive_requests(make_agent: AgentFactory) -> None:
    isl = Island(make_agent)
    await isl.add_node("gpu1", delay=0.3)  # before its first token, a request waits
    await isl.start_gateway()
    await isl.models_seen("echo")
    gw = isl.plugin.gateway
    gate: Gate = isl.plugin.batches.runner.gate
    assert gate.open("echo", {})
    # Every node serving the model has a queue (as announced): no batch line starts.
    [node] = gw.watch.discovery.select(plugin="inference")
    node.load["queue_depth"] = 2
    assert not gate.open("echo", {}) and gate.open("other-model", {})
    node.load["queue_depth"] = 0
    assert gate.open("echo", {})
    async with sdk(isl, isl.key("carol")) as client:
        asking = asyncio.create_task(
            client.chat.completions.create(
                model="echo", messages=[{"role": "user", "content": "two words"}]
            )
        )
        await eventually(lambda: gw.interactive_waiting == 1)
        assert not gate.open("echo", {})  # an interactive request waits: no batch line starts
        started = asyncio.create_task(gate.enter("echo", {}, lambda: False))
        await eventually(lambda: gw.interactive_waiting == 0)  # its first token came
        assert await started and gate.running == 1
        gate.leave(overloaded=False)
        await asyncio.wait_for(asking, 10)
    for _ in range(gate.limit):  # at most ``limit`` lines at once
        assert await gate.enter("echo", {}, lambda: False)
    assert not gate.open("echo", {})
    assert not await gate.enter("echo", {}, lambda: True)  # a stopped batch stops waiting
    gate.leave(overloaded=True)  # refused as overloaded: every start pauses a while
    assert not gate.open("echo", {})


async def test_a_line_refused_for_load_is_tried_again(island: Island, tmp_path: Path) -> None:
    """The gateway starts two lines at once, the key allows one request at a time: the second
    is refused (429) each time, and runs later, not as an error."""
    dave = island.key("dave", limits=Limits(concurrent=1))
    rows = [chat_line(f"r{i}", "five words in each line") for i in range(6)]
    async with sdk(island, dave) as client:
        file_id = await upload(client, jsonl(tmp_path / "in.jsonl", rows))
        made = await client.batches.create(
            input_file_id=file_id, endpoint=CHAT, completion_window="24h"
        )
        batch = await ended(client, made.id)
        assert batch.request_counts is not None
        assert (batch.request_counts.completed, batch.request_counts.failed) == (6, 0)
        assert batch.error_file_id is None
    assert island.accounts.usage(user="dave").requests == 6


async def test_atoll_batch_from_the_command_line(island: Island, tmp_path: Path) -> None:
    env = {"ATOLL_GATEWAY_URL": island.url, "ATOLL_API_KEY": island.key("alice")}

    async def atoll(*args: str) -> Any:
        return await asyncio.to_thread(CliRunner().invoke, batches, list(args), env=env)

    lines = jsonl(tmp_path / "in.jsonl", [chat_line(f"q{i}", f"hello {i}") for i in range(3)])
    made = await atoll("create", str(lines))
    assert made.exit_code == 0, made.output
    batch_id = json.loads(made.stdout)["id"]
    async with sdk(island, island.key("alice")) as client:
        assert (await ended(client, batch_id)).status == "completed"
    out = tmp_path / "out.jsonl"
    got = await atoll("results", batch_id, "--to", str(out))
    assert got.exit_code == 0, got.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["custom_id"] for r in rows) == ["q0", "q1", "q2"]
    assert all(r["response"]["status_code"] == 200 for r in rows)
    no_errors = await atoll("results", batch_id, "--errors", "--to", str(tmp_path / "e.jsonl"))
    assert no_errors.exit_code == 1 and "has no errors file" in no_errors.output
    assert [b["id"] for b in json.loads((await atoll("list")).stdout)] == [batch_id]
    wrong = await atoll("create", str(lines), "--endpoint", "/v1/nope")
    assert wrong.exit_code == 1 and "--endpoint must be one of" in wrong.output
