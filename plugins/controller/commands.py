"""The controller's commands: ``atoll apply FILE`` and ``atoll pipelines list|status|diff|
delete``. Registered under entry point group ``atoll.cli``. Apply and delete act as the
operator (what runs where is the operator's call); the others as a tenant admin. Each finds the
active controller through discovery unless ``--controller`` names one."""

from __future__ import annotations

import tomllib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar, cast

import typer
import yaml
from rich.table import Table

from atoll.agent.contract import parse
from atoll.agent.errors import InvalidRequest
from atoll.agent.node import Agent
from atoll.cli.admin import AdminTarget, admin_command
from atoll.cli.console import fail, out, show
from atoll.plugins.controller.contract import (
    PipelineSpec,
    active_controller,
    apply_pipeline,
    delete_pipeline,
    diff_pipeline,
    list_pipelines,
    pipeline_status,
)

T = TypeVar("T")

apply = typer.Typer(
    help="Apply a pipeline file (TOML or YAML): the controller keeps it running.",
    subcommand_metavar="",  # a command of its own, not a group
)
pipelines = typer.Typer(help="Declarative pipelines: list, status, diff, delete.")

Controller = Annotated[
    str | None,
    typer.Option("--controller", help="The controller's agent (default: the active one)."),
]
SpecFile = Annotated[Path, typer.Argument(help="A pipeline file, .toml or .yaml.", exists=True)]
Name = Annotated[str, typer.Argument(help="The pipeline's name.")]


def load_spec(path: Path) -> PipelineSpec:
    """The pipeline in ``path`` (TOML or YAML, by its suffix), or an error naming what is
    wrong; the controller checks the plugin kinds and their configs again."""
    try:
        text = path.read_text()
        if path.suffix == ".toml":
            data: Any = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        else:
            raise ValueError(f"{path.name}: a pipeline file ends in .toml, .yaml or .yml")
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read the pipeline file: {exc}") from None
    return parse(PipelineSpec, data, f"pipeline file {path.name}")


def _at(
    target: AdminTarget,
    controller: str | None,
    work: Callable[[Agent, str], Awaitable[T]],
    role: str = "admin",
) -> T:
    async def run(agent: Agent) -> T:
        return await work(agent, controller or await active_controller(agent))

    return target.run(run, role=role)


def _spec(path: Path) -> PipelineSpec:
    try:
        return load_spec(path)
    except (ValueError, InvalidRequest) as exc:
        fail(str(exc))


class _AsCallback:
    """Registers a command as its app's callback, so ``atoll apply FILE`` takes no subcommand."""

    def __init__(self, app: typer.Typer) -> None:
        self.app = app

    def command(self, name: str | None = None) -> Callable[[Any], Any]:
        # Options may follow FILE (a group would take the word after it for a subcommand).
        interspersed = {"allow_interspersed_args": True}
        return self.app.callback(invoke_without_command=True, context_settings=interspersed)


def apply_file(target: AdminTarget, file: SpecFile, controller: Controller = None) -> None:
    """Apply pipeline FILE (TOML or YAML): placed, then kept running."""
    spec = _spec(file)
    status = _at(target, controller, lambda a, c: apply_pipeline(a, c, spec), role="operator")
    show(status.model_dump(mode="json"))


admin_command(cast(typer.Typer, _AsCallback(apply)))(apply_file)


@admin_command(pipelines, "list")
def pipelines_list(target: AdminTarget, controller: Controller = None) -> None:
    """Each pipeline with its services' desired and actual replicas."""
    found = _at(target, controller, list_pipelines)
    table = Table("pipeline", "rev", "service", "plugin", "desired", "actual", "state", box=None)
    for p in found:
        for s in p.services:
            row = (p.name, str(p.revision), s.name, s.plugin, str(s.desired), str(s.actual))
            table.add_row(*row, s.state + (" (deleting)" if p.deleting else ""))
    out.print(table)


@admin_command(pipelines, "status")
def pipelines_status(target: AdminTarget, name: Name, controller: Controller = None) -> None:
    """One pipeline: each service's replicas (where, out of date) and its recent events."""
    show(_at(target, controller, lambda a, c: pipeline_status(a, c, name)).model_dump(mode="json"))


@admin_command(pipelines, "diff")
def pipelines_diff(target: AdminTarget, file: SpecFile, controller: Controller = None) -> None:
    """What applying FILE would change, and which services drift from what is applied."""
    spec = _spec(file)
    show(_at(target, controller, lambda a, c: diff_pipeline(a, c, spec)).model_dump(mode="json"))


@admin_command(pipelines, "delete")
def pipelines_delete(target: AdminTarget, name: Name, controller: Controller = None) -> None:
    """Delete a pipeline: its replicas are removed, one at a time, then it is forgotten."""
    status = _at(target, controller, lambda a, c: delete_pipeline(a, c, name), role="operator")
    show(status.model_dump(mode="json"))
