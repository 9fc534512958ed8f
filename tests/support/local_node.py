"""A ``local`` inference backend over tiny models for tests: starting one whose adapters come from
a directory, running a request to its end, and the plain transformers/peft reference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from atoll.agent.metrics import MetricsRegistry
from atoll.plugins.inference.contract import GenerateRequest
from atoll.plugins.inference.local_backend import LocalBackend, LocalConfig
from atoll.plugins.storage.contract.adapters import AdapterNotFound


async def start_backend(models: dict[str, Path], tmp_path: Path, **config) -> LocalBackend:
    fetched: list[str] = []

    async def fetch(adapter_id: str, root: Path) -> Path:
        path = models["adapters"] / adapter_id
        if not path.is_dir():
            raise AdapterNotFound(f"no adapter {adapter_id}")
        fetched.append(adapter_id)
        return path

    options = {"model": str(models["base"]), "embeddings": False, "limits": {"max_rank": 16}}
    backend = LocalBackend(
        LocalConfig.model_validate(options | config), tmp_path, fetch, MetricsRegistry()
    )
    backend.fetched = fetched  # type: ignore[attr-defined]
    await backend.start()
    return backend


async def run(backend: LocalBackend, **request: Any) -> tuple[list[int], str, Any]:
    ids, text, finish = [], "", None
    async for event in backend.generate(GenerateRequest.model_validate(request)):
        if event.type == "token":
            text += event.text
            if event.token_id is not None:
                ids.append(event.token_id)
        else:
            finish = event
    return ids, text, finish


def reference(base: Path, adapter: Path | None, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens from plain transformers/peft ``generate``, one request alone."""
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).eval()
    ids = torch.tensor([prompt])
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
    )
    return out[0, len(prompt) :].tolist()


GREEDY = {"temperature": 0, "max_new_tokens": 12}
