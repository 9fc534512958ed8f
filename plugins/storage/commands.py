"""The storage plugin's commands (`atoll datasets`, `atoll storage`): datasets in a storage
agent's registry and the keys its objects are sealed with, as a tenant admin. Registered under
entry point group ``atoll.cli``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, cast

import typer
from rich.table import Table

from atoll.cli.admin import ISLAND, AdminTarget, admin_command
from atoll.cli.console import out, show
from atoll.plugins.storage.contract.datasets import (
    Format,
    delete_dataset,
    describe_dataset,
    list_datasets,
    upload_dataset,
)
from atoll.plugins.storage.contract.wire import rotate_keys

datasets = typer.Typer(help="Datasets in the storage agent's registry (immutable, versioned).")
storage = typer.Typer(help="The storage agent's encryption at rest.")

Storage = Annotated[str, typer.Option("--storage", help="Agent running the storage plugin.")]


@admin_command(datasets, "upload")
def datasets_upload(
    target: AdminTarget,
    path: Path,
    owner: Annotated[str, typer.Option(help="The user it belongs to.")],
    name: Annotated[str | None, typer.Option(help="Dataset name (default: the file's).")] = None,
    project: Annotated[str | None, typer.Option()] = None,
    format: Annotated[str | None, typer.Option(help="alpaca, sharegpt, chat or text.")] = None,
    storage: Storage = ISLAND,
) -> None:
    """Upload, validate and register a dataset (a new version if NAME exists)."""
    given = cast(Format | None, format)  # upload_dataset refuses any other, naming the choices
    record = target.run(
        lambda a: upload_dataset(a, storage, path, name or path.stem, owner, project, given)
    )
    show(record.model_dump(mode="json"))


@admin_command(datasets, "list")
def datasets_list(
    target: AdminTarget,
    owner: Annotated[str | None, typer.Option()] = None,
    storage: Storage = ISLAND,
) -> None:
    """Registered datasets: id, name, version, format, rows, tokens."""
    records = target.run(lambda a: list_datasets(a, storage, owner))
    table = Table("id", "name", "v", "format", "rows", "tokens", "owner", box=None)
    for r in records:
        table.add_row(r.id, r.name, str(r.version), r.format, str(r.rows), str(r.tokens), r.owner)
    out.print(table)


@admin_command(datasets, "show")
def datasets_show(target: AdminTarget, dataset_id: str, storage: Storage = ISLAND) -> None:
    """One dataset's metadata and de-duplication report."""
    show(target.run(lambda a: describe_dataset(a, storage, dataset_id)).model_dump(mode="json"))


@admin_command(datasets, "delete")
def datasets_delete(target: AdminTarget, dataset_id: str, storage: Storage = ISLAND) -> None:
    """Delete a dataset version."""
    target.run(lambda a: delete_dataset(a, storage, dataset_id))
    out.print(f"deleted {dataset_id}")


@admin_command(storage, "rotate-keys")
def storage_rotate_keys(target: AdminTarget, storage_agent: Storage = ISLAND) -> None:
    """A new key-encryption key: every object's data key re-wrapped under it (no object is
    rewritten), the old keys dropped from the keyring."""
    show(target.run(lambda a: rotate_keys(a, storage_agent)).model_dump(mode="json"))
