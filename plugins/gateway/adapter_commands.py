"""`atoll adapters ...`: your adapters in and out of the gateway with your own API key
(``/v1/adapters``): download one's files, import a PEFT LoRA directory trained elsewhere,
compress several into one collection. Registered under entry point group ``atoll.cli``.

``compress`` runs the compression in this process (it needs torch: the ``inference`` extra),
not at the gateway, which may run without torch, nor on a node, whose engine serves: it
downloads the members (the right to use each is checked as for a download), compresses them,
measures each member's greedy agreement with its original when ``--base`` is a local model
directory, and stores the artefact through the gateway."""

from __future__ import annotations

import io
import tarfile
import tempfile
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import typer

from atoll.cli.console import err, fail, show
from atoll.plugins.gateway.me_commands import LOCAL, Key, Url, call
from atoll.plugins.storage.contract.adapters import (
    ADAPTER_FILES,
    COLLECTION_MANIFEST,
    COLLECTION_TENSORS,
    CONFIG_FILE,
    WEIGHTS_FILE,
)

adapters = typer.Typer(help="Show and download your adapters, import ones trained elsewhere.")


@adapters.command("show")
def show_adapter(key: Key, adapter_id: str, url: Url = LOCAL) -> None:
    """ADAPTER_ID as storage keeps it, with the figures of the evaluations it took part in."""
    show(call(url, key, "GET", f"/v1/adapters/{quote(adapter_id)}").json())


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
    _download(url, key, adapter_id, to)
    err.print(f"{adapter_id} -> {to}")


def _download(url: str, key: str, adapter_id: str, to: Path) -> None:
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


@adapters.command("compress")
def compress(
    key: Key,
    base: Annotated[
        str, typer.Option(help="The base model as nodes serve it, or its local directory.")
    ],
    adapter: Annotated[list[str], typer.Option(help="A member adapter's id (2 or more).")],
    name: Annotated[str, typer.Option(help="The collection becomes collections/YOU/NAME.")],
    rank: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="One shared rank for every module, instead of an error budget.",
        ),
    ] = None,
    max_error: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help="The error budget: each module takes the smallest rank that keeps every "
            "member's relative error within it (default 0.0125, i.e. 1.25%; the benchmark's "
            "family then agrees with its originals on ~97% of greedy tokens).",
        ),
    ] = None,
    max_rank: Annotated[
        int, typer.Option(min=1, help="The budget's largest rank per module.")
    ] = 64,
    url: Url = LOCAL,
) -> None:
    """Compress ADAPTERs of one base model and module set into one collection (a shared basis
    per module, a small core per adapter) and store it; prints each member's relative
    reconstruction error, greedy agreement with its original on held-out prompts (when BASE
    is a local directory) and bytes, and each module's rank. Refused, and nothing stored, when
    members stay above the error budget even at the largest rank."""
    from atoll.plugins.inference.compression import MAX_ERROR, compress_adapters

    if len(set(adapter)) < 2:
        fail("name two or more distinct adapters")
    if rank is not None and max_error is not None:
        fail("give --rank or --max-error, not both")
    budget = MAX_ERROR if rank is None and max_error is None else max_error
    with tempfile.TemporaryDirectory(prefix="atoll-compress-") as tmp:
        root = Path(tmp)
        dirs = {a: root / "members" / str(i) for i, a in enumerate(dict.fromkeys(adapter))}
        for adapter_id, folder in dirs.items():
            _download(url, key, adapter_id, folder)
        art = root / "collection"
        try:
            manifest = compress_adapters(dirs, base, name, art, rank, budget, max_rank)
        except ValueError as exc:
            fail(str(exc))
        agreement: dict[str, float] = {}
        if Path(base).is_dir():
            from atoll.plugins.inference.collection_report import greedy_agreement

            agreement = greedy_agreement(Path(base), dirs, art)
        with (
            (art / COLLECTION_MANIFEST).open("rb") as m,
            (art / COLLECTION_TENSORS).open("rb") as t,
        ):
            files = {"manifest": (COLLECTION_MANIFEST, m), "tensors": (COLLECTION_TENSORS, t)}
            stored = call(
                url, key, "POST", "/v1/adapters/collections", data={"name": name}, files=files
            )
        show(_report(stored.json(), manifest, dirs, agreement))


def _report(
    stored: dict[str, Any],
    manifest: dict[str, Any],
    dirs: dict[str, Path],
    agreement: dict[str, float],
) -> dict[str, Any]:
    """Per member: its error, agreement (None: not measured), its share of the artefact's
    bytes (its cores and the bases divided among all) beside its original weights' bytes."""
    from atoll.plugins.inference.compression import member_bytes, module_ranks

    ranks = module_ranks(manifest)
    each = member_bytes(manifest["bytes"], ranks, len(manifest["members"]))
    return {
        "id": stored["id"],
        "rank": manifest["rank"],
        "ranks": dict(zip(manifest["modules"], ranks, strict=True)),
        "max_error": manifest["max_error"],
        "bytes": manifest["bytes"],
        "members": [
            {
                "id": m["id"],
                "error": m["error"],
                "agreement": agreement.get(m["id"]),
                "bytes": each,
                "original_bytes": (dirs[m["id"]] / WEIGHTS_FILE).stat().st_size,
            }
            for m in manifest["members"]
        ],
    }
