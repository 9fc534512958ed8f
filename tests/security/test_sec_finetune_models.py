"""Fine-tuning ``model`` was any path on the trainer host: job errors told which paths exist, and
another install's model cache was trained on. The gateway now accepts only base models that are
served or that a trainer is configured with, and a trainer only the models it offers."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from conftest import AgentFactory, Island, eventually


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
        for model in ("/etc", "/root/.cache/huggingface/hub/models--x", "../models/other"):
            with pytest.raises(openai.BadRequestError, match="cannot be fine-tuned here") as bad:
                await client.fine_tuning.jobs.create(model=model, training_file=upload.id)
            assert "echo" in str(bad.value)  # it lists what is accepted
        assert [j async for j in client.fine_tuning.jobs.list()] == []  # nothing queued
        job = await client.fine_tuning.jobs.create(model="echo", training_file=upload.id)
        assert job.status == "queued"
    finally:
        await client.close()
