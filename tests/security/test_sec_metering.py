"""Metering escape: reading a stream and disconnecting before its end recorded 0 tokens, so
``tokens_per_min`` never bit. Tokens are now charged as they are spent: the prompt at admission,
each completion token as it is sent, disconnects included."""

from __future__ import annotations

import asyncio

import openai
import pytest

from atoll.plugins.gateway.contract import Limits
from conftest import AgentFactory, Island, eventually

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
        assert done.usage.completion_tokens == 50
        rows = isl.accounts.usage_rows(user="bob")
        assert [r.status for r in rows] == [200]  # the refused one reached no node
    finally:
        await client.close()
