"""Standbys kept in step with the active controller: its whole state (``reconcile.State``)
pushed to each standby that lacks it, and a standby's state taken instead when it is newer by
its (term, version) stamp (a controller that came back with an older file, or a standby that
was active meanwhile). The state is all in one message: pipelines and placements are small,
and a whole copy needs no log to replay."""

from __future__ import annotations

import asyncio
import time

from atoll.agent.errors import AtollError
from atoll.agent.plugins import PluginContext
from atoll.plugins.controller.contract import PLUGIN, SYNC, SyncReply
from atoll.plugins.controller.reconcile import State

PUSH_TIMEOUT_S = 2.0  # a standby that does not answer is tried again at the next step
# Pushed again after this even if nothing changed: a standby that restarted with an older file
# is brought back in step within it.
REFRESH_S = 10.0


class Replicas:
    """The active controller's side: which stamp each standby holds."""

    def __init__(self, ctx: PluginContext) -> None:
        self.ctx = ctx
        # standby -> (the stamp it holds, when it said so)
        self.synced: dict[str, tuple[tuple[int, int], float]] = {}

    async def push(self, state: State, standbys: list[str]) -> State | None:
        """``state`` to each of ``standbys`` that lacks it; the newest state one of them holds
        beyond it (to be taken instead), if any."""
        data = {"state": state.model_dump(mode="json")}

        async def one(name: str) -> SyncReply | None:
            try:
                raw = await self.ctx.call(f"{name}/{PLUGIN}", SYNC.name, data, PUSH_TIMEOUT_S)
                return SYNC.check_reply(raw)
            except AtollError as exc:  # a standby that is going away: the next step tries
                self.ctx.log.info("controller.sync_failed", standby=name, error=exc)
                return None

        newest: State | None = None
        now = time.monotonic()
        held = {n: self.synced.get(n) for n in standbys}
        todo = [n for n, h in held.items()
                if h is None or h[0] != state.stamp() or now - h[1] > REFRESH_S]  # fmt: skip
        for name, reply in zip(todo, await asyncio.gather(*map(one, todo)), strict=True):
            if reply is None:
                continue
            self.synced[name] = (reply.stamp, now)
            if reply.state is not None and reply.stamp > (newest or state).stamp():
                newest = State.model_validate(reply.state)
        return newest


def answer(mine: State, incoming: State) -> tuple[State | None, SyncReply]:
    """A standby's side of a push: the state to keep instead of ``mine`` (None: keep it) and
    the reply (with ``mine`` when it is the newer)."""
    if incoming.stamp() > mine.stamp():
        return incoming, SyncReply(stamp=incoming.stamp())
    newer = mine.model_dump(mode="json") if mine.stamp() > incoming.stamp() else None
    return None, SyncReply(stamp=mine.stamp(), state=newer)
