"""Scoring through the gateway: ``echo`` with ``logprobs`` and token-id prompts on
/v1/completions, ``top_logprobs`` on chat (openai SDK), and lm-evaluation-harness's
``local-completions`` model running a loglikelihood task against a live gateway, its figures
equal to plain transformers on the same tokens."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from atoll.plugins.gateway.spending import prompt_bound, prompt_estimate
from atoll.plugins.inference.contract import GenerateRequest
from support.island import Island
from support.overlay import AgentFactory
from support.tiny_models import build_tiny_model

MODEL = "tiny-llama"
QUESTIONS = [
    {"question": "The sky is", "choices": ["blue", "green", "loud"], "answer": 0},
    {"question": "Two plus two is", "choices": ["four", "five"], "answer": 0},
    {"question": "Cats like to", "choices": ["sleep", "fly", "swim", "bark"], "answer": 1},
]
TASK = """task: atoll_tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / MODEL)


@pytest.fixture
async def island(make_agent: AgentFactory, base: Path) -> Island:
    isl = Island(make_agent)
    local = {"backend": "local", "local": {"model": str(base), "embeddings": False}}
    await make_agent("gpu1", roles=("inference",), plugins={"inference": local}, heartbeat=0.2)
    await isl.add_node("echo1")  # the echo backend: it scores nothing
    await isl.start_gateway()
    await isl.models_seen(MODEL)
    await isl.models_seen("echo")
    return isl


def model_logprobs(base: Path, ids: list[int]) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)


async def test_echo_logprobs_and_token_prompts_through_the_sdk(island: Island, base: Path) -> None:
    tok = AutoTokenizer.from_pretrained(base)
    ids = tok("The quick brown fox jumps", add_special_tokens=False)["input_ids"]
    want = model_logprobs(base, ids)
    async with openai.AsyncOpenAI(
        base_url=f"{island.url}/v1", api_key=island.key("alice"), max_retries=0
    ) as client:
        reply = await client.completions.create(
            model=MODEL, prompt=ids, max_tokens=1, temperature=0, logprobs=2, echo=True
        )
        [choice] = reply.choices
        lp = choice.logprobs
        assert lp is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
        assert len(lp.token_logprobs) == len(ids) + 1  # the prompt, then the generated token
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        for pos in range(1, len(ids)):
            assert lp.token_logprobs[pos] == pytest.approx(float(want[pos - 1, ids[pos]]), abs=1e-4)
            assert len(lp.top_logprobs[pos]) <= 2
            assert max(lp.top_logprobs[pos].values()) == pytest.approx(
                float(want[pos - 1].max()), abs=1e-4
            )
        prompt_text = tok.decode(ids)
        assert choice.text.startswith(prompt_text)
        assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
        assert reply.usage is not None and reply.usage.prompt_tokens == len(ids)

        # The same prompt as text: the node tokenizes it (with its BOS, if the model has one).
        text = await client.completions.create(
            model=MODEL, prompt="The quick brown fox jumps", max_tokens=2, echo=True
        )
        assert text.choices[0].text.startswith("The quick brown fox jumps")
        assert text.choices[0].logprobs is None

        # Streamed: the echoed prompt first, then the completion, as one text.
        chunks = [
            c.choices[0].text
            async for c in await client.completions.create(
                model=MODEL, prompt=ids, max_tokens=3, temperature=0, echo=True, stream=True
            )
            if c.choices
        ]
        assert "".join(chunks).startswith(prompt_text)

        chat = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=4,
            temperature=0,
            logprobs=True,
            top_logprobs=3,
        )
        content = chat.choices[0].logprobs and chat.choices[0].logprobs.content
        assert content
        for entry in content:
            assert len(entry.top_logprobs) == 3
            assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-5)


async def test_scoring_refusals_are_clear_and_leave_nodes_up(island: Island, base: Path) -> None:
    vocab = len(AutoTokenizer.from_pretrained(base))
    async with openai.AsyncOpenAI(
        base_url=f"{island.url}/v1", api_key=island.key("bob"), max_retries=0
    ) as client:
        with pytest.raises(openai.BadRequestError, match=f"token id {vocab} is not in"):
            await client.completions.create(model=MODEL, prompt=[5, vocab], max_tokens=1)
        with pytest.raises(openai.BadRequestError, match="echo backend takes no token ids"):
            await client.completions.create(model="echo", prompt="hi", echo=True, max_tokens=1)
        bad: list[Any] = [[[1, -1]], [[]], [1.5]]
        for prompt in bad:
            with pytest.raises(openai.UnprocessableEntityError):
                await client.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
        again = await client.completions.create(model=MODEL, prompt=[5, 6], max_tokens=1)
        assert again.choices[0].finish_reason in ("stop", "length")


async def test_lm_eval_harness_runs_a_loglikelihood_task_against_the_gateway(
    island: Island, base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "atoll_tiny_choice.yaml").write_text(TASK.format(data=data))
    monkeypatch.setenv("OPENAI_API_KEY", island.key("carol"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    args = {
        "base_url": f"{island.url}/v1/completions",
        "model": MODEL,
        "tokenizer_backend": "huggingface",
        "tokenizer": str(base),
        "tokenized_requests": True,
        "num_concurrent": 1,
        "max_retries": 1,
    }

    def evaluate() -> Any:
        # All of it off the event loop, importing too: the island's agents run on this loop.
        import lm_eval
        from lm_eval.tasks import TaskManager

        return lm_eval.simple_evaluate(
            model="local-completions",
            model_args=args,
            tasks=["atoll_tiny_choice"],
            task_manager=TaskManager(include_path=str(tasks)),
            num_fewshot=0,
            log_samples=True,
        )

    results = await asyncio.to_thread(evaluate)
    samples = results["samples"]["atoll_tiny_choice"]
    assert len(samples) == len(QUESTIONS)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    right = 0
    for sample in samples:
        doc = sample["doc"]
        scores = []
        for choice, (loglik, _greedy) in zip(doc["choices"], sample["filtered_resps"], strict=True):
            # lm-eval's own split: the context's tokens, then the rest of the whole text's.
            context = doc["question"]
            whole = tok(f"{context} {choice}", add_special_tokens=False)["input_ids"]
            n_ctx = len(tok(context, add_special_tokens=False)["input_ids"])
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([whole])).logits[0].float()
            lps = torch.log_softmax(logits, -1)
            want = sum(float(lps[p - 1, whole[p]]) for p in range(n_ctx, len(whole)))
            assert float(loglik) == pytest.approx(want, abs=1e-3)
            scores.append(want)
        right += int(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    acc = results["results"]["atoll_tiny_choice"]["acc,none"]
    assert math.isclose(acc, right / len(QUESTIONS))


def test_token_id_prompts_reserve_their_exact_length() -> None:
    # Budgets reserve prompt_bound before sending: a token-id prompt counts exactly its length
    # (not the 0 a prompt without text would otherwise count, which would let it overspend).
    request = GenerateRequest(prompt_token_ids=[7] * 50)
    assert prompt_bound(request, template_tokens=30) == 50
    assert prompt_estimate(request) == 50
