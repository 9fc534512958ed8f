"""A gateway island of real agents on the test broker: echo inference nodes, a gateway, storage,
and the whole fine-tuning loop."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
from openai.types.fine_tuning import FineTuningJobEvent
from safetensors.numpy import save_file

from atoll.agent.runtime import AgentRuntime
from atoll.plugins.storage.plugin import StoragePlugin
from support.overlay import AgentFactory, eventually


class Island:
    """A gateway agent and echo inference agents on the test broker, with the admin API key."""

    def __init__(self, make_agent: AgentFactory) -> None:
        self.make_agent = make_agent
        self.nodes: dict[str, AgentRuntime] = {}
        self.gateway: AgentRuntime | None = None

    async def add_node(
        self, name: str, model: str = "echo", delay: float = 0.0, **options
    ) -> AgentRuntime:
        config = {"backend": "echo", "echo": {"model": model, "delay": delay}}
        options = {"heartbeat": 0.2, "metrics_interval": 0.5} | options
        rt = await self.make_agent(
            name, roles=("inference",), plugins={"inference": config}, **options
        )
        self.nodes[name] = rt
        return rt

    async def add_transcriber(self, models: Path, name: str = "ear") -> str:
        """A ``local`` node transcribing with a tiny random Whisper (and a tiny Llama, its
        chat model), built under ``models``; the Whisper's name, once the gateway lists it."""
        from support.tiny_models import build_tiny_model, build_tiny_whisper  # torch: on demand

        base = build_tiny_model(models / "tiny-llama")
        whisper = build_tiny_whisper(models / "tiny-whisper")
        local = {"model": str(base), "embeddings": False, "transcription": str(whisper)}
        self.nodes[name] = await self.make_agent(
            name, roles=("inference",), plugins={"inference": {"local": local}}, heartbeat=0.2
        )
        catalog = self.plugin.gateway.catalog
        await eventually(lambda: whisper.name in catalog.transcription_models(), 10.0)
        return whisper.name

    async def start_gateway(self, metrics_interval: float = 0.5, **config: Any) -> Island:
        gateway = {"listen": "127.0.0.1:0"} | config
        self.gateway = await self.make_agent(
            "gw",
            roles=("gateway",),
            plugins={"gateway": gateway},
            heartbeat=0.2,
            metrics_interval=metrics_interval,
        )
        return self

    @property
    def plugin(self):
        assert self.gateway is not None
        return self.gateway.host.plugins["gateway"]

    @property
    def url(self) -> str:
        return self.plugin.url

    @property
    def accounts(self):
        return self.plugin.accounts

    @property
    def admin_key(self) -> str:
        return (self.plugin.ctx.data_dir / "admin-key").read_text()

    def key(self, user: str, project: str | None = None, **options) -> str:
        """A fresh API key for ``user`` (created, with the user, if needed)."""
        if user not in {u.name for u in self.accounts.list_users()}:
            self.accounts.create_user(user, actor="test")
        return self.accounts.create_key(user, project, actor="test", **options)[1]

    async def models_seen(self, model: str, timeout: float = 5.0) -> None:
        """Until the gateway's discovery shows a node serving ``model``."""
        await eventually(lambda: model in self.plugin.gateway.catalog.base_models(), timeout)


async def models(isl: Island, key: str) -> set[str]:
    """The model ids the gateway's ``/v1/models`` lists to ``key``."""
    async with httpx.AsyncClient(base_url=isl.url) as http:
        reply = await http.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
    reply.raise_for_status()
    return {m["id"] for m in reply.json()["data"]}


def lora_adapter(directory: Path) -> Path:
    """A minimal LoRA adapter as peft lays it out: a config and lora_A/lora_B tensors."""
    directory.mkdir()
    config = {
        "peft_type": "LORA",
        "base_model_name_or_path": "atoll-test/tiny-llama",
        "r": 4,
        "target_modules": ["q_proj", "v_proj"],
    }
    (directory / "adapter_config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(1)
    save_file(
        {
            "base_model.model.layers.0.q_proj.lora_A.weight": rng.random((4, 32), np.float32),
            "base_model.model.layers.0.q_proj.lora_B.weight": rng.random((32, 4), np.float32),
        },
        str(directory / "adapter_model.safetensors"),
    )
    return directory


async def start_storage(
    make_agent: AgentFactory, name: str = "store", **config: object
) -> tuple[AgentRuntime, StoragePlugin]:
    """An agent with a storage plugin (``config`` its section); (its runtime, the plugin),
    announced at once (not at the next heartbeat: the plugin may start after the first)."""
    rt = await make_agent(name, roles=("storage",))  # only storage announces adapters
    plugin = StoragePlugin()
    await rt.host.add("storage", config, plugin=plugin)
    await rt.announcer.announce()
    return rt, plugin


async def adapters_island(
    make_agent: AgentFactory, base: Path, adapter_dir: Path, adapters: list[str]
) -> Island:
    """Storage, one local node serving the tiny model ``base`` (named as its directory) with
    the adapters under ``adapter_dir``, and a gateway; ``adapters`` registered as alice's."""
    await make_agent("store", roles=("storage",), plugins={"storage": {}}, heartbeat=0.2)
    local = {
        "backend": "local",
        "local": {"model": str(base), "embeddings": False},
        "adapter_dirs": [str(adapter_dir)],
    }
    await make_agent("gpu1", roles=("inference",), plugins={"inference": local}, heartbeat=0.2)
    isl = await Island(make_agent).start_gateway()
    await isl.models_seen(base.name)
    isl.key("alice")
    for adapter in adapters:
        isl.accounts.register_adapter(adapter, base_model=base.name, owner="alice", actor="test")
    return isl


async def training_island(make_agent: AgentFactory, tmp_path: Path) -> Island:
    """Storage, a training queue with its trainer, an inference node serving a tiny random
    model ("tiny-llama") and a gateway: the whole fine-tuning loop, each part an agent."""
    from support.tiny_models import build_tiny_model

    base = build_tiny_model(tmp_path / "tiny-llama")
    await make_agent("store", roles=("storage",), plugins={"storage": {}}, heartbeat=0.2)
    trainer = {
        "mode": "both",
        "device": "cpu",
        "heartbeat": 0.3,
        "poll": 0.5,
        "models": {"tiny-llama": str(base)},  # the overlay's name for the base model
        "model_cache": str(tmp_path / "models"),
    }
    await make_agent("trainer", roles=("training",), plugins={"training": trainer}, heartbeat=0.2)
    local = {"model": str(base), "embeddings": False}
    await make_agent(
        "gpu", roles=("inference",), plugins={"inference": {"local": local}}, heartbeat=0.2
    )
    isl = Island(make_agent)
    await (await isl.start_gateway()).models_seen("tiny-llama")
    await eventually(lambda: bool(isl.plugin.gateway.watch.discovery.select(plugin="training")))
    return isl


def colour_rows(n: int) -> list[dict[str, str]]:
    """``n`` Alpaca rows (instruction, output) for a fine-tuning job through the gateway."""
    return [
        {"instruction": f"Say the colour number {i}.", "output": f"The colour is blue {i}."}
        for i in range(n)
    ]


PREFERRED, REJECTED = "blue blue blue", "red red red"  # pair_rows' replies


def pair_rows(numbers: range) -> list[dict[str, Any]]:
    """OpenAI's preference rows for a dpo job, one a number: always the same preferred and
    non-preferred reply."""
    return [
        {
            "input": {"messages": [{"role": "user", "content": f"Say the colour number {i}."}]},
            "preferred_output": [{"role": "assistant", "content": PREFERRED}],
            "non_preferred_output": [{"role": "assistant", "content": REJECTED}],
        }
        for i in numbers
    ]


def metric_figures(events: list[FineTuningJobEvent]) -> list[dict[str, Any]]:
    """The figures of each metrics event (the SDK types an event's data as object)."""
    return [e.data for e in events if e.type == "metrics" and isinstance(e.data, dict)]


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


async def until_done(client: openai.AsyncOpenAI, job_id: str) -> tuple[Any, list[Any]]:
    """Poll the job until it ends (bounded: 120 s); (the final job, what was seen running)."""
    running = []
    for _ in range(600):
        job = await client.fine_tuning.jobs.retrieve(job_id)
        if job.status == "running":
            running.append(job)
        if job.status in ("succeeded", "failed", "cancelled"):
            return job, running
        await asyncio.sleep(0.2)
    raise AssertionError(f"job {job_id} still {job.status} after 120 s")
