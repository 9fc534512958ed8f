"""The storage plugin's adapter store: real peft adapters uploaded and fetched between real agents
over a real broker, every refusal leaving nothing stored, broken fetches leaving nothing visible,
and the LocalStore object store underneath."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError
from safetensors.numpy import save_file

from atoll.agent.errors import ConnectionLost, DeadlineExceeded, Forbidden, InvalidRequest
from atoll.agent.node import Agent
from atoll.agent.runtime import AgentRuntime
from atoll.agent.streams import StreamReset
from atoll.agent.transfer import READ_SIZE, STAGING, TransferFailed, staging_paths
from atoll.plugins.storage.contract.adapters import (
    ADAPTERS_NEW,
    GET_SERVICE,
    MAX_EVALUATIONS,
    PUT_SERVICE,
    AdapterExists,
    AdapterNotFound,
    InvalidAdapter,
    delete_adapter,
    describe_adapter,
    fetch_adapter,
    list_adapters,
    note_evaluation,
    upload_adapter,
)
from atoll.plugins.storage.partials import KEEP_S, forget_stale
from atoll.plugins.storage.plugin import StoragePlugin
from atoll.protocol.frames import Frame, FrameType
from atoll.protocol.session import Publication
from atoll.protocol.subjects import peer_name
from support.island import Island, start_storage
from support.overlay import eventually, intercept, refused_put

BASE = "atoll-test/tiny-llama"


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real LoRA adapter as peft saves it (with the README.md peft adds)."""
    from support.tiny_models import random_lora  # torch and peft: only when used

    out = random_lora(tmp_path_factory.mktemp("peft") / "adapter", BASE)
    assert (out / "README.md").exists()
    return out


def adapter_copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def big_adapter(src: Path, dest: Path, mib: int) -> Path:
    """The real adapter's config with a large random LoRA weight file, to catch mid-transfer."""
    dest.mkdir()
    shutil.copy(src / "adapter_config.json", dest)
    rng = np.random.default_rng(7)
    cols = mib * 1024 * 1024 // (4 * 4)
    save_file(
        {
            "base_model.model.layers.0.q_proj.lora_A.weight": rng.random((4, cols), np.float32),
            "base_model.model.layers.0.q_proj.lora_B.weight": rng.random((32, 4), np.float32),
        },
        str(dest / "adapter_model.safetensors"),
    )
    return dest


def same_files(a: Path, b: Path, names: list[str]) -> bool:
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def visible(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


async def nothing_stored(plugin: StoragePlugin) -> None:
    assert await plugin.store.list("") == []
    assert plugin.registry.totals() == (0, 0)
    assert list(plugin.incoming.iterdir()) == []


# --- upload, fetch, list, describe, delete ---------------------------------------------------


async def test_upload_then_fetch_list_describe_delete(tmp_path, make_agent, peft_adapter) -> None:
    store_rt, plugin = await start_storage(make_agent)
    trainer = (await make_agent("trainer", roles=("training",))).agent
    reader = (await make_agent("reader", roles=("inference",))).agent
    admin = (await make_agent("admin", roles=("admin",))).agent  # deletes: clients only
    src = adapter_copy(peft_adapter, tmp_path / "src")
    (src / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    seen: list[tuple[int, int]] = []

    record = await upload_adapter(
        trainer,
        "store",
        src,
        "team/tiny-v1",
        {"note": "first"},
        owner="alice",
        progress=lambda d, t: seen.append((d, t)),
    )
    names = ["adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json"]
    assert [f.name for f in record.files] == names  # peft's README.md is left out
    assert record.base_model == BASE and record.rank == 4
    assert sorted(record.target_modules) == ["q_proj", "v_proj"]
    assert record.uploader == "trainer" and record.owner == "alice"
    assert record.meta == {"note": "first"}
    assert record.size_bytes == sum((src / n).stat().st_size for n in names) == seen[-1][0]
    for entry in record.files:
        assert entry.sha256 == hashlib.sha256((src / entry.name).read_bytes()).hexdigest()

    dest = tmp_path / "cache" / "team" / "tiny-v1"
    assert await fetch_adapter(reader, "store/storage", "team/tiny-v1", dest) == dest
    assert sorted(p.name for p in dest.iterdir()) == names
    assert same_files(src, dest, names)
    assert not (dest.parent / STAGING).exists()
    with pytest.raises(FileExistsError, match="already holds an adapter"):
        await fetch_adapter(reader, "store", "team/tiny-v1", dest)

    assert [r.id for r in await list_adapters(reader, "store")] == ["team/tiny-v1"]
    assert await list_adapters(reader, "store", base_model="other/model") == []
    assert [r.id for r in await list_adapters(reader, "store", owner="alice")] == ["team/tiny-v1"]
    assert await describe_adapter(reader, "store", "team/tiny-v1") == record
    assert plugin.describe() == {"capabilities": {"adapters": 1, "store": "local"}}
    assert metrics_value(store_rt, "adapters_stored") == 1
    assert metrics_value(store_rt, "adapter_received_bytes") == record.size_bytes
    # Served bytes count once the fetcher's confirmation has arrived.
    await eventually(lambda: metrics_value(store_rt, "adapter_served_bytes") == record.size_bytes)

    # An id that is a directory of another's: its files join that directory.
    await upload_adapter(trainer, "store", src, "team")
    assert await fetch_adapter(reader, "store", "team", dest.parent) == dest.parent
    assert sorted(p.name for p in dest.parent.iterdir()) == sorted([*names, "tiny-v1"])
    assert same_files(src, dest.parent, names) and same_files(src, dest, names)
    await delete_adapter(admin, "store", "team")
    # Only that id's files went, not those of the id nested under it.
    assert await plugin.store.list("adapters/team/") == [
        f"adapters/team/tiny-v1/{n}" for n in names
    ]

    refusal = r"'reader' \(roles inference\) may not use 'delete_adapter'"
    with pytest.raises(Forbidden, match=refusal):
        await delete_adapter(reader, "store", "team/tiny-v1")
    await delete_adapter(admin, "store", "team/tiny-v1")
    await nothing_stored(plugin)
    with pytest.raises(AdapterNotFound, match="no adapter 'team/tiny-v1'"):
        await describe_adapter(reader, "store", "team/tiny-v1")
    with pytest.raises(AdapterNotFound):
        await delete_adapter(admin, "store", "team/tiny-v1")


def metrics_value(rt: AgentRuntime, name: str) -> float:
    return rt.host.metrics()["storage"].snapshot()[name]["series"][0]["value"]


async def test_an_adapter_keeps_its_last_evaluations(tmp_path, make_agent, peft_adapter) -> None:
    """note_evaluation: clients only, bounded in size and number, kept across a restart of
    nothing but the registry's row (the record is what describe answers)."""
    await start_storage(make_agent)
    gw = (await make_agent("gw", roles=("gateway",))).agent
    await upload_adapter(gw, "store", adapter_copy(peft_adapter, tmp_path / "a"), "alice/a",
                         {"note": "kept"}, owner="alice")  # fmt: skip
    for i in range(MAX_EVALUATIONS + 2):
        record = await note_evaluation(gw, "store", "alice/a", {"id": f"eval-{i}", "rows": i})
    kept = (await describe_adapter(gw, "store", "alice/a")).meta
    assert kept == record.meta and kept["note"] == "kept"
    assert [e["id"] for e in kept["evaluations"]] == [f"eval-{i}" for i in range(2, 12)]
    big = {"id": "alice/a", "evaluation": {"id": "x" * 5000}}  # past the client's own check
    with pytest.raises(InvalidRequest, match="at most 4096 bytes"):
        await gw.call("store/storage", "note_evaluation", big)
    with pytest.raises(AdapterNotFound):
        await note_evaluation(gw, "store", "alice/none", {"id": "eval-x"})
    for role in ("training", "inference"):
        other = (await make_agent(f"as-{role}", roles=(role,))).agent
        with pytest.raises(Forbidden, match="needs one of the roles gateway"):
            await note_evaluation(other, "store", "alice/a", {"id": "forged"})
    assert len((await describe_adapter(gw, "store", "alice/a")).meta["evaluations"]) == 10


async def test_fetch_of_unknown_id_is_a_clear_not_found(tmp_path, make_agent) -> None:
    await start_storage(make_agent)
    reader = (await make_agent("reader", roles=("inference",))).agent
    dest = tmp_path / "cache" / "nope"
    with pytest.raises(AdapterNotFound, match="no adapter 'nope' in storage on store"):
        await fetch_adapter(reader, "store", "nope", dest)
    assert visible(tmp_path / "cache") == [] and not (tmp_path / "cache" / STAGING).exists()
    with pytest.raises(InvalidRequest, match="adapter id"):
        await fetch_adapter(reader, "store", "../etc", tmp_path / "x")


async def test_config_root_and_bad_config(tmp_path, make_agent, peft_adapter) -> None:
    rt = await make_agent("store", roles=("storage",))
    for bad, field in (
        ({"max_adapter_bytes": 0}, "max_adapter_bytes"),
        ({"bucket": "x"}, "bucket"),
    ):
        with pytest.raises(ValidationError, match=field):
            await rt.host.add("storage", bad, plugin=StoragePlugin())
    assert "storage" in rt.host.errors  # the reason stays visible in the agent's statuses
    root = tmp_path / "objects-here"
    await rt.host.add("storage", {"root": str(root)}, plugin=StoragePlugin())
    trainer = (await make_agent("trainer", roles=("admin",))).agent
    await upload_adapter(trainer, "store", peft_adapter, "a1")
    assert sorted(p.name for p in (root / "adapters" / "a1").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


# --- ownership metadata and the adapters.new announcement -----------------------------------


async def test_metadata_is_kept_announced_and_registered_at_the_gateway(
    tmp_path, make_agent, peft_adapter
) -> None:
    await start_storage(make_agent)
    isl = await Island(make_agent).start_gateway()
    isl.accounts.create_user("alice", actor="test")
    isl.accounts.create_project("lab", actor="test")
    trainer = (await make_agent("trainer", roles=("training",))).agent
    listener = (await make_agent("listener", roles=("gateway",))).agent
    heard: list[Publication] = []
    await listener.subscribe(ADAPTERS_NEW, heard.append)
    await asyncio.sleep(0.2)  # the subscription reaches the broker

    mine = await upload_adapter(
        trainer, "store", peft_adapter, "alice/ft-1", owner="alice", source_job="ftjob-0123"
    )
    assert (mine.owner, mine.project, mine.public, mine.source_job, mine.uploader) == (
        "alice",
        None,
        False,
        "ftjob-0123",
        "trainer",
    )
    ours = await upload_adapter(
        trainer, "store", peft_adapter, "lab/ft-2", owner="alice", project="lab"
    )
    shared = await upload_adapter(trainer, "store", peft_adapter, "shared", public=True)
    stray = await upload_adapter(trainer, "store", peft_adapter, "stray", owner="nobody")
    await eventually(lambda: len(heard) == 4)
    assert [p.data for p in heard] == [
        r.model_dump(mode="json") for r in (mine, ours, shared, stray)
    ]
    assert {p.src for p in heard} == {"store/storage"}
    assert await describe_adapter(listener, "store", "lab/ft-2") == ours
    assert [r.id for r in await list_adapters(listener, "store", project="lab")] == ["lab/ft-2"]

    # The gateway grants access at once: to the user, to the project, to everyone.
    await eventually(lambda: isl.accounts.adapter("shared") is not None)
    granted = {i: isl.accounts.adapter(i) for i in ("alice/ft-1", "lab/ft-2", "shared", "stray")}
    assert (granted["alice/ft-1"].owner, granted["alice/ft-1"].project) == ("alice", None)
    assert (granted["lab/ft-2"].owner, granted["lab/ft-2"].project) == (None, "lab")
    assert granted["shared"].public and granted["alice/ft-1"].base_model == BASE
    assert granted["stray"] is None  # an owner the gateway does not know: not registered

    with pytest.raises(InvalidRequest, match=re.escape("owner: String should match pattern")):
        await upload_adapter(trainer, "store", peft_adapter, "bad", owner="two words")
    with pytest.raises(InvalidRequest, match=re.escape("project: String should match pattern")):
        await upload_adapter(trainer, "store", peft_adapter, "bad", project="../lab")


async def test_a_first_layout_registry_is_migrated(tmp_path, make_agent, peft_adapter) -> None:
    """A registry written before adapters had owners: its uploader column was "owner"."""
    rt = await make_agent("store", roles=("storage",))
    data_dir = rt.host.data_dir / "plugins" / "storage"
    data_dir.mkdir(parents=True)
    db = sqlite3.connect(data_dir / "registry.sqlite")
    db.executescript(
        """
        CREATE TABLE adapters (id TEXT PRIMARY KEY, base_model TEXT NOT NULL,
            rank INTEGER NOT NULL, target_modules TEXT NOT NULL, files TEXT NOT NULL,
            size_bytes INTEGER NOT NULL, owner TEXT NOT NULL, created REAL NOT NULL,
            meta TEXT NOT NULL);
        CREATE INDEX adapters_base ON adapters (base_model);
        INSERT INTO adapters VALUES ('old', 'base/m', 8, '["q_proj"]', '[]', 0, 'trainer-1',
            1.5, '{"note": "kept"}');
        """
    )
    db.close()
    await rt.host.add("storage", {}, plugin=StoragePlugin())
    trainer = (await make_agent("trainer", roles=("training",))).agent
    old = await describe_adapter(trainer, "store", "old")
    assert (old.uploader, old.owner, old.public, old.meta) == (
        "trainer-1",
        None,
        False,
        {"note": "kept"},
    )
    assert (old.rank, old.target_modules, old.created) == (8, ["q_proj"], 1.5)
    await upload_adapter(trainer, "store", peft_adapter, "new", owner="alice")
    assert [r.id for r in await list_adapters(trainer, "store", base_model="base/m")] == ["old"]
    # Reopened, the migrated registry is left as it is.
    await rt.host.remove("storage")
    await rt.host.add("storage", {}, plugin=StoragePlugin())
    assert [r.id for r in await list_adapters(trainer, "store")] == ["new", "old"]


# --- refusals: each clear, each leaving nothing stored ----------------------------------------


def edit_config(directory: Path, **changes) -> None:
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


async def test_bad_uploads_are_refused_and_nothing_is_stored(
    tmp_path, make_agent, peft_adapter
) -> None:
    _, plugin = await start_storage(make_agent, max_adapter_bytes=1024 * 1024)
    trainer = (await make_agent("trainer", roles=("training",))).agent
    reader = (await make_agent("reader", roles=("inference",))).agent
    n = iter(range(100))

    def variant() -> Path:
        return adapter_copy(peft_adapter, tmp_path / f"v{next(n)}")

    refusal = r"'reader' \(roles inference\) may not use stream 'adapter_put'"
    with pytest.raises(Forbidden, match=refusal):
        await upload_adapter(reader, "store", variant(), "a1")
    await nothing_stored(plugin)

    not_lora = variant()
    edit_config(not_lora, peft_type="PREFIX_TUNING")
    # What no node could serve is refused at upload, not at first use.
    saves_modules = variant()
    edit_config(saves_modules, modules_to_save=["lm_head"])
    dora = variant()
    edit_config(dora, use_dora=True)
    no_base = variant()
    edit_config(no_base, base_model_name_or_path=None)
    no_rank = variant()
    edit_config(no_rank, r=0)
    no_targets = variant()
    edit_config(no_targets, target_modules=[])
    not_json = variant()
    (not_json / "adapter_config.json").write_text("{peft_type: LORA")
    no_weights = variant()
    (no_weights / "adapter_model.safetensors").unlink()
    no_config = variant()
    (no_config / "adapter_config.json").unlink()
    garbage = variant()
    (garbage / "adapter_model.safetensors").write_bytes(b"\x07" * 4000)
    truncated = variant()
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    no_lora = variant()
    save_file({"w": np.zeros((4, 4), np.float32)}, str(no_lora / "adapter_model.safetensors"))
    too_big = big_adapter(peft_adapter, tmp_path / "big", 2)
    cases = [
        (not_lora, InvalidAdapter, "peft_type is 'PREFIX_TUNING', only LORA"),
        (saves_modules, InvalidAdapter, "modules_to_save replaces whole layers"),
        (dora, InvalidAdapter, "DoRA adapters are not served"),
        (no_base, InvalidAdapter, "base_model_name_or_path is missing"),
        (no_rank, InvalidAdapter, "rank r must be a positive integer"),
        (no_targets, InvalidAdapter, "target_modules must name"),
        (not_json, InvalidAdapter, "adapter_config.json is not valid JSON"),
        (no_weights, InvalidAdapter, "lacks adapter_model.safetensors"),
        (no_config, InvalidAdapter, "lacks adapter_config.json"),
        (garbage, InvalidAdapter, "not a valid safetensors file"),
        (truncated, InvalidAdapter, "not a valid safetensors file"),
        (no_lora, InvalidAdapter, "holds no LoRA tensors"),
        (too_big, InvalidAdapter, "this store takes at most 1048576"),
    ]
    for directory, error, message in cases:
        with pytest.raises(error, match=message):
            await upload_adapter(trainer, "store", directory, "a1")
        await nothing_stored(plugin)

    for bad in (
        "../a1",
        "/abs",
        "a1/../../x",
        "-lead",
        "a//b",
        "x" * 161,
        "a\\b",
        "a/adapter_config.json",
    ):
        with pytest.raises(InvalidRequest, match="adapter id"):
            await upload_adapter(trainer, "store", variant(), bad)
    await nothing_stored(plugin)

    first = await upload_adapter(trainer, "store", variant(), "a1", {"v": 1})
    with pytest.raises(AdapterExists, match="'a1' already exists; adapters are immutable"):
        await upload_adapter(trainer, "store", variant(), "a1", {"v": 2})
    assert await describe_adapter(reader, "store", "a1") == first
    assert plugin.registry.totals() == (1, first.size_bytes)
    assert list(plugin.incoming.iterdir()) == []


async def raw_put(agent, header: bytes, body: bytes = b"") -> None:
    await refused_put(agent, PUT_SERVICE, header, body)


async def test_wire_refusals(tmp_path, make_agent, peft_adapter) -> None:
    """What a hostile or broken uploader can send: traversal names, a bad id, lying checksums,
    a non-JSON header; the fetch side refuses a bad id too."""
    _, plugin = await start_storage(make_agent)
    trainer = (await make_agent("trainer", roles=("training",))).agent
    config = (peft_adapter / "adapter_config.json").read_bytes()
    weights = (peft_adapter / "adapter_model.safetensors").read_bytes()

    def entry(name: str, data: bytes, sha: str | None = None) -> dict:
        return {"name": name, "size": len(data), "sha256": sha or hashlib.sha256(data).hexdigest()}

    def header(adapter_id: str, *files: dict) -> bytes:
        return json.dumps({"id": adapter_id, "files": list(files), "meta": {}}).encode()

    ok_files = (entry("adapter_config.json", config), entry("adapter_model.safetensors", weights))
    for name in ("../evil.json", "/etc/passwd", "sub/adapter_config.json", "a\\b", "README.md"):
        with pytest.raises(InvalidRequest, match="is not part of an adapter"):
            await raw_put(
                trainer, header("a1", *ok_files, entry(name, b"x")), config + weights + b"x"
            )
    with pytest.raises(InvalidRequest, match=re.escape("adapter id '../a1'")):
        await raw_put(trainer, header("../a1", *ok_files), config + weights)
    with pytest.raises(InvalidRequest, match="each file is named once"):
        await raw_put(trainer, header("a1", *ok_files, ok_files[0]), config + weights + config)
    with pytest.raises(InvalidRequest, match="malformed header line"):
        await raw_put(trainer, b"not json")
    lying = entry("adapter_model.safetensors", weights, sha="0" * 64)
    with pytest.raises(TransferFailed, match="does not match the declared"):
        await raw_put(trainer, header("a1", ok_files[0], lying), config + weights)
    await nothing_stored(plugin)

    stream = await trainer.streams.open("store/storage", GET_SERVICE, {"id": "../x"})
    with pytest.raises(InvalidRequest, match="adapter id"):
        await asyncio.wait_for(stream.read(), 10)
    await stream.close()


# --- broken fetches --------------------------------------------------------------------------


async def test_transfers_cut_mid_way_leave_nothing_and_retries_succeed(
    tmp_path, make_agent, peft_adapter
) -> None:
    store_rt, plugin = await start_storage(make_agent)
    trainer = (await make_agent("trainer", roles=("training",))).agent
    reader = (await make_agent("reader", roles=("inference",))).agent
    src = big_adapter(peft_adapter, tmp_path / "src", 40)
    size = sum(p.stat().st_size for p in src.iterdir())
    sent: list[int] = []

    def give_up(done: int, total: int) -> None:
        sent.append(done)
        if len(sent) == 1:  # the uploader resets its stream after the first chunk went out
            for stream in list(trainer.streams.streams.values()):
                stream.abort(StreamReset("the uploader gave up"))

    with pytest.raises(StreamReset, match="the uploader gave up"):
        await upload_adapter(trainer, "store", src, "big", progress=give_up)
    assert sent[-1] < size
    await eventually(
        lambda: (
            not store_rt.agent.streams.streams
            and not plugin.uploading
            and not any(plugin.incoming.iterdir())
        )
    )
    await nothing_stored(plugin)

    record = await upload_adapter(trainer, "store", src, "big")
    assert record.size_bytes == size
    cache = tmp_path / "cache"
    progress: list[int] = []

    def cut(done: int, total: int) -> None:
        progress.append(done)
        if len(progress) == 1:  # storage resets the stream after the first chunk arrived
            for stream in list(store_rt.agent.streams.streams.values()):
                stream.abort(StreamReset("storage cut the transfer"))

    with pytest.raises(StreamReset, match="storage cut the transfer"):
        await fetch_adapter(reader, "store", "big", cache / "big", progress=cut)
    assert progress[-1] < record.size_bytes
    assert visible(cache) == [] and not (cache / STAGING).exists()

    dest = await fetch_adapter(reader, "store", "big", cache / "big")
    assert same_files(src, dest, ["adapter_config.json", "adapter_model.safetensors"])
    assert visible(cache) == ["big"]


async def test_a_cut_upload_resumes_where_it_stopped(tmp_path, make_agent, peft_adapter) -> None:
    """An adapter upload the uploader gives up on part-way sends only the rest when tried again,
    and what is stored is the adapter, byte for byte; another uploader's attempt at the same
    files starts from nothing (a partial upload is its uploader's)."""
    _, plugin = await start_storage(make_agent)
    trainer = (await make_agent("trainer", roles=("training",))).agent
    other = (await make_agent("trainer2", roles=("training",))).agent
    src = big_adapter(peft_adapter, tmp_path / "src", 24)
    size = sum(p.stat().st_size for p in src.iterdir())

    async def cut_at_half(agent) -> None:
        def give_up(done: int, total: int) -> None:
            if done > total // 2:
                for stream in list(agent.streams.streams.values()):
                    stream.abort(StreamReset("the uploader gave up"))

        with pytest.raises(StreamReset, match="the uploader gave up"):
            await upload_adapter(agent, "store", src, "big", progress=give_up)

    def held() -> int:
        return sum(p.stat().st_size for p in plugin.partials.root.rglob("*.part"))

    await cut_at_half(trainer)
    await eventually(lambda: held() > size // 3 and not plugin.uploading)
    kept = held()
    await nothing_stored(plugin)
    starts: list[int] = []

    def first(done: int, total: int) -> None:
        if not starts:
            starts.append(done)

    await cut_at_half(other)  # its own partial, from nothing
    await eventually(lambda: not plugin.uploading)  # storage has seen that transfer end
    record = await upload_adapter(trainer, "store", src, "big", progress=first)
    assert kept <= starts[0] < size  # resumed from what the store held
    assert record.size_bytes == size
    dest = await fetch_adapter(trainer, "store", "big", tmp_path / "back")
    assert same_files(src, dest, ["adapter_config.json", "adapter_model.safetensors"])
    assert len(list(plugin.partials.root.iterdir())) == 1  # trainer2's partial; trainer's used up


async def test_a_cut_multi_file_upload_sends_only_what_storage_lacks(
    tmp_path, broker, make_agent, peft_adapter
) -> None:
    """An upload of several files whose messages stop reaching storage part-way through one of
    them (the broker loses them, the uploader gives up) sends, when tried again, only what
    storage lacks: nothing of the files it received whole, the rest of the one it was cut in;
    what is stored is the adapter, byte for byte. Another uploader's attempt at the same files
    starts from nothing: a partial upload is its uploader's."""
    _, plugin = await start_storage(make_agent)
    trainer = (await make_agent("trainer", roles=("training",))).agent
    other = (await make_agent("trainer2", roles=("training",))).agent
    src = big_adapter(peft_adapter, tmp_path / "src", 16)
    (src / "tokenizer.json").write_text(json.dumps({"pad": os.urandom(3 * 1024 * 1024).hex()}))
    sizes = {p.name: p.stat().st_size for p in src.iterdir()}
    size = sum(sizes.values())
    whole = sizes["adapter_config.json"] + sizes["adapter_model.safetensors"]  # sent first
    cut_at = whole + sizes["tokenizer.json"] // 3
    sent = {"trainer": 0, "trainer2": 0}  # bytes of messages to storage the broker passed
    cutting = cut = False

    def tap(session, frame: Frame) -> Frame | None:
        nonlocal cut
        if frame.type is not FrameType.MSG or frame.header["dst"] != "store/storage":
            return None
        if cut:
            return Frame(frame.type, {**frame.header, "dst": "nobody"}, frame.payload)
        name = peer_name(frame.header["src"])
        sent[name] += len(frame.payload)
        cut = cutting and sent[name] > cut_at
        return None

    async def cut_upload(agent: Agent) -> list[int]:
        nonlocal cutting, cut
        starts: list[int] = []
        cutting = True
        upload = asyncio.create_task(
            upload_adapter(agent, "store", src, "big", progress=lambda done, _: starts.append(done))
        )
        await eventually(lambda: cut, 30)
        await asyncio.sleep(0.2)  # what was in flight is lost too
        cutting = cut = False
        upload.cancel()  # its reset reaches storage: the stream there ends
        with pytest.raises(asyncio.CancelledError):
            await upload
        await eventually(lambda: not plugin.uploading)
        return starts

    undo = intercept(broker, tap)
    try:
        await cut_upload(trainer)
        [folder] = plugin.partials.root.iterdir()
        assert same_files(src, folder, ["adapter_config.json", "adapter_model.safetensors"])
        part = staging_paths(folder / "tokenizer.json")[0].stat().st_size
        assert 0 < part < sizes["tokenizer.json"]
        assert (await cut_upload(other))[0] <= READ_SIZE  # its own partial, from nothing

        sent["trainer"] = 0
        starts: list[int] = []
        record = await upload_adapter(
            trainer, "store", src, "big", progress=lambda done, _: starts.append(done)
        )
    finally:
        undo()
    resumed = whole + part
    assert resumed < starts[0] <= resumed + READ_SIZE  # went on from what storage held
    missing = size - resumed
    # Only the rest went (with room for a slow machine's retransmissions), none of the files
    # storage held whole.
    assert missing <= sent["trainer"] < missing + whole // 2
    assert record.size_bytes == size
    dest = await fetch_adapter(trainer, "store", "big", tmp_path / "back")
    assert same_files(src, dest, sorted(sizes))
    assert len(list(plugin.partials.root.iterdir())) == 1  # trainer2's partial; trainer's used up


def test_partial_uploads_nobody_came_back_for_are_removed(tmp_path) -> None:
    """A partial upload untouched for ``KEEP_S`` goes at the next upload's sweep; one written
    to since (any of its files) stays."""
    stale, fresh = tmp_path / "stale", tmp_path / "fresh"
    for folder in (stale, fresh):
        (folder / STAGING).mkdir(parents=True)
        (folder / STAGING / "x.part").write_bytes(b"held")
    old = time.time() - KEEP_S - 60
    for path in (stale / STAGING / "x.part", stale / STAGING, stale, fresh):
        os.utime(path, (old, old))  # fresh: only its part file was written lately
    forget_stale(tmp_path, time.time() - KEEP_S)
    assert visible(tmp_path) == ["fresh"]


async def test_storage_agent_dies_mid_fetch_then_returns(
    tmp_path, broker, make_agent, peft_adapter
) -> None:
    """The storage agent stops mid-transfer: the fetch gives up after its idle timeout with
    nothing visible; restarted on the same data dir it still knows the adapter."""
    store_rt, _ = await start_storage(make_agent)
    trainer = (await make_agent("trainer", roles=("training",))).agent
    reader = (await make_agent("reader", roles=("inference",))).agent
    src = big_adapter(peft_adapter, tmp_path / "src", 40)
    await upload_adapter(trainer, "store", src, "big")
    cache = tmp_path / "cache"
    received: list[int] = []

    def die(done: int, total: int) -> None:
        received.append(done)
        if len(received) == 1:
            # What its link going down does first, at once (stop() takes a while, and the
            # transfer could finish meanwhile): its streams die silently, nothing tells the reader.
            store_rt.agent.streams.reset_all(ConnectionLost("the storage agent died"))
            killing.append(asyncio.create_task(store_rt.stop()))

    killing: list[asyncio.Task] = []
    with pytest.raises(DeadlineExceeded, match=r"made no progress for 2\.0s"):
        await fetch_adapter(reader, "store", "big", cache / "big", idle_timeout=2.0, progress=die)
    await killing[0]
    assert received[-1] < sum(p.stat().st_size for p in src.iterdir())
    assert visible(cache) == [] and not (cache / STAGING).exists()

    revived = await AgentRuntime.start(
        store_rt.host.data_dir, [broker.url], keys=store_rt.agent.keys
    )
    try:
        await revived.host.add("storage", {}, plugin=StoragePlugin())
        dest = await fetch_adapter(reader, "store", "big", cache / "big")
        assert same_files(src, dest, ["adapter_config.json", "adapter_model.safetensors"])
    finally:
        await revived.stop()


# --- LocalStore ------------------------------------------------------------------------------
