"""The decoding engine of the ``local`` backend: one thread that owns the model and runs
continuous batching.

Between two decoding steps the engine runs queued commands (marking an adapter's pool slot
ready: the loading itself happens on the pool's loader thread, pool.py), admits waiting requests
— up to ``max_batch`` rows and ``max_adapters`` distinct adapters per step, rows whose slot is not
ready yet passed over — prefills them as one padded batch and joins them to the running batch;
rows that finished or were cancelled leave at once. Each step is one forward pass over every
running row, each row through its own slot. Events reach the asyncio side via each row's
thread-safe ``emit``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from atoll.agent.errors import AtollError, InternalError
from atoll.plugins.inference.batching import PaddedBatch, prefill_inputs
from atoll.plugins.inference.collections import CollectionSlots, Member
from atoll.plugins.inference.contract import (
    BackendUnavailable,
    FinishEvent,
    FinishReason,
    TokenEvent,
    Usage,
)
from atoll.plugins.inference.pool import BASE, AdapterPool
from atoll.plugins.inference.sampling import Sampler
from atoll.plugins.inference.textstream import TextStream, token_texts

MAX_SKIPS = 8  # steps a request may be passed over by later ones before admission turns FIFO
RATE_WINDOW = 10.0  # seconds of history behind tokens_per_s

log = logging.getLogger(__name__)
Emit = Callable[[TokenEvent | FinishEvent | AtollError], None]


@dataclass(eq=False)
class Row:
    """One request inside the engine."""

    prompt: list[int]
    slot: int  # the adapter's pool slot, or BASE
    sampler: Sampler
    text: TextStream
    max_new: int
    stop_ids: frozenset[int]
    emit: Emit
    model: str
    adapter_id: str | None
    logprobs: bool = False
    top: int = 0  # alternatives reported with each logprob
    echo: bool = False  # the prompt's tokens go out first (with their logprobs if asked)
    generated: int = 0
    seen: list[int] = field(default_factory=list)
    cancelled: bool = False
    done: bool = False
    skipped: int = 0
    on_start: Callable[[], object] | None = None  # called (engine thread) as it joins the batch
    member: Member = None  # served by a compressed collection's core (collections.py)

    def __post_init__(self) -> None:
        self.seen = list(self.prompt)


class Engine:
    def __init__(
        self,
        model: Any,
        pad_id: int,
        device: str = "cpu",
        max_batch: int = 16,
        max_adapters: int = 8,
        max_prefill_tokens: int = 4096,
    ) -> None:
        self.model = model
        self.pool: AdapterPool | None = None  # adapters by slot, hooked into the model's layers
        self.collections: CollectionSlots | None = None  # compressed collections, hooked too
        self.pad_id = pad_id
        self.device = device
        self.max_batch = max_batch
        self.max_adapters = max_adapters
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Row] = deque()
        self.batch: PaddedBatch | None = None
        self._commands: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._recent: deque[tuple[float, int]] = deque()
        self.steps = 0

    # --- control (any thread) ----------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="atoll-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def submit(self, row: Row) -> None:
        with self._cond:
            if self._stopping:
                raise BackendUnavailable("the inference engine is stopping")
            self.waiting.append(row)
            self._cond.notify()

    def cancel(self, row: Row) -> None:
        """Drop a row before its next step (its caller went away)."""
        row.cancelled = True

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``fn`` on the engine thread between steps (model changes must not race a step)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._stopping:
                raise BackendUnavailable("the inference engine is stopping")
            self._commands.append((fn, fut))
            self._cond.notify()
        return fut

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def running(self) -> int:
        return len(self.batch) if self.batch else 0

    def tokens_per_s(self) -> float:
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self._recent) if now - t <= RATE_WINDOW]
        if not recent:
            return 0.0
        span = max(now - recent[0][0], 1.0)
        return sum(n for _, n in recent) / span

    # --- the engine thread -------------------------------------------------------------------

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                while not (self._stopping or self._commands or self.waiting or self.batch):
                    self._cond.wait()
                if self._stopping:
                    break
                commands = list(self._commands)
                self._commands.clear()
            for fn, fut in commands:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except BaseException as exc:
                        fut.set_exception(exc)
            joiners: list[Row] = []
            try:
                joiners = self._admit()
                if joiners:
                    self._prefill(joiners)
                elif self.batch:
                    self._decode()
            except Exception as exc:
                log.exception("inference step failed")
                self._fail_all(InternalError(f"inference step failed: {exc}"), joiners)
        self._fail_all(BackendUnavailable("the inference engine stopped"))
        with self._cond:
            for _, fut in self._commands:
                fut.cancel()

    def _admit(self) -> list[Row]:
        with self._cond:
            running = self.batch.rows if self.batch else []
            adapters = {r.slot for r in running} - {BASE}
            ranks = self.pool.ranks if self.pool else [0]
            room = self.max_batch - len(running)
            chosen: list[Row] = []
            kept: deque[Row] = deque()
            tokens = 0
            blocked = False  # an old request waits: nobody may overtake it any more
            for row in self.waiting:
                if row.cancelled:
                    continue
                if row.slot != BASE and not ranks[row.slot]:
                    kept.append(row)  # its adapter's slot turns ready at the next command run
                    continue
                fits = (
                    not blocked
                    and len(chosen) < room
                    and (
                        row.slot in adapters
                        or row.slot == BASE
                        or len(adapters) < self.max_adapters
                    )
                    and (not chosen or tokens + len(row.prompt) <= self.max_prefill_tokens)
                )
                if fits:
                    chosen.append(row)
                    tokens += len(row.prompt)
                    if row.slot != BASE:
                        adapters.add(row.slot)
                else:
                    row.skipped += 1
                    blocked = blocked or row.skipped > MAX_SKIPS
                    kept.append(row)
            self.waiting = kept
        for row in chosen:
            if row.on_start is not None:
                row.on_start()
        return chosen

    def _forward(
        self, inputs: dict[str, Any], rows: list[Row], every_position: bool = False
    ) -> tuple[torch.Tensor, Any]:
        """Logits ([rows, positions, vocab]: the last position only unless ``every_position``)
        and the cache."""
        keep = 0 if every_position else 1  # transformers' 0: keep them all
        with contextlib.ExitStack() as stack:
            # A cancelled row's adapter may be evicted and its slot rewritten under this step.
            if self.pool is not None:
                stack.enter_context(self.pool.rows([BASE if r.cancelled else r.slot for r in rows]))
            if self.collections is not None:
                members = [None if r.cancelled else r.member for r in rows]
                stack.enter_context(self.collections.rows(members))
            out = self.model(**inputs, logits_to_keep=keep)
        return out.logits, out.past_key_values

    def _prefill(self, rows: list[Row]) -> None:
        inputs = prefill_inputs([r.prompt for r in rows], self.pad_id, self.device)
        scoring = any(r.echo and r.logprobs for r in rows)
        logits, cache = self._forward(inputs, rows, every_position=scoring)
        for i, row in enumerate(rows):
            if row.echo:
                self._echo(row, logits[i, -len(row.prompt) : -1] if row.logprobs else None)
        joined = PaddedBatch(cache, inputs["attention_mask"], torch.empty(0), rows)
        joined.advance(inputs["attention_mask"], cache, self._sample(rows, logits[:, -1, :]))
        if self.batch is None:
            self.batch = joined
        else:
            self.batch.extend(joined)
        self._retire()

    def _decode(self) -> None:
        batch = self.batch
        assert batch is not None
        inputs = batch.step_inputs()
        logits, cache = self._forward(inputs, batch.rows)
        batch.advance(inputs["attention_mask"], cache, self._sample(batch.rows, logits[:, -1, :]))
        self._retire()

    def _echo(self, row: Row, logits: torch.Tensor | None) -> None:
        """The prompt's tokens as events; ``logits`` (the positions before each token after the
        first, left padding already cut off) give their logprobs."""
        texts = token_texts(row.text.tokenizer, row.prompt)
        if logits is None:
            for token, text in zip(row.prompt, texts, strict=True):
                row.emit(TokenEvent(text=text, token_id=token, echo=True))
            return
        logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
        targets = torch.tensor(row.prompt[1:], dtype=torch.long)
        picked = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
        row.emit(TokenEvent(text=texts[0], token_id=row.prompt[0], echo=True))
        for k in range(1, len(row.prompt)):
            row.emit(
                TokenEvent(
                    text=texts[k],
                    token_id=row.prompt[k],
                    logprob=picked[k - 1],
                    top=self._top(row, logprobs[k - 1]),
                    echo=True,
                )
            )

    @staticmethod
    def _top(row: Row, logprobs: torch.Tensor) -> list[tuple[str, float]] | None:
        """The row's ``top`` likeliest tokens under ``logprobs`` (one position's), best first."""
        if not row.top:
            return None
        values, ids = torch.topk(logprobs, row.top)
        decode = row.text.tokenizer.decode
        return [(decode([i]), v) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]

    def _sample(self, rows: list[Row], logits: torch.Tensor) -> list[int]:
        chosen = []
        produced = 0
        logits = logits.float().cpu()  # samplers use CPU generators, so seeds repeat anywhere
        for i, row in enumerate(rows):
            if row.cancelled or row.done:
                chosen.append(self.pad_id)
                continue
            seen = torch.tensor(row.seen) if row.sampler.params.repetition_penalty != 1.0 else None
            token, logprob = row.sampler.choose(logits[i], seen)
            chosen.append(token)
            row.generated += 1
            row.seen.append(token)
            produced += 1
            stop = token in row.stop_ids
            # A stop token has no text, but a caller scoring tokens counts it (lm-eval's last).
            if stop and not row.logprobs:
                self._finish(row, "stop")
                continue
            delta = "" if stop else row.text.push(token)
            top = self._top(row, torch.log_softmax(logits[i], dim=-1)) if row.top else None
            row.emit(
                TokenEvent(
                    text=delta,
                    token_id=token,
                    logprob=logprob if row.logprobs else None,
                    top=top,
                )
            )
            if stop:
                self._finish(row, "stop")
                continue
            if row.text.stopped:
                self._finish(row, "stop")
            elif row.generated >= row.max_new:
                self._finish(row, "length")
        self.steps += 1
        now = time.monotonic()
        self._recent.append((now, produced))
        while self._recent and now - self._recent[0][0] > RATE_WINDOW:
            self._recent.popleft()
        return chosen

    def _finish(self, row: Row, reason: FinishReason) -> None:
        rest = row.text.flush() if not row.text.stopped else ""
        if rest:
            row.emit(TokenEvent(text=rest))
        row.done = True
        usage = Usage(prompt_tokens=len(row.prompt), completion_tokens=row.generated)
        row.emit(
            FinishEvent(finish_reason=reason, usage=usage, model=row.model, adapter=row.adapter_id)
        )

    def _retire(self) -> None:
        batch = self.batch
        assert batch is not None
        keep = [i for i, r in enumerate(batch.rows) if not (r.done or r.cancelled)]
        if keep:
            batch.keep(keep)
        else:
            self.batch = None

    def _fail_all(self, error: AtollError, joiners: list[Row] = ()) -> None:  # type: ignore[assignment]
        rows = [*joiners, *(self.batch.rows if self.batch else [])]
        with self._cond:
            rows += list(self.waiting)
            self.waiting.clear()
        self.batch = None
        for row in rows:
            if not (row.done or row.cancelled):
                row.done = True
                row.emit(error)
