"""The training service, as other plugins (the gateway) and the CLI see it: job options, job
records, events, method names, errors and thin clients. Importing this file pulls in no torch.

Overlay surface of the agent whose ``training`` plugin runs the queue (discovery capability
``{"queue": true}``):

    RPC  submit     {owner, project?, options: JobOptions}   -> JobRecord      (client roles)
    RPC  jobs       {owner?, project?, state?, after?, limit?} -> list[JobRecord] (newest first)
    RPC  job        {id}                                     -> JobRecord
    RPC  cancel     {id, owner?}                             -> JobRecord      (the owner or admin)
    RPC  events     {id, after?}                             -> list[event]    (the last 1000)
    RPC  claim      {capacity, device}                       -> JobRecord|None (trainers)
    RPC  heartbeat  {id, attempt, progress, events}          -> {cancel, reason}
    RPC  finish     {id, attempt, ok, error?, adapter_id?, metrics?} -> {accepted}

Publications: ``jobs.<id>.events`` (every event of a job: ``{type: "state"|"log"|"metrics", at,
message, ...}``; log events carry step, epoch, loss, learning_rate) and ``jobs.queued`` (``{id}``
whenever a job becomes claimable, so idle trainers claim at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from atoll.agent.errors import AtollError, InvalidRequest

if TYPE_CHECKING:
    from atoll.agent.node import Overlay

PLUGIN = "training"
QUEUED_SUBJECT = "jobs.queued"
MAX_EVENTS_KEPT = 1000

State = Literal["created", "queued", "training", "completed", "failed", "cancelled"]
FINAL_STATES: frozenset[str] = frozenset({"completed", "failed", "cancelled"})
Stage = Literal["sft", "pt"]
Precision = Literal["fp32", "bf16", "fp16"]
# Chat templates a job may name; "default" is the tokenizer's own.
Template = Literal["default", "chatml", "llama3", "mistral", "zephyr", "alpaca"]
Scheduler = Literal[
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
]

DATASET_ID = re.compile(r"ds-[0-9a-f]{12}")
JOB_ID = re.compile(r"ftjob-[0-9a-f]{12}")
MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
# User and project names as storage takes them (adapters are registered to them).
OWNER_NAME = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$"
SUFFIX = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,39}$"  # part of the adapter id


# --- errors (rebuilt by class name on the caller's side once this module is imported) ----------


class JobNotFound(AtollError):
    """No job with that id is in the queue."""


class JobFinished(AtollError):
    """The job already reached a final state (completed, failed or cancelled)."""


# --- options --------------------------------------------------------------------------------


def _split_targets(value: Any) -> Any:
    """``"q_proj,v_proj"`` (LLaMA-Factory's spelling) as a list; ``"all"`` stays as it is."""
    if isinstance(value, str) and value != "all":
        return [part.strip() for part in value.split(",")]
    return value


def _check_module(name: str) -> str:
    if not MODULE_NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not a module name (letters, digits and _)")
    return name


class JobOptions(BaseModel):
    """Table I of the paper: what a training job does. Strict: an unknown key or a value of the
    wrong type is refused, never coerced."""

    model_config = ConfigDict(extra="forbid", strict=True)

    stage: Stage = "sft"
    model_name_or_path: str = Field(min_length=1, max_length=512)
    dataset: list[Annotated[str, Field(pattern=DATASET_ID.pattern)]] = Field(
        min_length=1, max_length=16
    )
    template: Template = "default"
    lora_rank: int = Field(8, ge=1, le=256)
    lora_alpha: float | None = Field(None, gt=0, le=4096)  # None: twice the rank
    lora_target: Annotated[Literal["all"] | list[str], BeforeValidator(_split_targets)] = "all"
    per_device_train_batch_size: int = Field(4, ge=1, le=1024)
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024)
    lr_scheduler_type: Scheduler = "cosine"
    logging_steps: int = Field(10, ge=1, le=1_000_000)
    save_steps: int = Field(500, ge=1, le=1_000_000)
    learning_rate: float = Field(1e-4, gt=0, le=1)
    num_train_epochs: float = Field(3.0, gt=0, le=1000)
    precision_type: Precision = "fp32"
    cutoff_len: int = Field(256, ge=8, le=32768)
    seed: int = Field(42, ge=0, lt=2**32)
    suffix: str | None = Field(None, pattern=SUFFIX)

    @field_validator("lora_target")
    @classmethod
    def _targets(cls, value: Literal["all"] | list[str]) -> Literal["all"] | list[str]:
        if value == "all":
            return value
        if not 1 <= len(value) <= 32:
            raise ValueError('name 1 to 32 modules, or "all"')
        if len(set(value)) != len(value):
            raise ValueError("each module is named once")
        return [_check_module(name) for name in value]

    @field_validator("dataset")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("each dataset is named once")
        return value

    @property
    def alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_rank


# --- requests -------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SubmitRequest(_Strict):
    owner: str = Field(pattern=OWNER_NAME)
    project: str | None = Field(None, pattern=OWNER_NAME)
    options: JobOptions


class JobQuery(_Strict):
    """Newest first; ``after`` (a job id) pages on to the jobs submitted before it."""

    owner: str | None = None
    project: str | None = None
    state: State | None = None
    after: str | None = Field(None, pattern=JOB_ID.pattern)
    limit: int = Field(100, ge=1, le=1000)


class JobRef(_Strict):
    id: str = Field(pattern=JOB_ID.pattern)


class CancelRequest(JobRef):
    owner: str | None = None  # the user the gateway acts for; admins may leave it out


class EventsRequest(JobRef):
    after: int = Field(0, ge=0)  # events with a larger seq


class ClaimRequest(_Strict):
    capacity: int = Field(ge=0, le=1024)  # free job slots on the trainer
    device: Literal["cpu", "cuda", "mps"]


class HeartbeatRequest(JobRef):
    attempt: int = Field(ge=1)
    progress: dict[str, Any] = Field(default_factory=dict)
    events: list[dict[str, Any]] = Field(default_factory=list, max_length=MAX_EVENTS_KEPT)


class FinishRequest(JobRef):
    attempt: int = Field(ge=1)
    ok: bool
    error: str | None = Field(None, max_length=8192)
    adapter_id: str | None = Field(None, max_length=256)
    metrics: dict[str, float] = Field(default_factory=dict)


# --- replies --------------------------------------------------------------------------------


class JobRecord(BaseModel):
    id: str
    owner: str
    project: str | None = None
    options: JobOptions
    state: State
    created_at: float
    queued_at: float | None = None
    started_at: float | None = None  # of the current (or last) attempt
    finished_at: float | None = None
    trainer: str | None = None  # the agent training it now (or last)
    attempt: int = 0  # claims so far
    error: str | None = None
    adapter_id: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)  # train_runtime, train_loss, ...
    progress: dict[str, Any] = Field(default_factory=dict)  # step, max_steps, epoch, loss
    last_event: dict[str, Any] | None = None

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


class HeartbeatReply(BaseModel):
    cancel: bool = False  # stop the job's process: cancelled, or no longer this trainer's
    reason: str | None = None


M = TypeVar("M", bound=BaseModel)


def parse(model: type[M], data: Any, what: str) -> M:
    """``data`` as ``model``, or InvalidRequest naming each wrong field and why."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if not str(p).startswith('function-')) or 'value'}"
            f": {e['msg']}"
            for e in exc.errors()
        )
        raise InvalidRequest(f"bad {what}: {problems}") from None


def events_subject(job_id: str) -> str:
    return f"jobs.{job_id}.events"


def adapter_id_for(job: JobRecord) -> str:
    """The adapter a successful job registers: ``<owner>/<suffix or "ft">-<job hex>`` (an
    owner's characters that adapter ids lack, like ``@``, become ``-``)."""
    owner = re.sub(r"[^A-Za-z0-9._-]", "-", job.owner)[:64]
    return f"{owner}/{job.options.suffix or 'ft'}-{job.id.removeprefix('ftjob-')}"


# --- calling the queue over the overlay -----------------------------------------------------


def _address(queue: str) -> str:
    """An agent name means that agent's ``training`` plugin."""
    return queue if "/" in queue else f"{queue}/{PLUGIN}"


async def submit_job(
    agent: Overlay,
    queue: str,
    owner: str,
    options: JobOptions | dict[str, Any],
    project: str | None = None,
    timeout: float | None = None,
) -> JobRecord:
    if isinstance(options, JobOptions):
        options = options.model_dump(mode="json")
    params = {"owner": owner, "project": project, "options": options}
    return JobRecord.model_validate(await agent.call(_address(queue), "submit", params, timeout))


async def list_jobs(
    agent: Overlay,
    queue: str,
    owner: str | None = None,
    project: str | None = None,
    state: str | None = None,
    after: str | None = None,
    limit: int = 100,
    timeout: float | None = None,
) -> list[JobRecord]:
    """Jobs matching every filter given, newest first."""
    query = {
        "owner": owner, "project": project, "state": state, "after": after, "limit": limit
    }  # fmt: skip
    rows = await agent.call(_address(queue), "jobs", query, timeout)
    return [JobRecord.model_validate(row) for row in rows]


async def get_job(
    agent: Overlay, queue: str, job_id: str, timeout: float | None = None
) -> JobRecord:
    row = await agent.call(_address(queue), "job", {"id": job_id}, timeout)
    return JobRecord.model_validate(row)


async def cancel_job(
    agent: Overlay, queue: str, job_id: str, owner: str | None = None, timeout: float | None = None
) -> JobRecord:
    params = {"id": job_id, "owner": owner}
    return JobRecord.model_validate(await agent.call(_address(queue), "cancel", params, timeout))


async def job_events(
    agent: Overlay, queue: str, job_id: str, after: int = 0, timeout: float | None = None
) -> list[dict[str, Any]]:
    """The job's kept events with a ``seq`` above ``after``, oldest first."""
    return await agent.call(_address(queue), "events", {"id": job_id, "after": after}, timeout)


async def follow_events(
    agent: Overlay, queue: str, job_id: str, after: int = 0, poll: float = 2.0
) -> AsyncIterator[dict[str, Any]]:
    """Every event of the job from ``after`` on, as the queue records them, until the job ends
    (its final state event is the last one yielded). Publications on the job's subject only wake
    the reader early; the queue's numbered log is the source, so nothing is missed or doubled."""
    wake = asyncio.Event()
    sub = await agent.subscribe(events_subject(job_id), lambda _pub: wake.set())
    try:
        while True:
            wake.clear()
            events = await job_events(agent, queue, job_id, after)
            for event in events:
                after = max(after, int(event.get("seq", after)))
                yield event
                if event.get("type") == "state" and event.get("state") in FINAL_STATES:
                    return
            if not events and (await get_job(agent, queue, job_id)).final:
                return  # it ended before ``after``: nothing more will come
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), poll)
    finally:
        await sub.unsubscribe()
