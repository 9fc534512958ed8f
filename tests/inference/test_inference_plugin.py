"""The inference plugin on the overlay: token streams and RPC for the gateway, access by role,
discovery and metrics, echo backend, and the embedded model answering for real."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from atoll.agent.discovery import Discovery
from atoll.agent.errors import Forbidden, InvalidRequest, NoResponder, NoSuchMethod
from atoll.plugins.inference.contract import (
    ChatMessage,
    FinishEvent,
    GenerateRequest,
    SamplingParams,
    TokenEvent,
    Unsupported,
    stream_generate,
)
from atoll.plugins.storage.contract.adapters import AdapterNotFound
from support.overlay import eventually
from support.tiny_models import build_tiny_model, make_adapter

GREEDY = {"temperature": 0, "max_new_tokens": 8}  # sampling params as an RPC carries them


def split(events: list[TokenEvent | FinishEvent]) -> tuple[list[TokenEvent], FinishEvent]:
    """A generation's tokens, and its finish: the last event, and only the last."""
    *rest, finish = events
    tokens = [e for e in rest if isinstance(e, TokenEvent)]
    assert tokens == rest and isinstance(finish, FinishEvent)
    return tokens, finish


@pytest.fixture
def island(tmp_path: Path) -> dict[str, Path]:
    base = build_tiny_model(tmp_path / "tiny-llama")
    adapters = tmp_path / "adapters"
    for i in range(3):
        make_adapter(base, adapters / f"alice/ad{i}", seed=i)
    return {"base": base, "adapters": adapters}


def local_plugin(island: dict[str, Path], **extra) -> dict:
    return {
        "backend": "local",
        "local": {"model": str(island["base"]), "embeddings": False},
        "adapter_dirs": [str(island["adapters"])],
    } | extra


async def test_stream_and_rpc_generate_over_the_overlay(make_agent, island) -> None:
    await make_agent("gpu1", plugins={"inference": local_plugin(island)}, heartbeat=0.2)
    gw = await make_agent("gw", roles=("gateway",))
    request = GenerateRequest(
        messages=[ChatMessage(role="user", content="Hello")],
        adapter="alice/ad1",
        params=SamplingParams.model_validate(GREEDY),
    )
    events = [e async for e in stream_generate(gw.agent, "gpu1/inference", request)]
    tokens, finish = split(events)
    assert finish.type == "finish" and finish.adapter == "alice/ad1"
    assert finish.usage.completion_tokens == len([t for t in tokens if t.token_id is not None])
    streamed = "".join(t.text for t in tokens)
    # The RPC form gives the same greedy answer in one reply.
    reply = await gw.agent.call("gpu1/inference", "generate", request.model_dump(mode="json"))
    assert reply["text"] == streamed and reply["usage"] == finish.usage.model_dump()
    # Adapters, node info, health.
    listed = await gw.agent.call("gpu1/inference", "adapters", {})
    assert [a["id"] for a in listed] == ["alice/ad1"]
    pinned = await gw.agent.call(
        "gpu1/inference", "load_adapter", {"id": "alice/ad2", "pinned": True}
    )
    assert pinned["pinned"] is True and pinned["rank"] == 4
    info = await gw.agent.call("gpu1/inference", "info", {})
    assert info["base_model"] == "tiny-llama" and set(info["adapters"]) == {
        "alice/ad1",
        "alice/ad2",
    }
    assert (await gw.agent.call("gpu1/inference", "health", {}))["ok"] is True
    assert await gw.agent.call("gpu1/inference", "unload_adapter", {"id": "alice/ad1"}) == {
        "unloaded": True
    }
    # Discovery announces the base model and the adapters loaded, for the gateway's routing.
    view = await Discovery(gw.agent).start()
    try:
        await eventually(
            lambda: bool(view.select(plugin="inference", capability={"adapters": "alice/ad2"}))
        )
        (entry,) = view.select(plugin="inference", capability={"base_model": "tiny-llama"})
        assert entry.name == "gpu1" and "queue_depth" in entry.load
    finally:
        await view.stop()


async def test_errors_travel_typed_and_the_node_stays_up(make_agent, island) -> None:
    await make_agent("gpu1", plugins={"inference": local_plugin(island)})
    gw = await make_agent("gw", roles=("gateway",))
    user = await make_agent("mallory", roles=("agent",))
    ok = {"prompt": "Hello", "params": GREEDY}
    with pytest.raises(Forbidden, match="needs one of the roles gateway, admin, operator"):
        await user.agent.call("gpu1/inference", "generate", ok)
    with pytest.raises(Forbidden):
        async for _ in stream_generate(
            user.agent, "gpu1/inference", GenerateRequest.model_validate(ok)
        ):
            pass
    bad = [
        {"params": GREEDY},  # neither prompt nor messages
        {"prompt": "x", "params": {"temperature": -1}},
        {"prompt": "x", "params": {"max_new_tokens": 0}},
        {"prompt": "x", "adapter": "../etc/passwd"},
        {"prompt": "x", "unexpected": 1},
        "not even a dict",
    ]
    for params in bad:
        with pytest.raises(InvalidRequest):
            await gw.agent.call("gpu1/inference", "generate", params)
    with pytest.raises(AdapterNotFound, match="no storage agent"):
        await gw.agent.call("gpu1/inference", "generate", ok | {"adapter": "bob/missing"})
    with pytest.raises(Unsupported, match="tools"):
        await gw.agent.call("gpu1/inference", "generate", ok | {"tools": [{"type": "function"}]})
    with pytest.raises(NoSuchMethod):
        await gw.agent.call("gpu1/inference", "nope", {})
    reply = await gw.agent.call("gpu1/inference", "generate", ok)
    assert reply["finish_reason"] in ("length", "stop")


async def test_caller_leaving_mid_stream_stops_generation(make_agent, island) -> None:
    node = await make_agent("gpu1", plugins={"inference": local_plugin(island)})
    gw = await make_agent("gw", roles=("gateway",))
    backend = node.host.plugins["inference"].backend
    request = GenerateRequest(
        prompt="Hello", params=SamplingParams(temperature=0, max_new_tokens=400)
    )
    events = stream_generate(gw.agent, "gpu1/inference", request)
    await anext(events)
    await events.aclose()  # the user closed the tab
    await eventually(lambda: backend.engine.running == 0 and not backend.engine.waiting)
    assert backend.engine.steps < 400
    reply = await gw.agent.call("gpu1/inference", "generate", {"prompt": "Hi", "params": GREEDY})
    assert reply["usage"]["completion_tokens"] >= 1


async def test_metrics_ride_the_feed(make_agent, island) -> None:
    node = await make_agent("gpu1", plugins={"inference": local_plugin(island)})
    gw = await make_agent("gw", roles=("gateway",))
    await asyncio.gather(
        *(
            gw.agent.call(
                "gpu1/inference", "generate", {"prompt": "Hi", "adapter": a, "params": GREEDY}
            )
            for a in ("alice/ad0", "alice/ad1", "alice/ad0")
        )
    )
    snap = node.host.metrics()["inference"].snapshot()
    names = set(snap)
    assert {"tokens_generated", "adapter_loads", "request_seconds", "queue_depth"} <= names
    assert snap["adapter_loads"]["series"][0]["value"] == 2
    assert snap["requests"]["series"][0]["value"] == 3


async def test_echo_backend_streams_deterministic_tokens(make_agent) -> None:
    await make_agent("bench", plugins={"inference": {"backend": "echo"}})
    gw = await make_agent("gw", roles=("gateway",))
    request = GenerateRequest(
        prompt="one two three four", adapter="x/y", params=SamplingParams(max_new_tokens=3)
    )
    tokens, finish = split([e async for e in stream_generate(gw.agent, "bench/inference", request)])
    assert "".join(e.text for e in tokens) == "[x/y] one two"
    assert finish.finish_reason == "length" and finish.usage.completion_tokens == 3
    emb = await gw.agent.call("bench/inference", "embed", {"input": ["a", "b"]})
    assert len(emb["embeddings"]) == 2 and emb["embeddings"][0] != emb["embeddings"][1]
    with pytest.raises(NoResponder):
        async for _ in stream_generate(gw.agent, "nobody-home/inference", request):
            pass


@pytest.mark.embedded
@pytest.mark.timeout(600)
async def test_embedded_model_knows_the_capital_of_france(make_agent, embedded_model) -> None:
    model_dir = embedded_model[0]
    config = {"backend": "local", "local": {"model": str(model_dir)}}
    await make_agent("gpu1", plugins={"inference": config})
    gw = await make_agent("gw", roles=("gateway",))
    request = GenerateRequest(
        messages=[ChatMessage(role="user", content="What is the capital of France?")],
        params=SamplingParams(temperature=0, max_new_tokens=24),
    )
    tokens, finish = split([e async for e in stream_generate(gw.agent, "gpu1/inference", request)])
    answer = "".join(e.text for e in tokens)
    assert "Paris" in answer, answer
    assert finish.finish_reason == "stop"  # it ended its turn itself
    emb = await gw.agent.call(
        "gpu1/inference", "embed", {"input": ["Paris is in France", "The capital of France"]}
    )
    a, b = emb["embeddings"]
    assert (
        abs(sum(x * x for x in a) - 1) < 1e-4
        and sum(x * y for x, y in zip(a, b, strict=True)) > 0.5
    )


async def test_adapter_fetched_from_storage_over_the_data_plane(make_agent, island) -> None:
    from atoll.plugins.storage.contract.adapters import upload_adapter

    await make_agent("store", roles=("storage",), plugins={"storage": {}})
    # No local adapter directories: everything comes from the storage agent, found by discovery.
    config = {"backend": "local", "local": {"model": str(island["base"]), "embeddings": False}}
    node = await make_agent("gpu1", roles=("inference",), plugins={"inference": config})
    gw = await make_agent("gw", roles=("gateway",))
    await upload_adapter(gw.agent, "store/storage", island["adapters"] / "alice/ad0", "alice/ad0")
    request = GenerateRequest(
        prompt="Hello", adapter="alice/ad0", params=SamplingParams.model_validate(GREEDY)
    )
    reply = await gw.agent.call("gpu1/inference", "generate", request.model_dump(mode="json"))
    assert reply["adapter"] == "alice/ad0"
    fetched = node.host.plugins["inference"].ctx.data_dir / "adapters" / "alice/ad0"
    assert (fetched / "adapter_model.safetensors").read_bytes() == (
        island["adapters"] / "alice/ad0" / "adapter_model.safetensors"
    ).read_bytes()
    # The same answer as from a local copy of the adapter.
    await make_agent("gpu2", plugins={"inference": local_plugin(island)})
    again = await gw.agent.call("gpu2/inference", "generate", request.model_dump(mode="json"))
    assert again["text"] == reply["text"]
    with pytest.raises(AdapterNotFound):
        await gw.agent.call("gpu1/inference", "generate", {"prompt": "x", "adapter": "alice/nope"})
