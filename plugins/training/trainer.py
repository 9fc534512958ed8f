"""The trainer: claims jobs from the queue while it has room, runs each in its own process
(``runner.py``), relays the process's events to ``jobs.<id>.events`` and to the queue's
heartbeat, stores each checkpoint as it is made (``checkpoints.py``), then the job's results
file and adapter, and reports the outcome. A job given out again goes on from its last
checkpoint.

A job stops early when the queue says so (a heartbeat reply, or the ``cancelled`` state event
it publishes): its process group is terminated, then killed after a grace period.
(Over 400 lines: one job's life, claim to checkpoints to outcome, reads best in one place;
what a checkpoint is stored as, and fetched back from, is ``checkpoints.py``'s.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atoll.agent.errors import AtollError, ConnectionLost, DeadlineExceeded, NoResponder
from atoll.agent.plugins import PluginContext
from atoll.plugins.storage.contract.adapters import (
    AdapterExists,
    delete_adapter,
    describe_adapter,
    upload_adapter,
)
from atoll.plugins.storage.contract.datasets import AsFormat, fetch_dataset, upload_dataset
from atoll.plugins.training.checkpoints import fetch_resume, store_checkpoint
from atoll.plugins.training.contract import (
    FINAL_STATES,
    MAX_EVENTS_KEPT,
    QUEUED_SUBJECT,
    Checkpoint,
    JobRecord,
    Precision,
    adapter_id_for,
    claim_job,
    events_subject,
    finish_job,
    send_heartbeat,
)
from atoll.plugins.training.runner import RunSpec, offered_models
from atoll.protocol.session import Publication

RUNNER = "atoll.plugins.training.runner"
KILL_GRACE = 5.0  # seconds between SIGTERM and SIGKILL
BATCH = 0.25  # seconds events gather before a heartbeat carries them
MAX_LINE = 1024 * 1024  # longest event line read from a job's process
FINISH_TRIES = 5
PROGRESS_KEYS = ("step", "max_steps", "epoch", "loss", "learning_rate", "estimated_finish")
RELAYED = frozenset({"log", "hyperparameters", "metrics"})  # the process's events the queue keeps
RETRYABLE = (NoResponder, DeadlineExceeded, ConnectionLost)
STAGE_FORMS: dict[str, AsFormat] = {"sft": "chat", "pt": "text", "dpo": "preference"}

Locator = Callable[[], Awaitable[str]]


def detect_device(wanted: str) -> str:
    """``auto``: cuda when NVML sees a GPU (no torch import in the agent), else cpu."""
    if wanted != "auto":
        return wanted
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return "cuda" if pynvml.nvmlDeviceGetCount() > 0 else "cpu"
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no module, library, driver or GPU
        return "cpu"


def detect_precisions(device: str) -> list[Precision]:
    """What ``device`` computes in natively: fp32 everywhere; on a GPU fp16, and bf16 from
    compute capability 8 (read through NVML: no torch import in the agent); on an x86 CPU bf16
    where it has AVX512-BF16 (every AMX CPU does), on which oneDNN runs bf16 matrix products
    faster than fp32 ones. Elsewhere bf16 is emulated and slower than fp32. The queue leaves a
    job asking for another precision to a trainer that has it; "auto" takes bf16 where it is."""
    if device == "cuda":
        half: list[Precision] = ["fp16", "bf16"] if _gpu_capability() >= (8, 0) else ["fp16"]
        return ["fp32", *half]
    if device == "cpu" and "avx512_bf16" in _cpu_flags():
        return ["fp32", "bf16"]
    return ["fp32"]


def _gpu_capability() -> tuple[int, int]:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            return int(major), int(minor)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no module, library, driver or GPU
        return (0, 0)


def _cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (none elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            for line in info:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def _terminate(process: asyncio.subprocess.Process) -> None:
    """SIGTERM to the job's process group now, SIGKILL after the grace period."""
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)

    def kill() -> None:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)

    asyncio.get_running_loop().call_later(KILL_GRACE, kill)


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:].strip()
    except OSError:
        return ""


@dataclass
class Running:
    job: JobRecord
    queue: str  # the queue that gave the job: heartbeats and the outcome go there
    process: asyncio.subprocess.Process | None = None
    step: str = "starting"  # what the attempt is doing, for error messages
    pending: list[dict[str, Any]] = field(default_factory=list)  # events for the next heartbeat
    progress: dict[str, Any] = field(default_factory=dict)
    stop_reason: str | None = None  # set when the queue takes the job back (cancel, lost)
    cancelled: bool = False  # the job was cancelled: the checkpoints this attempt stored go
    error: str | None = None  # the process's own account of its failure
    done: dict[str, Any] | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    checkpoints: list[Checkpoint] = field(default_factory=list)  # kept in storage, oldest first
    storage: str = ""  # the storage agent this attempt uses


class TrainerWorker:
    def __init__(
        self,
        ctx: PluginContext,
        config: Any,  # plugin.TrainingConfig
        find_queue: Locator,
        find_storage: Locator,
        gone: Callable[[str], None],
    ) -> None:
        self.ctx = ctx
        self.config = config
        self.find_queue = find_queue
        self.find_storage = find_storage
        self.gone = gone  # an address found before answered "no responder": find it anew
        self.workdir = Path(config.workdir or ctx.data_dir / "work")
        self.model_cache = Path(config.model_cache or ctx.data_dir / "models")
        self.device = detect_device(config.device)
        self.precisions = detect_precisions(self.device)
        self.models = offered_models({name: str(spec) for name, spec in config.models.items()})
        self.running: dict[str, Running] = {}
        self.tasks: set[asyncio.Task] = set()
        self.wake = asyncio.Event()
        self._last_claim_error: str | None = None
        self.jobs_gauge = ctx.metrics.gauge("training_jobs", "Jobs training on this agent")
        self.loss_gauge = ctx.metrics.gauge("train_loss", "Last logged training loss")
        self.steps = ctx.metrics.counter("train_steps", "Training steps logged")

    async def start(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)  # attempts a crash left behind
        self.workdir.mkdir(parents=True)
        self._sub = await self.ctx.subscribe(QUEUED_SUBJECT, lambda _pub: self.wake.set())
        self._loop = asyncio.create_task(self._claim_loop())

    async def stop(self) -> None:
        await self._sub.unsubscribe()
        self._loop.cancel()
        for task in list(self.tasks):
            task.cancel()
        # Each job's task ends its process on the way out (SIGTERM, then SIGKILL).
        await asyncio.gather(self._loop, *self.tasks, return_exceptions=True)

    def describe(self) -> dict[str, Any]:
        return {
            "capabilities": {
                "trainer": True,
                "device": self.device,
                "precisions": self.precisions,
                "capacity": self.config.capacity,
                "models": self.models,  # what jobs may name as their base model here
            },
            "load": {"training_jobs": len(self.running)},
        }

    # --- claiming -----------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        while True:
            self.wake.clear()  # before claiming: a job queued meanwhile wakes the wait below
            if len(self.running) < self.config.capacity and await self._claim_one():
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.config.poll)

    async def _claim_one(self) -> bool:
        free = self.config.capacity - len(self.running)
        queue = None
        try:
            queue = await self.find_queue()
            job = await claim_job(self.ctx, queue, free, self.device, self.precisions)
        except AtollError as exc:
            if queue is not None and isinstance(exc, NoResponder):
                self.gone(queue)
            if str(exc) != self._last_claim_error:  # said once, not at every poll
                self.ctx.log.info("training.claim_failed", error=exc)
                self._last_claim_error = str(exc)
            return False
        self._last_claim_error = None
        if job is None:
            return False
        run = Running(job, queue, checkpoints=list(job.checkpoints))
        self.running[job.id] = run
        self.jobs_gauge.set(len(self.running))
        task = asyncio.create_task(self._run(run))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        self.ctx.log.info("training.claimed", job=job.id, attempt=job.attempt, queue=queue)
        return True

    # --- one job ------------------------------------------------------------------------------

    async def _run(self, run: Running) -> None:
        job = run.job
        beats = asyncio.create_task(self._heartbeats(run))
        workdir = self.workdir / f"{job.id}-{job.attempt}"
        sub = None
        try:
            sub = await self.ctx.subscribe(events_subject(job.id), lambda p: self._on_state(run, p))
            outcome = await self._attempt(run, workdir)
        except Exception as exc:
            outcome = {"ok": False, "error": f"{run.step}: {type(exc).__name__}: {exc}"}
        finally:
            beats.cancel()
            if sub is not None:
                with contextlib.suppress(AtollError):
                    await sub.unsubscribe()
            if run.process is not None:
                _terminate(run.process)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(run.process.wait(), KILL_GRACE + 2)
            await asyncio.to_thread(shutil.rmtree, workdir, True)
            if run.cancelled:  # those the queue never heard of too (stored as the cancel came)
                await self._forget_checkpoints(run)
            del self.running[job.id]
            self.jobs_gauge.set(len(self.running))
            self.wake.set()  # a slot is free
        if run.stop_reason is not None:
            self.ctx.log.info("training.stopped", job=job.id, reason=run.stop_reason)
            return
        await self._finish(run, outcome)

    async def _attempt(self, run: Running, workdir: Path) -> dict[str, Any]:
        job, options = run.job, run.job.options
        run.step = "checking the model"
        if options.model_name_or_path not in self.models:  # never a path from the job
            raise ValueError(
                f"model {options.model_name_or_path!r} is not one this trainer offers "
                f"({', '.join(self.models) or 'none'})"
            )
        workdir.mkdir(parents=True)
        run.step = "fetching datasets"
        storage = run.storage = await self.find_storage()
        paths = {}
        for dataset in options.datasets:
            dest = workdir / f"{dataset}.jsonl"
            as_: AsFormat = STAGE_FORMS[options.stage]
            try:
                record = await fetch_dataset(self.ctx, storage, dataset, dest, as_=as_)
            except NoResponder:
                self.gone(storage)
                raise
            role = "validation set" if dataset == options.validation_dataset else "dataset"
            message = f"{role} {record.id}: {record.name} v{record.version}, {record.rows} rows"
            await self._emit(run, {"type": "log", "message": message})
            paths[dataset] = dest
        resume = None
        if job.attempt > 1:  # an earlier attempt may have left a checkpoint to go on from
            run.step = "fetching the last checkpoint"
            resume = await fetch_resume(self.ctx, storage, job, workdir / "resume")
        if run.stop_reason is not None:
            return {}
        run.step = "training"
        spec = RunSpec(
            job_id=job.id,
            options=options,
            models=self.config.models,
            model_cache=self.model_cache,
            datasets=[paths[d] for d in options.dataset],
            validation=paths[v] if (v := options.validation_dataset) else None,
            output_dir=workdir / "out",
            device=self.device,  # type: ignore[arg-type]
            precisions=self.precisions,
            resume=resume,
        )
        (workdir / "job.json").write_text(spec.model_dump_json())
        log_path = workdir / "runner.log"
        with log_path.open("wb") as log:
            run.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", RUNNER, "--job", str(workdir / "job.json"),
                "--parent", str(os.getpid()),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log,
                cwd=workdir, start_new_session=True, limit=MAX_LINE,
            )  # fmt: skip
        await self._relay(run)
        status = await run.process.wait()
        if run.stop_reason is not None:
            return {}
        if status != 0 or run.done is None:
            why = run.error or _tail(log_path) or "no output"
            return {"ok": False, "error": f"the training process exited with {status}: {why}"}
        await self._beat(run)  # the last events; and the last word on a cancel before storing
        if run.stop_reason is not None:
            return {}
        run.step = "storing the results file"
        results = await self._store_results(run, storage)
        run.step = "storing the adapter"
        adapter_id = await self._store(run, storage)
        metrics = run.done.get("metrics", {})
        return {"ok": True, "adapter_id": adapter_id, "metrics": metrics, "result_files": [results]}

    async def _relay(self, run: Running) -> None:
        """The process's event lines, until it closes its standard output."""
        assert run.process is not None and run.process.stdout is not None
        stdout = run.process.stdout
        while True:
            try:
                line = await stdout.readline()
            except ValueError:  # a line over MAX_LINE: dropped, the stream goes on
                continue
            if not line:
                return
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if not isinstance(event, dict):
                continue
            kind = event.get("type")
            if kind in RELAYED:
                await self._emit(run, event)
            elif kind == "checkpoint":
                await self._checkpoint(run, event)
            elif kind == "error":
                run.error = str(event.get("message"))
            elif kind == "done":
                run.done = event

    async def _checkpoint(self, run: Running, event: dict[str, Any]) -> None:
        """Store the checkpoint the process just wrote, tell the queue, remove it from disk,
        and let the process go on. One not stored is said as a warning: training goes on."""
        try:
            checkpoint, pruned = await store_checkpoint(
                self.ctx, run.storage, run.job, event, self._adapter_meta(run, event),
                run.checkpoints, self.config.keep_checkpoints,
            )  # fmt: skip
        except (AtollError, OSError, KeyError, ValueError) as exc:
            message = f"checkpoint at step {event.get('step')} not stored: {exc}"
            await self._emit(run, {"type": "log", "level": "warn", "message": message})
        else:
            gone = {*pruned, checkpoint.adapter_id}  # a step trained again replaces its record
            run.checkpoints = [c for c in run.checkpoints if c.adapter_id not in gone]
            run.checkpoints.append(checkpoint)
            stored = {
                "type": "checkpoint",
                "message": f"checkpoint {checkpoint.adapter_id} at step {checkpoint.step}",
                "checkpoint": checkpoint.model_dump(mode="json"),
                "pruned": pruned,
            }
            await self._emit(run, stored)
        await asyncio.to_thread(shutil.rmtree, str(event.get("dir")), True)
        assert run.process is not None and run.process.stdin is not None
        with contextlib.suppress(ConnectionError):  # the process ended meanwhile
            run.process.stdin.write(b"stored\n")
            await run.process.stdin.drain()

    async def _emit(self, run: Running, event: dict[str, Any]) -> None:
        """Publish a job event now; the queue gets it with the next heartbeat."""
        event = {**event, "job": run.job.id}
        event.setdefault("at", time.time())
        run.progress.update({k: event[k] for k in PROGRESS_KEYS if k in event})
        if "loss" in event and isinstance(event["loss"], int | float):
            self.loss_gauge.set(event["loss"])
            self.steps.inc()
        run.pending = [*run.pending, event][-MAX_EVENTS_KEPT:]
        run.wake.set()
        with contextlib.suppress(AtollError):  # live view only: the queue keeps the record
            await self.ctx.publish(events_subject(run.job.id), event)

    async def _store_results(self, run: Running, storage: str) -> str:
        """The job's metrics CSV as a file of its owner (OpenAI's ``fine-tune-results``)."""
        job, path = run.job, Path((run.done or {})["results"])
        record = await upload_dataset(
            self.ctx, storage, path, f"{job.id} results", job.owner, job.project, "csv",
            filename=path.name, dedup="none",
        )  # fmt: skip
        return record.id

    @staticmethod
    def _adapter_meta(run: Running, outcome: dict[str, Any]) -> dict[str, Any]:
        return {
            "base_model": outcome.get("base_model"),
            "rank": run.job.options.lora_rank,
            "targets": outcome.get("targets"),
            "stage": run.job.options.stage,
            "metrics": outcome.get("metrics", {}),
        }

    async def _store(self, run: Running, storage: str) -> str:
        job, done = run.job, run.done or {}
        adapter_id = adapter_id_for(job)
        meta = self._adapter_meta(run, done)
        try:
            await upload_adapter(
                self.ctx, storage, Path(done["adapter_dir"]), adapter_id, meta,
                owner=job.owner, project=job.project, source_job=job.id,
            )  # fmt: skip
        except AdapterExists:
            # An earlier attempt of this job stored it, then lost its trainer before finishing.
            existing = await describe_adapter(self.ctx, storage, adapter_id)
            if existing.source_job != job.id:
                raise
        return adapter_id

    # --- talking to the queue -----------------------------------------------------------------

    def _on_state(self, run: Running, pub: Publication) -> None:
        data = pub.data
        if (
            pub.src == run.queue
            and isinstance(data, dict)
            and data.get("type") == "state"
            and data.get("state") in FINAL_STATES
        ):
            run.cancelled = run.cancelled or data.get("state") == "cancelled"
            self._stop(run, str(data.get("message") or data.get("state")))

    async def _forget_checkpoints(self, run: Running) -> None:
        for checkpoint in run.checkpoints:
            with contextlib.suppress(AtollError):  # gone already (the queue deleted it)
                await delete_adapter(self.ctx, run.storage, checkpoint.adapter_id)

    def _stop(self, run: Running, reason: str) -> None:
        if run.stop_reason is None:
            run.stop_reason = reason
            if run.process is not None:
                _terminate(run.process)

    async def _heartbeats(self, run: Running) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(run.wake.wait(), self.config.heartbeat)
                await asyncio.sleep(BATCH)  # let a burst of events ride one heartbeat
            await self._beat(run)

    async def _beat(self, run: Running) -> None:
        run.wake.clear()
        events, run.pending = run.pending, []
        try:
            reply = await send_heartbeat(self.ctx, run.queue, run.job, run.progress, events)
        except AtollError as exc:  # kept for the next try
            run.pending = [*events, *run.pending][-MAX_EVENTS_KEPT:]
            self.ctx.log.info("training.heartbeat_failed", job=run.job.id, error=exc)
            return
        if reply.cancel:
            run.cancelled = run.cancelled or reply.state == "cancelled"
            self._stop(run, reply.reason or "the queue took the job back")

    async def _finish(self, run: Running, outcome: dict[str, Any]) -> None:
        for n in range(FINISH_TRIES):
            try:
                reply = await finish_job(self.ctx, run.queue, run.job, outcome)
            except RETRYABLE as exc:
                self.ctx.log.info("training.finish_retry", job=run.job.id, error=exc)
                await asyncio.sleep(1.0 + n)
                continue
            except AtollError as exc:
                self.ctx.log.error("training.finish_refused", job=run.job.id, error=exc)
                return
            self.ctx.log.info(
                "training.finished", job=run.job.id, ok=outcome.get("ok"), accepted=reply.accepted
            )
            return
        # The queue will see this trainer's heartbeats stop and give the job out again.
        self.ctx.log.error("training.finish_lost", job=run.job.id)
