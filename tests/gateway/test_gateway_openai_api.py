"""The gateway's HTTP bodies: parsing and validation errors, translation to the inference contract
field by field, and the JSON / SSE built from a node's events, checked with the real openai SDK's
types and stream decoder and with lorax-client's own types."""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

import httpx2
import lorax.errors
import lorax.types
import openai
import pytest
from openai.types import Completion as SdkCompletion
from openai.types import CreateEmbeddingResponse as SdkEmbeddings
from openai.types import Model as SdkModel
from openai.types.chat import ChatCompletion as SdkChatCompletion
from openai.types.chat import ChatCompletionChunk as SdkChunk
from openai.types.chat import ChatCompletionMessageFunctionToolCall as SdkFunctionToolCall

from atoll.plugins.gateway.bodies import Event, parse_body, sse, usage_of
from atoll.plugins.gateway.errors import GatewayError
from atoll.plugins.gateway.lorax_api import (
    UNKNOWN_TOKEN_ID,
    LoraxRequest,
    LoraxStream,
    lorax_error,
    lorax_response,
    lorax_to_generate,
)
from atoll.plugins.gateway.openai_requests import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    chat_to_generate,
    completion_to_generate,
    embedding_to_embed,
)
from atoll.plugins.gateway.openai_responses import (
    Model,
    ModelList,
    chat_completion,
    completion,
    embedding_response,
)
from atoll.plugins.gateway.openai_streams import DONE, ChatStream, CompletionStream
from atoll.plugins.inference.contract import (
    EmbedResult,
    FinishEvent,
    FinishReason,
    SamplingParams,
    TokenEvent,
    Usage,
)

MSGS = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> ChatCompletionRequest:
    return parse_body(ChatCompletionRequest, {"model": "m", "messages": MSGS, **fields})


def refused(fn: Any, *args: Any) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        fn(*args)
    return info.value


def invalid(model: type, body: Any) -> GatewayError:
    return refused(parse_body, model, body)


def tok(text: str, token_id: int | None = None, logprob: float | None = None) -> TokenEvent:
    return TokenEvent(text=text, token_id=token_id, logprob=logprob)


def fin(reason: FinishReason = "stop", prompt: int = 3, done: int = 2, **kw: Any) -> FinishEvent:
    usage = Usage(prompt_tokens=prompt, completion_tokens=done)
    return FinishEvent(finish_reason=reason, usage=usage, model="base", **kw)


def sdk_stream(body: bytes, cast_to: type, strict: bool = True) -> list[Any]:
    """Decode SSE bytes the way the openai SDK decodes a live response (strict: validating each
    chunk against its type)."""
    client = openai.OpenAI(
        api_key="sk-test", base_url="http://127.0.0.1:9/v1", _strict_response_validation=strict
    )
    response = httpx2.Response(
        200,
        content=body,
        headers={"content-type": "text/event-stream"},
        request=httpx2.Request("POST", "http://127.0.0.1:9/v1/x"),
    )
    return list(openai.Stream(cast_to=cast_to, response=response, client=client))


def sse_data(body: bytes) -> list[str]:
    """The data of each event, checking the framing: every event is one ``data: `` line."""
    assert body.endswith(b"\n\n")
    events = body[:-2].split(b"\n\n")
    for event in events:
        assert event.startswith(b"data: ") and b"\n" not in event
    return [e[6:].decode() for e in events]


def lorax_client_lines(body: bytes) -> list[lorax.types.StreamResponse]:
    """What lorax-client 0.6.3's generate_stream does with each line."""
    out = []
    for line in body.split(b"\n"):
        payload = line.decode()
        if payload.startswith("data:"):
            data = json.loads(payload.lstrip("data:").rstrip("/n"))  # noqa: B005 as lorax-client
            out.append(lorax.types.StreamResponse(**data))
    return out


# --- parsing --------------------------------------------------------------------------------


def test_chat_body_ignores_unknown_fields_and_joins_text_parts() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "developer", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
        ],
        "parallel_tool_calls": True,
        "metadata": {"x": "y"},
        "store": False,
    }
    req = parse_body(ChatCompletionRequest, json.dumps(body).encode())
    assert [m.content for m in req.messages] == ["be brief", "a\nb"]
    assert not hasattr(req, "store")


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"temperature": "0.5"}, "temperature", "valid number"),
        ({"temperature": 2.5}, "temperature", "less than or equal to 2"),
        ({"stream": "true"}, "stream", "valid boolean"),
        ({"n": 9}, "n", "less than or equal to 8"),
        ({"stop": 3}, "stop", "a string or a list of strings"),
        ({"stop": [""]}, "stop.0", "at least 1 character"),
        ({"stop": [str(i) for i in range(9)]}, "stop", "at most 8 items"),
        ({"seed": -1}, "seed", "greater than or equal to 0"),
        ({"top_p": 0}, "top_p", "greater than 0"),
        ({"stream_options": {"include_usage": True}}, None, "only allowed when stream is true"),
        ({"top_logprobs": 2}, None, "top_logprobs needs logprobs"),
        ({"tool_choice": "auto"}, None, "tool_choice needs tools"),
        ({"tool_choice": {"type": "function"}}, "tool_choice", "'none', 'auto', 'required'"),
        ({"merge_strategy": "ties"}, None, "need adapters"),
        ({"adapters": [{"id": "a", "weight": 1}, {"id": "a", "weight": 2}]}, None, "once"),
        ({"adapters": [{"id": "a"}]}, "adapters.0.weight", "Field required"),
        (
            {"merge_strategy": "average", "adapters": [{"id": "a", "weight": 1}]},
            "merge_strategy",
            "'linear'",
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema is given"),
        (
            {"tools": [{"type": "function", "function": {"name": "a b"}}]},
            "tools.0.function.name",
            "pattern",
        ),
        ({"model": ""}, "model", "at least 1 character"),
    ],
)
def test_chat_field_errors_name_the_field(fields: dict, param: str | None, words: str) -> None:
    err = invalid(ChatCompletionRequest, {"model": "m", "messages": MSGS, **fields})
    assert err.status == 422 and err.type == "invalid_request_error"
    assert err.param == param
    if param is not None:
        assert err.message.startswith(f"{param}: ")
    assert words in err.message


@pytest.mark.parametrize(
    ("messages", "param", "words"),
    [
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
            "messages.0.content",
            "'image_url' are not supported",
        ),
        ([{"role": "tool", "content": "42"}], "messages.0", "needs tool_call_id"),
        ([{"role": "user"}], "messages.0", "a user message needs content"),
        ([{"role": "function", "content": "x"}], "messages.0.role", "'system'"),
        ([], "messages", "at least 1 item"),
    ],
)
def test_message_errors(messages: list, param: str, words: str) -> None:
    err = invalid(ChatCompletionRequest, {"model": "m", "messages": messages})
    assert (err.status, err.param) == (422, param)
    assert words in err.message


def test_body_level_errors() -> None:
    bad_json = invalid(ChatCompletionRequest, b'{"model": ')
    assert bad_json.status == 400 and "not valid JSON" in bad_json.message
    not_object = invalid(ChatCompletionRequest, b"[1, 2]")
    assert not_object.status == 400 and "JSON object" in not_object.message
    missing = invalid(ChatCompletionRequest, {"messages": MSGS})
    assert (missing.status, missing.param, missing.message) == (
        422,
        "model",
        "model: Field required",
    )
    two = invalid(ChatCompletionRequest, {})
    assert two.message.endswith("(and 1 more)")


def test_completion_takes_token_arrays_and_embedding_refuses_them() -> None:
    for prompt, expected in (([1, 2, 3], [[1, 2, 3]]), ([[1, 2], [7]], [[1, 2], [7]])):
        req = parse_body(CompletionRequest, {"model": "m", "prompt": prompt})
        gens = completion_to_generate(req, None, None)
        assert [(g.prompt, g.prompt_token_ids) for g in gens] == [(None, e) for e in expected]
    bad: list[Any] = [[[1, -2]], [["a"], [1]], [[]], [[1.5]]]
    for prompt in bad:
        err = invalid(CompletionRequest, {"model": "m", "prompt": prompt})
        assert err.status == 422 and (err.param or "").startswith("prompt"), prompt
    err = invalid(EmbeddingRequest, {"model": "e", "input": [[5, 6]]})
    assert err.param == "input" and "token arrays" in err.message
    err = invalid(EmbeddingRequest, {"model": "e", "input": ["ok", ""]})
    assert err.param == "input.1"
    err = invalid(CompletionRequest, {"model": "m", "prompt": ["p"] * 5, "n": 7})
    assert "at most 32" in err.message
    err = invalid(EmbeddingRequest, {"model": "e", "input": "x", "encoding_format": "int8"})
    assert err.param == "encoding_format"


def test_lorax_bodies_as_lorax_client_sends_them() -> None:
    merged = lorax.types.MergedAdapters(
        ids=["a/one", "b/two"],
        weights=[0.7, 0.3],
        merge_strategy="ties",
        density=0.5,
        majority_sign_method="frequency",
    )
    params = lorax.types.Parameters(
        merged_adapters=merged,
        do_sample=True,
        max_new_tokens=12,
        temperature=0.7,
        top_k=5,
        top_p=0.9,
        seed=4,
        stop=["\n"],
        repetition_penalty=1.1,
        details=True,
        ignore_eos_token=True,
        response_format={"type": "json_object", "schema": {"type": "object"}},
    )
    wire = lorax.types.Request(inputs="Why?", parameters=params, stream=True).model_dump(
        by_alias=True
    )
    req = parse_body(LoraxRequest, json.dumps(wire))
    assert req.stream is True and req.params.merged_adapters is not None
    plain = lorax.types.Request(inputs="Hi", parameters=lorax.types.Parameters(adapter_id="a/x"))
    assert parse_body(LoraxRequest, plain.model_dump(by_alias=True)).params.adapter_id == "a/x"
    assert parse_body(LoraxRequest, {"inputs": "Hi"}).params.details is None


@pytest.mark.parametrize(
    ("parameters", "param"),
    [
        ({"temperature": 0.0}, "parameters.temperature"),
        ({"top_p": 1.0}, "parameters.top_p"),
        ({"top_k": 0}, "parameters.top_k"),
        ({"max_new_tokens": 0}, "parameters.max_new_tokens"),
        ({"adapter_id": "a", "merged_adapters": {"ids": ["b"], "weights": [1.0]}}, "parameters"),
        ({"merged_adapters": {"ids": ["b", "c"], "weights": [1.0]}}, "parameters.merged_adapters"),
        ({"response_format": {"type": "regex", "schema": {}}}, "parameters.response_format.type"),
    ],
)
def test_lorax_field_errors(parameters: dict, param: str) -> None:
    err = invalid(LoraxRequest, {"inputs": "x", "parameters": parameters})
    assert (err.status, err.param) == (422, param)
    assert invalid(LoraxRequest, {"inputs": ""}).param == "inputs"


# --- translation ------------------------------------------------------------------------------


def test_chat_maps_every_sampling_field() -> None:
    req = chat(
        temperature=0.3,
        top_p=0.8,
        top_k=-1,
        repetition_penalty=1.2,
        stop="END",
        max_tokens=50,
        max_completion_tokens=40,
        seed=7,
        ignore_eos=True,
        n=3,
        presence_penalty=0,
        frequency_penalty=0.0,
        logit_bias={},
        user="u1",
    )
    gens = chat_to_generate(req, "base-1", "alice/soap")
    assert len(gens) == 3
    p = gens[0].params
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (0.3, 0.8, 0, 1.2)
    assert (p.stop, p.max_new_tokens, p.ignore_eos, p.do_sample) == (["END"], 40, True, None)
    assert [g.params.seed for g in gens] == [7, 8, 9]  # n seeded choices must differ
    assert all(g.model == "base-1" and g.adapter == "alice/soap" for g in gens)
    assert gens[0].messages is not None and gens[0].messages[0].content == "hi"
    assert chat_to_generate(chat(max_tokens=50), None, None)[0].params.max_new_tokens == 50


def test_chat_defaults_are_openai_s() -> None:
    [gen] = chat_to_generate(chat(), None, None)
    defaults = SamplingParams()
    assert gen.params == defaults and gen.params.temperature == 1.0 and not gen.params.greedy
    assert (gen.model, gen.adapter, gen.mixture, gen.logprobs) == (None, None, None, False)
    assert (gen.tools, gen.tool_choice, gen.response_format) == (None, None, None)
    assert chat_to_generate(chat(temperature=0), None, None)[0].params.greedy


def test_chat_passes_tools_formats_logprobs_and_messages() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    history = [
        {"role": "developer", "content": "sys"},
        {"role": "user", "content": "q", "name": "bob"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]},
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
    ]
    schema = {"name": "out", "schema": {"type": "object"}, "strict": True}
    req = parse_body(
        ChatCompletionRequest,
        {
            "model": "m",
            "messages": history,
            "tools": tools,
            "tool_choice": {"type": "function", "function": {"name": "f"}},
            "response_format": {"type": "json_schema", "json_schema": schema},
            "logprobs": True,
            "top_logprobs": 3,
        },
    )
    [gen] = chat_to_generate(req, "b", None)
    assert gen.top_logprobs == 3
    assert gen.tools == tools
    assert gen.tool_choice == {"type": "function", "function": {"name": "f"}}
    assert gen.response_format == {"type": "json_schema", "json_schema": schema}
    assert gen.logprobs is True
    assert gen.messages is not None
    roles = [(m.role, m.content, m.name, m.tool_call_id) for m in gen.messages]
    assert roles == [
        ("system", "sys", None, None),
        ("user", "q", "bob", None),
        ("assistant", "", None, None),
        ("tool", "42", None, "c1"),
    ]
    assert gen.messages[2].tool_calls == [{"id": "c1", "type": "function"}]
    [text] = chat_to_generate(chat(response_format={"type": "text"}), None, None)
    assert text.response_format is None
    [obj] = chat_to_generate(chat(response_format={"type": "json_object"}), None, None)
    assert obj.response_format == {"type": "json_object"}


def test_chat_mixture() -> None:
    req = chat(
        adapters=[{"id": "a/x", "weight": 0.6}, {"id": "b/y", "weight": 0.4}],
        merge_strategy="dare_ties",
        density=0.3,
    )
    [gen] = chat_to_generate(req, "base", None)
    assert gen.mixture is not None and gen.adapter is None
    assert [(a.id, a.weight) for a in gen.mixture.adapters] == [("a/x", 0.6), ("b/y", 0.4)]
    assert (gen.mixture.merge_strategy, gen.mixture.density) == ("dare_ties", 0.3)
    [plain] = chat_to_generate(chat(adapters=[{"id": "a/x", "weight": 1.0}]), "base", None)
    assert plain.mixture is not None
    assert (plain.mixture.merge_strategy, plain.mixture.density) == ("linear", 1.0)
    err = refused(chat_to_generate, req, "base", "a/x")
    assert (err.status, err.param) == (400, "adapters")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"presence_penalty": -1.0}, "presence_penalty"),
        ({"logit_bias": {"42": 5.0}}, "logit_bias"),
    ],
)
def test_chat_unsupported_options_are_refused(fields: dict, param: str) -> None:
    err = refused(chat_to_generate, chat(**fields), None, None)
    assert (err.status, err.param, err.code) == (400, param, "unsupported_parameter")
    assert err.message.startswith(f"{param} is not supported: ")


def test_completion_translation() -> None:
    req = parse_body(
        CompletionRequest,
        {
            "model": "m",
            "prompt": ["p0", "p1"],
            "n": 2,
            "seed": 10,
            "stop": ["x", "y"],
            "temperature": 0.0,
            "logprobs": 0,
            "echo": False,
            "best_of": 1,
        },
    )
    gens = completion_to_generate(req, "b", None)
    assert [g.prompt for g in gens] == ["p0", "p0", "p1", "p1"]  # n per prompt, in order
    assert [g.params.seed for g in gens] == [10, 11, 10, 11]
    assert all(g.params.greedy and g.logprobs and g.params.stop == ["x", "y"] for g in gens)
    assert gens[0].params.max_new_tokens == 16  # OpenAI's /v1/completions default
    [one] = completion_to_generate(
        parse_body(CompletionRequest, {"model": "m", "prompt": "solo", "max_tokens": 99}),
        None,
        "ad",
    )
    assert (one.prompt, one.params.max_new_tokens, one.adapter, one.logprobs) == (
        "solo",
        99,
        "ad",
        False,
    )
    [scored] = completion_to_generate(
        parse_body(CompletionRequest, {"model": "m", "prompt": "p", "echo": True, "logprobs": 2}),
        None,
        None,
    )
    assert (scored.echo, scored.logprobs, scored.top_logprobs) == (True, True, 2)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"suffix": "s"}, "suffix"),
        ({"best_of": 2}, "best_of"),
        ({"frequency_penalty": 1}, "frequency_penalty"),
    ]
    for fields, param in cases:
        req = parse_body(CompletionRequest, {"model": "m", "prompt": "p", **fields})
        assert refused(completion_to_generate, req, None, None).param == param


def test_lorax_sampling_semantics() -> None:
    def params(**p: Any) -> SamplingParams:
        req = parse_body(LoraxRequest, {"inputs": "x", "parameters": p})
        return lorax_to_generate(req, "b", None).params

    greedy = params(do_sample=False)
    assert greedy.greedy and greedy.do_sample is False
    assert params(temperature=1.0).greedy  # as TGI: 1.0 warps nothing
    warm = params(temperature=0.7)
    assert (warm.do_sample, warm.temperature) == (True, 0.7)
    sampled = params(do_sample=True)
    assert (sampled.do_sample, sampled.temperature, sampled.top_p, sampled.top_k) == (
        True,
        1.0,
        1.0,
        0,
    )
    assert params(top_k=4).do_sample and params(top_k=4).top_k == 4
    assert params(top_p=0.5).do_sample and params(top_p=0.5).top_p == 0.5
    full = params(
        max_new_tokens=7, stop=["\n"], seed=3, repetition_penalty=1.3, ignore_eos_token=True
    )
    assert (
        full.max_new_tokens,
        full.stop,
        full.seed,
        full.repetition_penalty,
        full.ignore_eos,
    ) == (7, ["\n"], 3, 1.3, True)
    assert params().max_new_tokens == SamplingParams().max_new_tokens


def test_lorax_translation_of_adapters_formats_and_details() -> None:
    req = parse_body(
        LoraxRequest,
        {
            "inputs": "Q",
            "parameters": {
                "merged_adapters": {
                    "ids": ["a", "b"],
                    "weights": [2.0, -1.0],
                    "merge_strategy": "ties",
                    "density": 0.4,
                    "majority_sign_method": "frequency",
                },
                "details": True,
                "response_format": {"type": "json_object", "schema": {"type": "string"}},
            },
        },
    )
    gen = lorax_to_generate(req, "base", None)
    assert gen.prompt == "Q" and gen.model == "base" and gen.logprobs is True
    assert gen.mixture is not None
    assert [(a.id, a.weight) for a in gen.mixture.adapters] == [("a", 2.0), ("b", -1.0)]
    assert (gen.mixture.merge_strategy, gen.mixture.density, gen.mixture.majority_sign_method) == (
        "ties",
        0.4,
        "frequency",
    )
    assert gen.response_format == {"type": "json_object", "schema": {"type": "string"}}
    assert refused(lorax_to_generate, req, "base", "a").status == 400
    single = lorax_to_generate(parse_body(LoraxRequest, {"inputs": "Q"}), "base", "acme/x")
    assert (single.adapter, single.mixture, single.logprobs) == ("acme/x", None, False)


@pytest.mark.parametrize(
    ("parameters", "param"),
    [
        ({"adapter_source": "hub"}, "adapter_source"),
        ({"api_token": "hf_x"}, "api_token"),
        ({"truncate": 10}, "truncate"),
        ({"typical_p": 0.5}, "typical_p"),
        ({"watermark": True}, "watermark"),
        ({"best_of": 2, "do_sample": True}, "best_of"),
        ({"decoder_input_details": True}, "decoder_input_details"),
        ({"return_k_alternatives": 2}, "return_k_alternatives"),
    ],
)
def test_lorax_unsupported_parameters(parameters: dict, param: str) -> None:
    req = parse_body(LoraxRequest, {"inputs": "x", "parameters": parameters})
    err = refused(lorax_to_generate, req, None, None)
    assert (err.status, err.param, err.code) == (400, param, "unsupported_parameter")
    quiet = {"inputs": "x", "parameters": {"watermark": False, "best_of": 1}}
    assert lorax_to_generate(parse_body(LoraxRequest, quiet), None, None).prompt == "x"


def test_embedding_translation() -> None:
    req = parse_body(EmbeddingRequest, {"model": "e", "input": "one text", "user": "u"})
    embed = embedding_to_embed(req, "minilm")
    assert (embed.input, embed.model) == (["one text"], "minilm")
    many = parse_body(EmbeddingRequest, {"model": "e", "input": ["a", "b"]})
    assert embedding_to_embed(many, None).input == ["a", "b"]
    dims = parse_body(EmbeddingRequest, {"model": "e", "input": "x", "dimensions": 64})
    assert refused(embedding_to_embed, dims, None).param == "dimensions"


# --- responses --------------------------------------------------------------------------------


def test_usage_counts_each_prompt_once() -> None:
    finishes = [
        (0, fin(prompt=5, done=2)),
        (1, fin(prompt=5, done=3)),
        (2, fin(prompt=7, done=1)),
        (3, fin(prompt=7, done=4)),
    ]
    assert usage_of(finishes, per_prompt=2) == Usage(prompt_tokens=12, completion_tokens=10)
    assert usage_of(finishes[:2], per_prompt=2).total_tokens == 10
    assert usage_of([], per_prompt=1) == Usage()


def test_sse_framing() -> None:
    assert sse({"a": "x\ny", "b": "é"}) == 'data: {"a":"x\\ny","b":"é"}\n\n'.encode()
    assert sse(Model(id="m", created=1, owned_by="o", kind="chat")).startswith(b'data: {"id":"m"')
    assert DONE == b"data: [DONE]\n\n"


def test_chat_completion_parses_with_the_sdk() -> None:
    choices: list[list[Event]] = [
        [tok("Hel", 1, -0.5), tok("lo", 2, -0.25), fin("stop", prompt=4, done=2)],
        [tok("Hi", 3, -1.0), tok("", 4, None), fin("length", prompt=4, done=2)],
    ]
    body = chat_completion("r1", "alice/soap", choices, logprobs=True, created=123)
    sdk = SdkChatCompletion.model_validate_json(body.model_dump_json())
    assert (sdk.id, sdk.object, sdk.created, sdk.model) == (
        "chatcmpl-r1",
        "chat.completion",
        123,
        "alice/soap",
    )
    assert [c.message.content for c in sdk.choices] == ["Hello", "Hi"]
    assert [c.finish_reason for c in sdk.choices] == ["stop", "length"]
    assert sdk.choices[0].message.role == "assistant"
    assert sdk.usage is not None
    assert (sdk.usage.prompt_tokens, sdk.usage.completion_tokens, sdk.usage.total_tokens) == (
        4,
        4,
        8,
    )
    logprobs = sdk.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert [(t.token, t.logprob, t.bytes) for t in logprobs.content] == [
        ("Hel", -0.5, list(b"Hel")),
        ("lo", -0.25, list(b"lo")),
    ]
    plain = chat_completion("r2", "m", [[tok("x"), fin()]])
    assert (
        SdkChatCompletion.model_validate_json(plain.model_dump_json()).choices[0].logprobs is None
    )


def test_chat_completion_with_tool_calls() -> None:
    calls = [
        {"id": None, "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}},
        {"id": "call_x", "type": "function", "function": {"name": "g", "arguments": {"b": 2}}},
    ]
    body = chat_completion("r3", "m", [[fin("tool_calls", tool_calls=calls)]])
    sdk = SdkChatCompletion.model_validate_json(body.model_dump_json())
    message = sdk.choices[0].message
    assert sdk.choices[0].finish_reason == "tool_calls" and message.content is None
    assert message.tool_calls is not None
    functions = [c for c in message.tool_calls if isinstance(c, SdkFunctionToolCall)]
    assert [(c.id, c.function.name, c.function.arguments) for c in functions] == [
        ("call_r3_0_0", "f", '{"a": 1}'),
        ("call_x", "g", '{"b": 2}'),
    ]


def test_aborted_generation_is_an_error() -> None:
    err = refused(chat_completion, "r", "m", [[tok("x"), fin("abort")]])
    assert err.status == 503
    stream = ChatStream("r", "m", 1)
    stream.chunks(0, tok("x"))
    assert refused(stream.chunks, 0, fin("abort")).status == 503


def test_chat_stream_with_usage_parses_with_the_sdk() -> None:
    stream = ChatStream("r9", "m", 2, include_usage=True, logprobs=True, created=5)
    body = b""
    events: list[tuple[int, Event]] = [
        (0, tok("A", 1, -0.1)),
        (1, tok("B", 2, None)),
        (0, tok("", 3, None)),
        (0, tok("a", 4, -0.2)),
        (1, fin("length", prompt=6, done=1)),
        (0, fin(prompt=6, done=3)),
    ]
    for index, event in events:
        body += stream.chunks(index, event)
    body += stream.finish()
    assert body.endswith(DONE)
    chunks = sdk_stream(body, SdkChunk)  # strict: every chunk validated by the SDK
    for data in sse_data(body)[:-1]:
        SdkChunk.model_validate_json(data)
    assert all(c.id == "chatcmpl-r9" and c.created == 5 and c.model == "m" for c in chunks)
    *deltas, last = chunks
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (
        6,
        4,
        10,
    )
    assert all(c.usage is None for c in deltas)
    for index, text, reason in [(0, "Aa", "stop"), (1, "B", "length")]:
        mine = [c.choices[0] for c in deltas if c.choices[0].index == index]
        assert mine[0].delta.role == "assistant" and mine[0].delta.content == ""
        assert all(c.delta.role is None for c in mine[1:])
        assert "".join(c.delta.content or "" for c in mine) == text
        assert [c.finish_reason for c in mine][-1] == reason
        assert all(c.finish_reason is None for c in mine[:-1])
    lps = [c.choices[0].logprobs for c in deltas if c.choices[0].logprobs]
    assert [lp.content[0].logprob for lp in lps if lp.content] == [-0.1, -0.2]
    assert len(deltas) == 7  # 2 role chunks, 3 text chunks (the empty token says nothing), 2 ends
    assert stream.usage == Usage(prompt_tokens=6, completion_tokens=4)


def test_chat_stream_without_usage_and_with_tool_calls() -> None:
    stream = ChatStream("t", "m", 1)
    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    body = stream.chunks(0, fin("tool_calls", tool_calls=calls))
    with pytest.raises(ValueError):
        stream.chunks(0, tok("late"))
    body += stream.finish()
    chunks = sdk_stream(body, SdkChunk)
    assert all(c.usage is None for c in chunks) and len(chunks) == 3
    [call] = chunks[1].choices[0].delta.tool_calls or []
    assert (call.index, call.id, call.type, call.function and call.function.name) == (
        0,
        "c1",
        "function",
        "f",
    )
    assert chunks[2].choices[0].finish_reason == "tool_calls"
    with pytest.raises(ValueError):
        ChatStream("u", "m", 2).finish()  # not every choice has finished


def test_mid_stream_error_reaches_the_sdk() -> None:
    stream = ChatStream("e", "m", 1, include_usage=True)
    body = stream.chunks(0, tok("part"))
    body += stream.error(GatewayError(504, "the node did not answer in time"))
    assert not body.endswith(DONE)
    error = json.loads(sse_data(body)[-1])["error"]
    assert error == {
        "message": "the node did not answer in time",
        "type": "timeout",
        "param": None,
        "code": None,
    }
    with pytest.raises(openai.APIError, match="did not answer in time"):
        sdk_stream(body, SdkChunk)


def test_completion_and_its_stream_parse_with_the_sdk() -> None:
    choices: list[list[Event]] = [
        [tok("a", 1, -1.0), tok("bc", 2, -2.0), fin(prompt=2, done=2)],
        [tok("z"), fin("length", prompt=2, done=1)],
        [tok("q"), fin("tool_calls", prompt=9, done=1)],
    ]
    body = completion("c1", "m", choices, per_prompt=2, logprobs=True, created=7)
    sdk = SdkCompletion.model_validate_json(body.model_dump_json())
    assert (sdk.id, sdk.object) == ("cmpl-c1", "text_completion")
    assert [(c.index, c.text, c.finish_reason) for c in sdk.choices] == [
        (0, "abc", "stop"),
        (1, "z", "length"),
        (2, "q", "stop"),
    ]
    lp = sdk.choices[0].logprobs
    assert lp is not None and (lp.tokens, lp.token_logprobs, lp.text_offset) == (
        ["a", "bc"],
        [-1.0, -2.0],
        [0, 1],
    )
    assert sdk.choices[1].logprobs is None
    assert sdk.usage is not None and (sdk.usage.prompt_tokens, sdk.usage.completion_tokens) == (
        11,
        4,
    )

    stream = CompletionStream("c2", "m", 2, per_prompt=1, include_usage=True, logprobs=True)
    events: list[tuple[int, Event]] = [
        (0, tok("x", 0, -0.5)),
        (1, tok("y")),
        (0, tok("yz", 1, -0.7)),
        (0, fin()),
        (1, fin("length")),
    ]
    raw = b"".join(stream.chunks(i, e) for i, e in events)
    raw += stream.finish()
    chunks = sdk_stream(
        raw, SdkCompletion, strict=False
    )  # OpenAI's own chunks carry finish_reason null
    *deltas, last = chunks
    assert last.choices == [] and last.usage is not None and last.usage.prompt_tokens == 6
    ends = [c for c in deltas if c.choices[0].finish_reason]
    for data in sse_data(raw)[:-1]:
        if '"finish_reason":null' not in data:
            SdkCompletion.model_validate_json(data)
    assert [(c.choices[0].index, c.choices[0].finish_reason) for c in ends] == [
        (0, "stop"),
        (1, "length"),
    ]
    assert "".join(c.choices[0].text for c in deltas if c.choices[0].index == 0) == "xyz"
    offsets = [c.choices[0].logprobs.text_offset for c in deltas if c.choices[0].logprobs]
    assert offsets == [[0], [1]]


def test_embeddings_float_and_base64() -> None:
    result = EmbedResult(
        model="e", embeddings=[[0.5, -0.25], [1.0, 0.0]], usage=Usage(prompt_tokens=3)
    )
    floats = SdkEmbeddings.model_validate_json(embedding_response(result, "e").model_dump_json())
    assert [d.embedding for d in floats.data] == [[0.5, -0.25], [1.0, 0.0]]
    assert [d.index for d in floats.data] == [0, 1]
    assert (floats.usage.prompt_tokens, floats.usage.total_tokens, floats.model) == (3, 3, "e")
    packed = json.loads(embedding_response(result, "e", "base64").model_dump_json())
    decoded = [list(struct.unpack("<2f", base64.b64decode(d["embedding"]))) for d in packed["data"]]
    assert decoded == [[0.5, -0.25], [1.0, 0.0]]


def test_models_parse_with_the_sdk() -> None:
    listing = ModelList(
        data=[
            Model(id="SmolLM2", created=1, owned_by="atoll", kind="chat"),
            Model(
                id="alice/soap",
                created=2,
                owned_by="alice",
                kind="adapter",
                parent="SmolLM2",
                root="SmolLM2",
            ),
        ]
    )
    data = json.loads(listing.model_dump_json())
    assert data["object"] == "list"
    models = [SdkModel.model_validate(m) for m in data["data"]]
    assert [(m.id, m.object, m.owned_by) for m in models] == [
        ("SmolLM2", "model", "atoll"),
        ("alice/soap", "model", "alice"),
    ]
    assert data["data"][1]["parent"] == "SmolLM2" and data["data"][0]["parent"] is None


def test_lorax_response_parses_with_lorax_types() -> None:
    req = parse_body(
        LoraxRequest,
        {
            "inputs": "Q: ",
            "parameters": {
                "details": True,
                "temperature": 0.5,
                "seed": 9,
                "return_full_text": True,
            },
        },
    )
    reply = lorax_response(
        req, [tok("A", 5, -0.5), tok("!", None, None), fin("length", prompt=3, done=2)]
    )
    payload = json.loads("[" + reply.model_dump_json() + "]")  # the "/" route's shape
    parsed = lorax.types.Response(**payload[0])
    assert parsed.generated_text == "Q: A!"
    assert parsed.details is not None
    details = parsed.details
    assert (
        details.finish_reason,
        details.prompt_tokens,
        details.generated_tokens,
        details.seed,
    ) == (lorax.types.FinishReason.Length, 3, 2, 9)
    assert [(t.id, t.text, t.logprob, t.special) for t in details.tokens] == [
        (5, "A", -0.5, False),
        (UNKNOWN_TOKEN_ID, "!", 0.0, False),
    ]
    assert details.prefill == []
    bare = lorax_response(parse_body(LoraxRequest, {"inputs": "Q"}), [tok("x"), fin()])
    parsed = lorax.types.Response(**json.loads(bare.model_dump_json()))
    assert (parsed.generated_text, parsed.details) == ("x", None)
    greedy = parse_body(LoraxRequest, {"inputs": "Q", "parameters": {"details": True, "seed": 9}})
    details = lorax_response(greedy, [fin()]).details
    assert details is not None and (details.seed, details.finish_reason) == (None, "eos_token")


def test_lorax_stream_parses_like_lorax_client() -> None:
    req = parse_body(LoraxRequest, {"inputs": "x", "parameters": {"details": True}, "stream": True})
    stream = LoraxStream(req)
    events: list[Event] = [tok("He", 1, -0.1), tok("y", 2, -0.2), fin(prompt=1, done=2)]
    body = b"".join(stream.chunks(e) for e in events)
    assert b"[DONE]" not in body
    responses = lorax_client_lines(body)
    assert [r.token.text for r in responses] == ["He", "y", ""]
    assert all(r.generated_text is None and r.details is None for r in responses[:-1])
    last = responses[-1]
    assert last.token.special and last.generated_text == "Hey"
    assert last.details is not None
    assert (
        last.details.finish_reason,
        last.details.prompt_tokens,
        last.details.generated_tokens,
    ) == (lorax.types.FinishReason.EndOfSequenceToken, 1, 2)
    assert "".join(r.token.text for r in responses if not r.token.special) == "Hey"
    with pytest.raises(ValueError):
        stream.chunks(tok("late"))
    quiet = LoraxStream(parse_body(LoraxRequest, {"inputs": "x"}))
    [only] = lorax_client_lines(quiet.chunks(fin()))
    assert only.details is None and only.generated_text == ""


def test_lorax_errors_map_to_lorax_client_exceptions() -> None:
    stream = LoraxStream(parse_body(LoraxRequest, {"inputs": "x"}))
    data = json.loads(sse_data(stream.error(GatewayError(503, "node lost")))[0])
    assert isinstance(lorax.errors.parse_error(200, data), lorax.errors.GenerationError)
    cases = [
        (GatewayError(422, "bad field"), lorax.errors.ValidationError),
        (GatewayError(429, "slow down", retry_after=2), lorax.errors.RateLimitExceededError),
        (GatewayError(429, "busy", code="overloaded"), lorax.errors.OverloadedError),
        (GatewayError(404, "no such adapter"), lorax.errors.NotFoundError),
        (GatewayError(504, "late"), lorax.errors.ShardTimeoutError),
    ]
    for exc, expected in cases:
        body = lorax_error(exc)
        raised = lorax.errors.parse_error(exc.status, body)
        assert isinstance(raised, expected) and exc.message in str(raised)
