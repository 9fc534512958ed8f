"""The gateway end to end with the real openai SDK: a live broker, echo inference agents and the
gateway agent on loopback. Keys, projects and per-adapter access; the ledger against what clients
were told; limits; revocation; a node dying; errors in OpenAI's shape."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from support.island import Island
from support.overlay import eventually

PROMPT: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "the quick brown fox jumps"}
]


OPENED: list[openai.AsyncOpenAI] = []


def client(island: Island, key: str) -> openai.AsyncOpenAI:
    c = openai.AsyncOpenAI(base_url=f"{island.url}/v1", api_key=key, max_retries=0)
    OPENED.append(c)
    return c


@pytest.fixture(autouse=True)
async def _close_clients():
    yield
    while OPENED:
        await OPENED.pop().close()


async def test_sync_async_and_streaming_chat(gw_island: Island) -> None:
    key = gw_island.key("alice")
    reply = await client(gw_island, key).chat.completions.create(model="echo", messages=PROMPT)
    assert reply.choices[0].message.content == "the quick brown fox jumps"
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == 5 and reply.usage.completion_tokens == 5
    # The sync client, from a thread (the gateway shares this test's event loop).
    sync = openai.OpenAI(base_url=f"{gw_island.url}/v1", api_key=key, max_retries=0)
    again = await asyncio.to_thread(
        lambda: sync.chat.completions.create(model="echo", messages=PROMPT, max_tokens=2, n=2)
    )
    assert [c.message.content for c in again.choices] == ["the quick"] * 2
    assert [c.finish_reason for c in again.choices] == ["length"] * 2
    assert again.usage is not None
    assert again.usage.prompt_tokens == 5 and again.usage.completion_tokens == 4
    stream = await client(gw_island, key).chat.completions.create(
        model="echo", messages=PROMPT, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "the quick brown fox jumps"
    assert chunks[0].choices[0].delta.role == "assistant"
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None and last.usage.total_tokens == 10
    completion = await client(gw_island, key).completions.create(
        model="echo", prompt=["one two three", "four five"], max_tokens=2
    )
    assert [c.text for c in completion.choices] == ["one two", "four five"]
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 5 and completion.usage.completion_tokens == 4
    emb = await client(gw_island, key).embeddings.create(model="echo", input=["a", "b c"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 8


async def test_tokens_stream_as_they_come(make_agent) -> None:
    isl = Island(make_agent)
    await isl.add_node("slow", delay=0.1)
    await (await isl.start_gateway()).models_seen("echo")
    stream = await client(isl, isl.key("alice")).chat.completions.create(
        model="echo", messages=PROMPT, stream=True
    )
    arrivals = []
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic())
    assert len(arrivals) == 5 and arrivals[-1] - arrivals[0] >= 0.3  # not buffered whole


async def test_adapters_by_project_and_key(gw_island: Island) -> None:
    acc = gw_island.accounts
    for user in ("alice", "bob", "carol"):
        acc.create_user(user, actor="test")
    acc.create_project("cardio", actor="test")
    acc.add_member("cardio", "alice", "member", actor="test")
    acc.add_member("cardio", "carol", "viewer", actor="test")
    acc.register_adapter("cardio/notes", "echo", project="cardio", actor="test")
    acc.register_adapter("bob/poems", "echo", owner="bob", actor="test")
    acc.register_adapter("shared/helper", "echo", public=True, actor="test")
    alice = gw_island.key("alice")
    bob = gw_island.key("bob")
    carol = gw_island.key("carol")

    async def ids(key: str) -> set[str]:
        return {m.id async for m in client(gw_island, key).models.list()}

    assert await ids(alice) == {"echo", "cardio/notes", "shared/helper"}
    assert await ids(bob) == {"echo", "bob/poems", "shared/helper"}
    models = {m.id: m async for m in client(gw_island, alice).models.list()}
    extra = models["cardio/notes"].model_extra
    assert extra is not None and extra["parent"] == "echo"
    reply = await client(gw_island, alice).chat.completions.create(
        model="cardio/notes", messages=PROMPT
    )
    content = reply.choices[0].message.content
    assert content is not None and content.startswith("[cardio/notes] the quick")
    same = await client(gw_island, alice).chat.completions.create(
        model="echo:cardio/notes", messages=PROMPT
    )
    assert same.choices[0].message.content == reply.choices[0].message.content
    # Another user's adapter: as if it did not exist (ids of other projects do not leak).
    with pytest.raises(openai.NotFoundError) as nf:
        await client(gw_island, bob).chat.completions.create(model="cardio/notes", messages=PROMPT)
    assert isinstance(nf.value.body, dict) and nf.value.body["code"] == "model_not_found"
    # A viewer sees the project's adapter but may not use it.
    assert "cardio/notes" in await ids(carol)
    with pytest.raises(openai.PermissionDeniedError):
        await client(gw_island, carol).chat.completions.create(
            model="cardio/notes", messages=PROMPT
        )
    # A mixture needs every part usable by the caller.
    mix = {
        "adapters": [{"id": "cardio/notes", "weight": 0.5}, {"id": "shared/helper", "weight": 0.5}]
    }
    mixed = await client(gw_island, alice).chat.completions.create(
        model="echo", messages=PROMPT, extra_body=mix
    )
    content = mixed.choices[0].message.content
    assert content is not None and content.startswith("[mix:")
    with pytest.raises(openai.NotFoundError):
        await client(gw_island, bob).chat.completions.create(
            model="echo", messages=PROMPT, extra_body=mix
        )
    # A project-scoped key sees its project and public adapters only.
    scoped = gw_island.key("alice", project="cardio")
    assert await ids(scoped) == {"echo", "cardio/notes", "shared/helper"}


async def test_ledger_equals_what_clients_were_told(gw_island: Island) -> None:
    key = gw_island.key("alice")
    told = {"prompt": 0, "completion": 0}

    async def plain(n: int) -> None:
        r = await client(gw_island, key).chat.completions.create(
            model="echo", messages=PROMPT, n=n, max_tokens=3
        )
        assert r.usage is not None
        told["prompt"] += r.usage.prompt_tokens
        told["completion"] += r.usage.completion_tokens

    async def streamed() -> None:
        s = await client(gw_island, key).chat.completions.create(
            model="echo", messages=PROMPT, stream=True, stream_options={"include_usage": True}
        )
        async for chunk in s:
            if chunk.usage:
                told["prompt"] += chunk.usage.prompt_tokens
                told["completion"] += chunk.usage.completion_tokens

    await asyncio.gather(plain(1), plain(3), streamed(), streamed(), plain(2))
    principal = gw_island.accounts.authenticate(key)
    totals = gw_island.accounts.usage(key_id=principal.key_id)
    assert totals.requests == 5
    assert (totals.prompt_tokens, totals.completion_tokens) == (told["prompt"], told["completion"])
    rows = gw_island.accounts.usage_rows(key_id=principal.key_id)
    assert all(r.status == 200 and r.prompt_text is None for r in rows)


async def test_bad_keys_and_revocation(gw_island: Island) -> None:
    key = gw_island.key("alice")
    for bad in ("", "nope", key[:-1] + ("x" if key[-1] != "x" else "y")):
        with pytest.raises(openai.AuthenticationError) as auth:
            await client(gw_island, bad or "x").models.list()
        body = auth.value.body
        assert isinstance(body, dict) and body["type"] == "authentication_error"
    async with httpx.AsyncClient() as http:
        r = await http.get(f"{gw_island.url}/v1/models")
    assert r.status_code == 401 and "Bearer" in r.json()["error"]["message"]
    key_id = gw_island.accounts.authenticate(key).key_id
    await client(gw_island, key).models.list()
    gw_island.accounts.revoke_key(key_id, actor="test")
    started = time.monotonic()
    with pytest.raises(openai.AuthenticationError) as revoked:
        await client(gw_island, key).models.list()
    assert time.monotonic() - started < 1.0
    assert isinstance(revoked.value.body, dict) and revoked.value.body["code"] == "key_revoked"


async def test_limits_answer_429_with_retry_after(gw_island: Island) -> None:
    acc = gw_island.accounts
    acc.create_user("alice", actor="test")
    from atoll.plugins.gateway.contract import Limits

    key = acc.create_key("alice", limits=Limits(requests_per_min=2), actor="test")[1]
    for _ in range(2):
        await client(gw_island, key).chat.completions.create(model="echo", messages=PROMPT)
    async with httpx.AsyncClient() as http:
        r = await http.post(
            f"{gw_island.url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": "echo", "messages": PROMPT},
        )
    assert r.status_code == 429 and 1 <= int(r.headers["Retry-After"]) <= 61
    assert r.json()["error"]["type"] == "rate_limit_error"


async def test_errors_in_openai_shape(gw_island: Island) -> None:
    key = gw_island.key("alice")
    headers = {"Authorization": f"Bearer {key}"}
    url = f"{gw_island.url}/v1/chat/completions"
    cases = [
        ({"model": "nope", "messages": PROMPT}, 404),
        ({"model": "echo"}, 422),
        ({"model": "echo", "messages": PROMPT, "temperature": "hot"}, 422),
        ({"model": "echo", "messages": PROMPT, "presence_penalty": 1.0}, 400),
    ]
    async with httpx.AsyncClient() as http:
        for body, status in cases:
            r = await http.post(url, json=body, headers=headers)
            assert r.status_code == status, (body, r.text)
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        json_type = headers | {"Content-Type": "application/json"}
        r = await http.post(url, content=b"{not json", headers=json_type)
        assert r.status_code == 400
        r = await http.post(url, content=b"x" * (17 * 1024 * 1024), headers=headers)
        assert r.status_code == 413
        r = await http.get(f"{gw_island.url}/v1/nothing-here", headers=headers)
        assert r.status_code == 404 and "error" in r.json()


async def test_node_killed_is_routed_around_and_none_left_is_503(gw_island: Island) -> None:
    key = gw_island.key("alice")
    await gw_island.nodes["gpu1"].stop()
    for _ in range(4):  # whichever node discovery still lists, the request is served
        r = await client(gw_island, key).chat.completions.create(model="echo", messages=PROMPT)
        assert r.choices[0].finish_reason == "stop"
    await gw_island.nodes["gpu2"].stop()
    await eventually(lambda: not gw_island.plugin.gateway.catalog.base_models(), 10)
    with pytest.raises(openai.NotFoundError):  # no node serves it now: an unknown model
        await client(gw_island, key).chat.completions.create(model="echo", messages=PROMPT)


async def test_phi_project_only_reaches_phi_nodes(make_agent) -> None:
    isl = Island(make_agent)
    await isl.add_node("open-node")
    await (await isl.start_gateway()).models_seen("echo")
    acc = isl.accounts
    acc.create_user("alice", actor="test")
    acc.create_project("clinic", labels={"phi": "true"}, actor="test")
    acc.add_member("clinic", "alice", "member", actor="test")
    key = isl.key("alice", project="clinic")
    with pytest.raises(openai.InternalServerError) as no_node:  # 503: no phi node online
        await client(isl, key).chat.completions.create(model="echo", messages=PROMPT)
    assert no_node.value.status_code == 503 and "phi=true" in no_node.value.message
    await isl.add_node("phi-node", labels={"phi": "true"})
    await eventually(lambda: len(isl.plugin.gateway.catalog.base_models()["echo"]) == 2)
    for _ in range(3):
        await client(isl, key).chat.completions.create(model="echo", messages=PROMPT)
    served = isl.nodes["phi-node"].host.plugins["inference"].ctx.metrics.snapshot()
    assert served["requests"]["series"][0]["value"] == 3


async def test_admin_api_metrics_and_feed(gw_island: Island) -> None:
    admin = {"Authorization": f"Bearer {gw_island.admin_key}"}
    user = {"Authorization": f"Bearer {gw_island.key('alice')}"}
    async with httpx.AsyncClient(base_url=gw_island.url) as http:
        r = await http.post("/admin/users", json={"name": "dave"}, headers=admin)
        assert r.status_code == 200 and r.json()["name"] == "dave"
        r = await http.post("/admin/keys", json={"user": "dave"}, headers=admin)
        new_key = r.json()["key"]
        assert (
            await http.get("/v1/models", headers={"Authorization": f"Bearer {new_key}"})
        ).status_code == 200
        assert (
            await http.post("/admin/users", json={"name": "eve"}, headers=user)
        ).status_code == 403
        audit = (await http.get("/admin/audit", headers=admin)).json()
        assert {"user.create", "key.create"} <= {a["action"] for a in audit}
        exposition = ""
        for _ in range(50):  # until the agents' first feed messages (every 0.5 s) arrived
            metrics = await http.get("/metrics", headers=admin)
            assert metrics.status_code == 200
            exposition = metrics.text
            if 'agent="gpu1"' in exposition:
                break
            await asyncio.sleep(0.1)
        assert 'atoll_memory_total_bytes{agent="gpu1"}' in exposition
        async with http.stream("GET", "/admin/feed", headers=admin) as feed:
            async for line in feed.aiter_lines():
                if line.startswith("data: "):
                    assert '"gpu1"' in line and '"gw"' in line
                    break


async def test_prompts_kept_only_by_opt_in_and_deadline_is_504(make_agent) -> None:
    isl = Island(make_agent)
    await isl.add_node("slow", delay=0.2)
    await (await isl.start_gateway(request_timeout=0.5)).models_seen("echo")
    acc = isl.accounts
    acc.create_user("alice", actor="test")
    acc.create_project("research", store_prompts=True, actor="test")
    acc.add_member("research", "alice", "member", actor="test")
    kept = isl.key("alice", project="research")
    plain = isl.key("alice")
    short: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
    await client(isl, kept).chat.completions.create(model="echo", messages=short)
    await client(isl, plain).chat.completions.create(model="echo", messages=short)
    rows = {r.key_id: r for r in acc.usage_rows()}
    assert "hi" in rows[acc.authenticate(kept).key_id].prompt_text
    assert rows[acc.authenticate(plain).key_id].prompt_text is None
    # Five words at 0.2 s each cannot finish within the 0.5 s deadline.
    with pytest.raises(openai.APIStatusError) as late:
        await client(isl, plain).chat.completions.create(model="echo", messages=PROMPT)
    assert late.value.status_code == 504
    assert acc.usage_rows()[-1].status == 504
