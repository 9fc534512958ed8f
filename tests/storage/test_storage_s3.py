"""The object stores' shared behaviour, run on LocalStore and on S3Store against moto's standalone
S3 server (a real S3-protocol server on loopback, started here), then S3-only matters
(credentials, buckets, multipart, prefixes, foreign objects) and adapter and dataset round trips
through a storage plugin whose store is S3."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Iterator

import boto3
import numpy as np
import pytest
from pydantic import ValidationError

from atoll.agent.runtime import AgentRuntime
from atoll.plugins.storage.contract.adapters import delete_adapter, fetch_adapter, upload_adapter
from atoll.plugins.storage.contract.datasets import (
    delete_dataset,
    fetch_dataset,
    list_datasets,
    upload_dataset,
)
from atoll.plugins.storage.plugin import StorageConfig, StoragePlugin
from atoll.plugins.storage.s3 import S3Config, S3Store, S3Unavailable
from atoll.plugins.storage.store import InvalidKey, LocalStore, ObjectNotFound, ObjectStore
from support.island import lora_adapter
from support.net import moto_server
from support.overlay import AgentFactory

pytest.importorskip("moto", reason="the S3 tests need moto[server]")

KEY_ENV, SECRET_ENV = "ATOLL_TEST_S3_KEY", "ATOLL_TEST_S3_SECRET"
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on a free loopback port, for this module's tests."""
    with moto_server() as url:
        yield url


@pytest.fixture
def credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "test-key")
    monkeypatch.setenv(SECRET_ENV, "test-secret")


_buckets = iter(range(10_000))


def s3_config(endpoint: str, **overrides) -> dict:
    """A fresh bucket per call, so tests never see each other's objects."""
    return {
        "bucket": f"atoll-test-{next(_buckets)}",
        "endpoint_url": endpoint,
        "region": "us-east-1",
        "access_key_env": KEY_ENV,
        "secret_key_env": SECRET_ENV,
        "create_bucket": True,
        "multipart_threshold": 5 * MIB,
        "multipart_chunksize": 5 * MIB,
    } | overrides


def raw_client(endpoint: str):
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="test-key",
        aws_secret_access_key="test-secret",
    )


async def open_s3(endpoint: str, **overrides) -> S3Store:
    store = S3Store(S3Config.model_validate(s3_config(endpoint, **overrides)))
    await store.open()
    return store


@pytest.fixture(params=["local", "s3"])
async def store(request, tmp_path, s3_endpoint, credentials) -> ObjectStore:
    if request.param == "local":
        return LocalStore(tmp_path / "objects")
    return await open_s3(s3_endpoint)


# --- the ObjectStore behaviour both stores share -------------------------------------------------


async def test_put_get_stat_replace(store: ObjectStore) -> None:
    info = await store.put("a/b.bin", b"old content")
    assert (info.key, info.size) == ("a/b.bin", 11)
    assert info.sha256 == hashlib.sha256(b"old content").hexdigest()
    assert await store.stat("a/b.bin") == info
    assert abs(info.mtime - time.time()) < 60
    assert await store.exists("a/b.bin") and not await store.exists("a/b")

    release = asyncio.Event()

    async def slow() -> AsyncIterator[bytes]:
        yield b"new "
        await release.wait()
        yield b"content!"

    putting = asyncio.create_task(store.put("a/b.bin", slow()))
    await asyncio.sleep(0.1)
    # Half-written: readers still see the whole old object, listing shows nothing new.
    assert await store.get("a/b.bin") == b"old content"
    assert await store.list("") == ["a/b.bin"]
    release.set()
    new = await putting
    assert await store.get("a/b.bin") == b"new content!"
    assert new.sha256 == hashlib.sha256(b"new content!").hexdigest() != info.sha256

    async def failing() -> AsyncIterator[bytes]:
        yield b"partial"
        raise OSError("source broke")

    with pytest.raises(OSError, match="source broke"):
        await store.put("a/b.bin", failing())
    with pytest.raises(OSError, match="source broke"):
        await store.put("a/c.bin", failing())
    assert await store.get("a/b.bin") == b"new content!"  # the failed put changed nothing
    assert not await store.exists("a/c.bin")

    assert (await store.put("empty", b"")).size == 0
    assert await store.get("empty") == b""


async def test_big_objects_stream_whole(store: ObjectStore, tmp_path) -> None:
    data = np.random.default_rng(3).bytes(12 * MIB + 123)  # past the multipart threshold
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    info = await store.put_file("big/file.bin", path)
    assert (info.size, info.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    chunks = [c async for c in store.read("big/file.bin")]
    assert len(chunks) > 1 and b"".join(chunks) == data

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(data), 3 * MIB):
            yield data[start : start + 3 * MIB]

    streamed = await store.put("big/streamed.bin", pieces())
    assert streamed.sha256 == info.sha256 and await store.get("big/streamed.bin") == data


async def test_list_and_delete(store: ObjectStore) -> None:
    for key in ("adapters/a/x", "adapters/ab/y", "adapters/a/deep/z", "data/z"):
        await store.put(key, key.encode())
    assert await store.list("") == ["adapters/a/deep/z", "adapters/a/x", "adapters/ab/y", "data/z"]
    assert await store.list("adapters/a") == ["adapters/a/deep/z", "adapters/a/x", "adapters/ab/y"]
    assert await store.list("adapters/a/") == ["adapters/a/deep/z", "adapters/a/x"]
    assert await store.list("adapters/a/d") == ["adapters/a/deep/z"]
    assert await store.list("nothing/here/") == []

    assert await store.delete("adapters/a/deep/z") is True
    assert await store.delete("adapters/a/deep/z") is False
    for key in ("adapters/a/x", "adapters/ab/y"):
        assert await store.delete(key)
    assert await store.list("") == ["data/z"]
    with pytest.raises(ObjectNotFound, match="no object 'adapters/a/x'"):
        await store.stat("adapters/a/x")
    with pytest.raises(ObjectNotFound, match="no object 'adapters/a/x'"):
        await store.get("adapters/a/x")
    assert await store.get("data/z") == b"data/z"


async def test_keys_that_could_escape_are_refused(store: ObjectStore) -> None:
    bad = [
        "../secret",
        "/etc/passwd",
        "a/../../secret",
        "a\\..\\secret",
        "a\x00b",
        "",
        "a//b",
        "a/./b",
        "a/",
        ".atoll-staging/x",
        "x" * 1025,
    ]
    for key in bad:
        with pytest.raises(InvalidKey):
            await store.put(key, b"x")
        with pytest.raises(InvalidKey):
            await store.get(key)
        with pytest.raises(InvalidKey):
            await store.stat(key)
        with pytest.raises(InvalidKey):
            await store.delete(key)
        with pytest.raises(InvalidKey):
            await store.exists(key)
    for prefix in ("../", "a/../", "a\x00"):
        with pytest.raises(InvalidKey):
            await store.list(prefix)
    assert await store.list("") == []


async def test_local_store_on_disk(tmp_path) -> None:
    """What only the directory store has to get right on top of the shared behaviour above."""
    root = tmp_path / "objects"
    store = LocalStore(root)
    (tmp_path / "secret").write_text("do not touch")

    async def failing() -> AsyncIterator[bytes]:
        yield b"partial"
        raise OSError("source broke")

    with pytest.raises(OSError, match="source broke"):
        await store.put("a/c.bin", failing())
    assert list((root / ".atoll-staging").iterdir()) == []  # no temp file left behind
    for key in ("../secret", "a/../../secret"):
        with pytest.raises(InvalidKey):
            await store.put(key, b"x")
    assert (tmp_path / "secret").read_text() == "do not touch"
    # A key cannot be both a file and a directory.
    await store.put("a/b", b"1")
    with pytest.raises(InvalidKey, match="collides"):
        await store.put("a/b/c", b"2")
    with pytest.raises(InvalidKey, match="collides"):
        await store.put("a", b"2")
    # Emptied directories go with their last object.
    await store.put("d/deep/z", b"z")
    assert await store.delete("d/deep/z")
    assert not (root / "d").exists()
    # A store reopened on the root finds the objects and hashes them afresh.
    file = tmp_path / "src.bin"
    file.write_bytes(b"z" * 3_000_000)
    assert (await store.put_file("f/z.bin", file)).size == 3_000_000
    again = LocalStore(root)
    assert (await again.stat("f/z.bin")).sha256 == hashlib.sha256(file.read_bytes()).hexdigest()


# --- S3 only ------------------------------------------------------------------------------------


async def test_config_and_bucket_problems_are_clear(s3_endpoint, credentials, monkeypatch) -> None:
    for bad, message in (
        ({"secret_key": "hunter2"}, "credentials never go in config files"),
        ({"aws_secret_access_key": "x"}, "credentials never go in config files"),
        ({"secret_key_env": None}, "set both access_key_env and secret_key_env, or neither"),
        ({"bucket": "Bad_Bucket"}, "bucket"),
        ({"prefix": "../up"}, "'..' segment"),
        ({"multipart_chunksize": MIB}, "multipart_chunksize"),
        ({"kms_key_id": "k"}, 'kms_key_id is for sse = "aws:kms"'),
        ({"sse": "aws:kms", "kms_key_id": ""}, "kms_key_id"),
        ({"sse": "des"}, "sse"),
    ):
        with pytest.raises(ValidationError, match=message):
            S3Config.model_validate(s3_config(s3_endpoint) | bad)
    for bad_storage, message in (
        ({"store": "s3"}, "needs an \\[s3\\] section"),
        ({"s3": s3_config(s3_endpoint)}, "store is 'local'"),
        ({"store": "s3", "s3": s3_config(s3_endpoint), "root": "/x"}, "the s3 store has no root"),
    ):
        with pytest.raises(ValidationError, match=message):
            StorageConfig.model_validate(bad_storage)

    with pytest.raises(
        S3Unavailable, match=r"'atoll-missing' at http://127\.0\.0\.1:\d+ does not exist"
    ):
        await open_s3(s3_endpoint, bucket="atoll-missing", create_bucket=False)
    monkeypatch.delenv(SECRET_ENV)
    with pytest.raises(S3Unavailable, match=f"environment variable {SECRET_ENV} is not set"):
        await open_s3(s3_endpoint)


async def test_default_credential_chain_prefix_and_foreign_objects(
    tmp_path, s3_endpoint, monkeypatch
) -> None:
    # No *_env names: boto3's own chain, here the standard AWS variables.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")
    first = await open_s3(s3_endpoint, prefix="team-a", access_key_env=None, secret_key_env=None)
    chain = {"access_key_env": None, "secret_key_env": None}
    second = await open_s3(s3_endpoint, bucket=first.bucket, prefix="team-b/", **chain)
    assert first.prefix == "team-a/"
    await first.put("k", b"a")
    await second.put("k", b"b")
    assert (await first.get("k"), await second.get("k")) == (b"a", b"b")
    assert await first.list("") == ["k"]

    client = raw_client(s3_endpoint)
    names = [o["Key"] for o in client.list_objects_v2(Bucket=first.bucket)["Contents"]]
    assert sorted(names) == ["team-a/k", "team-b/k"]
    # Written by another tool: no sha256 metadata (hashed when asked), or a key no store
    # could address (left out of listings).
    client.put_object(Bucket=first.bucket, Key="team-a/foreign", Body=b"from elsewhere")
    client.put_object(Bucket=first.bucket, Key="team-a/odd//name", Body=b"x")
    info = await first.stat("foreign")
    assert info.sha256 == hashlib.sha256(b"from elsewhere").hexdigest()
    assert await first.list("") == ["foreign", "k"]

    big = tmp_path / "multi.bin"
    big.write_bytes(b"m" * 11 * MIB)
    await first.put_file("multi", big)
    head = client.head_object(Bucket=first.bucket, Key="team-a/multi")
    assert head["ETag"].strip('"').endswith("-3")  # three 5 MiB parts: a multipart upload
    assert client.list_multipart_uploads(Bucket=first.bucket).get("Uploads") is None


# --- a storage plugin on S3 ---------------------------------------------------------------------


async def start_s3_storage(
    make_agent: AgentFactory, endpoint: str, **s3: object
) -> tuple[AgentRuntime, StoragePlugin]:
    rt = await make_agent("store", roles=("storage",))
    plugin = StoragePlugin()
    await rt.host.add("storage", {"store": "s3", "s3": s3_config(endpoint, **s3)}, plugin=plugin)
    return rt, plugin


async def test_adapter_and_dataset_round_trip_through_s3(
    tmp_path, make_agent, s3_endpoint, credentials
) -> None:
    kms_key = "arn:aws:kms:us-east-1:123456789012:key/atoll-test"
    _, plugin = await start_s3_storage(make_agent, s3_endpoint, sse="aws:kms", kms_key_id=kms_key)
    assert plugin.describe() == {"capabilities": {"adapters": 0, "store": "s3"}}
    bucket = plugin.store.inner.bucket  # type: ignore[attr-defined]
    trainer = (await make_agent("trainer", roles=("training",))).agent
    reader = (await make_agent("reader", roles=("inference",))).agent
    client = raw_client(s3_endpoint)

    def keys() -> list[str]:
        return sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", []))

    src = lora_adapter(tmp_path / "adapter")
    record = await upload_adapter(trainer, "store", src, "alice/ft-1", owner="alice")
    assert keys() == [
        "adapters/alice/ft-1/adapter_config.json",
        "adapters/alice/ft-1/adapter_model.safetensors",
    ]
    head = client.head_object(Bucket=bucket, Key="adapters/alice/ft-1/adapter_model.safetensors")
    # Sealed before it left the host (the sha256 is of what S3 holds), and S3's own
    # encryption asked for as configured.
    weights = (src / "adapter_model.safetensors").read_bytes()
    held = client.get_object(Bucket=bucket, Key="adapters/alice/ft-1/adapter_model.safetensors")
    body = held["Body"].read()
    assert head["Metadata"]["sha256"] == hashlib.sha256(body).hexdigest()
    assert weights[-64:] not in body and len(body) > len(weights)
    assert (head["ServerSideEncryption"], head["SSEKMSKeyId"]) == ("aws:kms", kms_key)
    dest = await fetch_adapter(reader, "store", record.id, tmp_path / "cache" / "ft-1")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (dest / name).read_bytes() == (src / name).read_bytes()

    rows = [{"instruction": f"Q{i}", "output": f"A{i}"} for i in range(50)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    gateway = (await make_agent("gw", roles=("gateway",))).agent  # datasets come from users
    ds = await upload_dataset(gateway, "store", data, "qa", "alice")
    assert f"datasets/{ds.id}/original" in keys() and ds.rows == 50
    got = await fetch_dataset(trainer, "store", ds.id, tmp_path / "got.jsonl")
    assert got == ds
    fetched = [json.loads(line) for line in (tmp_path / "got.jsonl").read_text().splitlines()]
    assert fetched[7]["messages"][1] == {"role": "assistant", "content": "A7"}
    await fetch_dataset(trainer, "store", ds.id, tmp_path / "orig.jsonl", as_="original")
    assert (tmp_path / "orig.jsonl").read_bytes() == data.read_bytes()
    assert [d.id for d in await list_datasets(trainer, "store")] == [ds.id]

    await delete_adapter(gateway, "store", record.id)
    await delete_dataset(gateway, "store", ds.id)
    assert keys() == []
    assert list(plugin.incoming.iterdir()) == []
