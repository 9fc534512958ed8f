"""Direct preference optimisation (Rafailov et al., 2023) inside Atoll's own training loop: the
loss of a batch of pairs, with the job's base model (the adapter switched off) as the reference.

Why not TRL's ``DPOTrainer``: the runner's loop is transformers' ``Trainer`` with Atoll's hooks
(a checkpoint stored at each epoch's end before training goes on, resuming from one, the step
figures in events and the results file, trained tokens counted); TRL's trainer brings its own
tokenisation, collation, logging and reference-model handling, so either the hooks would be
written twice or TRL's would be bypassed. The loss itself is a few lines, and the pairs are
rendered by the same chat template code as sft's (``data.py``). Runs in the job's process.
"""

from __future__ import annotations

from typing import Any

from atoll.plugins.training.data import IGNORE


def sequence_logps(model: Any, batch: dict[str, Any]) -> Any:
    """Each sequence's log-probability of its labelled tokens, summed: a tensor [batch]."""
    import torch

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = torch.gather(logps, 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


def dpo_loss(peft_model: Any, batch: dict[str, Any], beta: float) -> tuple[Any, Any, Any]:
    """(per-pair losses, chosen rewards, rejected rewards) for ``collate_pairs``'s batch: the
    chosen sequences first, then the rejected ones. The reference is the same model with its
    adapter disabled, so no second copy of the base is held."""
    import torch
    import torch.nn.functional as F

    policy = sequence_logps(peft_model, batch)
    with torch.no_grad(), peft_model.disable_adapter():
        reference = sequence_logps(peft_model, batch)
    rewards = beta * (policy - reference)
    half = len(rewards) // 2
    chosen, rejected = rewards[:half], rewards[half:]
    return -F.logsigmoid(chosen - rejected), chosen.detach(), rejected.detach()
