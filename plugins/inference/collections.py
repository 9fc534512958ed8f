"""Compressed collections on a node (compression.py makes them): one shared projection per
layer for every row of a batch that a collection serves, then each row's small core.

Per layer and loaded collection the node holds ``U`` [out, r], ``V`` [in, r] and ``cores``
[members + 1, r, r], r that layer's rank in the collection (index 0 is zero: rows the collection
does not serve). A forward hook on the
same layers as the pool's adds, for each collection some row of the step uses,
``((x V) Σ[row]ᵀ) Uᵀ``: ``x V`` is one matmul for the whole batch, the core a batched [r, r]
matmul, ``Uᵀ`` one more matmul. Rows of ordinary adapters and base rows take core 0 here and
their pool slot there, so mixed batches add up correctly.

Loading reads and checks the artefact on the pool's loader thread (read_collection refuses it
whole or gives all of it); the engine then makes it visible between steps (``activate``). A
collection is unloaded only when no request holds it; rows that were cancelled read core 0.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from atoll.plugins.inference.compression import CollectionWeights
from atoll.plugins.inference.contract import AdapterRejected

# A row's collection member: (collection name, core index ≥ 1), or None.
Member = tuple[str, int] | None
# One layer of a loaded collection: Uᵀ [r, out], V [in, r], cores transposed [members + 1, r, r].
Layer = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class LoadedCollection:
    weights: CollectionWeights
    index: dict[str, int]  # member adapter id -> its core index (1-based)
    refs: int = 0  # requests holding it


class CollectionSlots:
    def __init__(
        self,
        model: torch.nn.Module,
        layers: set[str],
        activate: Callable[[Callable[[], Any]], concurrent.futures.Future],
        on_loader: Callable[[Callable[[], None]], Any],
    ) -> None:
        """``layers``: the module paths collections may target (the pool's);
        ``activate(fn)`` runs ``fn`` on the engine thread between steps, ``on_loader(fn)`` on
        the pool's loader thread."""
        first = next(model.parameters())
        self.dtype, self.device = first.dtype, first.device
        self._activate = activate
        self._on_loader = on_loader
        self.layers = layers
        self.loaded: dict[str, LoadedCollection] = {}  # visible to the engine (engine thread)
        self._tensors: dict[str, dict[str, Layer]] = {}  # per collection, per layer
        self._step: list[tuple[str, torch.Tensor]] = []  # this step's (collection, core index)
        for name, module in model.named_modules():
            if name in layers:
                module.register_forward_hook(self._hook(name))

    # --- the asyncio side ---------------------------------------------------------------------

    def member(self, adapter_id: str) -> tuple[LoadedCollection, int] | None:
        """The loaded collection serving ``adapter_id``, and its core index, if any."""
        for loaded in self.loaded.values():
            if (core := loaded.index.get(adapter_id)) is not None:
                return loaded, core
        return None

    def load(self, read: Callable[[], CollectionWeights]) -> concurrent.futures.Future:
        """``read()`` on the loader thread, the tensors moved to the model's device there, then
        made visible by the engine; resolves with the LoadedCollection once visible."""
        done: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                weights = read()
                unknown = sorted(set(weights.bases) - self.layers)
                if unknown:
                    raise AdapterRejected(f"collection {weights.name!r}: no layer {unknown[0]!r}")
                tensors: dict[str, Layer] = {}
                for module, (u, v) in weights.bases.items():
                    cores = weights.cores[module]
                    zero = torch.zeros(1, *cores.shape[1:], dtype=cores.dtype)
                    # Stored as the hook multiplies: Uᵀ, V and each core transposed.
                    ut, vv, ct = (
                        t.to(self.device, self.dtype).contiguous()
                        for t in (u.T, v, torch.cat([zero, cores]).transpose(1, 2))
                    )
                    tensors[module] = (ut, vv, ct)
                loaded = LoadedCollection(
                    weights, {m: i + 1 for i, m in enumerate(weights.members)}
                )

                def visible() -> LoadedCollection:
                    old = self.loaded.get(weights.name)
                    if old is not None and old.refs:
                        raise AdapterRejected(f"collection {weights.name!r} is serving requests")
                    self._tensors[weights.name] = tensors
                    self.loaded[weights.name] = loaded
                    return loaded

                self._activate(visible).add_done_callback(lambda f: _settle(done, f))
            except BaseException as exc:  # a damaged artefact, or the engine is stopping
                done.set_exception(exc)

        self._on_loader(run)
        return done

    def unload(self, name: str) -> Callable[[], bool]:
        """The engine command that drops collection ``name`` (refused while it serves)."""

        def drop() -> bool:
            loaded = self.loaded.get(name)
            if loaded is None:
                return False
            if loaded.refs:
                raise AdapterRejected(f"collection {name!r} is serving {loaded.refs} request(s)")
            del self.loaded[name]
            del self._tensors[name]
            return True

        return drop

    # --- the engine thread -------------------------------------------------------------------

    @contextlib.contextmanager
    def rows(self, members: list[Member]) -> Iterator[None]:
        """Run one forward pass with row ``i`` through core ``members[i]`` (None: no core)."""
        names = {m[0] for m in members if m is not None}
        self._step = [
            (
                name,
                torch.tensor(
                    [m[1] if m is not None and m[0] == name else 0 for m in members],
                    device=self.device,
                ),
            )
            for name in sorted(names)
            if name in self._tensors
        ]
        try:
            yield
        finally:
            self._step = []

    def _hook(self, layer: str) -> Callable[..., torch.Tensor]:
        def hook(module: Any, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            for name, index in self._step:
                tensors = self._tensors[name].get(layer)
                if tensors is None:
                    continue
                ut, v, cores_t = tensors
                low = args[0].to(v.dtype) @ v  # [rows, tokens, r]: one projection for the batch
                low = torch.bmm(low, cores_t[index])  # each row's Σᵀ
                output = output + (low @ ut).to(output.dtype)
            return output

        return hook


def _settle(done: concurrent.futures.Future, engine: concurrent.futures.Future) -> None:
    if engine.cancelled():
        done.cancel()
    elif (exc := engine.exception()) is not None:
        done.set_exception(exc)
    else:
        done.set_result(engine.result())
