"""Scoring prompts on the local backend: echoed prompt tokens with their logprobs and alternatives,
token-id prompts, in a batch beside ordinary requests — checked against plain transformers/peft
log-softmax on a tiny random model."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from atoll.agent.errors import InvalidRequest
from atoll.plugins.inference.contract import FinishEvent, GenerateRequest, TokenEvent
from atoll.plugins.inference.textstream import token_texts
from support.local_node import start_backend
from support.tiny_models import build_tiny_model, make_adapter


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    base = build_tiny_model(root / "tiny-llama")
    make_adapter(base, root / "adapters" / "alice/ad", seed=3)
    return {"base": base, "adapters": root / "adapters"}


def reference_logprobs(base: Path, adapter: Path | None, ids: list[int]) -> torch.Tensor:
    """log-softmax over the vocabulary at each position of ``ids``, from plain transformers."""
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


async def events_of(backend, **request) -> list[TokenEvent | FinishEvent]:
    return [e async for e in backend.generate(GenerateRequest.model_validate(request))]


async def test_echoed_prompt_logprobs_equal_the_models_in_a_mixed_batch(models, tmp_path) -> None:
    backend = await start_backend(models, tmp_path, max_batch=8)
    try:
        tok = AutoTokenizer.from_pretrained(models["base"])
        long_ids = tok("The quick brown fox jumps over the lazy dog")["input_ids"]
        short_ids = tok("Hello there")["input_ids"]
        greedy = {"temperature": 0, "max_new_tokens": 3}
        # Scored rows of different lengths (so left padding differs), with and without an
        # adapter, beside plain generations, all prefilled together.
        runs = await asyncio.gather(
            events_of(
                backend, prompt_token_ids=long_ids, echo=True, logprobs=True, top_logprobs=3,
                params=greedy,
            ),
            events_of(
                backend, prompt_token_ids=short_ids, adapter="alice/ad", echo=True,
                logprobs=True, top_logprobs=2, params=greedy,
            ),
            events_of(backend, prompt="Plain one", params=greedy),
            events_of(backend, prompt="Plain two", adapter="alice/ad", params=greedy),
        )  # fmt: skip
        for events, ids, adapter, k in (
            (runs[0], long_ids, None, 3),
            (runs[1], short_ids, models["adapters"] / "alice/ad", 2),
        ):
            echoed = [e for e in events if isinstance(e, TokenEvent) and e.echo]
            assert [e.token_id for e in echoed] == ids
            assert echoed[0].logprob is None and echoed[0].top is None
            want = reference_logprobs(models["base"], adapter, ids)
            for pos, event in enumerate(echoed[1:], start=1):
                assert event.logprob == pytest.approx(float(want[pos - 1, ids[pos]]), abs=1e-4)
                assert event.top is not None and len(event.top) == k
                values = [v for _, v in event.top]
                assert values == sorted(values, reverse=True)
                assert values[0] == pytest.approx(float(want[pos - 1].max()), abs=1e-4)
                assert event.logprob is not None and event.logprob <= values[0] + 1e-6
            text = "".join(e.text for e in echoed)
            assert text == tok.decode(ids, skip_special_tokens=True)
            generated = [e for e in events if isinstance(e, TokenEvent) and not e.echo]
            assert generated and all(e.top is not None and len(e.top) == k for e in generated)
            # Greedy: each generated token is the likeliest, so its logprob heads the list.
            for e in generated:
                assert e.top is not None and e.logprob == pytest.approx(e.top[0][1], abs=1e-5)
            finish = events[-1]
            assert isinstance(finish, FinishEvent)
            assert finish.usage.prompt_tokens == len(ids)
            assert finish.usage.completion_tokens == len(generated)
        for events in runs[2:]:
            assert not any(isinstance(e, TokenEvent) and (e.echo or e.top) for e in events)
    finally:
        await backend.stop()


async def test_echo_without_logprobs_and_bad_token_ids(models, tmp_path) -> None:
    backend = await start_backend(models, tmp_path)
    try:
        events = await events_of(
            backend, prompt="Once upon", echo=True, params={"temperature": 0, "max_new_tokens": 2}
        )
        echoed = [e for e in events if isinstance(e, TokenEvent) and e.echo]
        assert "".join(e.text for e in echoed) == "Once upon"
        assert all(e.logprob is None for e in echoed)
        vocab = len(AutoTokenizer.from_pretrained(models["base"]))
        with pytest.raises(InvalidRequest, match=f"token id {vocab} is not in this model's"):
            await events_of(backend, prompt_token_ids=[1, vocab])
        # The node still answers.
        assert isinstance((await events_of(backend, prompt_token_ids=[1, 2]))[-1], FinishEvent)
    finally:
        await backend.stop()


def test_token_texts_split_the_decoded_text_without_half_characters(models) -> None:
    tok = AutoTokenizer.from_pretrained(models["base"])
    text = "naïve café — 東京 ok"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = token_texts(tok, ids)
    assert len(pieces) == len(ids) and "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


async def test_a_continuation_is_scored_after_chat_messages(models, tmp_path) -> None:
    backend = await start_backend(models, tmp_path)
    try:
        tok = AutoTokenizer.from_pretrained(models["base"])
        messages = [{"role": "user", "content": "Name a colour"}]
        events = await events_of(
            backend, messages=messages, continuation="blue sky", adapter="alice/ad"
        )
        *rest, finish = events
        assert isinstance(finish, FinishEvent) and finish.usage.completion_tokens == 0
        tokens = [e for e in rest if isinstance(e, TokenEvent) and e.echo]
        assert tokens == rest
        # The node's own rendering of the messages, then the continuation's tokens.
        prompt = backend._encode(GenerateRequest.model_validate({"messages": messages}))
        tail = tok("blue sky", add_special_tokens=False)["input_ids"]
        assert [e.token_id for e in tokens] == tail
        assert "".join(e.text for e in tokens).strip() == "blue sky"
        ids = prompt + tail
        want = reference_logprobs(models["base"], models["adapters"] / "alice/ad", ids)
        for k, event in enumerate(tokens):
            pos = len(prompt) + k
            assert event.logprob == pytest.approx(float(want[pos - 1, ids[pos]]), abs=1e-4)
        assert finish.usage.prompt_tokens == len(ids)
    finally:
        await backend.stop()
