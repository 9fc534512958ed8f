"""Compressed LoRA collections (plugins/inference/compression.py, collections.py): members served
through a real local node agree with their uncompressed adapters (greedy tokens ≥ 95%, logits
within a stated tolerance), mixed batches stay correct, a request can ask for the original, and
a corrupted artefact is refused whole while the node keeps serving."""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from atoll.agent.errors import Forbidden, InvalidRequest
from atoll.plugins.gateway.adapter_commands import adapters
from atoll.plugins.inference.collections import CollectionSlots
from atoll.plugins.inference.compression import (
    FORMAT,
    MANIFEST,
    TENSORS,
    agreement,
    compress,
    compress_adapters,
    read_collection,
)
from atoll.plugins.inference.contract import AdapterRejected
from atoll.plugins.inference.pool import AdapterPool, describe_shapes, read_adapter
from atoll.plugins.storage.contract.adapters import (
    InvalidAdapter,
    fetch_adapter,
    list_adapters,
    upload_adapter,
)
from support.island import Island, start_storage
from support.local_node import run, start_backend
from support.overlay import eventually
from support.tiny_models import build_tiny_model, make_adapter, make_adapter_family

MEMBERS = 6
RANK = 8
HELD_OUT = [[5, 17, 42, 99, 7, 3], [11, 12, 13], [200, 150, 100, 50], [77, 3, 9, 41, 8]]
GREEDY = {"temperature": 0, "max_new_tokens": 10, "ignore_eos": True}
# Absolute, on logits up to ~6 of a tiny model whose adapters outweigh its own weights: the
# family's noise that the shared rank drops (about 1.5% of each ΔW) moves them by up to ~0.4.
LOGIT_TOLERANCE = 0.5


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compress")
    base = build_tiny_model(root / "tiny-llama")
    ads = root / "adapters"
    family = make_adapter_family(base, ads / "fam", MEMBERS, seed=7)
    make_adapter(base, ads / "plain", seed=3, rank=4)
    art = root / "collections" / "fam"
    ids = {f"fam/{p.name}": p for p in family}
    compress_adapters(ids, str(base), "fam", art, rank=RANK)
    return {"base": base, "adapters": ads, "collection": art}


def completed(fn: Any) -> concurrent.futures.Future:
    fut: concurrent.futures.Future = concurrent.futures.Future()
    fut.set_result(fn())
    return fut


def test_compression_is_faithful_deterministic_and_reports_errors(models):
    manifest = json.loads((models["collection"] / MANIFEST).read_text())
    assert manifest["rank"] == RANK and len(manifest["members"]) == MEMBERS
    assert all(m["error"] < 0.1 for m in manifest["members"])  # the family's noise, no more
    assert all(len(m["sha256"]) == 64 for m in manifest["members"])
    factors = {
        f"m{i}": read_adapter(models["adapters"] / f"fam/member-{i}", torch.float64)
        for i in range(3)
    }
    first, again = compress(factors, 4), compress(factors, 4)
    for module, (u, v) in first.bases.items():
        assert torch.equal(u, again.bases[module][0]) and torch.equal(v, again.bases[module][1])
        torch.testing.assert_close(u.T @ u, torch.eye(4), atol=1e-5, rtol=0)  # orthonormal
    # The reported error is the one measured against each ΔW itself, over all its modules.
    for i, mid in enumerate(factors):
        lost = total = 0.0
        for module, (u, v) in first.bases.items():
            a, b = factors[mid][module]
            dw = b @ a
            rebuilt = u.double() @ first.cores[module][i].double() @ v.double().T
            lost += float(torch.linalg.norm(dw - rebuilt)) ** 2
            total += float(torch.linalg.norm(dw)) ** 2
        assert (lost / total) ** 0.5 == pytest.approx(first.errors[i], rel=1e-3, abs=1e-5)
    # A lower rank loses more.
    assert sum(compress(factors, 1).errors) > sum(first.errors)


def test_an_error_budget_picks_the_smallest_rank_within_it(models):
    """The smallest shared rank keeping every member within the budget: the bound holds for
    every member, the rank below it breaks it, and a budget out of reach at the largest rank
    allowed names the members above it and writes no artefact."""
    ads = models["adapters"] / "fam"
    factors = {f"m{i}": read_adapter(ads / f"member-{i}", torch.float64) for i in range(MEMBERS)}
    budget = 0.01
    made = compress(factors, max_error=budget)
    assert made.max_error == budget and not made.over_budget()
    assert max(made.errors) <= budget
    # The family shares 2 directions per module plus a little noise of each member's own: the
    # budget keeps 2 at least and stays below the lossless rank (6 members x rank 4).
    k = made.rank
    assert 2 <= k < MEMBERS * 4 and set(made.ranks.values()) == {k}
    for module in made.ranks:
        assert made.bases[module][0].shape[1] == k and made.cores[module].shape[1:] == (k, k)
    assert max(compress(factors, k - 1).errors) > budget  # a fit one rank lower is over it
    # A tighter budget needs more rank, a looser one less.
    tight, loose = compress(factors, max_error=budget / 10), compress(factors, max_error=0.5)
    assert tight.rank > k >= loose.rank and max(tight.errors) <= budget / 10
    capped = compress(factors, max_error=budget / 10, max_rank=1)
    assert set(capped.ranks.values()) == {1} and capped.over_budget() == list(factors)
    with pytest.raises(ValueError, match="rank or an error budget"):
        compress(factors, 4, max_error=budget)
    members = {f"fam/member-{i}": ads / f"member-{i}" for i in range(3)}
    with pytest.raises(ValueError, match="stay above the error budget"):
        compress_adapters(members, str(models["base"]), "x", models["base"].parent / "x", None,
                          budget / 10, max_rank=1)  # fmt: skip
    assert not (models["base"].parent / "x").exists()
    # The artefact says each module's rank and the budget; a node reads them back.
    manifest = compress_adapters(members, str(models["base"]), "b", models["base"].parent / "b",
                                 max_error=budget)  # fmt: skip
    assert manifest["format"] == FORMAT and manifest["max_error"] == budget
    assert manifest["rank"] == max(s[2] for s in manifest["modules"].values())
    model = AutoModelForCausalLM.from_pretrained(models["base"])
    read = read_collection(models["base"].parent / "b", describe_shapes(model), 64, torch.float32)
    for module, (u, v) in read.bases.items():
        assert u.shape[1] == v.shape[1] == manifest["modules"][module][2]


def test_logits_within_tolerance_of_the_uncompressed_in_one_mixed_batch(models):
    base, ads = models["base"], models["adapters"]
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    pool = AdapterPool(model, ["q_proj", "v_proj"], 2, max_rank=16, activate=completed)
    slots = CollectionSlots(model, set(pool.layers), activate=completed, on_loader=pool.on_loader)
    shapes = describe_shapes(model)
    try:
        slots.load(lambda: read_collection(models["collection"], shapes, 16, torch.float32)).result(
            timeout=30
        )
        plain = pool.take()
        pool.load(plain, lambda: read_adapter(ads / "plain", torch.float32)).result(timeout=30)
        member_slot = pool.take()
        pool.load(member_slot, lambda: read_adapter(ads / "fam/member-2", torch.float32)).result(
            timeout=30
        )
        ids = torch.tensor([HELD_OUT[0]] * 4)
        with torch.no_grad():
            # Rows: member-2 compressed, plain adapter, base, member-4 compressed.
            with pool.rows([0, plain, 0, 0]), slots.rows([("fam", 3), None, None, ("fam", 5)]):
                mixed = model(input_ids=ids).logits
            with pool.rows([member_slot, plain, 0, 0]), slots.rows([None] * 4):
                exact = model(input_ids=ids).logits
        torch.testing.assert_close(mixed[0], exact[0], atol=LOGIT_TOLERANCE, rtol=0)
        # The plain adapter's and the base row are untouched by the collection beside them.
        torch.testing.assert_close(mixed[1:3], exact[1:3], atol=1e-4, rtol=1e-4)
        assert (mixed[3] - exact[3]).abs().max() > LOGIT_TOLERANCE  # member-4 is not base
    finally:
        pool.close()


async def greedy(backend: Any, adapter: str, **options: Any) -> list[list[int]]:
    outs = []
    for prompt in HELD_OUT:
        ids, _, _ = await run(
            backend, prompt_token_ids=prompt, adapter=adapter, params=GREEDY, **options
        )
        outs.append(ids)
    return outs


async def test_members_agree_with_their_originals_through_a_node(models, tmp_path):
    backend = await start_backend(models, tmp_path, collections=[str(models["collection"])])
    try:
        ours, theirs = [], []
        for i in range(MEMBERS):
            adapter = f"fam/member-{i}"
            ours += await greedy(backend, adapter)
            assert adapter not in backend.fetched  # served by the collection, nothing fetched
            theirs += await greedy(backend, adapter, uncompressed=True)  # the fallback
            assert adapter in backend.fetched
        assert agreement(ours, theirs) >= 0.95
        base = await greedy(backend, "plain")
        assert agreement(ours[: len(base)], base) < 0.5  # members are not just anything
        # Mixed: plain adapter, compressed members, base rows, and originals, all at once.
        jobs = [
            run(backend, prompt_token_ids=HELD_OUT[0], params=GREEDY, **extra)
            for extra in (
                {"adapter": "plain"},
                {"adapter": "fam/member-1"},
                {},
                {"adapter": "fam/member-3"},
                {"adapter": "fam/member-3", "uncompressed": True},
            )
        ]
        together = [ids for ids, _, _ in await asyncio.gather(*jobs)]
        alone = [
            (await greedy(backend, "plain"))[0],
            ours[1 * len(HELD_OUT)],
            (await run(backend, prompt_token_ids=HELD_OUT[0], params=GREEDY))[0],
            ours[3 * len(HELD_OUT)],
            theirs[3 * len(HELD_OUT)],
        ]
        assert together == alone
    finally:
        await backend.stop()


def corrupt(src: Path, dst: Path, how: str) -> Path:
    shutil.copytree(src, dst)
    tensors, manifest = dst / TENSORS, dst / MANIFEST
    meta = json.loads(manifest.read_text())
    if how == "hash":
        data = bytearray(tensors.read_bytes())
        data[-3] ^= 0xFF
        tensors.write_bytes(bytes(data))
    elif how == "shape":  # re-hashed: only the shapes tell
        body = load_file(str(tensors))
        key = next(k for k in body if k.endswith(".U"))
        body[key] = body[key][:, :-1].contiguous()
        save_file(body, str(tensors), metadata={"format": meta["format"]})
        from atoll.plugins.inference.compression import sha256

        meta["sha256"] = sha256(tensors)
    elif how == "member":
        meta["members"] = meta["members"][:-1]
    elif how == "rank":  # a module's rank in the manifest that its tensors do not have
        module = next(iter(meta["modules"]))
        meta["modules"][module][2] += 1
        meta["rank"] = max(s[2] for s in meta["modules"].values())
    elif how in ("v1", "v1-ranks"):  # format /1: one rank, modules as [in, out]
        meta["format"] = "atoll-lora-collection/1"
        if how == "v1":
            meta["modules"] = {m: s[:2] for m, s in meta["modules"].items()}
    manifest.write_text(json.dumps(meta))
    return dst


@pytest.mark.parametrize(
    ("how", "why"),
    [
        ("hash", "sha256"),
        ("shape", "shape"),
        ("member", "shape"),
        ("rank", "shape"),
        ("v1-ranks", "not 2 numbers"),
    ],
)
async def test_a_corrupted_collection_is_refused_and_the_node_serves_on(models, tmp_path, how, why):
    bad = corrupt(models["collection"], tmp_path / "bad", how)
    backend = await start_backend(models, tmp_path)
    try:
        with pytest.raises(AdapterRejected, match=why):
            await backend.load_collection_dir(bad)
        assert backend.collections.loaded == {}  # nothing of it half-loaded
        ids, _, finish = await run(
            backend, prompt_token_ids=HELD_OUT[0], adapter="fam/member-0", params=GREEDY
        )
        assert len(ids) == GREEDY["max_new_tokens"] and finish is not None
        assert "fam/member-0" in backend.fetched  # served by its original
        await backend.load_collection_dir(models["collection"])
        assert set(backend.collections.loaded) == {"fam"}
        assert await backend.unload_collection("fam")
    finally:
        await backend.stop()


def test_a_format_1_artefact_still_reads(models, tmp_path):
    """Format /1 (one rank for every module, modules as [in, out]) is read as before."""
    old = corrupt(models["collection"], tmp_path / "v1", "v1")
    model = AutoModelForCausalLM.from_pretrained(models["base"])
    shapes = describe_shapes(model)
    got = read_collection(old, shapes, 16, torch.float32)
    now = read_collection(models["collection"], shapes, 16, torch.float32)
    assert got.rank == now.rank == RANK and got.members == now.members
    for module, (u, _) in got.bases.items():
        assert torch.equal(u, now.bases[module][0])
    with pytest.raises(AdapterRejected, match="outside this node's"):
        read_collection(models["collection"], shapes, RANK - 1, torch.float32)


async def test_storage_keeps_the_collection_with_its_member_links(models, tmp_path, make_agent):
    _, plugin = await start_storage(make_agent)
    trainer = (await make_agent("trainer", roles=("training",))).agent
    node = (await make_agent("node", roles=("inference",))).agent
    art = models["collection"]
    record = await upload_adapter(
        trainer, "store", art, "collections/alice/fam", {"members": ["forged"]}, owner="alice"
    )
    manifest = json.loads((art / MANIFEST).read_text())
    assert record.meta["kind"] == "collection"  # the members as the manifest says, not the meta
    assert record.meta["members"] == [m["id"] for m in manifest["members"]]
    assert record.rank == RANK and record.target_modules == ["q_proj", "v_proj"]
    assert record.owner == "alice" and [f.name for f in record.files] == [MANIFEST, TENSORS]
    got = await fetch_adapter(node, "store", "collections/alice/fam", tmp_path / "got")
    backend = await start_backend(models, tmp_path / "node")
    try:
        assert (await backend.load_collection_dir(got)).members == record.meta["members"]
    finally:
        await backend.stop()
    # A collection is kept only under collections/... and whole: a tampered one is refused.
    with pytest.raises(InvalidAdapter, match=r"lacks adapter_config\.json"):
        await upload_adapter(trainer, "store", art, "alice/fam")
    bad = corrupt(art, tmp_path / "bad", "hash")
    with pytest.raises(InvalidAdapter, match="sha256"):
        await upload_adapter(trainer, "store", bad, "collections/alice/bad")
    assert [r.id for r in await list_adapters(node, "store")] == ["collections/alice/fam"]
    assert plugin.registry.get("collections/alice/bad") is None


def test_the_report_measures_agreement_as_a_node_serves(models):
    from atoll.plugins.inference.collection_report import greedy_agreement

    ads = models["adapters"] / "fam"
    members = {f"fam/member-{i}": ads / f"member-{i}" for i in range(3)}
    report = greedy_agreement(models["base"], members, models["collection"], tokens=6)
    assert set(report) == set(members) and sum(report.values()) / len(report) >= 0.95


async def test_atoll_adapters_compress_through_the_gateway(models, make_agent, tmp_path):
    """Compressed in the command's process from adapters the caller may use, stored as
    collections/<user>/<name>, reported per member; nobody else may read it or compress
    another's adapters."""
    await make_agent("store", roles=("storage",), plugins={"storage": {}}, heartbeat=0.2)
    local = {"backend": "local", "local": {"model": str(models["base"]), "embeddings": False}}
    gpu1 = await make_agent(
        "gpu1", roles=("inference",), plugins={"inference": local}, heartbeat=0.2
    )
    gpu2 = await make_agent(
        "gpu2", roles=("inference",), plugins={"inference": local}, heartbeat=0.2
    )
    island = await Island(make_agent).start_gateway()
    await island.models_seen("tiny-llama")
    alice, bob = island.key("alice"), island.key("bob")
    fam = models["adapters"] / "fam"
    async with httpx.AsyncClient(base_url=island.url, timeout=60) as http:
        for i in range(3):
            folder = fam / f"member-{i}"
            files = {
                part: (file, (folder / file).read_bytes())
                for part, file in (
                    ("config", "adapter_config.json"),
                    ("weights", "adapter_model.safetensors"),
                )
            }
            form = {"name": f"m{i}", "base_model": "tiny-llama"}
            auth = {"Authorization": f"Bearer {alice}"}
            reply = await http.post("/v1/adapters", data=form, files=files, headers=auth)
            assert reply.status_code == 200, reply.text
    env = {"ATOLL_GATEWAY_URL": island.url, "ATOLL_API_KEY": alice}
    # A budget of its own: this tiny model's adapters outweigh its weights, so its greedy
    # tokens follow far smaller errors than the default budget (a member within 0.22% kept 84%).
    args = ["compress", "--base", str(models["base"]), "--name", "fam", "--max-error", "0.0005"]
    args += [a for i in range(3) for a in ("--adapter", f"alice/m{i}")]
    done = await asyncio.to_thread(CliRunner().invoke, adapters, args, env=env)
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    assert report["id"] == "collections/alice/fam"
    assert [m["id"] for m in report["members"]] == ["alice/m0", "alice/m1", "alice/m2"]
    assert report["max_error"] == 0.0005 and set(report["ranks"].values()) == {report["rank"]}
    for member in report["members"]:
        assert member["error"] <= 0.0005 and member["agreement"] >= 0.95
        assert member["bytes"] > 0 and member["original_bytes"] > 0
    record = island.accounts.adapter("collections/alice/fam")
    assert record is not None and record.owner == "alice"
    async with httpx.AsyncClient(base_url=island.url, timeout=60) as http:
        path = "/v1/adapters/collections/alice/fam/content"
        mine = await http.get(path, headers={"Authorization": f"Bearer {alice}"})
        assert mine.status_code == 200
        theirs = await http.get(path, headers={"Authorization": f"Bearer {bob}"})
        assert theirs.status_code == 404  # as if it did not exist
        # Bob cannot make a collection of alice's adapters, even with her artefact in hand.
        parts = {}
        with tarfile.open(fileobj=io.BytesIO(mine.content)) as tar:
            for entry in tar.getmembers():
                body = tar.extractfile(entry)
                assert body is not None
                parts[entry.name] = body.read()
        stolen = await http.post(
            "/v1/adapters/collections",
            data={"name": "stolen"},
            files={
                "manifest": (MANIFEST, parts[MANIFEST]),
                "tensors": (TENSORS, parts[TENSORS]),
            },
            headers={"Authorization": f"Bearer {bob}"},
        )
        assert stolen.status_code == 404
    assert island.accounts.adapter("collections/bob/stolen") is None

    # An operator has gpu1 load the stored collection at run time; a gateway may not.
    members = ["alice/m0", "alice/m1", "alice/m2"]
    nodes = [rt.host.plugins["inference"].backend for rt in (gpu1, gpu2)]
    for node in nodes:  # each import tried its adapter on a node, which keeps it loaded
        for member in members:
            await node.unload_adapter(member)
    load = {"id": "collections/alice/fam"}
    intruder = (await make_agent("gw2", roles=("gateway",))).agent
    with pytest.raises(Forbidden):
        await intruder.call("gpu1/inference", "load_collection", load)
    op = (await make_agent("op", roles=("operator",))).agent
    with pytest.raises(InvalidRequest, match="not a collection"):
        await op.call("gpu1/inference", "load_collection", {"id": "alice/m0"})
    loaded = await op.call("gpu1/inference", "load_collection", load)
    assert loaded["id"] == load["id"] and loaded["members"] == members
    info = await op.call("gpu1/inference", "info")
    assert info["collections"] == {load["id"]: members}
    # Discovery says so: the gateway's router sends a member's requests to gpu1 first
    # (whatever its draws: gpu2 holds none of them).
    router = island.plugin.gateway.router

    def gpu1_first() -> bool:
        orders = {tuple(e.name for e in router.candidates("tiny-llama", "alice/m1", {}))
                  for _ in range(20)}  # fmt: skip
        return orders == {("gpu1", "gpu2")}

    await eventually(gpu1_first)
    backend = nodes[0]
    before = backend.tokens.value
    client = openai.AsyncOpenAI(base_url=f"{island.url}/v1", api_key=alice)
    reply = await client.chat.completions.create(
        model="alice/m1", messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert reply.usage is not None
    assert backend.tokens.value - before == reply.usage.completion_tokens > 0  # on gpu1
    assert "alice/m1" not in [a.id for a in backend.adapters()]  # its core served it, no slot
    await client.close()
    assert await op.call("gpu1/inference", "unload_collection", load) == {"unloaded": True}
    assert (await op.call("gpu1/inference", "info"))["collections"] == {}


def test_the_gateway_passes_the_fallback_on():
    from atoll.plugins.gateway.openai_requests import ChatCompletionRequest, chat_to_generate

    body = {"model": "fam/member-0", "messages": [{"role": "user", "content": "Hi"}]}
    plain = chat_to_generate(ChatCompletionRequest.model_validate(body), None, "fam/member-0")
    asked = ChatCompletionRequest.model_validate(body | {"uncompressed": True})
    assert not plain[0].uncompressed
    assert chat_to_generate(asked, None, "fam/member-0")[0].uncompressed
