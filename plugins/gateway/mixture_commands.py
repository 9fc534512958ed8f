"""`atoll mixtures ...`: optimised mixtures of adapters with your own API key over the gateway's
HTTP API (``/v1/mixture_searches``, ``/v1/mixtures``): search the weights of candidate adapters on
a labelled set, and keep the winner as a named mixture called like a model. Registered under entry
point group ``atoll.cli``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from atoll.cli.console import err, out, show
from atoll.plugins.gateway.me_commands import LOCAL, Key, Url, call, until_done, upload_rows

mixtures = typer.Typer(help="Search, save and use mixtures of adapters.")


def curve(report: dict[str, Any]) -> Table:
    """Every trial's weights and score, with the best so far (the search's curve)."""
    grid = Table(title=f"{report['id']}: {report['status']}, metric {report['metric']}")
    grid.add_column("trial", justify="right")
    for adapter in report["adapters"]:
        grid.add_column(adapter, justify="right")
    for column in ("merge", "score", "best"):
        grid.add_column(column, justify="left" if column == "merge" else "right")
    for n, t in enumerate(report["trials"], start=1):
        figures = [f"{t['weights'][a]:.3f}" for a in report["adapters"]]
        score = "refused" if t["score"] is None else f"{t['score']:.4f}"
        best = "" if t["best_score"] is None else f"{t['best_score']:.4f}"
        grid.add_row(str(n), *figures, t["merge_strategy"], score, best)
    return grid


@mixtures.command("search")
def search(
    key: Key,
    data: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Chat rows, JSONL.")],
    model: Annotated[str, typer.Option("--model", "-m", help="The adapters' base model.")],
    adapter: Annotated[
        list[str], typer.Option("--adapter", "-a", help="A candidate adapter; repeat it.")
    ],
    metric: Annotated[str, typer.Option(help="mean_logprob, exact_match, contains or rouge_l.")] = (
        "mean_logprob"
    ),
    strategy: Annotated[
        list[str] | None, typer.Option(help="A merge strategy to try; repeat it (linear).")
    ] = None,
    trials: Annotated[int, typer.Option(help="Most candidate mixtures scored.")] = 16,
    name: Annotated[str | None, typer.Option(help="Save the winner under this name.")] = None,
    wait: Annotated[bool, typer.Option(help="Wait for the search and print its curve.")] = True,
    url: Url = LOCAL,
) -> None:
    """Upload DATA (chat rows, each ending with the reference answer) and search the weights of
    the ADAPTERs that score best on it; prints every trial (the whole report as JSON with
    `atoll mixtures show`)."""
    body: dict[str, Any] = {
        "model": model,
        "adapters": adapter,
        "file_id": upload_rows(url, key, data),
        "metric": metric,
        "merge_strategies": strategy or ["linear"],
        "trials": trials,
        "name": name,
    }
    report = call(url, key, "POST", "/v1/mixture_searches", json=body).json()
    err.print(f"mixture search {report['id']} on {report['rows']} rows started")
    if not wait:
        out.print(report["id"], highlight=False)
        return
    report = until_done(url, key, f"/v1/mixture_searches/{report['id']}", "mixture search")
    out.print(curve(report))
    if report["mixture"]:
        err.print(f"saved as {report['mixture']}: call it as the model {report['mixture']!r}")


@mixtures.command("show")
def show_one(key: Key, search_id: str, url: Url = LOCAL) -> None:
    """One search's whole report: its trials, their figures, the winner."""
    show(call(url, key, "GET", f"/v1/mixture_searches/{search_id}").json())


@mixtures.command("list")
def listing(key: Key, url: Url = LOCAL) -> None:
    """Your named mixtures."""
    show(call(url, key, "GET", "/v1/mixtures").json()["data"])


@mixtures.command("delete")
def delete(key: Key, name: str, url: Url = LOCAL) -> None:
    """Delete a named mixture (its adapters stay)."""
    show(call(url, key, "DELETE", f"/v1/mixtures/{name}").json())
