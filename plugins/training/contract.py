"""The training service, as other plugins (the gateway) and the CLI see it: job options, job
records, events, the method table and its client, errors. Importing this file pulls in no torch.
(Over 400 lines: it is the service's whole wire, options with their "auto" rules' inputs, the
job record OpenAI's job object is built from, and its client; split, callers would import the
wire from several places.)

Overlay surface of the agent whose ``training`` plugin runs the queue (discovery capability
``{"queue": true}``):

    RPC  submit     {owner, project?, options: JobOptions}   -> JobRecord      (client roles)
    RPC  jobs       {owner?, project?, state?, after?, limit?} -> list[JobRecord] (newest first)
    RPC  job        {id}                                     -> JobRecord
    RPC  cancel     {id, owner?}                             -> JobRecord      (the owner or admin)
    RPC  events     {id, after?}                             -> list[event]    (the last 1000)
    RPC  claim      {capacity, device, precisions}           -> JobRecord|None (trainers)
    RPC  heartbeat  {id, attempt, progress, events}          -> {cancel, reason}
    RPC  finish     {id, attempt, ok, error?, adapter_id?, metrics?, result_files?} -> {accepted}

Each RPC is a ``Method`` in the table below, which the plugin serves; the functions at the end
are its typed client (each builds its request through the method's model, so a bad request is
refused before it leaves, in the words the queue would use).

Publications: ``jobs.<id>.events`` (every event of a job: ``{type: "state"|"log"|"hyperparameters"|
"metrics"|"checkpoint", at, message, ...}``; a checkpoint carries a ``Checkpoint`` and the ids
of those pruned past the number kept; a logged step carries step, max_steps, epoch, loss and
train_mean_token_accuracy (of that step), learning_rate and estimated_finish; an evaluation
carries step and valid_loss, valid_mean_token_accuracy, and at the end full_valid_loss,
full_valid_mean_token_accuracy; a dpo job's step carries ``PAIR_FIGURES`` instead of the token
accuracy, and its evaluation ``VALID_PAIR_FIGURES`` (at the end ``FULL_VALID_PAIR_FIGURES``) beside
its pairs' DPO loss as valid_loss; ``hyperparameters`` says what "auto" resolved to) and
``jobs.queued`` (``{id}`` whenever a job becomes claimable, so idle trainers claim at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from atoll.agent.contract import Caller, Client, Method, Strict, service_address
from atoll.agent.errors import AtollError

if TYPE_CHECKING:
    from atoll.agent.node import Overlay

PLUGIN = "training"
QUEUED_SUBJECT = "jobs.queued"
MAX_EVENTS_KEPT = 1000

Auto = Literal["auto"]  # chosen by the runner from the job's data (auto.py)
State = Literal["created", "queued", "training", "completed", "failed", "cancelled"]
FINAL_STATES: frozenset[str] = frozenset({"completed", "failed", "cancelled"})
# dpo: preference pairs, by direct preference optimisation (the base, adapter off, is the
# reference model)
Stage = Literal["sft", "pt", "dpo"]
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
# "auto"'s learning rate, and what OpenAI's learning_rate_multiplier multiplies: the usual LoRA
# rate (QLoRA paper, Unsloth's and axolotl's LoRA recipes).
BASE_LEARNING_RATE = 2e-4
MAX_RESULT_FILES = 4
MAX_BETA = 10.0  # dpo's beta: far past any recipe's (0.01 to 0.5)
# A dpo job's step figures (TRL's names), in its events and results file beside the loss.
PAIR_FIGURES = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
# The validation pairs' (beside valid_loss), after each epoch; and the same at the end.
VALID_PAIR_FIGURES = tuple(f"valid_{name}" for name in PAIR_FIGURES)
FULL_VALID_PAIR_FIGURES = tuple(f"full_{name}" for name in VALID_PAIR_FIGURES)
DatasetId = Annotated[str, Field(pattern=DATASET_ID.pattern)]


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


def _auto_or(number_type: Any) -> PlainValidator:
    """A value of ``number_type`` (a constrained int or float), or "auto": one error when it is
    neither."""
    number: TypeAdapter[Any] = TypeAdapter(number_type, config=ConfigDict(strict=True))

    def check(value: Any) -> Any:
        if value == "auto":
            return value
        try:
            return number.validate_python(value)
        except ValidationError as exc:
            reason = exc.errors()[0]["msg"]
            raise PydanticCustomError(
                "auto_or_number", '{reason}, or "auto"', {"reason": reason}
            ) from None

    return PlainValidator(check)


class JobOptions(BaseModel):
    """Table I of the paper: what a training job does. Strict: an unknown key or a value of the
    wrong type is refused, never coerced. Batch size, epochs and learning rate may be "auto":
    the runner chooses them from the number of training examples (auto.py)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    stage: Stage = "sft"
    model_name_or_path: str = Field(min_length=1, max_length=512)
    dataset: list[DatasetId] = Field(min_length=1, max_length=16)
    template: Template = "default"
    # LoRA defaults from current practice: every linear projection (QLoRA, Dettmers et al. 2023:
    # needed to match full fine-tuning; Thinking Machines' "LoRA Without Regret", 2025: the MLP's
    # above all), rank 16 (Unsloth's default; LLaMA-Factory's is 8) and alpha twice the rank
    # (LLaMA-Factory's default; Raschka's 2023 LoRA experiments found 2r a good rule).
    lora_rank: int = Field(16, ge=1, le=256)
    lora_alpha: float | None = Field(None, gt=0, le=4096)  # None: twice the rank
    lora_target: Annotated[Literal["all"] | list[str], BeforeValidator(_split_targets)] = "all"
    per_device_train_batch_size: Annotated[
        int | Auto, _auto_or(Annotated[int, Field(ge=1, le=1024)])
    ] = "auto"
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024)
    lr_scheduler_type: Scheduler = "cosine"
    logging_steps: int = Field(10, ge=1, le=1_000_000)
    save_steps: int = Field(500, ge=1, le=1_000_000)
    learning_rate: Annotated[float | Auto, _auto_or(Annotated[float, Field(gt=0, le=1)])] = "auto"
    num_train_epochs: Annotated[float | Auto, _auto_or(Annotated[float, Field(gt=0, le=1000)])] = (
        "auto"
    )
    # auto: bf16 where the trainer computes in it natively (ClaimRequest.precisions), else fp32.
    precision_type: Precision | Auto = "auto"
    cutoff_len: int = Field(256, ge=8, le=32768)
    # sft and pt: examples laid end to end in rows of cutoff_len tokens, none seeing another
    # (data.pack): fewer, fuller rows for the same examples.
    packing: bool = False
    seed: int = Field(42, ge=0, lt=2**32)
    suffix: str | None = Field(None, pattern=SUFFIX)
    # Evaluation: a dataset of its own (OpenAI's validation_file), or a share of the training
    # examples held out (drawn with the seed); loss and token accuracy (a dpo job's: its pairs'
    # DPO loss and rewards) after each epoch.
    validation_dataset: DatasetId | None = None
    validation_split: float | None = Field(None, gt=0, le=0.5)
    # dpo's beta: how far the adapter may move from the reference (LLaMA-Factory's name, TRL's
    # default).
    pref_beta: float = Field(0.1, gt=0, le=MAX_BETA)

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

    @field_validator("packing")
    @classmethod
    def _packs(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("stage") == "dpo":
            raise ValueError("a dpo job's pairs are not packed: packing is for sft and pt")
        return value

    @field_validator("dataset")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("each dataset is named once")
        return value

    @model_validator(mode="after")
    def _one_validation_set(self) -> JobOptions:
        if self.validation_dataset is not None and self.validation_split is not None:
            raise PydanticCustomError(
                "one_validation_set",
                "validation_dataset and validation_split exclude each other: name a validation "
                "set, or hold out a share of the training examples",
            )
        return self

    @property
    def alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_rank

    @property
    def datasets(self) -> list[str]:
        """Every dataset the job reads: its training sets, then its validation set."""
        return [*self.dataset, *([self.validation_dataset] if self.validation_dataset else [])]


class Resolved(BaseModel):
    """What a job trains with once "auto" is resolved against its data; its runner reports it
    when training begins."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(ge=1)  # per device
    n_epochs: float = Field(gt=0)
    learning_rate: float = Field(gt=0)
    lora_rank: int = Field(ge=1)
    lora_alpha: float = Field(gt=0)
    examples: int = Field(ge=1)  # training examples
    validation_examples: int = Field(ge=0)
    total_steps: int = Field(ge=0)  # optimizer steps
    precision_type: Precision = "fp32"
    packed_rows: int | None = Field(None, ge=1)  # rows the examples were packed into


# --- requests -------------------------------------------------------------------------------


class SubmitRequest(Strict):
    owner: str = Field(pattern=OWNER_NAME)
    project: str | None = Field(None, pattern=OWNER_NAME)
    options: JobOptions


class JobQuery(Strict):
    """Newest first; ``after`` (a job id) pages on to the jobs submitted before it."""

    owner: str | None = None
    project: str | None = None
    state: State | None = None
    after: str | None = Field(None, pattern=JOB_ID.pattern)
    limit: int = Field(100, ge=1, le=1000)


class JobRef(Strict):
    id: str = Field(pattern=JOB_ID.pattern)


class CancelRequest(JobRef):
    owner: str | None = None  # the user the gateway acts for; admins may leave it out


class EventsRequest(JobRef):
    after: int = Field(0, ge=0)  # events with a larger seq


class ClaimRequest(Strict):
    capacity: int = Field(ge=0, le=1024)  # free job slots on the trainer
    device: Literal["cpu", "cuda", "mps"]
    # What the trainer computes in natively (trainer.detect_precisions): a job asking for
    # another precision is left for a trainer that has it.
    precisions: list[Precision] = Field(default=["fp32"], min_length=1, max_length=3)


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
    result_files: list[DatasetId] = Field(default_factory=list, max_length=MAX_RESULT_FILES)


# --- replies --------------------------------------------------------------------------------


class Checkpoint(BaseModel):
    """An adapter stored at the end of an epoch (or every ``save_steps``), servable as a model
    under its own id, with the figures of its step (OpenAI's checkpoint metrics)."""

    adapter_id: str
    step: int = Field(ge=0)
    epoch: float = Field(ge=0)
    created_at: float
    metrics: dict[str, float] = Field(default_factory=dict)


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
    progress: dict[str, Any] = Field(default_factory=dict)  # step, max_steps, epoch, loss, ...
    hyperparameters: Resolved | None = None  # once the current attempt's runner resolved them
    result_files: list[str] = Field(default_factory=list)  # the metrics CSV, once completed
    checkpoints: list[Checkpoint] = Field(default_factory=list)  # those kept, oldest first
    last_event: dict[str, Any] | None = None

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


class HeartbeatReply(BaseModel):
    cancel: bool = False  # stop the job's process: cancelled, or no longer this trainer's
    reason: str | None = None
    state: str | None = None  # with cancel: the job's state now (cancelled: keep nothing of it)


class FinishReply(BaseModel):
    accepted: bool  # False: the attempt was no longer this trainer's, or the job had ended


# --- methods ----------------------------------------------------------------------------------

JobEvent = dict[str, Any]  # {seq, type, at, message, ...}

SUBMIT = Method[SubmitRequest, JobRecord]("submit", SubmitRequest, JobRecord, "job submission")
JOBS = Method[JobQuery, list[JobRecord]]("jobs", JobQuery, list[JobRecord], "job query")
JOB = Method[JobRef, JobRecord]("job", JobRef, JobRecord, "job reference")
CANCEL = Method[CancelRequest, JobRecord]("cancel", CancelRequest, JobRecord, "cancel request")
EVENTS = Method[EventsRequest, list[JobEvent]](
    "events", EventsRequest, list[JobEvent], "events request"
)
CLAIM = Method[ClaimRequest, JobRecord | None]("claim", ClaimRequest, JobRecord | None, "claim")
HEARTBEAT = Method[HeartbeatRequest, HeartbeatReply](
    "heartbeat", HeartbeatRequest, HeartbeatReply, "heartbeat"
)
FINISH = Method[FinishRequest, FinishReply]("finish", FinishRequest, FinishReply, "finish report")
QUEUE_METHODS = (SUBMIT, JOBS, JOB, CANCEL, EVENTS, CLAIM, HEARTBEAT, FINISH)  # all the queue's


def events_subject(job_id: str) -> str:
    return f"jobs.{job_id}.events"


def adapter_id_for(job: JobRecord) -> str:
    """The adapter a successful job registers: ``<owner>/<suffix or "ft">-<job hex>`` (an
    owner's characters that adapter ids lack, like ``@``, become ``-``)."""
    owner = re.sub(r"[^A-Za-z0-9._-]", "-", job.owner)[:64]
    return f"{owner}/{job.options.suffix or 'ft'}-{job.id.removeprefix('ftjob-')}"


def checkpoint_id(job: JobRecord, step: int) -> str:
    """The adapter of ``job``'s checkpoint at optimizer step ``step``: its final adapter's id
    with ``-ckpt-step-<step>`` (OpenAI's ``:ckpt-step-<step>``; ids hold no ``:``)."""
    return f"{adapter_id_for(job)}-ckpt-step-{step}"


# --- calling the queue over the overlay -----------------------------------------------------


def _queue(caller: Caller, queue: str, timeout: float | None) -> Client:
    """The queue's client: ``queue`` is an agent name (its training plugin) or an address."""
    return Client(caller, service_address(queue, PLUGIN), timeout)


async def submit_job(
    agent: Caller,
    queue: str,
    owner: str,
    options: JobOptions | dict[str, Any],
    project: str | None = None,
    timeout: float | None = None,
) -> JobRecord:
    request = SUBMIT.parse_params({"owner": owner, "project": project, "options": options})
    return await _queue(agent, queue, timeout).invoke(SUBMIT, request)


async def list_jobs(
    agent: Caller,
    queue: str,
    owner: str | None = None,
    project: str | None = None,
    state: str | None = None,
    after: str | None = None,
    limit: int = 100,
    timeout: float | None = None,
) -> list[JobRecord]:
    """Jobs matching every filter given, newest first."""
    query = JOBS.parse_params(
        {"owner": owner, "project": project, "state": state, "after": after, "limit": limit}
    )
    return await _queue(agent, queue, timeout).invoke(JOBS, query)


async def get_job(
    agent: Caller, queue: str, job_id: str, timeout: float | None = None
) -> JobRecord:
    return await _queue(agent, queue, timeout).invoke(JOB, JOB.parse_params({"id": job_id}))


async def cancel_job(
    agent: Caller, queue: str, job_id: str, owner: str | None = None, timeout: float | None = None
) -> JobRecord:
    request = CANCEL.parse_params({"id": job_id, "owner": owner})
    return await _queue(agent, queue, timeout).invoke(CANCEL, request)


async def job_events(
    agent: Caller, queue: str, job_id: str, after: int = 0, timeout: float | None = None
) -> list[JobEvent]:
    """The job's kept events with a ``seq`` above ``after``, oldest first."""
    request = EVENTS.parse_params({"id": job_id, "after": after})
    return await _queue(agent, queue, timeout).invoke(EVENTS, request)


async def follow_events(
    agent: Overlay, queue: str, job_id: str, after: int = 0, poll: float = 2.0
) -> AsyncIterator[JobEvent]:
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


async def claim_job(
    agent: Caller, queue: str, capacity: int, device: str, precisions: list[Precision]
) -> JobRecord | None:
    """A queued job for a trainer with ``capacity`` free slots, or None."""
    request = CLAIM.parse_params({"capacity": capacity, "device": device, "precisions": precisions})
    return await _queue(agent, queue, None).invoke(CLAIM, request)


async def send_heartbeat(
    agent: Caller,
    queue: str,
    job: JobRecord,
    progress: dict[str, Any],
    events: list[JobEvent],
) -> HeartbeatReply:
    """A trainer's word that it still runs ``job``'s attempt, with what happened since."""
    beat = {"id": job.id, "attempt": job.attempt, "progress": progress, "events": events}
    return await _queue(agent, queue, None).invoke(HEARTBEAT, HEARTBEAT.parse_params(beat))


async def finish_job(
    agent: Caller, queue: str, job: JobRecord, outcome: dict[str, Any]
) -> FinishReply:
    """The outcome of ``job``'s attempt: ``{ok, error?, adapter_id?, metrics?}``."""
    done = FINISH.parse_params({"id": job.id, "attempt": job.attempt, **outcome})
    return await _queue(agent, queue, None).invoke(FINISH, done)
