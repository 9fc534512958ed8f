"""Multi-LoRA serving on the embedded model (SmolLM2-135M): what continuous batching over mixed
adapters buys, and how fast an adapter arrives over the data plane.

Figures, all from one run (anchors measured here, ratios judged):
- ``spread_vs_one``: tokens/s at concurrency 16 with requests spread over 64 distinct adapters,
  over the same with every request on one adapter (target >= 0.8);
- ``vs_naive_swapping``: the spread run's tokens/s over naive serving — one request at a time,
  ``set_adapter`` then ``generate`` (target >= 3);
- ``concurrency_16_vs_1``: tokens/s at concurrency 16 over concurrency 1, one adapter
  (target >= 4);
- ``cold_load_s``: a rank-16 adapter of the embedded model fetched from a storage agent over the
  overlay, validated and loaded, as the gateway's ``load_adapter`` call sees it (target <= 0.5).

Run: ``python bench/multilora.py [--quick]``. The converted model is cached under
``--model-cache`` (default ``~/.cache/atoll/models``): the first run converts it (~30 s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from atoll.agent.metrics import MetricsRegistry
from atoll.bench.harness import model_bench_args, run_main, setup_logging
from atoll.plugins.basemodels import model_id, resolve_model
from atoll.plugins.inference.contract import GenerateRequest
from atoll.plugins.inference.local_backend import LocalBackend, LocalConfig
from atoll.tuning import tune_process

PROMPTS = [
    "Write a short note about the weather in Paris.",
    "List three uses of a hammer.",
    "Explain what a LoRA adapter is in one sentence.",
    "Give me a name for a small grey cat.",
]
TARGETS = ("q_proj", "v_proj")


def write_adapter(
    out: Path, model_dir: Path, shapes: dict[str, tuple[int, int]], rank: int, seed: int
):
    """A random rank-``rank`` LoRA adapter for every q/v projection, as peft saves one."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (d_in, d_out) in shapes.items():
        if module.rsplit(".", 1)[-1] not in TARGETS:
            continue
        key = f"base_model.model.{module}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(rank, d_in, generator=gen) * 0.02
        tensors[f"{key}.lora_B.weight"] = torch.randn(d_out, rank, generator=gen) * 0.02
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(model_dir),
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": list(TARGETS),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


async def throughput(
    backend: LocalBackend,
    adapters: Sequence[str | None],
    concurrency: int,
    requests: int,
    tokens: int,
) -> dict[str, Any]:
    """Completion tokens per second for ``requests`` requests, ``concurrency`` at a time."""
    gate = asyncio.Semaphore(concurrency)
    produced = 0

    async def one(i: int) -> None:
        nonlocal produced
        request = GenerateRequest.model_validate(
            {
                "prompt": PROMPTS[i % len(PROMPTS)],
                "adapter": adapters[i % len(adapters)],
                "params": {"temperature": 0, "max_new_tokens": tokens, "ignore_eos": True},
            }
        )
        async with gate:
            async for event in backend.generate(request):
                if event.type == "finish":
                    produced += event.usage.completion_tokens

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(requests)))
    elapsed = time.perf_counter() - started
    return {
        "tokens": produced,
        "seconds": round(elapsed, 3),
        "tokens_per_s": round(produced / elapsed, 1),
    }


def naive(model_dir: Path, adapter_dirs: list[Path], requests: int, tokens: int) -> dict[str, Any]:
    """Serving without batching: each request alone, its adapter made active first."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(model, adapter_dirs[0], adapter_name="a0")
    for i, d in enumerate(adapter_dirs[1:], 1):
        peft_model.load_adapter(d, adapter_name=f"a{i}")
    produced = 0
    started = time.perf_counter()
    with torch.inference_mode():
        for i in range(requests):
            peft_model.set_adapter(f"a{i % len(adapter_dirs)}", inference_mode=True)
            ids = tokenizer(PROMPTS[i % len(PROMPTS)], return_tensors="pt")
            out = peft_model.generate(
                **ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False
            )
            produced += out.shape[1] - ids["input_ids"].shape[1]
    elapsed = time.perf_counter() - started
    return {
        "tokens": produced,
        "seconds": round(elapsed, 3),
        "tokens_per_s": round(produced / elapsed, 1),
    }


async def cold_load(work: Path, model_dir: Path, adapter: Path, repeats: int) -> dict[str, Any]:
    """Upload an adapter to a storage agent, then time ``load_adapter`` on an inference agent
    (fetch over the data plane + validation + peft load), ``repeats`` times with fresh ids."""
    from atoll.agent.contract import Client
    from atoll.agent.identity import AgentKeys
    from atoll.agent.runtime import AgentRuntime
    from atoll.broker.server import BrokerServer
    from atoll.plugins.inference.contract import LOAD_ADAPTER, AdapterRef
    from atoll.plugins.storage.contract.adapters import upload_adapter
    from atoll.tenancy.operator import OperatorStore

    op = OperatorStore(work / "operator")
    op.init()
    broker = await BrokerServer.from_data_dir(op.root).start("127.0.0.1", 0)
    runtimes: list[AgentRuntime] = []

    async def agent(name: str, roles: list[str], plugins: dict[str, Any]) -> AgentRuntime:
        keys = AgentKeys.issue(op, "default", name, roles)
        rt = await AgentRuntime.start(work / name, [broker.url], plugins, keys=keys)
        runtimes.append(rt)
        return rt

    try:
        await agent("store", ["storage"], {"storage": {}})
        local = {"model": str(model_dir), "embeddings": False, "adapter_cache": repeats + 1}
        await agent(
            "gpu", ["inference"], {"inference": {"local": local, "storage": "store/storage"}}
        )
        gw = await agent("gw", ["gateway"], {})
        node = Client(gw.agent, "gpu/inference", timeout=60)
        times = []
        for i in range(repeats):
            adapter_id = f"bench/cold-{i}"
            await upload_adapter(gw.agent, "store/storage", adapter, adapter_id, {})
            started = time.perf_counter()
            await node.invoke(LOAD_ADAPTER, AdapterRef(id=adapter_id))
            times.append(time.perf_counter() - started)
        size = (adapter / "adapter_model.safetensors").stat().st_size
        return {
            "median_s": round(statistics.median(times), 3),
            "runs_s": [round(t, 3) for t in times],
            "bytes": size,
        }
    finally:
        for rt in reversed(runtimes):
            await rt.stop()
        await broker.stop()


async def main(args: argparse.Namespace, profile_dir: Path | None) -> dict[str, Any]:
    quick = args.quick
    tokens = 16 if quick else 32
    requests = 32 if quick else 64
    cache = Path(args.model_cache).expanduser()
    model_dir = await asyncio.to_thread(resolve_model, "embedded", cache)
    with tempfile.TemporaryDirectory(prefix="atoll-multilora-") as tmp:
        work = Path(tmp)
        adapters_root = work / "adapters"
        fetch_dirs: dict[str, Path] = {}

        async def fetch(adapter_id: str, root: Path) -> Path:
            return fetch_dirs[adapter_id]

        config = LocalConfig.model_validate(
            {
                "model": str(model_dir),
                "embeddings": False,
                "max_batch": 16,
                "max_adapters_per_batch": 16,
                "adapter_cache": 80,
            }
        )
        backend = LocalBackend(config, work / "node", fetch, MetricsRegistry())
        await backend.start()
        try:
            shapes = backend.shapes
            ids = [f"user{i}/ad" for i in range(64)]
            for i, adapter_id in enumerate(ids):
                fetch_dirs[adapter_id] = write_adapter(
                    adapters_root / adapter_id, model_dir, shapes, rank=8, seed=i
                )
            for adapter_id in ids:  # loaded beforehand: these figures are about decoding
                await backend.load_adapter(adapter_id)
            await throughput(backend, [ids[0]], 4, 4, 4)  # warm-up
            random.Random(0).shuffle(ids)
            one = await throughput(backend, [ids[0]], 16, requests, tokens)
            spread = await throughput(backend, ids, 16, requests, tokens)
            single = await throughput(backend, [ids[0]], 1, max(4, requests // 8), tokens)
        finally:
            await backend.stop()
        naive_run = await asyncio.to_thread(
            naive, model_dir, [fetch_dirs[i] for i in ids[:16]], max(4, requests // 8), tokens
        )
        rank16 = write_adapter(work / "rank16", model_dir, shapes, rank=16, seed=99)
        cold = await cold_load(work, model_dir, rank16, 3 if quick else 5)
    return {
        "bench": "multilora",
        "model": model_id("embedded"),
        "cpu_threads": torch.get_num_threads(),
        "max_new_tokens": tokens,
        "requests": requests,
        "one_adapter_c16": one,
        "spread_64_adapters_c16": spread,
        "one_adapter_c1": single,
        "naive_set_adapter": naive_run,
        "cold_load": cold,
        "spread_vs_one": round(spread["tokens_per_s"] / one["tokens_per_s"], 3),
        "vs_naive_swapping": round(spread["tokens_per_s"] / naive_run["tokens_per_s"], 2),
        "concurrency_16_vs_1": round(one["tokens_per_s"] / single["tokens_per_s"], 2),
        "cold_load_s": cold["median_s"],
        "targets": {
            "spread_vs_one": ">= 0.8",
            "vs_naive_swapping": ">= 3",
            "concurrency_16_vs_1": ">= 4",
            "cold_load_s": "<= 0.5",
        },
    }


if __name__ == "__main__":
    setup_logging()
    tune_process()
    run_main(main, model_bench_args(__doc__.splitlines()[0], "smaller sizes (a smoke run)"))
