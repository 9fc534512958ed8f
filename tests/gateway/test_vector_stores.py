"""OpenAI's Vector Stores API through the gateway, driven by the openai SDK on an echo node's
embeddings (a hash of each text: a query equal to a chunk's text scores 1 against it): a store's
life, per-record permissions across projects, filters, score threshold, deletion, a storage
restart keeping the index, a clear 4xx for each bad input, and a training file's rows embedded
(searched, near-duplicates flagged)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import openai
import pytest
from openai.types import StaticFileChunkingStrategyObjectParam

from atoll.agent.errors import Forbidden
from atoll.plugins.gateway import vector_ingest, vector_shapes
from atoll.plugins.storage.contract.vectors import ReadScope, VectorIndexClient, VectorSearch
from atoll.plugins.storage.plugin import StoragePlugin
from support.island import Island, start_storage
from support.overlay import AgentFactory


async def eventually_async(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("not reached in time")


STATIC: StaticFileChunkingStrategyObjectParam = {
    "type": "static",
    "static": {"max_chunk_size_tokens": 100, "chunk_overlap_tokens": 0},
}


def sdk(isl: Island, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{isl.url}/v1", api_key=key, max_retries=0)


async def upload(client: openai.AsyncOpenAI, path: Path, text: str | bytes) -> str:
    if isinstance(text, str):
        path.write_text(text)
    else:
        path.write_bytes(text)
    return (await client.files.create(file=path.open("rb"), purpose="assistants")).id


def words(tag: str, n: int) -> str:
    """``n`` distinct tokens: one chunk of up to 100 tokens per hundred."""
    return " ".join(f"{tag}{i}" for i in range(n))


async def found(
    client: openai.AsyncOpenAI, store: str, query: str, **options: Any
) -> list[tuple[str, str]]:
    page = await client.vector_stores.search(store, query=query, **options)
    return [(r.file_id, r.content[0].text) for r in page.data]


@pytest.fixture
async def island(make_agent: AgentFactory) -> Island:
    await start_storage(make_agent)
    isl = Island(make_agent)
    await isl.add_node("gpu1")
    await isl.start_gateway(storage="store")
    await isl.models_seen("echo")
    return isl


async def test_a_store_from_creation_to_deletion(island: Island, tmp_path: Path) -> None:
    key = island.key("alice")
    async with sdk(island, key) as client:
        text = words("a", 250)  # three chunks: 100, 100, 50 tokens
        file_id = await upload(client, tmp_path / "notes.txt", text)
        store = await client.vector_stores.create(
            name="notes", file_ids=[file_id], chunking_strategy=STATIC
        )
        assert store.object == "vector_store" and store.status == "completed"
        assert store.file_counts.completed == store.file_counts.total == 1
        assert store.usage_bytes > len(text)
        assert (await client.vector_stores.retrieve(store.id)).name == "notes"
        assert [s.id async for s in client.vector_stores.list()] == [store.id]
        renamed = await client.vector_stores.update(store.id, name="renamed")
        assert renamed.name == "renamed"

        (vf,) = [f async for f in client.vector_stores.files.list(store.id)]
        assert vf.id == file_id and vf.status == "completed" and vf.vector_store_id == store.id
        assert vf.chunking_strategy.static.max_chunk_size_tokens == 100  # type: ignore[union-attr]
        assert (await client.vector_stores.files.retrieve(file_id, vector_store_id=store.id)).id

        chunk = words("a", 200).split(" ", 100)[-1]  # tokens a100..a199, the second chunk
        page = await client.vector_stores.search(store.id, query=chunk, max_num_results=3)
        assert page.data[0].content[0].text == chunk and page.data[0].score == pytest.approx(1)
        assert page.data[0].filename == "notes.txt" and len(page.data) == 3
        above = await found(client, store.id, chunk, ranking_options={"score_threshold": 0.999})
        assert above == [(file_id, chunk)]

        deleted = await client.vector_stores.files.delete(file_id, vector_store_id=store.id)
        assert deleted.deleted
        assert await found(client, store.id, chunk) == []
        assert (await client.vector_stores.delete(store.id)).deleted
        with pytest.raises(openai.NotFoundError):
            await client.vector_stores.retrieve(store.id)


async def test_each_user_reads_only_what_they_may(island: Island, tmp_path: Path) -> None:
    """One tenant-policy store; records of two projects, a tenant-wide one and a private one:
    each caller finds exactly what they may read, however many others' chunks rank higher."""
    for project, users in (("red", ["alice", "carol"]), ("blue", ["bob"])):
        island.accounts.create_project(project, actor="test")
        for user in users:
            island.key(user)
            island.accounts.add_member(project, user, "member", actor="test")
    alice, bob = island.key("alice", "red"), island.key("bob", "blue")
    carol, carol_all, dave = island.key("carol", "red"), island.key("carol"), island.key("dave")
    texts = {"red": words("r", 300), "blue": words("b", 100), "tenant": words("t", 100)}
    texts["dave"] = words("d", 100)
    async with sdk(island, alice) as client:
        store = await client.vector_stores.create(
            name="shared", metadata={"atoll_policy": "tenant"}, chunking_strategy=STATIC
        )
        red = await upload(client, tmp_path / "red.txt", texts["red"])
        await client.vector_stores.files.create(store.id, file_id=red, chunking_strategy=STATIC)
    ids = {"red": red}
    tenant_wide: dict[str, str | float | bool] = {"atoll_policy": "tenant"}
    for who, key, name, attributes in (
        ("blue", bob, "blue.txt", None),
        ("tenant", carol_all, "tenant.txt", tenant_wide),
        ("dave", dave, "dave.txt", None),
    ):
        async with sdk(island, key) as client:
            ids[who] = await upload(client, tmp_path / name, texts[who])
            await client.vector_stores.files.create(
                store.id, file_id=ids[who], attributes=attributes, chunking_strategy=STATIC
            )
    readers = {
        alice: {"red", "tenant"},
        carol: {"red", "tenant"},
        carol_all: {"red", "tenant"},
        bob: {"blue", "tenant"},
        dave: {"tenant", "dave"},
        island.admin_key: {"red", "blue", "tenant", "dave"},
    }
    red_chunk = words("r", 100)  # the red file's first chunk
    for key, may in readers.items():
        async with sdk(island, key) as client:
            hits = await found(client, store.id, red_chunk, max_num_results=50)
            assert {f for f, _ in hits} == {ids[w] for w in may}, may
            assert len(hits) == sum(3 if w == "red" else 1 for w in may)
            # The red chunk ranks first for everyone; one result is still one they may read.
            (best,) = await found(client, store.id, red_chunk, max_num_results=1)
            assert best[0] in {ids[w] for w in may}
            listed = {f.id async for f in client.vector_stores.files.list(store.id)}
            assert listed == {ids[w] for w in may}
    async with sdk(island, bob) as client:
        with pytest.raises(openai.NotFoundError):  # a record bob may not read: not there
            await client.vector_stores.files.retrieve(red, vector_store_id=store.id)
        with pytest.raises(openai.PermissionDeniedError):  # he reads the store, may not change it
            await client.vector_stores.delete(store.id)
    async with sdk(island, alice) as client:  # alice's own project store: bob cannot see it
        own = await client.vector_stores.create(name="red only")
    async with sdk(island, bob) as client:
        with pytest.raises(openai.NotFoundError):
            await client.vector_stores.retrieve(own.id)
        assert own.id not in {s.id async for s in client.vector_stores.list()}


async def test_filters_on_attributes(island: Island, tmp_path: Path) -> None:
    async with sdk(island, island.key("alice")) as client:
        store = await client.vector_stores.create(name="docs")
        attributes: dict[str, dict[str, str | float | bool]] = {
            "a": {"lang": "en", "year": 2023.0, "draft": False},
            "b": {"lang": "de", "year": 2024.0, "draft": True},
            "c": {"lang": "en", "year": 2025.0},
        }
        ids = {}
        for name, attrs in attributes.items():
            ids[name] = await upload(client, tmp_path / f"{name}.txt", words(name, 20))
            await client.vector_stores.files.create(store.id, file_id=ids[name], attributes=attrs)

        async def names(filters: Any) -> set[str]:
            hits = await found(client, store.id, "x", filters=filters, max_num_results=10)
            return {n for n, i in ids.items() if i in {f for f, _ in hits}}

        assert await names({"type": "eq", "key": "lang", "value": "en"}) == {"a", "c"}
        assert await names({"type": "gte", "key": "year", "value": 2024}) == {"b", "c"}
        assert await names({"type": "in", "key": "lang", "value": ["de", "fr"]}) == {"b"}
        assert await names({"type": "ne", "key": "draft", "value": True}) == {"a", "c"}
        compound = {
            "type": "or",
            "filters": [
                {"type": "eq", "key": "lang", "value": "de"},
                {
                    "type": "and",
                    "filters": [
                        {"type": "eq", "key": "lang", "value": "en"},
                        {"type": "lt", "key": "year", "value": 2024},
                    ],
                },
            ],
        }
        assert await names(compound) == {"a", "b"}
        for bad in (
            {"type": "like", "key": "lang", "value": "en"},
            {"type": "in", "key": "lang", "value": "en"},
            {"type": "and", "filters": []},
        ):
            with pytest.raises(openai.UnprocessableEntityError):
                await client.vector_stores.search(store.id, query="x", filters=bad)  # type: ignore[arg-type]


async def test_every_bad_input_is_a_clear_4xx(
    island: Island, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice, bob = island.key("alice"), island.key("bob")
    async with sdk(island, bob) as client:
        bobs_file = await upload(client, tmp_path / "bob.txt", "bob's words")
        bobs_store = (await client.vector_stores.create(name="bob's")).id
    async with sdk(island, alice) as client:
        store = (await client.vector_stores.create(name="alice's")).id
        binary = await upload(client, tmp_path / "blob.bin", bytes(range(256)))
        text = await upload(client, tmp_path / "ok.txt", words("w", 300))
        files = client.vector_stores.files
        for missing in ("vs_nope", "vs_" + "0" * 24, bobs_store):
            with pytest.raises(openai.NotFoundError):
                await client.vector_stores.retrieve(missing)
            with pytest.raises(openai.NotFoundError):
                await client.vector_stores.search(missing, query="x")
        for missing in ("file-abc", "ds-000000000000", bobs_file):
            with pytest.raises(openai.NotFoundError) as nf:
                await files.create(store, file_id=missing)
            assert nf.value.body["param"] == "file_id"  # type: ignore[index]
        with pytest.raises(openai.BadRequestError, match="not UTF-8 text"):
            await files.create(store, file_id=binary)
        monkeypatch.setattr(vector_ingest, "MAX_FILE_BYTES", 100)
        with pytest.raises(openai.BadRequestError, match="at most 100"):
            await files.create(store, file_id=text)
        monkeypatch.undo()
        bad_chunking = {
            "type": "static",
            "static": {"max_chunk_size_tokens": 100, "chunk_overlap_tokens": 60},
        }
        for chunking in (bad_chunking, {"type": "static"}, {"type": "other"}):
            with pytest.raises(openai.UnprocessableEntityError):
                await files.create(store, file_id=text, chunking_strategy=chunking)  # type: ignore[arg-type]
        spaced = await upload(client, tmp_path / "spaced.txt", "a" + " " * 200_000 + "b")
        with pytest.raises(openai.BadRequestError, match="at most 100000"):
            await files.create(store, file_id=spaced)
        with pytest.raises(openai.BadRequestError, match="needs a key of that project"):
            await files.create(store, file_id=text, attributes={"atoll_policy": "project"})
        with pytest.raises(openai.BadRequestError, match="atoll_policy"):
            await client.vector_stores.create(metadata={"atoll_policy": "world"})
        with pytest.raises(openai.BadRequestError, match="set when it is created"):
            await client.vector_stores.update(store, metadata={"atoll_policy": "tenant"})
        with pytest.raises(openai.NotFoundError):
            await files.delete(text, vector_store_id=store)  # not attached
        with pytest.raises(openai.UnprocessableEntityError):
            await client.vector_stores.search(store, query="x", max_num_results=0)
        with pytest.raises(openai.UnprocessableEntityError):
            await client.vector_stores.search(store, query="")
        with pytest.raises(openai.BadRequestError, match="rewrite_query is not supported"):
            await client.vector_stores.search(store, query="x", rewrite_query=True)


async def test_the_index_survives_a_storage_restart_sealed(
    make_agent: AgentFactory, tmp_path: Path
) -> None:
    store_rt, _ = await start_storage(make_agent)
    isl = Island(make_agent)
    await isl.add_node("gpu1")
    await isl.start_gateway(storage="store")
    await isl.models_seen("echo")
    async with sdk(isl, isl.key("alice")) as client:
        marker = "PATIENT-7731-SECRET-MARKER " + words("m", 20)
        file_id = await upload(client, tmp_path / "m.txt", marker)
        store = await client.vector_stores.create(name="kept", file_ids=[file_id])
        await store_rt.host.remove("storage")
        await store_rt.host.add("storage", {}, plugin=StoragePlugin())
        assert await found(client, store.id, marker) == [(file_id, marker)]
        assert (await client.vector_stores.retrieve(store.id)).file_counts.total == 1
    on_disk = list((store_rt.host.plugins["storage"].ctx.data_dir / "objects").rglob("vs_*"))
    assert on_disk and all(b"PATIENT" not in p.read_bytes() for p in on_disk)


async def test_only_gateways_and_admins_use_the_index(
    island: Island, make_agent: AgentFactory
) -> None:
    async with sdk(island, island.key("alice")) as client:
        store = (await client.vector_stores.create(name="s")).id
    query = VectorSearch(store_id=store, vector=[1.0] * 8, scope=ReadScope(user="x", admin=True))
    for role in ("inference", "training", "agent"):
        rt = await make_agent(f"probe-{role}", roles=(role,))
        with pytest.raises(Forbidden, match="vector_search"):
            await VectorIndexClient(rt.agent, "store").search(query)
    admin = await make_agent("ops", roles=("admin",))
    assert await VectorIndexClient(admin.agent, "store").search(query) == []
    assert [s.id for s in await VectorIndexClient(admin.agent, "store").stores()] == [store]


def chat_row(*turns: tuple[str, str]) -> str:
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]}) + "\n"


async def test_a_training_files_rows_are_embedded_searched_and_near_duplicates_flagged(
    island: Island, tmp_path: Path
) -> None:
    for project, user in (("red", "alice"), ("blue", "bob")):
        island.accounts.create_project(project, actor="test")
        island.key(user)
        island.accounts.add_member(project, user, "member", actor="test")
    alice, bob = island.key("alice", "red"), island.key("bob", "blue")
    path = tmp_path / "train.jsonl"
    path.write_text(
        chat_row(("system", "be brief"), ("user", "hi"), ("assistant", "hello"))
        # The same text in other turns: kept by de-duplication, flagged by its embedding.
        + chat_row(("user", "be brief\nhi"), ("assistant", "hello"))
        + chat_row(("user", "what is the capital of France?"), ("assistant", "Paris"))
    )
    async with sdk(island, alice) as client:
        file_id = (await client.files.create(file=path.open("rb"), purpose="fine-tune")).id

    async def features(key: str) -> httpx.Response:
        async with httpx.AsyncClient(base_url=island.url) as http:
            auth = {"Authorization": f"Bearer {key}"}
            return await http.get(f"/v1/files/{file_id}/features", headers=auth)

    async def search(key: str, query: str) -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=island.url) as http:
            auth = {"Authorization": f"Bearer {key}"}
            reply = await http.post("/v1/files/search", json={"query": query}, headers=auth)
        assert reply.status_code == 200, reply.text
        data: list[dict[str, Any]] = reply.json()["data"]
        return data

    async def completed() -> bool:
        return (await features(alice)).json()["status"] == "completed"

    await eventually_async(completed)
    report = (await features(alice)).json()
    assert report["rows"] == 3 and report["model"] == "echo"
    (near,) = report["near_duplicates"]
    assert (near["row"], near["duplicate_of"]) == (1, 0) and near["score"] == pytest.approx(1)

    question = "what is the capital of France?\nParis"
    best = (await search(alice, question))[0]
    assert (best["file_id"], best["attributes"]["row"]) == (file_id, 2)
    assert best["content"][0]["text"] == question and best["score"] == pytest.approx(1)
    assert await search(bob, question) == []  # another project's rows: none
    assert (await features(bob)).status_code == 404

    async def extract(key: str) -> httpx.Response:
        async with httpx.AsyncClient(base_url=island.url) as http:
            auth = {"Authorization": f"Bearer {key}"}
            return await http.post(f"/v1/files/{file_id}/features", headers=auth)

    assert (await extract(alice)).status_code == 409  # completed: nothing to do
    assert (await extract(bob)).status_code == 404
    # Features lost (as when a gateway restarts mid-extraction): extracted again on request.
    await island.plugin.services.features.stores.forget_file(file_id)
    assert (await features(alice)).json()["status"] == "none"
    again = await extract(alice)
    assert again.status_code == 200 and again.json()["status"] == "in_progress"
    await eventually_async(completed)
    assert (await features(alice)).json()["near_duplicates"] == report["near_duplicates"]

    async with sdk(island, alice) as client:
        store = await client.vector_stores.create(name="train", file_ids=[file_id])
        assert await found(client, store.id, question)
        await client.files.delete(file_id)
        assert await found(client, store.id, question) == []  # its chunks went with it
    assert await search(alice, question) == []  # and its rows' features


async def test_a_store_expires_after_its_last_change(
    island: Island, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with sdk(island, island.key("alice")) as client:
        file_id = await upload(client, tmp_path / "a.txt", words("a", 10))
        store = await client.vector_stores.create(
            file_ids=[file_id], expires_after={"anchor": "last_active_at", "days": 1}
        )
        assert store.expires_at == store.last_active_at + 86400  # type: ignore[operator]
        later = time.time() + 2 * 86400
        monkeypatch.setattr(vector_shapes, "time", SimpleNamespace(time=lambda: later))
        assert (await client.vector_stores.retrieve(store.id)).status == "expired"
        with pytest.raises(openai.BadRequestError, match="has expired"):
            await client.vector_stores.search(store.id, query="a0")
        monkeypatch.undo()
        assert (await client.vector_stores.retrieve(store.id)).status == "completed"


async def test_file_batches_attach_many_files_and_say_which_failed(
    island: Island, tmp_path: Path
) -> None:
    alice, bob = island.key("alice"), island.key("bob")
    async with sdk(island, alice) as client, sdk(island, bob) as other:
        store = await client.vector_stores.create(name="batch", chunking_strategy=STATIC)
        paths = []
        for i in range(3):
            paths.append(tmp_path / f"doc{i}.txt")
            paths[-1].write_text(words(f"d{i}x", 30))
        batch = await client.vector_stores.file_batches.upload_and_poll(
            store.id, files=[p.open("rb") for p in paths], poll_interval_ms=50
        )
        assert batch.object == "vector_store.files_batch" and batch.status == "completed"
        assert (batch.file_counts.completed, batch.file_counts.total) == (3, 3)
        listed = [f async for f in client.vector_stores.file_batches.list_files(
            batch.id, vector_store_id=store.id
        )]  # fmt: skip
        assert len(listed) == 3 and {f.status for f in listed} == {"completed"}
        assert await found(client, store.id, words("d1x", 30))  # searchable at once

        # One file missing, one not text: counted failed with the reason, the rest attached.
        good = await upload(client, tmp_path / "good.txt", words("g", 20))
        binary = await upload(client, tmp_path / "blob.bin", bytes(range(256)) * 4)
        mixed = await client.vector_stores.file_batches.create_and_poll(
            store.id, file_ids=[good, "ds-000000000000", binary], poll_interval_ms=50
        )
        counts = mixed.file_counts
        assert (mixed.status, counts.completed, counts.failed, counts.total) == (
            "completed", 1, 2, 3,
        )  # fmt: skip
        failed = [f async for f in client.vector_stores.file_batches.list_files(
            mixed.id, vector_store_id=store.id, filter="failed"
        )]  # fmt: skip
        assert {f.id for f in failed} == {"ds-000000000000", binary}
        assert all(f.last_error and f.last_error.message for f in failed)

        # Bob sees neither the batch nor may start one in alice's private store.
        with pytest.raises(openai.NotFoundError):
            await other.vector_stores.file_batches.retrieve(mixed.id, vector_store_id=store.id)
        with pytest.raises(openai.NotFoundError):
            await other.vector_stores.file_batches.create(store.id, file_ids=[good])
        # Bad bodies: clear 4xx.
        async with httpx.AsyncClient(
            base_url=island.url, headers={"Authorization": f"Bearer {alice}"}
        ) as raw:
            path = f"/v1/vector_stores/{store.id}/file_batches"
            bodies: list[dict[str, Any]] = [
                {}, {"file_ids": []}, {"file_ids": [good, good]},
                {"file_ids": [good], "files": [{"file_id": good}]},
            ]  # fmt: skip
            for body in bodies:
                reply = await raw.post(path, json=body)
                assert reply.status_code == 422, (body, reply.text)
            missing = await raw.get(f"{path}/vsfb_{'0' * 24}")
            assert missing.status_code == 404
