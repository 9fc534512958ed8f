"""Where commands print: results on stdout, everything else on stderr, and the one way to fail."""

from __future__ import annotations

import json
from typing import Any, NoReturn

import typer
from rich.console import Console

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def fail(message: str) -> NoReturn:
    err.print(f"[red]error:[/red] {message}")
    raise typer.Exit(1)


def show(result: Any) -> None:
    """``result`` as JSON on stdout (what JSON lacks, such as paths, as strings)."""
    out.print_json(json.dumps(result, default=str))
