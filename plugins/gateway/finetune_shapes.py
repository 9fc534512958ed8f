"""OpenAI's file and fine-tuning job shapes, as the openai SDK's ``files`` and
``fine_tuning.jobs`` read and send them, and their translation from and to the platform's dataset
and job records."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from atoll.plugins.gateway.errors import GatewayError
from atoll.plugins.storage.contract.datasets import DatasetInvalid, DatasetRecord, check_filename
from atoll.plugins.training.contract import (
    BASE_LEARNING_RATE,
    FULL_VALID_PAIR_FIGURES,
    MAX_BETA,
    PAIR_FIGURES,
    VALID_PAIR_FIGURES,
    Auto,
    Checkpoint,
    JobOptions,
    JobRecord,
)

Level = Literal["info", "warn", "error"]  # of a job event
Purpose = Literal["fine-tune", "fine-tune-results", "batch", "batch_output", "assistants"]
PURPOSES: dict[str, Purpose] = {  # by the dataset's kind
    "results": "fine-tune-results",
    "batch": "batch",
    "document": "assistants",
    "batch_output": "batch_output",
}
STATUS = {
    "created": "validating_files",
    "queued": "queued",
    "training": "running",
    "completed": "succeeded",
    "failed": "failed",
    "cancelled": "cancelled",
}


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: Purpose = "fine-tune"
    status: str = "processed"


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_epochs: int | Literal["auto"] = "auto"
    batch_size: int | Literal["auto"] = "auto"
    learning_rate_multiplier: float | Literal["auto"] = "auto"


class DpoHyperparameters(Hyperparameters):
    beta: float | Literal["auto"] = "auto"  # "auto": JobOptions' pref_beta default

    @field_validator("beta")
    @classmethod
    def _beta(cls, value: float | str) -> float | str:
        if value != "auto" and not 0 < float(value) <= MAX_BETA:
            raise ValueError(f"beta must be more than 0 and at most {MAX_BETA:g}")
        return value


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: Hyperparameters = Hyperparameters()


class DpoMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: DpoHyperparameters = DpoHyperparameters()


class JobMethod(BaseModel):
    """OpenAI's ``method``: supervised (the default) or dpo, each with its hyperparameters."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["supervised", "dpo"]
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None


class CreateJob(BaseModel):
    """OpenAI's body, plus ``options``: any of Table I's training options for this platform."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    training_file: str
    validation_file: str | None = None
    hyperparameters: Hyperparameters | None = None  # OpenAI's older place for the method's
    method: JobMethod | None = None
    suffix: str | None = None
    seed: int | None = None
    options: dict[str, Any] = {}


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobError | None = None
    estimated_finish: int | None = None  # while it runs
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    hyperparameters: dict[str, Any]  # what "auto" resolved to, once the job's trainer says
    method: dict[str, Any] | None = None  # the same, under the method's type (None: pt)
    model: str
    organization_id: str
    result_files: list[str] = []
    seed: int
    status: str
    trained_tokens: int | None = None
    training_file: str
    validation_file: str | None = None
    # Atoll's own (clients of OpenAI's shape ignore them): the live position and final figures.
    progress: dict[str, Any] = {}  # step, max_steps, epoch, loss
    metrics: dict[str, float] = {}  # train_runtime, train_loss, train_samples_per_second, ...


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJob]
    has_more: bool = False


class JobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Level = "info"
    message: str
    data: dict[str, Any] | None = None
    type: Literal["message", "metrics"] = "message"


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobEvent]
    has_more: bool = False


class CheckpointMetrics(BaseModel):
    step: float | None = None
    train_loss: float | None = None
    train_mean_token_accuracy: float | None = None
    valid_loss: float | None = None
    valid_mean_token_accuracy: float | None = None
    full_valid_loss: float | None = None
    full_valid_mean_token_accuracy: float | None = None


class JobCheckpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str  # a model id: chat with it as with fine_tuned_model
    fine_tuning_job_id: str
    metrics: CheckpointMetrics
    step_number: int


class CheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobCheckpoint]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None


def checkpoint_object(job: JobRecord, checkpoint: Checkpoint) -> JobCheckpoint:
    known = CheckpointMetrics.model_fields
    metrics = {k: v for k, v in checkpoint.metrics.items() if k in known}
    return JobCheckpoint(
        id=f"ftckpt-{job.id.removeprefix('ftjob-')}-{checkpoint.step}",
        created_at=int(checkpoint.created_at),
        fine_tuned_model_checkpoint=checkpoint.adapter_id,
        fine_tuning_job_id=job.id,
        metrics=CheckpointMetrics(**metrics),
        step_number=checkpoint.step,
    )


def file_object(record: DatasetRecord) -> FileObject:
    purpose = PURPOSES.get(record.kind, "fine-tune")
    return FileObject(
        id=record.id,
        bytes=record.bytes,
        created_at=int(record.created),
        filename=record.filename,
        purpose=purpose,
    )


def _whole(value: float | str) -> float | str:
    """3.0 as 3 (OpenAI's n_epochs is a whole number); anything else as it is."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def hyperparameters(job: JobRecord) -> dict[str, Any]:
    """OpenAI's three, as resolved by the job's runner, else as asked ("auto" or a value);
    ``batch_size`` counts the examples of an optimizer step."""
    o, resolved = job.options, job.hyperparameters
    epochs: float | Auto
    batch: int | Auto
    rate: float | Auto
    if resolved is not None:
        epochs, batch, rate = resolved.n_epochs, resolved.batch_size, resolved.learning_rate
    else:
        epochs, batch, rate = o.num_train_epochs, o.per_device_train_batch_size, o.learning_rate
    return {
        "n_epochs": _whole(epochs),
        "batch_size": batch if batch == "auto" else batch * o.gradient_accumulation_steps,
        "learning_rate_multiplier": rate if rate == "auto" else round(rate / BASE_LEARNING_RATE, 9),
    }


def method_object(job: JobRecord) -> dict[str, Any] | None:
    """OpenAI's ``method`` with the hyperparameters as resolved; pt is none of OpenAI's."""
    o = job.options
    if o.stage == "pt":
        return None
    if o.stage == "dpo":
        dpo = {"hyperparameters": {**hyperparameters(job), "beta": o.pref_beta}}
        return {"type": "dpo", "dpo": dpo}
    return {"type": "supervised", "supervised": {"hyperparameters": hyperparameters(job)}}


def job_object(job: JobRecord) -> FineTuningJob:
    o = job.options
    error = None
    if job.state == "failed":
        error = JobError(code="training_failed", message=job.error or "the job failed")
    done = job.state == "completed"
    finish = job.progress.get("estimated_finish")
    tokens = job.metrics.get("trained_tokens")
    return FineTuningJob(
        id=job.id,
        created_at=int(job.created_at),
        error=error,
        estimated_finish=int(finish) if job.state == "training" and finish else None,
        fine_tuned_model=job.adapter_id if done else None,
        finished_at=int(job.finished_at) if job.finished_at else None,
        hyperparameters=hyperparameters(job),
        method=method_object(job),
        model=o.model_name_or_path,
        organization_id=job.project or job.owner,
        result_files=job.result_files,
        seed=o.seed,
        status=STATUS[job.state],
        trained_tokens=int(tokens) if done and tokens is not None else None,
        training_file=o.dataset[0],
        validation_file=o.validation_dataset,
        progress=job.progress,
        metrics=job.metrics,
    )


# A trainer's figures of a step, under OpenAI's names (events of type "metrics").
METRICS = {
    "step": "step",
    "max_steps": "total_steps",
    "loss": "train_loss",
    "train_mean_token_accuracy": "train_mean_token_accuracy",
    "valid_loss": "valid_loss",
    "valid_mean_token_accuracy": "valid_mean_token_accuracy",
    "full_valid_loss": "full_valid_loss",
    "full_valid_mean_token_accuracy": "full_valid_mean_token_accuracy",
    "epoch": "epoch",
    "learning_rate": "learning_rate",
    # a dpo step's (TRL's names), and its validation pairs' after each epoch and at the end
    **{name: name for name in (*PAIR_FIGURES, *VALID_PAIR_FIGURES, *FULL_VALID_PAIR_FIGURES)},
}
LOSSES = {
    "loss": "training loss",
    "valid_loss": "validation loss",
    "full_valid_loss": "full validation loss",
}  # what a metrics event's message names


def event_object(job_id: str, event: dict[str, Any]) -> JobEvent:
    kind = event.get("type")
    at = int(event.get("at") or 0)
    event_id = f"{job_id}-{event.get('seq', 0)}"
    losses = [f"{name}={event[k]:.4f}" for k, name in LOSSES.items() if _number(event.get(k))]
    if kind == "log" and "step" in event and losses:  # a step's figures, as OpenAI's
        data = {name: event[k] for k, name in METRICS.items() if event.get(k) is not None}
        message = f"Step {event['step']}/{event.get('max_steps')}: {', '.join(losses)}"
        return JobEvent(id=event_id, created_at=at, message=message, data=data, type="metrics")
    level: Level = "error" if event.get("state") == "failed" else "info"
    if event.get("level") == "warn":  # a trainer's warning (a checkpoint not stored)
        level = "warn"
    message = str(event.get("message") or event.get("state") or kind or "event")
    return JobEvent(id=event_id, created_at=at, level=level, message=message, data=event)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _method(body: CreateJob) -> tuple[str, Hyperparameters]:
    """(stage, hyperparameters): the method's, or the top level's for a supervised job."""
    method = body.method or JobMethod(type="supervised")
    detail = method.dpo if method.type == "dpo" else method.supervised
    other = "supervised" if method.type == "dpo" else "dpo"
    if getattr(method, other) is not None:
        raise GatewayError(
            400, f"method.{other} given for a {method.type} job", param=f"method.{other}"
        )
    if detail is not None and body.hyperparameters is not None:
        raise GatewayError(
            400,
            f"hyperparameters and method.{method.type}.hyperparameters exclude each other: "
            "give them under the method",
            param="hyperparameters",
        )
    if detail is not None:
        return ("dpo" if method.type == "dpo" else "sft"), detail.hyperparameters
    if method.type == "dpo":
        return "dpo", body.hyperparameters or DpoHyperparameters()
    return "sft", body.hyperparameters or Hyperparameters()


def job_options(body: CreateJob) -> JobOptions:
    """OpenAI's method and hyperparameters as Table I's options (``options`` overrides and
    extends, but may not change the method)."""
    stage, hp = _method(body)
    opts: dict[str, Any] = {"model_name_or_path": body.model, "dataset": [body.training_file]}
    if stage == "dpo":
        opts["stage"] = "dpo"
        if isinstance(hp, DpoHyperparameters) and hp.beta != "auto":
            opts["pref_beta"] = hp.beta
    if body.method is not None and body.options.get("stage", stage) != stage:
        raise GatewayError(
            400,
            f"options.stage {body.options['stage']!r} contradicts method.type {body.method.type!r}",
            param="options.stage",
        )
    if hp.n_epochs != "auto":
        opts["num_train_epochs"] = float(hp.n_epochs)
    if hp.batch_size != "auto":
        opts["per_device_train_batch_size"] = hp.batch_size
    if hp.learning_rate_multiplier != "auto":
        opts["learning_rate"] = BASE_LEARNING_RATE * hp.learning_rate_multiplier
    if body.validation_file is not None:
        if "validation_split" in body.options:
            raise GatewayError(
                400,
                "validation_file and options.validation_split exclude each other: name a "
                "validation file, or hold out a share of the training file",
                param="validation_file",
            )
        opts["validation_dataset"] = body.validation_file
    if body.suffix is not None:
        opts["suffix"] = body.suffix
    if body.seed is not None:
        opts["seed"] = body.seed
    opts |= body.options
    try:
        return JobOptions.model_validate(opts)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "options"
        raise GatewayError(400, f"{where}: {first['msg']}", param=where) from None


def upload_filename(raw: str | None) -> str:
    """The uploaded file's name, or a 400 that names it: storage's own rule, checked before the
    body is staged under that name (a path in it is refused, not stripped)."""
    try:
        return check_filename("dataset.jsonl" if raw is None else raw)
    except DatasetInvalid as exc:
        raise GatewayError(400, exc.message, param="file") from None
