"""Mixtures of adapters (linear, ties, dare, svd …) computed by peft, off the serving model.

peft's ``add_weighted_adapter`` is the reference for every merge strategy, so it does the merge,
but on a shadow: a module tree with the serving model's layer names and shapes whose base weights
are one expanded zero (no memory), built on the pool's loader thread. The merged matrices then go
into a pool slot like any adapter's; the serving model is never touched.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from atoll.plugins.inference.contract import AdapterRejected, Mixture
from atoll.plugins.inference.pool import LoraWeights

PEFT_ROOT = "base_model.model."


def merge(
    parts: list[Path], mixture: Mixture, shapes: dict[str, tuple[int, int]], dtype: torch.dtype
) -> LoraWeights:
    """The mixture's matrices by module path (B scaled), from its parts' directories."""
    from peft import LoraConfig, PeftModel
    from peft.tuners.lora import LoraLayer

    shadow = _shadow(shapes)
    config = LoraConfig.from_pretrained(str(parts[0]))
    config.task_type = None  # the shadow is no causal LM: peft's plain wrapper
    model = PeftModel.from_pretrained(shadow, parts[0], adapter_name="p0", config=config)
    for i, path in enumerate(parts[1:], 1):
        model.load_adapter(path, adapter_name=f"p{i}", is_trainable=False)
    # dare_* prune at random: seed from the mixture so one mixture is one adapter.
    seed = int.from_bytes(hashlib.sha256(mixture.key().encode()).digest()[:8], "big")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model.add_weighted_adapter(
                [f"p{i}" for i in range(len(parts))],
                [a.weight for a in mixture.adapters],
                "mix",
                combination_type=mixture.merge_strategy,
                density=mixture.density,
                majority_sign_method=mixture.majority_sign_method,
            )
        except (ValueError, RuntimeError) as exc:
            raise AdapterRejected(f"cannot merge these adapters: {exc}") from None
    weights: LoraWeights = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "mix" in module.lora_A:
            a: torch.Tensor = module.lora_A["mix"].weight.detach()  # type: ignore[operator]
            b: torch.Tensor = module.lora_B["mix"].weight.detach() * module.scaling["mix"]  # type: ignore[operator]
            weights[name.removeprefix(PEFT_ROOT)] = (a.to(dtype), b.to(dtype))
    return weights


def _shadow(shapes: dict[str, tuple[int, int]]) -> torch.nn.Module:
    root = torch.nn.Module()
    for path, (d_in, d_out) in shapes.items():
        node = root
        *parents, leaf = path.split(".")
        for part in parents:
            if not hasattr(node, part):
                node.add_module(part, torch.nn.Module())
            node = getattr(node, part)
        linear = torch.nn.Linear(1, 1, bias=False)
        linear.in_features, linear.out_features = d_in, d_out
        zero = torch.zeros(()).expand(d_out, d_in)  # shape only: peft reads it, never its data
        linear.weight = torch.nn.Parameter(zero, requires_grad=False)
        node.add_module(leaf, linear)
    return root
