"""Optimised mixtures of adapters through the gateway: a search on a labelled set whose winner
leans to the adapter the references came from, its curve, the winner saved as a named mixture
that chat and an evaluation (scoring it the same) call like a model; who may search, save, see
and delete; a merge the nodes refuse recorded as a failed trial; and the search itself."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from playwright.async_api import Browser, expect
from typer.testing import CliRunner, Result

from atoll.plugins.gateway.mixture_commands import mixtures
from atoll.plugins.gateway.mixture_search import HIGH, WeightSearch
from support.browser import Tab
from support.island import Island, adapters_island
from support.overlay import AgentFactory
from support.tiny_models import build_tiny_model, make_adapter

MODEL = "tiny-llama"
A, B, WIDE = "alice/a", "alice/b", "alice/wide"  # WIDE: rank 8, the others rank 4
RUNNER = CliRunner()
QUESTIONS = ["Name a colour", "What is two plus two?", "Say hello", "Count to three"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    base = build_tiny_model(root / MODEL)
    make_adapter(base, root / "adapters" / A, seed=5)
    make_adapter(base, root / "adapters" / B, seed=9)
    make_adapter(base, root / "adapters" / WIDE, seed=11, rank=8)
    return {"base": base, "adapters": root / "adapters"}


@pytest.fixture
async def island(make_agent: AgentFactory, models: dict[str, Path]) -> Island:
    return await adapters_island(make_agent, models["base"], models["adapters"], [A, B, WIDE])


def http(isl: Island, key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=isl.url, headers={"Authorization": f"Bearer {key}"}, timeout=30
    )


async def upload_rows(isl: Island, key: str, path: Path, references: list[str]) -> str:
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": r}]}
        for q, r in zip(QUESTIONS, references, strict=True)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    async with openai.AsyncOpenAI(base_url=f"{isl.url}/v1", api_key=key, max_retries=0) as sdk:
        return (await sdk.files.create(file=path.open("rb"), purpose="fine-tune")).id


async def finished(client: httpx.AsyncClient, path: str) -> dict[str, Any]:
    """The run at ``path`` once it has ended (polled: bounded in count and time)."""
    for _ in range(1200):
        report = (await client.get(path)).json()
        if report["status"] not in ("queued", "running"):
            return report
        await asyncio.sleep(0.1)
    raise AssertionError(f"{path} still running: {report}")


async def test_a_searched_mixture_beats_each_adapter_and_is_called_like_a_model(
    island: Island, tmp_path: Path
) -> None:
    alice = island.key("alice")
    async with openai.AsyncOpenAI(base_url=f"{island.url}/v1", api_key=alice, max_retries=0) as sdk:
        references = []
        # The constructed task: half the rows answered as adapter A answers, half as B does, so
        # neither alone knows the whole set.
        for q, teacher in zip(QUESTIONS, (A, A, B, B), strict=True):
            reply = await sdk.chat.completions.create(
                model=teacher, messages=[{"role": "user", "content": q}], max_tokens=8,
                temperature=0,
            )  # fmt: skip
            references.append(reply.choices[0].message.content or "")
    file_id = await upload_rows(island, alice, tmp_path / "labelled.jsonl", references)
    async with http(island, alice) as client:
        body = {"model": MODEL, "adapters": [A, B], "file_id": file_id, "trials": 12}
        created = await client.post("/v1/mixture_searches", json=body | {"name": "alice/mix"})
        assert created.status_code == 200, created.text
        report = await finished(client, f"/v1/mixture_searches/{created.json()['id']}")
        assert report["status"] == "succeeded", report
        trials = report["trials"]
        assert 3 <= len(trials) <= 12 and report["rows"] == len(QUESTIONS)
        scores = [t["score"] for t in trials]
        curve = [t["best_score"] for t in trials]
        assert curve == [max(scores[: i + 1]) for i in range(len(scores))]  # the running best
        best = report["best"]
        assert best["score"] == max(scores) and best["figures"]["reference_tokens"] > 0
        alone = [t["score"] for t in trials if sorted(t["weights"].values()) == [0.0, 1.0]]
        assert len(alone) == 2 and best["score"] > max(alone)  # the search improved on them
        assert all(0 <= w <= HIGH for t in trials for w in t["weights"].values())
        assert report["mixture"] == "alice/mix"
        saved = (await client.get("/v1/mixtures/alice/mix")).json()
        assert saved["base_model"] == MODEL and saved["search"] == report["id"]
        assert {a["id"]: a["weight"] for a in saved["adapters"]} == {
            k: v for k, v in best["weights"].items() if v
        }
        listed = (await client.get("/v1/models")).json()["data"]
        card = next(m for m in listed if m["id"] == "alice/mix")
        assert (card["kind"], card["parent"]) == ("mixture", MODEL)
        # Called like a model: chat, and an evaluation that scores it as the search did, and
        # better than each adapter on its own.
        models = ["alice/mix", A, B]
        evaluation = await client.post(
            "/v1/evaluations", json={"file_id": file_id, "models": models, "max_tokens": 4}
        )
        assert evaluation.status_code == 200, evaluation.text
        scored = await finished(client, f"/v1/evaluations/{evaluation.json()['id']}")
        assert scored["status"] == "succeeded", scored
        figures = {r["model"]: r["mean_logprob"] for r in scored["results"]}
        assert figures["alice/mix"] == pytest.approx(best["score"], abs=1e-4)
        assert figures["alice/mix"] > max(figures[A], figures[B]), figures
    async with openai.AsyncOpenAI(base_url=f"{island.url}/v1", api_key=alice, max_retries=0) as sdk:
        reply = await sdk.chat.completions.create(
            model="alice/mix", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert reply.model == "alice/mix" and reply.usage is not None
        async with http(island, alice) as client:
            gone = await client.delete("/v1/mixtures/alice/mix")
            assert gone.status_code == 200 and gone.json()["deleted"] is True
        with pytest.raises(openai.NotFoundError):
            await sdk.chat.completions.create(
                model="alice/mix", messages=[{"role": "user", "content": "hi"}], max_tokens=4
            )


async def test_who_may_search_save_see_and_delete_mixtures(island: Island, tmp_path: Path) -> None:
    alice, bob = island.key("alice"), island.key("bob")
    island.accounts.create_project("lab", actor="test")
    island.accounts.add_member("lab", "alice", "owner", actor="test")
    island.accounts.add_member("lab", "bob", "viewer", actor="test")
    file_id = await upload_rows(island, alice, tmp_path / "rows.jsonl", ["a", "b", "c", "d"])
    mix = {"name": "alice/saved", "model": MODEL, "adapters": [{"id": A, "weight": 0.5}]}
    async with http(island, alice) as a, http(island, bob) as b:
        assert (await a.post("/v1/mixtures", json=mix)).status_code == 200
        taken = await a.post("/v1/mixtures", json=mix)
        assert (taken.status_code, taken.json()["error"]["param"]) == (409, "name")
        clash = await a.post("/v1/mixtures", json=mix | {"name": A})  # an adapter's name
        assert clash.status_code == 409
        twice = {**mix, "name": "alice/twice", "adapters": [{"id": A, "weight": 1}] * 2}
        assert (await a.post("/v1/mixtures", json=twice)).status_code == 422
        # Bob: not alice's adapters, not her mixture, not her search.
        search = {"model": MODEL, "adapters": [A, B], "file_id": file_id, "trials": 2}
        assert (await b.post("/v1/mixture_searches", json=search)).status_code == 404
        assert (await b.get("/v1/mixtures/alice/saved")).status_code == 404
        assert (await b.delete("/v1/mixtures/alice/saved")).status_code == 404
        assert (await b.get("/v1/mixtures")).json()["data"] == []
        made = await a.post("/v1/mixture_searches", json=search)
        assert made.status_code == 200, made.text
        search_id = made.json()["id"]
        assert (await b.get(f"/v1/mixture_searches/{search_id}")).status_code == 404
        assert (await b.post(f"/v1/mixture_searches/{search_id}/cancel")).status_code == 404
        # A viewer of lab may not save a mixture of its adapters.
        island.accounts.update_adapter(A, actor="test", owner=None, project="lab")
        viewer = island.key("bob", "lab")
        async with http(island, viewer) as v:
            refused = await v.post("/v1/mixtures", json=mix | {"name": "lab/mix"})
            assert refused.status_code == 403, refused.text  # listed, not usable
        # Bad requests: clear 4xx.
        for body, status in (
            ({**search, "adapters": [A]}, 422),
            ({**search, "adapters": [A, A]}, 422),
            ({**search, "trials": 0}, 422),
            ({**search, "merge_strategies": ["mean"]}, 422),
            ({**search, "model": "other-base"}, 400),
            ({**search, "file_id": "file-nope"}, 400),
            ({**search, "name": "bad name!"}, 400),
        ):
            reply = await a.post("/v1/mixture_searches", json=body)
            assert reply.status_code == status, (body, reply.text)
        report = await finished(a, f"/v1/mixture_searches/{search_id}")
        assert report["status"] == "succeeded" and len(report["trials"]) == 2
        assert report["mixture"] is None


async def test_a_merge_the_nodes_refuse_is_a_failed_trial(island: Island, tmp_path: Path) -> None:
    alice = island.key("alice")
    file_id = await upload_rows(island, alice, tmp_path / "rows.jsonl", ["a", "b", "c", "d"])
    # peft's linear merge needs equal ranks: A is rank 4, WIDE rank 8; svd takes any.
    body = {
        "model": MODEL,
        "adapters": [A, WIDE],
        "file_id": file_id,
        "merge_strategies": ["linear", "svd"],
        "trials": 4,
        "metric": "rouge_l",
        "max_tokens": 3,
    }
    async with http(island, alice) as client:
        made = await client.post("/v1/mixture_searches", json=body)
        assert made.status_code == 200, made.text
        report = await finished(client, f"/v1/mixture_searches/{made.json()['id']}")
    assert report["status"] == "succeeded", report
    first = report["trials"][0]
    assert first["merge_strategy"] == "linear" and first["score"] is None
    assert "rank" in first["error"] or "same" in first["error"], first["error"]
    assert report["best"]["merge_strategy"] == "svd"
    assert all(t["merge_strategy"] == "svd" for t in report["trials"][1:])


def run(search: WeightSearch, score: Any) -> list[Any]:
    asked = []
    while (c := search.next()) is not None:
        asked.append(c)
        search.tell(c, score(c))
    return asked


def test_the_search_converges_without_repeating_itself() -> None:
    target = (0.3, 1.1, 0.0)

    def score(c: Any) -> float:
        return -sum((w - t) ** 2 for w, t in zip(c.weights, target, strict=True))

    search = WeightSearch(3, ["linear", "ties"], trials=60)
    asked = run(search, score)
    assert len(asked) == len(set(asked)) <= 60
    assert all(any(c.weights) for c in asked)
    assert asked[:2] == [c for c in asked[:2] if c.weights == (0.3333,) * 3]  # strategies first
    assert search.best is not None
    assert all(abs(w - t) <= 1 / 16 for w, t in zip(search.best[0].weights, target, strict=True))
    assert search.best[1] == max(score(c) for c in asked)
    few = WeightSearch(3, ["linear"], trials=4)
    assert len(run(few, score)) == 4
    with pytest.raises(RuntimeError):
        again = WeightSearch(2, ["linear"], trials=3)
        again.next()
        again.next()  # the first one's score was never told


async def test_atoll_mixtures_searches_lists_and_deletes(island: Island, tmp_path: Path) -> None:
    env = {"ATOLL_GATEWAY_URL": island.url, "ATOLL_API_KEY": island.key("alice"), "COLUMNS": "200"}
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "yes"}]}
        for q in QUESTIONS
    ]
    data = tmp_path / "labelled.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    async def atoll(*args: str) -> Result:
        return await asyncio.to_thread(RUNNER.invoke, mixtures, list(args), env=env)

    ran = await atoll(
        "search", str(data), "-m", MODEL, "-a", A, "-a", B, "--trials", "3", "--name", "alice/m"
    )
    assert ran.exit_code == 0, ran.output
    assert "succeeded" in ran.stdout and A in ran.stdout and "saved as alice/m" in ran.output
    [saved] = json.loads((await atoll("list")).stdout)
    assert saved["id"] == "alice/m" and saved["base_model"] == MODEL
    shown = json.loads((await atoll("show", saved["search"])).stdout)
    assert len(shown["trials"]) == 3
    assert (await atoll("delete", "alice/m")).exit_code == 0
    assert json.loads((await atoll("list")).stdout) == []
    refused = await atoll("search", str(data), "-m", MODEL, "-a", A, "-a", "bob/not-yours")
    assert refused.exit_code == 1 and "does not exist or you do not have access" in refused.output


async def test_the_web_ui_searches_and_shows_the_curve(
    island: Island, browser: Browser, tmp_path: Path
) -> None:
    alice = island.key("alice")
    await upload_rows(island, alice, tmp_path / "labelled.jsonl", ["a", "b", "c", "d"])
    tab = await Tab.open(browser, island.url)
    page = tab.page
    await tab.login(alice)
    await page.click("nav a[data-tab=mixtures]")
    await expect(page.locator("#mix-base")).to_have_value(MODEL)
    await expect(page.locator("#mix-adapters input")).to_have_count(3)  # A, B and WIDE
    await page.check(f"#mix-adapters input[value='{A}']")
    await page.check(f"#mix-adapters input[value='{B}']")
    await page.fill("#mix-trials", "3")
    await page.fill("#mix-name", "alice/ui-mix")
    await page.click("#mix-form button")
    await expect(page.locator("#mix-status")).to_contain_text(
        "succeeded, 3 of at most 3 trials (mean_logprob), saved as alice/ui-mix", timeout=60_000
    )
    await expect(page.locator("#mix-trials-table tbody tr")).to_have_count(3)
    await expect(page.locator("#mix-curve")).to_have_attribute("data-points", "6")  # 2 series
    await expect(page.locator("#mix-table tbody tr")).to_have_count(1)
    await expect(page.locator("#mix-table tbody tr td").nth(4)).to_have_text("alice/ui-mix")
    await tab.close()
