"""Adapters in and out of the gateway (Atoll's own routes, beside OpenAI's): download one's
files as a tar archive, and import a PEFT LoRA adapter trained elsewhere (LLaMA-Factory,
axolotl, Unsloth, peft itself).

An import is checked where it will run, before the caller is told it worked: the storage agent
refuses what no node can serve (``inspect_adapter`` and the shared ``unservable``),
then a node serving its base loads it from storage (validate_adapter: its modules and their
shapes against that base model) for one token. A refusal at either step removes it again and
says why, so an adapter is never refused at its first use instead.

Who may: downloading an adapter takes the right to use it (its owner, its project's members,
anyone for a public one, administrators); importing one makes ``<user>/<name>``, owned by the
caller, or in the caller's project with a project key (not a viewer's).

A compressed collection (``atoll adapters compress``: the compression runs in the command's
process, which has torch, because a gateway need not) is stored as
``collections/<user>/<name>`` with the same owner rules, and only from members the caller may
use: storage lists its members from the manifest; a node serves them from it once told to
load it (``collections`` in its config).
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations, and ``user``
# is install()'s parameter, not a global it could resolve from a string.
import asyncio
import contextlib
import json
import re
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, UploadFile
from fastapi.responses import FileResponse
from pydantic import BaseModel
from starlette.background import BackgroundTask

from atoll.agent.errors import AtollError
from atoll.plugins.gateway.accounts.keys import Principal
from atoll.plugins.gateway.errors import GatewayError, from_platform
from atoll.plugins.gateway.service import Gateway
from atoll.plugins.inference.contract import GenerateRequest, SamplingParams
from atoll.plugins.storage.contract.adapters import (
    COLLECTION_MANIFEST,
    COLLECTION_PREFIX,
    COLLECTION_TENSORS,
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterRecord,
    delete_adapter,
    describe_adapter,
    fetch_adapter,
    upload_adapter,
)

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
CHUNK = 1 << 20


class ImportedAdapter(BaseModel):
    id: str
    object: str = "adapter"
    base_model: str
    rank: int
    target_modules: list[str]
    files: list[dict[str, Any]]  # name, size, sha256 as storage keeps them
    owner: str | None
    project: str | None


def install(app: FastAPI, gw: Gateway, user: Any) -> None:
    """The adapter routes; ``user`` is app.py's authenticated-caller dependency."""

    async def platform(call: Any) -> Any:
        try:
            return await call
        except AtollError as exc:
            if type(exc).__name__ == "InvalidAdapter":
                raise GatewayError(400, exc.message, code="adapter_rejected") from None
            if type(exc).__name__ == "AdapterExists":
                raise GatewayError(409, exc.message, code="already_exists") from None
            raise from_platform(exc) from None

    async def store(
        principal: Principal, folder: Path, adapter_id: str, meta: dict[str, Any]
    ) -> AdapterRecord:
        """Upload ``folder`` as the caller's ``adapter_id`` and grant them its use at once."""
        record: AdapterRecord = await platform(
            upload_adapter(
                gw.agent,
                gw.storage_address(),
                folder,
                adapter_id,
                meta,
                owner=principal.user,
                project=principal.project,
            )
        )
        owner = None if record.project else record.owner
        with contextlib.suppress(GatewayError):  # the storage agent's announcement came first
            gw.accounts.register_adapter(
                adapter_id, record.base_model, owner, record.project, actor=principal.user
            )
        return record

    @app.get("/v1/adapters/{adapter_id:path}/content", tags=["adapters"])
    async def download(principal: user, adapter_id: str) -> FileResponse:
        """The adapter's files (adapter_config.json, adapter_model.safetensors, any tokenizer
        files) in an uncompressed tar archive: the weights do not compress."""
        gw.accounts.check_use(principal, adapter_id)  # 404 / 403 as for using it
        tmp = Path(tempfile.mkdtemp(prefix="atoll-adapter-"))
        try:
            files = await platform(
                fetch_adapter(gw.agent, gw.storage_address(), adapter_id, tmp / "adapter")
            )
            archive = tmp / "adapter.tar"
            await asyncio.to_thread(_tar, files, archive)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return FileResponse(
            archive,
            media_type="application/x-tar",
            filename=f"{adapter_id.replace('/', '--')}.tar",
            background=BackgroundTask(shutil.rmtree, tmp, ignore_errors=True),
        )

    # After the content route: ``:path`` would match ``.../content`` too.
    @app.get("/v1/adapters/{adapter_id:path}", response_model=AdapterRecord, tags=["adapters"])
    async def describe(principal: user, adapter_id: str) -> Any:
        """The adapter as storage keeps it: base model, rank, modules, files (sizes and
        sha256), owner, and its meta, the figures of the evaluations it took part in among
        them (``evaluations``, the last ten)."""
        gw.accounts.check_use(principal, adapter_id)  # 404 / 403 as for using it
        record = await platform(describe_adapter(gw.agent, gw.storage_address(), adapter_id))
        return record.model_dump(mode="json")

    @app.post("/v1/adapters/collections", tags=["adapters"])
    async def store_collection(
        principal: user,
        name: Annotated[str, Form()],
        manifest: Annotated[UploadFile, File()],
        tensors: Annotated[UploadFile, File()],
    ) -> Any:
        """A compressed collection's artefact (``collection.json``, ``collection.safetensors``)
        made from adapters the caller may use; kept as ``collections/<user>/<name>``."""
        adapter_id = f"{COLLECTION_PREFIX}{principal.user}/{name}"
        _check_new(gw, principal, name, adapter_id)
        with tempfile.TemporaryDirectory(prefix="atoll-collection-") as tmp:
            folder = Path(tmp)
            await _save(tensors, folder / COLLECTION_TENSORS)
            content = _config(await manifest.read(), "manifest", COLLECTION_MANIFEST)
            members = content.get("members")
            if not isinstance(members, list) or not all(isinstance(m, dict) for m in members):
                raise GatewayError(400, "the manifest lists no members", param="manifest")
            for member in members:  # 404/403 as for using it: no collection of others' adapters
                gw.accounts.check_use(principal, str(member.get("id")))
            (folder / COLLECTION_MANIFEST).write_text(json.dumps(content))
            record = await store(principal, folder, adapter_id, {"compressed_by": principal.user})
        return record.model_dump(mode="json")

    @app.post("/v1/adapters", response_model=ImportedAdapter, tags=["adapters"])
    async def import_adapter(
        principal: user,
        name: Annotated[str, Form()],
        config: Annotated[UploadFile, File()],
        weights: Annotated[UploadFile, File()],
        base_model: Annotated[str | None, Form()] = None,
    ) -> Any:
        """A PEFT LoRA adapter: its adapter_config.json (``config``) and
        adapter_model.safetensors (``weights``), for ``base_model`` (default: the config's
        ``base_model_name_or_path``), which a node must serve."""
        adapter_id = f"{principal.user}/{name}"
        _check_new(gw, principal, name, adapter_id)
        with tempfile.TemporaryDirectory(prefix="atoll-import-") as tmp:
            folder = Path(tmp)
            await _save(weights, folder / WEIGHTS_FILE)
            settings = _config(await config.read())
            base = base_model or str(settings.get("base_model_name_or_path") or "")
            served = gw.catalog.base_models()
            if base not in served:
                raise GatewayError(
                    400,
                    f"no inference node serves base model {base!r} to check the adapter on "
                    f"(served: {', '.join(sorted(served)) or 'none'}); name one as base_model",
                    param="base_model",
                )
            settings["base_model_name_or_path"] = base  # the overlay's name for it
            (folder / CONFIG_FILE).write_text(json.dumps(settings))
            meta = {"imported_by": principal.user, "filename": weights.filename}
            record = await store(principal, folder, adapter_id, meta)
        try:
            await _try_on_a_node(gw, principal, adapter_id)
        except GatewayError:
            gw.accounts.unregister_adapter(adapter_id, actor=principal.user)
            with contextlib.suppress(AtollError):
                await delete_adapter(gw.agent, gw.storage_address(), adapter_id)
            raise
        record = await platform(describe_adapter(gw.agent, gw.storage_address(), adapter_id))
        return ImportedAdapter(
            id=record.id,
            base_model=record.base_model,
            rank=record.rank,
            target_modules=record.target_modules,
            files=[f.model_dump() for f in record.files],
            owner=record.owner,
            project=record.project,
        )


def _check_new(gw: Gateway, principal: Principal, name: str, adapter_id: str) -> None:
    """Whether the caller may add ``adapter_id`` (named ``name``) now."""
    if not NAME.fullmatch(name):
        raise GatewayError(400, "name must be 1-64 letters, digits, '.', '_' or '-'", param="name")
    if principal.project is not None and principal.role == "viewer":
        raise GatewayError(
            403,
            f"a viewer of project {principal.project!r} may not add adapters to it",
            code="permission_denied",
        )
    if gw.accounts.adapter(adapter_id) is not None:
        raise GatewayError(409, f"adapter {adapter_id!r} already exists", code="already_exists")


async def _try_on_a_node(gw: Gateway, principal: Principal, adapter_id: str) -> None:
    """One token with the adapter on a node serving its base: the node fetches it from storage
    and checks it against the model (AdapterRejected: a 400 saying why). Not usage: no ledger."""
    target = gw.resolve(principal, adapter_id)
    request = GenerateRequest(
        prompt="Hello",
        model=target.base,
        adapter=target.adapter,
        params=SamplingParams(temperature=0, max_new_tokens=1),
    )
    async for _ in gw.router.stream(request, target.labels, gw.request_timeout):
        pass


def _config(raw: bytes, param: str = "config", file: str = CONFIG_FILE) -> dict[str, Any]:
    try:
        settings = json.loads(raw)
    except ValueError as exc:
        raise GatewayError(400, f"{file} is not valid JSON: {exc}", param=param) from None
    if not isinstance(settings, dict):
        raise GatewayError(400, f"{file} must hold a JSON object", param=param)
    return settings


async def _save(upload: UploadFile, path: Path) -> None:
    with path.open("wb") as out:
        while chunk := await upload.read(CHUNK):
            await asyncio.to_thread(out.write, chunk)


def _tar(folder: Path, archive: Path) -> None:
    with tarfile.open(archive, "w") as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=path.name)
