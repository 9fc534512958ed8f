"""Training examples from canonical dataset files (storage's ``chat``, ``text`` and
``preference`` JSONL): sft conversations rendered with a chat template and labelled on the
assistant's tokens only; pt text joined and cut into blocks; dpo pairs as the prompt's tokens and
each reply's (TRL's shape). Runs in the job's process (it needs a tokenizer)."""

from __future__ import annotations

import bisect
import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE = -100  # label of a token the loss skips
# input_ids, labels (packed: and position_ids); dpo: prompt_ids, chosen_ids, rejected_ids
Example = dict[str, list[int]]

TEMPLATES = {
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
        "<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
        "{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] "
        "{{ m['content'] }} [/INST]{% elif m['role'] == 'assistant' %}{{ m['content'] }}"
        "{{ eos_token }}{% else %}{{ m['content'] }}\n\n{% endif %}{% endfor %}"
    ),
    "zephyr": (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    ),
    "alpaca": (
        "{% for m in messages %}{% if m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}"
        "\n\n{% elif m['role'] == 'assistant' %}### Response:\n{{ m['content'] }}{{ eos_token }}"
        "\n\n{% else %}{{ m['content'] }}\n\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}### Response:\n{% endif %}"
    ),
}


class DataError(ValueError):
    """A dataset file or template this job cannot train on; the message says where and why."""


def read_rows(path: Path, key: str) -> Iterator[Any]:
    """The ``key`` field of each JSONL line of ``path``."""
    for row in read_objects(path, key):
        yield row[key]


def read_objects(path: Path, key: str) -> Iterator[dict[str, Any]]:
    """Each JSONL line of ``path``, an object with a ``key`` field."""
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise DataError(f"{path.name} line {number}: not JSON ({exc})") from None
            if not isinstance(row, dict) or key not in row:
                raise DataError(f"{path.name} line {number}: no {key!r} field")
            yield row


def chat_template(tokenizer: PreTrainedTokenizerBase, template: str) -> str:
    if template != "default":
        return TEMPLATES[template]
    if not tokenizer.chat_template:
        names = ", ".join(sorted(TEMPLATES))
        raise DataError(f"the model's tokenizer has no chat template; name one of {names}")
    return tokenizer.chat_template


def _render(tokenizer: Any, template: str, messages: list[dict], prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=prompt
    )


def assistant_spans(
    tokenizer: PreTrainedTokenizerBase, template: str, messages: list[dict[str, str]]
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of each assistant reply (with the
    template's end-of-turn text after it), found by rendering the conversation up to each
    reply: the template must render a conversation's beginning as a prefix of the whole."""
    text = _render(tokenizer, template, messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = _render(tokenizer, template, messages[:i], True) if i else ""
        through = _render(tokenizer, template, messages[: i + 1], False)
        if not (text.startswith(before) and text.startswith(through)):
            raise DataError(
                "the chat template does not render a conversation's beginning as a prefix of "
                "the whole, so the assistant's tokens cannot be found; name another template"
            )
        spans.append((len(before), len(through)))
    return text, spans


def sft_example(
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    messages: list[dict[str, str]],
    cutoff_len: int,
    last_only: bool = False,
) -> Example | None:
    """A conversation's tokens (at most ``cutoff_len``), labelled on assistant replies only
    (``last_only``: the last one); None when no assistant token is left to learn from."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise DataError("a chat row's messages must be a list of {role, content} objects")
    text, spans = assistant_spans(tokenizer, template, messages)
    spans = spans[-1:] if last_only else spans
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = encoded["input_ids"][:cutoff_len]
    labels = [IGNORE] * len(ids)
    for j, (start, _end) in enumerate(encoded["offset_mapping"][: len(ids)]):
        if any(a <= start < b for a, b in spans):
            labels[j] = ids[j]
    if all(label == IGNORE for label in labels):
        return None
    return {"input_ids": ids, "labels": labels}


def pt_examples(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], cutoff_len: int
) -> list[Example]:
    """Documents joined (each ended by EOS) and cut into blocks of ``cutoff_len`` tokens."""
    if tokenizer.eos_token_id is None:
        raise DataError("the model's tokenizer has no end-of-sequence token to join documents")
    stream: list[int] = []
    for text in texts:
        if not isinstance(text, str):
            raise DataError("a text row's text must be a string")
        stream += tokenizer(text, add_special_tokens=False)["input_ids"]
        stream.append(tokenizer.eos_token_id)
    blocks = [stream[i : i + cutoff_len] for i in range(0, len(stream), cutoff_len)]
    return [{"input_ids": b, "labels": list(b)} for b in blocks if len(b) > 1]


def preference_example(
    tokenizer: PreTrainedTokenizerBase, template: str, row: dict[str, Any], cutoff_len: int
) -> Example | None:
    """A pair in TRL's tokenized shape: ``prompt_ids`` (the whole prompt, earlier answers too)
    and each reply's tokens after it (``chosen_ids``, ``rejected_ids``: the reply and what the
    template ends its turn with), rendered with the job's template; None when either reply is
    cut off entirely."""
    prompt = row.get("messages")
    if not isinstance(prompt, list) or not all(
        isinstance(row.get(k), str) for k in ("chosen", "rejected")
    ):
        raise DataError("a preference row needs messages, chosen and rejected")
    sides = []
    for side in ("chosen", "rejected"):
        messages = [*prompt, {"role": "assistant", "content": row[side]}]
        example = sft_example(tokenizer, template, messages, cutoff_len, last_only=True)
        if example is None:
            return None
        ids, labels = example["input_ids"], example["labels"]
        sides.append((ids, next(i for i, label in enumerate(labels) if label != IGNORE)))
    (chosen, at_c), (rejected, at_r) = sides
    # The prompt ends where the reply starts, or sooner where the two sides' tokens differ
    # (a merge across the boundary): both replies then start at the same place.
    start = next(
        (i for i, (a, b) in enumerate(zip(chosen[:at_c], rejected[:at_r], strict=False)) if a != b),
        min(at_c, at_r),
    )
    return {
        "prompt_ids": chosen[:start],
        "chosen_ids": chosen[start:],
        "rejected_ids": rejected[start:],
    }


def build_examples(
    tokenizer: PreTrainedTokenizerBase,
    stage: str,
    paths: Sequence[Path],
    template: str,
    cutoff_len: int,
) -> tuple[list[Example], int]:
    """(examples, rows read) from the job's dataset files."""
    if stage == "pt":
        texts = [t for p in paths for t in read_rows(p, "text")]
        return pt_examples(tokenizer, texts, cutoff_len), len(texts)
    if not tokenizer.is_fast:
        raise DataError(f"{stage} needs a fast tokenizer (it maps tokens back to characters)")
    chosen = chat_template(tokenizer, template)
    examples, rows = [], 0
    for path in paths:
        for number, row in enumerate(read_objects(path, "messages"), 1):
            rows += 1
            try:
                if stage == "dpo":
                    example = preference_example(tokenizer, chosen, row, cutoff_len)
                else:
                    example = sft_example(tokenizer, chosen, row["messages"], cutoff_len)
            except DataError as exc:
                raise DataError(f"{path.name} row {number}: {exc}") from None
            if example is not None:
                examples.append(example)
    return examples, rows


def hold_out(
    examples: list[Example], share: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """(training, validation): ``share`` of the examples (at least one), drawn with ``seed``,
    held out for validation; both keep the examples' order."""
    held = max(1, round(len(examples) * share))
    if held >= len(examples):
        raise DataError(
            f"validation_split {share} of {len(examples)} examples leaves none to train on"
        )
    chosen = set(random.Random(seed).sample(range(len(examples)), held))
    kept = [e for i, e in enumerate(examples) if i not in chosen]
    return kept, [e for i, e in enumerate(examples) if i in chosen]


def pack(examples: list[Example], width: int) -> list[Example]:
    """sft and pt examples laid end to end in rows of at most ``width`` tokens (best fit,
    longest first), each with its own ``position_ids`` from 0: transformers then masks attention
    by them (its packed-sequence mask: a token sees only earlier tokens of its own example, as
    FlashAttention's variable-length kernels do). An example's first token is never a label, so
    none learns to continue the one before it."""
    rows: list[Example] = []
    rooms: list[tuple[int, int]] = []  # (room left, row), sorted
    for e in sorted(examples, key=lambda e: -len(e["input_ids"])):
        n = len(e["input_ids"])
        at = bisect.bisect_left(rooms, (n, -1))
        if at == len(rooms):
            rows.append({"input_ids": [], "labels": [], "position_ids": []})
            room, row = width, len(rows) - 1
        else:
            room, row = rooms.pop(at)
        packed = rows[row]
        packed["input_ids"] += e["input_ids"]
        packed["labels"] += [IGNORE, *e["labels"][1:]]
        packed["position_ids"] += range(n)
        if room - n > 0:
            bisect.insort(rooms, (room - n, row))
    return rows


def collate(batch: list[Example], pad_id: int) -> dict[str, Any]:
    """Right-padded tensors: padding is masked from the loss, and from attention by the mask
    or, for packed rows, by positions of its own (0, 1, ...: a sequence of its own). ``tokens``
    counts the real ones (the trainer pops it before the model sees the batch)."""
    import torch

    width = max(len(e["input_ids"]) for e in batch)
    packed = "position_ids" in batch[0]
    ids, labels, mask, positions = [], [], [], []
    for e in batch:
        pad = width - len(e["input_ids"])
        ids.append(e["input_ids"] + [pad_id] * pad)
        labels.append(e["labels"] + [IGNORE] * pad)
        if packed:
            positions.append(e["position_ids"] + list(range(pad)))
        else:
            mask.append([1] * len(e["input_ids"]) + [0] * pad)
    out: dict[str, Any] = {
        "input_ids": torch.tensor(ids),
        "labels": torch.tensor(labels),
        "tokens": torch.tensor(sum(len(e["input_ids"]) for e in batch)),
    }
    if packed:
        out["position_ids"] = torch.tensor(positions)
        # transformers derives the packed-sequence mask only when no cache is made: with one
        # (its default, even in training) every token would see the whole row.
        out["use_cache"] = False
    else:
        out["attention_mask"] = torch.tensor(mask)
    return out
