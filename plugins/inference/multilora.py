"""Each row of a batch through its own LoRA adapter, with two batched matmuls per layer.

peft's ``adapter_names`` path loops over the distinct adapters of a batch in every LoRA layer (an
index, two small matmuls and a scatter each), so a step with 16 adapters costs far more than a
step with one. Here, as in punica's BGMV kernels, the adapters present in a step are stacked per
layer ([adapters, rank, in] and [adapters, out, rank], padded to the largest rank, scaling folded
in) and every row gathers its own pair: the cost no longer depends on how many distinct adapters
share the step. peft still loads, merges and deletes adapters; its own LoRA application is
switched off, and a forward hook on each LoRA layer adds the rows' deltas to the base output.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch

BASE = "__base__"  # a row without adapter
KEEP_STACKS = 2  # per layer: the running batch's adapters and those of rows joining it


class BatchedLora:
    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self._hooked: set[int] = set()
        self._stacks: dict[
            int, OrderedDict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]]
        ] = {}
        self._adapters: tuple[str, ...] = ()  # distinct adapters of the current step
        self._index: torch.Tensor | None = None  # per row: 0 = base, i = adapters[i - 1]

    def refresh(self) -> None:
        """After adapters were loaded, merged or deleted: hook new LoRA layers, keep peft's own
        application off, and drop stacks built from the old weights."""
        from peft.tuners.lora import LoraLayer

        for module in self.model.modules():
            if isinstance(module, LoraLayer):
                module.enable_adapters(False)
                if id(module) not in self._hooked:
                    module.register_forward_hook(self._hook)
                    self._hooked.add(id(module))
        self._stacks.clear()

    @contextlib.contextmanager
    def rows(self, names: list[str]) -> Iterator[None]:
        """Run one forward pass with row ``i`` through adapter ``names[i]`` (or BASE)."""
        adapters = tuple(sorted(set(names) - {BASE}))
        slot = {name: i for i, name in enumerate(adapters, 1)}
        self._adapters = adapters
        self._index = torch.tensor([slot.get(n, 0) for n in names])
        try:
            yield
        finally:
            self._adapters, self._index = (), None

    def _hook(self, module: Any, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        if not self._adapters or self._index is None:
            return output
        a, b = self._stack(module)
        x = args[0].to(a.dtype)
        index = self._index.to(x.device)
        # [rows, tokens, in] x [rows, in, rank] -> [rows, tokens, rank] x [rows, rank, out]
        low = torch.bmm(x, a[index].transpose(1, 2))
        return output + torch.bmm(low, b[index].transpose(1, 2)).to(output.dtype)

    def _stack(self, module: Any) -> tuple[torch.Tensor, torch.Tensor]:
        stacks = self._stacks.setdefault(id(module), OrderedDict())
        cached = stacks.get(self._adapters)
        if cached is not None:
            stacks.move_to_end(self._adapters)
            return cached
        base = module.get_base_layer()
        d_in, d_out = base.in_features, base.out_features
        present = [n for n in self._adapters if n in module.lora_A]
        rank = max((module.lora_A[n].weight.shape[0] for n in present), default=1)
        weight = module.lora_A[present[0]].weight if present else base.weight
        a = torch.zeros(
            len(self._adapters) + 1, rank, d_in, dtype=weight.dtype, device=weight.device
        )
        b = torch.zeros(
            len(self._adapters) + 1, d_out, rank, dtype=weight.dtype, device=weight.device
        )
        for i, name in enumerate(self._adapters, 1):
            if name in present:
                r = module.lora_A[name].weight.shape[0]
                a[i, :r] = module.lora_A[name].weight
                b[i, :, :r] = module.lora_B[name].weight * module.scaling[name]
        stacks[self._adapters] = (a, b)
        if len(stacks) > KEEP_STACKS:
            stacks.popitem(last=False)
        return a, b
