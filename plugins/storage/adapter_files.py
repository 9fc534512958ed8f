"""An adapter upload's files on the storage agent: where each file is kept, and what the adapter
is (read from its files before anything is kept)."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open

from atoll.agent.transfer import sha256_file
from atoll.plugins.storage.contract.adapters import (
    COLLECTION_MANIFEST,
    COLLECTION_TENSORS,
    CONFIG_FILE,
    WEIGHTS_FILE,
    InvalidAdapter,
    unservable,
)


def adapter_key(adapter_id: str, name: str) -> str:
    return f"adapters/{adapter_id}/{name}"


def inspect_adapter(directory: Path) -> tuple[str, int, list[str]]:
    """(base model, rank, target modules) of the LoRA adapter in ``directory``; InvalidAdapter
    saying what is wrong otherwise. Blocking: run it in a thread."""
    try:
        config = json.loads((directory / CONFIG_FILE).read_text("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidAdapter(f"{CONFIG_FILE} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise InvalidAdapter(f"{CONFIG_FILE} must hold a JSON object")
    if problem := unservable(config):
        raise InvalidAdapter(f"{CONFIG_FILE}: {problem}; nothing was kept")
    base = config.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise InvalidAdapter(f"{CONFIG_FILE}: base_model_name_or_path is missing")
    rank = config.get("r")
    if type(rank) is not int or rank < 1:
        raise InvalidAdapter(f"{CONFIG_FILE}: r (the LoRA rank) must be a positive integer")
    targets = config.get("target_modules")
    if isinstance(targets, str):  # peft also takes one regex or "all-linear"
        targets = [targets]
    if (
        not isinstance(targets, list)
        or not targets
        or not all(isinstance(t, str) and t for t in targets)
    ):
        raise InvalidAdapter(f"{CONFIG_FILE}: target_modules must name the adapted modules")
    try:
        with safe_open(str(directory / WEIGHTS_FILE), framework="numpy") as fh:
            tensors = list(fh.keys())
    except SafetensorError as exc:
        raise InvalidAdapter(f"{WEIGHTS_FILE} is not a valid safetensors file: {exc}") from None
    if not any(".lora_A." in t for t in tensors) or not any(".lora_B." in t for t in tensors):
        raise InvalidAdapter(f"{WEIGHTS_FILE} holds no LoRA tensors (lora_A and lora_B)")
    return base, rank, targets


def inspect_collection(directory: Path) -> tuple[str, int, list[str], list[str]]:
    """(base model, rank, target modules, member ids) of the compressed collection in
    ``directory``, read from its manifest, whose sha256 of the tensors file must hold;
    InvalidAdapter otherwise. The node that loads it checks the tensors' shapes against its
    base. Blocking: run it in a thread."""
    try:
        manifest = json.loads((directory / COLLECTION_MANIFEST).read_text("utf-8"))
        base, rank = str(manifest["base_model"]), manifest["rank"]
        modules = sorted({str(m).rsplit(".", 1)[-1] for m in manifest["modules"]})
        members = [str(m["id"]) for m in manifest["members"]]
        digest = manifest["sha256"]
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise InvalidAdapter(f"{COLLECTION_MANIFEST} is not a collection manifest: {exc}") from None
    if not base or type(rank) is not int or rank < 1 or len(set(members)) < 2 or not modules:
        raise InvalidAdapter(f"{COLLECTION_MANIFEST}: base, rank, modules or members are wrong")
    if sha256_file(directory / COLLECTION_TENSORS).hexdigest() != digest:
        raise InvalidAdapter(f"{COLLECTION_TENSORS} does not match its manifest's sha256")
    return base, rank, modules, members
