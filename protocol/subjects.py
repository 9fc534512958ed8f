"""Subjects and addresses.

Subjects are dot-separated tokens (``metrics.gpu-1``); patterns may use ``*`` for one token and
a final ``>`` for one or more. Subjects beginning with ``$`` belong to brokers. Agent addresses are
``agent`` or ``agent/plugin``. All are validated before use: they come from the network.
"""

from __future__ import annotations

import re
from typing import TypeVar

from atoll.protocol.errors import ProtocolError

K = TypeVar("K")
V = TypeVar("V")
MAX_SUBJECT = 256
MAX_TOKENS = 16
_TOKEN = re.compile(r"[A-Za-z0-9_\-:]{1,64}")
_NAME = re.compile(r"[a-z0-9][a-z0-9_\-]{0,62}")


def check_name(name: str, what: str = "name") -> str:
    """Agent, plugin and tenant names: lower-case, digits, '-' and '_', 1-63 characters."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ProtocolError(f"invalid {what} {name!r}: use a-z, 0-9, '-', '_' (1-63 chars)")
    return name


# Valid results only, bounded: addresses and subjects repeat on every message of a hot path.
_CACHE_LIMIT = 65536
_addresses: dict[str, tuple[str, str | None]] = {}
_subjects: dict[tuple[str, bool, bool], list[str]] = {}


def _remember(cache: dict[K, V], key: K, value: V) -> None:
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()
    cache[key] = value


def split_address(address: str) -> tuple[str, str | None]:
    """``agent`` or ``agent/plugin`` -> (agent, plugin or None)."""
    if type(address) is not str:
        raise ProtocolError("address must be a string")
    hit = _addresses.get(address)
    if hit is not None:
        return hit
    agent, sep, plugin = address.partition("/")
    check_name(agent, "agent name")
    result = (agent, check_name(plugin, "plugin name") if sep else None)
    _remember(_addresses, address, result)
    return result


def check_subject(subject: str, *, pattern: bool = False, system: bool = False) -> list[str]:
    """Validate a subject (or, with ``pattern``, a subscription pattern); return its tokens."""
    if type(subject) is str:
        hit = _subjects.get((subject, pattern, system))
        if hit is not None:
            return hit
    tokens = _check_subject(subject, pattern, system)
    _remember(_subjects, (subject, pattern, system), tokens)
    return tokens


def _check_subject(subject: str, pattern: bool, system: bool) -> list[str]:
    if not isinstance(subject, str) or not subject or len(subject) > MAX_SUBJECT:
        raise ProtocolError(f"subject must be 1-{MAX_SUBJECT} characters")
    tokens = subject.split(".")
    if len(tokens) > MAX_TOKENS:
        raise ProtocolError(f"subject has more than {MAX_TOKENS} tokens")
    for i, tok in enumerate(tokens):
        if i == 0 and tok.startswith("$"):
            if not system:
                raise ProtocolError(f"subject {subject!r} is reserved for brokers")
            if not _TOKEN.fullmatch(tok[1:]):  # "$" marks a literal token, never a wildcard
                raise ProtocolError(f"invalid subject token {tok!r} in {subject!r}")
            continue
        if pattern and tok == "*":
            continue
        if pattern and tok == ">" and i == len(tokens) - 1:
            continue
        if not _TOKEN.fullmatch(tok):
            raise ProtocolError(f"invalid subject token {tok!r} in {subject!r}")
    return tokens


def matches(pattern_tokens: list[str], subject_tokens: list[str]) -> bool:
    for i, p in enumerate(pattern_tokens):
        if p == ">":
            return len(subject_tokens) > i
        if i >= len(subject_tokens):
            return False
        if p != "*" and p != subject_tokens[i]:
            return False
    return len(pattern_tokens) == len(subject_tokens)


class SubjectIndex:
    """Patterns -> values with a per-subject match cache (invalidated on every change).

    Subscribe/unsubscribe are rare next to publications, so caching the match list per subject
    makes fan-out a dict lookup in the common case.
    """

    def __init__(self, cache_limit: int = 65536) -> None:
        self._patterns: dict[object, tuple[list[str], object]] = {}
        self._cache: dict[str, list[object]] = {}
        self._cache_limit = cache_limit

    def add(self, key: object, pattern: str, value: object) -> None:
        self._patterns[key] = (pattern.split("."), value)
        self._cache.clear()

    def remove(self, key: object) -> None:
        if self._patterns.pop(key, None) is not None:
            self._cache.clear()

    def __len__(self) -> int:
        return len(self._patterns)

    def match(self, subject: str) -> list[object]:
        hit = self._cache.get(subject)
        if hit is not None:
            return hit
        tokens = subject.split(".")
        found = [v for ptoks, v in self._patterns.values() if matches(ptoks, tokens)]
        if len(self._cache) >= self._cache_limit:
            self._cache.clear()
        self._cache[subject] = found
        return found
