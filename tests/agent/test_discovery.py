"""Discovery over a real broker: kept announcements, liveness, selection; the metrics feed with
real psutil figures and its access rules."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from types import SimpleNamespace
from typing import cast

import psutil
import pytest

from atoll.agent.discovery import Discovery, Entry, Status
from atoll.agent.errors import Forbidden
from atoll.agent.identity import AgentKeys
from atoll.agent.node import Agent
from atoll.agent.plugins import Plugin
from atoll.agent.watch import TenantWatch
from support.overlay import eventually


class FakeInference(Plugin):
    name = "inference"

    def __init__(self, queue: int, adapters: list[str]) -> None:
        super().__init__()
        self.queue, self.adapters = queue, adapters

    def describe(self) -> dict:
        return {
            "capabilities": {"base_model": "smollm2", "adapters": self.adapters},
            "load": {"queue_depth": self.queue},
        }


async def test_announcements_liveness_and_selection(operator, broker, make_agent) -> None:
    fast = {"heartbeat": 0.2, "labels": {"phi": "true"}}
    gpu1 = await make_agent("gpu-1", **fast)
    await gpu1.host.add("inference", plugin=FakeInference(5, ["a1", "a2"]))
    gpu2 = await make_agent("gpu-2", heartbeat=0.2)
    await gpu2.host.add("inference", plugin=FakeInference(1, ["a2"]))
    await asyncio.sleep(0.3)  # one heartbeat: announcements now carry the inference plugin

    watcher = await make_agent("watcher", roles=("admin",), heartbeat=0.2)
    events: list[dict] = []
    view = Discovery(watcher.agent, publish_events=True, tick=0.05)
    view.listeners.append(events.append)
    published = await watcher.agent.subscribe("discovery.events.*")
    await view.start()
    await watcher.agent.flush()
    # Kept announcements: the late subscriber knows everyone at once.
    assert {"gpu-1", "gpu-2", "watcher"} <= set(view.entries)
    e1 = view.entries["gpu-1"]
    assert e1.labels == {"phi": "true"} and "inference" in e1.plugins and e1.status is Status.ACTIVE
    await eventually(lambda: view.entries["gpu-1"].load.get("queue_depth") == 5)

    assert [e.name for e in view.select("inference", load_key="queue_depth")] == ["gpu-2", "gpu-1"]
    assert [e.name for e in view.select("inference", {"adapters": "a1"})] == ["gpu-1"]
    assert [e.name for e in view.select(labels={"phi": "true"})] == ["gpu-1"]
    assert view.select("inference", {"base_model": "other"}) == []

    # A new agent appears within one heartbeat.
    await make_agent("late", heartbeat=2.0)
    await eventually(lambda: "late" in view.entries, timeout=2.0)  # within one heartbeat

    # An agent that dies without a word goes STALE, then LOST.
    gpu2.announcer._task.cancel()
    await gpu2.agent.link.stop()
    await eventually(lambda: view.entries["gpu-2"].status is Status.STALE, timeout=3)
    await eventually(lambda: view.entries["gpu-2"].status is Status.LOST, timeout=3)
    trail = [(e["before"], e["status"]) for e in events if e["agent"] == "gpu-2"]
    assert trail == [(None, "ACTIVE"), ("ACTIVE", "STALE"), ("STALE", "LOST")]
    assert await _seen(published, "gpu-2", "LOST")  # ... and published for the tenant
    assert view.select("inference") == [view.entries["gpu-1"]]

    # A clean stop says so: LOST at once.
    await gpu1.stop()
    await eventually(lambda: view.entries["gpu-1"].status is Status.LOST, timeout=1)
    await view.stop()


async def _seen(sub, agent: str, status: str) -> bool:
    while True:
        event = (await sub.next(timeout=2)).data
        if event["agent"] == agent and event["status"] == status:
            return True


async def test_metrics_feed_real_values_and_access(operator, broker, make_agent) -> None:
    worker = await make_agent("worker", metrics_interval=0.2)
    worker.host.plugins["system"].ctx.metrics.counter("pings", "pings served").inc(3)
    admin = await make_agent("admin", roles=("admin",))
    plain = await make_agent("plain")
    outsider = await make_agent("spy", tenant="globex", roles=("admin",))

    watch = await TenantWatch(admin.agent).start()
    await eventually(lambda: "worker" in watch.metrics, timeout=5)
    feed = watch.metrics["worker"]
    vm = psutil.virtual_memory()
    assert feed["system"]["memory"]["total_bytes"] == vm.total
    assert len(feed["system"]["cpu"]["per_cpu"]) == psutil.cpu_count()
    assert feed["system"]["net"]["recv_bytes_per_s"] >= 0
    assert feed["plugins"]["system"]["pings"]["series"][0]["value"] == 3
    rows = {r["name"]: r for r in watch.rows()}
    assert rows["worker"]["metrics"] is feed and rows["worker"]["status"] == "ACTIVE"

    # A plain member may not ask for others' metrics, nor for a pattern wider than its roles.
    for pattern in (">", "metrics.*", "metrics.worker"):
        with pytest.raises(Forbidden, match=f"may not subscribe '{re.escape(pattern)}'"):
            await plain.agent.subscribe(pattern)
    everything = await plain.agent.subscribe("discovery.announce.*")
    own = await plain.agent.subscribe("metrics.plain")
    await plain.agent.flush()
    await asyncio.sleep(0.6)
    subjects = set()
    while not everything.queue.empty():
        subjects.add(everything.queue.get_nowait().subject)
    assert "discovery.announce.worker" in subjects
    assert own.queue.empty() or own.queue.get_nowait().src == "plain"
    # Another tenant's admin sees nothing of this tenant at all.
    spy_sub = await outsider.agent.subscribe("metrics.*")
    await outsider.agent.flush()
    await asyncio.sleep(0.5)
    seen = set()
    while not spy_sub.queue.empty():
        seen.add(spy_sub.queue.get_nowait().src)
    assert seen <= {"spy"}
    await watch.stop()


async def test_non_admin_metrics_subscription_is_refused(operator, broker) -> None:
    agent = Agent(AgentKeys.issue(operator, "acme", "nosy", ["agent"]), [broker.url])
    await agent.start(5)
    try:
        refusals: list[str] = []

        def note(record: logging.LogRecord) -> bool:
            refusals.append(record.getMessage())
            return True

        agent.log.logger.addFilter(note)
        # Past the agent's own check (the same table): the broker refuses it too.
        agent._allowed[("subscribe", "metrics.other")] = True
        await agent.subscribe("metrics.other")
        await agent.subscribe("metrics.nosy")  # its own feed is fine
        await agent.flush()
        assert any("may not subscribe to 'metrics.other'" in m for m in refusals)
        assert sum("broker_error" in m for m in refusals) == 1
    finally:
        await agent.stop()


def test_liveness_does_not_count_the_time_we_could_not_hear() -> None:
    """A stalled link of ours (our broker hung) is no news of anyone else: others stay ACTIVE
    while our own announcements are overdue, and when ours come back the outage is not counted
    as their silence; one still silent for 6 beats of our hearing time is then LOST."""
    t = time.time()
    view = Discovery(cast(Agent, SimpleNamespace(name="gw")))
    view.heard(Entry("gw", interval=1.0, announced_at=t - 10, seen_at=t - 10))
    gpu = Entry("gpu", interval=1.0, announced_at=t - 10.5, seen_at=t - 10.5)
    view.heard(gpu)
    assert view.status(gpu, t) is Status.ACTIVE  # we have heard nothing for 10 s: nor them

    def ours(at: float) -> None:  # our own heartbeat, heard
        view.heard(Entry("gw", interval=1.0, announced_at=at, seen_at=at))

    ours(t)  # our link is back
    assert view.blind(t) == pytest.approx(8.5)  # overdue from 1.5 beats after the last one
    assert view.status(gpu, t) is Status.ACTIVE  # not LOST the moment we recover
    ours(t + 1)
    assert view.status(gpu, t + 1.5) is Status.STALE  # 2 beats before the outage, 1.5 after
    for beat in range(2, 5):
        ours(t + beat)
    assert view.blind(t + 4.5) == pytest.approx(8.5)
    assert view.status(gpu, t + 4.5) is Status.LOST
    fresh = Entry("gpu", interval=1.0, announced_at=t + 4, seen_at=t + 4)
    view.heard(fresh)  # heard after the outage: its silence counts in full again
    assert view.status(fresh, t + 4.5) is Status.ACTIVE
    assert view.status(fresh, t + 5.4) is Status.ACTIVE  # blind again from t + 5.5
    assert view.status(fresh, t + 20) is Status.ACTIVE  # we have been deaf since
    for beat in range(5, 11):
        ours(t + beat)
    assert view.status(fresh, t + 10.1) is Status.LOST  # 6.1 beats, all heard
    bare = Discovery(cast(Agent, SimpleNamespace(name="cli")))  # announces nothing itself
    assert bare.blind(t) == 0.0 and bare.status(gpu, t) is Status.LOST


async def test_an_agents_watchers_share_one_view(make_agent) -> None:
    """Plugins of one agent that watch (the gateway, a training queue, `atoll up`'s liveness
    events) share one subscription to every announcement; the last to stop ends it."""
    rt = await make_agent("gw", roles=("gateway",), heartbeat=0.2)
    await make_agent("n1", heartbeat=0.2)
    ctx = rt.host.plugins["system"].ctx
    first = await ctx.discovery()
    second = await ctx.discovery(publish_events=True)
    watch = await ctx.watch()
    assert first is second is watch.discovery and first.publish_events
    subscribed = [s for s in rt.agent._subs.values() if s.pattern == "discovery.announce.*"]
    assert len(subscribed) == 1
    await eventually(lambda: "n1" in first.entries)
    await watch.stop()
    await first.stop()
    assert first._sub is not None  # one user left
    await second.stop()
    assert first._sub is None and first._task is None
    again = await ctx.discovery()  # started afresh when wanted again
    assert again is first and again._sub is not None
    await again.stop()
