"""The storage plugin's resume states, as trainers see them: what a training job needs, beside
its last checkpoint adapter, to go on from that checkpoint on any trainer (optimizer, scheduler,
RNG and trainer state, Atoll's own bookkeeping). One state per job; a new one replaces it.

Kept in storage rather than on a trainer's disk: a job re-queued after its trainer died is
claimed by whichever trainer asks next, and a restarted trainer clears its work directory. A
LoRA's optimizer state is small (two moments per adapter weight).

Overlay surface of an agent's ``storage`` plugin (trainers only: the ``training`` role):

    STREAM resume_put    (no params)  the trainer writes a ResumeHeader line, then the files'
                                      bytes; storage answers {"ok": true} once the state is kept
    STREAM resume_get    ResumeRef    storage writes the job's ResumeHeader line, then the bytes;
                                      ResumeStateNotFound when the job has none
    RPC    resume_drop   ResumeRef -> {"deleted": bool}

The new state becomes visible whole (its header is written after every file), so a trainer
never reads a state half replaced.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, Field, field_validator

from atoll.agent.contract import Caller, Method, Strict, parse, service_address
from atoll.agent.errors import AtollError
from atoll.agent.transfer import (
    IDLE_TIMEOUT,
    Opener,
    TransferFailed,
    fetching,
    put_files,
    receive_file,
    sha256_file,
    staged,
)
from atoll.plugins.storage.contract.adapters import AdapterIdStr
from atoll.plugins.storage.contract.wire import PLUGIN, Deleted, FileEntry, storage_client

RESUME_PUT = "resume_put"
RESUME_GET = "resume_get"
# What transformers' Trainer writes beside the model in a checkpoint (weights-only pickles and
# JSON), and Atoll's bookkeeping; the adapter's own files travel as the checkpoint adapter.
RESUME_FILES = frozenset(
    {
        "optimizer.pt",
        "scheduler.pt",
        "scaler.pt",
        "rng_state.pth",
        "trainer_state.json",
        "atoll_state.json",
    }
)
JOB_ID = r"^ftjob-[0-9a-f]{12}$"


class ResumeStateNotFound(AtollError):
    """The job has no resume state in this storage."""


class StaleResumeState(AtollError):
    """A state from an earlier attempt of the job than the one kept (a trainer stopped mid-upload
    that finished it after the job moved on): refused, the later attempt's state stays."""


class ResumeFile(FileEntry):
    @field_validator("name")
    @classmethod
    def _allowed(cls, name: str) -> str:
        if name not in RESUME_FILES:
            raise ValueError(f"file {name!r} is not part of a resume state")
        return name


def _distinct(files: list[ResumeFile]) -> list[ResumeFile]:
    if len({f.name for f in files}) != len(files):
        raise ValueError("each file is named once")
    return files


class ResumeHeader(Strict):
    """A job's resume state: at optimizer step ``step`` of the job's ``attempt``, whose adapter
    is ``adapter_id``."""

    job: str = Field(pattern=JOB_ID)
    attempt: int = Field(ge=1)
    step: int = Field(ge=0)
    adapter_id: AdapterIdStr
    files: Annotated[
        list[ResumeFile],
        Field(min_length=1, max_length=len(RESUME_FILES)),
        AfterValidator(_distinct),
    ]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


class ResumeRef(Strict):
    job: str = Field(pattern=JOB_ID)


RESUME_DROP: Method[ResumeRef, Deleted] = Method(
    "resume_drop", ResumeRef, Deleted, "resume_drop request"
)


async def upload_resume_state(
    agent: Opener,
    storage_address: str,
    job_id: str,
    step: int,
    adapter_id: str,
    local_dir: Path,
    attempt: int = 1,
    idle_timeout: float = IDLE_TIMEOUT,
) -> None:
    """Keep the resume state files found in ``local_dir`` as ``job_id``'s, replacing any of the
    same or an earlier attempt (StaleResumeState for a later attempt's)."""
    paths = [local_dir / n for n in sorted(RESUME_FILES) if (local_dir / n).is_file()]
    files = [
        {"name": p.name, "size": p.stat().st_size, "sha256": digest.hexdigest()}
        for p in paths
        for digest in [await asyncio.to_thread(sha256_file, p)]
    ]
    header = parse(
        ResumeHeader,
        {"job": job_id, "attempt": attempt, "step": step, "adapter_id": adapter_id, "files": files},
        "resume state",
    )
    await put_files(
        agent,
        service_address(storage_address, PLUGIN),
        RESUME_PUT,
        header.model_dump(mode="json"),
        [(p, f.size) for p, f in zip(paths, header.files, strict=True)],
        idle_timeout,
    )


async def fetch_resume_state(
    agent: Opener,
    storage_address: str,
    job_id: str,
    dest_dir: Path,
    idle_timeout: float = IDLE_TIMEOUT,
) -> ResumeHeader:
    """``job_id``'s resume state into the new directory ``dest_dir`` (renamed into place once
    every file verifies); ResumeStateNotFound when it has none."""
    where = service_address(storage_address, PLUGIN)
    ref = ResumeRef(job=job_id).model_dump()
    with staged(dest_dir, directory=True) as stage:
        async with fetching(agent, where, RESUME_GET, ref, idle_timeout) as reader:
            header = parse(ResumeHeader, await reader.line(), f"header from {storage_address}")
            if header.job != job_id:
                raise TransferFailed(f"asked for {job_id}'s state, got {header.job}'s")
            for entry in header.files:
                await receive_file(reader, stage / entry.name, entry.size, entry.sha256)
        stage.rename(dest_dir)
    return header


async def drop_resume_state(
    agent: Caller, storage_address: str, job_id: str, timeout: float | None = None
) -> bool:
    """Forget ``job_id``'s resume state; whether there was one."""
    ref = ResumeRef(job=job_id)
    reply = await storage_client(agent, storage_address, timeout).invoke(RESUME_DROP, ref)
    return reply.deleted
