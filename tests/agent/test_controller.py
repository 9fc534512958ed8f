"""Declarative pipelines on a real broker and agents: a controller places echo inference on the
labelled agents, replaces a replica whose agent dies, moves one when the selector changes, rolls
a config change out one agent at a time with the service never fully down, halts a rollout
whose start fails (one try, reported); a standby takes over with the pipelines when the active
controller is LOST, and the old active, back with an older file, takes its successor's state;
calls are made on each replica; roles without the permission are refused, bad specs named."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from atoll.agent.errors import Forbidden, InvalidRequest
from atoll.agent.node import Agent
from atoll.agent.runtime import AgentRuntime
from atoll.broker.server import BrokerServer
from atoll.plugins.controller.contract import (
    NotActive,
    PipelineStatus,
    active_controller,
    apply_pipeline,
    delete_pipeline,
    list_pipelines,
    pipeline_status,
)
from atoll.plugins.controller.plugin import ControllerPlugin
from support.overlay import AgentFactory, eventually

HB = 0.2  # heartbeat: LOST after 6 missed, 1.2 s
FAST = {"interval": 0.2, "backoff": 30.0}


def inference(model: str, **where: Any) -> dict[str, Any]:
    where = where or {"labels": {"gpu": "true"}}
    config = {"backend": "echo", "echo": {"model": model}}
    return {"plugin": "inference", "replicas": 2, "where": where, "config": config}


def pipeline(**services: dict[str, Any]) -> dict[str, Any]:
    return {"name": "llm", "services": services}


def runs(rt: AgentRuntime) -> str | None:
    """The echo model ``rt``'s inference plugin serves, if it runs."""
    plugin = rt.host.plugins.get("inference")
    if plugin is None or plugin.state != "running":
        return None
    return str(plugin.ctx.config["echo"]["model"])


async def applied(op: Agent, spec: dict[str, Any]) -> PipelineStatus:
    """Applied through the active controller, once one sees itself in discovery."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return await apply_pipeline(op, await active_controller(op), spec)
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


@pytest.fixture
async def watcher() -> AsyncIterator[Callable[[Callable[[], bool]], None]]:
    """Samples a condition every few ms in the background; fails the test if it was ever false."""
    tasks: list[asyncio.Task[None]] = []
    broken: list[str] = []

    def watch(check: Callable[[], bool]) -> None:
        async def sample() -> None:
            while True:
                if not check():
                    broken.append("condition broken")
                await asyncio.sleep(0.005)

        tasks.append(asyncio.create_task(sample()))

    yield watch
    for task in tasks:
        task.cancel()
    assert not broken


async def test_a_pipeline_is_placed_replaced_moved_and_rolled_out(
    make_agent: AgentFactory, watcher: Callable[[Callable[[], bool]], None]
) -> None:
    ctl = await make_agent("ctl", roles=("controller",), plugins={"controller": FAST}, heartbeat=HB)
    nodes = {
        n: await make_agent(n, roles=("inference",), labels={"gpu": "true"}, heartbeat=HB)
        for n in ("n1", "n2", "n3", "n4")
    }
    cpu = await make_agent("cpu", roles=("inference",), heartbeat=HB)  # no gpu label
    op = (await make_agent("op", roles=("operator",))).agent
    live = dict(nodes)

    def serving(model: str | None = None) -> set[str]:
        return {n for n, rt in live.items() if (m := runs(rt)) and (model is None or m == model)}

    status = await applied(op, pipeline(inf=inference("m1")))
    assert (status.revision, status.active, status.controller) == (1, True, "ctl")
    await eventually(lambda: len(serving("m1")) == 2, 10)
    assert runs(cpu) is None
    first = sorted(serving())

    # An agent dies (no goodbye): its replica is replaced on another within seconds.
    victim = first[0]
    await live.pop(victim).agent.stop()
    started = time.monotonic()
    await eventually(lambda: len(serving("m1")) == 2, 10)
    assert time.monotonic() - started < 8
    status = await pipeline_status(op, "ctl", "llm")
    assert any(e.kind == "lost" and e.agent == victim for e in status.events)

    # The selector changes: a replica moves off the agent it no longer names, placed first.
    keep, leave = sorted(serving())
    spare = next(n for n in live if n not in (keep, leave))
    watching = [True]  # until the pipeline is deleted
    watcher(lambda: not watching[0] or bool(serving()))
    await applied(op, pipeline(inf=inference("m1", agents=[keep, spare])))
    await eventually(lambda: serving("m1") == {keep, spare}, 10)

    # A config change rolls out one agent at a time: never fully down.
    await applied(op, pipeline(inf=inference("m2", agents=[keep, spare])))
    await eventually(lambda: serving("m2") == {keep, spare}, 10)
    status = await pipeline_status(op, "ctl", "llm")
    (service,) = status.services
    assert (service.desired, service.actual, service.state) == (2, 2, "converged")
    rolled = [e for e in status.events if e.kind == "reconfigured"]
    assert sorted(e.agent for e in rolled) == [keep, spare]

    # A config the plugin cannot start with: the first agent rolls back, the rollout halts,
    # reported once; the other agent is never touched.
    bad = inference("m3", agents=[keep, spare])
    bad["config"]["echo"]["delay"] = "slow"
    await applied(op, pipeline(inf=bad))

    async def halted() -> PipelineStatus:
        return await pipeline_status(op, "ctl", "llm")

    for _ in range(100):
        status = await halted()
        if status.services[0].state == "halted":
            break
        await asyncio.sleep(0.1)
    assert status.services[0].state == "halted"
    await asyncio.sleep(1.0)  # no retry in a hot loop
    failed = [e for e in (await halted()).events if e.kind == "failed"]
    assert len(failed) == 1 and "rollout halted" in failed[0].message
    assert serving("m2") == {keep, spare}

    # Deleted: every replica removed, then the pipeline forgotten.
    watching[0] = False
    await delete_pipeline(op, "ctl", "llm")
    await eventually(lambda: not serving(), 10)
    plugin = ctl.host.plugins["controller"]
    assert isinstance(plugin, ControllerPlugin)
    await eventually(lambda: not plugin.store.pipelines, 5)


async def test_a_standby_takes_over_with_the_pipelines_when_the_active_is_lost(
    make_agent: AgentFactory, broker: BrokerServer, watcher: Callable[[Callable[[], bool]], None]
) -> None:
    controllers = [
        await make_agent(n, roles=("controller",), plugins={"controller": FAST}, heartbeat=HB)
        for n in ("ctl-a", "ctl-b")
    ]
    nodes = {
        n: await make_agent(n, roles=("inference",), labels={"gpu": "true"}, heartbeat=HB)
        for n in ("n1", "n2", "n3")
    }
    op = (await make_agent("op", roles=("operator",))).agent
    status = await applied(op, pipeline(inf=inference("m1")))
    assert status.controller == "ctl-a"
    standby = controllers[1].host.plugins["controller"]
    assert isinstance(standby, ControllerPlugin)
    await eventually(lambda: "llm" in standby.store.pipelines, 5)
    with pytest.raises(NotActive, match="standby; the active one is 'ctl-a'"):
        await apply_pipeline(op, "ctl-b", pipeline(inf=inference("m1")))
    await eventually(lambda: sum(runs(rt) == "m1" for rt in nodes.values()) == 2, 10)

    dead = controllers[0]
    await dead.agent.stop()  # the active controller dies (no goodbye)
    await dead.host.stop_all()  # and nothing of it runs on in this process
    deadline = time.monotonic() + 10
    while await active_controller(op) != "ctl-b":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    placed = [n for n, rt in nodes.items() if runs(rt)]
    await nodes[placed[0]].agent.stop()
    live = {n: rt for n, rt in nodes.items() if n != placed[0]}
    await eventually(lambda: all(runs(rt) == "m1" for rt in live.values()), 10)
    status = await pipeline_status(op, "ctl-b", "llm")
    assert status.active and status.services[0].actual == 2
    status = await apply_pipeline(op, "ctl-b", pipeline(inf=inference("m2")))
    assert status.revision == 2
    await eventually(lambda: all(runs(rt) == "m2" for rt in live.values()), 10)

    # Back with its older state file, ctl-a is the active one again: it takes ctl-b's newer
    # state before acting, so nothing is rolled back to m1.
    watcher(lambda: all(runs(rt) == "m2" for rt in live.values()))
    back = await AgentRuntime.start(
        dead.host.data_dir, [broker.url], {"controller": FAST}, keys=dead.agent.keys, heartbeat=HB
    )
    try:
        deadline = time.monotonic() + 10
        while await active_controller(op) != "ctl-a":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        for _ in range(50):
            status = await pipeline_status(op, "ctl-a", "llm")
            if status.revision == 2:
                break
            await asyncio.sleep(0.1)
        assert status.active and status.revision == 2
        await asyncio.sleep(1.0)  # a few steps of the returned controller: m2 stays (watcher)
    finally:
        await back.stop()


async def test_who_may_apply_and_what_is_refused(make_agent: AgentFactory) -> None:
    await make_agent("ctl", roles=("controller",), plugins={"controller": FAST}, heartbeat=HB)
    op = (await make_agent("op", roles=("operator",))).agent
    admin = (await make_agent("adm", roles=("admin",))).agent
    other = (await make_agent("ctl2", roles=("controller",))).agent  # no plugin: a caller
    gateway = (await make_agent("gw", roles=("gateway",))).agent
    spec = pipeline(inf=inference("m1"))
    await applied(op, spec)

    for caller in (admin, other, gateway):  # only operators decide what runs where
        with pytest.raises(Forbidden, match="may not use 'apply'"):
            await caller.call("ctl/controller", "apply", {"spec": spec})
        with pytest.raises(Forbidden, match="may not use 'delete'"):
            await caller.call("ctl/controller", "delete", {"name": "llm"})
    assert [p.name for p in await list_pipelines(admin, "ctl")] == ["llm"]  # admins may read
    assert (await pipeline_status(admin, "ctl", "llm")).revision == 1
    assert await list_pipelines(gateway, "ctl")  # for its admins' Pipelines page
    inference_node = (await make_agent("node", roles=("inference",))).agent
    for caller in (other, inference_node):
        with pytest.raises(Forbidden, match="may not use 'list'"):
            await list_pipelines(caller, "ctl")
    with pytest.raises(Forbidden, match="may not use 'sync'"):
        await op.call("ctl/controller", "sync", {"state": {}})

    async def refused(services: dict[str, Any]) -> str:
        with pytest.raises(InvalidRequest) as caught:
            await op.call("ctl/controller", "apply", {"spec": pipeline(**services)})
        return str(caught.value)

    assert "no plugin 'nosuch'; installed:" in await refused({"a": {"plugin": "nosuch"}})
    bad_config = {"plugin": "inference", "config": {"backend": "echo", "extra": 1}}
    assert "service 'a': plugin 'inference' config: extra: Extra inputs" in await refused(
        {"a": bad_config}
    )
    assert "a.where.zone: Extra inputs" in await refused(
        {"a": {"plugin": "inference", "where": {"zone": "x"}}}
    )
    with pytest.raises(InvalidRequest, match="no pipeline 'nope' \\(applied: llm\\)"):
        await pipeline_status(op, "ctl", "nope")
    renamed = pipeline(inf={"plugin": "training", "config": {"mode": "trainer"}})
    with pytest.raises(InvalidRequest, match="new plugin kind needs a new service name"):
        await apply_pipeline(op, "ctl", renamed)


async def test_calls_are_made_on_each_replica_and_a_failed_one_is_an_event(
    make_agent: AgentFactory,
) -> None:
    await make_agent("ctl", roles=("controller",), plugins={"controller": FAST}, heartbeat=HB)
    node = await make_agent("n1", roles=("inference",), labels={"gpu": "true"}, heartbeat=HB)
    op = (await make_agent("op", roles=("operator",))).agent
    service = inference("m1") | {"replicas": 1}
    service["config"]["callers"] = ["operator", "controller"]  # the calls come from it
    service["calls"] = [
        {"method": "health"},
        {"method": "load_adapter", "params": {"id": "alice/sql", "pinned": True}},  # echo: no
    ]
    await applied(op, pipeline(inf=service))
    await eventually(lambda: runs(node) == "m1", 10)
    for _ in range(50):
        status = await pipeline_status(op, "ctl", "llm")
        failed = [e for e in status.events if e.kind == "failed"]
        if failed:
            break
        await asyncio.sleep(0.1)
    (event,) = failed
    assert event.agent == "n1" and event.message.startswith("call load_adapter failed: ")
    assert "echo backend manages its own adapters" in event.message
    assert status.services[0].state == "converged"  # the replica runs: it counts
