"""`atoll adapters ...`: your adapters in and out of the gateway with your own API key
(``/v1/adapters``): download one's files, import a PEFT LoRA directory trained elsewhere.
Registered under entry point group ``atoll.cli``."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

import typer

from atoll.cli.console import err, fail, show
from atoll.plugins.gateway.me_commands import LOCAL, Key, Url, call
from atoll.plugins.storage.contract.adapters import ADAPTER_FILES, CONFIG_FILE, WEIGHTS_FILE

adapters = typer.Typer(help="Download your adapters, import ones trained elsewhere.")


@adapters.command("download")
def download(
    key: Key,
    adapter_id: str,
    to: Annotated[Path, typer.Option(help="The directory to write (must not exist).")],
    url: Url = LOCAL,
) -> None:
    """Write ADAPTER_ID's files (a PEFT directory: peft, vLLM and LoRAX load it) into TO."""
    if to.exists():
        fail(f"{to} exists: name a new directory")
    reply = call(url, key, "GET", f"/v1/adapters/{quote(adapter_id)}/content")
    stage = to.with_name(f".{to.name}.partial")
    stage.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(reply.content)) as tar:
        for member in tar.getmembers():
            # Only the adapter's own plain files, by bare name: nothing the archive could
            # place elsewhere.
            if not member.isfile() or member.name not in ADAPTER_FILES:
                fail(f"the archive holds {member.name!r}, which is no adapter file")
            source = tar.extractfile(member)
            assert source is not None  # a regular file
            (stage / member.name).write_bytes(source.read())
    stage.rename(to)  # all of it, or nothing visible
    err.print(f"{adapter_id} -> {to}")


@adapters.command("import")
def import_adapter(
    key: Key,
    directory: Annotated[Path, typer.Argument(exists=True, file_okay=False)],
    name: Annotated[str, typer.Option(help="Its name: the adapter becomes YOU/NAME.")],
    base_model: Annotated[
        str | None, typer.Option(help="The base model as the nodes serve it.")
    ] = None,
    url: Url = LOCAL,
) -> None:
    """Import the PEFT LoRA adapter in DIRECTORY (adapter_config.json and
    adapter_model.safetensors); a node checks it against its base before it is kept."""
    paths = {
        part: directory / file
        for part, file in (("config", CONFIG_FILE), ("weights", WEIGHTS_FILE))
    }
    for path in paths.values():
        if not path.is_file():
            fail(f"{directory} has no {path.name}")
    form = {"name": name} | ({"base_model": base_model} if base_model else {})
    with paths["config"].open("rb") as config, paths["weights"].open("rb") as weights:
        files = {"config": (CONFIG_FILE, config), "weights": (WEIGHTS_FILE, weights)}
        show(call(url, key, "POST", "/v1/adapters", data=form, files=files).json())
