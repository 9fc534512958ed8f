"""The adapter pool (plugins/inference/pool.py): slots filled from safetensors on the loader thread
equal peft's LoRA for the same adapters, mixed ranks share a batch, a failed load leaves the pool
as it was, an adapter held by a request is never evicted, and 1,000 adapters cycle through 32
slots with every request answered by its own adapter."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from atoll.plugins.inference.contract import AdapterRejected, GenerateRequest, Overloaded
from atoll.plugins.inference.engine import Row
from atoll.plugins.inference.pool import BASE, LOADER_THREAD, AdapterPool, read_adapter
from atoll.plugins.inference.sampling import Sampler
from atoll.plugins.inference.textstream import TextStream
from support.local_node import GREEDY, reference, run, start_backend
from support.overlay import eventually
from support.tiny_models import build_tiny_model, make_adapter

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGETS = list(ALL)
PROMPT = [5, 17, 42, 99, 7, 3]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pool")
    base = build_tiny_model(root / "tiny-llama")
    ads = root / "adapters"
    make_adapter(base, ads / "r4/ad", seed=1, rank=4)
    make_adapter(base, ads / "r6/ad", seed=2, rank=6)
    make_adapter(base, ads / "r16-all/ad", seed=3, rank=16, targets=ALL)
    rs = make_adapter(base, ads / "rslora/ad", seed=4, rank=8, targets=("q_proj", "down_proj"))
    cfg = json.loads((rs / "adapter_config.json").read_text())
    cfg |= {"use_rslora": True, "alpha_pattern": {"down_proj": 3}}
    (rs / "adapter_config.json").write_text(json.dumps(cfg))
    # A good header over half its data: only reading the tensors finds out.
    cut = make_adapter(base, ads / "bad/truncated", seed=5, rank=8)
    weights = cut / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return {"base": base, "adapters": ads}


def peft_logits(base: Path, adapter: Path | None, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def make_pool(base: Path, slots: int) -> tuple[torch.nn.Module, AdapterPool]:
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    return model, AdapterPool(model, TARGETS, slots, max_rank=16, activate=lambda fn: fn())


def load(pool: AdapterPool, path: Path) -> int:
    slot = pool.take()
    pool.load(slot, lambda: read_adapter(path, torch.float32)).result(timeout=30)
    return slot


def pool_logits(model: torch.nn.Module, pool: AdapterPool, slots: list[int]) -> torch.Tensor:
    ids = torch.tensor([PROMPT] * len(slots))
    with torch.no_grad(), pool.rows(slots):
        return model(input_ids=ids).logits


def test_slots_equal_peft_with_mixed_ranks_eviction_and_reload(models):
    base, ads = models["base"], models["adapters"]
    names = ["r4/ad", "r6/ad", "r16-all/ad", "rslora/ad"]
    expected = {n: peft_logits(base, ads / n, torch.tensor([PROMPT]))[0] for n in names}
    plain = peft_logits(base, None, torch.tensor([PROMPT]))[0]
    model, pool = make_pool(base, slots=3)
    try:
        assert [load(pool, ads / n) for n in names[:2]] == [1, 2]
        assert pool.rank == 8  # rounded up to a power of two
        assert load(pool, ads / "r16-all/ad") == 3  # grows every layer to rank 16, 1-2 kept
        assert pool.rank == 16
        # One batch, four ranks (4, 6, 16, none), each row through its own adapter.
        out = pool_logits(model, pool, [1, 2, BASE, 3, 1])
        wants = [expected[names[0]], expected[names[1]], plain, expected[names[2]]]
        for row, want in zip(out[:4], wants, strict=True):
            torch.testing.assert_close(row, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out[4], expected["r4/ad"], rtol=1e-4, atol=1e-4)
        # Evict the rank-16 adapter (all seven modules): its slot takes one with two modules,
        # rsLoRA and an alpha pattern; nothing of the old adapter is left in the slot.
        pool.give_back(3)
        assert load(pool, ads / "rslora/ad") == 3
        pool.give_back(1)
        assert load(pool, ads / "r16-all/ad") == 1  # reloaded into another slot
        out = pool_logits(model, pool, [3, 1, 2])
        for row, name in zip(out, ["rslora/ad", "r16-all/ad", "r6/ad"], strict=True):
            torch.testing.assert_close(row, expected[name], rtol=1e-4, atol=1e-4)
    finally:
        pool.close()


def test_load_failing_half_way_leaves_the_pool_consistent(models):
    base, ads = models["base"], models["adapters"]
    model, pool = make_pool(base, slots=2)
    try:
        assert load(pool, ads / "r4/ad") == 1
        before = pool_logits(model, pool, [1, BASE])
        good = read_adapter(ads / "r6/ad", torch.float32)
        first = next(iter(good))
        bad = {first: good[first]} | {m: (a, b[:, :-1]) for m, (a, b) in good.items() if m != first}
        slot = pool.take()
        with pytest.raises(AdapterRejected, match=r"B \[\d+, 5\]"):  # copied the first, not more
            pool.load(slot, lambda: bad).result(timeout=30)
        assert pool.ranks[slot] == 0  # never ready, so no row reads the half-written slot
        with pytest.raises(AdapterRejected, match="damaged"):
            pool.load(slot, lambda: read_adapter(ads / "bad/truncated", torch.float32)).result()
        torch.testing.assert_close(pool_logits(model, pool, [1, BASE]), before)
        pool.give_back(slot)
        assert load(pool, ads / "r6/ad") == slot  # the slot is as good as new
        want = peft_logits(base, ads / "r6/ad", torch.tensor([PROMPT]))[0]
        torch.testing.assert_close(pool_logits(model, pool, [slot])[0], want, rtol=1e-4, atol=1e-4)
    finally:
        pool.close()


async def test_truncated_adapter_is_refused_clearly_and_service_goes_on(models, tmp_path):
    backend = await start_backend(models, tmp_path, adapter_cache=2)
    try:
        with pytest.raises(AdapterRejected, match=r"'bad/truncated' refused: .*damaged"):
            await run(backend, prompt="Hello", adapter="bad/truncated", params=GREEDY)
        assert backend.cache.pool.free == 2 and not backend.cache.entries
        ids, *_ = await run(backend, prompt="Hello", adapter="r4/ad", params=GREEDY)
        prompt = backend.tokenizer("Hello")["input_ids"]
        assert ids == reference(models["base"], models["adapters"] / "r4/ad", prompt, len(ids))
    finally:
        await backend.stop()


async def test_held_adapter_is_never_evicted_and_loads_stay_off_the_engine(models, tmp_path):
    backend = await start_backend(models, tmp_path, adapter_cache=2)
    writers: set[str] = set()
    write = backend.cache.pool.write

    def spy(slot, weights):
        writers.add(threading.current_thread().name)
        return write(slot, weights)

    backend.cache.pool.write = spy
    try:
        cache = backend.cache
        # Two requests hold both slots (as running rows do, from acquire to their end).
        held = [await cache.acquire(a) for a in ("r4/ad", "r6/ad")]
        slots = {k: e.slot for k, e in cache.entries.items()}
        # The third adapter waits for a slot instead of evicting a held one.
        third = asyncio.create_task(
            run(backend, prompt="Hello", adapter="rslora/ad", params=GREEDY)
        )
        await asyncio.sleep(0.3)
        assert not third.done() and {k: e.slot for k, e in cache.entries.items()} == slots
        cache.release(held[1])  # r6 is free to go; r4 stays held
        _, _, finish = await third
        assert finish.adapter == "rslora/ad"
        assert cache.entries["r4/ad"].slot == slots["r4/ad"] and "r6/ad" not in cache.entries
        cache.release(held[0])
        prompt = backend.tokenizer("Hello")["input_ids"]
        for name in ("r4/ad", "r6/ad", "rslora/ad"):
            ids, *_ = await run(backend, prompt="Hello", adapter=name, params=GREEDY)
            assert ids == reference(models["base"], models["adapters"] / name, prompt, len(ids))
        assert writers == {f"{LOADER_THREAD}_0"}
        assert backend.engine._thread.name not in writers
        # Pinned adapters filling the pool refuse at once (nothing would ever free a slot).
        for name in ("r4/ad", "r6/ad"):
            await backend.load_adapter(name)
            await backend.pin_adapter(name, True)
        with pytest.raises(Overloaded, match="pinned"):
            await run(backend, prompt="Hello", adapter="rslora/ad", params=GREEDY)
    finally:
        await backend.stop()


async def test_metrics_say_which_adapters_run_and_wait(models, tmp_path):
    backend = await start_backend(models, tmp_path, adapter_cache=2)
    try:

        def series(name: str) -> dict[str, float]:
            snap = backend.metrics.snapshot().get(name, {"series": []})
            return {s["labels"].get("adapter", ""): s["value"] for s in snap["series"]}

        long = GREEDY | {"max_new_tokens": 60, "ignore_eos": True}
        task = asyncio.create_task(run(backend, prompt="Hi", adapter="r4/ad", params=long))
        await eventually(lambda: series("lora_requests_running").get("r4/ad") == 1)
        assert series("lora_adapters_running") == {"": 1}
        await task
        await run(backend, prompt="Hi", adapter="r4/ad", params=GREEDY)
        assert series("lora_requests_running")["r4/ad"] == 0
        assert series("lora_requests_waiting")["r4/ad"] == 0
        assert series("lora_requests")["r4/ad"] == 2
        assert series("lora_tokens")["r4/ad"] >= 60
        assert series("adapter_cache_misses") == {"": 1} and series("adapter_cache_hits") == {"": 1}
        snap = backend.metrics.snapshot()
        assert snap["adapter_slot_load_seconds"]["series"][0]["count"] == 1
    finally:
        await backend.stop()


def random_adapter(out: Path, base: Path, shapes: dict[str, tuple[int, int]], seed: int) -> Path:
    """A rank-2..8 LoRA on q/v, written straight as peft lays it out (fast: no model load)."""
    gen = torch.Generator().manual_seed(seed)
    rank = 2 + seed % 7
    tensors = {}
    for module, (d_in, d_out) in shapes.items():
        key = f"base_model.model.{module}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(rank, d_in, generator=gen) * 0.3
        tensors[f"{key}.lora_B.weight"] = torch.randn(d_out, rank, generator=gen) * 0.3
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "base_model_name_or_path": str(base),
    }
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def merged_greedy(model: torch.nn.Module, path: Path, prompt: list[int], n: int) -> list[int]:
    """The adapter's greedy tokens with its delta merged into the weights: an independent path."""
    weights = read_adapter(path, torch.float32)
    modules = dict(model.named_modules())
    saved = {m: modules[m].weight.data.clone() for m in weights}
    try:
        for m, (a, b) in weights.items():
            modules[m].weight.data += b @ a
        ids = list(prompt)
        for _ in range(n):  # by hand: generate() would hold back EOS, which ignore_eos allows
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        return ids[len(prompt) :]
    finally:
        for m, w in saved.items():
            modules[m].weight.data = w


@pytest.mark.timeout(600)
async def test_a_thousand_adapters_cycle_through_32_slots(models, tmp_path):
    base = models["base"]
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    shapes = {
        n: (m.in_features, m.out_features)
        for n, m in model.named_modules()
        if n.endswith(("q_proj", "v_proj"))
    }
    root = models["adapters"] / "many"
    for i in range(1000):
        random_adapter(root / f"u{i}", base, shapes, seed=i)
    backend = await start_backend(models, tmp_path, adapter_cache=32, max_batch=16)
    try:
        gate = asyncio.Semaphore(16)
        tokens = 4

        async def one(i: int) -> list[int]:
            async with gate:
                params = GREEDY | {"max_new_tokens": tokens, "ignore_eos": True}
                ids, _, finish = await run(
                    backend, prompt="Hello", adapter=f"many/u{i}", params=params
                )
                assert finish.adapter == f"many/u{i}"
                return ids

        results = await asyncio.gather(*(one(i) for i in range(1000)))
        cache = backend.cache
        assert cache.loads.value == 1000 and cache.evictions.value == 1000 - 32
        assert len(cache.entries) == 32 and cache.pool.free == 0
        prompt = backend.tokenizer("Hello")["input_ids"]
        with torch.no_grad():
            for i in range(0, 1000, 9):  # every 9th (all ranks), against an independent path
                assert results[i] == merged_greedy(model, root / f"u{i}", prompt, tokens), i
        assert len({tuple(r) for r in results}) > 100  # they really differ
    finally:
        await backend.stop()


async def test_rows_wait_for_their_slot_without_holding_others_up(models, tmp_path):
    backend = await start_backend(models, tmp_path, adapter_cache=2)
    try:
        engine, pool = backend.engine, backend.cache.pool
        slot = pool.take()  # not ready yet: its load has not run
        events: list[object] = []
        params = GenerateRequest(prompt="x", params=GREEDY).params
        row = Row(
            prompt=backend.tokenizer("Hello")["input_ids"],
            slot=slot,
            sampler=Sampler(params),
            text=TextStream(backend.tokenizer, []),
            max_new=4,
            stop_ids=frozenset(),
            emit=events.append,
            model=backend.model_id,
            adapter_id="r4/ad",
        )
        engine.submit(row)
        # Requests behind it are served meanwhile; it is passed over without counting skips
        # (which would end in blocking everyone behind a row that cannot run yet).
        for _ in range(3):
            _, _, finish = await run(backend, prompt="Hello", params=GREEDY)
            assert finish.finish_reason == "length"
        assert not events and row.skipped == 0 and engine.queue_depth == 1
        path = models["adapters"] / "r4/ad"
        await asyncio.wrap_future(pool.load(slot, lambda: read_adapter(path, torch.float32)))
        await eventually(lambda: any(getattr(e, "type", "") == "finish" for e in events))
        ids = [e.token_id for e in events if getattr(e, "type", "") == "token"]
        assert ids == reference(models["base"], path, row.prompt, 4)
    finally:
        await backend.stop()
