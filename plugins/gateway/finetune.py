"""OpenAI's files and fine-tuning API at the gateway: a file is a dataset in the storage agent's
registry, a fine-tuning job is a job in the training queue, and its ``fine_tuned_model`` is the
adapter the job registers (usable at once by its owner or project), as is each checkpoint it
keeps. The shapes are OpenAI's (finetune_shapes.py), so the openai SDK's ``files`` and
``fine_tuning.jobs`` (``checkpoints`` too) work unchanged."""

import asyncio
import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, UploadFile
from fastapi.responses import Response

from atoll.agent.errors import AtollError, InvalidRequest
from atoll.plugins.gateway import file_access
from atoll.plugins.gateway.accounts.keys import Principal
from atoll.plugins.gateway.batch_shapes import check_bodies
from atoll.plugins.gateway.dataset_features import DatasetFeatures
from atoll.plugins.gateway.errors import GatewayError, from_platform
from atoll.plugins.gateway.finetune_shapes import (
    CheckpointList,
    CreateJob,
    EventList,
    FileDeleted,
    FileList,
    FileObject,
    FineTuningJob,
    JobList,
    checkpoint_object,
    event_object,
    file_object,
    job_object,
    job_options,
    upload_filename,
)
from atoll.plugins.gateway.service import Gateway
from atoll.plugins.storage.contract.datasets import (
    DatasetRecord,
    Format,
    delete_dataset,
    describe_dataset,
    fetch_dataset,
    list_datasets,
    upload_dataset,
)
from atoll.plugins.training.contract import (
    JobRecord,
    cancel_job,
    get_job,
    job_events,
    list_jobs,
    submit_job,
)

# The purposes an upload may name, and the format storage keeps each as (None: detected).
UPLOAD_FORMATS: dict[str, Format | None] = {
    "fine-tune": None,
    "batch": "batch",
    "assistants": "document",
}


def install(app: FastAPI, gw: Gateway, user: Any, features: DatasetFeatures) -> None:
    """Add the routes; ``user`` is the authenticated-caller dependency of app.py; an uploaded
    training file's rows are embedded by ``features``, which a deleted file's leave."""

    async def platform(call: Any) -> Any:
        try:
            return await call
        except GatewayError:
            raise
        except AtollError as exc:
            if isinstance(exc, InvalidRequest):
                raise GatewayError(400, exc.message) from None
            if type(exc).__name__ in ("DatasetNotFound", "JobNotFound"):
                raise GatewayError(404, exc.message, code="not_found") from None
            if type(exc).__name__ in ("DatasetInvalid", "JobFinished"):
                raise GatewayError(400, exc.message) from None
            raise from_platform(exc) from None

    def may_write(principal: Principal, project: str | None, owner: str | None = None) -> None:
        file_access.may_write(gw.accounts, principal, project, owner)

    def may_see(principal: Principal, owner: str, project: str | None) -> bool:
        return file_access.may_see(gw.accounts, principal, owner, project)

    async def dataset(principal: Principal, file_id: str, param: str = "file_id") -> DatasetRecord:
        """The file, if the caller may see it; else a 404 naming ``param``, as if it were not
        there (another user's file included)."""
        try:
            record = await platform(describe_dataset(gw.agent, gw.storage_address(), file_id))
        except GatewayError as exc:
            if exc.status == 404:
                exc.param = param
            raise
        if not may_see(principal, record.owner, record.project):
            raise GatewayError(404, f"no file {file_id!r}", code="not_found", param=param)
        return record

    async def job(principal: Principal, job_id: str) -> JobRecord:
        record = await platform(get_job(gw.agent, gw.queue_address(), job_id))
        if not may_see(principal, record.owner, record.project):
            raise GatewayError(404, f"no fine-tuning job {job_id!r}", code="not_found")
        return record

    @app.post("/v1/files", response_model=FileObject)
    async def upload_file(
        principal: user,
        file: Annotated[UploadFile, File()],
        purpose: Annotated[str, Form()] = "fine-tune",
    ) -> Any:
        if purpose not in UPLOAD_FORMATS:
            raise GatewayError(
                400,
                f"purpose {purpose!r}: only fine-tune, batch and assistants files are kept",
                param="purpose",
            )
        may_write(principal, principal.project)
        filename = upload_filename(file.filename)
        with tempfile.TemporaryDirectory(prefix="atoll-upload-") as tmp:
            path = Path(tmp) / filename
            with path.open("wb") as out:
                while chunk := await file.read(1 << 20):
                    out.write(chunk)
            if purpose == "batch":
                await asyncio.to_thread(check_bodies, path)
            record = await platform(
                upload_dataset(
                    gw.agent,
                    gw.storage_address(),
                    path,
                    Path(filename).stem or "dataset",
                    principal.user,
                    principal.project,
                    UPLOAD_FORMATS[purpose],
                    filename=filename,
                )
            )
        gw.accounts.audit(principal.user, "file.upload", record.id, {"filename": filename})
        features.start(principal, record)
        return file_object(record)

    @app.get("/v1/files", response_model=FileList)
    async def files(principal: user) -> Any:
        records = await platform(list_datasets(gw.agent, gw.storage_address()))
        visible = [r for r in records if may_see(principal, r.owner, r.project)]
        return FileList(data=[file_object(r) for r in visible])

    @app.get("/v1/files/{file_id}", response_model=FileObject)
    async def file_info(principal: user, file_id: str) -> Any:
        return file_object(await dataset(principal, file_id))

    @app.get("/v1/files/{file_id}/content")
    async def file_content(principal: user, file_id: str) -> Response:
        await dataset(principal, file_id)
        with tempfile.TemporaryDirectory(prefix="atoll-download-") as tmp:
            dest = Path(tmp) / "content"
            await platform(
                fetch_dataset(gw.agent, gw.storage_address(), file_id, dest, as_="original")
            )
            return Response(dest.read_bytes(), media_type="application/octet-stream")

    @app.delete("/v1/files/{file_id}", response_model=FileDeleted)
    async def file_delete(principal: user, file_id: str) -> Any:
        record = await dataset(principal, file_id)
        may_write(principal, record.project, record.owner)
        await platform(delete_dataset(gw.agent, gw.storage_address(), file_id))
        await platform(features.forget(file_id))
        gw.accounts.audit(principal.user, "file.delete", file_id, {})
        return FileDeleted(id=file_id)

    @app.post("/v1/fine_tuning/jobs", response_model=FineTuningJob)
    async def create_job(principal: user, body: CreateJob) -> Any:
        may_write(principal, principal.project)
        accepted = gw.catalog.trainable_models()
        options = job_options(body)
        # ``options`` may name the model too (it overrides ``model``): what is checked is what
        # would be queued, never a path on a trainer's host.
        for model in dict.fromkeys((body.model, options.model_name_or_path)):
            if model not in accepted:
                raise GatewayError(
                    400,
                    f"model {model[:256]!r} cannot be fine-tuned here: choose a served or "
                    f"configured base model ({', '.join(sorted(accepted)) or 'none is online'})",
                    param="model",
                    code="model_not_found",
                )
        for file_id in options.dataset:
            await dataset(principal, file_id, "training_file")
        if options.validation_dataset is not None:
            await dataset(principal, options.validation_dataset, "validation_file")
        record = await platform(
            submit_job(gw.agent, gw.queue_address(), principal.user, options, principal.project)
        )
        gw.accounts.audit(principal.user, "fine_tuning.create", record.id, {"model": body.model})
        return job_object(record)

    @app.get("/v1/fine_tuning/jobs", response_model=JobList)
    async def jobs(principal: user, limit: int = 20, after: str | None = None) -> Any:
        records = await platform(list_jobs(gw.agent, gw.queue_address()))
        visible = [r for r in records if may_see(principal, r.owner, r.project)]
        visible.sort(key=lambda r: r.created_at, reverse=True)
        if after is not None:
            ids = [r.id for r in visible]
            visible = visible[ids.index(after) + 1 :] if after in ids else []
        limit = max(1, min(limit, 100))
        return JobList(data=[job_object(r) for r in visible[:limit]], has_more=len(visible) > limit)

    @app.get("/v1/fine_tuning/jobs/{job_id}", response_model=FineTuningJob)
    async def job_info(principal: user, job_id: str) -> Any:
        return job_object(await job(principal, job_id))

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel", response_model=FineTuningJob)
    async def job_cancel(principal: user, job_id: str) -> Any:
        record = await job(principal, job_id)
        may_write(principal, record.project, record.owner)
        cancelled = await platform(
            cancel_job(gw.agent, gw.queue_address(), job_id, owner=record.owner)
        )
        gw.accounts.audit(principal.user, "fine_tuning.cancel", job_id, {})
        return job_object(cancelled)

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints", response_model=CheckpointList)
    async def job_checkpoints(
        principal: user, job_id: str, limit: int = 10, after: str | None = None
    ) -> Any:
        """The job's kept checkpoints, newest first; whoever may see the job (its owner, its
        project's members, admins) may list them, anyone else gets the job's own 404."""
        record = await job(principal, job_id)
        newest = [checkpoint_object(record, c) for c in reversed(record.checkpoints)]
        if after is not None:  # the SDK's pages: the checkpoints older than ``after``
            ids = [c.id for c in newest]
            newest = newest[ids.index(after) + 1 :] if after in ids else []
        page = newest[: max(1, min(limit, 100))]
        return CheckpointList(
            data=page,
            has_more=len(newest) > len(page),
            first_id=page[0].id if page else None,
            last_id=page[-1].id if page else None,
        )

    @app.get("/v1/fine_tuning/jobs/{job_id}/events", response_model=EventList)
    async def job_event_list(
        principal: user, job_id: str, limit: int = 20, after: str | None = None
    ) -> Any:
        await job(principal, job_id)
        events = await platform(job_events(gw.agent, gw.queue_address(), job_id))
        limit = max(1, min(limit, 1000))
        newest = [event_object(job_id, e) for e in reversed(events)]  # OpenAI: newest first
        if after is not None:  # the SDK's pages: the events older than ``after``
            ids = [e.id for e in newest]
            newest = newest[ids.index(after) + 1 :] if after in ids else []
        return EventList(data=newest[:limit], has_more=len(newest) > limit)
