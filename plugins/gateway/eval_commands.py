"""`atoll eval ...`: evaluations with your own API key over the gateway's HTTP API
(``/v1/evaluations``): run a held-out file through base models and adapters and compare them.
Registered under entry point group ``atoll.cli``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from atoll.cli.console import err, out, show
from atoll.plugins.gateway.me_commands import LOCAL, Key, Url, call, until_done, upload_rows

evaluations = typer.Typer(help="Evaluate base models and adapters on a held-out set.")


def table(report: dict[str, Any]) -> Table:
    """The models side by side, as the report gives them."""
    grid = Table(title=f"{report['id']}: {report['status']}, {report['rows']} rows")
    for column in ("model", "exact match", "contains", "ROUGE-L", "mean logprob"):
        grid.add_column(column, justify="left" if column == "model" else "right")
    for r in report["results"]:
        grid.add_row(
            r["model"],
            f"{r['exact_match']:.3f}",
            f"{r['contains']:.3f}",
            f"{r['rouge_l']:.3f}",
            f"{r['mean_logprob']:.3f}",
        )
    return grid


@evaluations.command("run")
def run(
    key: Key,
    data: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Chat rows, JSONL.")],
    model: Annotated[
        list[str], typer.Option("--model", "-m", help="A base model or adapter; repeat it.")
    ],
    max_tokens: Annotated[int, typer.Option(help="Each greedy answer's most tokens.")] = 128,
    examples: Annotated[int, typer.Option(help="Rows shown with every answer.")] = 3,
    wait: Annotated[bool, typer.Option(help="Wait for the report and print it.")] = True,
    url: Url = LOCAL,
) -> None:
    """Upload DATA (chat rows, each ending with the reference answer) and evaluate every
    MODEL on it; prints the report's table (the whole report as JSON with `atoll eval show`)."""
    body = {
        "file_id": upload_rows(url, key, data),
        "models": model,
        "max_tokens": max_tokens,
        "examples": examples,
    }
    report = call(url, key, "POST", "/v1/evaluations", json=body).json()
    err.print(f"evaluation {report['id']} of {report['rows']} rows started")
    if not wait:
        out.print(report["id"], highlight=False)
        return
    out.print(table(until_done(url, key, f"/v1/evaluations/{report['id']}", "evaluation")))


@evaluations.command("list")
def listing(
    key: Key,
    model: Annotated[str | None, typer.Option(help="Only those that ran this model.")] = None,
    url: Url = LOCAL,
) -> None:
    """Your evaluations, newest first."""
    params = {"model": model} if model else {}
    show(call(url, key, "GET", "/v1/evaluations", params=params).json()["data"])


@evaluations.command("show")
def show_one(key: Key, evaluation_id: str, url: Url = LOCAL) -> None:
    """One evaluation's whole report (figures per model and the example rows)."""
    show(call(url, key, "GET", f"/v1/evaluations/{evaluation_id}").json())


@evaluations.command("cancel")
def cancel(key: Key, evaluation_id: str, url: Url = LOCAL) -> None:
    """Stop an evaluation that is still running."""
    show(call(url, key, "POST", f"/v1/evaluations/{evaluation_id}/cancel").json())
