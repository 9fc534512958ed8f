"""Preference tuning (DPO) through the gateway with the openai SDK: OpenAI's preference rows,
``method: {"type": "dpo"}``, the pair figures in the job's events and results file, and an
adapter that prefers the preferred replies more than its base does on held-out prompts."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import openai
import pytest
import torch

from atoll.plugins.storage.contract.adapters import fetch_adapter
from support.island import metric_figures, training_island, until_done, write_rows
from support.tiny_models import tiny_tokenizer

PREFERRED, REJECTED = "blue blue blue", "red red red"


def pair_rows(numbers: range) -> list[dict[str, Any]]:
    return [
        {
            "input": {"messages": [{"role": "user", "content": f"Say the colour number {i}."}]},
            "preferred_output": [{"role": "assistant", "content": PREFERRED}],
            "non_preferred_output": [{"role": "assistant", "content": REJECTED}],
        }
        for i in numbers
    ]


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
        with pytest.raises(openai.BadRequestError, match="takes no validation set"):
            await client.fine_tuning.jobs.create(
                model="tiny-llama", training_file=pairs.id, validation_file=pairs.id, method=dpo
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

        job = await client.fine_tuning.jobs.create(
            model="tiny-llama",
            training_file=pairs.id,
            method=dpo,
            extra_body={"options": {"lora_rank": 4, "cutoff_len": 64, "logging_steps": 1}},
        )
        assert job.method is not None and job.method.type == "dpo"
        job, _running = await until_done(client, job.id)
        assert job.status == "succeeded", job.error
        assert job.method is not None and job.method.dpo is not None
        assert job.method.dpo.hyperparameters.model_dump() == asked  # 24 / 4 * 3 = 18 steps

        events = [e async for e in client.fine_tuning.jobs.list_events(job.id, limit=1000)]
        steps = {d["step"]: d for d in metric_figures(list(reversed(events)))}
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

        text = (await client.files.content(job.result_files[0])).text
        rows = list(csv.DictReader(io.StringIO(text)))
        assert text.splitlines()[0] == (
            "step,train_loss,rewards/chosen,rewards/rejected,rewards/margins,rewards/accuracies"
        )
        assert [int(r["step"]) for r in rows] == list(range(1, 19))
        assert float(rows[-1]["rewards/margins"]) == pytest.approx(
            last["rewards/margins"], rel=1e-5
        )

        # On prompts it never saw, the adapter prefers the preferred reply more than its base.
        assert job.fine_tuned_model
        assert isl.gateway is not None
        directory = await fetch_adapter(
            isl.gateway.agent, "store", job.fine_tuned_model, tmp_path / "adapter"
        )
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-llama").eval()
        held = [f"Say the colour number {i}." for i in range(24, 32)]
        before = margin(base, held)
        tuned = PeftModel.from_pretrained(base, str(directory)).eval()
        after = margin(tuned, held)
        assert after > before + 5.0, (before, after)
    finally:
        await client.close()
