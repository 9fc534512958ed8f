"""Per-key and per-project rate limits, kept in memory: requests and tokens per sliding minute and
concurrent requests. A request must pass the limits of its key and of its key's project; the one
that frees last is the one reported. Gateways sharing a database add what the others admitted
(``others``, from accounts/rate_shares.py) to their own counts."""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING

from atoll.plugins.gateway.accounts.rate_shares import Scope, Share
from atoll.plugins.gateway.contract import Limits
from atoll.plugins.gateway.errors import GatewayError

if TYPE_CHECKING:
    from atoll.plugins.gateway.accounts.keys import Principal

WINDOW_S = 60.0
SWEEP_EVERY_S = 60.0  # how often idle windows are dropped (one pass over all of them)
BUSY_RETRY_S = 1.0  # a concurrency slot frees when some request ends: no better estimate
SHARED_RETRY_S = 1.0  # the other gateways' use is known again at the next exchange
NOBODY = Share()


class _Sliding:
    """Amounts over the last WINDOW_S seconds, in one bucket per second (at most 61 buckets
    whatever the rate). A bucket expires WINDOW_S after its latest addition: at most a second
    later than exact, never earlier."""

    def __init__(self) -> None:
        self.buckets: deque[list[float]] = deque()  # [second, latest time, amount]
        self.total = 0.0

    def add(self, now: float, amount: float) -> None:
        second = math.floor(now)
        if self.buckets and self.buckets[-1][0] >= second:
            last = self.buckets[-1]
            last[1] = max(last[1], now)
            last[2] += amount
        else:
            self.buckets.append([second, now, amount])
        self.total += amount

    def prune(self, now: float) -> None:
        while self.buckets and now - self.buckets[0][1] >= WINDOW_S:
            self.total -= self.buckets.popleft()[2]
        if not self.buckets:
            self.total = 0.0  # no float drift survives an empty window

    def frees_in(self, now: float, limit: int) -> float:
        """Seconds until the total is below ``limit`` again, as buckets expire."""
        total = self.total
        for _, latest, amount in self.buckets:
            total -= amount
            if total < limit:
                return max(0.0, latest + WINDOW_S - now)
        return 0.0


@dataclass
class _Window:
    """What one key or project is doing now."""

    requests: _Sliding = field(default_factory=_Sliding)
    tokens: _Sliding = field(default_factory=_Sliding)
    active: int = 0

    def prune(self, now: float) -> None:
        self.requests.prune(now)
        self.tokens.prune(now)

    def idle(self) -> bool:
        return self.active == 0 and not self.requests.buckets and not self.tokens.buckets


@dataclass(frozen=True)
class _Refusal:
    message: str
    retry_after: float


def _frees_in(sliding: _Sliding, now: float, limit: int, others: float) -> float:
    """Seconds until this gateway's part is below what the other gateways leave of ``limit``."""
    if others >= limit:
        return SHARED_RETRY_S
    return max(sliding.frees_in(now, math.ceil(limit - others)), 0.0)


def _refusals(
    scope: str, limits: Limits, window: _Window, others: Share, now: float
) -> list[_Refusal]:
    out: list[_Refusal] = []
    rpm, tpm, concurrent = limits.requests_per_min, limits.tokens_per_min, limits.concurrent
    if rpm is not None and window.requests.total + others.requests >= rpm:
        wait = _frees_in(window.requests, now, rpm, others.requests)
        out.append(_Refusal(f"{scope} is at its limit of {rpm} requests per minute", wait))
    if tpm is not None and (used := int(window.tokens.total + others.tokens)) >= tpm:
        wait = _frees_in(window.tokens, now, tpm, others.tokens)
        out.append(_Refusal(f"{scope} used {used} tokens in the last minute (limit {tpm})", wait))
    if concurrent is not None and window.active + others.active >= concurrent:
        out.append(_Refusal(f"{scope} has {concurrent} requests running (its limit)", BUSY_RETRY_S))
    return out


class Permit:
    """One admitted request. ``charge(n)`` counts tokens as they are spent (the prompt at
    admission, each completion token as it is sent), so concurrent requests see them at once and
    a client that disconnects has paid for what it got. ``done(tokens)`` (or leaving the
    ``with`` block) settles the request at its final count and frees its concurrency slot;
    only the first call counts."""

    def __init__(self, limiter: RateLimiter, windows: list[_Window]) -> None:
        self._limiter = limiter
        self._windows = windows
        self._done = False
        self.charged = 0

    def charge(self, tokens: int) -> None:
        if tokens > 0 and self._windows and not self._done:
            self._limiter._charge(self, tokens)
        self.charged += max(0, tokens)

    def done(self, tokens: int | None = None) -> None:
        """Settle at ``tokens`` in all (None: what was charged)."""
        if tokens is not None and (type(tokens) is not int or tokens < 0):
            raise ValueError(f"tokens must be a non-negative integer, not {tokens!r}")
        self._limiter._release(self, self.charged if tokens is None else tokens)

    def __enter__(self) -> Permit:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.done()  # a no-op when the body already reported its tokens

    async def __aenter__(self) -> Permit:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.done()


class RateLimiter:
    """Admits requests against key and project limits. Memory: one window per key or project
    seen in the last minute (idle ones are swept), each at most 2 x 61 buckets."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._windows: dict[Scope, _Window] = {}
        self._others: dict[Scope, Share] = {}  # the other gateways', as last exchanged
        self._lock = threading.Lock()  # a Permit may be released from a worker thread
        self._swept = clock()

    def __len__(self) -> int:
        """Windows held now (keys and projects with recent or running requests)."""
        return len(self._windows)

    def admit(
        self, principal: Principal, key_limits: Limits | None, project_limits: Limits | None
    ) -> Permit:
        """A Permit for one request, or GatewayError 429 naming the limit and when it frees."""
        if project_limits is not None and principal.project is None:
            raise ValueError("project limits given for a key that belongs to no project")
        scopes: list[tuple[str, Limits, Scope]] = []
        if key_limits is not None:
            scopes.append((f"key {principal.key_id}", key_limits, ("key", principal.key_id)))
        if project_limits is not None and principal.project is not None:
            name = f"project {principal.project}"
            scopes.append((name, project_limits, ("project", principal.project)))
        with self._lock:
            now = self._clock()
            self._sweep(now)
            windows: list[_Window] = []
            refusals: list[_Refusal] = []
            for scope, limits, ident in scopes:
                window = self._windows.setdefault(ident, _Window())
                window.prune(now)
                others = self._others.get(ident, NOBODY)
                refusals += _refusals(scope, limits, window, others, now)
                windows.append(window)
            if refusals:
                worst = max(refusals, key=lambda r: r.retry_after)
                wait = max(1, math.ceil(worst.retry_after))
                raise GatewayError(
                    429,
                    f"rate limit: {worst.message}; retry in {wait} s",
                    code="rate_limit_exceeded",
                    retry_after=worst.retry_after,
                )
            for window in windows:
                window.requests.add(now, 1)
                window.active += 1
            return Permit(self, windows)

    def shares(self) -> dict[Scope, Share]:
        """What each limited key and project did through this gateway in the last minute."""
        with self._lock:
            now = self._clock()
            out = {}
            for ident, window in self._windows.items():
                window.prune(now)
                if not window.idle():
                    out[ident] = Share(window.requests.total, window.tokens.total, window.active)
            return out

    def set_others(self, others: dict[Scope, Share]) -> None:
        """The other gateways' use, as just exchanged (replacing what was known)."""
        with self._lock:
            self._others = others

    def _charge(self, permit: Permit, tokens: int) -> None:
        with self._lock:
            now = self._clock()
            for window in permit._windows:
                window.tokens.add(now, tokens)

    def _release(self, permit: Permit, tokens: int) -> None:
        with self._lock:
            if permit._done:
                return
            permit._done = True
            now = self._clock()
            # What was charged as it was spent stays (no refunds: a negative amount in a later
            # bucket would outlive the charge it offsets and drift the window); the rest of the
            # final count lands now.
            rest = max(0, tokens - permit.charged)
            for window in permit._windows:
                if rest:
                    window.tokens.add(now, rest)
                window.active -= 1

    def _sweep(self, now: float) -> None:
        if now - self._swept < SWEEP_EVERY_S:
            return
        self._swept = now
        for ident, window in list(self._windows.items()):
            window.prune(now)
            if window.idle():
                del self._windows[ident]
