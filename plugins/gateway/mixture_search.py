"""The search for a mixture's weights (sans-I/O): candidates out, their scores in.

MELT's "mixture of adapters" and LoraHub weigh a few candidate adapters by a gradient-free search
on a small labelled set (LoraHub: Nevergrad's CMA-ES over weights in [-1.5, 1.5]). Atoll's
mixtures are merged by peft, whose linear merge takes a weight's square root, so weights stay in
[0, ``HIGH``]; the search is a compass (pattern) search, deterministic so a search over the same
rows finds the same winner, and with few parameters it needs few trials:

1. seeds: every merge strategy asked for at equal weights, then each adapter alone with the
   best strategy so far;
2. from the best point, one sweep moves each weight up and down by the step; when a sweep finds
   nothing better the step halves, until it is below ``MIN_STEP`` or the trials run out.

A trial that cannot be merged (peft refuses it) scores ``-inf`` and the search goes on.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from atoll.plugins.inference.contract import MergeStrategy

HIGH = 1.5  # the largest weight tried
FIRST_STEP = 0.5
MIN_STEP = 1 / 16
BETTER = 1e-9  # a score must beat the best by more to count: ties keep the earlier point


@dataclass(frozen=True)
class Candidate:
    weights: tuple[float, ...]  # one per adapter, in the search's order
    merge_strategy: MergeStrategy


class WeightSearch:
    """Proposes up to ``trials`` distinct candidates over ``n`` adapters; ``tell`` each score."""

    def __init__(self, n: int, strategies: list[MergeStrategy], trials: int) -> None:
        if n < 1 or not strategies or trials < 1:
            raise ValueError("a search needs adapters, a merge strategy and a trial")
        self.n = n
        self.trials = trials
        self.step = FIRST_STEP
        self.seen: set[Candidate] = set()
        self.best: tuple[Candidate, float] | None = None
        self._pending: deque[Candidate] = deque()
        self._asked = 0
        self._told = 0
        self._phase = "strategies"
        self._improved = False  # in the sweep under way
        equal = tuple(round(1 / n, 4) for _ in range(n))
        self._queue([Candidate(equal, s) for s in strategies])

    def next(self) -> Candidate | None:
        """The next candidate to score, or None when the search is over. Call ``tell`` with
        its score before asking again."""
        if self._asked > self._told:
            raise RuntimeError("tell the last candidate's score first")
        if self._asked >= self.trials:
            return None
        while not self._pending:
            if not self._plan():
                return None
        self._asked += 1
        return self._pending.popleft()

    def tell(self, candidate: Candidate, score: float) -> None:
        self._told += 1
        if self.best is None or score > self.best[1] + BETTER:
            if self.best is not None and self._phase == "sweep":
                self._improved = True
            self.best = (candidate, score)

    def _plan(self) -> bool:
        """Queue the next round; False when there is none."""
        assert self.best is not None  # the first round is queued at the start
        point, strategy = self.best[0].weights, self.best[0].merge_strategy
        if self._phase == "strategies":
            self._phase = "alone"
            alone = [tuple(1.0 if j == i else 0.0 for j in range(self.n)) for i in range(self.n)]
            return self._queue([Candidate(w, strategy) for w in alone]) or self._plan()
        if self._phase == "sweep" and not self._improved:
            self.step /= 2
        self._phase, self._improved = "sweep", False
        while self.step >= MIN_STEP:
            moves = []
            for i in range(self.n):
                for sign in (1, -1):
                    w = list(point)
                    w[i] = round(min(HIGH, max(0.0, w[i] + sign * self.step)), 4)
                    moves.append(Candidate(tuple(w), strategy))
            if self._queue(moves):
                return True
            self.step /= 2  # every move at this step was tried already
        return False

    def _queue(self, candidates: list[Candidate]) -> bool:
        """Queue those not seen and not all zero; whether any was."""
        fresh = [c for c in candidates if c not in self.seen and any(c.weights)]
        self.seen.update(fresh)
        self._pending.extend(fresh)
        return bool(fresh)
