"""Preference tuning (DPO) through the gateway with the openai SDK: OpenAI's preference rows,
``method: {"type": "dpo"}``, the pair figures (the training pairs' and the validation pairs')
in the job's events, results file and checkpoints, and an adapter that prefers the preferred
replies more than its base does on held-out prompts."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import openai
import pytest
import torch

from atoll.plugins.storage.contract.adapters import fetch_adapter
from atoll.plugins.training.contract import (
    FULL_VALID_PAIR_FIGURES,
    PAIR_FIGURES,
    VALID_PAIR_FIGURES,
)
from support.island import (
    PREFERRED,
    REJECTED,
    metric_figures,
    pair_rows,
    training_island,
    until_done,
    write_rows,
)
from support.tiny_models import tiny_tokenizer


def margin(model: Any, prompts: list[str]) -> float:
    """Mean over ``prompts`` of log p(preferred) - log p(rejected), each summed over the reply's
    tokens (with the template's end of turn), as the tiny model's chat template renders them."""
    tok = tiny_tokenizer()
    total = 0.0
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}]
        head = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        start = len(tok(head, add_special_tokens=False)["input_ids"])
        for sign, reply in ((1, PREFERRED), (-1, REJECTED)):
            turn = [*messages, {"role": "assistant", "content": reply}]
            ids = tok(tok.apply_chat_template(turn, tokenize=False), add_special_tokens=False)
            tokens = torch.tensor([ids["input_ids"]])
            with torch.no_grad():
                logps = torch.log_softmax(model(input_ids=tokens).logits[0, :-1], -1)
            picked = logps[torch.arange(start - 1, tokens.shape[1] - 1), tokens[0, start:]]
            total += sign * float(picked.sum())
    return total / len(prompts)


@pytest.mark.timeout(300)
async def test_a_dpo_job_moves_the_margin_toward_the_preferred_reply(
    make_agent, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    isl = await training_island(make_agent, tmp_path)
    client = openai.AsyncOpenAI(base_url=f"{isl.url}/v1", api_key=isl.key("alice"), max_retries=0)
    try:
        data = write_rows(tmp_path / "pairs.jsonl", pair_rows(range(24)))
        pairs = await client.files.create(file=data.open("rb"), purpose="fine-tune")
        chat = [
            {
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello"},
                ]
            }
        ]
        chats = await client.files.create(
            file=write_rows(tmp_path / "chat.jsonl", chat).open("rb"), purpose="fine-tune"
        )
        asked = {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 5, "beta": 0.1}
        dpo: Any = {"type": "dpo", "dpo": {"hyperparameters": asked}}

        # The method and the file's kind must agree, and a bad method is a 400 naming it.
        with pytest.raises(openai.BadRequestError, match="holds preference pairs"):
            await client.fine_tuning.jobs.create(model="tiny-llama", training_file=pairs.id)
        with pytest.raises(openai.BadRequestError, match="needs preference pairs"):
            await client.fine_tuning.jobs.create(
                model="tiny-llama", training_file=chats.id, method=dpo
            )
        with pytest.raises(openai.BadRequestError, match="exclude each other") as info:
            await client.fine_tuning.jobs.create(
                model="tiny-llama", training_file=pairs.id, method=dpo,
                hyperparameters={"n_epochs": 1},
            )  # fmt: skip
        assert info.value.body["param"] == "hyperparameters"  # type: ignore[index]
        with pytest.raises(openai.BadRequestError, match="needs preference pairs"):
            await client.fine_tuning.jobs.create(
                model="tiny-llama", training_file=pairs.id, validation_file=chats.id, method=dpo
            )
        bad: Any = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}
        with pytest.raises(openai.UnprocessableEntityError, match="more than 0") as refused:
            await client.fine_tuning.jobs.create(
                model="tiny-llama", training_file=pairs.id, method=bad
            )
        assert refused.value.body["param"] == "method.dpo.hyperparameters.beta"  # type: ignore[index]
        with pytest.raises(openai.BadRequestError, match="contradicts method"):
            await client.fine_tuning.jobs.create(
                model="tiny-llama", training_file=pairs.id, method=dpo,
                extra_body={"options": {"stage": "sft"}},
            )  # fmt: skip

        # Held out: prompts it never trains on, with the same replies.
        held = write_rows(tmp_path / "held.jsonl", pair_rows(range(24, 32)))
        validation = await client.files.create(file=held.open("rb"), purpose="fine-tune")
        job = await client.fine_tuning.jobs.create(
            model="tiny-llama",
            training_file=pairs.id,
            validation_file=validation.id,
            method=dpo,
            extra_body={"options": {"lora_rank": 4, "cutoff_len": 64, "logging_steps": 1}},
        )
        assert job.method is not None and job.method.type == "dpo"
        job, _running = await until_done(client, job.id)
        assert job.status == "succeeded", job.error
        assert job.method is not None and job.method.dpo is not None
        assert job.method.dpo.hyperparameters.model_dump() == asked  # 24 / 4 * 3 = 18 steps

        events = [e async for e in client.fine_tuning.jobs.list_events(job.id, limit=1000)]
        figures = metric_figures(list(reversed(events)))
        steps = {d["step"]: d for d in figures if "rewards/margins" in d}
        assert sorted(steps) == list(range(1, 19))
        for d in steps.values():
            assert d["rewards/margins"] == pytest.approx(
                d["rewards/chosen"] - d["rewards/rejected"]
            )
            assert 0 <= d["rewards/accuracies"] <= 1 and "train_mean_token_accuracy" not in d
        first, last = steps[1], steps[18]
        assert first["rewards/margins"] == pytest.approx(0, abs=1e-4)  # the adapter starts at 0
        assert last["rewards/margins"] > 0.05 and last["rewards/accuracies"] == 1
        assert last["train_loss"] < first["train_loss"]

        # The held-out pairs after each epoch (6 steps), and at the end the full figures: the
        # margin between the replies grows on prompts it never trained on.
        evals = [d for d in figures if "valid_loss" in d]
        assert [d["step"] for d in evals] == [6, 12, 18]
        assert all(set(VALID_PAIR_FIGURES) <= set(d) for d in evals)
        assert "full_valid_loss" not in evals[0] and "valid_mean_token_accuracy" not in evals[0]
        margins = [d["valid_rewards/margins"] for d in evals]
        assert 0 < margins[0] < margins[1] < margins[2], margins
        assert evals[-1]["valid_rewards/accuracies"] == 1
        assert evals[-1]["valid_loss"] < evals[0]["valid_loss"] < 0.6931  # log 2: no preference
        final = {k: evals[-1][k] for k in ("full_valid_loss", *FULL_VALID_PAIR_FIGURES)}
        assert final == {f"full_{k}": evals[-1][k] for k in ("valid_loss", *VALID_PAIR_FIGURES)}
        assert job.metrics is not None
        assert {k: job.metrics[k] for k in final} == final

        text = (await client.files.content(job.result_files[0])).text
        rows = list(csv.DictReader(io.StringIO(text)))
        columns = ("step", "train_loss", *PAIR_FIGURES, "valid_loss", *VALID_PAIR_FIGURES)
        assert text.splitlines()[0] == ",".join(columns)
        assert [int(r["step"]) for r in rows] == list(range(1, 19))
        assert float(rows[-1]["rewards/margins"]) == pytest.approx(
            last["rewards/margins"], rel=1e-5
        )
        for d in evals:
            row = rows[d["step"] - 1]
            assert float(row["valid_rewards/margins"]) == pytest.approx(
                d["valid_rewards/margins"], rel=1e-5
            )
        assert {r["valid_loss"] for r in rows if int(r["step"]) % 6} == {""}

        # A checkpoint an epoch, with the held-out pairs' DPO loss in OpenAI's metrics.
        kept = [c async for c in client.fine_tuning.jobs.checkpoints.list(job.id)]
        by_step = {c.step_number: c.metrics for c in kept}
        assert sorted(by_step) == [6, 12, 18]
        for d in evals:
            found = by_step[d["step"]]
            assert found.valid_loss == found.full_valid_loss == pytest.approx(d["valid_loss"])
            assert found.valid_mean_token_accuracy is None

        # On prompts it never saw, the adapter prefers the preferred reply more than its base.
        assert job.fine_tuned_model
        assert isl.gateway is not None
        directory = await fetch_adapter(
            isl.gateway.agent, "store", job.fine_tuned_model, tmp_path / "adapter"
        )
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-llama").eval()
        prompts = [f"Say the colour number {i}." for i in range(24, 32)]
        before = margin(base, prompts)
        tuned = PeftModel.from_pretrained(base, str(directory)).eval()
        after = margin(tuned, prompts)
        assert after > before + 5.0, (before, after)
        # The validation margin is beta times how much more the adapter prefers the reply.
        assert final["full_valid_rewards/margins"] == pytest.approx(0.1 * (after - before), 1e-3)
    finally:
        await client.close()
