"""Encryption at rest: the sealed format on its own (every cut, flip, swap and move refused), then
a storage agent whose objects on disk hold no plaintext yet come back whole through the API,
refuse a tampered or truncated object with a clear error, still read objects written before
sealing, and rotate their key-encryption key without rewriting an object."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import stat
from pathlib import Path

import openai
import pytest
from typer import Typer
from typer.testing import CliRunner

from atoll.agent.errors import Forbidden
from atoll.broker.server import BrokerServer
from atoll.plugins.storage.commands import storage
from atoll.plugins.storage.contract.adapters import fetch_adapter, upload_adapter
from atoll.plugins.storage.contract.datasets import fetch_dataset, upload_dataset
from atoll.plugins.storage.contract.wire import ObjectDamaged, rotate_keys
from atoll.plugins.storage.keyring import KEYRING_FILE, Keyring
from atoll.plugins.storage.registry import open_registry
from atoll.plugins.storage.sealed_store import SealedStore
from atoll.plugins.storage.sealing import HEADER, TAG, Opener, Sealer, sealed_size
from atoll.plugins.storage.store import LocalStore, ObjectNotFound
from atoll.tenancy.operator import OperatorStore
from support.island import Island, lora_adapter, start_storage
from support.overlay import AgentFactory

MARKER = "PATIENT-7731-SECRET-MARKER"
CHUNK = 16  # a tiny chunk size, so a few bytes span many chunks
KEY = b"k" * 32


def seal(plain: bytes, pieces: int = 7, key: str = "a/b") -> bytes:
    sealer = Sealer(KEY, b"i" * 16, key, CHUNK)
    out = [sealer.header]
    out += [sealer.feed(plain[i : i + pieces]) for i in range(0, len(plain), pieces)]
    return b"".join([*out, sealer.finish()])


def unseal(sealed: bytes, pieces: int = 5, key: str = "a/b") -> bytes:
    opener = Opener(KEY, key)
    out = [opener.feed(sealed[i : i + pieces]) for i in range(0, len(sealed), pieces)]
    return b"".join([*out, opener.finish()])


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 5])
def test_the_sealed_format_round_trips_in_any_pieces(size: int) -> None:
    plain = bytes(range(256))[:size]
    sealed = seal(plain)
    assert len(sealed) == sealed_size(size, CHUNK)
    assert unseal(sealed) == plain and unseal(sealed, pieces=1000) == plain


def test_every_cut_flip_swap_and_move_is_refused() -> None:
    plain = b"".join(f"{i:04d}".encode() for i in range(20))  # 80 bytes: 5 chunks, the last full
    sealed = seal(plain)
    for cut in range(len(sealed)):  # cut short at every byte, chunk boundaries included
        with pytest.raises(ObjectDamaged, match="damaged"):
            unseal(sealed[:cut])
    for at in range(len(sealed)):
        flipped = bytearray(sealed)
        flipped[at] ^= 0x01
        with pytest.raises(ObjectDamaged):
            unseal(bytes(flipped))
    frame = CHUNK + TAG
    first, second = HEADER.size, HEADER.size + frame
    swapped = sealed[:first] + sealed[second : second + frame] + sealed[first:second]
    swapped += sealed[second + frame :]
    with pytest.raises(ObjectDamaged, match="chunk 0 fails authentication"):
        unseal(swapped)
    with pytest.raises(ObjectDamaged, match="chunk 4 fails"):
        unseal(sealed + sealed[-frame:])  # extended: its last chunk is no longer last
    with pytest.raises(ObjectDamaged, match="'c/d' is damaged"):
        unseal(sealed, key="c/d")  # moved under another key


async def test_objects_on_disk_hold_no_plaintext_and_read_back_whole(
    tmp_path: Path, make_agent: AgentFactory
) -> None:
    _, plugin = await start_storage(make_agent)
    gateway = (await make_agent("gw", roles=("gateway",))).agent
    trainer = (await make_agent("trainer", roles=("training",))).agent
    rows = [{"instruction": f"{MARKER} question {i}", "output": f"answer {i}"} for i in range(40)]
    src = tmp_path / "train.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = await upload_dataset(gateway, "store", src, "secrets", "alice")
    adapter = lora_adapter(tmp_path / "adapter")
    weights = (adapter / "adapter_model.safetensors").read_bytes()
    record = await upload_adapter(trainer, "store", adapter, "alice/ft-1", owner="alice")

    objects = tmp_path / "agents" / "acme" / "store" / "plugins" / "storage" / "objects"
    on_disk = {p: p.read_bytes() for p in objects.rglob("*") if p.is_file()}
    assert len(on_disk) == 4  # original, canonical, adapter config and weights
    for data in on_disk.values():
        assert MARKER.encode() not in data and b"lora_A" not in data
        assert data[:8] == b"\x89ATSEAL\n"
    assert (
        weights[100:164] not in on_disk[objects / "adapters/alice/ft-1/adapter_model.safetensors"]
    )

    got = tmp_path / "got"
    await fetch_dataset(trainer, "store", ds.id, got / "orig.jsonl", as_="original")
    assert (got / "orig.jsonl").read_bytes() == src.read_bytes()
    await fetch_dataset(trainer, "store", ds.id, got / "chat.jsonl")
    assert MARKER in (got / "chat.jsonl").read_text()
    dest = await fetch_adapter(trainer, "store", record.id, got / "ft-1")
    assert (dest / "adapter_model.safetensors").read_bytes() == weights

    # A flipped byte on disk: refused with a clear error, and no partial file left.
    original = objects / "datasets" / ds.id / "original"
    damaged = bytearray(original.read_bytes())
    damaged[len(damaged) // 2] ^= 0x20
    original.write_bytes(bytes(damaged))
    with pytest.raises(ObjectDamaged, match=rf"'datasets/{ds.id}/original' is damaged: chunk 0"):
        await fetch_dataset(trainer, "store", ds.id, got / "again.jsonl", as_="original")
    assert not (got / "again.jsonl").exists()
    # A truncated one, likewise.
    weights_file = objects / "adapters/alice/ft-1/adapter_model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:-10])
    with pytest.raises(ObjectDamaged, match="cut short"):
        await fetch_adapter(trainer, "store", record.id, got / "ft-1-again")
    assert not (got / "ft-1-again").exists()
    # The store stays up: the canonical rows still read.
    await fetch_dataset(trainer, "store", ds.id, got / "chat2.jsonl")
    assert plugin.describe()["capabilities"]["adapters"] == 1


async def test_reads_beside_replacing_and_deleting_see_one_whole_object(tmp_path: Path) -> None:
    """An object and its key row change in two steps; a read that runs between them (each put
    and delete here races reads of its key) gets the old object or the new one, or none once
    deleted, never a refusal of a sound object."""
    db = open_registry(tmp_path / "registry.sqlite")
    ring = Keyring.open(tmp_path / KEYRING_FILE, "acme")
    store = SealedStore(LocalStore(tmp_path / "objects"), ring, db, seal=True)
    versions = [bytes([n]) * (3000 + n) for n in range(40)]
    await store.put("jobs/state.json", versions[0])
    seen: list[bytes | None] = []
    writing = True

    async def reader() -> None:
        while writing:  # bounded by the writer's 40 puts and one delete
            try:
                seen.append(await store.get("jobs/state.json"))
            except ObjectNotFound:  # refused without an await: let the writer go on
                seen.append(None)
                await asyncio.sleep(0.01)

    async def writer() -> None:
        nonlocal writing
        for version in versions[1:]:
            await store.put("jobs/state.json", version)
        await store.delete("jobs/state.json")
        await asyncio.sleep(0.05)
        writing = False

    await asyncio.gather(writer(), *[reader() for _ in range(4)])
    assert set(seen) - {None} <= set(versions) and seen[-1] is None
    assert len({v for v in seen if v is not None}) > 2  # the reads did see the object change


async def test_plaintext_objects_from_before_still_read(tmp_path: Path) -> None:
    root, db = tmp_path / "objects", open_registry(tmp_path / "registry.sqlite")
    plain = LocalStore(root)
    await plain.put("datasets/old/original", MARKER.encode() * 3)  # written before sealing
    ring = Keyring.open(tmp_path / KEYRING_FILE, "acme")
    store = SealedStore(plain, ring, db, seal=True)
    assert await store.get("datasets/old/original") == MARKER.encode() * 3
    info = await store.stat("datasets/old/original")
    assert info.sha256 == hashlib.sha256(MARKER.encode() * 3).hexdigest()
    await store.put("datasets/new/original", MARKER.encode())
    assert MARKER.encode() not in (root / "datasets/new/original").read_bytes()
    # Switched off: new objects plaintext, sealed ones still read.
    off = SealedStore(plain, ring, db, seal=False)
    await off.put("datasets/newer/original", b"clear")
    assert (root / "datasets/newer/original").read_bytes() == b"clear"
    assert await off.get("datasets/new/original") == MARKER.encode()
    # A sealed object swapped for plaintext behind the store's back is refused, not served.
    (root / "datasets/new/original").write_bytes(MARKER.encode())
    with pytest.raises(ObjectDamaged, match="should be sealed and is not"):
        await store.get("datasets/new/original")
    # One whose data key was deleted (or purged) cannot be read any more.
    await store.put("datasets/gone/original", b"x")
    db.execute("DELETE FROM object_keys WHERE key = 'datasets/gone/original'")
    with pytest.raises(ObjectDamaged, match="its data key is gone"):
        await store.get("datasets/gone/original")
    with pytest.raises(ValueError, match="keyring of tenant 'acme', and this agent is in 'other'"):
        Keyring.open(tmp_path / KEYRING_FILE, "other")
    db.close()


async def test_rotation_rewraps_data_keys_and_retires_the_old_kek(
    tmp_path: Path, make_agent: AgentFactory, operator: OperatorStore, broker: BrokerServer
) -> None:
    _, plugin = await start_storage(make_agent)
    gateway = (await make_agent("gw", roles=("gateway",))).agent
    src = tmp_path / "train.jsonl"
    src.write_text(json.dumps({"text": MARKER}) + "\n")
    ds = await upload_dataset(gateway, "store", src, "notes", "alice")
    objects = plugin.ctx.data_dir / "objects"
    before = {p: p.read_bytes() for p in objects.rglob("*") if p.is_file()}
    keyring = plugin.ctx.data_dir / KEYRING_FILE
    old = json.loads(keyring.read_text())
    assert old["current"] == "acme-1" and stat.S_IMODE(keyring.stat().st_mode) == 0o600

    app = Typer()
    app.add_typer(storage, name="storage")
    target = ["-d", str(operator.root), "--tenant", "acme", "--broker", broker.url]
    result = await asyncio.to_thread(
        CliRunner().invoke, app, ["storage", "rotate-keys", *target, "--storage", "store"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"kek": "acme-2", "rewrapped": 2, "retired": ["acme-1"]}
    ring = json.loads(keyring.read_text())
    assert list(ring["keys"]) == ["acme-2"] and stat.S_IMODE(keyring.stat().st_mode) == 0o600
    assert {p: p.read_bytes() for p in objects.rglob("*") if p.is_file()} == before  # untouched
    keks = sqlite3.connect(plugin.ctx.data_dir / "registry.sqlite").execute(
        "SELECT DISTINCT kek FROM object_keys"
    )
    assert [k for (k,) in keks] == ["acme-2"]
    await fetch_dataset(gateway, "store", ds.id, tmp_path / "got.jsonl", as_="original")
    assert (tmp_path / "got.jsonl").read_bytes() == src.read_bytes()
    # Who may not: the gateway (it acts for users) and trainers.
    for role in ("gateway", "training"):
        agent = (await make_agent(f"not-{role}", roles=(role,))).agent
        with pytest.raises(Forbidden):
            await rotate_keys(agent, "store")


async def test_files_through_the_openai_sdk_are_sealed_on_disk(
    tmp_path: Path, make_agent: AgentFactory
) -> None:
    _, plugin = await start_storage(make_agent)
    isl = await Island(make_agent).start_gateway(storage="store")
    client = openai.AsyncOpenAI(base_url=f"{isl.url}/v1", api_key=isl.key("alice"), max_retries=0)
    data = tmp_path / "notes.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": MARKER}, {"role": "assistant", "content": "ok"}]}
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    try:
        uploaded = await client.files.create(file=data.open("rb"), purpose="fine-tune")
        original = plugin.ctx.data_dir / "objects" / "datasets" / uploaded.id / "original"
        assert MARKER.encode() not in original.read_bytes()
        assert (await client.files.content(uploaded.id)).content == data.read_bytes()
        sealed = bytearray(original.read_bytes())
        sealed[-1] ^= 0x01
        original.write_bytes(bytes(sealed))
        with pytest.raises(openai.APIStatusError) as refused:
            await client.files.content(uploaded.id)
        assert refused.value.status_code == 502
        assert "is damaged: chunk 0 fails authentication" in refused.value.message
        assert (await client.files.retrieve(uploaded.id)).id == uploaded.id  # still serving
    finally:
        await client.close()
