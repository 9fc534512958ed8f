"""What a node checks of a LoRA adapter before it touches the model: peft type, base model,
rank, target modules, tensor names and shapes read from the safetensors header alone, against
this node's limits; and the file names and tensor-key layout peft writes."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from safetensors import safe_open

from atoll.plugins.inference.contract import AdapterInfo, AdapterRejected
from atoll.plugins.storage.contract.adapters import unservable

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."


class AdapterLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt limit must not be silently ignored

    max_rank: int = Field(default=64, ge=1)
    # Module names (last path component) an adapter may target.
    allowed_targets: list[str] = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    max_bytes: int = Field(default=1 << 30, ge=1)
    check_base_name: bool = True  # the adapter's base_model_name_or_path must name our base


def validate_adapter(
    path: Path,
    adapter_id: str,
    base_model: str,
    shapes: dict[str, tuple[int, int]],
    limits: AdapterLimits,
    aliases: tuple[str, ...] = (),
) -> AdapterInfo:
    """Check an adapter directory against this base model (also known by ``aliases``, e.g. the
    directory it was loaded from); AdapterRejected says why not."""

    def refuse(why: str) -> AdapterRejected:
        return AdapterRejected(f"adapter {adapter_id!r} refused: {why}")

    try:
        config = json.loads((path / CONFIG).read_text())
    except FileNotFoundError:
        raise refuse(f"no {CONFIG}") from None
    except (OSError, ValueError) as exc:
        raise refuse(f"{CONFIG} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise refuse(f"{CONFIG} must hold a JSON object")
    if problem := unservable(config):
        raise refuse(problem)
    base_name = str(config.get("base_model_name_or_path") or "")
    names = (base_model, *aliases)
    if limits.check_base_name and base_name and not any(same_model(base_name, n) for n in names):
        raise refuse(f"trained for base model {base_name!r}, this node serves {base_model!r}")
    ranks = [config.get("r", 0), *(config.get("rank_pattern") or {}).values()]
    if max(ranks) > limits.max_rank:
        raise refuse(f"rank {max(ranks)} is over this node's limit of {limits.max_rank}")
    weights = path / WEIGHTS
    if not weights.is_file():
        raise refuse(f"no {WEIGHTS} (only safetensors adapters are loaded)")
    size = weights.stat().st_size
    if size > limits.max_bytes:
        raise refuse(f"{size} bytes is over this node's limit of {limits.max_bytes}")
    targets: set[str] = set()
    try:
        with safe_open(str(weights), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                module, kind = split_key(key)
                if module is None:
                    raise refuse(f"unexpected tensor {key!r}")
                name = module.rsplit(".", 1)[-1]
                if name not in limits.allowed_targets:
                    raise refuse(f"targets {name!r}; allowed: {', '.join(limits.allowed_targets)}")
                if module not in shapes:
                    raise refuse(f"targets {module!r}, which this base model does not have")
                rows, cols = fh.get_slice(key).get_shape()
                d_in, d_out = shapes[module]
                if (kind == "A" and cols != d_in) or (kind == "B" and rows != d_out):
                    raise refuse(
                        f"{key} has shape {[rows, cols]}, which does not fit this base model's "
                        f"{module} ({d_in} -> {d_out}): it was trained for another base"
                    )
                if min(rows, cols) > limits.max_rank:
                    raise refuse(f"{key} has rank {min(rows, cols)}, over {limits.max_rank}")
                targets.add(name)
    except AdapterRejected:
        raise
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise refuse(f"{WEIGHTS} is damaged ({exc})") from None
    if not targets:
        raise refuse(f"{WEIGHTS} holds no LoRA weights")
    return AdapterInfo(
        id=adapter_id,
        base_model=base_model,
        rank=max(ranks),
        target_modules=sorted(targets),
        size_bytes=size,
        loaded=False,
    )


def same_model(a: str, b: str) -> bool:
    """Whether two model references name the same model (a hub id, a path or a bare name)."""
    return Path(a.rstrip("/")).name.lower() == Path(b.rstrip("/")).name.lower()


def split_key(key: str) -> tuple[str | None, str]:
    for kind in ("A", "B"):
        suffix = f".lora_{kind}.weight"
        if key.endswith(suffix):
            module = key[: -len(suffix)]
            return module.removeprefix(PEFT_PREFIX), kind
    return None, ""
