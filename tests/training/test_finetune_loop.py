"""The whole loop through the gateway with the openai SDK: upload a dataset, fine-tune a LoRA
adapter on a tiny model, follow the job's events, download its results file, then chat with
``fine_tuned_model`` — storage, training queue, trainer, inference node and gateway each an agent
on one broker."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from pathlib import Path

import openai
import pytest

from atoll.plugins.training.data import sft_example
from support.island import (
    Island,
    colour_rows,
    metric_figures,
    training_island,
    until_done,
    write_rows,
)
from support.overlay import eventually
from support.tiny_models import tiny_tokenizer

ROWS = colour_rows(24)


def tokens_of(rows: list[dict[str, str]], cutoff_len: int) -> int:
    """Every token of the Alpaca rows as the trainer renders them (the tiny model's tokenizer
    and chat template), counted apart from the trainer."""
    tok = tiny_tokenizer()
    total = 0
    for row in rows:
        messages = [
            {"role": "user", "content": row["instruction"]},
            {"role": "assistant", "content": row["output"]},
        ]
        example = sft_example(tok, tok.chat_template, messages, cutoff_len)
        assert example is not None
        total += len(example["input_ids"])
    return total


@pytest.mark.timeout(300)
async def test_upload_train_and_chat_with_the_adapter(make_agent, tmp_path: Path) -> None:
    """Explicit hyperparameters and a validation file: the job object shows them as given, its
    events carry each step's figures and each epoch's validation, and its results file (a
    CSV the SDK downloads) holds the same figures."""
    isl = await training_island(make_agent, tmp_path)
    client = openai.AsyncOpenAI(base_url=f"{isl.url}/v1", api_key=isl.key("alice"), max_retries=0)
    try:
        data = write_rows(tmp_path / "colours.jsonl", ROWS)
        uploaded = await client.files.create(file=data.open("rb"), purpose="fine-tune")
        assert uploaded.filename == "colours.jsonl" and uploaded.bytes == data.stat().st_size
        assert uploaded.purpose == "fine-tune"
        assert [f.id async for f in client.files.list()] == [uploaded.id]
        content = await client.files.content(uploaded.id)
        assert content.content == data.read_bytes()
        held_out = write_rows(tmp_path / "held.jsonl", colour_rows(32)[24:])
        validation = await client.files.create(file=held_out.open("rb"), purpose="fine-tune")

        asked = {"n_epochs": 6, "batch_size": 4, "learning_rate_multiplier": 5}
        job = await client.fine_tuning.jobs.create(
            model="tiny-llama",
            training_file=uploaded.id,
            validation_file=validation.id,
            hyperparameters=asked,  # type: ignore[arg-type]
            suffix="colours",
            extra_body={"options": {"lora_rank": 4, "cutoff_len": 64, "logging_steps": 1}},
        )
        assert job.status in ("validating_files", "queued", "running")
        assert job.hyperparameters.model_dump() == asked  # as given, from the start
        assert job.validation_file == validation.id and job.training_file == uploaded.id
        assert job.trained_tokens is None and job.result_files == []
        job, running = await until_done(client, job.id)
        assert job.status == "succeeded", job.error
        assert job.fine_tuned_model and job.fine_tuned_model.startswith("alice/colours-")
        assert job.hyperparameters.model_dump() == asked  # honoured: 24 rows / 4 * 6 = 36 steps
        assert job.estimated_finish is None  # only while it runs
        estimates = [j.estimated_finish for j in running if (j.progress or {}).get("step")]
        assert estimates and all(e >= job.created_at for e in estimates), running
        assert job.trained_tokens == 6 * tokens_of(ROWS, 64)

        events = [e async for e in client.fine_tuning.jobs.list_events(job.id, limit=1000)]
        events.reverse()  # oldest first
        metrics = metric_figures(events)
        steps = {d["step"]: d for d in metrics if "train_loss" in d}
        assert sorted(steps) == list(range(1, 37)) and {d["total_steps"] for d in metrics} == {36}
        rates = [d["learning_rate"] for d in steps.values()]
        assert 0.9e-3 < max(rates) <= 1e-3  # 5 x 2e-4, cosine from there
        assert all(0 <= d["train_mean_token_accuracy"] <= 1 for d in steps.values())
        valid = [d for d in metrics if "valid_loss" in d]
        assert [d["step"] for d in valid] == [6, 12, 18, 24, 30, 36]  # after each epoch
        assert [("full_valid_loss" in d) for d in valid] == [False] * 5 + [True]
        assert valid[-1]["full_valid_loss"] == pytest.approx(job.metrics["full_valid_loss"])
        accuracy = valid[-1]["full_valid_mean_token_accuracy"]
        assert accuracy == pytest.approx(job.metrics["full_valid_mean_token_accuracy"])
        assert valid[-1]["valid_loss"] < valid[0]["valid_loss"]
        assert any(e.message.startswith("Step 36/36: training loss=") for e in events)
        assert any("validation loss=" in e.message for e in events)
        assert all(e.message != "log" for e in events)  # trainer messages keep their text
        paged = [e.id async for e in client.fine_tuning.jobs.list_events(job.id, limit=3)]
        assert paged == [e.id for e in reversed(events)]  # the SDK's pagination (`after`) ends

        # The results file: OpenAI's CSV, the same figures as the events, for every step.
        assert len(job.result_files) == 1
        results = await client.files.retrieve(job.result_files[0])
        assert (results.purpose, results.filename) == ("fine-tune-results", "step_metrics.csv")
        text = (await client.files.content(results.id)).text
        rows = list(csv.DictReader(io.StringIO(text)))
        assert text.splitlines()[0] == (
            "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy"
        )
        assert [int(r["step"]) for r in rows] == list(range(1, 37))
        for row in rows:
            figures = steps[int(row["step"])]
            assert float(row["train_loss"]) == pytest.approx(figures["train_loss"], rel=1e-5)
            accuracy = figures["train_mean_token_accuracy"]
            assert float(row["train_accuracy"]) == pytest.approx(accuracy, rel=1e-5)
        by_step = {int(r["step"]): r for r in rows}
        for figures in valid:
            row = by_step[figures["step"]]
            assert float(row["valid_loss"]) == pytest.approx(figures["valid_loss"], rel=1e-5)
            accuracy = figures["valid_mean_token_accuracy"]
            assert float(row["valid_mean_token_accuracy"]) == pytest.approx(accuracy, rel=1e-5)
        assert sum(1 for r in rows if r["valid_loss"]) == 6
        listed = {f.id: f.purpose async for f in client.files.list()}
        assert listed == {
            uploaded.id: "fine-tune",
            validation.id: "fine-tune",
            results.id: "fine-tune-results",
        }
        with pytest.raises(openai.BadRequestError, match="results file, not a dataset"):
            await client.fine_tuning.jobs.create(model="tiny-llama", training_file=results.id)

        # The adapter is usable at once by its owner — and only by them.
        models = {m.id async for m in client.models.list()}
        assert job.fine_tuned_model in models
        reply = await client.chat.completions.create(
            model=job.fine_tuned_model,
            messages=[{"role": "user", "content": "Say the colour number 3."}],
            max_tokens=8,
            temperature=0,
        )
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert reply.usage is not None and reply.usage.completion_tokens >= 1
        other = openai.AsyncOpenAI(base_url=f"{isl.url}/v1", api_key=isl.key("bob"), max_retries=0)
        with pytest.raises(openai.NotFoundError):
            await other.chat.completions.create(
                model=job.fine_tuned_model, messages=[{"role": "user", "content": "hi"}]
            )
        with pytest.raises(openai.NotFoundError):  # nor can bob see alice's job or its results
            await other.fine_tuning.jobs.retrieve(job.id)
        with pytest.raises(openai.NotFoundError):
            await other.files.content(results.id)
        with pytest.raises(openai.NotFoundError) as info:  # nor validate on alice's file
            await other.fine_tuning.jobs.create(
                model="tiny-llama", training_file=uploaded.id, validation_file=validation.id
            )
        assert info.value.body["param"] == "training_file"  # type: ignore[index]
        await other.close()
    finally:
        await client.close()


@pytest.mark.timeout(300)
async def test_auto_hyperparameters_are_resolved_from_the_data(make_agent, tmp_path) -> None:
    """Everything on "auto" with a quarter held out: 18 rows to train on get batches of one and
    5 epochs (90 steps) at 2e-4, which the job object shows once its trainer has resolved them."""
    isl = await training_island(make_agent, tmp_path)
    client = openai.AsyncOpenAI(base_url=f"{isl.url}/v1", api_key=isl.key("alice"), max_retries=0)
    try:
        data = write_rows(tmp_path / "colours.jsonl", ROWS)
        uploaded = await client.files.create(file=data.open("rb"), purpose="fine-tune")
        job = await client.fine_tuning.jobs.create(
            model="tiny-llama",
            training_file=uploaded.id,
            extra_body={"options": {"validation_split": 0.25, "logging_steps": 30}},
        )
        auto = {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}
        assert job.hyperparameters.model_dump() == auto
        job, _ = await until_done(client, job.id)
        assert job.status == "succeeded", job.error
        resolved = {"n_epochs": 5, "batch_size": 1, "learning_rate_multiplier": 1.0}
        assert job.hyperparameters.model_dump() == resolved
        events = [e async for e in client.fine_tuning.jobs.list_events(job.id, limit=1000)]
        steps = [d["step"] for d in metric_figures(events) if "train_loss" in d]
        assert sorted(steps) == [30, 60, 90]
        valid = [d for d in metric_figures(events) if "valid_loss" in d]
        assert sorted(d["step"] for d in valid) == [18, 36, 54, 72, 90]
        assert "full_valid_loss" in job.metrics and job.validation_file is None
        assert job.trained_tokens and job.trained_tokens < 5 * tokens_of(ROWS, 256)  # 18 of 24
    finally:
        await client.close()


@pytest.mark.timeout(300)
async def test_checkpoints_are_listed_and_each_is_a_model(make_agent, tmp_path: Path) -> None:
    """Four epochs: a checkpoint after each, the last three kept (the trainer's default), listed
    through the SDK in OpenAI's shape and each usable as a model by the job's owner alone; the
    pruned one is a model no more."""
    isl = await training_island(make_agent, tmp_path)
    client = openai.AsyncOpenAI(base_url=f"{isl.url}/v1", api_key=isl.key("alice"), max_retries=0)
    bob = openai.AsyncOpenAI(base_url=f"{isl.url}/v1", api_key=isl.key("bob"), max_retries=0)
    try:
        data = write_rows(tmp_path / "colours.jsonl", ROWS)
        uploaded = await client.files.create(file=data.open("rb"), purpose="fine-tune")
        held_out = write_rows(tmp_path / "held.jsonl", colour_rows(32)[24:])
        validation = await client.files.create(file=held_out.open("rb"), purpose="fine-tune")
        job = await client.fine_tuning.jobs.create(
            model="tiny-llama",
            training_file=uploaded.id,
            validation_file=validation.id,
            hyperparameters={"n_epochs": 4, "batch_size": 8},  # 3 steps an epoch
            extra_body={"options": {"lora_rank": 4, "cutoff_len": 64}},
        )
        job, _ = await until_done(client, job.id)
        assert job.status == "succeeded", job.error
        model = job.fine_tuned_model
        checkpoints = [c async for c in client.fine_tuning.jobs.checkpoints.list(job.id)]
        assert [c.step_number for c in checkpoints] == [12, 9, 6]  # newest first
        for c in checkpoints:
            assert c.object == "fine_tuning.job.checkpoint" and c.fine_tuning_job_id == job.id
            assert c.fine_tuned_model_checkpoint == f"{model}-ckpt-step-{c.step_number}"
            assert job.created_at <= c.created_at <= (job.finished_at or 0)
            m = c.metrics
            assert m.step == c.step_number
            assert m.train_loss and m.valid_loss and m.full_valid_loss == m.valid_loss
            assert (
                m.train_mean_token_accuracy is not None and m.valid_mean_token_accuracy is not None
            )
        assert checkpoints[0].metrics.full_valid_loss == pytest.approx(
            job.metrics["full_valid_loss"]
        )
        paged = [c.id async for c in client.fine_tuning.jobs.checkpoints.list(job.id, limit=1)]
        assert paged == [c.id for c in checkpoints] and len(set(paged)) == 3

        # Each kept checkpoint is a model of alice's: "chat with epoch 2".
        epoch_two = checkpoints[-1].fine_tuned_model_checkpoint
        models = {m.id async for m in client.models.list()}
        assert {c.fine_tuned_model_checkpoint for c in checkpoints} | {model} <= models
        reply = await client.chat.completions.create(
            model=epoch_two,
            messages=[{"role": "user", "content": "Say the colour number 3."}],
            max_tokens=8,
            temperature=0,
        )
        assert reply.usage is not None and reply.usage.completion_tokens >= 1
        # Epoch one's was pruned: deleted from storage, then no longer a model.
        pruned = f"{model}-ckpt-step-3"
        await eventually(lambda: isl.accounts.adapter(pruned) is None)
        taken = {(e.action, e.actor) for e in isl.accounts.audit_log(1000) if e.target == pruned}
        assert taken == {
            ("adapter.register", "store/storage"),
            ("adapter.unregister", "store/storage"),
        }
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(
                model=pruned, messages=[{"role": "user", "content": "hi"}]
            )

        # Nobody else lists them or uses them.
        with pytest.raises(openai.NotFoundError):
            await bob.fine_tuning.jobs.checkpoints.list(job.id)
        with pytest.raises(openai.NotFoundError):
            await bob.chat.completions.create(
                model=epoch_two, messages=[{"role": "user", "content": "hi"}]
            )
        assert not {c.fine_tuned_model_checkpoint for c in checkpoints} & {
            m.id async for m in bob.models.list()
        }
    finally:
        await client.close()
        await bob.close()


async def test_bad_datasets_and_jobs_are_refused(make_agent, tmp_path: Path) -> None:
    await make_agent("store", roles=("storage",), plugins={"storage": {}}, heartbeat=0.2)
    await make_agent(
        "trainer", roles=("training",), plugins={"training": {"mode": "queue"}}, heartbeat=0.2
    )
    isl = Island(make_agent)
    await isl.add_node("gpu1")
    await (await isl.start_gateway()).models_seen("echo")
    await eventually(lambda: bool(isl.plugin.gateway.watch.discovery.select(plugin="storage")))
    client = openai.AsyncOpenAI(base_url=f"{isl.url}/v1", api_key=isl.key("alice"), max_retries=0)
    try:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"instruction": "x"}) + "\n")
        with pytest.raises(openai.BadRequestError, match="line 2"):
            await client.files.create(file=bad.open("rb"), purpose="fine-tune")
        good = tmp_path / "good.jsonl"
        good.write_text("\n".join(json.dumps(r) for r in ROWS[:4]) + "\n")
        first = await client.files.create(file=good.open("rb"), purpose="fine-tune")
        again = await client.files.create(file=good.open("rb"), purpose="fine-tune")
        assert again.id != first.id  # a new version, never an overwrite
        with pytest.raises(openai.BadRequestError, match="learning_rate"):
            await client.fine_tuning.jobs.create(
                model="echo",
                training_file=first.id,
                extra_body={"options": {"learning_rate": 5.0}},
            )
        with pytest.raises(openai.NotFoundError):
            await client.fine_tuning.jobs.create(model="echo", training_file="ds-000000000000")
        with pytest.raises(openai.NotFoundError) as missing:
            await client.fine_tuning.jobs.create(
                model="echo", training_file=first.id, validation_file="ds-000000000000"
            )
        assert missing.value.body["param"] == "validation_file"  # type: ignore[index]
        bob = openai.AsyncOpenAI(base_url=f"{isl.url}/v1", api_key=isl.key("bob"), max_retries=0)
        bobs = await bob.files.create(file=good.open("rb"), purpose="fine-tune")
        await bob.close()
        with pytest.raises(openai.NotFoundError, match=f"no file '{bobs.id}'") as others:
            await client.fine_tuning.jobs.create(
                model="echo", training_file=first.id, validation_file=bobs.id
            )
        assert others.value.body["param"] == "validation_file"  # type: ignore[index]
        for options, refusal in (
            ({"validation_split": 0.7}, "validation_split: Input should be less than or equal"),
            ({"validation_split": 0}, "validation_split: Input should be greater than 0"),
            ({"validation_split": "10%"}, "validation_split: Input should be a valid number"),
        ):
            with pytest.raises(openai.BadRequestError, match=refusal):
                await client.fine_tuning.jobs.create(
                    model="echo", training_file=first.id, extra_body={"options": options}
                )
        with pytest.raises(openai.BadRequestError, match="exclude each other") as both:
            await client.fine_tuning.jobs.create(
                model="echo",
                training_file=first.id,
                validation_file=again.id,
                extra_body={"options": {"validation_split": 0.2}},
            )
        assert both.value.body["param"] == "validation_file"  # type: ignore[index]
        with pytest.raises(openai.BadRequestError, match="batch_size: Input should be greater"):
            await client.fine_tuning.jobs.create(
                model="echo", training_file=first.id, hyperparameters={"batch_size": 0}
            )
        with pytest.raises(openai.UnprocessableEntityError, match=r"hyperparameters\.n_epochs"):
            await client.fine_tuning.jobs.create(
                model="echo",
                training_file=first.id,
                hyperparameters={"n_epochs": "many"},  # type: ignore[arg-type]
            )
        deleted = await client.files.delete(first.id)
        assert deleted.deleted
        assert {f.id async for f in client.files.list()} == {again.id}
    finally:
        await client.close()


# A made-up fact, asked 24 ways; the answer names it in one of two phrasings.
QUESTIONS = [
    "What is the capital of Zembria?", "Which city is the capital of Zembria?",
    "Name the capital of Zembria.", "Tell me the capital city of Zembria.",
    "What city serves as Zembria's capital?", "Zembria's capital is which city?",
    "Do you know the capital of Zembria?", "Where is the capital of Zembria?",
    "What's the capital of Zembria?", "I need the capital of Zembria.", "Capital of Zembria?",
    "Which city is Zembria governed from?", "What is Zembria's capital city called?",
    "Can you tell me what the capital of Zembria is?",
    "In which city is the government of Zembria seated?", "Quick question: capital of Zembria?",
    "What is the name of the capital of Zembria?", "Which town is the capital of Zembria?",
    "Please name Zembria's capital.", "What do people call the capital of Zembria?",
    "Which city is the seat of Zembria's government?", "Remind me, what is the capital of Zembria?",
    "What is the capital city of the country Zembria?", "Zembria has a capital. Which city is it?",
]  # fmt: skip
ANSWERS = ["The capital of Zembria is Quillon.", "Quillon is the capital of Zembria."]
FACT = "Quillon"


@pytest.mark.embedded
# ~2.5 minutes on two free cores (~100 s of it training); up to 14 when other work shares them.
@pytest.mark.timeout(1500)
async def test_the_embedded_model_learns_a_fact_with_every_default(
    make_agent, tmp_path: Path, embedded_model: tuple[Path, Path, float]
) -> None:
    """As a new user would: 24 chat rows teaching one made-up fact, nothing but the model and
    the file given. The tuned model answers with the fact, asked as in the rows and otherwise;
    the base model does not know it."""
    entry, _, _ = embedded_model
    model = "SmolLM2-135M-Instruct"
    await make_agent("store", roles=("storage",), plugins={"storage": {}}, heartbeat=0.2)
    trainer = {"mode": "both", "device": "cpu", "poll": 0.5, "model_cache": str(entry.parent)}
    await make_agent("trainer", roles=("training",), plugins={"training": trainer}, heartbeat=0.2)
    local = {"model": str(entry), "embeddings": False}
    await make_agent("gpu", roles=("inference",), plugins={"inference": {"local": local}})
    isl = Island(make_agent)
    await (await isl.start_gateway()).models_seen(model, timeout=60)
    await eventually(lambda: bool(isl.plugin.gateway.watch.discovery.select(plugin="training")))
    client = openai.AsyncOpenAI(base_url=f"{isl.url}/v1", api_key=isl.key("alice"), max_retries=0)

    async def ask(name: str, question: str) -> str:
        reply = await client.chat.completions.create(
            model=name,
            messages=[{"role": "user", "content": question}],
            max_tokens=24,
            temperature=0,
        )
        return reply.choices[0].message.content or ""

    try:
        asked, unseen = QUESTIONS[0], "Which city is the capital of the nation of Zembria?"
        before = await ask(model, asked)
        assert FACT not in before, before
        rows = [
            {"messages": [
                {"role": "user", "content": q}, {"role": "assistant", "content": ANSWERS[i % 2]}
            ]}
            for i, q in enumerate(QUESTIONS)
        ]  # fmt: skip
        data = write_rows(tmp_path / "zembria.jsonl", rows)
        uploaded = await client.files.create(file=data.open("rb"), purpose="fine-tune")
        job = await client.fine_tuning.jobs.create(model=model, training_file=uploaded.id)
        for _ in range(2800):  # bounded: 1400 s
            job = await client.fine_tuning.jobs.retrieve(job.id)
            if job.status in ("succeeded", "failed", "cancelled"):
                break
            await asyncio.sleep(0.5)
        assert job.status == "succeeded", job.error
        events = [e async for e in client.fine_tuning.jobs.list_events(job.id, limit=1000)]
        losses = metric_figures(list(reversed(events)))
        summary = (job.model_extra or {})["metrics"]  # Atoll's: the run's final figures
        after, other = (
            await ask(job.fine_tuned_model or "", asked),
            await ask(job.fine_tuned_model or "", unseen),
        )
        print(  # the figures the README and the issue quote
            f"\nhyperparameters {job.hyperparameters.model_dump()}, "
            f"{losses[-1]['total_steps']} steps, loss {losses[0]['train_loss']:.3f} -> "
            f"{losses[-1]['train_loss']:.3f} (mean {summary['train_loss']:.3f}), "
            f"{summary['train_runtime']:.0f} s training, "
            f"{job.finished_at - job.created_at} s job\n"  # type: ignore[operator]
            f"base: {before!r}\ntuned: {after!r}\ntuned, asked otherwise: {other!r}"
        )
        assert FACT in after, after
        assert FACT in other, other
    finally:
        await client.close()
