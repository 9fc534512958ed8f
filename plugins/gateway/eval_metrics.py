"""The figures an evaluation reports for each answer against its reference, and their means.

Normalisation is SQuAD's (lower case, no punctuation, no articles, single spaces): exact match
and "contains" are about the words, not their formatting. ROUGE-L is the F1 of the longest common
subsequence of the normalised words (Lin, 2004), as rouge-score computes it without stemming."""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass

ARTICLES = re.compile(r"\b(a|an|the)\b")
PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    text = text.lower().translate(PUNCTUATION)
    return " ".join(ARTICLES.sub(" ", text).split())


def exact_match(answer: str, reference: str) -> float:
    return float(normalize(answer) == normalize(reference))


def contains(answer: str, reference: str) -> float:
    """1 if the reference's words appear, in order and together, in the answer's."""
    want = normalize(reference)
    return float(bool(want) and f" {want} " in f" {normalize(answer)} ")


def rouge_l(answer: str, reference: str) -> float:
    a, r = normalize(answer).split(), normalize(reference).split()
    if not a or not r:
        return 0.0
    # Longest common subsequence, one row at a time.
    previous = [0] * (len(r) + 1)
    for word in a:
        current = [0]
        for j, other in enumerate(r):
            current.append(previous[j] + 1 if word == other else max(previous[j + 1], current[j]))
        previous = current
    common = previous[-1]
    if not common:
        return 0.0
    precision, recall = common / len(a), common / len(r)
    return 2 * precision * recall / (precision + recall)


@dataclass(frozen=True)
class RowScore:
    """One answer's figures; ``logprob`` is the mean log-probability of the reference's tokens
    after the prompt, ``tokens`` how many there were."""

    exact_match: float
    contains: float
    rouge_l: float
    logprob: float
    tokens: int


def score_row(answer: str, reference: str, logprobs: Sequence[float]) -> RowScore:
    return RowScore(
        exact_match=exact_match(answer, reference),
        contains=contains(answer, reference),
        rouge_l=rouge_l(answer, reference),
        logprob=sum(logprobs) / len(logprobs) if logprobs else 0.0,
        tokens=len(logprobs),
    )


def mean(scores: Sequence[RowScore], field: str) -> float:
    return sum(getattr(s, field) for s in scores) / len(scores) if scores else 0.0
