"""The training plugin: the job queue (``mode = "queue"``), a trainer (``"trainer"``), or both on
one agent. See ``contract.py`` for the service and ``queue.py`` / ``trainer.py`` for each side.

The queue checks a job's datasets with storage when it is submitted (they must exist and belong
to the job's owner or project), and gives jobs whose trainer went quiet — no heartbeat for
``lost_after`` seconds, or LOST in discovery — to the next trainer that asks (which resumes it
from its last checkpoint). Once a job ends, whichever way, the queue drops its resume state.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from atoll.agent.config import ConfigPath
from atoll.agent.contract import service_address
from atoll.agent.discovery import Discovery, Status
from atoll.agent.errors import AtollError, Forbidden, InvalidRequest
from atoll.agent.plugins import Plugin, PluginContext, rpc
from atoll.plugins.basemodels import ModelSpec
from atoll.plugins.storage.contract.adapters import AdapterNotFound, delete_adapter
from atoll.plugins.storage.contract.datasets import ORIGINAL_ONLY, describe_dataset
from atoll.plugins.storage.contract.resume import drop_resume_state
from atoll.plugins.training.contract import (
    CANCEL,
    CLAIM,
    EVENTS,
    FINISH,
    HEARTBEAT,
    JOB,
    JOBS,
    PLUGIN,
    QUEUE_METHODS,
    SUBMIT,
    FinishReply,
    SubmitRequest,
)
from atoll.plugins.training.queue import JobQueue
from atoll.plugins.training.trainer import TrainerWorker
from atoll.protocol.session import CallInfo
from atoll.tenancy.permissions import ADMINS, CLIENTS

DATASET_CHECK_TIMEOUT = 10.0


class TrainingConfig(BaseModel):
    """``[plugins.training]``."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["queue", "trainer", "both"] = "trainer"
    # queue side
    lost_after: float = Field(30.0, gt=0)  # seconds without a heartbeat before a job is re-queued
    max_attempts: int = Field(3, ge=1, le=100)  # claims lost before the job fails
    storage: str | None = None  # the storage agent (``agent`` or ``agent/storage``); None: found
    # trainer side
    queue: str | None = None  # the queue (``agent`` or ``agent/training``); None: found
    capacity: int = Field(1, ge=1, le=64)  # jobs at once
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    heartbeat: float = Field(5.0, gt=0)  # seconds between heartbeats (keep under lost_after)
    poll: float = Field(10.0, gt=0)  # seconds between claims while idle (jobs.queued wakes it)
    workdir: ConfigPath | None = None  # None: <plugin data dir>/work
    model_cache: ConfigPath | None = None  # converted GGUF models; None: <plugin data dir>/models
    models: dict[str, ModelSpec] = {}  # overlay base model id -> model spec on this trainer
    keep_checkpoints: int = Field(3, ge=1, le=100)  # a job's most recent, besides its final


class TrainingPlugin(Plugin):
    name = PLUGIN
    config_model = TrainingConfig

    async def start(self, ctx: PluginContext) -> None:
        await super().start(ctx)
        self.config = config = ctx.settings(TrainingConfig)
        self.discovery: Discovery | None = None  # the queue's live view: it sees trainers go
        self.queue_finder = ctx.finder(PLUGIN, {"queue": True}, what="training queue")
        self.storage_finder = ctx.finder("storage")
        self.tasks: set[asyncio.Task] = set()
        self.queue: JobQueue | None = None
        self.worker: TrainerWorker | None = None
        if config.mode in ("queue", "both"):
            self.queue = JobQueue(
                ctx.data_dir / "jobs.sqlite", self._publish, config.lost_after, config.max_attempts
            )
            self.queued = ctx.metrics.gauge("jobs_queued", "Jobs waiting for a trainer")
            self.training = ctx.metrics.gauge("jobs_training", "Jobs being trained")
            self._watch = asyncio.create_task(self._watchdog())
        if config.mode in ("trainer", "both"):
            self.worker = TrainerWorker(
                ctx, config, self._queue_address, self._storage_address, self._gone
            )
            await self.worker.start()

    async def stop(self) -> None:
        if self.worker is not None:
            await self.worker.stop()
        if self.queue is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, *self.tasks, return_exceptions=True)
            self.queue.close()
        if self.discovery is not None:
            await self.discovery.stop()

    def rpc_methods(self) -> dict[str, tuple[Callable, tuple[str, ...]]]:
        methods = super().rpc_methods()
        if self.queue is None:  # a trainer alone answers none of the queue's methods
            queue_methods = {m.name for m in QUEUE_METHODS}
            return {k: v for k, v in methods.items() if k not in queue_methods}
        return methods

    def describe(self) -> dict[str, Any]:
        caps: dict[str, Any] = {}
        load: dict[str, Any] = {}
        if self.queue is not None:
            caps["queue"] = True
            load["jobs_queued"] = self.queue.counts().get("queued", 0)
        if self.worker is not None:
            described = self.worker.describe()
            caps.update(described["capabilities"])
            load.update(described["load"])
        return {"capabilities": caps, "load": load}

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.config.mode}
        if self.queue is not None:
            out["jobs"] = self.queue.counts()
        if self.worker is not None:
            out["training"] = sorted(self.worker.running)
        return out

    # --- finding the other services -----------------------------------------------------------

    async def _queue_address(self) -> str:
        if self.config.queue:
            return service_address(self.config.queue, PLUGIN)
        if self.queue is not None:
            return self.ctx.address
        return await self.queue_finder.address()

    async def _storage_address(self) -> str:
        if self.config.storage:
            return service_address(self.config.storage, "storage")
        return await self.storage_finder.address()

    def _gone(self, address: str) -> None:
        self.queue_finder.forget(address)
        self.storage_finder.forget(address)

    # --- queue upkeep -------------------------------------------------------------------------

    def _publish(self, subject: str, data: dict[str, Any]) -> None:
        task = asyncio.create_task(self.ctx.publish(subject, data))
        self.tasks.add(task)
        task.add_done_callback(self._published)

    def _published(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.ctx.log.info("training.publish_failed", error=task.exception())

    def _ended(self, job_id: str, checkpoints: Sequence[str] = ()) -> None:
        """A job ended: nothing will resume it, so storage forgets its resume state (aside), and
        the ``checkpoints`` of one cancelled."""

        async def drop() -> None:
            try:
                storage = await self._storage_address()
                await drop_resume_state(self.ctx, storage, job_id, DATASET_CHECK_TIMEOUT)
                for adapter_id in checkpoints:
                    with contextlib.suppress(AdapterNotFound):
                        await delete_adapter(self.ctx, storage, adapter_id, DATASET_CHECK_TIMEOUT)
            except AtollError as exc:  # left behind: logged
                self.ctx.log.warning("training.resume_state_kept", job=job_id, error=exc)

        task = asyncio.create_task(drop())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _watchdog(self) -> None:
        assert self.queue is not None
        self.discovery = view = await self.ctx.discovery()
        tick = min(1.0, self.config.lost_after / 4)
        while True:
            lost = {n for n, e in view.entries.items() if e.status is Status.LOST}
            for job in self.queue.sweep(lost):
                self.ctx.log.info("training.trainer_lost", job=job.id, state=job.state)
                if job.final:  # lost max_attempts times
                    self._ended(job.id)
            counts = self.queue.counts()
            self.queued.set(counts.get("queued", 0))
            self.training.set(counts.get("training", 0))
            await asyncio.sleep(tick)

    # --- RPC: users (through the gateway, the CLI) --------------------------------------------

    def _queue(self) -> JobQueue:
        assert self.queue is not None
        return self.queue

    async def _check_datasets(self, request: SubmitRequest) -> None:
        """Each dataset (the validation set too) exists, belongs to the job's owner or project,
        and holds what the job's stage trains on."""
        storage = await self._storage_address()
        for dataset in request.options.datasets:
            # DatasetNotFound (or the storage agent being unreachable) reaches the caller as is.
            record = await describe_dataset(self.ctx, storage, dataset, DATASET_CHECK_TIMEOUT)
            if record.kind in ORIGINAL_ONLY:
                raise InvalidRequest(
                    f"{dataset} is {ORIGINAL_ONLY[record.kind]}, not a dataset to train or "
                    "validate on"
                )
            stage = request.options.stage
            if stage == "sft" and record.kind == "pt":
                raise InvalidRequest(
                    f"dataset {dataset} is raw text (pt): an sft job needs conversations; "
                    'use stage "pt" or a chat, Alpaca or ShareGPT dataset'
                )
            if (stage == "dpo") != (record.kind == "preference"):
                raise InvalidRequest(
                    f"dataset {dataset} holds preference pairs: a {stage} job cannot train on "
                    'them; use method "dpo"'
                    if record.kind == "preference"
                    else f"dataset {dataset} holds {record.kind} rows: a dpo job needs "
                    "preference pairs (input, preferred_output, non_preferred_output)"
                )
            mine = record.owner == request.owner
            ours = request.project is not None and record.project == request.project
            if not (mine or ours):
                raise Forbidden(
                    f"dataset {dataset} belongs to {record.owner!r}, not to {request.owner!r}"
                    + (f" nor to project {request.project!r}" if request.project else "")
                )

    @rpc(SUBMIT.name, roles=CLIENTS)
    async def submit(self, params: Any, call: CallInfo) -> dict[str, Any]:
        queue = self._queue()
        request = SUBMIT.parse_params(params)
        await self._check_datasets(request)
        job = queue.submit(request.owner, request.project, request.options)
        self.ctx.log.info("training.submitted", job=job.id, owner=job.owner, by=call.caller.name)
        return job.model_dump(mode="json")

    @rpc(JOBS.name, roles=CLIENTS)
    async def jobs(self, params: Any, call: CallInfo) -> list[dict[str, Any]]:
        queue = self._queue()
        query = JOBS.parse_params(params)
        return [j.model_dump(mode="json") for j in queue.find(query)]

    @rpc(JOB.name, roles=CLIENTS)
    async def job(self, params: Any, call: CallInfo) -> dict[str, Any]:
        queue = self._queue()
        return queue.get(JOB.parse_params(params).id).model_dump(mode="json")

    @rpc(CANCEL.name, roles=CLIENTS)
    async def cancel(self, params: Any, call: CallInfo) -> dict[str, Any]:
        queue = self._queue()
        request = CANCEL.parse_params(params)
        admin = call.caller.has_role(*ADMINS)
        job = queue.cancel(request.id, request.owner, admin)
        self.ctx.log.info("training.cancelled", job=job.id, by=call.caller.name)
        self._ended(job.id, queue.forget_checkpoints(job.id))
        return queue.get(job.id).model_dump(mode="json")

    @rpc(EVENTS.name, roles=CLIENTS)
    async def events(self, params: Any, call: CallInfo) -> list[dict[str, Any]]:
        queue = self._queue()
        request = EVENTS.parse_params(params)
        return queue.events(request.id, request.after)

    # --- RPC: trainers ------------------------------------------------------------------------

    @rpc(CLAIM.name, roles=("training",))
    async def claim(self, params: Any, call: CallInfo) -> dict[str, Any] | None:
        queue = self._queue()
        request = CLAIM.parse_params(params)
        job = queue.claim(call.caller.name, request)
        return None if job is None else job.model_dump(mode="json")

    @rpc(HEARTBEAT.name, roles=("training",))
    async def heartbeat(self, params: Any, call: CallInfo) -> dict[str, Any]:
        queue = self._queue()
        beat = HEARTBEAT.parse_params(params)
        return queue.heartbeat(call.caller.name, beat).model_dump()

    @rpc(FINISH.name, roles=("training",))
    async def finish(self, params: Any, call: CallInfo) -> dict[str, Any]:
        queue = self._queue()
        done = FINISH.parse_params(params)
        accepted = queue.finish(call.caller.name, done)
        if accepted:
            self._ended(done.id)
        return FinishReply(accepted=accepted).model_dump()
