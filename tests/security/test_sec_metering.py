"""Metering escape: reading a stream and disconnecting before its end recorded 0 tokens, so
``tokens_per_min`` never bit. Tokens are now charged as they are spent: the prompt at admission,
each completion token as it is sent, disconnects included."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from atoll.plugins.gateway.contract import Limits
from support.island import Island
from support.overlay import AgentFactory, eventually

WORDS = " ".join(f"w{i}" for i in range(200))  # the echo model repeats it, a token a word


async def island(make_agent: AgentFactory) -> Island:
    isl = Island(make_agent)
    await isl.add_node("gpu1", model="echo", delay=0.02)
    await (await isl.start_gateway()).models_seen("echo")
    return isl


async def test_a_stream_left_mid_way_is_charged_what_it_got(make_agent: AgentFactory) -> None:
    isl = await island(make_agent)
    key = isl.key("alice", limits=Limits(tokens_per_min=150))
    client = openai.AsyncOpenAI(base_url=f"{isl.url}/v1", api_key=key, max_retries=0)
    try:
        stream = await client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": WORDS}], stream=True
        )
        got = 0
        async for chunk in stream:
            got += bool(chunk.choices and chunk.choices[0].delta.content)
            if got == 20:
                break
        await stream.close()  # the client leaves before the end
        await eventually(lambda: isl.accounts.usage(user="alice").requests == 1)
        (row,) = isl.accounts.usage_rows(user="alice")
        assert row.status == 499
        assert 20 <= row.completion_tokens < 200  # what was sent, not 0 and not all
        assert row.prompt_tokens >= len(WORDS) // 4  # the prompt, charged at admission
        # The limit bites: the next request is refused with the reason.
        with pytest.raises(openai.RateLimitError, match="tokens in the last minute"):
            await client.chat.completions.create(
                model="echo", messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
    finally:
        await client.close()


async def test_concurrent_requests_cannot_slip_under_the_limit(make_agent: AgentFactory) -> None:
    """The prompt is charged at admission, so a burst is refused before any of it finishes."""
    isl = await island(make_agent)
    key = isl.key("bob", limits=Limits(tokens_per_min=100))
    client = openai.AsyncOpenAI(base_url=f"{isl.url}/v1", api_key=key, max_retries=0)
    try:
        first = asyncio.create_task(
            client.chat.completions.create(
                model="echo", messages=[{"role": "user", "content": WORDS}], max_tokens=50
            )
        )
        await eventually(lambda: isl.plugin.gateway.limiter._windows != {})
        await asyncio.sleep(0.1)
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(
                model="echo", messages=[{"role": "user", "content": WORDS}], max_tokens=50
            )
        done = await first
        assert done.usage is not None and done.usage.completion_tokens == 50
        rows = isl.accounts.usage_rows(user="bob")
        assert [r.status for r in rows] == [200]  # the refused one reached no node
    finally:
        await client.close()


SHORT = " ".join(["a"] * 200)  # 200 tokens out for an estimate of 99 in: the output must count


def tokens_in_window(isl: Island) -> float:
    return sum(w.tokens.total for w in isl.plugin.gateway.limiter._windows.values())


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"model": "echo", "prompt": SHORT, "max_tokens": 250, "stream": True}),
        ("/generate_stream", {"inputs": SHORT, "parameters": {"max_new_tokens": 250}}),
    ],
    ids=["completions", "lorax"],
)
async def test_other_streams_left_mid_way_are_charged_as_sent(
    make_agent: AgentFactory, path: str, body: dict
) -> None:
    isl = await island(make_agent)
    key = isl.key("carol", limits=Limits(tokens_per_min=150))
    auth = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=isl.url, headers=auth, timeout=30) as http:
        async with http.stream("POST", path, json=body) as reply:
            assert reply.status_code == 200
            got = 0
            async for line in reply.aiter_lines():  # bounded: the stream has 200 tokens
                got += line.startswith("data:")
                if got == 60:
                    break  # leaving the block closes the connection mid-stream
        await eventually(lambda: isl.accounts.usage(user="carol").requests == 1)
        (row,) = isl.accounts.usage_rows(user="carol")
        assert row.status == 499
        assert row.prompt_tokens == len(SHORT) // 4  # charged at admission, before any token
        assert 60 <= row.completion_tokens < 200  # what was sent, not 0 and not all
        # Below the limit on its prompt alone (99 < 150): what it streamed makes it bite.
        assert tokens_in_window(isl) >= row.prompt_tokens + row.completion_tokens
        refused = await http.post(path, json=body | {"stream": False})
        assert refused.status_code == 429, refused.text
        assert "tokens in the last minute (limit 150)" in refused.text
        assert len(isl.accounts.usage_rows(user="carol")) == 1  # the refusal reached no node


async def test_a_stream_cut_by_an_error_is_charged_what_it_sent(make_agent: AgentFactory) -> None:
    """The request's deadline passes mid-stream (200 tokens at 20 ms do not fit in 1 s)."""
    isl = Island(make_agent)
    await isl.add_node("gpu1", model="echo", delay=0.02)
    await (await isl.start_gateway(request_timeout=1.0)).models_seen("echo")
    client = openai.AsyncOpenAI(base_url=f"{isl.url}/v1", api_key=isl.key("dave"), max_retries=0)
    try:
        stream = await client.completions.create(
            model="echo", prompt=SHORT, max_tokens=250, stream=True
        )
        got = 0
        with pytest.raises(openai.APIError, match="deadline"):  # an error event ends it
            async for chunk in stream:  # bounded: the stream has 200 tokens
                got += bool(chunk.choices and chunk.choices[0].text)
        await eventually(lambda: isl.accounts.usage(user="dave").requests == 1)
        (row,) = isl.accounts.usage_rows(user="dave")
        assert row.status == 504
        assert row.prompt_tokens == len(SHORT) // 4
        assert 0 < got <= row.completion_tokens < 200  # what it sent, not 0
    finally:
        await client.close()


async def test_embeddings_are_charged_at_admission(make_agent: AgentFactory) -> None:
    """A slow embedding call holds its estimated prompt in the window while it runs."""
    isl = await island(make_agent)
    await eventually(lambda: "echo" in isl.plugin.gateway.catalog.embedding_models())
    key = isl.key("erin", limits=Limits(tokens_per_min=100))
    router = isl.plugin.gateway.router
    gate = asyncio.Event()
    real_call = router.call

    async def slow_call(*args: object, **kwargs: object) -> object:
        await asyncio.wait_for(gate.wait(), 10)
        return await real_call(*args, **kwargs)

    router.call = slow_call
    client = openai.AsyncOpenAI(base_url=f"{isl.url}/v1", api_key=key, max_retries=0)
    try:
        words = ["word " * 100]  # 500 characters: an estimate of 125 tokens
        first = asyncio.create_task(client.embeddings.create(model="echo", input=words))
        await eventually(lambda: tokens_in_window(isl) == 125)
        with pytest.raises(openai.RateLimitError, match="used 125 tokens in the last minute"):
            await client.embeddings.create(model="echo", input=["hi"])
        gate.set()
        done = await first
        assert done.usage.prompt_tokens == 100  # the node's count
        (row,) = isl.accounts.usage_rows(user="erin")
        assert (row.status, row.prompt_tokens, row.completion_tokens) == (200, 100, 0)
    finally:
        gate.set()
        await client.close()


async def test_an_honest_stream_is_charged_exactly_once(make_agent: AgentFactory) -> None:
    isl = await island(make_agent)
    key = isl.key("frank", limits=Limits(tokens_per_min=10_000))
    client = openai.AsyncOpenAI(base_url=f"{isl.url}/v1", api_key=key, max_retries=0)
    try:
        stream = await client.chat.completions.create(
            model="echo",
            messages=[{"role": "user", "content": SHORT}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
        usage = chunks[-1].usage
        assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (200, 200)
        (row,) = isl.accounts.usage_rows(user="frank")
        assert (row.status, row.prompt_tokens, row.completion_tokens) == (200, 200, 200)
        # Charged as it went (99 estimated + 200 sent), settled to the node's 400: not more.
        assert tokens_in_window(isl) == 400
        again = await client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "hi"}]
        )
        assert again.choices[0].message.content == "hi"
    finally:
        await client.close()
