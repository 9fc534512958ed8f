"""Training datasets: parse, validate, convert and de-duplicate. Pure functions over bytes and
rows (no I/O, no asyncio): the storage plugin runs them in a thread. One module past 400 lines
because it is one pipeline read top to bottom (the file, one row per format, the whole file),
whose steps share the row-problem bookkeeping.

Formats (as uploaded):

- ``alpaca``: ``{"instruction", "input"?, "output", "system"?}`` per row;
- ``sharegpt``: ``{"conversations": [{"from": "human" | "gpt" | "system", "value"}]}``;
- ``chat``: OpenAI's fine-tuning JSONL, ``{"messages": [{"role", "content"}]}``;
- ``text``: JSONL ``{"text"}`` rows, or a plain text file with one document per block of lines
  separated by blank lines;
- ``preference``: OpenAI's DPO rows, ``{"input": {"messages": [...]}, "preferred_output":
  [{"role": "assistant", "content"}], "non_preferred_output": [...]}``.

Rows come as JSON Lines (blank lines skipped) or as one JSON array; a ``.txt`` file, or one
that does not start with ``{`` or ``[``, is plain text. The format is detected from the first
row's keys unless given. Every row is checked and turned into the canonical form: ``chat`` rows
(``{"messages": [...]}``, turns alternating user/assistant after an optional system message and
ending with the assistant's) for sft datasets, ``{"text"}`` rows for pt, and ``{"messages",
"chosen", "rejected"}`` rows for preference datasets (the prompt's turns ending with the user's,
then the two replies). Errors name the
1-based line of the file where the row starts and the reason.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any, Literal, NoReturn

from atoll.plugins.storage.contract.datasets import (
    CANONICAL_FORM,
    DatasetInvalid,
    DedupMode,
    Format,
    Kind,
    check_filename,
)

# Training data's formats; "csv" (a job's results) is results.py's, "batch" and "batch_output"
# batch_files.py's.
FORMATS: tuple[Format, ...] = ("alpaca", "sharegpt", "chat", "text", "preference")
PLAIN_SUFFIXES = (".txt", ".text")
JSON_SUFFIXES = (".json", ".jsonl", ".ndjson")
MAX_ERRORS = 10  # problems gathered before giving up: enough to fix a file in few rounds
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
CHAT_ROLES = {"user": "user", "assistant": "assistant", "system": "system"}

_JSON_SPACE = re.compile(r"[ \t\n\r]*")

# Bounds checked before json parses a row: its parser recurses once per level (a row nested
# 200,000 deep is a RecursionError) and int() refuses more than 4300 digits (and is quadratic
# below that). Training rows need 3 levels and short numbers.
MAX_DEPTH = 64
MAX_NUMBER_CHARS = 100
_ESCAPE = re.compile(r"\\.", re.DOTALL)  # a string's escape: dropped before strings are
_STRING = re.compile(r'"[^"]*+"')  # with no escapes left, a string ends at the next quote
_NOT_BRACKET = re.compile(r"[^\[\]{}]++")
_LONG_NUMBER = re.compile(rf"-?[0-9][-+.0-9eE]{{{MAX_NUMBER_CHARS},}}+")
_LEVEL = {"[": 1, "{": 1, "]": -1, "}": -1}


def _skip_space(text: str, pos: int) -> int:
    """Where the first character after JSON whitespace at ``pos`` is."""
    return _JSON_SPACE.match(text, pos).end()  # type: ignore[union-attr]  # "" matches: never None


@dataclass(frozen=True)
class DatasetLimits:
    """What one uploaded dataset may be."""

    max_bytes: int = 256 * 1024 * 1024
    max_rows: int = 1_000_000
    max_row_chars: int = 1_000_000  # one row's characters as written in the file


@dataclass(frozen=True)
class Row:
    line: int  # 1-based line where the row starts in the uploaded file
    data: dict[str, Any]  # canonical: {"messages": [...]} or {"text": ...}


@dataclass(frozen=True)
class DedupReport:
    exact: int  # rows equal to an earlier row
    normalised: int  # rows equal to an earlier one only once case-folded and spaces collapsed
    kept: int
    mode: DedupMode  # what was removed: nothing, exact duplicates, or both kinds


@dataclass
class Prepared:
    """An uploaded dataset, checked and converted: what the registry keeps."""

    format: Format
    kind: Kind
    rows: list[Row]  # kept rows, canonical
    dedup: DedupReport
    tokens: int
    canonical: bytes = field(repr=False)  # the kept rows as JSON Lines


class Problems:
    """Row problems gathered up to MAX_ERRORS, then raised as one DatasetInvalid."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.items: list[tuple[int, str]] = []

    def add(self, line: int, reason: str) -> None:
        self.items.append((line, reason))
        if len(self.items) >= MAX_ERRORS:
            raise self._error(stopped=True)

    def stop(self, line: int, reason: str) -> NoReturn:
        """Add a problem past which reading on makes no sense, and raise them all."""
        self.items.append((line, reason))
        raise self._error(stopped=len(self.items) >= MAX_ERRORS)

    def raise_(self) -> None:
        if self.items:
            raise self._error(stopped=False)

    def _error(self, stopped: bool) -> DatasetInvalid:
        text = "; ".join(f"line {line}: {reason}" for line, reason in self.items)
        more = f" (stopped after {MAX_ERRORS} problems)" if stopped else ""
        errors = [{"line": line, "reason": reason} for line, reason in self.items]
        return DatasetInvalid(f"{self.filename}: {text}{more}", {"errors": errors})


class _RowError(ValueError):
    """One row's problem (its line is added by the caller)."""


def kind_of(fmt: Format) -> Kind:
    if fmt == "text":
        return "pt"
    return "preference" if fmt == "preference" else "sft"


# --- reading the file ---------------------------------------------------------------------------


def decode_text(data: bytes, filename: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        reason = f"not valid UTF-8 (byte 0x{data[exc.start]:02x} at column {column})"
        raise DatasetInvalid(
            f"{filename}: line {line}: {reason}", {"errors": [{"line": line, "reason": reason}]}
        ) from None
    return text.removeprefix("\ufeff")  # a byte-order mark some editors write


def _layout(text: str, filename: str, fmt: Format | None) -> Literal["plain", "jsonl", "array"]:
    name = filename.lower()
    if name.endswith(PLAIN_SUFFIXES):
        return "plain"
    first = text[_skip_space(text, 0) :][:1]
    if first == "[":
        return "array"
    if first == "{" or name.endswith(JSON_SUFFIXES) or fmt not in (None, "text"):
        return "jsonl"  # whatever it is, JSON was meant: its first line says what is wrong
    return "plain"


def _shape_problem(text: str, outer: int = 0) -> str | None:
    """Why ``text`` (a row, or a whole array file: ``outer`` levels around its rows) must not
    reach json, or None. Linear, in C loops: escapes are dropped, then strings, and what is
    left holds the brackets and numbers."""
    if text.count("[") + text.count("{") <= MAX_DEPTH + outer and not _LONG_NUMBER.search(text):
        return None  # nearly every row: too few brackets to nest that deep, no long digit run
    bare = _STRING.sub("s", _ESCAPE.sub("", text))
    if (dangling := bare.find('"')) >= 0:
        bare = bare[:dangling]  # an unterminated string: json says so, past it is all text
    levels = accumulate(map(_LEVEL.__getitem__, _NOT_BRACKET.sub("", bare)))
    if max(levels, default=0) > MAX_DEPTH + outer:
        return f"nesting deeper than {MAX_DEPTH}"
    if longest := max(map(len, _LONG_NUMBER.findall(bare)), default=0):
        return f"number too long ({longest} characters; at most {MAX_NUMBER_CHARS})"
    return None


def _absurd(exc: RecursionError | ValueError) -> str:
    """What a row json itself gave up on is told (a backstop: _shape_problem comes first)."""
    if isinstance(exc, RecursionError):
        return f"nesting deeper than {MAX_DEPTH}"
    return f"number too long (at most {MAX_NUMBER_CHARS} characters)"  # int()'s 4300 digits


def jsonl_records(text: str, problems: Problems) -> Iterator[tuple[int, Any, int]]:
    first = True
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.removesuffix("\r")
        if not line.strip():
            continue
        if shape := _shape_problem(line):
            problems.add(number, shape)
            first = False
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            hint = " (expected one JSON object per line)" if first else ""
            problems.add(number, f"not valid JSON{hint}: {exc.msg} (column {exc.colno})")
        except (RecursionError, ValueError) as exc:
            problems.add(number, _absurd(exc))
        else:
            yield number, value, len(line)
        first = False


def _array_records(text: str, problems: Problems) -> Iterator[tuple[int, Any, int]]:
    """Elements of a JSON array, each with the line it starts on. A syntax error ends the read:
    past it, nothing is reliably an element."""
    decoder = json.JSONDecoder()
    pos = _skip_space(text, _skip_space(text, 0) + 1)  # past the "["
    line, counted = 1, 0

    def line_at(at: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, at)
        counted = at
        return line

    # The whole file is checked before any of it is parsed; when it fails, each element is
    # checked as it is read, to name the row (json's own guards stop the deepest ones).
    suspect = _shape_problem(text, outer=1) is not None
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:  # bounded: each pass consumes an element, or ends the read
            try:
                value, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                problems.add(exc.lineno, f"not valid JSON: {exc.msg} (column {exc.colno})")
                return
            except (RecursionError, ValueError) as exc:
                problems.add(line_at(pos), _absurd(exc))
                return
            if suspect and (shape := _shape_problem(text[pos:end])):
                problems.add(line_at(pos), shape)
                return
            yield line_at(pos), value, end - pos
            pos = _skip_space(text, end)
            if text.startswith(",", pos):
                pos = _skip_space(text, pos + 1)
                continue
            if text.startswith("]", pos):
                pos += 1
                break
            problems.add(line_at(pos), "not valid JSON: expected ',' or ']' after an element")
            return
    if text[pos:].strip():
        problems.add(line_at(pos), "not valid JSON: text after the closing ']'")


def _plain_records(text: str) -> Iterator[tuple[int, Any, int]]:
    """One ``{"text"}`` record per block of non-blank lines."""
    block: list[str] = []
    start = 0
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.removesuffix("\r")
        if line.strip():
            if not block:
                start = number
            block.append(line)
        elif block:
            doc = "\n".join(block)
            yield start, {"text": doc}, len(doc)
            block = []
    if block:
        doc = "\n".join(block)
        yield start, {"text": doc}, len(doc)


# --- one row per format -------------------------------------------------------------------------


def _type_name(value: Any) -> str:
    names = {dict: "an object", list: "a list", bool: "true/false", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, int | float) else "a string")


def _optional(obj: dict[str, Any], key: str, where: str = "") -> str | None:
    """``obj[key]`` if it is a string, None if it is missing."""
    if key not in obj:
        return None
    value = obj[key]
    if not isinstance(value, str):
        raise _RowError(f"{where}{key!r} must be a string, not {_type_name(value)}")
    return value


def _string(obj: dict[str, Any], key: str, where: str = "") -> str:
    """``obj[key]``, a string that is not blank."""
    value = _optional(obj, key, where)
    if value is None:
        raise _RowError(f"{where}missing {key!r}")
    if not value.strip():
        raise _RowError(f"{where}{key!r} is empty")
    return value


def _alpaca(obj: dict[str, Any]) -> dict[str, Any]:
    instruction = _string(obj, "instruction")
    extra = _optional(obj, "input") or ""
    output = _string(obj, "output")
    system = _optional(obj, "system")
    user = f"{instruction}\n{extra}" if extra.strip() else instruction
    messages = [{"role": "system", "content": system}] if system and system.strip() else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return {"messages": messages}


def _turns(
    obj: dict[str, Any],
    key: str,
    role_key: str,
    text_key: str,
    roles: dict[str, str],
    last: str = "assistant",
) -> dict[str, Any]:
    """Turns under ``obj[key]`` as chat messages, checked for the shape training needs: ending
    with the ``last`` role's turn (a preference row's prompt ends with the user's)."""
    turns = obj.get(key)
    if turns is None:
        raise _RowError(f"missing {key!r}")
    if not isinstance(turns, list) or not turns:
        raise _RowError(f"{key!r} must be a non-empty list of turns")
    shown = {v: k for k, v in roles.items()}  # canonical role -> the format's own word
    messages = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]: "
        if not isinstance(turn, dict):
            raise _RowError(f"{where}a turn must be an object, not {_type_name(turn)}")
        role = _string(turn, role_key, where)
        if role not in roles:
            expected = ", ".join(roles)
            raise _RowError(f"{where}{role_key!r} is {role!r}; expected one of {expected}")
        content = _string(turn, text_key, where)
        messages.append({"role": roles[role], "content": content})
    start = 1 if messages[0]["role"] == "system" else 0
    for i, message in enumerate(messages[start:], start):
        want = "user" if (i - start) % 2 == 0 else "assistant"
        if message["role"] != want:
            raise _RowError(
                f"{key}[{i}]: expected a {shown[want]!r} turn, got {shown[message['role']]!r} "
                f"(an optional {shown['system']!r} turn first, then {shown['user']!r} and "
                f"{shown['assistant']!r} turns alternating)"
            )
    if messages[-1]["role"] != last:
        why = "it is what the model learns" if last == "assistant" else "the replies answer it"
        raise _RowError(f"the last turn must be {shown[last]!r}: {why}")
    return {"messages": messages}


def _sharegpt(obj: dict[str, Any]) -> dict[str, Any]:
    return _turns(obj, "conversations", "from", "value", SHAREGPT_ROLES)


def _chat(obj: dict[str, Any]) -> dict[str, Any]:
    return _turns(obj, "messages", "role", "content", CHAT_ROLES)


def _text(obj: dict[str, Any]) -> dict[str, Any]:
    return {"text": _string(obj, "text")}


def _reply(obj: dict[str, Any], key: str) -> str:
    """The one assistant message under ``obj[key]`` (OpenAI's list of one)."""
    value = obj.get(key)
    if value is None:
        raise _RowError(f"missing {key!r}")
    if not isinstance(value, list) or len(value) != 1 or not isinstance(value[0], dict):
        raise _RowError(f"{key!r} must be a list of one assistant message")
    where = f"{key}[0]: "
    role = _string(value[0], "role", where)
    if role != "assistant":
        raise _RowError(f"{where}'role' is {role!r}; expected 'assistant'")
    return _string(value[0], "content", where)


def _preference(obj: dict[str, Any]) -> dict[str, Any]:
    prompt = obj.get("input")
    if not isinstance(prompt, dict):
        raise _RowError("'input' must be an object with the prompt's 'messages'")
    messages = _turns(prompt, "messages", "role", "content", CHAT_ROLES, last="user")
    chosen = _reply(obj, "preferred_output")
    rejected = _reply(obj, "non_preferred_output")
    if chosen == rejected:
        raise _RowError("the preferred and non-preferred outputs are the same")
    return {**messages, "chosen": chosen, "rejected": rejected}


CONVERTERS: dict[Format, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "alpaca": _alpaca,
    "sharegpt": _sharegpt,
    "chat": _chat,
    "text": _text,
    "preference": _preference,
}


def detect_format(obj: dict[str, Any]) -> Format | None:
    """The format a row's keys suggest, or None."""
    if "preferred_output" in obj or "non_preferred_output" in obj:
        return "preference"
    if "messages" in obj:
        return "chat"
    if "conversations" in obj:
        return "sharegpt"
    if "instruction" in obj or "output" in obj:
        return "alpaca"
    if "text" in obj:
        return "text"
    return None


# --- the whole file -----------------------------------------------------------------------------


def parse_rows(
    data: bytes, filename: str, fmt: Format | None = None, limits: DatasetLimits = DatasetLimits()
) -> tuple[Format, list[Row]]:
    """Every row of the uploaded file, checked and canonical, with the format found (``fmt``
    if given). DatasetInvalid names each problem's line (up to MAX_ERRORS of them)."""
    check_filename(filename)
    if fmt is not None and fmt not in FORMATS:
        raise DatasetInvalid(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if len(data) > limits.max_bytes:
        raise DatasetInvalid(
            f"{filename} is {len(data)} bytes; datasets may be at most {limits.max_bytes}"
        )
    text = decode_text(data, filename)
    problems = Problems(filename)
    layout = _layout(text, filename, fmt)
    if layout == "plain":
        if fmt not in (None, "text"):
            problems.stop(1, f"a plain text file is a 'text' dataset; {fmt!r} needs JSON rows")
        fmt = "text"
        records = _plain_records(text)
    else:
        records = (jsonl_records if layout == "jsonl" else _array_records)(text, problems)
    rows: list[Row] = []
    for line, value, chars in records:
        if chars > limits.max_row_chars:
            problems.add(
                line, f"the row has {chars} characters; the limit is {limits.max_row_chars}"
            )
            continue
        if not isinstance(value, dict):
            problems.add(line, f"a row must be a JSON object, not {_type_name(value)}")
            continue
        if fmt is None:
            fmt = detect_format(value)
            if fmt is None:
                keys = ", ".join(repr(k) for k in list(value)[:8]) or "none"
                problems.stop(
                    line,
                    f"cannot tell the format from its keys ({keys}): expected 'instruction' and "
                    "'output' (alpaca), 'conversations' (sharegpt), 'messages' (chat), 'text' or "
                    "'preferred_output' (preference)",
                )
        try:
            rows.append(Row(line, CONVERTERS[fmt](value)))
        except _RowError as exc:
            problems.add(line, str(exc))
        if len(rows) > limits.max_rows:
            problems.stop(line, f"more than {limits.max_rows} rows; that is the limit")
    problems.raise_()
    if fmt is None or not rows:
        raise DatasetInvalid(f"{filename}: the dataset has no rows")
    return fmt, rows


def _normalise(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _strings(row: dict[str, Any]) -> Iterator[str]:
    if "text" in row:
        yield row["text"]
    else:
        for message in row["messages"]:
            yield message["content"]
        if "chosen" in row:
            yield from (row["chosen"], row["rejected"])


def _digest(parts: Iterable[str]) -> bytes:
    return hashlib.blake2b(
        json.dumps(list(parts), ensure_ascii=False).encode(), digest_size=16
    ).digest()


def deduplicate(rows: list[Row], mode: DedupMode = "normalised") -> tuple[list[Row], DedupReport]:
    """Rows without the duplicates ``mode`` removes, and a count of both kinds found (each row
    against every row before it; the first of equal rows is kept)."""
    exact_seen: set[bytes] = set()
    normal_seen: set[bytes] = set()
    exact = normalised = 0
    kept: list[Row] = []
    for row in rows:
        roles = [m["role"] for m in row.data.get("messages", ())]
        strings = list(_strings(row.data))
        e = _digest([*roles, "\x00", *strings])
        n = _digest([*roles, "\x00", *map(_normalise, strings)])
        drop = False
        if e in exact_seen:
            exact += 1
            drop = mode != "none"
        elif n in normal_seen:
            normalised += 1
            drop = mode == "normalised"
        exact_seen.add(e)
        normal_seen.add(n)
        if not drop:
            kept.append(row)
    return kept, DedupReport(exact, normalised, len(kept), mode)


def count_tokens(rows: Iterable[Row], counter: Callable[[str], int] | None = None) -> int:
    """Tokens in every string of the rows: whitespace-separated words unless ``counter`` (a
    tokenizer's length function) is given."""
    count = counter or (lambda s: len(s.split()))
    return sum(count(s) for row in rows for s in _strings(row.data))


def chat_to_text(row: dict[str, Any]) -> dict[str, Any]:
    """A chat row as one pt document: the turns' contents, separated by a blank line."""
    return {"text": "\n\n".join(m["content"] for m in row["messages"])}


def to_jsonl(rows: Iterable[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in rows)


def convert_line(line: bytes, kind: Kind, as_: Literal["chat", "text"]) -> bytes:
    """One canonical JSONL line of an sft or pt dataset in the ``as_`` form."""
    if as_ == CANONICAL_FORM[kind]:
        return line
    if kind == "pt":
        raise DatasetInvalid("a pt (text) dataset has no turns: it cannot be read as chat")
    if kind == "preference":  # two replies to one prompt: neither one conversation nor text
        raise DatasetInvalid(f"a preference dataset's pairs cannot be read as {as_}")
    return json.dumps(chat_to_text(json.loads(line)), ensure_ascii=False).encode() + b"\n"


def prepare(
    data: bytes,
    filename: str,
    fmt: Format | None = None,
    limits: DatasetLimits = DatasetLimits(),
    dedup: DedupMode = "normalised",
) -> Prepared:
    """Check, convert, de-duplicate and describe an uploaded dataset."""
    found, rows = parse_rows(data, filename, fmt, limits)
    kept, report = deduplicate(rows, dedup)
    return Prepared(
        format=found,
        kind=kind_of(found),
        rows=kept,
        dedup=report,
        tokens=count_tokens(kept),
        canonical=to_jsonl(r.data for r in kept),
    )
