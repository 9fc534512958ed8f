"""A job's figures as OpenAI reports them: each optimizer step's training loss and mean token
accuracy, the validation set's after each epoch, and the results file (``step_metrics.csv``)
that holds them. Losses are token-weighted means of the cross-entropy over labelled tokens;
accuracy is the share of labelled tokens the model's argmax predicts. A dpo job's steps have
TRL's figures instead: the loss, the rewards of chosen and rejected replies (beta times the
log-probability the adapter adds to the reference's), their margin, and the share of pairs whose
chosen reward is the larger (TRL's DPOTrainer computes them: dpo.py). Runs in the job's
process.
"""

from __future__ import annotations

import contextlib
import csv
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atoll.plugins.training.contract import PAIR_FIGURES, VALID_PAIR_FIGURES
from atoll.plugins.training.data import IGNORE, Example, collate

RESULTS_NAME = "step_metrics.csv"  # OpenAI's name for a job's results file
# OpenAI's columns; a step without an evaluation leaves the validation ones empty.
RESULT_COLUMNS = ("step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy")
DPO_COLUMNS = ("step", "train_loss", *PAIR_FIGURES, "valid_loss", *VALID_PAIR_FIGURES)


@dataclass
class Tally:
    """Cross-entropy summed over labelled tokens, how many of them were predicted, and how
    many there were."""

    loss_sum: float = 0.0
    correct: int = 0
    tokens: int = 0

    def add(self, logits: Any, labels: Any) -> Any:
        """Count one batch, ``logits`` [batch, length, vocab] for ``labels`` [batch, length];
        returns its cross-entropy summed over the labelled tokens, differentiable through
        ``logits``: the training loss is this very sum (the runner's FineTuner), so the figures
        cost no second pass over the vocabulary."""
        import torch.nn.functional as F

        shifted = labels[:, 1:]
        mask = shifted != IGNORE
        picked = logits[:, :-1][mask].float()
        targets = shifted[mask]
        summed = F.cross_entropy(picked, targets, reduction="sum")
        self.loss_sum += float(summed.detach())
        self.correct += int((picked.detach().argmax(-1) == targets).sum())
        self.tokens += int(mask.sum())
        return summed

    @property
    def loss(self) -> float:
        return self.loss_sum / self.tokens if self.tokens else math.nan

    @property
    def accuracy(self) -> float:
        return self.correct / self.tokens if self.tokens else math.nan

    def figures(self) -> dict[str, float]:
        """As a validation set's are named after ``valid_``."""
        return {"loss": self.loss, "mean_token_accuracy": self.accuracy}


@dataclass
class PairTally:
    """A dpo step's pairs: TRL's per-batch means weighted by each batch's pairs."""

    sums: dict[str, float] = field(default_factory=dict)
    pairs: int = 0

    def add(self, pairs: int, loss: float, figures: dict[str, float]) -> None:
        """One batch: its ``pairs``, mean loss and PAIR_FIGURES (means over its pairs)."""
        for name, value in {"loss": loss, **figures}.items():
            self.sums[name] = self.sums.get(name, 0.0) + value * pairs
        self.pairs += pairs

    def figures(self) -> dict[str, float]:
        """TRL's names, each a mean over the step's pairs."""
        n = self.pairs or math.nan
        return {name: total / n for name, total in self.sums.items()}


@contextlib.contextmanager
def _evaluating(model: Any) -> Iterator[Any]:
    """Without gradients, in eval mode (the model is left in the mode it was in); yields the
    model's device."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield next(model.parameters()).device
    finally:
        model.train(was_training)


def evaluate(model: Any, examples: Sequence[Example], batch_size: int, pad_id: int) -> Tally:
    """The model's loss and token accuracy on ``examples``."""
    tally = Tally()
    with _evaluating(model) as device:
        for start in range(0, len(examples), batch_size):
            batch = collate(list(examples[start : start + batch_size]), pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            tally.add(out.logits, batch["labels"])
    return tally


@dataclass
class StepRow:
    step: int
    train_loss: float | None = None
    train_accuracy: float | None = None
    pairs: dict[str, float] | None = None  # a dpo step's PAIR_FIGURES
    # The validation set's, when it was evaluated at this step: valid_loss with
    # valid_mean_token_accuracy, or with VALID_PAIR_FIGURES for a dpo job.
    valid: dict[str, float] | None = None


def _cell(value: float | None) -> str:
    return "" if value is None or math.isnan(value) else f"{value:.6g}"


def write_results(path: Path, rows: Sequence[StepRow], dpo: bool = False) -> None:
    """OpenAI's columns; a dpo job's are the loss and its pairs' figures, of the training pairs
    and then of the validation pairs (empty where a step had no evaluation)."""
    columns = DPO_COLUMNS if dpo else RESULT_COLUMNS
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(columns)
        for r in sorted(rows, key=lambda r: r.step):
            train = {"train_loss": r.train_loss, "train_accuracy": r.train_accuracy}
            cells = {**train, **(r.pairs or {}), **(r.valid or {})}
            writer.writerow([r.step, *(_cell(cells.get(c)) for c in columns[1:])])
