"""The training plugin: a real queue, real trainers and a real storage agent on a real broker;
each job trains a tiny Llama with transformers + peft in its own process on the CPU."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from atoll.agent.contract import parse
from atoll.agent.errors import Forbidden, InvalidRequest, NoSuchMethod
from atoll.agent.node import Agent
from atoll.agent.plugins import Plugin
from atoll.agent.runtime import AgentRuntime
from atoll.broker.server import BrokerServer
from atoll.plugins.storage.contract.adapters import (
    AdapterNotFound,
    describe_adapter,
    fetch_adapter,
)
from atoll.plugins.storage.contract.datasets import (
    DatasetNotFound,
    describe_dataset,
    fetch_dataset,
    upload_dataset,
)
from atoll.plugins.storage.contract.resume import upload_resume_state
from atoll.plugins.storage.plugin import StoragePlugin
from atoll.plugins.training.auto import auto_batch_size, auto_epochs, resolve
from atoll.plugins.training.commands import train
from atoll.plugins.training.contract import (
    BASE_LEARNING_RATE,
    FINAL_STATES,
    FULL_VALID_PAIR_FIGURES,
    PAIR_FIGURES,
    VALID_PAIR_FIGURES,
    JobFinished,
    JobNotFound,
    JobOptions,
    JobRecord,
    cancel_job,
    events_subject,
    follow_events,
    get_job,
    job_events,
    list_jobs,
    submit_job,
)
from atoll.plugins.training.data import (
    IGNORE,
    TEMPLATES,
    DataError,
    build_examples,
    collate,
    hold_out,
    pack,
    preference_example,
    pt_examples,
    sft_example,
)
from atoll.plugins.training.figures import (
    RESULT_COLUMNS,
    RESULTS_NAME,
    StepRow,
    Tally,
    evaluate,
    write_results,
)
from atoll.plugins.training.plugin import TrainingPlugin
from atoll.plugins.training.runner import FINAL_METRICS
from atoll.plugins.training.trainer import TrainerWorker, detect_precisions
from atoll.tenancy.operator import OperatorStore
from support.island import pair_rows
from support.overlay import AgentFactory, eventually
from support.tiny_models import build_tiny_model, tiny_tokenizer

JOB_TIMEOUT = 90.0  # one tiny job: ~6 s of imports, under a second of training, on a free CPU
# What "auto" resolves to on this machine's CPU trainers (bf16 where the CPU has AVX512-BF16).
AUTO_PRECISION = "bf16" if "bf16" in detect_precisions("cpu") else "fp32"


# --- the island ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("base") / "tiny")


def chat_rows(n: int = 24) -> list[dict[str, Any]]:
    return [
        {"messages": [
            {"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": f"It is {2 * i}."},
        ]}
        for i in range(n)
    ]  # fmt: skip


def text_rows(n: int = 24) -> list[dict[str, Any]]:
    return [{"text": f"The quick brown fox number {i} jumps over the lazy dog."} for i in range(n)]


class Island:
    """A storage agent, a queue agent, a gateway-like client, and trainers added on demand."""

    def __init__(self, make_agent: AgentFactory, tmp_path: Path, tiny_base: Path) -> None:
        self.make_agent = make_agent
        self.tmp_path = tmp_path
        self.tiny_base = tiny_base
        self.trainers: dict[str, AgentRuntime] = {}

    async def start(self, **queue_config: Any) -> Island:
        self.storage_rt = await self.make_agent("store", heartbeat=0.2)
        self.storage = StoragePlugin()
        await self.storage_rt.host.add("storage", {}, plugin=self.storage)
        config = {"mode": "queue", "lost_after": 5.0} | queue_config
        self.queue_rt = await self.make_agent("queue", roles=("training",), heartbeat=0.2)
        self.queue = TrainingPlugin()
        await self.queue_rt.host.add("training", config, plugin=self.queue)
        self.client = (await self.make_agent("gw", roles=("gateway",))).agent
        return self

    async def add_dataset(
        self, rows: list[dict[str, Any]], owner: str, project: str | None = None
    ) -> str:
        path = self.tmp_path / f"rows-{len(list(self.tmp_path.glob('rows-*')))}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        record = await upload_dataset(self.client, "store", path, "rows", owner, project)
        return record.id

    async def add_trainer(self, name: str, **config: Any) -> TrainingPlugin:
        rt = await self.make_agent(name, roles=("training",), heartbeat=0.2)
        plugin = TrainingPlugin()
        config = {
            "mode": "trainer", "device": "cpu", "heartbeat": 0.3, "poll": 1.0,
            "model_cache": str(self.tmp_path / "models"),
            "models": {"tiny": str(self.tiny_base)},  # jobs name models, never paths
        } | config  # fmt: skip
        await rt.host.add("training", config, plugin=plugin)
        self.trainers[name] = rt
        return plugin

    def options(self, dataset: str, **changes: Any) -> dict[str, Any]:
        return {
            "model_name_or_path": "tiny", "dataset": [dataset], "lora_rank": 4,
            "per_device_train_batch_size": 4, "logging_steps": 1, "num_train_epochs": 2.0,
            "learning_rate": 0.01,
            "lr_scheduler_type": "constant", "suffix": "math",
        } | changes  # fmt: skip

    async def submit(self, owner: str = "alice", **changes: Any) -> JobRecord:
        dataset = await self.add_dataset(chat_rows(), owner)
        return await submit_job(self.client, "queue", owner, self.options(dataset, **changes))

    async def job(self, job_id: str) -> JobRecord:
        return await get_job(self.client, "queue", job_id)

    async def until(self, job_id: str, states: set[str], timeout: float = JOB_TIMEOUT) -> JobRecord:
        """Poll the job until it is in one of ``states``; bounded in time."""
        deadline = time.monotonic() + timeout
        while (job := await self.job(job_id)).state not in states:
            assert job.state not in FINAL_STATES, f"job ended {job.state}: {job.error}"
            assert time.monotonic() < deadline, f"job still {job.state} after {timeout}s"
            await asyncio.sleep(0.2)
        return job


@pytest.fixture
async def island(make_agent: AgentFactory, tmp_path: Path, tiny_base: Path) -> Island:
    return await Island(make_agent, tmp_path, tiny_base).start()


async def first_loss(island: Island, job_id: str) -> None:
    """Until the queue has a logged loss for the job (its process is training)."""
    deadline = time.monotonic() + JOB_TIMEOUT
    while not any("loss" in e for e in await job_events(island.client, "queue", job_id)):
        assert time.monotonic() < deadline, "no loss logged in time"
        await asyncio.sleep(0.2)


def trainer_worker(plugin: Plugin) -> TrainerWorker:
    """The worker of a training plugin that trains (mode "trainer" or "both")."""
    assert isinstance(plugin, TrainingPlugin) and plugin.worker is not None
    return plugin.worker


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie still answers kill(0) until reaped; the trainer reaps it with wait().
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    return True


# --- the whole loop -----------------------------------------------------------------------------


async def test_a_trainer_joining_later_trains_the_queued_job(island: Island, tmp_path) -> None:
    published: list[dict[str, Any]] = []
    job = await island.submit(suffix="math")
    await island.client.subscribe(events_subject(job.id), lambda p: published.append(p.data))
    assert job.state == "queued" and job.created_at <= job.queued_at  # type: ignore[operator]
    assert job.id.startswith("ftjob-") and job.attempt == 0 and job.adapter_id is None
    followed: list[dict[str, Any]] = []

    async def follow() -> None:
        async for event in follow_events(island.client, "queue", job.id, poll=0.5):
            followed.append(event)

    follower = asyncio.create_task(follow())
    await asyncio.sleep(1.0)
    assert (await island.job(job.id)).state == "queued"  # nobody to train it yet

    await island.add_trainer("t1")
    done = await island.until(job.id, {"completed"})
    assert done.trainer == "t1" and done.attempt == 1 and done.error is None
    assert done.adapter_id == f"alice/math-{job.id.removeprefix('ftjob-')}"
    assert set(FINAL_METRICS) <= set(done.metrics), done.metrics
    assert done.metrics["train_loss"] > 0 and done.metrics["train_runtime"] > 0
    assert done.queued_at <= done.started_at <= done.finished_at  # type: ignore[operator]

    events = await job_events(island.client, "queue", job.id)
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    states = [e["state"] for e in events if e["type"] == "state"]
    assert states == ["created", "queued", "training", "completed"]
    logs = [e for e in events if e["type"] == "log" and "loss" in e]
    assert len(logs) == 12  # 24 rows, batch 4, 2 epochs, a log every step
    assert {"step", "epoch", "loss", "learning_rate"} <= set(logs[0])
    assert logs[-1]["loss"] < logs[0]["loss"]  # it learned
    assert next(e for e in events if e["type"] == "metrics")["train_loss"] > 0
    assert done.last_event is not None and done.last_event["state"] == "completed"
    await asyncio.wait_for(follower, 10)
    assert [e["seq"] for e in followed] == seqs  # every event once, in order, then it ended
    await eventually(lambda: any(e.get("state") == "completed" for e in published))
    assert any("loss" in e for e in published)  # live, as the trainer logged them

    adapter = await describe_adapter(island.client, "store", done.adapter_id)
    assert (adapter.owner, adapter.source_job, adapter.base_model) == ("alice", job.id, "tiny")
    assert adapter.rank == 4
    assert (
        list(trainer_worker(island.trainers["t1"].host.plugins["training"]).workdir.iterdir()) == []
    )
    await check_adapter_changes_the_model(island, done.adapter_id, tmp_path)


async def check_adapter_changes_the_model(island: Island, adapter_id: str, tmp_path: Path) -> None:
    """The stored adapter loads in peft on the tiny base and makes a trained answer likelier."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    directory = await fetch_adapter(island.client, "store", adapter_id, tmp_path / "fetched")
    tok = tiny_tokenizer()
    messages = chat_rows(3)[2]["messages"]
    text = tok.apply_chat_template(messages, tokenize=False)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])

    def loss(model: Any) -> float:
        with torch.no_grad():
            return float(model(input_ids=ids, labels=ids).loss)

    base = AutoModelForCausalLM.from_pretrained(island.tiny_base).eval()
    before = loss(base)
    tuned = PeftModel.from_pretrained(base, directory).eval()
    assert loss(tuned) < before - 0.5


def read_csv(path: Path) -> list[dict[str, str]]:
    import csv

    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


async def test_accumulated_batches_make_the_steps_of_one_batch_their_size(island: Island) -> None:
    """Batches of 2 accumulated twice train as batches of 4: as many optimizer steps, each
    step's figures over all 4 examples, the same losses; OpenAI's batch_size counts them all.
    In fp32: bf16's rounding alone would part the two runs by about 1%."""
    await island.add_trainer("t1")
    runs = {}
    for batch, accumulated in ((4, 1), (2, 2)):
        job = await island.submit(
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulated,
            precision_type="fp32",
        )
        done = await island.until(job.id, {"completed"})
        events = await job_events(island.client, "queue", job.id)
        losses = {e["step"]: e["loss"] for e in events if e["type"] == "log" and "loss" in e}
        assert done.hyperparameters is not None
        runs[accumulated] = (done.hyperparameters.total_steps, losses, done.metrics)
    (steps, losses, metrics), (steps2, losses2, metrics2) = runs[1], runs[2]
    assert steps == steps2 == 12 and sorted(losses2) == list(range(1, 13))  # 24 rows, 2 epochs
    assert losses2 == pytest.approx(losses, rel=1e-3)
    assert metrics2["trained_tokens"] == metrics["trained_tokens"]


async def test_a_job_reports_its_figures_validation_and_results_file(island: Island) -> None:
    """A quarter of the rows held out: the queue's job says what it trained with, its events
    carry each step's loss and token accuracy and the validation set's after each epoch, and
    the results file (a CSV in storage, the owner's) holds the same figures for every step."""
    await island.add_trainer("t1")
    job = await island.submit(validation_split=0.25)  # 18 rows train, batch 4: 5 steps an epoch
    done = await island.until(job.id, {"completed"})
    examples, _ = build_examples(
        tiny_tokenizer(), "sft", [await rows_file(island, job.options.dataset[0])], "default", 256
    )
    trained, held = hold_out(examples, 0.25, job.options.seed)
    assert done.hyperparameters is not None
    assert done.hyperparameters.model_dump() == {
        "batch_size": 4, "n_epochs": 2.0, "learning_rate": 0.01, "lora_rank": 4,
        "lora_alpha": 8.0, "examples": 18, "validation_examples": 6, "total_steps": 10,
        "precision_type": AUTO_PRECISION, "packed_rows": None,
    }  # fmt: skip
    # Every token of the 18 examples, once an epoch.
    assert done.metrics["trained_tokens"] == 2 * sum(len(e["input_ids"]) for e in trained)
    assert len(held) == 6

    events = await job_events(island.client, "queue", job.id)
    resolved = [e for e in events if e["type"] == "hyperparameters"]
    assert len(resolved) == 1 and resolved[0]["hyperparameters"]["total_steps"] == 10
    steps = {e["step"]: e for e in events if e["type"] == "log" and "loss" in e}
    assert sorted(steps) == list(range(1, 11))  # logging every step
    assert all(0 <= e["train_mean_token_accuracy"] <= 1 for e in steps.values())
    assert all(e["estimated_finish"] >= e["at"] - 1 for e in steps.values())
    evals = [e for e in events if e["type"] == "log" and "valid_loss" in e]
    assert [e["step"] for e in evals] == [5, 10]  # after each epoch
    assert "full_valid_loss" not in evals[0]
    final = evals[-1]
    assert final["full_valid_loss"] == final["valid_loss"] == done.metrics["full_valid_loss"]
    accuracy = final["full_valid_mean_token_accuracy"]
    assert accuracy == done.metrics["full_valid_mean_token_accuracy"] and 0 <= accuracy <= 1
    assert evals[1]["valid_loss"] < evals[0]["valid_loss"]  # it learned what it was held out of

    assert len(done.result_files) == 1
    record = await describe_dataset(island.client, "store", done.result_files[0])
    assert (record.kind, record.owner, record.filename) == ("results", "alice", RESULTS_NAME)
    path = island.tmp_path / "results.csv"
    await fetch_dataset(island.client, "store", record.id, path, as_="original")
    rows = read_csv(path)
    assert tuple(rows[0]) == RESULT_COLUMNS
    assert [int(r["step"]) for r in rows] == list(range(1, 11))
    for row in rows:
        event = steps[int(row["step"])]
        assert float(row["train_loss"]) == pytest.approx(event["loss"], rel=1e-5)
        assert float(row["train_accuracy"]) == pytest.approx(
            event["train_mean_token_accuracy"], rel=1e-5
        )
    for row, evaluation in zip((rows[4], rows[9]), evals, strict=True):
        assert float(row["valid_loss"]) == pytest.approx(evaluation["valid_loss"], rel=1e-5)
        assert float(row["valid_mean_token_accuracy"]) == pytest.approx(
            evaluation["valid_mean_token_accuracy"], rel=1e-5
        )
    assert {r["valid_loss"] for i, r in enumerate(rows) if i not in (4, 9)} == {""}


async def rows_file(island: Island, dataset: str) -> Path:
    """The dataset's canonical chat rows, as its trainer reads them."""
    path = island.tmp_path / f"{dataset}.jsonl"
    await fetch_dataset(island.client, "store", dataset, path)
    return path


async def test_auto_is_resolved_from_the_examples(island: Island) -> None:
    """All three on "auto" for 24 rows: batch 1, 4 epochs (96 steps) at the LoRA rate."""
    await island.add_trainer("t1")
    auto = {"per_device_train_batch_size": "auto", "num_train_epochs": "auto"}
    job = await island.submit(learning_rate="auto", logging_steps=24, **auto)
    assert job.hyperparameters is None  # nothing resolved before a runner looks at the data
    done = await island.until(job.id, {"completed"})
    assert done.hyperparameters is not None
    resolved = done.hyperparameters
    assert (resolved.batch_size, resolved.n_epochs, resolved.learning_rate) == (1, 4.0, 2e-4)
    assert (resolved.examples, resolved.validation_examples, resolved.total_steps) == (24, 0, 96)
    logged = [e for e in await job_events(island.client, "queue", job.id) if "loss" in e]
    assert [e["step"] for e in logged] == [24, 48, 72, 96]
    assert all(e["max_steps"] == 96 for e in logged)
    assert "full_valid_loss" not in done.metrics


async def test_a_packed_job_trains_on_fewer_fuller_rows(island: Island) -> None:
    await island.add_trainer("t1")
    job = await island.submit(
        packing=True, cutoff_len=256, num_train_epochs=1, per_device_train_batch_size=1
    )
    done = await island.until(job.id, {"completed"})
    resolved = done.hyperparameters
    assert (
        resolved is not None
        and resolved.examples == 24
        and resolved.precision_type == AUTO_PRECISION
    )
    assert resolved.packed_rows is not None and resolved.packed_rows < 24
    assert resolved.total_steps == resolved.packed_rows  # batch 1: a row a step
    assert done.metrics["trained_tokens"] > 0


def test_packing_keeps_each_example_to_itself(tiny_base: Path) -> None:
    """A packed row's losses and logits are those of its examples run one by one: no token
    attends to another example, none is labelled from the one before it."""
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(tiny_base, attn_implementation="sdpa").eval()
    examples = [sft_example(tok, tok.chat_template, r["messages"], 64) for r in chat_rows(7)]
    kept = [e for e in examples if e is not None]
    width = 2 * max(len(e["input_ids"]) for e in kept) + 3
    rows = pack(kept, width)
    assert len(rows) < len(kept) and all(len(r["input_ids"]) <= width for r in rows)
    assert sum(len(r["input_ids"]) for r in rows) == sum(len(e["input_ids"]) for e in kept)
    alone = collate(kept, tok.pad_token_id)
    packed = collate(rows, tok.pad_token_id)
    assert "attention_mask" not in packed and int(packed["tokens"]) == int(alone["tokens"])
    with torch.no_grad():
        one_by_one = model(**{k: v for k, v in alone.items() if k != "tokens"})
        together = model(**{k: v for k, v in packed.items() if k != "tokens"})
    assert float(together.loss) == pytest.approx(float(one_by_one.loss), rel=1e-4)
    # Each example's logits, found in its row by its positions restarting at 0.
    for r, row in enumerate(rows):
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        for start, end in zip(starts, [*starts[1:], len(row["input_ids"])], strict=True):
            ids = row["input_ids"][start:end]
            e = next(i for i, x in enumerate(kept) if x["input_ids"] == ids)
            want = one_by_one.logits[e, : end - start]
            assert torch.allclose(together.logits[r, start:end], want, atol=1e-4)
            assert row["labels"][start] == IGNORE


def test_a_share_is_held_out_by_the_seed() -> None:
    examples = [{"input_ids": [i], "labels": [i]} for i in range(10)]
    kept, held = hold_out(examples, 0.25, seed=7)
    assert len(held) == 2 and len(kept) == 8  # round(2.5) == 2
    assert sorted(e["input_ids"][0] for e in kept + held) == list(range(10))
    assert hold_out(examples, 0.25, seed=7) == (kept, held)
    assert hold_out(examples, 0.25, seed=8) != (kept, held)
    assert len(hold_out(examples[:3], 0.01, seed=1)[1]) == 1  # at least one
    with pytest.raises(DataError, match="leaves none to train on"):
        hold_out(examples[:1], 0.5, seed=1)


def test_figures_agree_with_the_model_s_own_loss(tiny_base: Path, tmp_path: Path) -> None:
    """A tally's loss is the mean cross-entropy over labelled tokens, as transformers computes
    it; accuracy the share of them the argmax predicts; the results file has OpenAI's columns."""
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    examples = [sft_example(tok, tok.chat_template, r["messages"], 64) for r in chat_rows(5)]
    batch = collate([e for e in examples if e is not None], tok.pad_token_id)
    with torch.no_grad():
        out = model(**batch)
    tally = Tally()
    tally.add(out.logits, batch["labels"])
    assert tally.loss == pytest.approx(float(out.loss), rel=1e-5)
    shifted = batch["labels"][:, 1:]
    mask = shifted != IGNORE
    hits = out.logits[:, :-1].argmax(-1)[mask] == shifted[mask]
    assert tally.tokens == int(mask.sum())
    assert tally.accuracy == pytest.approx(float(hits.float().mean()))
    whole = evaluate(model, [e for e in examples if e is not None], 2, tok.pad_token_id)
    assert whole.loss == pytest.approx(tally.loss, rel=1e-5) and whole.correct == tally.correct
    assert not model.training

    path = tmp_path / RESULTS_NAME
    valid = {"valid_loss": 0.625, "valid_mean_token_accuracy": 0.5}
    write_results(path, [StepRow(2, 0.5, 0.75, valid=valid), StepRow(1, 1.0, 0.25)])
    assert path.read_text() == (
        "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy\n"
        "1,1,0.25,,\n2,0.5,0.75,0.625,0.5\n"
    )


# --- options ------------------------------------------------------------------------------------


GOOD = {"model_name_or_path": "tiny", "dataset": ["ds-0123456789ab"]}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"stage": "rl"}, "stage"),
        ({"model_name_or_path": ""}, "model_name_or_path"),
        ({"dataset": []}, "dataset"),
        ({"dataset": ["train.jsonl"]}, "dataset.0"),
        ({"dataset": ["ds-0123456789ab", "ds-0123456789ab"]}, "dataset"),
        ({"template": "gpt5"}, "template"),
        ({"lora_rank": 0}, "lora_rank"),
        ({"lora_rank": 512}, "lora_rank"),
        ({"lora_rank": "8"}, "lora_rank"),
        ({"lora_alpha": -1.0}, "lora_alpha"),
        ({"lora_target": ["q_proj", "q_proj"]}, "lora_target"),
        ({"lora_target": "q_proj,bad name"}, "lora_target"),
        ({"per_device_train_batch_size": 0}, "per_device_train_batch_size"),
        ({"gradient_accumulation_steps": 1.5}, "gradient_accumulation_steps"),
        ({"lr_scheduler_type": "exponential"}, "lr_scheduler_type"),
        ({"logging_steps": 0}, "logging_steps"),
        ({"save_steps": -5}, "save_steps"),
        ({"learning_rate": 0}, "learning_rate"),
        ({"learning_rate": 2.0}, "learning_rate"),
        ({"learning_rate": "1e-4"}, "learning_rate"),
        ({"num_train_epochs": 0}, "num_train_epochs"),
        ({"precision_type": "int8"}, "precision_type"),
        ({"packing": "yes"}, "packing"),
        ({"packing": True, "stage": "dpo"}, "packing"),
        ({"cutoff_len": 4}, "cutoff_len"),
        ({"seed": -1}, "seed"),
        ({"suffix": "my adapter"}, "suffix"),
        ({"warmup": 10}, "warmup"),
        ({"per_device_train_batch_size": "big"}, "per_device_train_batch_size"),
        ({"num_train_epochs": "Auto"}, "num_train_epochs"),
        ({"validation_split": 0}, "validation_split"),
        ({"validation_split": 0.51}, "validation_split"),
        ({"validation_dataset": "val.jsonl"}, "validation_dataset"),
    ],
)
def test_each_bad_option_is_refused_by_name(change: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        parse(JobOptions, GOOD | change, "job options")
    assert f"{field}:" in err.value.message or f"{field}." in err.value.message, err.value.message


def test_options_defaults_and_spellings() -> None:
    options = parse(JobOptions, GOOD | {"lora_target": "q_proj, v_proj"}, "job options")
    assert options.lora_target == ["q_proj", "v_proj"] and options.alpha == 32.0
    assert options.stage == "sft" and options.cutoff_len == 256 and options.precision_type == "auto"
    assert options.packing is False
    assert options.lora_rank == 16 and options.validation_split is None
    auto = (options.per_device_train_batch_size, options.num_train_epochs, options.learning_rate)
    assert auto == ("auto", "auto", "auto")
    assert parse(JobOptions, GOOD | {"num_train_epochs": 1}, "o").num_train_epochs == 1.0
    both = {"validation_split": 0.2, "validation_dataset": "ds-0123456789ab"}
    with pytest.raises(InvalidRequest, match="validation_dataset and validation_split exclude"):
        parse(JobOptions, GOOD | both, "job options")


def test_auto_follows_the_number_of_examples() -> None:
    """OpenAI's epoch rule (at least 100 examples seen, at most 25,000, 3 epochs between) and
    batches that leave at least 100 steps an epoch, up to 16."""
    epochs = {1: 25, 3: 25, 10: 10, 24: 4, 33: 3, 34: 3, 100: 3, 8333: 3, 8334: 2, 30000: 1}
    assert {n: auto_epochs(n) for n in epochs} == epochs
    sizes = {1: 1, 24: 1, 199: 1, 200: 2, 399: 2, 400: 4, 800: 8, 1600: 16, 10**6: 16}
    assert {n: auto_batch_size(n) for n in sizes} == sizes
    for n in (24, 250, 5000):  # every auto choice leaves at least 100 optimizer steps
        steps_per_epoch = -(-n // auto_batch_size(n))
        assert steps_per_epoch * auto_epochs(n) >= 96, n  # 24 examples: 4 epochs of 24
    options = parse(JobOptions, GOOD, "o")
    assert resolve(options, 24) == (1, 4, BASE_LEARNING_RATE, "fp32")
    assert resolve(options, 24, bf16=True).precision == "bf16"  # a GPU that has it
    # Packed: batches count the rows (400 examples in 100 rows: 1 a step), epochs the examples.
    assert resolve(options, 400, rows=100)[:2] == (1, 3)
    # The rate: the base up to 4 examples a step, then with their square root, at most twice.
    rates = {n: resolve(options, n).learning_rate / BASE_LEARNING_RATE for n in (24, 400, 800)}
    assert rates == pytest.approx({24: 1.0, 400: 1.0, 800: 2**0.5})
    assert resolve(options, 5000).learning_rate == pytest.approx(2 * BASE_LEARNING_RATE)
    stepped = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 4}
    assert resolve(parse(JobOptions, GOOD | stepped, "o"), 24).learning_rate == pytest.approx(
        2**0.5 * BASE_LEARNING_RATE
    )  # 8 examples a step
    given: dict[str, Any] = {"per_device_train_batch_size": 8, "num_train_epochs": 1.5}
    given |= {"learning_rate": 1e-3, "precision_type": "fp32"}
    assert resolve(parse(JobOptions, GOOD | given, "o"), 24, bf16=True) == (8, 1.5, 1e-3, "fp32")


async def test_submissions_are_checked(island: Island, make_agent: AgentFactory) -> None:
    dataset = await island.add_dataset(chat_rows(4), "alice", project="lab")
    with pytest.raises(InvalidRequest, match="learning_rate"):
        await submit_job(island.client, "queue", "alice", island.options(dataset, learning_rate=5))
    with pytest.raises(DatasetNotFound, match="no dataset 'ds-000000000000'"):
        await submit_job(island.client, "queue", "alice", island.options("ds-000000000000"))
    with pytest.raises(Forbidden, match="belongs to 'alice', not to 'bob'"):
        await submit_job(island.client, "queue", "bob", island.options(dataset))
    # A project member may train on the project's dataset.
    job = await submit_job(island.client, "queue", "bob", island.options(dataset), project="lab")
    assert job.project == "lab" and job.state == "queued"
    prose = await island.add_dataset(text_rows(4), "alice")
    with pytest.raises(InvalidRequest, match="sft job needs conversations"):
        await submit_job(island.client, "queue", "alice", island.options(prose))
    with pytest.raises(InvalidRequest, match="sft job needs conversations"):
        options = island.options(dataset, validation_dataset=prose)
        await submit_job(island.client, "queue", "alice", options, project="lab")
    carols = await island.add_dataset(chat_rows(4), "carol")
    with pytest.raises(Forbidden, match="belongs to 'carol', not to 'alice'"):
        options = island.options(dataset, validation_dataset=carols)
        await submit_job(island.client, "queue", "alice", options, project="lab")
    results = island.tmp_path / "step_metrics.csv"
    results.write_text("step,train_loss\n1,2.0\n")
    record = await upload_dataset(island.client, "store", results, "r", "alice", format="csv")
    for options in (
        island.options(record.id),
        island.options(dataset, validation_dataset=record.id),
    ):
        with pytest.raises(
            InvalidRequest, match="results file, not a dataset to train or validate"
        ):
            await submit_job(island.client, "queue", "alice", options, project="lab")
    with pytest.raises(InvalidRequest, match="owner"):
        await submit_job(island.client, "queue", "bad owner!", island.options(dataset))
    stranger = (await make_agent("stranger")).agent
    with pytest.raises(Forbidden, match="roles"):
        await submit_job(stranger, "queue", "alice", island.options(dataset))
    with pytest.raises(Forbidden, match=r"needs one of the roles training$"):
        await stranger.call("queue/training", "claim", {"capacity": 1, "device": "cpu"})
    with pytest.raises(JobNotFound):
        await get_job(island.client, "queue", "ftjob-000000000000")
    assert [j.id for j in await list_jobs(island.client, "queue", owner="bob")] == [job.id]
    assert await list_jobs(island.client, "queue", project="none") == []
    second = await submit_job(island.client, "queue", "bob", island.options(dataset), project="lab")
    newest_first = [j.id for j in await list_jobs(island.client, "queue", owner="bob")]
    assert newest_first == [second.id, job.id]
    page = await list_jobs(island.client, "queue", owner="bob", after=second.id, limit=5)
    assert [j.id for j in page] == [job.id]
    assert len(await list_jobs(island.client, "queue", limit=1)) == 1


# --- cancelling ---------------------------------------------------------------------------------


async def test_cancel_while_queued_only_by_its_owner_or_an_admin(
    island: Island, make_agent: AgentFactory
) -> None:
    job = await island.submit()
    with pytest.raises(Forbidden, match="only 'alice'"):
        await cancel_job(island.client, "queue", job.id, owner="mallory")
    with pytest.raises(Forbidden):
        await cancel_job(island.client, "queue", job.id)  # the gateway must name the owner
    lost = (await make_agent("lost", roles=("training",))).agent  # left a resume state, then died
    await upload_resume_state(lost, "store", job.id, 5, "alice/x", resume_files(island.tmp_path))
    cancelled = await cancel_job(island.client, "queue", job.id, owner="alice")
    assert cancelled.state == "cancelled" and cancelled.finished_at is not None
    await no_resume_state(island, job.id)  # nothing will resume it
    with pytest.raises(JobFinished, match="already cancelled"):
        await cancel_job(island.client, "queue", job.id, owner="alice")
    other = await island.submit(owner="carol")
    admin = (await make_agent("root", roles=("admin",))).agent
    assert (await cancel_job(admin, "queue", other.id)).state == "cancelled"
    await island.add_trainer("t1")  # finds nothing to claim
    await asyncio.sleep(1.5)
    assert {j.state for j in await list_jobs(island.client, "queue")} == {"cancelled"}


async def test_cancel_while_training_kills_the_process(island: Island) -> None:
    worker = trainer_worker(await island.add_trainer("t1"))
    job = await island.submit(num_train_epochs=500.0)  # far longer than the test
    await first_loss(island, job.id)
    process = worker.running[job.id].process
    assert process is not None and process.returncode is None
    cancelled = await cancel_job(island.client, "queue", job.id, owner="alice")
    assert cancelled.state == "cancelled"
    await eventually(lambda: job.id not in worker.running, timeout=15)
    assert process.returncode is not None and gone(process.pid)
    await asyncio.sleep(1.0)  # a late finish from the trainer would change nothing
    final = await island.job(job.id)
    assert final.state == "cancelled" and final.adapter_id is None
    # A cancelled job keeps nothing: no adapter, no checkpoint (not even one stored as the cancel
    # came), no resume state.
    assert final.checkpoints == []
    for _ in range(100):  # bounded: the trainer and the queue delete them aside
        if not await island.storage.store.list("adapters/"):
            break
        await asyncio.sleep(0.1)
    assert await island.storage.store.list("adapters/") == []


async def test_a_job_naming_a_path_is_refused_before_anything_runs(island: Island) -> None:
    """A job names one of the trainer's models, never a path on its host (which would train
    on whatever is there and tell, by its error, which paths exist)."""
    worker = trainer_worker(await island.add_trainer("t1"))
    for model in (str(island.tiny_base), "/etc/passwd"):
        job = await island.submit(model_name_or_path=model)
        failed = await island.until(job.id, {"failed"})
        assert failed.error == (
            f"checking the model: ValueError: model {model!r} is not one this trainer offers "
            "(SmolLM2-135M-Instruct, tiny)"
        )
    assert list(worker.workdir.iterdir()) == []


async def test_a_crashing_job_fails_with_the_process_s_reason(island: Island) -> None:
    # The operator mapped the model to a directory that is not there.
    worker = trainer_worker(await island.add_trainer("t1", models={"tiny": "/nowhere/model"}))
    job = await island.submit()
    failed = await island.until(job.id, {"failed"})
    assert "the training process exited with 1" in (failed.error or "")
    assert "ModelSpecError" in (failed.error or "") and "/nowhere/model" in (failed.error or "")
    assert failed.trainer == "t1" and failed.adapter_id is None and failed.finished_at
    await eventually(lambda: not worker.running)
    assert list(worker.workdir.iterdir()) == []


# --- lost trainers ------------------------------------------------------------------------------


async def test_a_stopped_trainer_s_job_is_finished_by_another(island: Island) -> None:
    models = {"tiny-llama": str(island.tiny_base)}  # the overlay's name for the base
    t1 = trainer_worker(await island.add_trainer("t1", models=models))
    dataset = await island.add_dataset(text_rows(), "alice")
    options = island.options(
        dataset, stage="pt", num_train_epochs=6.0, suffix="prose", model_name_or_path="tiny-llama"
    )
    job = await submit_job(island.client, "queue", "alice", options)
    await first_loss(island, job.id)
    process = t1.running[job.id].process
    assert process is not None
    await island.add_trainer("t2", models=models)
    await island.trainers["t1"].stop()  # leaves mid-job: discovery marks it LOST at once
    assert gone(process.pid)
    done = await island.until(job.id, {"completed"})
    assert done.trainer == "t2" and done.attempt == 2
    assert done.adapter_id == f"alice/prose-{job.id.removeprefix('ftjob-')}"
    events = await job_events(island.client, "queue", job.id)
    states = [e["state"] for e in events if e["type"] == "state"]
    assert states == ["created", "queued", "training", "queued", "training", "completed"]
    assert any("trainer t1 lost" in e["message"] for e in events)
    adapter = await describe_adapter(island.client, "store", done.adapter_id)
    assert adapter.meta["stage"] == "pt" and adapter.source_job == job.id
    assert adapter.base_model == "tiny-llama"


def resume_files(tmp_path: Path) -> Path:
    """A resume state's files, as a trainer would upload them."""
    directory = tmp_path / "resume-state"
    directory.mkdir(exist_ok=True)
    (directory / "trainer_state.json").write_text('{"global_step": 5}')
    return directory


async def no_resume_state(island: Island, job_id: str) -> None:
    """Until storage holds no resume state for the job (the queue drops it aside); bounded."""
    deadline = time.monotonic() + 10
    while await island.storage.resume.current(job_id) is not None:
        assert time.monotonic() < deadline, "the job's resume state is still kept"
        await asyncio.sleep(0.1)


def attempts(events: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The job's events split at each ``training`` state: one list per attempt."""
    split: list[list[dict[str, Any]]] = []
    for event in events:
        if event["type"] == "state" and event["state"] == "training":
            split.append([])
        elif split:
            split[-1].append(event)
    return split


def logged_steps(events: list[dict[str, Any]]) -> list[int]:
    return [e["step"] for e in events if e["type"] == "log" and "loss" in e]


# Each stage's checkpoint metrics, with a validation set.
SFT_CHECKPOINT_METRICS = {
    "step", "train_loss", "train_mean_token_accuracy", "valid_loss", "valid_mean_token_accuracy",
    "full_valid_loss", "full_valid_mean_token_accuracy",
}  # fmt: skip
DPO_CHECKPOINT_METRICS = {
    "step", "train_loss", *PAIR_FIGURES, "valid_loss", *VALID_PAIR_FIGURES, "full_valid_loss",
    *FULL_VALID_PAIR_FIGURES,
}  # fmt: skip


@pytest.mark.parametrize(
    ("stage", "rows", "figures"),
    [
        ("sft", chat_rows(), SFT_CHECKPOINT_METRICS),
        ("dpo", pair_rows(range(24)), DPO_CHECKPOINT_METRICS),
    ],
    ids=["sft", "dpo"],
)
async def test_a_lost_job_resumes_from_its_last_checkpoint(
    island: Island,
    operator: OperatorStore,
    broker: BrokerServer,
    stage: str,
    rows: list[dict[str, Any]],
    figures: set[str],
) -> None:
    """A checkpoint after each epoch, kept in storage as an adapter of its own (the last two
    here). Its trainer lost right after the first one, the job goes on from that checkpoint on
    another trainer: no optimizer step runs twice, and its figures are those of a job never
    interrupted (weights, optimizer, scheduler, RNG and data order all restored), a dpo job's
    pair figures and its validation pairs' too."""
    t1 = trainer_worker(await island.add_trainer("t1", keep_checkpoints=2))
    stored = asyncio.Event()
    store = t1._checkpoint

    async def store_then_hang(run: Any, event: dict[str, Any]) -> None:
        await store(run, event)
        stored.set()
        await asyncio.Event().wait()  # the process waits for a word that never comes

    t1._checkpoint = store_then_hang  # type: ignore[method-assign]
    dataset = await island.add_dataset(rows, "alice")
    # 18 examples train, batch 4: 5 steps an epoch, 20 in all.
    options = island.options(dataset, stage=stage, num_train_epochs=4.0, validation_split=0.25)
    job = await submit_job(island.client, "queue", "alice", options)
    await asyncio.wait_for(stored.wait(), JOB_TIMEOUT)
    await eventually(
        lambda: bool(island.queue.queue and island.queue.queue.get(job.id).checkpoints)
    )
    first = (await island.job(job.id)).checkpoints
    assert [c.step for c in first] == [5]
    await island.add_trainer("t2", keep_checkpoints=2)
    await island.trainers["t1"].stop()
    done = await island.until(job.id, {"completed"})
    assert done.trainer == "t2" and done.attempt == 2

    events = await job_events(island.client, "queue", job.id)
    one, two = attempts(events)
    assert logged_steps(one) == [1, 2, 3, 4, 5]
    assert logged_steps(two) == list(range(6, 21))  # from the checkpoint on, none twice
    assert any(e["message"] == "resuming from the checkpoint at step 5" for e in two)
    # Kept: the last two; the older ones are deleted from storage.
    base = done.adapter_id
    assert [(c.step, c.epoch, c.adapter_id) for c in done.checkpoints] == [
        (15, 3.0, f"{base}-ckpt-step-15"), (20, 4.0, f"{base}-ckpt-step-20")
    ]  # fmt: skip
    for step in (5, 10):
        with pytest.raises(AdapterNotFound):
            await describe_adapter(island.client, "store", f"{base}-ckpt-step-{step}")
    for kept in done.checkpoints:
        adapter = await describe_adapter(island.client, "store", kept.adapter_id)
        assert (adapter.owner, adapter.source_job, adapter.base_model) == ("alice", job.id, "tiny")
        assert set(kept.metrics) == figures
    await no_resume_state(island, job.id)  # dropped once the job ended
    target = ["-d", str(operator.root), "--tenant", "acme", "--broker", broker.url]
    shown = await asyncio.to_thread(
        CliRunner().invoke, train, ["checkpoints", job.id, "--queue", "queue", *target]
    )
    assert shown.exit_code == 0, shown.output
    lines = [line.split() for line in shown.stdout.splitlines()[1:]]  # newest first
    assert [(cells[0], cells[2]) for cells in lines] == [
        ("20", f"{base}-ckpt-step-20"), ("15", f"{base}-ckpt-step-15")
    ]  # fmt: skip

    # The same job never interrupted: the same figures at every step and in the results file.
    again = await submit_job(island.client, "queue", "alice", options)
    whole = await island.until(again.id, {"completed"})
    plain = await job_events(island.client, "queue", again.id)
    assert step_figures(events) == pytest.approx(step_figures(plain), rel=1e-4)
    assert done.metrics["trained_tokens"] == whole.metrics["trained_tokens"]
    final = {k: v for k, v in done.metrics.items() if k.startswith("full_")}
    assert set(final) == {k for k in figures if k.startswith("full_")}
    assert final == pytest.approx({k: whole.metrics[k] for k in final}, rel=1e-4)
    results = []
    for finished in (done, whole):
        path = island.tmp_path / f"{finished.id}.csv"
        await fetch_dataset(island.client, "store", finished.result_files[0], path, as_="original")
        results.append(read_csv(path))
    assert [int(r["step"]) for r in results[0]] == list(range(1, 21))
    for resumed, uninterrupted in zip(*results, strict=True):
        assert resumed.keys() == uninterrupted.keys()
        for column, cell in resumed.items():
            assert (cell == "") == (uninterrupted[column] == ""), (resumed["step"], column)
            if cell:
                assert float(cell) == pytest.approx(float(uninterrupted[column]), rel=1e-4)


def step_figures(events: list[dict[str, Any]]) -> dict[tuple[int, str], float]:
    """Every number of every logged step and evaluation, by (step, name); not times."""
    untimed = {"at", "seq", "estimated_finish"}
    return {
        (e["step"], k): v
        for e in events
        if e["type"] == "log" and "step" in e
        for k, v in e.items()
        if isinstance(v, float) and k not in untimed
    }


async def test_silent_trainers_fail_the_job_after_max_attempts(
    make_agent: AgentFactory, tmp_path: Path, tiny_base: Path
) -> None:
    island = await Island(make_agent, tmp_path, tiny_base).start(lost_after=1.0, max_attempts=2)
    job = await island.submit()
    ghosts = [(await make_agent(f"ghost{i}", roles=("training",))).agent for i in (1, 2)]

    async def claim(agent: Agent) -> dict[str, Any] | None:
        return await agent.call("queue/training", "claim", {"capacity": 1, "device": "cpu"})

    claimed = await claim(ghosts[0])  # and never heard from again
    assert claimed is not None and claimed["id"] == job.id and claimed["state"] == "training"
    await upload_resume_state(ghosts[0], "store", job.id, 5, "alice/x", resume_files(tmp_path))
    requeued = await island.until(job.id, {"queued"}, timeout=10)
    assert requeued.attempt == 1 and requeued.trainer == "ghost1"
    assert (await claim(ghosts[1]))["attempt"] == 2  # type: ignore[index]
    deadline = time.monotonic() + 10
    while (failed := await island.job(job.id)).state == "training":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    assert failed.state == "failed"
    assert failed.error == "trainers ghost1, ghost2 lost 2 times"
    await no_resume_state(island, job.id)
    # A late word from a lost trainer changes nothing.
    beat = {"id": job.id, "attempt": 2, "progress": {}, "events": []}
    reply = await ghosts[1].call("queue/training", "heartbeat", beat)
    assert reply["cancel"] is True and "failed" in reply["reason"]
    finish = {"id": job.id, "attempt": 2, "ok": True, "adapter_id": "x/y"}
    assert (await ghosts[1].call("queue/training", "finish", finish)) == {"accepted": False}
    assert (await island.job(job.id)).state == "failed"


async def test_a_precision_waits_for_a_trainer_that_has_it_or_is_refused(island: Island) -> None:
    """A job asking for a precision goes to a trainer that computes in it natively (as it
    says in its claims): others leave it while such a trainer is around, and fail it, saying
    why, when none is."""
    names = ("cpu1", "cpu2", "gpu1")
    cpu, avx, gpu = [(await island.make_agent(n, roles=("training",))).agent for n in names]

    async def claim(
        agent: Agent, device: str, precisions: list[str], capacity: int = 1
    ) -> dict[str, Any] | None:
        params = {"capacity": capacity, "device": device, "precisions": precisions}
        return await agent.call("queue/training", "claim", params)

    refused = await island.submit(precision_type="bf16")
    assert await claim(cpu, "cpu", ["fp32"]) is None
    failed = await island.job(refused.id)
    assert failed.state == "failed" and "needs a trainer that computes in it" in (
        failed.error or ""
    )
    assert "cpu1 (cpu) has fp32" in (failed.error or "")

    waiting = await island.submit(precision_type="bf16")
    assert await claim(avx, "cpu", ["fp32", "bf16"], capacity=0) is None  # has it, but full
    assert await claim(cpu, "cpu", ["fp32"]) is None
    assert (await island.job(waiting.id)).state == "queued"  # left for cpu2
    taken = await claim(avx, "cpu", ["fp32", "bf16"])
    assert taken is not None and taken["id"] == waiting.id and taken["trainer"] == "cpu2"

    half = await island.submit(precision_type="fp16")
    assert await claim(gpu, "cuda", ["fp32", "fp16"], capacity=0) is None
    assert await claim(avx, "cpu", ["fp32", "bf16"]) is None  # fp16: the GPU trainer's
    taken = await claim(gpu, "cuda", ["fp32", "fp16"])
    assert taken is not None and taken["id"] == half.id and taken["trainer"] == "gpu1"
    auto = await island.submit()  # "auto" goes to any trainer
    taken = await claim(cpu, "cpu", ["fp32"])
    assert taken is not None and taken["id"] == auto.id


def test_a_trainer_finds_the_precisions_its_cpu_has() -> None:
    """bf16 exactly where the CPU has AVX512-BF16 (which torch's oneDNN uses), as torch sees
    the same CPU; fp16 on no CPU."""
    import torch

    found = detect_precisions("cpu")
    assert found[0] == "fp32" and "fp16" not in found
    assert ("bf16" in found) == torch.cpu._is_avx512_bf16_supported()
    assert detect_precisions("mps") == ["fp32"]


async def test_jobs_survive_a_restart_of_the_queue(island: Island) -> None:
    job = await island.submit()
    await island.queue_rt.host.remove("training")
    restarted = TrainingPlugin()
    await island.queue_rt.host.add("training", {"mode": "queue"}, plugin=restarted)
    again = await island.job(job.id)
    assert again.state == "queued" and again.created_at == job.created_at
    assert len(await job_events(island.client, "queue", job.id)) == 2
    trainer_only = await island.add_trainer("t1", queue="nowhere")
    assert trainer_only.queue is None
    with pytest.raises(NoSuchMethod):
        await island.client.call("t1/training", "jobs", {})


async def test_one_agent_can_be_queue_and_trainer(make_agent: AgentFactory, tmp_path) -> None:
    """Mode "both": the trainer claims from the queue beside it (an RPC to its own agent)."""
    rt = await make_agent("solo", roles=("training", "admin"), heartbeat=0.2)
    await rt.host.add("storage", {}, plugin=StoragePlugin())
    plugin = TrainingPlugin()
    await rt.host.add("training", {"mode": "both", "device": "cpu", "poll": 0.5}, plugin=plugin)
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(4)))
    dataset = (await upload_dataset(rt.agent, "solo", path, "rows", "alice")).id
    options = {"model_name_or_path": "tiny", "dataset": [dataset], "precision_type": "fp16"}
    job = await submit_job(rt.agent, "solo", "alice", options)
    queue = plugin.queue
    assert queue is not None  # mode "both": it keeps the queue
    await eventually(lambda: queue.get(job.id).state == "failed", timeout=10)
    assert "solo (cpu) has fp32" in (queue.get(job.id).error or "")
    described = plugin.describe()
    assert described["capabilities"] == {
        "queue": True, "trainer": True, "device": "cpu", "capacity": 1,
        "precisions": detect_precisions("cpu"), "models": ["SmolLM2-135M-Instruct"],
    }  # fmt: skip
    assert described["load"] == {"jobs_queued": 0, "training_jobs": 0}


@pytest.mark.embedded
async def test_the_embedded_model_trains_under_its_overlay_id(
    island: Island, embedded_model: tuple[Path, Path, float]
) -> None:
    entry, _, _ = embedded_model
    await island.add_trainer("t1", model_cache=str(entry.parent))  # converted once, reused
    dataset = await island.add_dataset(chat_rows(8), "alice")
    options = island.options(
        dataset, model_name_or_path="SmolLM2-135M-Instruct", num_train_epochs=1.0, cutoff_len=64,
        lora_target=["q_proj", "v_proj"], learning_rate=1e-4,
    )  # fmt: skip
    job = await submit_job(island.client, "queue", "alice", options)
    done = await island.until(job.id, {"completed"}, timeout=180)
    assert done.metrics["train_steps_per_second"] > 0
    adapter = await describe_adapter(island.client, "store", done.adapter_id or "")
    assert adapter.base_model == "SmolLM2-135M-Instruct"
    assert sorted({t.rsplit(".", 1)[-1] for t in adapter.target_modules}) == ["q_proj", "v_proj"]


# --- training data ------------------------------------------------------------------------------


def test_sft_labels_only_the_assistant_replies() -> None:
    tok = tiny_tokenizer()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And 2?"},
        {"role": "assistant", "content": "Two"},
    ]
    for name in ("default", *TEMPLATES):
        template = tok.chat_template if name == "default" else TEMPLATES[name]
        example = sft_example(tok, template, messages, 1024)
        assert example is not None
        pairs = zip(example["input_ids"], example["labels"], strict=True)
        text = tok.decode([i for i, label in pairs if label != IGNORE])
        assert text.startswith("Paris.") and "Two" in text, (name, text)
        assert "France" not in text and "brief" not in text and "And 2" not in text
    short = sft_example(tok, TEMPLATES["chatml"], messages, 8)  # cut before any reply
    assert short is None


def test_a_preference_pair_is_labelled_on_its_reply_only() -> None:
    """A dpo pair in TRL's shape: the whole prompt (earlier answers too), then each reply with
    its end of turn, which is all that is scored; a pair whose reply is cut off is dropped."""
    tok = tiny_tokenizer()
    row = {
        "messages": [
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And of Peru?"},
        ],
        "chosen": "Lima.",
        "rejected": "Quito.",
    }
    pair = preference_example(tok, tok.chat_template, row, 1024)
    assert pair is not None
    prompt = tok.decode(pair["prompt_ids"])
    assert "Capital of France?" in prompt and "Paris." in prompt and "And of Peru?" in prompt
    assert prompt.endswith("assistant\n") and "Lima" not in prompt, prompt
    for side, reply in (("chosen", "Lima."), ("rejected", "Quito.")):
        assert tok.decode(pair[f"{side}_ids"]).strip() == f"{reply}<|im_end|>"
    assert preference_example(tok, tok.chat_template, row, 16) is None


def test_templates_that_do_not_render_prefixes_are_refused() -> None:
    tok = tiny_tokenizer()
    counting = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    with pytest.raises(DataError, match="prefix"):
        sft_example(tok, counting, messages, 64)


def test_pt_joins_documents_into_blocks(tmp_path: Path) -> None:
    tok = tiny_tokenizer()
    blocks = pt_examples(tok, ["hello world", "the quick brown fox"], 4)
    flat = [t for b in blocks for t in b["input_ids"]]
    assert all(len(b["input_ids"]) <= 4 for b in blocks)
    assert flat.count(tok.eos_token_id) == 2 and blocks[0]["labels"] == blocks[0]["input_ids"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl line 2: no 'text' field"):
        build_examples(tok, "pt", [bad], "default", 16)
