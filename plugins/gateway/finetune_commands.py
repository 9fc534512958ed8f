"""`atoll fine-tune ...`: fine-tuning jobs with your own API key over the gateway's OpenAI
fine-tuning API (``/v1/files``, ``/v1/fine_tuning/jobs``): upload a dataset, train an adapter
(supervised or DPO), follow its events, list its checkpoints, cancel it. Operators' queue-side
view of the same jobs is ``atoll train``. Registered under entry point group ``atoll.cli``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote

import typer

from atoll.cli.console import err, fail, out, show
from atoll.plugins.gateway.me_commands import LOCAL, Key, Url, call, upload_rows

fine_tune = typer.Typer(help="Fine-tune adapters with your API key (OpenAI's fine-tuning API).")

ENDED = ("succeeded", "failed", "cancelled")
Job = Annotated[str, typer.Argument(help="The job's id (ftjob-...).", show_default=False)]
Data = Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="A JSONL dataset.")]


def _path(job_id: str, tail: str = "") -> str:
    return f"/v1/fine_tuning/jobs/{quote(job_id, safe='')}{tail}"


def _hyperparameters(
    epochs: int | None, batch_size: int | None, lr_multiplier: float | None, beta: float | None
) -> dict[str, Any]:
    """OpenAI's, only those given ("auto" for the rest)."""
    given = {
        "n_epochs": epochs,
        "batch_size": batch_size,
        "learning_rate_multiplier": lr_multiplier,
        "beta": beta,
    }
    return {k: v for k, v in given.items() if v is not None}


def _seq(event: dict[str, Any]) -> int:
    """An event's sequence number in its job (its id is ``<job>-<seq>``)."""
    return int(event["id"].rsplit("-", 1)[1])


def _new_events(url: str, key: str, job_id: str, after: int) -> tuple[list[dict[str, Any]], int]:
    """The job's events with a sequence number past ``after``, oldest first, and the last one's."""
    events = call(url, key, "GET", _path(job_id, "/events"), params={"limit": 1000}).json()["data"]
    fresh = [e for e in reversed(events) if _seq(e) > after]
    return fresh, _seq(fresh[-1]) if fresh else after


def follow(url: str, key: str, job_id: str, poll_s: float = 2.0) -> dict[str, Any]:
    """Print the job's events as they come until it ends; a job that did not succeed ends the
    command with its error."""
    seen = -1
    while True:
        job: dict[str, Any] = call(url, key, "GET", _path(job_id)).json()
        fresh, seen = _new_events(url, key, job_id, seen)
        for event in fresh:
            stamp = time.strftime("%H:%M:%S", time.localtime(event["created_at"]))
            err.print(f"{stamp} {event['message']}", highlight=False, markup=False)
        if job["status"] in ENDED:
            break
        time.sleep(poll_s)
    if job["status"] != "succeeded":
        why = (job.get("error") or {}).get("message")
        fail(f"job {job_id} {job['status']}: {why}")
    return job


@fine_tune.command("create")
def create(
    key: Key,
    data: Data,
    model: Annotated[str, typer.Option("--model", "-m", help="The base model to train on.")],
    validation: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="A JSONL set measured after each epoch."),
    ] = None,
    method: Annotated[
        Literal["supervised", "dpo"], typer.Option(help="dpo: DATA holds preference pairs.")
    ] = "supervised",
    epochs: Annotated[int | None, typer.Option(min=1, help="n_epochs (auto).")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="batch_size (auto).")] = None,
    lr_multiplier: Annotated[
        float | None, typer.Option(min=0, help="learning_rate_multiplier (auto).")
    ] = None,
    beta: Annotated[float | None, typer.Option(help="dpo's beta (0.1).")] = None,
    suffix: Annotated[str | None, typer.Option(help="Goes into the adapter's id.")] = None,
    wait: Annotated[bool, typer.Option(help="Follow its events until it ends.")] = False,
    url: Url = LOCAL,
) -> None:
    """Upload DATA (and VALIDATION) and start a job; prints the job's id (with --wait, its
    events as they come and then the job)."""
    if beta is not None and method != "dpo":
        fail("--beta is dpo's: add --method dpo")
    body: dict[str, Any] = {"model": model, "training_file": upload_rows(url, key, data)}
    if validation is not None:
        body["validation_file"] = upload_rows(url, key, validation)
    hyper = _hyperparameters(epochs, batch_size, lr_multiplier, beta)
    body["method"] = {"type": method, method: {"hyperparameters": hyper}}
    if suffix is not None:
        body["suffix"] = suffix
    job = call(url, key, "POST", "/v1/fine_tuning/jobs", json=body).json()
    err.print(f"job {job['id']} {job['status']}")
    if not wait:
        out.print(job["id"], highlight=False)
        return
    show(follow(url, key, job["id"]))


@fine_tune.command("list")
def list_jobs(
    key: Key,
    limit: Annotated[int, typer.Option(min=1, max=100, help="The newest this many.")] = 20,
    url: Url = LOCAL,
) -> None:
    """Your jobs (and your projects'), newest first."""
    show(call(url, key, "GET", "/v1/fine_tuning/jobs", params={"limit": limit}).json()["data"])


@fine_tune.command("show")
def show_job(key: Key, job_id: Job, url: Url = LOCAL) -> None:
    """One job as OpenAI's job object: status, hyperparameters as resolved, metrics, model."""
    show(call(url, key, "GET", _path(job_id)).json())


@fine_tune.command("events")
def events(
    key: Key,
    job_id: Job,
    wait: Annotated[bool, typer.Option(help="Go on until the job ends.")] = False,
    url: Url = LOCAL,
) -> None:
    """The job's events, oldest first, each step's figures included."""
    if wait:
        follow(url, key, job_id)
        return
    fresh, _ = _new_events(url, key, job_id, -1)
    show(fresh)


@fine_tune.command("checkpoints")
def checkpoints(key: Key, job_id: Job, url: Url = LOCAL) -> None:
    """The job's kept checkpoints, newest first; each is a model of its own."""
    show(call(url, key, "GET", _path(job_id, "/checkpoints"), params={"limit": 100}).json()["data"])


@fine_tune.command("cancel")
def cancel(key: Key, job_id: Job, url: Url = LOCAL) -> None:
    """Stop the job; it keeps nothing it trained."""
    show(call(url, key, "POST", _path(job_id, "/cancel")).json())
