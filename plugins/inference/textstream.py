"""Token ids to text deltas, as a stream: incremental detokenisation that never emits half a
character, and stop sequences that are never shown even when they arrive split across tokens."""

from __future__ import annotations

from typing import Any


class TextStream:
    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""  # decoded so far (minus a trailing incomplete character)
        self.emitted = 0  # chars of ``text`` already handed out
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one generated token; returns the text that may be shown now."""
        self.ids.append(token_id)
        # Decoding the whole completion keeps spacing right for tokenizers whose pieces depend on
        # their neighbours; completions are short next to the model's work per token.
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a multi-byte character still incomplete
            return ""
        self.text = text
        for stop in self.stop:
            at = text.find(stop, max(0, self.emitted - len(stop) + 1))
            if at != -1:
                self.stopped = True
                self.text = text[:at]
                return self._take(len(self.text))
        return self._take(len(text) - self._held_back(text))

    def flush(self) -> str:
        """The rest, once generation ended for another reason than a stop sequence."""
        return self._take(len(self.text))

    def _held_back(self, text: str) -> int:
        """How many trailing chars could be the start of a stop sequence."""
        longest = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def _take(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        out = self.text[self.emitted : upto]
        self.emitted = upto
        return out


def token_texts(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each token's share of the text ``ids`` decode to (empty while a multi-byte character is
    still incomplete, or for a special token). Decodes a short window at a time, as vLLM's
    incremental detokenizer does, so a long echoed prompt costs linear time."""
    out: list[str] = []
    start = done = 0  # the window decoded from; the tokens up to ``done`` are handed out
    for i in range(len(ids)):
        before = tokenizer.decode(ids[start:done], skip_special_tokens=True)
        now = tokenizer.decode(ids[start : i + 1], skip_special_tokens=True)
        if len(now) <= len(before) or now.endswith("\ufffd"):
            out.append("")
            continue
        out.append(now[len(before) :])
        start, done = done, i + 1
    return out
