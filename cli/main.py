"""The ``atoll`` app: the core's commands, and those plugins contribute through the entry
point group ``atoll.cli`` (each entry a typer app, added under the entry's name), as plugins
themselves register through ``atoll.plugins``."""

from __future__ import annotations

from importlib.metadata import entry_points

import typer

from atoll.cli import agent, broker, grants, island, operator, overlay, plugins, watch
from atoll.tuning import tune_process

COMMANDS_GROUP = "atoll.cli"

app = typer.Typer(help="Atoll: many customised LLMs across islands of GPUs.", no_args_is_help=True)


@app.callback()
def _process_setup() -> None:
    tune_process()


app.add_typer(operator.commands)
app.add_typer(operator.tenants, name="tenant")
app.add_typer(operator.tokens, name="token")
app.add_typer(grants.commands, name="grant")
app.add_typer(agent.agents, name="agent")
app.add_typer(overlay.commands)
app.add_typer(watch.commands)
app.add_typer(broker.brokers, name="broker")
app.add_typer(island.commands)
app.add_typer(plugins.commands, name="plugins")
for entry in entry_points(group=COMMANDS_GROUP):
    app.add_typer(entry.load(), name=entry.name)
