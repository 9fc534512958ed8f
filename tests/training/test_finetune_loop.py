"""The whole loop through the gateway with the openai SDK: upload a dataset, fine-tune a LoRA
adapter on a tiny model, follow the job's events, then chat with ``fine_tuned_model`` — storage,
training queue, trainer, inference node and gateway each an agent on one broker."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import openai
import pytest

from support.island import Island, colour_rows, training_island
from support.overlay import eventually

ROWS = colour_rows(24)


@pytest.mark.timeout(300)
async def test_upload_train_and_chat_with_the_adapter(make_agent, tmp_path: Path) -> None:
    isl = await training_island(make_agent, tmp_path)
    client = openai.AsyncOpenAI(base_url=f"{isl.url}/v1", api_key=isl.key("alice"), max_retries=0)
    try:
        data = tmp_path / "colours.jsonl"
        data.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
        uploaded = await client.files.create(file=data.open("rb"), purpose="fine-tune")
        assert uploaded.filename == "colours.jsonl" and uploaded.bytes == data.stat().st_size
        assert [f.id async for f in client.files.list()] == [uploaded.id]
        content = await client.files.content(uploaded.id)
        assert content.content == data.read_bytes()

        job = await client.fine_tuning.jobs.create(
            model="tiny-llama",
            training_file=uploaded.id,
            hyperparameters={"n_epochs": 2, "batch_size": 4},
            suffix="colours",
            extra_body={"options": {"lora_rank": 4, "cutoff_len": 64, "logging_steps": 1}},
        )
        assert job.status in ("validating_files", "queued", "running")
        for _ in range(240):  # bounded: 120 s
            job = await client.fine_tuning.jobs.retrieve(job.id)
            if job.status in ("succeeded", "failed", "cancelled"):
                break
            await asyncio.sleep(0.5)
        assert job.status == "succeeded", job.error
        assert job.fine_tuned_model and job.fine_tuned_model.startswith("alice/colours-")
        events = [e async for e in client.fine_tuning.jobs.list_events(job.id, limit=1000)]
        metrics = [e.data for e in events if e.type == "metrics" and e.data]
        assert all(isinstance(m, dict) for m in metrics)  # the SDK types an event's data as object
        losses = [m["loss"] for m in metrics if isinstance(m, dict)]
        assert losses and all(loss > 0 for loss in losses)
        assert all(e.message != "log" for e in events)  # trainer messages keep their text
        paged = [e.id async for e in client.fine_tuning.jobs.list_events(job.id, limit=3)]
        assert paged == [e.id for e in events]  # the SDK's auto-pagination (`after`) ends

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
        with pytest.raises(openai.NotFoundError):  # nor can bob see alice's file or job
            await other.fine_tuning.jobs.retrieve(job.id)
        await other.close()
    finally:
        await client.close()


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
        deleted = await client.files.delete(first.id)
        assert deleted.deleted
        assert {f.id async for f in client.files.list()} == {again.id}
    finally:
        await client.close()
