"""The training plugin's commands (`atoll train`): LoRA jobs on a training queue, as a tenant
admin. Registered under entry point group ``atoll.cli``."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from atoll.agent.node import Agent
from atoll.cli.admin import ISLAND, AdminTarget, admin_command
from atoll.cli.console import err, fail, out, show
from atoll.plugins.training.contract import (
    cancel_job,
    follow_events,
    get_job,
    job_events,
    list_jobs,
    submit_job,
)

train = typer.Typer(help="LoRA training jobs on the training queue.")

Queue = Annotated[str, typer.Option("--queue", help="Agent running the training queue.")]


@admin_command(train, "submit")
def train_submit(
    target: AdminTarget,
    owner: Annotated[str, typer.Option(help="The user it belongs to.")],
    model: Annotated[str, typer.Option(help="Base model (as inference nodes serve it).")],
    dataset: Annotated[list[str], typer.Option(help="Dataset id(s).")],
    project: Annotated[str | None, typer.Option()] = None,
    option: Annotated[
        list[str], typer.Option(help="Any Table I option KEY=VALUE (JSON values), repeatable.")
    ] = [],  # noqa: B006
    queue: Queue = ISLAND,
) -> None:
    """Queue a LoRA training job; prints its id."""
    options: dict[str, Any] = {"model_name_or_path": model, "dataset": dataset}
    for item in option:
        key, sep, value = item.partition("=")
        if not sep:
            fail(f"--option {item!r} is not KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    job = target.run(lambda a: submit_job(a, queue, owner, options, project))
    out.print(job.id, highlight=False)


@admin_command(train, "list")
def train_list(
    target: AdminTarget,
    owner: Annotated[str | None, typer.Option()] = None,
    queue: Queue = ISLAND,
) -> None:
    """Training jobs, newest first."""
    jobs = target.run(lambda a: list_jobs(a, queue, owner))
    table = Table("id", "state", "owner", "model", "trainer", "adapter", box=None)
    for j in jobs:
        model = j.options.model_name_or_path
        table.add_row(j.id, j.state, j.owner, model, j.trainer or "", j.adapter_id or j.error or "")
    out.print(table)


@admin_command(train, "status")
def train_status(target: AdminTarget, job_id: str, queue: Queue = ISLAND) -> None:
    """One job: state, timestamps, progress, final statistics."""
    show(target.run(lambda a: get_job(a, queue, job_id)).model_dump())


@admin_command(train, "checkpoints")
def train_checkpoints(target: AdminTarget, job_id: str, queue: Queue = ISLAND) -> None:
    """A job's kept checkpoints, newest first: each a model id to chat with, and its figures."""
    job = target.run(lambda a: get_job(a, queue, job_id))
    table = Table("step", "epoch", "model", "train_loss", "valid_loss", box=None)
    for c in reversed(job.checkpoints):
        losses = [c.metrics.get(k) for k in ("train_loss", "valid_loss")]
        cells = [f"{v:.4f}" if v is not None else "" for v in losses]
        table.add_row(str(c.step), f"{c.epoch:g}", c.adapter_id, *cells)
    out.print(table)


@admin_command(train, "cancel")
def train_cancel(target: AdminTarget, job_id: str, queue: Queue = ISLAND) -> None:
    """Cancel a job (its training process is stopped)."""
    job = target.run(lambda a: cancel_job(a, queue, job_id))
    out.print(f"{job.id}: {job.state}")


@admin_command(train, "logs")
def train_logs(
    target: AdminTarget,
    job_id: str,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Until the job ends.")] = False,
    queue: Queue = ISLAND,
) -> None:
    """A job's events; with --follow, a live progress bar with the loss until it ends."""

    async def events(agent: Agent) -> str:
        if not follow:
            for event in await job_events(agent, queue, job_id):
                out.print(event.get("message", event), highlight=False)
            return (await get_job(agent, queue, job_id)).state
        columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[loss]}"))
        with Progress(*columns, console=err, transient=False) as bar:
            task = bar.add_task(job_id, total=None, loss="")
            async for event in follow_events(agent, queue, job_id):
                loss = event.get("loss")
                if event.get("type") == "log" and isinstance(loss, int | float):  # a step
                    bar.update(
                        task,
                        total=event.get("max_steps"),
                        completed=event.get("step", 0),
                        loss=f"loss {loss:.4f}",
                    )
                elif event.get("message"):  # what changed, an evaluation, the settings
                    bar.console.print(event["message"], highlight=False)
        return (await get_job(agent, queue, job_id)).state

    state = target.run(events)
    out.print(f"{job_id}: {state}")
    if follow and state != "completed":
        raise typer.Exit(1)
