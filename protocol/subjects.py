"""Subjects and addresses.

Subjects are dot-separated tokens (``metrics.gpu-1``); patterns may use ``*`` for one token and
a final ``>`` for one or more. Subjects beginning with ``$`` belong to brokers. Agent addresses are
``agent`` or ``agent/plugin`` inside the sender's tenant; an agent of another tenant, reachable
only through an operator-signed grant (``atoll.protocol.grants``), is ``agent@tenant`` or
``agent@tenant/plugin``: names never hold ``@``, so a qualified address cannot be mistaken for an
in-tenant one. All are validated before use: they come from the network.
"""

from __future__ import annotations

import re
from collections.abc import ItemsView, ValuesView
from typing import Generic, TypeVar

from atoll.protocol.errors import ProtocolError

K = TypeVar("K")
V = TypeVar("V")
MAX_SUBJECT = 256
# Brokers' own notices to a tenant's admins, in clear (brokers hold no payload key): who a broker
# refused at the handshake, and why (``$SYS.refused.agent.<name>``, ``...broker.<name>``).
REFUSALS = "$SYS.refused"
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


def split_remote(address: str) -> tuple[str, str | None, str | None]:
    """``agent[@tenant][/plugin]`` -> (agent, tenant or None, plugin or None)."""
    if type(address) is not str:
        raise ProtocolError("address must be a string")
    where, sep, plugin = address.partition("/")
    agent, at, tenant = where.partition("@")
    check_name(agent, "agent name")
    return (
        agent,
        check_name(tenant, "tenant name") if at else None,
        check_name(plugin, "plugin name") if sep else None,
    )


def peer_name(address: str) -> str:
    """Whose key seals to ``address``: ``agent``, or ``agent@tenant`` in another tenant."""
    agent, tenant, _ = split_remote(address)
    return agent if tenant is None else f"{agent}@{tenant}"


def qualify(address: str, tenant: str) -> str:
    """An in-tenant address (``agent[/plugin]``) as another tenant names it."""
    agent, sep, plugin = address.partition("/")
    return f"{agent}@{tenant}{sep}{plugin}"


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


class _Node(Generic[K, V]):
    """One token's level of a subject trie."""

    __slots__ = ("children", "here", "star", "tail")

    def __init__(self) -> None:
        self.children: dict[str, _Node[K, V]] = {}
        self.star: _Node[K, V] | None = None  # a "*" token
        self.tail: dict[K, V] = {}  # patterns ending in ">" here
        self.here: dict[K, V] = {}  # patterns (or subjects) ending here

    def empty(self) -> bool:
        return not (self.children or self.star or self.tail or self.here)


class SubjectIndex(Generic[K, V]):
    """Patterns -> values, matched against subjects (NATS's sublist): a token trie, so a match
    costs the subject's depth rather than the number of patterns, and a per-subject cache of
    matches that a change invalidates only where the changed pattern matches.
    """

    def __init__(self, cache_limit: int = 4096) -> None:
        self._root: _Node[K, V] = _Node()
        self._patterns: dict[K, list[str]] = {}
        self._cache: dict[str, list[V]] = {}
        self._cache_limit = cache_limit

    def add(self, key: K, pattern: str, value: V) -> None:
        """Index ``value`` under ``pattern``; a key added again moves to its new pattern."""
        self.remove(key)
        tokens = pattern.split(".")
        node = self._root
        for i, tok in enumerate(tokens):
            if tok == ">" and i == len(tokens) - 1:
                node.tail[key] = value
                break
            if tok == "*":
                if node.star is None:
                    node.star = _Node()
                node = node.star
            else:
                node = node.children.setdefault(tok, _Node())
        else:
            node.here[key] = value
        self._patterns[key] = tokens
        self._invalidate(tokens)

    def remove(self, key: K) -> None:
        tokens = self._patterns.pop(key, None)
        if tokens is None:
            return
        path: list[tuple[_Node[K, V], str]] = []  # (parent, token) to prune emptied levels
        node = self._root
        for i, tok in enumerate(tokens):
            if tok == ">" and i == len(tokens) - 1:
                del node.tail[key]
                break
            path.append((node, tok))
            child = node.star if tok == "*" else node.children[tok]
            assert child is not None  # added along this very path
            node = child
        else:
            del node.here[key]
        for parent, tok in reversed(path):
            child = parent.star if tok == "*" else parent.children[tok]
            if child is None or not child.empty():
                break
            if tok == "*":
                parent.star = None
            else:
                del parent.children[tok]
        self._invalidate(tokens)

    def _invalidate(self, pattern: list[str]) -> None:
        if "*" not in pattern and ">" not in pattern:
            self._cache.pop(".".join(pattern), None)  # a literal pattern: one subject
            return
        for subject in [s for s in self._cache if matches(pattern, s.split("."))]:
            del self._cache[subject]

    def __len__(self) -> int:
        return len(self._patterns)

    def match(self, subject: str) -> list[V]:
        hit = self._cache.get(subject)
        if hit is not None:
            return hit
        found: list[V] = []
        _collect(self._root, subject.split("."), 0, found)
        if len(self._cache) >= self._cache_limit:
            self._cache.clear()
        self._cache[subject] = found
        return found


def _collect(node: _Node[K, V], tokens: list[str], i: int, out: list[V]) -> None:
    if i == len(tokens):
        out.extend(node.here.values())
        return
    out.extend(node.tail.values())  # ">" takes one or more tokens: there is at least one left
    child = node.children.get(tokens[i])
    if child is not None:
        _collect(child, tokens, i + 1, out)
    if node.star is not None:
        _collect(node.star, tokens, i + 1, out)


class SubjectTable(Generic[V]):
    """Subjects -> values, found by pattern: what a broker keeps for new subscribers. A pattern
    walks only the branches it can match, so a subscription to one subject costs a lookup, not a
    scan of every kept subject."""

    def __init__(self) -> None:
        self._root: _Node[str, V] = _Node()
        self._values: dict[str, V] = {}

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, subject: str) -> bool:
        return subject in self._values

    def get(self, subject: str) -> V | None:
        return self._values.get(subject)

    def items(self) -> ItemsView[str, V]:
        return self._values.items()

    def values(self) -> ValuesView[V]:
        return self._values.values()

    def put(self, subject: str, value: V) -> None:
        if subject not in self._values:
            node = self._root
            for tok in subject.split("."):
                node = node.children.setdefault(tok, _Node())
            node.here[subject] = value
        else:
            self._leaf(subject).here[subject] = value
        self._values[subject] = value

    def pop(self, subject: str) -> V | None:
        value = self._values.pop(subject, None)
        if value is None:
            return None
        path: list[tuple[_Node[str, V], str]] = []
        node = self._root
        for tok in subject.split("."):
            path.append((node, tok))
            node = node.children[tok]
        del node.here[subject]
        for parent, tok in reversed(path):
            if not parent.children[tok].empty():
                break
            del parent.children[tok]
        return value

    def _leaf(self, subject: str) -> _Node[str, V]:
        node = self._root
        for tok in subject.split("."):
            node = node.children[tok]
        return node

    def matching(self, pattern: str) -> list[V]:
        """The values of the kept subjects ``pattern`` matches."""
        tokens = pattern.split(".")
        if "*" not in tokens and ">" not in tokens:
            hit = self._values.get(pattern)
            return [] if hit is None else [hit]
        out: list[V] = []
        _walk(self._root, tokens, 0, out)
        return out


def _walk(node: _Node[str, V], pattern: list[str], i: int, out: list[V]) -> None:
    if i == len(pattern):
        out.extend(node.here.values())
        return
    tok = pattern[i]
    if tok == ">":
        for child in node.children.values():
            _everything(child, out)
    elif tok == "*":
        for child in node.children.values():
            _walk(child, pattern, i + 1, out)
    elif tok in node.children:
        _walk(node.children[tok], pattern, i + 1, out)


def _everything(node: _Node[str, V], out: list[V]) -> None:
    out.extend(node.here.values())
    for child in node.children.values():
        _everything(child, out)
