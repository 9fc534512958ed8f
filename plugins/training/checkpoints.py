"""A training job's checkpoints on the trainer's side: each stored through storage as an adapter
of its own (the job's owner and project, servable like the final adapter) with the resume state
beside it, the oldest pruned past the number kept; and, for a job given out again, its last
resume state fetched back with the checkpoint's adapter, for the job's process to go on from.

The resume state lives in storage, not on this trainer's disk: a job re-queued after its trainer
died goes to whichever trainer claims it next (see ``storage/contract/resume.py``).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from atoll.agent.plugins import PluginContext
from atoll.plugins.storage.contract.adapters import (
    AdapterExists,
    AdapterNotFound,
    delete_adapter,
    describe_adapter,
    fetch_adapter,
    upload_adapter,
)
from atoll.plugins.storage.contract.resume import (
    ResumeStateNotFound,
    fetch_resume_state,
    upload_resume_state,
)
from atoll.plugins.training.contract import Checkpoint, JobRecord, checkpoint_id


async def store_checkpoint(
    ctx: PluginContext,
    storage: str,
    job: JobRecord,
    event: dict[str, Any],
    meta: dict[str, Any],
    kept: list[Checkpoint],
    keep: int,
) -> tuple[Checkpoint, list[str]]:
    """Store the checkpoint a ``checkpoint`` event names (its adapter, then the resume state:
    a stored state's adapter is always there), then delete the oldest of ``kept`` past ``keep``;
    (the new checkpoint, the ids deleted)."""
    directory, step = Path(event["dir"]), int(event["step"])
    adapter_id = checkpoint_id(job, step)
    metrics = {k: float(v) for k, v in (event.get("metrics") or {}).items()}
    checkpoint = Checkpoint(
        adapter_id=adapter_id,
        step=step,
        epoch=float(event.get("epoch") or 0.0),
        created_at=time.time(),
        metrics=metrics,
    )
    mark = {"checkpoint": {"job": job.id, "step": step, "metrics": metrics}}
    try:
        await upload_adapter(
            ctx, storage, directory, adapter_id, meta | mark,
            owner=job.owner, project=job.project, source_job=job.id,
        )  # fmt: skip
    except AdapterExists:  # stored by an earlier attempt that reached this step, then was lost
        if (await describe_adapter(ctx, storage, adapter_id)).source_job != job.id:
            raise
    await upload_resume_state(ctx, storage, job.id, step, adapter_id, directory, job.attempt)
    older = [c for c in kept if c.adapter_id != adapter_id]
    pruned = [c.adapter_id for c in older[: max(0, len(older) + 1 - keep)]]
    for old in pruned:
        with contextlib.suppress(AdapterNotFound):  # deleted before this trainer heard of it
            await delete_adapter(ctx, storage, old)
    return checkpoint, pruned


async def fetch_resume(ctx: PluginContext, storage: str, job: JobRecord, dest: Path) -> Path | None:
    """The job's last checkpoint as transformers' Trainer resumes from it (adapter and resume
    state in one directory), or None when the job has none to go on from."""
    try:
        header = await fetch_resume_state(ctx, storage, job.id, dest)
    except ResumeStateNotFound:
        return None
    await fetch_adapter(ctx, storage, header.adapter_id, dest)  # files move into ``dest``
    return dest
