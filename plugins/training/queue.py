"""The job queue: jobs and their recent events in SQLite (they survive a restart of the queue's
agent), claimed by trainers, watched for lost trainers.

One connection, used only from the event loop: every statement touches a few rows. A job moves
created -> queued -> training -> completed | failed | cancelled; a job whose trainer is lost goes
back to queued (its place in line kept) until ``max_attempts`` claims have all been lost.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from atoll.agent.errors import Forbidden
from atoll.plugins.training.contract import (
    FINAL_STATES,
    MAX_EVENTS_KEPT,
    QUEUED_SUBJECT,
    Checkpoint,
    ClaimRequest,
    FinishRequest,
    HeartbeatReply,
    HeartbeatRequest,
    JobFinished,
    JobNotFound,
    JobOptions,
    JobQuery,
    JobRecord,
    Precision,
    Resolved,
    events_subject,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    record TEXT NOT NULL,          -- JobRecord as JSON
    state TEXT NOT NULL,
    owner TEXT NOT NULL,
    project TEXT,
    queued_at REAL,
    heartbeat_at REAL,
    trainers TEXT NOT NULL,        -- JSON list: the trainer of each attempt
    seq INTEGER NOT NULL           -- last event number
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, queued_at);
CREATE TABLE IF NOT EXISTS events (
    job TEXT NOT NULL,
    seq INTEGER NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (job, seq)
);
"""
MAX_EVENT_BYTES = 4096
MAX_PROGRESS_BYTES = 4096
TRAINER_EVENT_TYPES = frozenset({"log", "hyperparameters", "metrics", "checkpoint"})

Emit = Callable[[str, dict[str, Any]], None]  # (subject, data): published by the plugin


def _small(obj: Any, limit: int) -> bool:
    try:
        return len(json.dumps(obj)) <= limit
    except (TypeError, ValueError):
        return False


def _kept(job: JobRecord, event: dict[str, Any]) -> None:
    """A checkpoint event's new checkpoint joins the job's list, and those it pruned leave."""
    pruned = event.get("pruned")
    gone = {p for p in pruned if isinstance(p, str)} if isinstance(pruned, list) else set()
    try:
        new = Checkpoint.model_validate(event.get("checkpoint"))
    except ValidationError:
        return  # kept as an event all the same
    gone.add(new.adapter_id)  # a step trained again (after a lost trainer) replaces its record
    job.checkpoints = [c for c in job.checkpoints if c.adapter_id not in gone] + [new]


class JobQueue:
    def __init__(
        self,
        path: Path,
        emit: Emit,
        lost_after: float = 30.0,
        max_attempts: int = 3,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)
        self.emit = emit
        self.lost_after = lost_after
        self.max_attempts = max_attempts
        self.clock = clock
        # Trainers heard from (claims, heartbeats): name -> (device, precisions, when).
        self.trainers: dict[str, tuple[str, list[Precision], float]] = {}

    def close(self) -> None:
        self.db.close()

    # --- rows ---------------------------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord:
        row = self.db.execute("SELECT record FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(f"no fine-tuning job {job_id!r}")
        return JobRecord.model_validate_json(row[0])

    def _save(self, job: JobRecord, **columns: Any) -> None:
        sets = ", ".join(f"{k} = ?" for k in ("record", "state", "queued_at", *columns))
        values = [job.model_dump_json(), job.state, job.queued_at, *columns.values()]
        self.db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*values, job.id))

    def _trainers(self, job_id: str) -> list[str]:
        row = self.db.execute("SELECT trainers FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return json.loads(row[0])

    def find(self, query: JobQuery) -> list[JobRecord]:
        sql, args = "SELECT record FROM jobs WHERE 1=1", []
        for column in ("owner", "project", "state"):
            value = getattr(query, column)
            if value is not None:
                sql += f" AND {column} = ?"
                args.append(value)
        if query.after is not None:
            sql += " AND rowid < (SELECT rowid FROM jobs WHERE id = ?)"
            args.append(query.after)
        rows = self.db.execute(sql + " ORDER BY rowid DESC LIMIT ?", [*args, query.limit])
        return [JobRecord.model_validate_json(r[0]) for r in rows]

    def counts(self) -> dict[str, int]:
        rows = self.db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state")
        return dict(rows.fetchall())

    # --- events -------------------------------------------------------------------------------

    def _event(self, job: JobRecord, event: dict[str, Any]) -> None:
        """Number, keep (the last MAX_EVENTS_KEPT) and publish one event; it becomes the job's
        ``last_event`` (the caller saves the job)."""
        (seq,) = self.db.execute("SELECT seq + 1 FROM jobs WHERE id = ?", (job.id,)).fetchone()
        event = {**event, "seq": seq, "job": job.id}
        event.setdefault("at", self.clock())
        self.db.execute("UPDATE jobs SET seq = ? WHERE id = ?", (seq, job.id))
        self.db.execute(
            "INSERT INTO events (job, seq, data) VALUES (?, ?, ?)", (job.id, seq, json.dumps(event))
        )
        self.db.execute(
            "DELETE FROM events WHERE job = ? AND seq <= ?", (job.id, seq - MAX_EVENTS_KEPT)
        )
        job.last_event = event
        if event["type"] == "state":  # trainers publish their own events as they happen
            self.emit(events_subject(job.id), event)

    def _state(self, job: JobRecord, state: str, message: str, **extra: Any) -> None:
        now = self.clock()
        job.state = state  # type: ignore[assignment]
        stamp = {"created": "created_at", "queued": "queued_at", "training": "started_at"}
        if state in FINAL_STATES:
            job.finished_at = now
        elif state != "queued" or job.queued_at is None:  # a re-queued job keeps its place
            setattr(job, stamp[state], now)
        self._event(job, {"type": "state", "state": state, "at": now, "message": message, **extra})

    def events(self, job_id: str, after: int = 0) -> list[dict[str, Any]]:
        self.get(job_id)  # JobNotFound
        rows = self.db.execute(
            "SELECT data FROM events WHERE job = ? AND seq > ? ORDER BY seq", (job_id, after)
        )
        return [json.loads(r[0]) for r in rows]

    # --- users --------------------------------------------------------------------------------

    def submit(self, owner: str, project: str | None, options: JobOptions) -> JobRecord:
        now = self.clock()
        job = JobRecord(
            id=f"ftjob-{secrets.token_hex(6)}",
            owner=owner,
            project=project,
            options=options,
            state="created",
            created_at=now,
        )
        self.db.execute(
            "INSERT INTO jobs (id, record, state, owner, project, trainers, seq) "
            "VALUES (?, ?, ?, ?, ?, '[]', 0)",
            (job.id, job.model_dump_json(), job.state, owner, project),
        )
        self._state(job, "created", f"job created for {owner}")
        self._state(job, "queued", "waiting for a trainer")
        self._save(job)
        self.emit(QUEUED_SUBJECT, {"id": job.id})
        return job

    def cancel(self, job_id: str, owner: str | None, admin: bool) -> JobRecord:
        job = self.get(job_id)
        if not admin and (owner is None or owner != job.owner):
            raise Forbidden(f"only {job.owner!r} (or an admin) may cancel job {job_id}")
        if job.final:
            raise JobFinished(f"job {job_id} is already {job.state}")
        # A training job's trainer hears it from this state event, or at its next heartbeat.
        self._state(job, "cancelled", f"cancelled by {owner or 'an admin'}", trainer=job.trainer)
        self._save(job)
        return job

    def forget_checkpoints(self, job_id: str) -> list[str]:
        """A cancelled job keeps no checkpoint: the ids to delete from storage."""
        job = self.get(job_id)
        gone, job.checkpoints = [c.adapter_id for c in job.checkpoints], []
        self._save(job)
        return gone

    # --- trainers -----------------------------------------------------------------------------

    def _trainer_around(self, precision: str) -> bool:
        """Whether a live trainer computes in ``precision`` natively."""
        now = self.clock()
        return any(
            precision in precisions and now - seen <= self.lost_after
            for _, precisions, seen in self.trainers.values()
        )

    def claim(self, trainer: str, request: ClaimRequest) -> JobRecord | None:
        """The oldest queued job this trainer can run, now training on it; None if none. A job
        asking for a precision the trainer has not natively (bf16 on a CPU without AVX512-BF16,
        fp16 on any CPU) is left for a trainer that has it when one is around, and refused
        (failed, saying why) when none is."""
        have = request.precisions
        self.trainers[trainer] = (request.device, have, self.clock())
        if request.capacity < 1:
            return None
        rows = self.db.execute(
            "SELECT record FROM jobs WHERE state = 'queued' ORDER BY queued_at, rowid"
        ).fetchall()
        for (raw,) in rows:
            job = JobRecord.model_validate_json(raw)
            precision = job.options.precision_type
            if precision != "auto" and precision not in have:
                if self._trainer_around(precision):
                    continue
                job.error = (
                    f"precision_type {precision!r} needs a trainer that computes in it "
                    f"natively; {trainer} ({request.device}) has {', '.join(have)} and no such "
                    'trainer is connected (use precision_type "fp32" or "auto")'
                )
                self._state(job, "failed", job.error, trainer=trainer)
                self._save(job)
                continue
            job.attempt += 1
            job.trainer = trainer
            job.progress = {}
            job.hyperparameters = None  # the attempt's runner says again
            self._state(job, "training", f"attempt {job.attempt} on {trainer}", trainer=trainer)
            trainers = [*self._trainers(job.id), trainer]
            self._save(job, heartbeat_at=self.clock(), trainers=json.dumps(trainers))
            return job
        return None

    def _mine(self, job: JobRecord, trainer: str, attempt: int) -> bool:
        return job.state == "training" and job.trainer == trainer and job.attempt == attempt

    def heartbeat(self, trainer: str, beat: HeartbeatRequest) -> HeartbeatReply:
        job = self.get(beat.id)
        if trainer in self.trainers:
            device, precisions, _ = self.trainers[trainer]
            self.trainers[trainer] = (device, precisions, self.clock())
        if not self._mine(job, trainer, beat.attempt):
            why = f"job {job.id} is {job.state}"
            if job.state == "training":
                why += f" on attempt {job.attempt} by {job.trainer}"
            return HeartbeatReply(cancel=True, reason=why, state=job.state)
        for event in beat.events:
            if event.get("type") in TRAINER_EVENT_TYPES and _small(event, MAX_EVENT_BYTES):
                self._event(job, event)
                if event["type"] == "hyperparameters":
                    with contextlib.suppress(ValidationError):  # kept as an event all the same
                        job.hyperparameters = Resolved.model_validate(event.get("hyperparameters"))
                elif event["type"] == "checkpoint":
                    _kept(job, event)
        if beat.progress and _small(beat.progress, MAX_PROGRESS_BYTES):
            job.progress = beat.progress
        self._save(job, heartbeat_at=self.clock())
        return HeartbeatReply()

    def finish(self, trainer: str, done: FinishRequest) -> bool:
        """Record an attempt's outcome; False (and nothing changed) when the attempt no longer
        owns the job (cancelled meanwhile, or re-queued as lost)."""
        job = self.get(done.id)
        if not self._mine(job, trainer, done.attempt):
            return False
        job.metrics = done.metrics
        if done.ok:
            job.adapter_id = done.adapter_id
            job.result_files = done.result_files
            message = f"completed: adapter {done.adapter_id}"
            self._state(job, "completed", message, adapter_id=done.adapter_id)
        else:
            job.error = done.error or f"trainer {trainer} reported a failure without a reason"
            self._state(job, "failed", job.error, trainer=trainer)
        self._save(job)
        return True

    def sweep(self, lost: set[str]) -> list[JobRecord]:
        """Jobs whose trainer stopped heartbeating (or is in ``lost``, as discovery says): back
        in line, or failed once ``max_attempts`` claims have all been lost."""
        cutoff = self.clock() - self.lost_after
        rows = self.db.execute(
            "SELECT record, heartbeat_at, trainers FROM jobs WHERE state = 'training'"
        ).fetchall()
        changed = []
        for raw, beat_at, trainers_json in rows:
            job = JobRecord.model_validate_json(raw)
            if job.trainer not in lost and (beat_at or 0) >= cutoff:
                continue
            trainers = json.loads(trainers_json)
            if job.attempt >= self.max_attempts:
                names = sorted(set(trainers))
                who = f"trainer {names[0]}" if len(names) == 1 else f"trainers {', '.join(names)}"
                job.error = f"{who} lost {len(trainers)} times"
                self._state(job, "failed", job.error, trainer=job.trainer)
            else:
                self._state(
                    job,
                    "queued",
                    f"trainer {job.trainer} lost; queued again (attempt {job.attempt} of "
                    f"{self.max_attempts} lost)",
                    trainer=job.trainer,
                )
            self._save(job)
            if job.state == "queued":
                self.emit(QUEUED_SUBJECT, {"id": job.id})
            changed.append(job)
        return changed
