"""The storage plugin's vector index on its own: who reads which labels, attribute filters, the
permission filter applied inside the FAISS search (a reader gets their k best however many
others' chunks rank higher), a store kept sealed and whole (a change that is not saved is not
seen, and a new index over the same objects finds what the old one did)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from atoll.agent.errors import InvalidRequest
from atoll.plugins.storage.contract.vectors import (
    Chunking,
    Comparison,
    Compound,
    Labels,
    ReadScope,
    VectorFileAdd,
    VectorSearch,
    VectorStoreSpec,
)
from atoll.plugins.storage.keyring import Keyring
from atoll.plugins.storage.registry import open_registry
from atoll.plugins.storage.sealed_store import SealedStore
from atoll.plugins.storage.store import LocalStore
from atoll.plugins.storage.vectors import VectorIndex

STORE = "vs_" + "a" * 24
DIMS = 16


def sealed(root: Path) -> SealedStore:
    db = open_registry(root / "registry.sqlite")
    keyring = Keyring.open(root / "keyring", "acme")
    return SealedStore(LocalStore(root / "objects"), keyring, db, seal=True)


def labels(owner: str, project: str | None = None, policy: str = "private") -> Labels:
    return Labels.model_validate({"owner": owner, "project": project, "policy": policy})


def add(file_no: int, vectors: np.ndarray, who: Labels, **attributes: Any) -> VectorFileAdd:
    return VectorFileAdd(
        store_id=STORE,
        file_id=f"ds-{file_no:012x}",
        filename=f"f{file_no}.txt",
        attributes=attributes or None,
        labels=who,
        chunking=Chunking(max_chunk_size_tokens=100, chunk_overlap_tokens=0),
        chunks=[f"file {file_no} chunk {i}" for i in range(len(vectors))],
        vectors=vectors.astype("<f4").tobytes(),
    )


async def new_index(root: Path) -> VectorIndex:
    index = VectorIndex(sealed(root))
    await index.load()
    spec = VectorStoreSpec(id=STORE, name="s", labels=labels("alice"), model="echo")
    if STORE not in index.kept:
        await index.put_store(spec)
    return index


def search(vector: np.ndarray, scope: ReadScope, k: int = 10, **options: Any) -> VectorSearch:
    return VectorSearch(
        store_id=STORE, vector=vector.tolist(), scope=scope, max_results=k, **options
    )


def test_who_reads_which_labels() -> None:
    alice = ReadScope(user="alice", projects=["red"])
    scoped = ReadScope(user="alice", projects=["red"], personal=False)
    bob = ReadScope(user="bob", projects=["blue"])
    cases = [
        (labels("alice"), (True, False, False)),
        (labels("alice", "red"), (True, True, False)),
        (labels("carol", "red", "project"), (True, True, False)),
        (labels("carol", "red"), (False, False, False)),  # carol's own, in red
        (labels("bob", "blue", "project"), (False, False, True)),
        (labels("bob", None, "tenant"), (True, True, True)),
    ]
    for record, expected in cases:
        assert (alice.reads(record), scoped.reads(record), bob.reads(record)) == expected, record
    assert ReadScope(user="root", admin=True).reads(labels("bob", "blue"))
    with pytest.raises(ValueError, match="needs a project"):
        labels("alice", None, "project")


def test_filters_compare_like_openai() -> None:
    attrs = {"lang": "en", "year": 2024.0, "draft": False}
    yes = [
        Comparison(type="eq", key="lang", value="en"),
        Comparison(type="eq", key="year", value=2024),
        Comparison(type="gt", key="year", value=2023.5),
        Comparison(type="ne", key="missing", value="x"),
        Comparison(type="nin", key="lang", value=["de"]),
        Comparison(type="eq", key="draft", value=False),
    ]
    no = [
        Comparison(type="eq", key="draft", value=0.0),  # a bool is not a number
        Comparison(type="gt", key="lang", value=1.0),  # no order between a string and a number
        Comparison(type="eq", key="missing", value="x"),
        Comparison(type="in", key="lang", value=["de", "fr"]),
    ]
    assert all(f.matches(attrs) for f in yes) and not any(f.matches(attrs) for f in no)
    assert Compound(type="or", filters=[no[0], yes[0]]).matches(attrs)
    assert not Compound(type="and", filters=[no[0], yes[0]]).matches(attrs)
    with pytest.raises(ValueError, match="takes a list"):
        Comparison(type="in", key="lang", value="en")


async def test_a_reader_gets_their_k_best_however_many_others_rank_higher(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(7)
    query = rng.normal(size=DIMS)
    index = await new_index(tmp_path)
    # 500 of alice's chunks all nearer the query than any of bob's three.
    near = query + rng.normal(scale=0.05, size=(500, DIMS))
    far = -query + rng.normal(scale=0.05, size=(3, DIMS))
    await index.add_file(add(1, near, labels("alice")))
    await index.add_file(add(2, far, labels("bob", "blue", "project"), lang="en"))
    bob = ReadScope(user="bob", projects=["blue"])
    hits = index.search(search(query, bob, k=5))
    assert [h.file_id for h in hits] == ["ds-000000000002"] * 3
    assert all(h.score < 0 for h in hits)
    assert index.search(search(query, bob, k=5, score_threshold=0.0)) == []
    only_en = Comparison(type="eq", key="lang", value="en")
    alice = ReadScope(user="alice", admin=True)
    assert {h.file_id for h in index.search(search(query, alice, k=50, filters=only_en))} == {
        "ds-000000000002"
    }
    best = index.search(search(query, alice, k=3))
    assert [h.file_id for h in best] == ["ds-000000000001"] * 3
    assert best[0].score > 0.99 and best[0].score >= best[1].score >= best[2].score


async def test_a_store_is_kept_sealed_and_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(1)
    index = await new_index(tmp_path)
    first = rng.normal(size=(4, DIMS))
    await index.add_file(add(1, first, labels("alice")))
    await index.add_file(add(2, rng.normal(size=(2, DIMS)), labels("alice")))
    await index.delete_file(STORE, "ds-000000000002")
    on_disk = (tmp_path / "objects" / "vectors" / STORE).read_bytes()
    assert b"chunk" not in on_disk and b"alice" not in on_disk  # sealed

    # A change that is not saved is not seen, and leaves what was kept.
    async def failing_put(*args: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(index.objects, "put", failing_put)
    with pytest.raises(OSError):
        await index.add_file(add(3, rng.normal(size=(2, DIMS)), labels("alice")))
    monkeypatch.undo()
    with pytest.raises(InvalidRequest, match="dimensions"):
        await index.add_file(add(4, rng.normal(size=(2, DIMS + 1)), labels("alice")))
    everyone = ReadScope(user="x", admin=True)
    assert {h.file_id for h in index.search(search(first[0], everyone))} == {"ds-000000000001"}

    reopened = await new_index(tmp_path)  # as a restarted storage agent does
    assert reopened.store(STORE).files == 1 and reopened.store(STORE).chunks == 4
    hits = reopened.search(search(first[2], everyone, k=1))
    assert hits[0].text == "file 1 chunk 2" and hits[0].score == pytest.approx(1, abs=1e-5)
    await reopened.delete_store(STORE)
    assert (await new_index(tmp_path)).store(STORE).files == 0  # made anew, empty
