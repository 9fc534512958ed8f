"""Fine-tuning ``model`` was any path on the trainer host: job errors told which paths exist, and
another install's model cache was trained on. The gateway now accepts only base models that are
served or that a trainer is configured with, and a trainer only the models it offers."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import openai
import pytest

from atoll.agent.contract import Caller
from atoll.plugins.storage.contract.datasets import upload_dataset
from atoll.plugins.training.contract import FINAL_STATES, JobRecord, get_job, submit_job
from atoll.plugins.training.plugin import TrainingPlugin
from support.island import Island
from support.overlay import AgentFactory, eventually

PATHS = ("/etc", "/root/.cache/huggingface/hub/models--x", "../models/other", "/nowhere/at/all")


async def test_only_served_or_configured_models_are_fine_tuned(
    make_agent: AgentFactory, tmp_path: Path
) -> None:
    await make_agent("store", roles=("storage",), plugins={"storage": {}}, heartbeat=0.2)
    queue = {"training": {"mode": "queue"}}
    await make_agent("queue", roles=("training",), plugins=queue, heartbeat=0.2)
    isl = Island(make_agent)
    await isl.add_node("gpu1", model="echo")
    await (await isl.start_gateway()).models_seen("echo")
    view = isl.plugin.gateway.watch.discovery
    await eventually(lambda: bool(view.select(plugin="training") and view.select(plugin="storage")))
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "q", "output": "a"}\n')
    client = openai.AsyncOpenAI(base_url=f"{isl.url}/v1", api_key=isl.key("alice"), max_retries=0)
    try:
        upload = await client.files.create(file=data.open("rb"), purpose="fine-tune")
        messages = []
        for model in PATHS:
            with pytest.raises(openai.BadRequestError, match="cannot be fine-tuned here") as bad:
                await client.fine_tuning.jobs.create(model=model, training_file=upload.id)
            assert bad.value.status_code == 400 and bad.value.param == "model"
            assert "echo" in str(bad.value)  # it lists what is accepted
            messages.append(bad.value.message.replace(repr(model), "M"))
        assert len(set(messages)) == 1  # an existing path is told what a missing one is
        # ``options`` overrides ``model``: the path there is refused as well.
        with pytest.raises(openai.BadRequestError, match="'/etc' cannot be fine-tuned here"):
            await client.fine_tuning.jobs.create(
                model="echo",
                training_file=upload.id,
                extra_body={"options": {"model_name_or_path": "/etc"}},
            )
        assert [j async for j in client.fine_tuning.jobs.list()] == []  # nothing queued
        # A model a trainer is configured with (served by no node) is accepted, as is a served one.
        trainer = {"mode": "trainer", "device": "cpu", "models": {"tiny": str(tmp_path / "m")}}
        await make_agent("trainer", roles=("training",), plugins={"training": trainer})
        await eventually(lambda: "tiny" in isl.plugin.gateway.catalog.trainable_models())
        for model in ("echo", "tiny"):
            job = await client.fine_tuning.jobs.create(model=model, training_file=upload.id)
            assert (job.model, job.status) == (model, "queued")
    finally:
        await client.close()


async def until_final(agent: Caller, job_id: str, timeout: float = 60.0) -> JobRecord:
    deadline = time.monotonic() + timeout
    while (job := await get_job(agent, "queue", job_id)).state not in FINAL_STATES:
        assert time.monotonic() < deadline, f"job still {job.state} after {timeout}s"
        await asyncio.sleep(0.2)
    return job


async def test_a_trainer_refuses_a_path_whoever_queued_it(
    make_agent: AgentFactory, tmp_path: Path
) -> None:
    """A job put in the queue without the gateway (an agent speaking the overlay) names a path:
    the trainer refuses it before it fetches or runs anything, with the same words whether the
    path exists or not."""
    await make_agent("store", roles=("storage",), plugins={"storage": {}}, heartbeat=0.2)
    queue = {"training": {"mode": "queue", "heartbeat": 0.3}}
    await make_agent("queue", roles=("training",), plugins=queue, heartbeat=0.2)
    configured = tmp_path / "tiny-model"  # the operator's mapping (not loadable: never trained)
    configured.mkdir()
    config = {
        "mode": "trainer", "device": "cpu", "heartbeat": 0.3, "poll": 0.3,
        "models": {"tiny": str(configured)}, "model_cache": str(tmp_path / "cache"),
    }  # fmt: skip
    trainer_rt = await make_agent("trainer", roles=("training",), plugins={"training": config})
    plugin = trainer_rt.host.plugins["training"]
    assert isinstance(plugin, TrainingPlugin) and plugin.worker is not None
    worker = plugin.worker
    client = (await make_agent("client", roles=("gateway",))).agent
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"instruction": "q", "output": "a"}\n')
    dataset = (await upload_dataset(client, "store", rows, "rows", "alice")).id
    errors = {}
    for model in (str(configured), "/etc", "/nowhere/model", "../tiny-model"):
        options = {"model_name_or_path": model, "dataset": [dataset]}
        job = await submit_job(client, "queue", "alice", options)
        failed = await until_final(client, job.id)
        assert failed.state == "failed"
        errors[model] = failed.error
        assert list(worker.workdir.iterdir()) == []  # no dataset fetched, nothing staged
    offered = "SmolLM2-135M-Instruct, tiny" if "SmolLM2" in str(errors) else "tiny"
    for model, error in errors.items():
        assert error == (
            f"checking the model: ValueError: model {model!r} is not one this trainer offers "
            f"({offered})"
        )
    # The honest name passes the check (and then fails on the empty directory it maps to).
    options = {"model_name_or_path": "tiny", "dataset": [dataset]}
    job = await submit_job(client, "queue", "alice", options)
    failed = await until_final(client, job.id, timeout=120)
    assert "the training process exited with 1" in (failed.error or ""), failed.error
