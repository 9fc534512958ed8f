"""Datasets: the pure parsing, conversion and de-duplication functions on real small files
(unicode, CRLF, BOM, blank lines, a 10k-row file), then the storage plugin's dataset service
between real agents over a real broker: round trips in every form, versions that never
overwrite, refusals that name the line and keep nothing, delete."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from pathlib import Path

import pytest

from atoll.agent.errors import Forbidden, InvalidRequest
from atoll.agent.node import Agent
from atoll.agent.runtime import AgentRuntime
from atoll.agent.transfer import READ_SIZE, TransferFailed
from atoll.plugins.storage.batch_files import prepare_batch
from atoll.plugins.storage.contract.datasets import (
    DATASET_PUT,
    DatasetInvalid,
    DatasetNotFound,
    delete_dataset,
    describe_dataset,
    fetch_dataset,
    list_datasets,
    upload_dataset,
)
from atoll.plugins.storage.datasets import (
    MAX_ERRORS,
    DatasetLimits,
    convert_line,
    count_tokens,
    deduplicate,
    parse_rows,
    prepare,
)
from atoll.plugins.storage.plugin import StoragePlugin
from atoll.plugins.storage.results import prepare_results
from atoll.protocol.frames import Frame, FrameType
from support.island import start_storage
from support.overlay import eventually, intercept, refused_put


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def jsonl(*rows: object) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def chat(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


def invalid(data: bytes, name: str, **kw) -> DatasetInvalid:
    with pytest.raises(DatasetInvalid) as info:
        prepare(data, name, **kw)
    return info.value


# --- formats ------------------------------------------------------------------------------------


def test_each_format_becomes_canonical_rows(tmp_path) -> None:
    alpaca = write(
        tmp_path,
        "alpaca.jsonl",
        jsonl(
            {"instruction": "Translate", "input": "chat", "output": "cat", "category": "x"},
            {"instruction": "Say hi", "input": "", "output": "hi"},
            {"instruction": "Be brief", "output": "ok", "system": "You are terse."},
        ),
    )
    found = prepare(alpaca.read_bytes(), alpaca.name)
    assert (found.format, found.kind) == ("alpaca", "sft")
    assert [r.data for r in found.rows] == [
        chat(("user", "Translate\nchat"), ("assistant", "cat")),
        chat(("user", "Say hi"), ("assistant", "hi")),
        chat(("system", "You are terse."), ("user", "Be brief"), ("assistant", "ok")),
    ]
    assert found.canonical.decode().splitlines()[1] == json.dumps(found.rows[1].data)

    sharegpt = write(
        tmp_path,
        "share.json",  # a JSON array, as ShareGPT dumps usually are
        json.dumps(
            [
                {
                    "conversations": [
                        {"from": "system", "value": "Be kind."},
                        {"from": "human", "value": "Hello"},
                        {"from": "gpt", "value": "Hi!"},
                        {"from": "human", "value": "Bye"},
                        {"from": "gpt", "value": "Bye!"},
                    ]
                }
            ],
            indent=2,
        ),
    )
    found = prepare(sharegpt.read_bytes(), sharegpt.name)
    assert found.format == "sharegpt" and found.kind == "sft"
    assert found.rows[0].data == chat(
        ("system", "Be kind."),
        ("user", "Hello"),
        ("assistant", "Hi!"),
        ("user", "Bye"),
        ("assistant", "Bye!"),
    )

    messages = chat(("user", "2+2?"), ("assistant", "4"))
    openai = write(tmp_path, "train.jsonl", jsonl(messages | {"weight": 1}))
    found = prepare(openai.read_bytes(), openai.name)
    assert found.format == "chat" and [r.data for r in found.rows] == [messages]

    texts = write(tmp_path, "corpus.jsonl", jsonl({"text": "one doc"}, {"text": "two\ndocs"}))
    found = prepare(texts.read_bytes(), texts.name)
    assert (found.format, found.kind) == ("text", "pt")
    assert [r.data for r in found.rows] == [{"text": "one doc"}, {"text": "two\ndocs"}]

    plain = write(tmp_path, "book.txt", "Chapter one.\nIt begins.\n\n\n  \nChapter two.\n")
    found = prepare(plain.read_bytes(), plain.name)
    assert found.format == "text"
    assert [(r.line, r.data["text"]) for r in found.rows] == [
        (1, "Chapter one.\nIt begins."),
        (6, "Chapter two."),
    ]
    # Without a .txt name, text that is not JSON is plain text too.
    assert prepare(b"just words\n", "notes").format == "text"
    # A .txt file holding JSON lines is still plain text: the name decides.
    assert prepare(b'{"text": "x"}\n', "odd.txt").rows[0].data == {"text": '{"text": "x"}'}


def test_unicode_crlf_bom_and_blank_lines(tmp_path) -> None:
    rows = [
        {"instruction": "Übersetze „Straße“", "output": "street 🛣️"},
        {"instruction": "日本語で", "input": "cat", "output": "猫"},
    ]
    text = "\r\n\r\n" + jsonl(*rows).replace("\n", "\r\n") + "\r\n   \r\n"
    path = write(tmp_path, "utf8.jsonl", b"\xef\xbb\xbf" + text.encode())
    found = prepare(path.read_bytes(), path.name)
    assert [r.line for r in found.rows] == [3, 4]
    assert found.rows[0].data["messages"][0]["content"] == "Übersetze „Straße“"
    assert found.rows[1].data["messages"][1]["content"] == "猫"
    assert "猫" in found.canonical.decode()  # kept as UTF-8, not \\u escapes
    plain = write(tmp_path, "crlf.txt", "\ufeffline a\r\nline b\r\n\r\nnext\r\n".encode())
    assert [r.data["text"] for r in prepare(plain.read_bytes(), plain.name).rows] == [
        "line a\nline b",
        "next",
    ]


def test_format_is_detected_or_given() -> None:
    row = {"instruction": "x", "output": "y"}
    assert prepare(jsonl(row).encode(), "d.jsonl").format == "alpaca"
    assert prepare(jsonl(row).encode(), "d.jsonl", fmt="alpaca").format == "alpaca"
    # Given, the format is held to: a row of another format is an error on its line.
    error = invalid(jsonl(row).encode(), "d.jsonl", fmt="chat")
    assert str(error) == "d.jsonl: line 1: missing 'messages'"
    error = invalid(b"plain words\n", "notes.txt", fmt="alpaca")
    assert "line 1: a plain text file is a 'text' dataset; 'alpaca' needs JSON rows" in str(error)
    error = invalid(jsonl({"prompt": "a", "completion": "b"}).encode(), "d.jsonl")
    assert "line 1: cannot tell the format from its keys ('prompt', 'completion')" in str(error)
    with pytest.raises(DatasetInvalid, match="unknown format 'parquet'"):
        prepare(b"a,b\n", "d.parquet", fmt="parquet")  # type: ignore[arg-type]


# --- errors name the line -------------------------------------------------------------------------


def test_errors_name_the_line_and_reason(tmp_path) -> None:
    good = {"instruction": "q", "output": "a"}
    lines = [json.dumps(good)] * 4 + ["", json.dumps(good), json.dumps({"instruction": "q"})]
    path = write(tmp_path, "seven.jsonl", "\n".join(lines) + "\n")
    error = invalid(path.read_bytes(), path.name)
    assert str(error) == "seven.jsonl: line 7: missing 'output'"
    assert error.data == {"errors": [{"line": 7, "reason": "missing 'output'"}]}

    cases = [
        (jsonl(good, good) + "{not json\n", "line 3: not valid JSON: Expecting property name"),
        ('{"text": "a"}\n[1, 2]\n', "line 2: a row must be a JSON object, not a list"),
        ("[1, 2]", "line 1: a row must be a JSON object, not a number"),
        ("{bad\n", "line 1: not valid JSON (expected one JSON object per line)"),
        (jsonl(good, {"instruction": "q", "output": 3}), "line 2: 'output' must be a string"),
        (jsonl(good, {"instruction": "  ", "output": "a"}), "line 2: 'instruction' is empty"),
        (jsonl(good, {"instruction": "q", "output": "a", "input": None}), "line 2: 'input' must"),
        (
            jsonl(chat(("user", "a"), ("user", "b"), ("assistant", "c"))),
            "line 1: messages[1]: expected a 'assistant' turn, got 'user'",
        ),
        (jsonl(chat(("user", "a"))), "line 1: the last turn must be 'assistant'"),
        (
            jsonl(chat(("user", "a"), ("tool", "b"))),
            "line 1: messages[1]: 'role' is 'tool'; expected one of user, assistant, system",
        ),
        (
            jsonl(chat(("user", "a"), ("assistant", "b"), ("system", "c"))),
            "line 1: messages[2]: expected a 'user' turn, got 'system'",
        ),
        (jsonl({"messages": []}), "line 1: 'messages' must be a non-empty list"),
        (jsonl({"messages": ["hi"]}), "line 1: messages[0]: a turn must be an object"),
        (
            jsonl({"conversations": [{"from": "bot", "value": "x"}]}),
            "line 1: conversations[0]: 'from' is 'bot'; expected one of human, gpt, system",
        ),
        (
            jsonl({"conversations": [{"from": "gpt", "value": "x"}]}),
            "line 1: conversations[0]: expected a 'human' turn, got 'gpt'",
        ),
        (jsonl({"text": "a"}, {"text": ""}), "line 2: 'text' is empty"),
        ('[{"text": "a"},\n {"text": 5}]', "line 2: 'text' must be a string, not a number"),
        ('[\n{"text": "a"}\n{"text": "b"}]', "line 3: not valid JSON: expected ',' or ']'"),
        ('[{"text": "a"},\n\n {"text": }]', "line 3: not valid JSON: Expecting value"),
        ('[{"text": "a"}] trailing', "line 1: not valid JSON: text after the closing ']'"),
        ("", "the dataset has no rows"),
        ("\n \n", "the dataset has no rows"),
        ("[]", "the dataset has no rows"),
    ]
    for content, message in cases:
        with pytest.raises(DatasetInvalid, match=re.escape(message)):
            prepare(content.encode(), "d.json")

    bad_utf8 = jsonl(good).encode() + b'{"text": "caf\xe9"}\n'
    with pytest.raises(DatasetInvalid, match=re.escape("line 2: not valid UTF-8 (byte 0xe9 at")):
        prepare(bad_utf8, "d.jsonl")


def test_many_bad_rows_are_reported_together_up_to_a_bound() -> None:
    rows = [
        {"instruction": "q", "output": "a"} if i % 2 else {"instruction": "q"} for i in range(40)
    ]
    error = invalid(jsonl(*rows).encode(), "d.jsonl")
    lines = [e["line"] for e in error.data["errors"]]
    assert lines == list(range(1, 2 * MAX_ERRORS, 2))
    assert str(error).endswith(f"(stopped after {MAX_ERRORS} problems)")


def test_limits() -> None:
    data = jsonl(*({"text": f"doc {i}"} for i in range(5))).encode()
    with pytest.raises(DatasetInvalid, match=f"is {len(data)} bytes; datasets may be at most 10"):
        prepare(data, "d.jsonl", limits=DatasetLimits(max_bytes=10))
    with pytest.raises(DatasetInvalid, match="line 4: more than 3 rows; that is the limit"):
        prepare(data, "d.jsonl", limits=DatasetLimits(max_rows=3))
    assert len(prepare(data, "d.jsonl", limits=DatasetLimits(max_rows=5)).rows) == 5
    long = jsonl({"text": "short"}, {"text": "x" * 100}).encode()
    with pytest.raises(DatasetInvalid, match="line 2: the row has 112 characters; the limit is 50"):
        prepare(long, "d.jsonl", limits=DatasetLimits(max_row_chars=50))


# --- dedup, tokens, conversion --------------------------------------------------------------------


def test_exact_and_normalised_duplicates() -> None:
    rows = [
        {"instruction": "What is Straße?", "output": "A street."},
        {"instruction": "What is Straße?", "output": "A street."},  # exact
        {"instruction": "what is  STRASSE?", "output": "a street."},  # normalised (casefold ß)
        {
            "instruction": "\uff57\uff48\uff41\uff54 is strasse?",
            "output": "A\tstreet.",
        },  # NFKC: full-width "what"
        {"instruction": "What is a road?", "output": "A street."},
        {"instruction": "What is Straße?", "output": "A street."},  # exact again
    ]
    data = jsonl(*rows).encode()
    _, parsed = parse_rows(data, "d.jsonl")
    kept, report = deduplicate(parsed, "normalised")
    assert (report.exact, report.normalised, report.kept) == (2, 2, 2)
    assert [r.line for r in kept] == [1, 5]
    kept, report = deduplicate(parsed, "exact")
    assert (report.exact, report.normalised, report.kept) == (2, 2, 4)
    assert [r.line for r in kept] == [1, 3, 4, 5]
    kept, report = deduplicate(parsed, "none")
    assert (report.exact, report.normalised, report.kept, report.mode) == (2, 2, 6, "none")
    # A role is part of a row: the same words from another speaker are not a duplicate.
    swapped = jsonl(
        chat(("user", "hi"), ("assistant", "hello")),
        chat(("system", "hi"), ("user", "hello"), ("assistant", "x")),
        chat(("user", "hi"), ("assistant", "hello")),
    )
    assert prepare(swapped.encode(), "c.jsonl").dedup.exact == 1

    found = prepare(data, "d.jsonl")
    assert found.tokens == count_tokens(found.rows) == 3 + 2 + 4 + 2
    assert count_tokens(found.rows, counter=len) == sum(
        len(m["content"]) for r in found.rows for m in r.data["messages"]
    )


def test_conversion_between_forms() -> None:
    sft = json.dumps(chat(("system", "S"), ("user", "U"), ("assistant", "A"))).encode() + b"\n"
    assert convert_line(sft, "sft", "chat") == sft
    assert json.loads(convert_line(sft, "sft", "text")) == {"text": "S\n\nU\n\nA"}
    pt = b'{"text": "doc"}\n'
    assert convert_line(pt, "pt", "text") == pt
    with pytest.raises(DatasetInvalid, match="a pt \\(text\\) dataset has no turns"):
        convert_line(pt, "pt", "chat")


def test_a_10k_row_file(tmp_path) -> None:
    rows = [
        {
            "instruction": f"Question {i % 9_000}?",
            "input": "ctx" if i % 3 else "",
            "output": f"A{i}",
        }
        for i in range(10_000)
    ]
    rows[9_999] = dict(rows[0])  # one exact duplicate
    rows[9_998] = {k: v.upper() for k, v in rows[1].items()}  # one normalised duplicate
    path = write(tmp_path, "big.jsonl", jsonl(*rows))
    started = time.monotonic()
    found = prepare(path.read_bytes(), path.name)
    assert time.monotonic() - started < 10
    assert (found.dedup.exact, found.dedup.normalised, found.dedup.kept) == (1, 1, 9_998)
    assert len(found.canonical.splitlines()) == 9_998
    broken = path.read_text().splitlines()
    broken[8_765] = broken[8_765].replace('"output"', '"outptu"')
    path.write_text("\n".join(broken))
    with pytest.raises(DatasetInvalid, match=r"big\.jsonl: line 8766: missing 'output'$"):
        prepare(path.read_bytes(), path.name)


# --- the dataset service between agents -----------------------------------------------------------


async def nothing_stored(plugin: StoragePlugin) -> None:
    assert await plugin.store.list("datasets/") == []
    assert plugin.dataset_registry.totals() == (0, 0)
    assert list(plugin.incoming.iterdir()) == []


ALPACA = [
    {"instruction": "Name a colour", "output": "Blue"},
    {"instruction": "Name a colour", "output": "Blue"},
    {"instruction": "Add", "input": "2 and 2", "output": "4"},
    {"instruction": "Grüße", "output": "Hallo 👋"},
]


async def test_upload_fetch_list_describe(tmp_path, make_agent) -> None:
    store_rt, plugin = await start_storage(make_agent)
    gateway = (await make_agent("gw", roles=("gateway",))).agent
    trainer = (await make_agent("trainer", roles=("gateway",))).agent  # uploads for users
    src = write(tmp_path, "colours.jsonl", jsonl(*ALPACA))
    seen: list[tuple[int, int]] = []

    record = await upload_dataset(
        gateway,
        "store",
        src,
        "colours",
        "alice",
        project="paint",
        progress=lambda d, t: seen.append((d, t)),
    )
    assert re.fullmatch(r"ds-[0-9a-f]{12}", record.id)
    assert (record.name, record.version, record.format, record.kind) == (
        "colours",
        1,
        "alpaca",
        "sft",
    )
    assert (record.owner, record.project, record.filename) == ("alice", "paint", "colours.jsonl")
    assert record.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
    assert record.bytes == src.stat().st_size == seen[-1][0]
    assert record.rows == 3 and record.dedup.model_dump() == {
        "exact": 1,
        "normalised": 0,
        "kept": 3,
        "mode": "normalised",
    }
    assert record.tokens == 3 + 1 + 4 + 1 + 1 + 2 and record.tokenizer == "whitespace"

    as_chat = tmp_path / "out" / "chat.jsonl"
    assert await fetch_dataset(trainer, "store", record.id, as_chat) == record
    assert [json.loads(line) for line in as_chat.read_text("utf-8").splitlines()] == [
        chat(("user", "Name a colour"), ("assistant", "Blue")),
        chat(("user", "Add\n2 and 2"), ("assistant", "4")),
        chat(("user", "Grüße"), ("assistant", "Hallo 👋")),
    ]
    as_text = tmp_path / "out" / "text.jsonl"
    await fetch_dataset(trainer, "store/storage", record.id, as_text, as_="text")
    assert json.loads(as_text.read_text("utf-8").splitlines()[1]) == {"text": "Add\n2 and 2\n\n4"}
    original = tmp_path / "out" / "original.jsonl"
    await fetch_dataset(trainer, "store", record.id, original, as_="original")
    assert original.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "chat.jsonl",
        "original.jsonl",
        "text.jsonl",
    ]  # no partial files left

    pt = await upload_dataset(
        gateway, "store", write(tmp_path, "c.txt", "a b\n\nc"), "corpus", "bob"
    )
    assert (pt.format, pt.kind, pt.rows, pt.tokens) == ("text", "pt", 2, 3)
    with pytest.raises(InvalidRequest, match="is a pt \\(text\\) dataset: it has no turns"):
        await fetch_dataset(trainer, "store", pt.id, tmp_path / "out" / "pt-chat.jsonl")
    assert not (tmp_path / "out" / "pt-chat.jsonl").exists()
    await fetch_dataset(trainer, "store", pt.id, tmp_path / "out" / "pt.jsonl", as_="text")
    assert (tmp_path / "out" / "pt.jsonl").read_text() == '{"text": "a b"}\n{"text": "c"}\n'

    reader = (await make_agent("reader", roles=("training",))).agent  # trainers read
    assert [r.id for r in await list_datasets(reader, "store")] == [record.id, pt.id]
    assert [r.id for r in await list_datasets(reader, "store", owner="bob")] == [pt.id]
    assert [r.id for r in await list_datasets(reader, "store", project="paint")] == [record.id]
    assert await list_datasets(reader, "store", name="nothing") == []
    assert await describe_dataset(reader, "store", record.id) == record
    assert sorted(await plugin.store.list("datasets/")) == sorted(
        f"datasets/{i}/{n}" for i in (record.id, pt.id) for n in ("canonical.jsonl", "original")
    )
    for name, value in (
        ("datasets_stored", 2),
        ("dataset_received_bytes", record.bytes + pt.bytes),
    ):
        assert metric(store_rt, name) == value
    await eventually(lambda: metric(store_rt, "dataset_served_bytes") > 0)

    # The registry survives the plugin's restart on the same data dir.
    await store_rt.host.remove("storage")
    await store_rt.host.add("storage", {}, plugin=StoragePlugin())
    assert await describe_dataset(reader, "store", record.id) == record


def metric(rt: AgentRuntime, name: str) -> float:
    return rt.host.metrics()["storage"].snapshot()[name]["series"][0]["value"]


async def test_versions_never_overwrite_and_delete(tmp_path, make_agent) -> None:
    _, plugin = await start_storage(make_agent)
    trainer = (await make_agent("trainer", roles=("gateway",))).agent  # uploads for users
    reader = (await make_agent("reader", roles=("training",))).agent
    first = write(tmp_path, "v1.jsonl", jsonl({"text": "first"}))
    second = write(tmp_path, "v2.jsonl", jsonl({"text": "second"}, {"text": "more"}))

    v1 = await upload_dataset(trainer, "store", first, "notes", "alice")
    v2 = await upload_dataset(trainer, "store", second, "notes", "alice")
    assert (v1.version, v2.version) == (1, 2) and v1.id != v2.id
    # The same name again made a new version: the first is untouched.
    assert await describe_dataset(reader, "store", v1.id) == v1
    await fetch_dataset(reader, "store", v1.id, tmp_path / "got.jsonl", as_="original")
    assert (tmp_path / "got.jsonl").read_bytes() == first.read_bytes()
    assert [(r.version, r.rows) for r in await list_datasets(reader, "store", name="notes")] == [
        (1, 1),
        (2, 2),
    ]

    refusal = r"'reader' \(roles training\) may not use 'dataset_delete'"
    with pytest.raises(Forbidden, match=refusal):
        await delete_dataset(reader, "store", v2.id)
    await delete_dataset(trainer, "store", v2.id)
    with pytest.raises(DatasetNotFound, match=f"no dataset '{v2.id}' in storage on store"):
        await describe_dataset(reader, "store", v2.id)
    with pytest.raises(DatasetNotFound):
        await fetch_dataset(reader, "store", v2.id, tmp_path / "gone.jsonl")
    assert not (tmp_path / "gone.jsonl").exists()
    with pytest.raises(DatasetNotFound):
        await delete_dataset(trainer, "store", v2.id)
    assert await plugin.store.list(f"datasets/{v2.id}/") == []
    # A deleted version's number is never given to other bytes.
    v3 = await upload_dataset(trainer, "store", second, "notes", "alice")
    assert v3.version == 3

    await delete_dataset(trainer, "store", v1.id)
    await delete_dataset(trainer, "store", v3.id)
    await nothing_stored(plugin)
    with pytest.raises(InvalidRequest, match="dataset id"):
        await describe_dataset(reader, "store", "../etc")


async def raw_put(agent, header: dict, body: bytes) -> None:
    await refused_put(agent, DATASET_PUT, json.dumps(header).encode(), body)


async def test_refusals_keep_nothing(tmp_path, make_agent) -> None:
    _, plugin = await start_storage(make_agent, datasets={"max_bytes": 1000})
    trainer = (await make_agent("trainer", roles=("gateway",))).agent  # uploads for users
    reader = (await make_agent("reader", roles=("training",))).agent
    good = write(tmp_path, "good.jsonl", jsonl({"instruction": "q", "output": "a"}))

    refusal = r"^'reader' may upload a training job's results file \(format csv\), not a dataset"
    with pytest.raises(Forbidden, match=refusal):
        await upload_dataset(reader, "store", good, "d", "alice")
    stranger = (await make_agent("stranger")).agent
    with pytest.raises(Forbidden, match="may not use stream 'dataset_put'"):
        await upload_dataset(stranger, "store", good, "d", "alice", format="csv")
    lines = [json.dumps({"instruction": "q", "output": "a"})] * 6 + ['{"instruction": "q"}']
    bad = write(tmp_path, "bad.jsonl", "\n".join(lines))
    with pytest.raises(DatasetInvalid, match=r"^bad\.jsonl: line 7: missing 'output'$") as info:
        await upload_dataset(trainer, "store", bad, "d", "alice")
    assert info.value.data == {"errors": [{"line": 7, "reason": "missing 'output'"}]}
    with pytest.raises(DatasetInvalid, match="line 1: missing 'messages'"):
        await upload_dataset(trainer, "store", good, "d", "alice", format="chat")
    big = write(tmp_path, "big.jsonl", jsonl(*({"text": "x" * 100} for _ in range(20))))
    with pytest.raises(DatasetInvalid, match="this store takes datasets of at most 1000"):
        await upload_dataset(trainer, "store", big, "d", "alice")
    for name, owner, message in (
        ("a/b", "alice", "name: Value error, must hold no '/'"),
        (" padded", "alice", "must not start or end with spaces"),
        ("d", "bad owner", "owner: String should match pattern"),
    ):
        with pytest.raises(InvalidRequest, match=re.escape(message)):
            await upload_dataset(trainer, "store", good, name, owner)
    with pytest.raises(InvalidRequest, match=re.escape("format: Input should be 'alpaca'")):
        # Deliberately not a Format: the storage agent's check refuses it.
        await upload_dataset(trainer, "store", good, "d", "alice", format="parquet")  # type: ignore[arg-type]
    await nothing_stored(plugin)

    data = good.read_bytes()
    header = {
        "name": "d",
        "filename": "good.jsonl",
        "owner": "alice",
        "size": len(data),
        "sha256": "0" * 64,
    }
    with pytest.raises(TransferFailed, match="does not match the declared"):
        await raw_put(trainer, header, data)
    with pytest.raises(InvalidRequest, match="filename: Value error, must hold no '/'"):
        await raw_put(trainer, header | {"filename": "../x"}, data)
    with pytest.raises(InvalidRequest, match="extra: Extra inputs are not permitted"):
        await raw_put(trainer, header | {"extra": 1}, data)
    await eventually(lambda: not any(plugin.incoming.iterdir()))
    await nothing_stored(plugin)
    partials = plugin.datasets.partials.root
    assert not any(p.is_file() for p in partials.rglob("*"))  # bytes that failed their checksum
    # are not kept to resume

    record = await upload_dataset(trainer, "store", good, "d", "alice", dedup="none")
    assert record.dedup.mode == "none" and record.version == 1
    with pytest.raises(IsADirectoryError):
        await fetch_dataset(reader, "store", record.id, tmp_path)
    with pytest.raises(InvalidRequest, match="as: Input should be 'chat', 'text', 'preference'"):
        await fetch_dataset(reader, "store", record.id, tmp_path / "x", as_="csv")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="holds sft rows: they cannot be read as preference"):
        await fetch_dataset(reader, "store", record.id, tmp_path / "x", as_="preference")
    pairs = write(tmp_path, "pairs.jsonl", jsonl(preference("Say a colour.", "blue", "red")))
    stored = await upload_dataset(trainer, "store", pairs, "p", "alice")
    assert stored.kind == "preference"
    for as_ in ("chat", "text"):
        with pytest.raises(InvalidRequest, match=f"they cannot be read as {as_}"):
            await fetch_dataset(reader, "store", stored.id, tmp_path / "x", as_=as_)
    await fetch_dataset(reader, "store", stored.id, tmp_path / "p.jsonl", as_="preference")
    fetched = json.loads((tmp_path / "p.jsonl").read_text())
    assert fetched == {
        "messages": [{"role": "user", "content": "Say a colour."}],
        "chosen": "blue",
        "rejected": "red",
    }


async def test_a_broken_upload_resumes_where_it_stopped(tmp_path, make_agent, broker) -> None:
    """An upload whose link dies part-way (the broker stops passing its messages; the uploader
    gives up) sends only the rest when tried again; what arrives is the file, byte for byte.
    Another caller's upload of the same bytes starts from nothing: a partial upload is its
    uploader's."""
    _, plugin = await start_storage(make_agent)
    gateway = (await make_agent("gw", roles=("gateway",))).agent
    other = (await make_agent("gw2", roles=("gateway",))).agent
    rows = [{"instruction": f"q{i} " + "x" * 200, "output": f"a{i}"} for i in range(12_000)]
    data = write(tmp_path, "big.jsonl", jsonl(*rows))
    size = data.stat().st_size
    partials = plugin.datasets.partials.root

    def held() -> int:
        return sum(p.stat().st_size for p in partials.rglob("*.part"))

    async def broken_upload(agent: Agent) -> None:
        """Messages to the store pass until a third of the file has, then vanish."""
        passed = 0
        cut = False

        def swallow(session, frame: Frame) -> Frame | None:
            nonlocal passed, cut
            if frame.type is not FrameType.MSG or frame.header["dst"] != "store/storage":
                return None
            cut = cut or passed > size // 3
            if cut:
                return Frame(frame.type, {**frame.header, "dst": "nobody"}, frame.payload)
            passed += len(frame.payload)
            return None

        undo = intercept(broker, swallow)
        upload = asyncio.create_task(upload_dataset(agent, "store", data, "big", "alice"))
        await eventually(lambda: cut, 30)
        await asyncio.sleep(0.2)
        upload.cancel()
        with pytest.raises(asyncio.CancelledError):
            await upload
        undo()

    await broken_upload(gateway)
    await eventually(lambda: held() > size // 4)  # written out
    kept = held()
    assert size // 4 < kept < size
    assert await plugin.store.list("datasets/") == []  # nothing visible
    starts: list[int] = []

    def first(done: int, total: int) -> None:
        if not starts:
            starts.append(done)

    record = await upload_dataset(gateway, "store", data, "big", "alice", progress=first)
    assert kept < starts[0] <= kept + READ_SIZE  # resumed from what the store held
    fetched = tmp_path / "back.jsonl"
    await fetch_dataset(gateway, "store", record.id, fetched, as_="original")
    assert fetched.read_bytes() == data.read_bytes()
    assert not any(partials.iterdir())  # used up

    await broken_upload(gateway)
    starts.clear()
    await upload_dataset(other, "store", data, "big", "alice", progress=first)
    assert starts[0] <= READ_SIZE  # gw2 sent it all itself


# --- results files ------------------------------------------------------------------------------

RESULTS = "step,train_loss,valid_loss\n1,2.5,\n2,1.25,1.5\n"


def test_a_results_file_is_a_csv_of_numbers() -> None:
    prepared = prepare_results(RESULTS.encode(), "step_metrics.csv", DatasetLimits())
    assert (prepared.format, prepared.kind, prepared.canonical) == (
        "csv",
        "results",
        RESULTS.encode(),
    )
    assert [r.data for r in prepared.rows] == [
        {"step": "1", "train_loss": "2.5", "valid_loss": ""},
        {"step": "2", "train_loss": "1.25", "valid_loss": "1.5"},
    ]
    assert [r.line for r in prepared.rows] == [2, 3]
    for body, message in (
        ("", "line 1: the first line must name each column"),
        ("step,step\n1,2\n", "line 1: each column is named once"),
        ("step,loss\n1\n", "line 2: 1 cells; the header names 2 columns"),
        ("step,loss\n1,nan\n2,x\n", "line 2: 'nan' is not a number; line 3: 'x' is not a number"),
    ):
        with pytest.raises(DatasetInvalid, match=re.escape(message)):
            prepare_results(body.encode(), "r.csv", DatasetLimits())
    with pytest.raises(DatasetInvalid, match="at most 10"):
        prepare_results(RESULTS.encode(), "r.csv", DatasetLimits(max_bytes=10))


async def test_trainers_store_results_files_that_are_never_training_data(
    tmp_path, make_agent
) -> None:
    await start_storage(make_agent)
    trainer = (await make_agent("trainer", roles=("training",))).agent
    path = write(tmp_path, "step_metrics.csv", RESULTS)
    record = await upload_dataset(trainer, "store", path, "job results", "alice", format="csv")
    assert (record.kind, record.format, record.rows, record.tokens) == ("results", "csv", 2, 0)
    assert record.filename == "step_metrics.csv" and record.owner == "alice"
    fetched = await fetch_dataset(trainer, "store", record.id, tmp_path / "back", as_="original")
    assert fetched.id == record.id and (tmp_path / "back").read_text() == RESULTS
    for as_ in ("chat", "text"):
        with pytest.raises(InvalidRequest, match="results file, not a dataset"):
            await fetch_dataset(trainer, "store", record.id, tmp_path / "x", as_=as_)
    bad = write(tmp_path, "bad.csv", "step,loss\n1,oops\n")
    with pytest.raises(DatasetInvalid, match="line 2: 'oops' is not a number"):
        await upload_dataset(trainer, "store", bad, "job results", "alice", format="csv")


# --- batch files --------------------------------------------------------------------------------


def batch_request(custom_id: object, url: str = "/v1/completions", **extra: object) -> dict:
    body = {"model": "m", "prompt": "p"}
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body} | extra


def test_batch_files_are_checked_line_by_line_and_kept_as_uploaded() -> None:
    data = jsonl(batch_request("a"), batch_request("b")).encode()
    prepared = prepare_batch(data, "in.jsonl", "batch", DatasetLimits())
    assert (prepared.kind, prepared.canonical, len(prepared.rows)) == ("batch", data, 2)
    for rows, message in (
        ([batch_request("a"), batch_request("a")], "line 2: custom_id 'a' is also on line 1"),
        ([batch_request(7)], "line 1: custom_id must be a string of 1-512 characters"),
        ([batch_request("a", method="GET")], 'line 1: method must be "POST"'),
        ([batch_request("a", url="/v1/images")], "line 1: url must be one of"),
        (
            [batch_request("a"), batch_request("b", url="/v1/embeddings")],
            "line 2: url '/v1/embeddings' differs from the first line's '/v1/completions'",
        ),
        ([batch_request("a", body=[1])], "line 1: body must be a JSON object"),
        ([[1, 2]], "line 1: each line is a JSON object"),
        ([], "line 1: no requests"),
    ):
        with pytest.raises(DatasetInvalid, match=re.escape(message)):
            prepare_batch(jsonl(*rows).encode(), "in.jsonl", "batch", DatasetLimits())
    long = jsonl(batch_request("a"), batch_request("b")).encode()
    with pytest.raises(DatasetInvalid, match="line 2: 101 characters; a line may have 100;"):
        prepare_batch(b"\n" + long, "in.jsonl", "batch", DatasetLimits(max_row_chars=100))
    result = {"id": "batch_req_1", "custom_id": "a", "response": None, "error": {"code": "x"}}
    kept = prepare_batch(jsonl(result).encode(), "out.jsonl", "batch_output", DatasetLimits())
    assert kept.kind == "batch_output"
    with pytest.raises(DatasetInvalid, match="line 1: response and error are each"):
        bad = jsonl(result | {"response": "no"}).encode()
        prepare_batch(bad, "out.jsonl", "batch_output", DatasetLimits())


async def test_batch_files_are_never_training_data(tmp_path, make_agent) -> None:
    await start_storage(make_agent)
    gateway = (await make_agent("gw", roles=("gateway",))).agent
    path = write(tmp_path, "in.jsonl", jsonl(batch_request("a")))
    record = await upload_dataset(gateway, "store", path, "in", "alice", format="batch")
    assert (record.kind, record.rows) == ("batch", 1)
    fetched = await fetch_dataset(gateway, "store", record.id, tmp_path / "back", as_="original")
    assert fetched.id == record.id and (tmp_path / "back").read_bytes() == path.read_bytes()
    with pytest.raises(InvalidRequest, match="a batch's requests file, not a dataset"):
        await fetch_dataset(gateway, "store", record.id, tmp_path / "x", as_="chat")
    with pytest.raises(DatasetInvalid, match="line 1: method"):  # nothing kept
        bad = write(tmp_path, "bad.jsonl", jsonl(batch_request("a", method="PUT")))
        await upload_dataset(gateway, "store", bad, "in", "alice", format="batch")
    assert [r.id for r in await list_datasets(gateway, "store")] == [record.id]


def preference(prompt: str, preferred: str, rejected: str) -> dict:
    return {
        "input": {"messages": [{"role": "user", "content": prompt}]},
        "preferred_output": [{"role": "assistant", "content": preferred}],
        "non_preferred_output": [{"role": "assistant", "content": rejected}],
    }


def test_preference_rows_are_their_own_kind_checked_row_by_row() -> None:
    """OpenAI's DPO rows: detected, canonical as the prompt's turns and the two replies, never
    read as chat or text; each bad row is named by its line."""
    good = preference("Say a colour.", "blue", "red")
    prepared = prepare(jsonl(good, preference("Again.", "blue", "green")).encode(), "p.jsonl")
    assert (prepared.format, prepared.kind) == ("preference", "preference")
    assert prepared.rows[0].data == {
        "messages": [{"role": "user", "content": "Say a colour."}],
        "chosen": "blue",
        "rejected": "red",
    }
    assert prepared.tokens == 3 + 1 + 1 + 1 + 1 + 1  # the prompts' words and every reply
    with pytest.raises(DatasetInvalid, match="cannot be read as"):
        convert_line(prepared.canonical.splitlines()[0], "preference", "chat")

    def reply(role: str, content: object) -> list[dict]:
        return [{"role": role, "content": content}]

    cases = [
        ({**good, "preferred_output": None}, "line 2: missing 'preferred_output'"),
        ({**good, "preferred_output": []}, "must be a list of one assistant message"),
        ({**good, "non_preferred_output": reply("user", "x")}, "'role' is 'user'; expected"),
        ({**good, "non_preferred_output": reply("assistant", 3)}, "'content' must be a string"),
        ({**good, "non_preferred_output": reply("assistant", "blue")}, "are the same"),
        ({**good, "input": "hi"}, "line 2: 'input' must be an object"),
        (
            {**good, "input": chat(("user", "a"), ("assistant", "b"))},
            "line 2: the last turn must be 'user': the replies answer it",
        ),
    ]
    for row, reason in cases:
        error = invalid(jsonl(good, row).encode(), "p.jsonl")
        assert str(error).startswith("p.jsonl: line 2: ") and reason in str(error), row
    # Detected from the first row, the format holds for the rest: a chat row is refused.
    error = invalid(jsonl(good, chat(("user", "a"), ("assistant", "b"))).encode(), "p.jsonl")
    assert "line 2: 'input' must be an object" in str(error)
