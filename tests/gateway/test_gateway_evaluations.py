"""Evaluations through the gateway: a held-out file run through a base model and an adapter on
the same node, the report's figures equal to those computed directly (greedy answers, metrics,
the references' log-probabilities under plain transformers/peft), who may see and start one, and
what a restarted gateway keeps."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from peft import PeftModel
from rouge_score import rouge_scorer
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner, Result

from atoll.plugins.gateway.eval_commands import evaluations
from atoll.plugins.gateway.eval_metrics import contains, exact_match, normalize, rouge_l
from atoll.plugins.gateway.evaluation_shapes import Evaluation
from atoll.plugins.gateway.evaluations import Evaluations
from atoll.plugins.gateway.kept_runs import STOPPED
from atoll.plugins.inference.local_backend import FALLBACK_TEMPLATE
from atoll.plugins.storage.contract.adapters import upload_adapter
from support.island import Island, adapters_island
from support.overlay import AgentFactory
from support.tiny_models import build_tiny_model, make_adapter

MODEL = "tiny-llama"
ADAPTER = "alice/ad"
RUNNER = CliRunner()
QUESTIONS = ["Name a colour", "What is two plus two?", "Say hello"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    base = build_tiny_model(root / MODEL)
    make_adapter(base, root / "adapters" / ADAPTER, seed=5)
    return {"base": base, "adapters": root / "adapters"}


@pytest.fixture
async def island(make_agent: AgentFactory, models: dict[str, Path]) -> Island:
    return await adapters_island(make_agent, models["base"], models["adapters"], [ADAPTER])


def http(isl: Island, key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=isl.url, headers={"Authorization": f"Bearer {key}"}, timeout=30
    )


def rows_file(path: Path, references: list[str]) -> Path:
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": r}]}
        for q, r in zip(QUESTIONS, references, strict=True)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def reference_mean_logprob(models: dict[str, Path], adapter: str | None, pairs: list[Any]) -> float:
    """Mean log-probability per token of each reference after its rendered prompt, as the
    node renders chat messages, under plain transformers (and peft for an adapter)."""
    tok = AutoTokenizer.from_pretrained(models["base"])
    model: Any = AutoModelForCausalLM.from_pretrained(models["base"]).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, models["adapters"] / adapter).eval()
    total, count = 0.0, 0
    for question, reference in pairs:
        template = None if tok.chat_template else FALLBACK_TEMPLATE
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": question}],
            add_generation_prompt=True,
            tokenize=True,
            chat_template=template,
        )
        tail = tok(reference, add_special_tokens=False)["input_ids"]
        ids = list(prompt) + tail
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
        lps = torch.log_softmax(logits, -1)
        total += sum(float(lps[p - 1, ids[p]]) for p in range(len(prompt), len(ids)))
        count += len(tail)
    return total / count


async def finished(client: httpx.AsyncClient, evaluation_id: str) -> dict[str, Any]:
    """The evaluation once it has ended (polled: bounded in count and time)."""
    for _ in range(600):
        report = (await client.get(f"/v1/evaluations/{evaluation_id}")).json()
        if report["status"] not in ("queued", "running"):
            return report
        await asyncio.sleep(0.1)
    raise AssertionError(f"evaluation {evaluation_id} still running: {report}")


async def test_an_evaluation_reports_what_direct_computation_gives(
    island: Island, models: dict[str, Path], tmp_path: Path
) -> None:
    alice = island.key("alice")
    async with openai.AsyncOpenAI(base_url=f"{island.url}/v1", api_key=alice, max_retries=0) as sdk:
        answers: dict[str, list[str]] = {}
        for model in (MODEL, ADAPTER):
            answers[model] = []
            for q in QUESTIONS:
                reply = await sdk.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": q}],
                    max_tokens=6,
                    temperature=0,
                )
                answers[model].append(reply.choices[0].message.content or "")
        # Row 0's reference is the base model's own answer: an exact match for it.
        references = [answers[MODEL][0], "four", "hello there"]
        uploaded = await sdk.files.create(
            file=rows_file(tmp_path / "held-out.jsonl", references).open("rb"),
            purpose="fine-tune",
        )
    gw = island.plugin.gateway.agent  # the adapter stored too: its record keeps the figures
    await upload_adapter(gw, "store", models["adapters"] / ADAPTER, ADAPTER, owner="alice")
    async with http(island, alice) as client:
        body = {"file_id": uploaded.id, "models": [MODEL, ADAPTER], "max_tokens": 6, "examples": 2}
        created = await client.post("/v1/evaluations", json=body)
        assert created.status_code == 200, created.text
        report = await finished(client, created.json()["id"])
        kept = (await client.get(f"/v1/adapters/{ADAPTER}")).json()["meta"]["evaluations"]
    assert kept == [
        {key: report[key] for key in ("id", "created_at", "file_id", "rows", "results")}
    ]
    async with http(island, island.key("bob")) as client:
        assert (await client.get(f"/v1/adapters/{ADAPTER}")).status_code == 404
    assert report["status"] == "succeeded", report
    assert report["rows"] == report["rows_done"] == len(QUESTIONS)
    by_model = {r["model"]: r for r in report["results"]}
    assert list(by_model) == [MODEL, ADAPTER]
    for model, figures in by_model.items():
        got = answers[model]
        n = len(QUESTIONS)
        assert figures["exact_match"] == pytest.approx(
            sum(exact_match(a, r) for a, r in zip(got, references, strict=True)) / n
        )
        assert figures["contains"] == pytest.approx(
            sum(contains(a, r) for a, r in zip(got, references, strict=True)) / n
        )
        assert figures["rouge_l"] == pytest.approx(
            sum(rouge_l(a, r) for a, r in zip(got, references, strict=True)) / n
        )
        adapter = ADAPTER if model == ADAPTER else None
        want = reference_mean_logprob(
            models, adapter, list(zip(QUESTIONS, references, strict=True))
        )
        assert figures["mean_logprob"] == pytest.approx(want, abs=1e-3)
    assert by_model[MODEL]["exact_match"] >= 1 / len(QUESTIONS)
    assert by_model[MODEL]["mean_logprob"] != pytest.approx(by_model[ADAPTER]["mean_logprob"])
    examples = report["examples"]
    assert len(examples) == 2
    assert examples[0]["reference"] == references[0]
    assert examples[0]["answers"] == {MODEL: answers[MODEL][0], ADAPTER: answers[ADAPTER][0]}
    assert examples[0]["messages"] == [{"role": "user", "content": QUESTIONS[0]}]


async def test_who_may_start_and_see_an_evaluation(island: Island, tmp_path: Path) -> None:
    alice, bob = island.key("alice"), island.key("bob")
    async with openai.AsyncOpenAI(base_url=f"{island.url}/v1", api_key=alice, max_retries=0) as sdk:
        good = await sdk.files.create(
            file=rows_file(tmp_path / "ok.jsonl", ["a", "b", "c"]).open("rb"), purpose="fine-tune"
        )
        no_reference = tmp_path / "no-reference.jsonl"
        no_reference.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n")
        try:
            bad = await sdk.files.create(file=no_reference.open("rb"), purpose="fine-tune")
        except openai.BadRequestError:
            bad = None  # storage itself refuses a row with no answer: fine too
    async with http(island, alice) as a, http(island, bob) as b:
        made = await a.post("/v1/evaluations", json={"file_id": good.id, "models": [MODEL]})
        assert made.status_code == 200
        evaluation_id = made.json()["id"]
        # Bob: not alice's file, not alice's adapter, not her evaluation.
        theirs = await b.post("/v1/evaluations", json={"file_id": good.id, "models": [MODEL]})
        assert (theirs.status_code, theirs.json()["error"]["param"]) == (404, "file_id")
        adapter = await b.post("/v1/evaluations", json={"file_id": good.id, "models": [ADAPTER]})
        assert adapter.status_code == 404
        assert (await b.get(f"/v1/evaluations/{evaluation_id}")).status_code == 404
        assert (await b.post(f"/v1/evaluations/{evaluation_id}/cancel")).status_code == 404
        assert (await b.get("/v1/evaluations")).json()["data"] == []
        listed = (await a.get("/v1/evaluations", params={"model": MODEL})).json()["data"]
        assert [e["id"] for e in listed] == [evaluation_id]
        assert (await a.get("/v1/evaluations", params={"model": ADAPTER})).json()["data"] == []
        # Bad requests: clear 4xx, nothing kept.
        for body, status in (
            ({"file_id": "ds-000000000000", "models": [MODEL]}, 404),
            ({"file_id": "file-nope", "models": [MODEL]}, 400),
            ({"file_id": good.id, "models": []}, 422),
            ({"file_id": good.id, "models": ["no-such-model"]}, 404),
            ({"file_id": good.id, "models": [MODEL], "max_tokens": 0}, 422),
        ):
            reply = await a.post("/v1/evaluations", json=body)
            assert reply.status_code == status, (body, reply.text)
        if bad is not None:
            reply = await a.post("/v1/evaluations", json={"file_id": bad.id, "models": [MODEL]})
            assert reply.status_code == 400 and "reference" in reply.json()["error"]["message"]
        assert (await a.get("/v1/evaluations", params={"limit": 0})).status_code == 400
        assert len((await a.get("/v1/evaluations")).json()["data"]) == 1
        await finished(a, evaluation_id)


async def test_a_restarted_gateway_keeps_reports_and_fails_the_interrupted(
    island: Island, tmp_path: Path
) -> None:
    root = tmp_path / "evaluations"
    store = Evaluations(island.plugin.gateway, root)
    for status in ("running", "succeeded"):
        record = Evaluation(
            id=f"eval-{status}",
            created_at=1,
            status=status,
            file_id="file-x",
            models=[MODEL],
            max_tokens=4,
            rows=1,
        )
        store.records[record.id] = (record, "alice", None)
        store.save(record)
    assert not list(root.glob("*.tmp"))
    again = Evaluations(island.plugin.gateway, root)
    running = again.records["eval-running"][0]
    assert running.status == "failed" and running.error is not None
    assert running.error.message == STOPPED
    assert again.records["eval-succeeded"][0].status == "succeeded"
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in root.glob("*.json"))
    await asyncio.sleep(0)


@pytest.mark.parametrize(
    ("answer", "reference"),
    [
        ("The cat sat on the mat", "a cat sat on a mat"),
        ("police killed the gunman", "the gunman was shot by police"),
        ("", "x"),
        ("one two three", "three two one"),
        ("Paris, France.", "paris"),
    ],
)
def test_metrics_agree_with_rouge_score_and_squad_normalisation(
    answer: str, reference: str
) -> None:
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    want = scorer.score(normalize(reference), normalize(answer))["rougeL"].fmeasure
    assert rouge_l(answer, reference) == pytest.approx(want)
    assert exact_match("The  Answer!", "answer") == 1.0
    assert contains("It is Paris, France.", "paris") == 1.0
    assert contains("Parisian", "paris") == 0.0


async def test_atoll_eval_runs_lists_and_shows(island: Island, tmp_path: Path) -> None:
    env = {"ATOLL_GATEWAY_URL": island.url, "ATOLL_API_KEY": island.key("alice"), "COLUMNS": "200"}
    data = rows_file(tmp_path / "held-out.jsonl", ["red", "four", "hello"])

    async def atoll(*args: str) -> Result:
        return await asyncio.to_thread(RUNNER.invoke, evaluations, list(args), env=env)

    ran = await atoll("run", str(data), "-m", MODEL, "-m", ADAPTER, "--max-tokens", "4")
    assert ran.exit_code == 0, ran.output
    assert "succeeded, 3 rows" in ran.stdout and MODEL in ran.stdout and ADAPTER in ran.stdout
    listed = json.loads((await atoll("list", "--model", ADAPTER)).stdout)
    [one] = listed
    shown = json.loads((await atoll("show", one["id"])).stdout)
    assert [r["model"] for r in shown["results"]] == [MODEL, ADAPTER]
    missing = await atoll("show", "eval-nope")
    assert missing.exit_code == 1 and "404" in missing.output
    refused = await atoll("run", str(data), "-m", "bob/not-yours")
    assert refused.exit_code == 1 and "does not exist or you do not have access" in refused.output
