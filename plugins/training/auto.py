"""What "auto" means for a job's batch size, epochs and learning rate: chosen from the number of
training examples, as OpenAI's fine-tuning chooses them, so that a small set gets small batches
and enough optimizer steps to be learned, and a large one is not trained for longer than it needs.

- Epochs: OpenAI's rule (its chat fine-tuning data-preparation cookbook): 3, raised so that at
  least 100 examples are seen (at most 25 epochs), lowered so that at most 25,000 are (at least
  1). 24 examples: 4 epochs.
- Batch size: the largest power of two, at most 16, that leaves at least 100 optimizer steps an
  epoch: 1 under 200 examples (OpenAI's legacy API used ~0.2 % of the examples, which is 1 for
  any small set), 16 from 1,600 on, about the examples per step of the usual LoRA recipes
  (Unsloth: 2 a device, 4 accumulated; LLaMA-Factory: 1 and 8; axolotl's lora-1b: 2 and 2,
  packed).
- Learning rate: ``BASE_LEARNING_RATE`` (2e-4), LoRA's usual rate (the QLoRA paper for models up
  to 13B, Unsloth's recommended start), for up to 4 examples an optimizer step; above that it
  grows with the square root of the examples a step (the square-root scaling rule for Adam:
  Malladi et al., 2022, "On the SDEs and Scaling Rules for Adaptive Gradient Algorithms"), up to
  twice the base at 16. OpenAI's "auto" multiplier likewise rises with the batch size. So the
  small sets, the ones that must be learned in few examples, keep the usual rate and the batch
  rule gives them the steps they need.
- Packed examples (``packing``): the batch rule counts the packed rows, which are the batches'
  units; epochs still count the examples.
- Precision: bf16 where the device computes in it natively (a GPU of compute capability 8 or
  more, the usual LoRA recipes' default; a CPU with AVX512-BF16 or AMX, where it trains about
  1.4x faster than fp32: trainer.detect_precisions), else fp32. The base model's weights are
  loaded in bf16, the LoRA weights stay fp32 (peft upcasts them) and the step runs under bf16
  autocast; bf16 keeps fp32's range, so no loss scaling is needed.

Explicit values are used as given. Pure functions: the runner calls them, tests check them.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from atoll.plugins.training.contract import BASE_LEARNING_RATE, JobOptions, Precision

TARGET_EPOCHS = 3
MIN_TARGET_EXAMPLES = 100  # examples seen over all epochs, at least ...
MAX_TARGET_EXAMPLES = 25_000  # ... and at most
MAX_AUTO_EPOCHS = 25
MIN_STEPS_PER_EPOCH = 100
MAX_AUTO_BATCH = 16
BASE_RATE_BATCH = 4  # examples an optimizer step up to which "auto" keeps the base rate
MAX_AUTO_MULTIPLIER = 2.0


class Settings(NamedTuple):
    batch_size: int  # per device
    n_epochs: float
    learning_rate: float
    precision: Precision


def auto_epochs(examples: int) -> int:
    if examples * TARGET_EPOCHS < MIN_TARGET_EXAMPLES:
        return min(MAX_AUTO_EPOCHS, MIN_TARGET_EXAMPLES // examples)
    if examples * TARGET_EPOCHS > MAX_TARGET_EXAMPLES:
        return max(1, MAX_TARGET_EXAMPLES // examples)
    return TARGET_EPOCHS


def auto_batch_size(examples: int) -> int:
    size = 1
    while size * 2 <= MAX_AUTO_BATCH and examples // (size * 2) >= MIN_STEPS_PER_EPOCH:
        size *= 2
    return size


def auto_learning_rate(per_step: int) -> float:
    """The base rate, scaled by the square root of ``per_step`` examples past BASE_RATE_BATCH."""
    scale = math.sqrt(max(per_step, BASE_RATE_BATCH) / BASE_RATE_BATCH)
    return BASE_LEARNING_RATE * min(MAX_AUTO_MULTIPLIER, scale)


def resolve(
    options: JobOptions, examples: int, rows: int | None = None, bf16: bool = False
) -> Settings:
    """The job's settings for ``examples`` training examples (at least one), packed into
    ``rows`` rows if they were, on a device that has bf16 or not."""
    o = options
    precision: Precision = o.precision_type if o.precision_type != "auto" else "fp32"
    if o.precision_type == "auto" and bf16:
        precision = "bf16"
    batch = (
        auto_batch_size(rows or examples)
        if o.per_device_train_batch_size == "auto"
        else o.per_device_train_batch_size
    )
    per_step = batch * o.gradient_accumulation_steps
    return Settings(
        batch_size=batch,
        n_epochs=auto_epochs(examples) if o.num_train_epochs == "auto" else o.num_train_epochs,
        learning_rate=auto_learning_rate(per_step)
        if o.learning_rate == "auto"
        else o.learning_rate,
        precision=precision,
    )
