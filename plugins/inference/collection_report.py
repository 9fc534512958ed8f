"""A compressed collection's report per member, measured where the compression ran: greedy
tokens on held-out prompts through the member's core against its original adapter, both
through the same pool and collection hooks a node serves with (pool.py, collections.py).

Greedy decoding here is the plain loop without a cache (the report runs once, on a few short
prompts); the node's engine gives the same tokens (tests/inference/test_inference_compression.py
checks it through a real node).
"""

from __future__ import annotations

import concurrent.futures
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from atoll.plugins.inference.collections import CollectionSlots
from atoll.plugins.inference.compression import agreement, read_collection, read_manifest
from atoll.plugins.inference.pool import BASE, AdapterPool, describe_shapes, read_adapter

HELD_OUT = (
    "Summarise the following note in one sentence:",
    "Translate to French: the weather is nice today.",
    "Write a haiku about the sea.",
    "What is the capital of Italy?",
    "List three uses of a paperclip.",
    "Explain recursion to a child.",
    "Give a title for a story about a lost key.",
    "def fibonacci(n):",
)


def _now(fn: Callable[[], Any]) -> concurrent.futures.Future:
    """``activate`` without an engine: this thread is the only one running the model."""
    fut: concurrent.futures.Future = concurrent.futures.Future()
    fut.set_result(fn())
    return fut


def greedy_agreement(
    base: Path,
    adapters: dict[str, Path],
    artefact: Path,
    prompts: tuple[str, ...] | list[str] = HELD_OUT,
    tokens: int = 16,
) -> dict[str, float]:
    """Per member: the share of greedy tokens its core and its original adapter agree on."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base).eval()
    tokenizer = AutoTokenizer.from_pretrained(base)
    shapes = describe_shapes(model)
    targets = sorted({m.rsplit(".", 1)[-1] for m in read_manifest(artefact)["modules"]})
    pool = AdapterPool(model, targets, 1, max_rank=1 << 16, activate=_now)
    slots = CollectionSlots(model, set(pool.layers), activate=_now, on_loader=pool.on_loader)
    try:
        loaded = slots.load(lambda: read_collection(artefact, shapes, 1 << 16, pool.dtype)).result()
        encoded = [tokenizer(p)["input_ids"] for p in prompts]
        report = {}
        for member, path in adapters.items():
            slot = pool.take()
            pool.load(slot, functools.partial(read_adapter, path, pool.dtype)).result()
            core = (loaded.weights.name, loaded.index[member])
            ours = [_greedy(model, pool, slots, ids, BASE, core, tokens) for ids in encoded]
            theirs = [_greedy(model, pool, slots, ids, slot, None, tokens) for ids in encoded]
            report[member] = agreement(ours, theirs)
            pool.give_back(slot)
        return report
    finally:
        pool.close()


@torch.no_grad()
def _greedy(
    model: Any,
    pool: AdapterPool,
    slots: CollectionSlots,
    prompt: list[int],
    slot: int,
    core: tuple[str, int] | None,
    tokens: int,
) -> list[int]:
    ids = list(prompt)
    for _ in range(tokens):
        with pool.rows([slot]), slots.rows([core]):
            logits = model(input_ids=torch.tensor([ids], device=pool.device)).logits
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt) :]
