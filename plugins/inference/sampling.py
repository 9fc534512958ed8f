"""Choosing the next token of each row of a batch, each row with its own sampling parameters.

Rows are processed one by one on purpose: a batch holds at most a few dozen rows, each with its
own temperature, top-k/top-p, penalty and seeded generator, and the per-row work is a handful of
vector operations next to a forward pass over the whole model.
"""

from __future__ import annotations

import torch

from atoll.plugins.inference.contract import SamplingParams


class Sampler:
    """One request's sampling state: its parameters and its own random generator (so a seeded
    request gives the same tokens whatever else shares the batch)."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.greedy = params.greedy
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def choose(self, logits: torch.Tensor, seen: torch.Tensor | None) -> tuple[int, float]:
        """The next token id and its log-probability under the model, from one row of logits
        (float, shape [vocab]); ``seen`` holds the ids the repetition penalty applies to."""
        p = self.params
        logits = logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        if p.repetition_penalty != 1.0 and seen is not None and seen.numel():
            # As transformers' RepetitionPenaltyLogitsProcessor: shrink what was already said.
            picked = logits[seen]
            logits = logits.clone()
            logits[seen] = torch.where(
                picked < 0, picked * p.repetition_penalty, picked / p.repetition_penalty
            )
        if self.greedy:
            token = int(torch.argmax(logits))
            return token, float(logprobs[token])
        logits = logits / max(p.temperature, 1e-5)
        if p.top_k and p.top_k < logits.numel():
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= p.top_p
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), -torch.inf)
        probs = torch.softmax(logits, dim=-1)
        token = int(torch.multinomial(probs, 1, generator=self.generator))
        return token, float(logprobs[token])
