"""The adapter pool: LoRA weights in slots Atoll owns, each row of a batch through its own slot.

Per LoRA-capable linear layer the pool holds two tensors, ``A [slots + 1, R, in]`` and
``B [slots + 1, out, R]`` (scaling folded into B; slot 0 stays zero and serves rows without an
adapter). ``R`` is one pool-wide rank capacity: the largest rank loaded so far rounded up to a
power of two (at most the node's rank limit), so a rank-4 and a rank-16 adapter share one batch,
each zero-padded. A layer's tensors are allocated when the first adapter targets it, and
reallocated (copied) when a larger rank arrives — both rare, both on the loader thread.

Loading is: read the safetensors, zero the slot in every allocated layer, copy the adapter's
matrices in. Its cost does not depend on how many adapters are loaded (no module surgery, no
walk over the model), and it runs on the pool's loader thread, never on the engine's. A forward
hook on each layer adds ``x @ A[slot]^T @ B[slot]^T`` for every row (gather + two batched
matmuls, as punica's BGMV), sliced to the largest rank among the step's rows.

Synchronisation: the loader only writes slots that no row uses (a free slot, or one whose
adapter was evicted with no request holding it); it then asks the engine to mark the slot ready
(``activate``), which the engine does between steps. Readiness is the slot's rank in ``ranks``:
0 means not ready. Tensors are swapped (growth) by assigning one tuple, so a hook sees either the
old pair or the new one, both holding every ready slot.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from atoll.plugins.inference.adapter_checks import CONFIG, WEIGHTS, split_key
from atoll.plugins.inference.contract import AdapterRejected

BASE = 0  # the slot of rows without an adapter
MIN_RANK = 8  # the smallest rank capacity: growth from 1 to 8 buys nothing
LOADER_THREAD = "atoll-adapter-loader"

# Per module path: A [rank, in] and B [out, rank] with the adapter's scaling folded into B.
LoraWeights = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class SlotLayer:
    d_in: int
    d_out: int
    weights: tuple[torch.Tensor, torch.Tensor] | None = None  # (A, B), None until targeted


class AdapterPool:
    def __init__(
        self,
        model: torch.nn.Module,
        targets: list[str],
        slots: int,
        max_rank: int,
        activate: Callable[[Callable[[], None]], Any],
    ) -> None:
        """``targets``: the layer names (last path component) adapters may target;
        ``activate(fn)`` runs ``fn`` on the engine thread between steps."""
        self.slots = slots
        self.max_rank = max_rank
        self.rank = 0  # the rank capacity R of every allocated layer
        self._activate = activate
        self.layers: dict[str, SlotLayer] = {}
        first = next(model.parameters())
        self.dtype, self.device = first.dtype, first.device
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
                layer = SlotLayer(module.in_features, module.out_features)
                self.layers[name] = layer
                module.register_forward_hook(self._hook(layer))
        self.ranks = [0] * (slots + 1)  # per slot: its adapter's rank once ready, else 0
        self._lives = [0] * (slots + 1)  # per slot: bumped when freed, so a late flip is void
        self._free = list(range(slots, 0, -1))
        self._loader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=LOADER_THREAD)
        self._index: torch.Tensor | None = None  # per row of the current step: its slot
        self._step_rank = 0  # the largest rank among the current step's slots

    # --- slots (the asyncio side: the adapter cache) -----------------------------------------

    @property
    def free(self) -> int:
        return len(self._free)

    def take(self) -> int:
        """A free slot (the caller made room first)."""
        return self._free.pop()

    def give_back(self, slot: int) -> None:
        """Free a slot no request holds. Unready at once: no row of a running step indexes it
        (a cancelled row reads slot 0, see engine.py), so this needs no engine round trip."""
        self.ranks[slot] = 0
        self._lives[slot] += 1
        self._free.append(slot)

    def load(self, slot: int, read: Callable[[], LoraWeights]) -> concurrent.futures.Future:
        """On the loader thread: ``read()`` the weights, write them into ``slot``, then queue
        the engine command that marks it ready. The future resolves once that command is queued
        (or with the error; the slot is then still the caller's, not ready, to give back): a row
        submitted after it finds the slot ready, or passed over until the engine's next command
        run — no wait for a round trip through the engine."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        life = self._lives[slot]

        def run() -> None:
            try:
                rank = self.write(slot, read())

                def ready() -> None:
                    if self._lives[slot] == life:  # not freed (cancelled, evicted) meanwhile
                        self.ranks[slot] = rank

                self._activate(ready)
            except BaseException as exc:  # a damaged file, or the engine is stopping
                done.set_exception(exc)
                return
            done.set_result(None)

        self._loader.submit(run)
        return done

    def on_loader(self, fn: Callable[[], None]) -> concurrent.futures.Future:
        """Run ``fn`` on the loader thread (compressed collections load there too)."""
        return self._loader.submit(fn)

    def close(self) -> None:
        self._loader.shutdown(wait=True, cancel_futures=True)

    # --- the loader thread -------------------------------------------------------------------

    def write(self, slot: int, weights: LoraWeights) -> int:
        """Copy an adapter into ``slot`` (not ready, used by no row); returns its rank."""
        unknown = sorted(set(weights) - set(self.layers))
        if unknown:
            raise AdapterRejected(f"no pool layer for {unknown[0]!r}")
        rank = max(a.shape[0] for a, _ in weights.values())
        if rank > self.max_rank:
            raise AdapterRejected(f"rank {rank} is over this node's limit of {self.max_rank}")
        self._grow(rank)
        for name in weights:
            if self.layers[name].weights is None:
                self._allocate(self.layers[name])
        with torch.no_grad():
            for name, layer in self.layers.items():
                if layer.weights is None:
                    continue
                a, b = layer.weights
                a[slot].zero_()
                b[slot].zero_()
                if name in weights:
                    wa, wb = weights[name]
                    r = wa.shape[0]
                    if wa.shape != (r, layer.d_in) or wb.shape != (layer.d_out, r):
                        raise AdapterRejected(f"{name}: A {list(wa.shape)}, B {list(wb.shape)}")
                    a[slot, :r].copy_(wa)
                    b[slot, :, :r].copy_(wb)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the copies land before the engine reads them
        return rank

    def _grow(self, rank: int) -> None:
        if rank <= self.rank:
            return
        new = min(max(MIN_RANK, 1 << (rank - 1).bit_length()), self.max_rank)
        for layer in self.layers.values():
            if layer.weights is not None:
                a, b = layer.weights
                na, nb = self._zeros(layer, new)
                na[:, : self.rank].copy_(a)
                nb[:, :, : self.rank].copy_(b)
                layer.weights = (na, nb)  # one assignment: a hook sees the old pair or the new
        self.rank = new

    def _allocate(self, layer: SlotLayer) -> None:
        layer.weights = self._zeros(layer, self.rank)

    def _zeros(self, layer: SlotLayer, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.slots + 1
        kw: dict[str, Any] = {"dtype": self.dtype, "device": self.device}
        return (
            torch.zeros(n, rank, layer.d_in, **kw),
            torch.zeros(n, layer.d_out, rank, **kw),
        )

    # --- the engine thread -------------------------------------------------------------------

    @contextlib.contextmanager
    def rows(self, slots: list[int]) -> Iterator[None]:
        """Run one forward pass with row ``i`` through slot ``slots[i]`` (BASE: none)."""
        rank = max((self.ranks[s] for s in slots), default=0)
        if rank:
            self._index, self._step_rank = torch.tensor(slots, device=self.device), rank
        try:
            yield
        finally:
            self._index, self._step_rank = None, 0

    def _hook(self, layer: SlotLayer) -> Callable[..., torch.Tensor]:
        def hook(module: Any, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            weights, index, r = layer.weights, self._index, self._step_rank
            if weights is None or index is None:
                return output
            a, b = weights
            x = args[0].to(a.dtype)
            # [rows, tokens, in] x [rows, in, r] -> [rows, tokens, r] x [rows, r, out]
            low = torch.bmm(x, a[index, :r].transpose(1, 2))
            return output + torch.bmm(low, b[index, :, :r].transpose(1, 2)).to(output.dtype)

        return hook


def read_adapter(path: Path, dtype: torch.dtype) -> LoraWeights:
    """An adapter directory's matrices by module path, B scaled as peft scales it (lora_alpha
    over r, or over sqrt(r) with rsLoRA; per-module rank/alpha patterns honoured). Raises
    AdapterRejected when the file cannot be read whole (truncated, damaged)."""
    from peft.utils.other import get_pattern_key

    config = json.loads((path / CONFIG).read_text())
    alpha = config.get("lora_alpha", config.get("r", 8))
    alpha_pattern: dict[str, float] = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora"))
    halves: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(path / WEIGHTS), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                module, kind = split_key(key)
                if module is None:
                    raise AdapterRejected(f"unexpected tensor {key!r}")
                halves.setdefault(module, {})[kind] = fh.get_tensor(key)
    except AdapterRejected:
        raise
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise AdapterRejected(f"{WEIGHTS} is damaged ({exc})") from None
    weights: LoraWeights = {}
    for module, pair in halves.items():
        if set(pair) != {"A", "B"}:
            raise AdapterRejected(f"{module} has lora_{''.join(pair)} without its pair")
        a, b = pair["A"], pair["B"]
        r = a.shape[0]
        key = get_pattern_key(list(alpha_pattern), module)
        module_alpha = alpha_pattern.get(key, alpha)
        scale = module_alpha / (math.sqrt(r) if rslora else r)
        weights[module] = (a.to(dtype), (b.float() * scale).to(dtype))
    return weights


def describe_shapes(model: Any) -> dict[str, tuple[int, int]]:
    """Every linear layer's (in, out) features by module path, for checking adapters."""
    return {
        name: (m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    }
