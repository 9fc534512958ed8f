"""``python -m atoll.cli``: the ``atoll`` command."""

from atoll.cli.main import app

app(prog_name="atoll")
