"""The running batch of a continuously batched decoder: rows join and leave between steps.

Rows of different lengths share one left-padded key/value cache (as TGI's padded batches): every
row's real tokens end at the last column, an attention mask hides the padding, and explicit
position ids keep each row's positions its own. Joining rows are prefilled as their own padded
batch and then concatenated (both sides padded on the left to the longer cache); finished rows
are dropped with an index select, and columns that became padding for every row are trimmed so
the cache never grows past the longest live row.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import CacheLayerMixin


class PaddedBatch:
    def __init__(
        self,
        cache: DynamicCache,
        mask: torch.Tensor,
        next_ids: torch.Tensor,
        rows: list[Any],
    ) -> None:
        self.cache = cache  # layers' keys/values: [rows, heads, length, dim]
        self.mask = mask  # [rows, length]: 1 for a real token in the cache
        self.next_ids = next_ids  # [rows, 1]: each row's last sampled token, not yet in the cache
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def positions(self) -> torch.Tensor:
        """Position of each row's next token: how many real tokens precede it."""
        return self.mask.sum(dim=1, keepdim=True)

    def step_inputs(self) -> dict[str, Any]:
        """Model inputs for one decoding step of every row; call ``advance`` with the new cache."""
        ones = torch.ones((len(self.rows), 1), dtype=self.mask.dtype, device=self.mask.device)
        return {
            "input_ids": self.next_ids,
            "attention_mask": torch.cat([self.mask, ones], dim=1),
            "position_ids": self.positions(),
            "past_key_values": self.cache,
            "use_cache": True,
        }

    def advance(self, attention_mask: torch.Tensor, cache: DynamicCache, next_ids: list[int]):
        self.mask = attention_mask
        self.cache = cache
        self.next_ids = torch.tensor(next_ids, device=self.mask.device).unsqueeze(1)

    def keep(self, keep: list[int]) -> None:
        """Drop every row not in ``keep`` (indices, in order), then trim all-padding columns."""
        if len(keep) == len(self.rows):
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.rows = [self.rows[i] for i in keep]
        self.mask = self.mask.index_select(0, index)
        self.next_ids = self.next_ids.index_select(0, index)
        for layer in self.cache.layers:
            keys, values = _filled(layer)
            layer.keys = keys.index_select(0, index)
            layer.values = values.index_select(0, index)
        live = self.mask.any(dim=0).nonzero()
        start = int(live[0]) if live.numel() else self.length
        if start:
            self.mask = self.mask[:, start:]
            for layer in self.cache.layers:
                keys, values = _filled(layer)
                layer.keys = keys[:, :, start:]
                layer.values = values[:, :, start:]

    def extend(self, other: PaddedBatch) -> None:
        """Append ``other``'s rows, padding the shorter cache on the left."""
        length = max(self.length, other.length)
        self.mask = torch.cat([_pad(self.mask, length), _pad(other.mask, length)], dim=0)
        self.next_ids = torch.cat([self.next_ids, other.next_ids], dim=0)
        self.rows = self.rows + other.rows
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            (keys, values), (their_keys, their_values) = _filled(mine), _filled(theirs)
            mine.keys = torch.cat([_pad(keys, length), _pad(their_keys, length)], dim=0)
            mine.values = torch.cat([_pad(values, length), _pad(their_values, length)], dim=0)


def _filled(layer: CacheLayerMixin) -> tuple[torch.Tensor, torch.Tensor]:
    """A cache layer's keys and values: a batch's layers are filled by its prefill."""
    assert layer.keys is not None and layer.values is not None
    return layer.keys, layer.values


def _pad(t: torch.Tensor, length: int) -> torch.Tensor:
    """Left-pad the sequence dimension (last of a mask, third of a [b, h, s, d] cache) with 0."""
    dim = 1 if t.dim() == 2 else 2
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [missing, 0]
    return F.pad(t, pad)


def prefill_inputs(prompts: list[list[int]], pad_id: int, device: str = "cpu") -> dict[str, Any]:
    """Left-padded inputs for prefilling several prompts at once."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, length - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, length - len(p) :] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "position_ids": positions.to(device),
        "past_key_values": DynamicCache(),
        "use_cache": True,
    }
