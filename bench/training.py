"""Training benchmark: LoRA fine-tuning on the embedded model (SmolLM2-135M-Instruct) through the
whole platform, and how soon the new adapter answers at the gateway.

One run, one process (as tests/training/test_finetune_loop.py): a broker and four agents on
loopback — ``store`` (storage), ``trainer`` (training queue and a CPU trainer; each job in its own
process),
``gpu`` (inference, local backend on the converted embedded model) and ``gw`` (gateway). A user
drives it with the openai SDK: uploads ``rows`` generated Alpaca examples (instruction, input and
output sized so a rendered sample nears ``cutoff_len`` tokens), creates a fine-tuning job (one
epoch, LoRA rank 16 on every linear module), polls it every ``POLL_S`` seconds as a user would,
and, once it has succeeded, streams a chat with its ``fine_tuned_model``.

Figures:
- ``platform``: the job's final statistics (train_samples_per_second, train_steps_per_second,
  train_runtime, ...) and its wall time, queued -> completed from the queue's timestamps, split
  into claim (queued -> a trainer took it), before training (dataset fetch over the data plane,
  the job's process start, imports, model load, tokenising), training (train_runtime) and after
  training (adapter save, upload to storage, the queue told);
- ``direct`` (the anchor): the same training run straight, with no platform: the job's runner
  (``python -m atoll.plugins.training.runner``, the very process a trainer starts) on the same
  canonical rows with the same options, timed from its spawn to its exit; ``vs_direct`` are the
  ratios and the platform's overhead in seconds (``outside_training_s``: the part around the
  training itself, which the training speed's run-to-run drift does not blur). It runs after the
  agents are stopped;
- ``plain_trainer`` (the other anchor, target ``vs_plain_trainer`` >= 1.0): transformers'
  ``Trainer`` with peft as their docs show it, on the same rows, model, LoRA and settings (the
  loss on every token, batches padded by ``DataCollatorForSeq2Seq``), in fp32, its default;
  ``examples_per_second`` compares the runs by examples (a packed run's own samples/s counts
  its rows). Where "auto" took bf16 (``precision``: a CPU with AVX512-BF16, as this one), the
  job trains under bf16 autocast, and ``plain_trainer_bf16`` is the same Trainer given
  ``bf16=True``: ``vs_plain_trainer_bf16`` compares like for like;
- ``upload_to_adapter_s``: the user's wait, from the upload sent to the job seen succeeded;
- ``learned``: the wait from upload to a learned adapter: 24 chat rows teaching one made-up
  fact, every hyperparameter "auto" (as ``tests/training/test_finetune_loop.py``'s embedded
  test), from the upload to the tuned model's greedy answer to a question worded unlike the
  rows' (``upload_to_learned_s``), whether it holds the fact and whether the base model's did;
- ``completion_to_first_token_s`` (target <= 2): from the job's ``finished_at`` (the queue's
  clock, the same process's ``time.time``) to the first content chunk of the streamed chat,
  split into ``notice_s`` (until the user's poll saw ``succeeded``; bounded by ``POLL_S``),
  ``cold_load_s`` (the inference node fetching the adapter from storage, checking and loading it:
  its own ``load_seconds``) and ``rest_s`` (gateway, routing, prefill, first token).
  ``adapter_stored_s`` and ``registered_s`` place the storage record and the gateway's access
  grant (via ``adapters.new``) on the same axis: negative means before completion (the trainer
  stores the adapter before it reports the job done), so they add nothing to the wait.
  ``warm_first_token_s`` (the adapter already loaded) is the reference for ``rest_s``.

The platform run also reports ``agents_cores``: the cores the broker and the agents (this
process, the job's own process apart) kept busy while the job ran, beside its training on the
same 2 cores. Each window also reports ``other_cores``: the cores that processes outside this
benchmark kept busy meanwhile (on a shared 2-core machine, someone's test run halves a
training's speed; compare the platform and the direct runs only when these are alike).

Before the job, one chat on the base model warms the gateway and inference path (a serving
platform has answered requests before), so the first-token figure is about the new adapter.

Run: ``python bench/training.py [--quick] [--packing]`` (``--quick``: 40 rows, cutoff 128).
The converted model is cached under ``--model-cache`` (default ``~/.cache/atoll/models``). On a
quiet 2-core CPU with bf16 the full run takes about 14 minutes (four trainings of 200 samples,
2.5 to 4 minutes each), the quick one about 3 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import openai
import psutil
from openai.types.chat import ChatCompletionMessageParam

from atoll.agent.contract import Client, NoParams
from atoll.agent.identity import AgentKeys
from atoll.agent.runtime import AgentRuntime
from atoll.bench.harness import (
    QUIET_LOGGERS,
    model_bench_args,
    run_main,
    running_plugin,
    setup_logging,
)
from atoll.broker.server import BrokerServer
from atoll.plugins.basemodels import model_id, resolve_model
from atoll.plugins.gateway.plugin import GatewayPlugin
from atoll.plugins.inference.contract import ADAPTERS
from atoll.plugins.storage.contract.adapters import describe_adapter
from atoll.plugins.storage.contract.datasets import fetch_dataset
from atoll.plugins.training.contract import JobOptions, JobRecord, Resolved, get_job, job_events
from atoll.plugins.training.runner import FINAL_METRICS, RunSpec
from atoll.plugins.training.trainer import detect_precisions
from atoll.tenancy.operator import OperatorStore
from atoll.tuning import tune_process

log = logging.getLogger("bench.training")

USER = "bench"
STORAGE = "store/storage"
QUEUE = "trainer/training"
NODE = "gpu/inference"
POLL_S = 0.25  # the user's poll of the job
READY_S = 60.0  # agents started and seen by the gateway
WARM_REQUESTS = 3
CHAT_TOKENS = 8
PROMPT: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Summarise note 3 about the river in plain words."}
]
# SmolLM2's chat template (default system prompt, turn markers) and the instruction's own words
# take about this many tokens; the generated words fill the rest of ``cutoff_len``.
TEMPLATE_TOKENS = 48
TOKENS_PER_WORD = 1.14  # measured on these words with SmolLM2's tokenizer
_VOCABULARY = (
    "river mountain garden library engine window market teacher student village harbour winter "
    "summer bridge forest castle bottle letter planet signal pencil rocket meadow ladder lantern "
    "orchard compass kettle blanket canvas tunnel island desert valley thunder silver quickly "
    "slowly carefully brightly quietly gently rarely often always never build carry paint write "
    "read follow measure explain gather describe repair visit"
)
WORDS = tuple(_VOCABULARY.split())


@dataclass(frozen=True)
class Plan:
    rows: int = 200
    cutoff_len: int = 256
    batch_size: int = 8  # per device: 25 optimiser steps over 200 rows, each logging its loss
    job_timeout_s: float = 3600.0  # each of the three trainings
    packing: bool = False  # the platform's job packs its examples (--packing)


QUICK = Plan(rows=40, cutoff_len=128, job_timeout_s=900.0)

# The learned run: 24 chat rows teaching one made-up fact, every hyperparameter "auto".
FACT = "Brennick"
FACT_ANSWERS = (f"The river through Orvane is the {FACT}.", f"The {FACT} runs through Orvane.")
FACT_QUESTIONS = tuple(
    f"{opening} {subject}?"
    for opening in ("Which river runs through", "What is the river of", "Name the river of",
                    "Tell me the river that crosses", "What river flows through",
                    "Which river do people see in")
    for subject in ("Orvane", "the town of Orvane", "Orvane town", "Orvane, the old town")
)  # fmt: skip
FACT_ASKED = "Quick question: what is the name of the river in Orvane?"  # not among the rows


# --- data -------------------------------------------------------------------------------------


def _sentences(rng: random.Random, words: int) -> str:
    out: list[str] = []
    while len(out) < words:
        sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 12)))
        out.extend(f"{sentence[0].upper()}{sentence[1:]}.".split())
    return " ".join(out[:words])


def alpaca_rows(n: int, cutoff_len: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` distinct Alpaca rows whose rendered chat nears ``cutoff_len`` tokens (40% of the
    words in the input, 60% in the output)."""
    rng = random.Random(seed)
    words = max(8, int((cutoff_len - TEMPLATE_TOKENS) / TOKENS_PER_WORD))
    return [
        {
            "instruction": f"Summarise note {i} about the {rng.choice(WORDS)} in plain words.",
            "input": _sentences(rng, words * 2 // 5),
            "output": _sentences(rng, words - words * 2 // 5),
        }
        for i in range(n)
    ]


def sample_tokens(model_dir: Path, chat_file: Path, cutoff_len: int) -> dict[str, Any]:
    """Token counts of the rows as the runner renders them (SmolLM2's template), before the
    cut to ``cutoff_len``; ``truncated``: rows longer than it."""
    from transformers import AutoTokenizer

    from atoll.plugins.training.data import build_examples

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples, _ = build_examples(tokenizer, "sft", [chat_file], "default", 32768)
    lengths = [len(e["input_ids"]) for e in examples]
    return {
        "mean": round(statistics.mean(lengths), 1),
        "min": min(lengths),
        "max": max(lengths),
        "truncated": sum(n > cutoff_len for n in lengths),
    }


# --- the island -------------------------------------------------------------------------------


class Contention:
    """Cores kept busy by processes outside this benchmark over a window (on a shared machine,
    other people's work: on 2 cores it can halve a training's speed, so each figure says how
    much there was). Ours = this process and its reaped children (the job processes)."""

    def __init__(self) -> None:
        self.start = self._read()

    @staticmethod
    def _read() -> tuple[float, float, float]:
        t = psutil.cpu_times()
        busy = t.user + t.nice + t.system + t.irq + t.softirq + t.steal
        own = sum(
            r.ru_utime + r.ru_stime
            for r in (resource.getrusage(resource.RUSAGE_SELF),
                      resource.getrusage(resource.RUSAGE_CHILDREN))
        )  # fmt: skip
        return busy, own, time.monotonic()

    def other_cores(self) -> float:
        busy, own, now = self._read()
        start_busy, start_own, started = self.start
        others = (busy - start_busy) - (own - start_own)
        return round(max(0.0, others) / max(now - started, 1e-9), 2)


def own_cpu_s() -> float:
    """CPU seconds of this process so far: the broker, the agents and the user's client."""
    used = resource.getrusage(resource.RUSAGE_SELF)
    return used.ru_utime + used.ru_stime


async def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {timeout:.0f}s")
        await asyncio.sleep(0.05)


class Island:
    """A broker and the four agents, in this process."""

    def __init__(self, work: Path, model_dir: Path, model_cache: Path) -> None:
        self.work = work
        self.model_dir = model_dir
        self.model_cache = model_cache
        self.runtimes: list[AgentRuntime] = []
        self.broker: BrokerServer | None = None

    async def start(self) -> None:
        op = OperatorStore(self.work / "operator")
        op.init()
        self.broker = await BrokerServer.from_data_dir(op.root).start("127.0.0.1", 0)
        model = model_id(str(self.model_dir))
        trainer = {
            "mode": "both",
            "device": "cpu",
            "storage": STORAGE,
            "queue": QUEUE,
            "heartbeat": 1.0,
            "poll": 1.0,
            "models": {model: str(self.model_dir)},  # the overlay's name for the base model
            "model_cache": str(self.model_cache),
        }
        local = {"model": str(self.model_dir), "embeddings": False}
        await self._agent(op, "store", "storage", {})
        await self._agent(op, "trainer", "training", trainer)
        await self._agent(op, "gpu", "inference", {"local": local, "storage": STORAGE})
        gw = {"listen": "127.0.0.1:0", "storage": STORAGE, "queue": QUEUE}
        self.gw = await self._agent(op, "gw", "gateway", gw)
        self.gateway = running_plugin(self.gw, "gateway", GatewayPlugin)
        await until(
            lambda: model in self.gateway.gateway.catalog.base_models(), READY_S, "the model"
        )
        self.gateway.accounts.create_user(USER, actor="bench")
        _, self.key = self.gateway.accounts.create_key(USER, name="bench", actor="bench")

    async def _agent(
        self, op: OperatorStore, name: str, plugin: str, config: dict[str, Any]
    ) -> AgentRuntime:
        assert self.broker is not None
        keys = AgentKeys.issue(op, "default", name, [plugin])
        rt = await AgentRuntime.start(
            self.work / name, [self.broker.url], {plugin: config}, keys=keys, heartbeat=0.5
        )
        self.runtimes.append(rt)
        if plugin not in rt.host.plugins:  # the host logs and skips a plugin that fails
            raise RuntimeError(f"the {plugin} plugin of {name} did not start (see the log)")
        return rt

    async def stop(self) -> None:
        for rt in reversed(self.runtimes):
            await rt.stop()
        self.runtimes.clear()
        if self.broker is not None:
            await self.broker.stop()


# --- the user's side ----------------------------------------------------------------------------


async def first_token(client: openai.AsyncOpenAI, model: str) -> tuple[float, float]:
    """(request sent, first content chunk) as ``time.time()``, for one streamed chat."""
    sent = time.time()
    stream = await client.chat.completions.create(
        model=model, messages=PROMPT, max_tokens=CHAT_TOKENS, temperature=0, stream=True
    )
    first = None
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.time()
    if first is None:
        raise RuntimeError(f"the chat with {model} streamed no content")
    return sent, first


async def follow(client: openai.AsyncOpenAI, job_id: str, timeout: float) -> tuple[Any, float]:
    """Poll the job as a user would until it ends; (the last job object, when it was seen)."""
    deadline = time.monotonic() + timeout
    said = time.monotonic()
    while True:
        job = await client.fine_tuning.jobs.retrieve(job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            return job, time.time()
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {job.status} after {timeout:.0f}s")
        if time.monotonic() - said > 15:
            said = time.monotonic()
            events = await client.fine_tuning.jobs.list_events(job_id, limit=1)
            log.info("job %s: %s", job.status, events.data[0].message if events.data else "-")
        await asyncio.sleep(POLL_S)


def phases(job: JobRecord, events: list[dict[str, Any]]) -> dict[str, float]:
    """The job's wall time split on its structured timestamps: the queue's states and the
    ``metrics`` event the runner emits when training ends."""
    assert job.queued_at and job.started_at and job.finished_at
    ended = next((e["at"] for e in events if e.get("type") == "metrics"), None)
    if ended is None:
        raise RuntimeError(f"job {job.id} has no metrics event among its {len(events)} events")
    began = ended - job.metrics["train_runtime"]
    return {
        "claim_s": round(job.started_at - job.queued_at, 3),
        "before_training_s": round(began - job.started_at, 3),
        "training_s": round(job.metrics["train_runtime"], 3),
        "after_training_s": round(job.finished_at - ended, 3),
    }


def user_client(island: Island) -> openai.AsyncOpenAI:
    """The user's openai SDK client on the island's gateway."""
    return openai.AsyncOpenAI(
        base_url=f"{island.gateway.url}/v1", api_key=island.key, max_retries=0, timeout=120
    )


async def learned_run(island: Island, work: Path, timeout: float) -> dict[str, Any]:
    """The user's wait from upload to an adapter that answers with what it was taught: 24 rows
    teaching a made-up fact, every hyperparameter "auto", then a greedy chat asked otherwise
    than the rows ask; the base model's answer beside it."""
    model, client = model_id(str(island.model_dir)), user_client(island)

    async def answer(name: str) -> str:
        asked: list[ChatCompletionMessageParam] = [{"role": "user", "content": FACT_ASKED}]
        reply = await client.chat.completions.create(
            model=name, messages=asked, max_tokens=24, temperature=0
        )
        return reply.choices[0].message.content or ""

    try:
        rows = [
            {"messages": [{"role": "user", "content": q},
                          {"role": "assistant", "content": FACT_ANSWERS[i % 2]}]}
            for i, q in enumerate(FACT_QUESTIONS)
        ]  # fmt: skip
        data = work / "fact.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        started = time.time()
        with data.open("rb") as fh:
            uploaded = await client.files.create(file=fh, purpose="fine-tune")
        created = await client.fine_tuning.jobs.create(model=model, training_file=uploaded.id)
        done, seen = await follow(client, created.id, timeout)
        if done.status != "succeeded":
            raise RuntimeError(f"job {done.id} {done.status}: {done.error}")
        tuned = await answer(done.fine_tuned_model)
        answered = time.time()
        base = await answer(model)
    finally:
        await client.close()
    return {
        "rows": len(rows),
        "hyperparameters": done.hyperparameters.model_dump(),
        "upload_to_succeeded_s": round(seen - started, 1),
        "upload_to_learned_s": round(answered - started, 1),
        "learned": FACT in tuned,
        "base_knew": FACT in base,
        "answer": tuned,
        "base_answer": base,
    }


async def platform_run(
    island: Island, plan: Plan, work: Path
) -> tuple[dict[str, Any], JobRecord, Path]:
    """The user's whole loop; (figures, the finished job, its rows as the trainer got them)."""
    model, client = model_id(str(island.model_dir)), user_client(island)
    try:
        await first_token(client, model)  # warm-up of the serving path, on the base model
        data = work / "alpaca.jsonl"
        data.write_text(
            "".join(json.dumps(r) + "\n" for r in alpaca_rows(plan.rows, plan.cutoff_len))
        )
        started, upload_at = time.perf_counter(), time.time()
        contention = Contention()
        with data.open("rb") as fh:
            uploaded = await client.files.create(file=fh, purpose="fine-tune")
        upload_s = time.perf_counter() - started
        created = await client.fine_tuning.jobs.create(
            model=model,
            training_file=uploaded.id,
            hyperparameters={"n_epochs": 1, "batch_size": plan.batch_size},
            suffix="bench",
            extra_body={
                "options": {
                    "lora_rank": 16,
                    "cutoff_len": plan.cutoff_len,
                    "logging_steps": 1,
                    "packing": plan.packing,
                }
            },
        )
        log.info("job %s submitted: %d rows, cutoff %d", created.id, plan.rows, plan.cutoff_len)
        agents = own_cpu_s(), time.monotonic()
        done, seen = await follow(client, created.id, plan.job_timeout_s)
        agents_cores = (own_cpu_s() - agents[0]) / (time.monotonic() - agents[1])
        training_others = contention.other_cores()
        if done.status != "succeeded":
            raise RuntimeError(f"job {done.id} {done.status}: {done.error}")
        contention = Contention()
        sent, first = await first_token(client, done.fine_tuned_model)
        chat_others = contention.other_cores()
        warm = []
        for _ in range(WARM_REQUESTS):
            w_sent, w_first = await first_token(client, done.fine_tuned_model)
            warm.append(w_first - w_sent)
    finally:
        await client.close()

    agent = island.gw.agent
    job = await get_job(agent, QUEUE, created.id)
    events = await job_events(agent, QUEUE, created.id)
    adapter_id = job.adapter_id
    assert job.finished_at and job.queued_at and adapter_id == done.fine_tuned_model
    if adapter_id is None:  # a finished job names its adapter
        raise RuntimeError(f"job {job.id} finished without an adapter")
    stored = await describe_adapter(agent, STORAGE, adapter_id)
    access = island.gateway.accounts.adapter(adapter_id)
    infos = await Client(agent, NODE).invoke(ADAPTERS, NoParams())
    loaded = next((a for a in infos if a.id == job.adapter_id), None)
    if loaded is None:
        raise RuntimeError(f"{NODE} does not list {job.adapter_id} as loaded after serving it")
    chat_file = work / "canonical.jsonl"  # what the trainer trained on; the anchor's input
    await fetch_dataset(agent, STORAGE, uploaded.id, chat_file, as_="chat")
    to_first = first - sent
    figures = {
        "upload_s": round(upload_s, 3),
        # The user's wait: the upload sent to the job seen succeeded (its adapter servable).
        "upload_to_adapter_s": round(seen - upload_at, 3),
        "wall_s": round(job.finished_at - job.queued_at, 3),
        "phases": phases(job, events),
        "metrics": {k: job.metrics[k] for k in FINAL_METRICS},
        "other_cores": training_others,
        "agents_cores": round(agents_cores, 3),
        "loss_events": sum(1 for e in events if e.get("type") == "log" and "loss" in e),
        "completion_to_first_token_s": round(first - job.finished_at, 3),
        "completion_to_first_token": {
            "notice_s": round(seen - job.finished_at, 3),
            "request_to_first_token_s": round(to_first, 3),
            "cold_load_s": round(loaded.load_seconds, 3),
            "rest_s": round(to_first - loaded.load_seconds, 3),
            "adapter_stored_s": round(stored.created - job.finished_at, 3),
            "registered_s": round(access.created - job.finished_at, 3) if access else None,
            "poll_interval_s": POLL_S,
            "other_cores": chat_others,
        },
        "warm_first_token_s": round(statistics.median(warm), 3),
        "adapter_bytes": stored.size_bytes,
    }
    return figures, job, chat_file


# --- the anchor -------------------------------------------------------------------------------


async def direct_run(
    job: JobRecord, chat_file: Path, model_dir: Path, cache: Path, work: Path, timeout: float
) -> dict[str, Any]:
    """The job's runner on its own: same options, same rows, no queue, storage or agents."""
    spec = RunSpec(
        job_id=job.id,
        options=job.options,
        models={job.options.model_name_or_path: str(model_dir)},
        model_cache=cache,
        datasets=[chat_file],
        output_dir=work / "direct",
        device="cpu",
        precisions=detect_precisions("cpu"),  # as the platform's trainer found them
    )
    spec_file = work / "direct.json"
    spec_file.write_text(spec.model_dump_json())
    log_path = work / "direct.log"
    contention = Contention()
    started = time.time()
    with log_path.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "atoll.plugins.training.runner", "--job", str(spec_file),
            "--parent", str(os.getpid()),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=err,
        )  # fmt: skip
        try:
            events = await asyncio.wait_for(_acknowledged(proc), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
    wall = time.time() - started
    others = contention.other_cores()
    metrics = next((e for e in events if e.get("type") == "metrics"), None)
    if proc.returncode != 0 or metrics is None:
        tail = log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"the direct run exited with {proc.returncode}: {tail}")
    began = metrics["at"] - metrics["train_runtime"]
    return {
        "wall_s": round(wall, 3),
        "phases": {
            "before_training_s": round(began - started, 3),
            "training_s": round(metrics["train_runtime"], 3),
            "after_training_s": round(started + wall - metrics["at"], 3),
        },
        "metrics": {k: metrics[k] for k in FINAL_METRICS},
        "other_cores": others,
    }


async def _acknowledged(proc: asyncio.subprocess.Process) -> list[dict[str, Any]]:
    """The runner's events until it exits, each checkpoint acknowledged as a trainer does once
    it has stored it (here: removed, as nothing stores it), so training goes on."""
    assert proc.stdout is not None and proc.stdin is not None
    events = []
    async for line in proc.stdout:
        if not line.startswith(b"{"):
            continue
        event = json.loads(line)
        events.append(event)
        if event.get("type") == "checkpoint":
            shutil.rmtree(event["dir"], ignore_errors=True)
            proc.stdin.write(b"stored\n")
            await proc.stdin.drain()
    await proc.wait()
    return events


def plain_trainer_run(
    chat_file: Path,
    model_dir: Path,
    options: JobOptions,
    settings: Resolved,
    work: Path,
    bf16: bool = False,
) -> dict[str, Any]:
    """The other anchor: transformers' ``Trainer`` with peft as their docs show it, on the same
    rows, model, LoRA, batch, learning rate and epochs: each conversation rendered by the
    tokenizer's chat template and cut at ``cutoff_len``, the loss on every token, padded per
    batch by ``DataCollatorForSeq2Seq``; fp32 (their default) unless ``bf16`` (their
    ``bf16=True``: bf16 autocast). In this process (the island is stopped by then)."""
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        PrinterCallback,
        Trainer,
        TrainingArguments,
    )

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line)["messages"] for line in chat_file.read_text().splitlines()]
    dataset = []
    for messages in rows:
        ids = tokenizer.apply_chat_template(messages, tokenize=True)[: options.cutoff_len]
        dataset.append({"input_ids": ids, "labels": list(ids)})
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    lora = LoraConfig(
        r=settings.lora_rank,
        lora_alpha=int(settings.lora_alpha),
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    args = TrainingArguments(
        output_dir=str(work / "plain"),
        per_device_train_batch_size=settings.batch_size,
        num_train_epochs=settings.n_epochs,
        learning_rate=settings.learning_rate,
        lr_scheduler_type=options.lr_scheduler_type,
        logging_steps=1,
        save_strategy="no",
        seed=options.seed,
        bf16=bf16,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
    )
    contention = Contention()
    trainer = Trainer(
        model=get_peft_model(model, lora),
        args=args,
        train_dataset=dataset,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
    )
    trainer.remove_callback(PrinterCallback)  # its log lines would go to our one JSON object
    result = trainer.train()
    return {
        "metrics": {k: result.metrics[k] for k in FINAL_METRICS if k in result.metrics},
        "other_cores": contention.other_cores(),
    }


def examples_per_second(rows: int, epochs: float, metrics: dict[str, Any]) -> float:
    """Examples trained on a second: a packed run's own samples/s counts its packed rows."""
    return round(rows * epochs / metrics["train_runtime"], 3)


# --- main -------------------------------------------------------------------------------------


async def main(args: argparse.Namespace, profile_dir: Path | None) -> dict[str, Any]:
    import torch

    plan = replace(QUICK if args.quick else Plan(), packing=args.packing)
    cache = Path(args.model_cache).expanduser()
    model_dir = await asyncio.to_thread(resolve_model, "embedded", cache)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="atoll-training-") as tmp:
        work = Path(tmp)
        island = Island(work, model_dir, cache)
        try:
            await island.start()
            run, job, chat_file = await platform_run(island, plan, work)
            log.info("platform run done; 24 rows teaching a fact, all auto, now")
            learned = await learned_run(island, work, plan.job_timeout_s)
        finally:
            await island.stop()
        tokens = await asyncio.to_thread(sample_tokens, model_dir, chat_file, plan.cutoff_len)
        log.info("platform run done; the direct run (anchor) now")
        direct = await direct_run(job, chat_file, model_dir, cache, work, plan.job_timeout_s)
        log.info("direct run done; transformers' Trainer with peft (anchor) now")
        assert job.hyperparameters is not None
        resolved = job.hyperparameters
        plain = await asyncio.to_thread(
            plain_trainer_run, chat_file, model_dir, job.options, resolved, work
        )
        same = None  # the job trained in bf16: the same Trainer in bf16 too
        if resolved.precision_type == "bf16":
            log.info("the same Trainer in bf16 now")
            same = await asyncio.to_thread(
                plain_trainer_run, chat_file, model_dir, job.options, resolved, work, True
            )
    pm, dm = run["metrics"], direct["metrics"]
    epochs = resolved.n_epochs
    runs = {"platform": pm, "direct": dm, "plain_trainer": plain["metrics"]}
    if same is not None:
        runs["plain_trainer_bf16"] = same["metrics"]
    speeds = {name: examples_per_second(plan.rows, epochs, m) for name, m in runs.items()}
    return {
        "bench": "training",
        "model": model_id(str(model_dir)),
        "device": "cpu",
        "cpu_threads": torch.get_num_threads(),
        "rows": plan.rows,
        "cutoff_len": plan.cutoff_len,
        "lora_rank": job.options.lora_rank,
        "lora_target": job.options.lora_target,
        "batch_size": plan.batch_size,
        "epochs": job.options.num_train_epochs,
        "sample_tokens": tokens,
        "packing": plan.packing,
        "precision": resolved.precision_type,  # what "auto" took on this CPU
        "examples_per_second": speeds,
        # The target: at least 1.0 (the platform as fast as transformers' own Trainer, as a
        # user without Atoll would run it, on the same work).
        "vs_plain_trainer": round(speeds["platform"] / speeds["plain_trainer"], 3),
        # The same for Atoll's training loop alone (the runner, no agents beside it).
        "runner_vs_plain_trainer": round(speeds["direct"] / speeds["plain_trainer"], 3),
        # Like for like where the job took bf16: the Trainer given bf16=True as well.
        **(
            {
                "vs_plain_trainer_bf16": round(
                    speeds["platform"] / speeds["plain_trainer_bf16"], 3
                ),
                "runner_vs_plain_trainer_bf16": round(
                    speeds["direct"] / speeds["plain_trainer_bf16"], 3
                ),
            }
            if same is not None
            else {}
        ),
        "upload_to_adapter_s": run["upload_to_adapter_s"],
        "learned": learned,
        "train_samples_per_second": pm["train_samples_per_second"],
        "train_steps_per_second": pm["train_steps_per_second"],
        "job_wall_s": run["wall_s"],
        "completion_to_first_token_s": run["completion_to_first_token_s"],
        "platform": run,
        "direct": direct,
        "plain_trainer": plain,
        "plain_trainer_bf16": same,
        "vs_direct": {
            "samples_per_second": round(
                pm["train_samples_per_second"] / dm["train_samples_per_second"], 3
            ),
            "wall": round(run["wall_s"] / direct["wall_s"], 3),
            "overhead_s": round(run["wall_s"] - direct["wall_s"], 3),
            # What the platform adds around the training itself (queue, dataset fetch, adapter
            # upload): immune to the run-to-run drift of the training speed (~10% here).
            "outside_training_s": round(
                (run["wall_s"] - pm["train_runtime"]) - (direct["wall_s"] - dm["train_runtime"]), 3
            ),
        },
        "cpu_cores": psutil.cpu_count(),
        "load_avg_1m": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
        "targets": {"completion_to_first_token_s": "<= 2", "vs_plain_trainer": ">= 1.0"},
    }


if __name__ == "__main__":
    setup_logging((*QUIET_LOGGERS, "httpx", "httpx2"))  # not a line per poll of the job
    tune_process()
    args = model_bench_args(
        __doc__.splitlines()[0],
        "40 rows, cutoff 128 (a smoke run)",
        {"packing": "the platform's job packs its examples (the anchors do not)"},
    )
    run_main(main, args)
