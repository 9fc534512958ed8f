"""`atoll batch ...`: OpenAI's Batch API with your own API key over the gateway's HTTP API
(``/v1/batches``): run a JSONL file of requests in the background, watch it, fetch its results.
Registered under entry point group ``atoll.cli``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from atoll.cli.console import err, fail, out, show
from atoll.plugins.gateway.me_commands import LOCAL, Key, Url, call

batches = typer.Typer(help="Run files of requests in the background (OpenAI's Batch API).")

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


@batches.command("create")
def create(
    key: Key,
    requests: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="JSONL lines.")],
    endpoint: Annotated[
        str, typer.Option(help="The route every line calls (as each line's url).")
    ] = "/v1/chat/completions",
    url: Url = LOCAL,
) -> None:
    """Upload REQUESTS (one `{"custom_id", "method": "POST", "url", "body"}` per line, checked
    line by line) and start a batch on it; prints the batch (its id on stderr)."""
    if endpoint not in ENDPOINTS:
        fail(f"--endpoint must be one of {', '.join(ENDPOINTS)}, not {endpoint!r}")
    with requests.open("rb") as f:
        files = {"file": (requests.name, f)}
        uploaded = call(url, key, "POST", "/v1/files", data={"purpose": "batch"}, files=files)
    body = {
        "input_file_id": uploaded.json()["id"],
        "endpoint": endpoint,
        "completion_window": "24h",
    }
    batch = call(url, key, "POST", "/v1/batches", json=body).json()
    err.print(f"batch {batch['id']} started")
    show(batch)


@batches.command("list")
def listing(key: Key, url: Url = LOCAL) -> None:
    """Your batches, newest first."""
    show(call(url, key, "GET", "/v1/batches", params={"limit": 100}).json()["data"])


@batches.command("show")
def show_one(key: Key, batch_id: str, url: Url = LOCAL) -> None:
    """One batch: its status, request counts and result files."""
    show(call(url, key, "GET", f"/v1/batches/{batch_id}").json())


@batches.command("cancel")
def cancel(key: Key, batch_id: str, url: Url = LOCAL) -> None:
    """Stop a batch: lines not started are not run (each an error line saying so)."""
    show(call(url, key, "POST", f"/v1/batches/{batch_id}/cancel").json())


@batches.command("results")
def results(
    key: Key,
    batch_id: str,
    to: Annotated[Path, typer.Option(help="The file to write the results' JSONL to.")],
    errors: Annotated[bool, typer.Option(help="The error lines instead.")] = False,
    url: Url = LOCAL,
) -> None:
    """Write a finished batch's output (or error) file to TO."""
    batch = call(url, key, "GET", f"/v1/batches/{batch_id}").json()
    file_id = batch["error_file_id" if errors else "output_file_id"]
    if not file_id:
        which = "errors" if errors else "results"
        fail(f"batch {batch_id} ({batch['status']}) has no {which} file")
    data = call(url, key, "GET", f"/v1/files/{file_id}/content").content
    partial = to.with_name(f".{to.name}.partial")
    partial.write_bytes(data)
    os.replace(partial, to)  # whole, or not there
    lines = data.count(b"\n")
    out.print(f"{to}: {lines} lines", highlight=False)
