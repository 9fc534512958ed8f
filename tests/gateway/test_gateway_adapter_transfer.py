"""Adapters in and out of the gateway: a PEFT adapter made elsewhere imported (checked by
storage, then by a node against its base, refused with the reason at upload), served, and
downloaded byte for byte; who may; and the same through `atoll adapters`."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from typer.testing import CliRunner

from atoll.plugins.gateway.adapter_commands import adapters
from support.island import Island
from support.overlay import AgentFactory
from support.tiny_models import build_tiny_model, make_adapter

MODEL = "tiny-llama"
RUNNER = CliRunner()


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Adapters as peft saves them: a good one, one for another base that claims ours, and
    one with modules_to_save."""
    root = tmp_path_factory.mktemp("made")
    base = build_tiny_model(root / MODEL)
    other = build_tiny_model(root / "other", hidden=32)
    good = make_adapter(base, root / "good", seed=1)
    liar = make_adapter(other, root / "liar", seed=2)
    saves = make_adapter(base, root / "saves", seed=3)
    config = json.loads((saves / "adapter_config.json").read_text())
    config["modules_to_save"] = ["lm_head"]
    (saves / "adapter_config.json").write_text(json.dumps(config))
    return {"base": base, "good": good, "liar": liar, "saves": saves}


@pytest.fixture
async def island(make_agent: AgentFactory, made: dict[str, Path]) -> Island:
    await make_agent("store", roles=("storage",), plugins={"storage": {}}, heartbeat=0.2)
    local = {"backend": "local", "local": {"model": str(made["base"]), "embeddings": False}}
    await make_agent("gpu1", roles=("inference",), plugins={"inference": local}, heartbeat=0.2)
    isl = await Island(make_agent).start_gateway()
    await isl.models_seen(MODEL)
    return isl


async def put(
    isl: Island, key: str, folder: Path, name: str, base: str | None = MODEL
) -> httpx.Response:
    form = {"name": name} | ({"base_model": base} if base else {})
    files = {
        "config": ("adapter_config.json", (folder / "adapter_config.json").read_bytes()),
        "weights": (
            "adapter_model.safetensors",
            (folder / "adapter_model.safetensors").read_bytes(),
        ),
    }
    async with httpx.AsyncClient(base_url=isl.url, timeout=60) as http:
        return await http.post(
            "/v1/adapters", data=form, files=files, headers={"Authorization": f"Bearer {key}"}
        )


async def get_tar(isl: Island, key: str, adapter_id: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=isl.url, timeout=60) as http:
        return await http.get(
            f"/v1/adapters/{adapter_id}/content", headers={"Authorization": f"Bearer {key}"}
        )


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def test_import_serve_and_download(island: Island, made: dict[str, Path]) -> None:
    alice, bob = island.key("alice"), island.key("bob")
    reply = await put(island, alice, made["good"], "imported")
    assert reply.status_code == 200, reply.text
    record = reply.json()
    assert (record["id"], record["base_model"], record["owner"]) == (
        "alice/imported",
        MODEL,
        "alice",
    )
    assert record["rank"] == 4 and set(record["target_modules"]) == {"q_proj", "v_proj"}
    async with openai.AsyncOpenAI(base_url=f"{island.url}/v1", api_key=alice, max_retries=0) as sdk:
        chat = await sdk.chat.completions.create(
            model="alice/imported", messages=[{"role": "user", "content": "Hi"}], max_tokens=3
        )
        assert chat.choices[0].message.content is not None
    # Downloaded: what storage keeps, byte for byte; the weights as they were made.
    tar = await get_tar(island, alice, "alice/imported")
    assert tar.status_code == 200 and tar.headers["content-type"] == "application/x-tar"
    with tarfile.open(fileobj=io.BytesIO(tar.content)) as archive:
        got = {m.name: archive.extractfile(m).read() for m in archive.getmembers()}  # type: ignore[union-attr]
    assert {f["name"]: f["sha256"] for f in record["files"]} == {
        name: sha256(data) for name, data in got.items()
    }
    original = (made["good"] / "adapter_model.safetensors").read_bytes()
    assert got["adapter_model.safetensors"] == original
    config = json.loads(got["adapter_config.json"])
    assert config["base_model_name_or_path"] == MODEL  # the overlay's name for the base
    # Who may: not bob (as if it did not exist), not without a key; a name is taken once.
    assert (await get_tar(island, bob, "alice/imported")).status_code == 404
    async with httpx.AsyncClient(base_url=island.url) as http:
        assert (await http.get("/v1/adapters/alice/imported/content")).status_code == 401
    again = await put(island, alice, made["good"], "imported")
    assert again.status_code == 409
    bobs = await put(island, bob, made["good"], "imported")
    assert bobs.status_code == 200 and bobs.json()["id"] == "bob/imported"


@pytest.mark.parametrize(
    ("adapter", "base", "status", "words"),
    [
        ("saves", MODEL, 400, "modules_to_save replaces whole layers"),
        ("liar", MODEL, 400, "it was trained for another base"),
        ("good", None, 400, "no inference node serves base model"),  # its config names a path
        ("good", "no-such-base", 400, "no inference node serves base model 'no-such-base'"),
    ],
)
async def test_what_cannot_be_served_is_refused_at_import(
    island: Island, made: dict[str, Path], adapter: str, base: str | None, status: int, words: str
) -> None:
    alice = island.key("alice")
    reply = await put(island, alice, made[adapter], "bad", base)
    assert reply.status_code == status and words in reply.json()["error"]["message"], reply.text
    # Nothing kept: not in the gateway, not in storage; the name is free again.
    assert island.accounts.adapter("alice/bad") is None
    assert (await get_tar(island, alice, "alice/bad")).status_code == 404
    freed = await put(island, alice, made["good"], "bad")
    assert freed.status_code == 200, freed.text


async def test_bad_bodies_are_clear_errors(island: Island, made: dict[str, Path]) -> None:
    alice = island.key("alice")
    assert (await put(island, alice, made["good"], "no/slash")).status_code == 400
    broken = made["good"].parent / "broken"
    shutil.copytree(made["good"], broken, dirs_exist_ok=True)
    (broken / "adapter_config.json").write_text("{not json")
    reply = await put(island, alice, broken, "broken")
    assert reply.status_code == 400 and "not valid JSON" in reply.json()["error"]["message"]
    (broken / "adapter_config.json").write_text((made["good"] / "adapter_config.json").read_text())
    (broken / "adapter_model.safetensors").write_bytes(b"\x08\x00garbage")
    reply = await put(island, alice, broken, "broken")
    assert reply.status_code == 400 and "safetensors" in reply.json()["error"]["message"]
    assert island.accounts.adapter("alice/broken") is None


async def test_atoll_adapters_import_and_download(
    island: Island, made: dict[str, Path], tmp_path: Path
) -> None:
    env = {"ATOLL_GATEWAY_URL": island.url, "ATOLL_API_KEY": island.key("alice")}

    async def atoll(*args: str) -> Any:
        return await asyncio.to_thread(RUNNER.invoke, adapters, list(args), env=env)

    imported = await atoll("import", str(made["good"]), "--name", "cli", "--base-model", MODEL)
    assert imported.exit_code == 0, imported.output
    assert json.loads(imported.stdout)["id"] == "alice/cli"
    out = tmp_path / "downloaded"
    got = await atoll("download", "alice/cli", "--to", str(out))
    assert got.exit_code == 0, got.output
    assert (out / "adapter_model.safetensors").read_bytes() == (
        made["good"] / "adapter_model.safetensors"
    ).read_bytes()
    assert not list(tmp_path.glob(".*partial"))
    refused = await atoll("import", str(made["saves"]), "--name", "x", "--base-model", MODEL)
    assert refused.exit_code == 1 and "modules_to_save" in refused.output
    exists = await atoll("download", "alice/cli", "--to", str(out))
    assert exists.exit_code == 1 and "exists" in exists.output
