"""Direct preference optimisation (Rafailov et al., 2023) through TRL's ``DPOTrainer`` with LoRA:
its sigmoid loss, its reference (the job's base model: the adapter switched off, so no second
copy of the base is held), its collation and its figures. Runs in the job's process.

Two things are Atoll's: the pairs come tokenized by ``data.py`` with the job's chat template
(the template the job names, as its sft jobs use; TRL would render with the tokenizer's own),
so TRL's dataset preparation is skipped; and each training batch's figures are handed to the
runner as the batch is done, for the step's row of the results file (TRL averages them only
over its logging interval).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from atoll.plugins.training.contract import PAIR_FIGURES
from atoll.plugins.training.data import Example

# (pairs in the batch, its mean loss, TRL's PAIR_FIGURES as means over them, tokens it held)
BatchHook = Callable[[int, float, dict[str, float], int], None]


def pair_dataset(pairs: Sequence[Example]) -> Dataset:
    """``preference_example``'s pairs as the dataset TRL's collator reads."""
    columns = ("prompt_ids", "chosen_ids", "rejected_ids")
    return Dataset.from_dict({c: [p[c] for p in pairs] for c in columns})


class PreferenceTrainer(DPOTrainer):
    """TRL's DPO trainer on pairs tokenized already, telling ``on_batch`` of each training
    batch."""

    def __init__(self, *a: Any, on_batch: BatchHook, **kw: Any) -> None:
        self.on_batch = on_batch
        super().__init__(*a, **kw)

    def _prepare_dataset(self, dataset: Dataset, *_: Any) -> Dataset:
        return dataset  # tokenized by data.py with the job's template

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        tokens = int(inputs["attention_mask"].sum())
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training:  # the figures TRL just recorded are this batch's
            figures = {k: self._metrics["train"][k][-1] for k in PAIR_FIGURES}
            mean = loss[0] if return_outputs else loss
            self.on_batch(len(inputs["input_ids"]) // 2, float(mean.detach()), figures, tokens)
        return loss

    def pair_figures(self) -> dict[str, float]:
        """The validation pairs' (``eval_dataset``) DPO loss and TRL's figures, evaluated now."""
        found = self.evaluate()
        return {name: float(found[f"eval_{name}"]) for name in ("loss", *PAIR_FIGURES)}


def preference_config(beta: float, **training: Any) -> DPOConfig:
    """TRL's config with ``training`` as the sft jobs' ``TrainingArguments`` and DPO's beta; the
    pairs are cut at the job's cutoff_len already, and checkpointing activations stays off as
    in sft jobs (TRL turns it on by default)."""
    return DPOConfig(
        beta=beta,
        loss_type=["sigmoid"],
        max_length=None,
        gradient_checkpointing=False,
        **training,
    )
