"""Thousands of adapters on the embedded model (SmolLM2-135M): throughput under cache churn, load
times, and how long loads hold decoding up.

Figures, all from one run (the anchor measured here, ratios judged); requests of 16, 27 or 38
tokens (27 on average with the default 32), staggered so that loads happen while other rows
decode:
- ``one_adapter``: tokens/s at concurrency 16, every request on one adapter (the anchor);
- ``spread_64_loaded``: round robin over 64 adapters loaded beforehand (a pool of 80 slots);
- ``round_robin_1000``: round robin over 1,000 stored adapters with the default pool (32 slots),
  so nearly every request loads its adapter and evicts another (target >= 0.8x the anchor);
- ``round_robin_10000``: round robin over 10,000 more stored ids on the same node (target >=
  0.5x). With as few requests as these, neither run asks for an id twice: both measure a load
  per request from the node's disk, the wider one with the 1,000 already in the node's books;
  what 10,000 changes is the bookkeeping, not the work per load;
- ``load_s``: a load as the request sees it (fetch + checks + copy into a slot until ready),
  median and p99, over the 1,000 run; ``slot_write_s``: the loader thread's read + copy alone
  (absent on code without a pool);
- ``decode_stall``: the longest time the engine spent between two forward passes while it had
  running rows and a load was in flight, against the median forward pass (target: the longest
  gap <= one step's time, i.e. ``stall_vs_step <= 1``);
- ``compressed_1000``: the same 1,000 ids round robin as one compressed collection
  (compression.py, each module's rank the smallest within the error budget
  ``--collection-error``, or one ``--collection-rank``) loaded on a node with the default pool:
  every row shares one projection per layer (target >= 0.9x the anchor); with the compression's
  time, the module ranks, bytes (the artefact, a member's share, the originals), the members'
  relative errors and their greedy agreement with the originals (served ``uncompressed`` by the
  same node; target >= 0.95 of tokens): ``SAMPLED`` members spread over the ids and the weight
  files, each answering all ``HELD_OUT`` prompts compressed and original, tokens compared
  position by position per answer, with a 95% interval over answers.
  Its 64 weight files are a family (mixes of 4 base LoRAs plus noise, as fine-tunes of one
  base share structure); random ones share none, and no rank below their sum keeps them.

The 1,000 adapters are distinct ids over 64 distinct weight files (fetch maps id i to file
i % 64): every id is validated, read and copied on its own, only the disk footprint is shared.

Run: ``python bench/adapters.py [--quick]`` (torch threads: ``--threads``, default 2). The
converted model is cached under ``--model-cache`` (the first run converts it, ~30 s).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from atoll.agent.metrics import MetricsRegistry
from atoll.bench.harness import run_main, setup_logging
from atoll.bench.multilora import PROMPTS, TARGETS, write_adapter
from atoll.plugins.basemodels import model_id, resolve_model
from atoll.plugins.inference.compression import (
    MAX_ERROR,
    agreement,
    compress,
    member_bytes,
    module_ranks,
    sha256,
    write_collection,
)
from atoll.plugins.inference.contract import GenerateRequest
from atoll.plugins.inference.local_backend import LocalBackend, LocalConfig
from atoll.plugins.inference.pool import read_adapter
from atoll.tuning import tune_process

WEIGHT_FILES = 64
RANK = 8
# The compressed members' held-out prompts (none of them in the throughput runs' PROMPTS): each
# sampled member answers every one, compressed and original.
HELD_OUT = (
    "Describe a sunrise over the mountains.",
    "What should I pack for a week of hiking?",
    "Give two tips for writing clear emails.",
    "Why is the sky blue?",
    "Write a haiku about the sea.",
    "What is the capital of Italy?",
    "Explain recursion to a child.",
    "def fibonacci(n):",
    "How do plants make food?",
    "Name a good book for a long train ride.",
    "What is the difference between weather and climate?",
    "Tell me a fun fact about octopuses.",
)
SAMPLED = 16  # members whose agreement is measured, spread over the 1,000 ids


def write_family(
    root: Path, model_dir: Path, shapes: dict[str, tuple[int, int]], count: int, seed: int = 0
) -> list[Path]:
    """``count`` rank-RANK adapters on q/v projections, each a random mix of 4 base LoRAs per
    module plus 1% noise, large enough to change greedy answers."""
    gen = torch.Generator().manual_seed(seed)
    spaces = {
        m: (torch.randn(4, d_in, generator=gen) * 0.05, torch.randn(d_out, 4, generator=gen) * 0.05)
        for m, (d_in, d_out) in shapes.items()
        if m.rsplit(".", 1)[-1] in TARGETS
    }
    paths = []
    for i in range(count):
        out = write_adapter(root / f"f{i}", model_dir, shapes, RANK, seed)  # config and keys
        tensors = {}
        for m, (a0, b0) in spaces.items():
            a = torch.randn(RANK, 4, generator=gen) / 2 @ a0
            b = b0 @ torch.randn(4, RANK, generator=gen) / 2
            key = f"base_model.model.{m}"
            for kind, t in (("A", a), ("B", b)):
                noise = 0.01 * t.std() * torch.randn(t.shape, generator=gen)
                tensors[f"{key}.lora_{kind}.weight"] = t + noise
        save_file(tensors, str(out / "adapter_model.safetensors"))
        paths.append(out)
    return paths


def compress_family(
    files: list[Path], ids: list[str], out: Path, base: str, rank: int | None, max_error: float
) -> Any:
    """One collection of ``ids``, id i being file i % len(files) (as ``fetch`` maps them): the
    distinct files are compressed (at ``rank``, else within the error budget ``max_error``),
    each id gets its file's core."""
    factors = {str(i): read_adapter(f, torch.float64) for i, f in enumerate(files)}
    made = compress(factors, rank, max_error=None if rank else max_error)
    n = len(files)
    made.members = ids
    made.cores = {m: c[[i % n for i in range(len(ids))]] for m, c in made.cores.items()}
    made.errors = [made.errors[i % n] for i in range(len(ids))]
    digests = [sha256(f / "adapter_model.safetensors") for f in files]
    sources = {mid: digests[i % n] for i, mid in enumerate(ids)}
    return write_collection(out, "bench", base, made, sources)


async def greedy(
    backend: LocalBackend, adapter: str | None, tokens: int, **options: Any
) -> list[list[int]]:
    """Greedy tokens for each held-out prompt (one list per prompt), all prompts at once."""

    async def one(prompt: str) -> list[int]:
        request = GenerateRequest.model_validate(
            {
                "prompt": prompt,
                "adapter": adapter,
                "params": {"temperature": 0, "max_new_tokens": tokens, "ignore_eos": True},
            }
            | options
        )
        ids = []
        async for event in backend.generate(request):
            if event.type == "token" and event.token_id is not None:
                ids.append(event.token_id)
        return ids

    return list(await asyncio.gather(*(one(p) for p in HELD_OUT)))


def agreement_figures(ours: list[list[int]], theirs: list[list[int]]) -> dict[str, Any]:
    """The share of greedy tokens equal position by position over all answers, a 95% interval
    for it over answers (normal approximation: answers are the independent draws, a token's
    fate hangs on its answer's first divergence), and the share of answers identical."""
    shares = [agreement([a], [b]) for a, b in zip(ours, theirs, strict=True)]
    same = sum(a == b for a, b in zip(ours, theirs, strict=True))
    mean = agreement(ours, theirs)
    half = 1.96 * statistics.stdev(shares) / len(shares) ** 0.5 if len(shares) > 1 else 0.0
    return {
        "greedy_agreement": round(mean, 4),
        "greedy_agreement_ci95": [round(max(0.0, mean - half), 4), round(min(1.0, mean + half), 4)],
        "answers_identical": round(same / len(ours), 4),
        "answers": len(ours),
    }


async def throughput(
    backend: LocalBackend, adapters: list[str], concurrency: int, requests: int, tokens: int
) -> dict[str, Any]:
    """Completion tokens/s for ``requests`` requests, ``concurrency`` at a time, of ``tokens``
    tokens give or take: lengths staggered (``tokens // 2`` plus 0, 11 or 22 for the default 32)
    so that requests end, and new ones load their adapters, while others decode."""
    gate = asyncio.Semaphore(concurrency)
    produced = 0

    async def one(i: int) -> None:
        nonlocal produced
        request = GenerateRequest.model_validate(
            {
                "prompt": PROMPTS[i % len(PROMPTS)],
                "adapter": adapters[i % len(adapters)],
                "params": {
                    "temperature": 0,
                    "max_new_tokens": tokens // 2 + (i * 11) % (tokens + 1),
                    "ignore_eos": True,
                },
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


class Probe:
    """Wraps a backend's engine and cache to time forward passes, gaps and loads."""

    def __init__(self, backend: LocalBackend) -> None:
        engine, cache = backend.engine, backend.cache
        assert engine is not None and cache is not None
        self.forwards: list[float] = []  # seconds per forward pass
        self.gaps: list[tuple[float, float]] = []  # (start, end) between passes, rows waiting
        self.loads: list[tuple[float, float]] = []  # (start, end) of each load in flight
        self.writes: list[float] = []  # loader thread: read + copy, where there is a pool
        self._last_end: float | None = None
        forward, load_new = engine._forward, cache._load_new

        def timed_forward(inputs: Any, rows: Any, every_position: bool = False) -> Any:
            start = time.perf_counter()
            if engine.batch is not None and self._last_end is not None:
                self.gaps.append((self._last_end, start))
            try:
                return forward(inputs, rows, every_position)
            finally:
                self._last_end = time.perf_counter()
                self.forwards.append(self._last_end - start)

        async def timed_load(adapter_id: str) -> Any:
            start = time.perf_counter()
            try:
                return await load_new(adapter_id)
            finally:
                self.loads.append((start, time.perf_counter()))

        engine._forward = timed_forward  # type: ignore[method-assign]
        cache._load_new = timed_load  # type: ignore[method-assign]
        pool = getattr(cache, "pool", None)
        if pool is not None:
            write = pool.write

            @functools.wraps(write)
            def timed_write(slot: int, weights: Any) -> int:
                start = time.perf_counter()
                try:
                    return write(slot, weights)
                finally:
                    self.writes.append(time.perf_counter() - start)

            pool.write = timed_write

    def reset(self) -> None:
        self.forwards.clear()
        self.gaps.clear()
        self.loads.clear()
        self.writes.clear()
        self._last_end = None

    def stall(self) -> dict[str, Any]:
        during = [
            end - start
            for start, end in self.gaps
            if any(ls < end and start < le for ls, le in self.loads)
        ]
        step = statistics.median(self.forwards) if self.forwards else 0.0
        longest = max(during, default=0.0)
        return {
            "longest_gap_during_loads_s": round(longest, 4),
            "median_step_s": round(step, 4),
            "stall_vs_step": round(longest / step, 2) if step else None,
            "gaps_during_loads": len(during),
        }


def quantiles(samples: list[float]) -> dict[str, Any]:
    if not samples:
        return {"n": 0}
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {
        "n": len(ordered),
        "median": round(statistics.median(ordered), 4),
        "p99": round(p99, 4),
        "max": round(ordered[-1], 4),
    }


async def main(args: argparse.Namespace, profile_dir: Path | None) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    quick = args.quick
    tokens = 16 if quick else 32
    requests = 48 if quick else 96
    stored = 1000
    model_dir = await asyncio.to_thread(resolve_model, "embedded", Path(args.model_cache))
    with tempfile.TemporaryDirectory(prefix="atoll-adapters-") as tmp:
        work = Path(tmp)
        files: list[Path] = []

        async def fetch(adapter_id: str, root: Path) -> Path:
            return files[int(adapter_id.removeprefix("user").split("/")[0]) % WEIGHT_FILES]

        async def backend(cache: int, collections: tuple[str, ...] = ()) -> LocalBackend:
            config = LocalConfig.model_validate(
                {
                    "model": str(model_dir),
                    "embeddings": False,
                    "max_batch": 16,
                    "max_adapters_per_batch": 16,
                    "adapter_cache": cache,
                    "collections": list(collections),
                }
            )
            where = work / f"node{cache}{'c' if collections else ''}"
            node = LocalBackend(config, where, fetch, MetricsRegistry())
            await node.start()
            return node

        ids = [f"user{i}/ad" for i in range(stored)]
        default = await backend(LocalConfig.model_fields["adapter_cache"].default)
        shapes = default.shapes
        try:
            for i in range(WEIGHT_FILES):
                files.append(write_adapter(work / f"w{i}", model_dir, default.shapes, RANK, i))
            probe = Probe(default)
            await throughput(default, [ids[0]], 4, 4, 4)  # warm-up
            one = await throughput(default, [ids[0]], 16, requests, tokens)
            probe.reset()
            churn = await throughput(default, ids, 16, requests, tokens)
            loads = [end - start for start, end in probe.loads]
            writes = list(probe.writes)
            stall = probe.stall()
            # 10,000 ids the node has never seen, on the same warm node: the registry of
            # what it fetched and its disk tier hold the 1,000 above besides (see the docstring)
            wider = await throughput(default, [f"user{i}/ad" for i in range(1000, 11000)], 16,
                                     requests, tokens)  # fmt: skip
        finally:
            await default.stop()
        wide = await backend(80)
        try:
            for adapter_id in ids[:64]:
                await wide.load_adapter(adapter_id)
            await throughput(wide, [ids[0]], 4, 4, 4)  # warm-up
            spread = await throughput(wide, ids[:64], 16, requests, tokens)
        finally:
            await wide.stop()
        files[:] = write_family(work / "family", model_dir, shapes, WEIGHT_FILES)
        started = time.perf_counter()
        manifest = await asyncio.to_thread(
            compress_family, files, ids, work / "bench", str(model_dir),
            args.collection_rank, args.collection_error,
        )  # fmt: skip
        compress_s = time.perf_counter() - started
        packed = await backend(32, (str(work / "bench"),))
        try:
            await throughput(packed, [ids[0]], 4, 4, 4)  # warm-up
            compressed = await throughput(packed, ids, 16, requests, tokens)
            # Members spread over the ids and over the distinct files (a stride coprime to 64).
            sample = [ids[(i * 61) % stored] for i in range(SAMPLED)]
            ours: list[list[int]] = []
            theirs: list[list[int]] = []
            for adapter in sample:
                ours += await greedy(packed, adapter, tokens)
                theirs += await greedy(packed, adapter, tokens, uncompressed=True)
            base = await greedy(packed, None, tokens)
        finally:
            await packed.stop()
        errors = [m["error"] for m in manifest["members"]]
        ranks = module_ranks(manifest)
        original = sum((f / "adapter_model.safetensors").stat().st_size for f in files)
        compressed |= {
            "rank": args.collection_rank,
            "max_error": manifest["max_error"],
            "module_ranks": {
                "min": min(ranks),
                "median": statistics.median(ranks),
                "max": max(ranks),
            },
            "compress_s": round(compress_s, 1),
            "artefact_bytes": manifest["bytes"],
            "member_bytes": member_bytes(manifest["bytes"], ranks, stored),
            "original_bytes": original * stored // WEIGHT_FILES,
            "original_member_bytes": original // WEIGHT_FILES,
            "relative_error": {"median": round(statistics.median(errors), 4), "max": max(errors)},
            "sampled_members": SAMPLED,
            "held_out_prompts": len(HELD_OUT),
            **agreement_figures(ours, theirs),
            "originals_vs_base_agreement": round(agreement(theirs[: len(HELD_OUT)], base), 4),
        }
    return {
        "bench": "adapters",
        "model": model_id("embedded"),
        "torch_threads": torch.get_num_threads(),
        "max_new_tokens": tokens,
        "requests": requests,
        "stored_adapters": stored,
        "rank": RANK,
        "one_adapter": one,
        "spread_64_loaded": spread,
        "round_robin_1000": churn,
        "round_robin_10000": wider,
        "load_s": quantiles(loads),
        "slot_write_s": quantiles(writes) if writes else None,
        "decode_stall": stall,
        "spread_64_vs_one": round(spread["tokens_per_s"] / one["tokens_per_s"], 3),
        "round_robin_1000_vs_one": round(churn["tokens_per_s"] / one["tokens_per_s"], 3),
        "round_robin_10000_vs_one": round(wider["tokens_per_s"] / one["tokens_per_s"], 3),
        "compressed_1000": compressed,
        "compressed_1000_vs_one": round(compressed["tokens_per_s"] / one["tokens_per_s"], 3),
        "targets": {
            "round_robin_1000_vs_one": ">= 0.8",
            "round_robin_10000_vs_one": ">= 0.5",
            "decode_stall.stall_vs_step": "<= 1",
            "compressed_1000_vs_one": ">= 0.9",
            "compressed_1000.greedy_agreement": ">= 0.95",
        },
    }


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="48 requests of 16 tokens (a smoke run)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument(
        "--collection-error",
        type=float,
        default=MAX_ERROR,
        help="the compressed run's error budget (each module's rank chosen to meet it)",
    )
    p.add_argument(
        "--collection-rank", type=int, help="one shared rank instead of the error budget"
    )
    p.add_argument(
        "--model-cache",
        default=os.environ.get("ATOLL_MODEL_CACHE", str(Path("~/.cache/atoll/models"))),
    )
    p.add_argument("--profile-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.model_cache = str(Path(args.model_cache).expanduser())
    return args


if __name__ == "__main__":
    setup_logging()
    tune_process()
    run_main(main, parse_args())
