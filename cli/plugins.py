"""An agent's plugins, seen and changed remotely: ``atoll plugins list|add|reconfigure|remove|
restart AGENT``. Changes act as the operator (only operators may change what runs on a host);
the agent checks a config with the plugin's own model before anything changes, starts the
plugin again with its previous config if the new one fails, and keeps what it was told across
restarts."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from atoll.agent.node import Agent
from atoll.cli.admin import AdminTarget, admin_command
from atoll.cli.console import fail, show

commands = typer.Typer(help="An agent's plugins: list, add, reconfigure, remove, restart.")

Agent_ = Annotated[str, typer.Argument(help="The agent.")]
Name = Annotated[str, typer.Argument(help="The plugin (an installed one, e.g. files).")]
ConfigFile = Annotated[
    Path | None,
    typer.Option("--config", help="The plugin's section, as a TOML or JSON file.", exists=True),
]
ConfigJson = Annotated[str | None, typer.Option("--set", help="The plugin's section as JSON.")]


def _section(config: Path | None, inline: str | None) -> dict[str, Any]:
    if config is not None and inline is not None:
        fail("give --config or --set, not both")
    try:
        if config is not None:
            text = config.read_text()
            section = tomllib.loads(text) if config.suffix == ".toml" else json.loads(text)
        else:
            section = json.loads(inline) if inline is not None else {}
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        fail(f"the plugin's config is not valid: {exc}")
    if not isinstance(section, dict):
        fail("the plugin's config must be a table (a JSON object)")
    return section


def _system(target: AdminTarget, agent_name: str, method: str, params: Any) -> None:
    async def call(agent: Agent) -> Any:
        return await agent.call(f"{agent_name}/system", method, params, timeout=120)

    show(target.run(call, role="operator" if method != "plugins" else "admin"))


@admin_command(commands, "list")
def list_(target: AdminTarget, agent: Agent_) -> None:
    """Each plugin of AGENT with its state (and the last error of one that failed)."""
    _system(target, agent, "plugins", None)


def _configuring(method: str, doc: str) -> Callable[..., None]:
    """The command that sends plugin NAME's config (a file or inline JSON) with ``method``."""

    def command(
        target: AdminTarget,
        agent: Agent_,
        name: Name,
        config: ConfigFile = None,
        set_: ConfigJson = None,
    ) -> None:
        _system(target, agent, method, {"name": name, "config": _section(config, set_)})

    command.__doc__ = doc
    return command


admin_command(commands, "add")(
    _configuring("plugin_add", "Start plugin NAME on AGENT with a config (checked first).")
)
admin_command(commands, "reconfigure")(
    _configuring(
        "plugin_reconfigure",
        "Restart plugin NAME on AGENT with a new config; back on its old one if it fails.",
    )
)


@admin_command(commands)
def remove(target: AdminTarget, agent: Agent_, name: Name) -> None:
    """Stop plugin NAME on AGENT (and keep it stopped across the agent's restarts)."""
    _system(target, agent, "plugin_remove", {"name": name})


@admin_command(commands)
def restart(target: AdminTarget, agent: Agent_, name: Name) -> None:
    """Stop and start plugin NAME on AGENT with its current config."""
    _system(target, agent, "plugin_restart", {"name": name})
