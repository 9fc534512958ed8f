"""The local backend: continuous batching over mixed adapters, the adapter cache, mixtures,
sampling — checked against plain transformers/peft generation on a tiny random model."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from atoll.plugins.inference.contract import (
    AdapterRejected,
    GenerateRequest,
    Mixture,
    Overloaded,
)
from atoll.plugins.storage.contract.adapters import AdapterNotFound
from support.local_node import GREEDY, reference, run, start_backend
from support.overlay import eventually
from support.tiny_models import build_tiny_model, make_adapter

N_ADAPTERS = 50


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    base = build_tiny_model(root / "tiny-llama")
    other = build_tiny_model(root / "other-llama", hidden=32)
    ads = root / "adapters"
    for i in range(N_ADAPTERS):
        make_adapter(base, ads / f"user{i}/ad", seed=i, rank=4 + (i % 3) * 2)
    # Trained on another base yet claiming ours: its tensor shapes give it away.
    liar = make_adapter(other, ads / "bad/other-base", seed=1)
    cfg = json.loads((liar / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base)
    (liar / "adapter_config.json").write_text(json.dumps(cfg))
    big = make_adapter(base, ads / "bad/rank-too-big", seed=2, rank=32)
    assert big.exists()
    corrupt = make_adapter(base, ads / "bad/corrupt", seed=3)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00not a header")
    renamed = make_adapter(base, ads / "bad/renamed-base", seed=4)
    cfg = json.loads((renamed / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "meta-llama/Llama-3-8B"
    (renamed / "adapter_config.json").write_text(json.dumps(cfg))
    return {"base": base, "adapters": ads}


async def test_mixed_adapter_batch_equals_one_request_at_a_time(models, tmp_path):
    backend = await start_backend(models, tmp_path, max_batch=8, max_adapters_per_batch=8)
    try:
        prompts = ["What is the capital", "The quick brown fox", "Hello", "Adapters change", "a"]
        jobs = [(prompts[i % len(prompts)], f"user{i}/ad" if i % 4 else None) for i in range(10)]

        # Staggered arrivals: requests join a batch that is already decoding.
        async def later(i: int, prompt: str, adapter: str | None):
            await asyncio.sleep(0.01 * i)
            return await run(backend, prompt=prompt, adapter=adapter, params=GREEDY | {"stop": []})

        results = await asyncio.gather(*(later(i, p, a) for i, (p, a) in enumerate(jobs)))
        tokenizer = backend.tokenizer
        for (prompt, adapter), (ids, _, finish) in zip(jobs, results, strict=True):
            prompt_ids = tokenizer(prompt)["input_ids"]
            path = models["adapters"] / adapter if adapter else None
            expected = reference(models["base"], path, prompt_ids, len(ids))
            assert ids == expected, (prompt, adapter)
            assert finish.usage.prompt_tokens == len(prompt_ids)
            assert finish.usage.completion_tokens == len(ids)
        assert backend.engine.steps < sum(len(r[0]) for r in results)  # really batched
    finally:
        await backend.stop()


async def test_fifty_adapters_evict_and_reload(models, tmp_path):
    backend = await start_backend(models, tmp_path, adapter_cache=8, max_batch=8)
    try:
        jobs = [f"user{i % N_ADAPTERS}/ad" for i in range(N_ADAPTERS + 10)]
        sem = asyncio.Semaphore(8)

        async def one(adapter: str):
            async with sem:
                return await run(backend, prompt="Hello world", adapter=adapter, params=GREEDY)

        results = await asyncio.gather(*(one(a) for a in jobs))
        assert [r[2].adapter for r in results] == jobs
        assert all(r[2].finish_reason in ("length", "stop") for r in results)
        # The same adapter gives the same greedy answer before and after its eviction.
        first = {a: r[0] for a, r in zip(jobs[:N_ADAPTERS], results[:N_ADAPTERS], strict=True)}
        for a, r in zip(jobs[N_ADAPTERS:], results[N_ADAPTERS:], strict=True):
            assert r[0] == first[a]
        cache = backend.cache
        assert len(cache.entries) <= 8
        assert cache.evictions.value >= N_ADAPTERS - 8
        assert cache.loads.value >= N_ADAPTERS + 10 - 8  # the last ten were evicted and came back
        assert len({tuple(r[0]) for r in results[:N_ADAPTERS]}) > N_ADAPTERS // 2  # they differ
    finally:
        await backend.stop()


@pytest.mark.parametrize(
    ("adapter", "reason"),
    [
        ("bad/corrupt", "damaged"),
        ("bad/other-base", "does not fit this base model"),
        ("bad/rank-too-big", "over this node's limit of 16"),
        ("bad/renamed-base", "trained for base model 'meta-llama/Llama-3-8B'"),
    ],
)
async def test_bad_adapters_are_refused_and_service_goes_on(models, tmp_path, adapter, reason):
    backend = await start_backend(models, tmp_path)
    try:
        good = asyncio.create_task(
            run(
                backend, prompt="Hello", adapter="user1/ad", params={**GREEDY, "max_new_tokens": 40}
            )
        )
        with pytest.raises(AdapterRejected, match=reason):
            await run(backend, prompt="Hello", adapter=adapter, params=GREEDY)
        ids, _, finish = await good
        assert finish.finish_reason == "length" and len(ids) == 40
        assert adapter not in [a.id for a in backend.adapters()]
        assert backend.cache.refusals.value == 1
        # and the node serves the next request normally
        _, _, finish = await run(backend, prompt="Hello", adapter="user2/ad", params=GREEDY)
        assert finish.finish_reason == "length"
    finally:
        await backend.stop()


async def test_unknown_adapter_and_full_cache(models, tmp_path):
    backend = await start_backend(models, tmp_path, adapter_cache=1)
    try:
        with pytest.raises(AdapterNotFound):
            await run(backend, prompt="Hello", adapter="nobody/none", params=GREEDY)
        await backend.load_adapter("user0/ad")
        await backend.pin_adapter("user0/ad", True)
        with pytest.raises(Overloaded, match="pinned or serving"):
            await run(backend, prompt="Hello", adapter="user1/ad", params=GREEDY)
        await backend.pin_adapter("user0/ad", False)
        _, _, finish = await run(backend, prompt="Hello", adapter="user1/ad", params=GREEDY)
        assert finish.adapter == "user1/ad"
        assert [a.id for a in backend.adapters()] == ["user1/ad"]
    finally:
        await backend.stop()


@pytest.mark.parametrize("strategy", ["linear", "ties", "dare_linear", "dare_ties", "svd"])
async def test_mixture_equals_peft_add_weighted_adapter(models, tmp_path, strategy):
    backend = await start_backend(models, tmp_path)
    try:
        # linear and the ties/dare family need equal ranks: users 0 and 3 both have rank 4.
        parts = [("user0/ad", 0.7), ("user3/ad", 0.5)]
        mixture = Mixture(
            adapters=[{"id": i, "weight": w} for i, w in parts],
            merge_strategy=strategy,
            density=0.6,
        )
        ids, _, finish = await run(
            backend, prompt="The quick brown fox", mixture=mixture.model_dump(), params=GREEDY
        )
        assert finish.adapter == mixture.key()
        # Reference: peft's add_weighted_adapter on a fresh model, same weights (and the same
        # seed for the random pruning of dare).
        model = AutoModelForCausalLM.from_pretrained(models["base"]).eval()
        peft_model = PeftModel.from_pretrained(model, models["adapters"] / parts[0][0], "p0")
        peft_model.load_adapter(models["adapters"] / parts[1][0], "p1")
        seed = int.from_bytes(hashlib.sha256(mixture.key().encode()).digest()[:8], "big")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            peft_model.add_weighted_adapter(
                ["p0", "p1"], [w for _, w in parts], "mix", combination_type=strategy, density=0.6
            )
        peft_model.set_adapter("mix")
        prompt = torch.tensor([backend.tokenizer("The quick brown fox")["input_ids"]])
        out = peft_model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=len(ids),
            min_new_tokens=len(ids),
            do_sample=False,
        )
        assert ids == out[0, prompt.shape[1] :].tolist()
        # A second request with the same mixture reuses the merged adapter.
        loads = backend.cache.loads.value
        again, _, _ = await run(
            backend, prompt="The quick brown fox", mixture=mixture.model_dump(), params=GREEDY
        )
        assert again == ids and backend.cache.loads.value == loads
    finally:
        await backend.stop()


async def test_mixture_of_unequal_ranks_refused_for_linear(models, tmp_path):
    backend = await start_backend(models, tmp_path)
    try:
        mixture = {"adapters": [{"id": "user0/ad", "weight": 1}, {"id": "user1/ad", "weight": 1}]}
        with pytest.raises(AdapterRejected, match="cannot merge"):
            await run(backend, prompt="Hi", mixture=mixture, params=GREEDY)
        # svd handles different ranks
        _, _, finish = await run(
            backend, prompt="Hi", mixture=mixture | {"merge_strategy": "svd"}, params=GREEDY
        )
        assert finish.finish_reason == "length"
    finally:
        await backend.stop()


async def test_sampling_seed_stop_and_limits(models, tmp_path):
    backend = await start_backend(models, tmp_path)
    try:
        sampled = {"temperature": 0.9, "top_p": 0.9, "top_k": 50, "max_new_tokens": 16}
        a = await run(backend, prompt="Hello", params=sampled | {"seed": 7})
        # The same seed gives the same tokens even with other requests in the batch.
        b, *_ = await asyncio.gather(
            run(backend, prompt="Hello", params=sampled | {"seed": 7}),
            run(backend, prompt="The quick", params=sampled | {"seed": 1}),
            run(backend, prompt="What", params=GREEDY),
        )
        assert a[0] == b[0]
        others = [
            await run(backend, prompt="Hello", params=sampled | {"seed": s}) for s in range(4)
        ]
        assert len({tuple(o[0]) for o in others}) > 1
        # A stop sequence taken from the greedy answer ends it there, unshown.
        _, text, finish = await run(backend, prompt="Hello", params=GREEDY | {"max_new_tokens": 30})
        stop = text[len(text) // 2 : len(text) // 2 + 3]
        assert stop.strip(), text
        _, cut, finish = await run(
            backend, prompt="Hello", params=GREEDY | {"max_new_tokens": 30, "stop": [stop]}
        )
        assert finish.finish_reason == "stop" and stop not in cut and text.startswith(cut)
        # The repetition penalty changes a greedy answer that repeats itself.
        _, penalised, _ = await run(
            backend, prompt="Hello", params=GREEDY | {"max_new_tokens": 30, "repetition_penalty": 5}
        )
        assert penalised != text
    finally:
        await backend.stop()


async def test_context_limit_and_cancellation(models, tmp_path):
    backend = await start_backend(models, tmp_path)
    try:
        from atoll.agent.errors import InvalidRequest

        with pytest.raises(InvalidRequest, match="context is 512"):
            await run(backend, prompt="word " * 600, params=GREEDY)
        # Near the end of the context the answer is cut with "length".
        _, _, finish = await run(
            backend, prompt="Hello " * 250, params={"temperature": 0, "max_new_tokens": 500}
        )
        assert finish.finish_reason == "length" and finish.usage.total_tokens <= 512
        # A caller that goes away frees its place at once.
        gen = backend.generate(
            GenerateRequest(prompt="Hello", params={"temperature": 0, "max_new_tokens": 400})
        )
        await anext(gen)
        for _ in range(100):
            if backend.engine.running == 1:
                break
            await asyncio.sleep(0.02)
        assert backend.engine.running == 1
        await gen.aclose()
        for _ in range(100):
            if backend.engine.running == 0:
                break
            await asyncio.sleep(0.02)
        assert backend.engine.running == 0 and backend.engine.steps < 400
    finally:
        await backend.stop()


async def test_distinct_adapters_per_step_and_queue_bounds(models, tmp_path):
    backend = await start_backend(
        models, tmp_path, max_batch=8, max_adapters_per_batch=2, max_queue=6
    )
    try:
        engine = backend.engine
        seen: list[int] = []
        forward = engine._forward

        def spy(inputs, rows, **options):
            seen.append(len({r.slot for r in rows} - {0}))
            return forward(inputs, rows, **options)

        engine._forward = spy
        jobs = [f"user{i}/ad" for i in range(6)]
        results = await asyncio.gather(
            *(run(backend, prompt="Hello", adapter=a, params=GREEDY) for a in jobs)
        )
        assert [r[2].adapter for r in results] == jobs
        assert max(seen) == 2  # never more distinct adapters in one step than allowed
        # A full queue refuses at once rather than growing without bound.
        engine.max_batch = 0  # a saturated node: nothing more is admitted
        waiting = [asyncio.create_task(run(backend, prompt="Hi", params=GREEDY)) for _ in range(6)]
        await eventually(lambda: engine.queue_depth == 6)
        with pytest.raises(Overloaded, match="6 requests are waiting"):
            await run(backend, prompt="Hello", params=GREEDY)
        engine.max_batch = 8  # room again: the queued requests are served
        with engine._cond:
            engine._cond.notify()
        done = await asyncio.gather(*waiting)
        assert all(r[2].finish_reason in ("length", "stop") for r in done)
    finally:
        await backend.stop()
