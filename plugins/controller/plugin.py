"""The ``controller`` plugin: keeps the tenant's declarative pipelines running.

Any agent whose credential holds the ``controller`` role may run it; the active one is the
first name, in order, among live agents doing so (``contract.leader``: every controller and
client computes it from discovery, no election round), the others are standbys. Every step the
active one brings the standbys to its state (``replication.py``), and records a placement, and
tells them, before it makes it; a controller taking over starts a new term once it has taken
any newer state. So a standby already holds the desired state when the active goes LOST, and
nothing but the controllers' own data dirs keeps it: no shared store to set up or to lose. The
state is kept 0600 (configs may hold secrets).

Each step, for the active one: the agents as discovery and the metrics feed show them (with
what a system plugin's reply said, until the agent's next announcement tells more), the
sans-I/O ``reconcile.plan`` for each pipeline, its actions run through the agents' ``system``
plugins, one per service, concurrently across services. A failed action backs off for that
agent, doubling up to ``backoff_max``; a failed config change also halts that service's rollout
until a new config is applied (the system plugin ran the old config again): an event, never a
hot loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from atoll.agent.contract import parse
from atoll.agent.discovery import Status
from atoll.agent.errors import AtollError, InvalidRequest
from atoll.agent.plugins import Plugin, PluginContext, available_plugins, rpc
from atoll.agent.watch import TenantWatch
from atoll.plugins.controller.contract import (
    APPLY,
    DELETE,
    DIFF,
    MAX_EVENTS,
    PLUGIN,
    ROLE,
    STATUS,
    SYNC,
    Event,
    NotActive,
    PipelineSpec,
    PipelineStatus,
    leader,
)
from atoll.plugins.controller.reconcile import (
    Action,
    AgentView,
    ServiceState,
    State,
    StoredPipeline,
    change_error,
    diff,
    gpu_memory,
    plan,
    record_placements,
    running_plugins,
    same_kinds,
)
from atoll.plugins.controller.replication import Replicas, answer
from atoll.protocol.session import CallInfo
from atoll.tenancy.keys import write_secret
from atoll.tenancy.permissions import CLIENTS

OPERATORS = ("operator",)  # what runs where is the operator's call (as the system plugin's)
STATE_FILE = "state.json"
_METHODS = {"add": "plugin_add", "reconfigure": "plugin_reconfigure", "remove": "plugin_remove"}
_DONE = {"add": "placed", "reconfigure": "reconfigured", "remove": "removed"}


class ControllerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    interval: float = Field(1.0, gt=0, le=60)  # seconds between steps (also woken by apply)
    call_timeout: float = Field(120.0, gt=0)  # for one system plugin change (a model may load)
    backoff: float = Field(2.0, gt=0)  # first wait after a failed action, doubled each time
    backoff_max: float = Field(60.0, gt=0)


class ControllerPlugin(Plugin):
    name = PLUGIN
    config_model = ControllerConfig

    async def start(self, ctx: PluginContext) -> None:
        self.bind(ctx)
        if ROLE not in ctx.identity.roles:
            raise InvalidRequest(
                f"the controller needs its agent's credential to hold the {ROLE!r} role"
            )
        self.config = ctx.settings(ControllerConfig)
        path = ctx.data_dir / STATE_FILE
        self.store = State.model_validate_json(path.read_bytes()) if path.exists() else State()
        self.watch: TenantWatch = await ctx.watch()
        # agent -> (when, its running plugins) from a system plugin's reply
        self.replies: dict[str, tuple[float, frozenset[str]]] = {}
        self.failures: dict[tuple[str, str, str], tuple[int, float]] = {}  # -> (count, until)
        self.reported: set[tuple[str, str, str]] = set()  # replicas whose loss was told
        self.replicas = Replicas(ctx)
        self._active = False
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self.watch.stop()

    def status(self) -> dict[str, Any]:
        if self.state != "running":  # statuses are asked for while it starts, too
            return {}
        return {"active": self._leader() == self.ctx.identity.name}

    # --- who is active -------------------------------------------------------------------------

    def _controllers(self) -> list[tuple[str, tuple[str, ...], list[str], bool]]:
        entries = self.watch.discovery.entries.values()
        return [(e.name, e.roles, e.plugins, e.status is not Status.LOST) for e in entries]

    def _leader(self) -> str | None:
        return leader(self._controllers())

    def _require_active(self) -> None:
        active = self._leader()
        if active != self.ctx.identity.name:
            raise NotActive(f"this controller is a standby; the active one is {active!r}")

    # --- the loop ------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                if self._leader() != self.ctx.identity.name:
                    self._active = False
                else:
                    await self._sync()  # a newer state elsewhere is taken before acting
                    if not self._active:  # taking over: a new term
                        self._active = True
                        self.store.term += 1
                        self._changed()
                    await self._step()
            except Exception as exc:  # one bad step must not end reconciling
                self.ctx.log.error("controller.step_failed", error=exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.config.interval)
            self._wake.clear()

    async def _step(self) -> None:
        views = self._views()
        now = time.time()
        actions: list[Action] = []
        for pipeline in list(self.store.pipelines.values()):
            p = pipeline.spec.name
            blocked = {(s, a) for (q, s, a), (_, until) in self.failures.items()
                       if q == p and until > now}  # fmt: skip
            step = plan(pipeline, views, blocked)
            self._gone(pipeline, step.gone, views)
            actions += step.actions
        if not actions:
            return
        # Placements are recorded, and standbys told, before they are made: an active that dies
        # mid-step leaves no replica its successor would not know of (it forgets those that
        # did not start: the agent is then seen without them).
        if record_placements(self.store, actions):
            self._changed()
            await self._sync()
        await asyncio.gather(*(self._do(a) for a in actions))

    def _views(self) -> dict[str, AgentView]:
        views = {}
        for e in self.watch.discovery.entries.values():
            views[e.name] = AgentView(
                name=e.name, region=e.region, labels=e.labels, plugins=self._plugins(e.name),
                capabilities=e.capabilities, gpus=gpu_memory(self.watch.metrics.get(e.name)),
                active=e.status is Status.ACTIVE, alive=e.status is not Status.LOST,
            )  # fmt: skip
        return views

    def _plugins(self, agent: str) -> frozenset[str]:
        """What runs on ``agent``: its announcement, or what we know later than it (announced
        in the middle of a change, it may show a plugin stopped for its restart)."""
        entry = self.watch.discovery.entries.get(agent)
        reply = self.replies.get(agent)
        if reply is not None and (entry is None or reply[0] >= entry.seen_at):
            return reply[1]
        return frozenset(entry.plugins) if entry is not None else frozenset()

    def _gone(
        self, pipeline: StoredPipeline, gone: list[tuple[str, str]], views: dict[str, AgentView]
    ) -> None:
        """Replicas placed but not running: told once; forgotten where the agent is alive
        without it (a LOST agent's stay: it returns with its plugin, a surplus then removed),
        and wherever the service is retired."""
        p = pipeline.spec.name
        changed = False
        for service, agent in gone:
            view = views.get(agent)
            retired = pipeline.deleting or service not in pipeline.spec.services
            if (p, service, agent) not in self.reported:
                self.reported.add((p, service, agent))
                why = "agent is LOST" if view is None or not view.alive else "plugin stopped"
                self._event(pipeline, "lost", f"replica gone ({why})", service, agent)
                changed = True
            if retired or (view is not None and view.active):
                pipeline.services[service].placed.pop(agent, None)
                self.reported.discard((p, service, agent))
                changed = True
        for service, state in list(pipeline.services.items()):
            retired = pipeline.deleting or service not in pipeline.spec.services
            if retired and not state.placed:
                del pipeline.services[service]
                changed = True
        if pipeline.deleting and not pipeline.services:
            del self.store.pipelines[p]
            self.ctx.log.info("controller.deleted", pipeline=p)
            changed = True
        if changed:
            self._changed()

    async def _do(self, a: Action) -> None:
        params: dict[str, Any] = {"name": a.plugin}
        if a.config is not None:
            params["config"] = a.config
        key = (a.pipeline, a.service, a.agent)
        before = self._plugins(a.agent)
        refused = True  # by the agent (a start that failed, undone): else it was not reached
        try:
            statuses = await self.ctx.call(
                f"{a.agent}/system", _METHODS[a.kind], params, self.config.call_timeout
            )
            self.replies[a.agent] = (time.time(), running_plugins(statuses))
            error = change_error(statuses, a)
        except AtollError as exc:
            # The system plugin undid a failed change (the old config runs again): as before.
            self.replies[a.agent] = (time.time(), before)
            error, refused = str(exc), isinstance(exc, InvalidRequest)
        pipeline = self.store.pipelines.get(a.pipeline)
        if pipeline is None:
            return
        state = pipeline.services.setdefault(a.service, ServiceState(plugin=a.plugin))
        if error is None:
            self.failures.pop(key, None)
            if a.kind == "remove":
                state.placed.pop(a.agent, None)
            else:
                state.placed[a.agent] = a.digest
                self.reported.discard(key)
            self._event(pipeline, _DONE[a.kind], f"{a.plugin} {_DONE[a.kind]}", a.service, a.agent)
            for c in a.calls:
                try:
                    await self.ctx.call(
                        f"{a.agent}/{a.plugin}", c.method, c.params, self.config.call_timeout
                    )
                except AtollError as exc:
                    message = f"call {c.method} failed: {exc}"
                    self._event(pipeline, "failed", message, a.service, a.agent)
        else:
            if a.kind == "add":
                state.placed.pop(a.agent, None)  # recorded before the call: it did not start
            if a.kind == "reconfigure" and refused:  # halted until a new config: no retry
                state.halted = a.digest
                message = f"rollout halted: {error}; apply a fixed config"
            else:
                count = self.failures.get(key, (0, 0.0))[0] + 1
                wait = min(self.config.backoff * 2 ** (count - 1), self.config.backoff_max)
                self.failures[key] = (count, time.time() + wait)
                message = f"{a.kind} failed: {error}; next try in {wait:.0f} s"
            self._event(pipeline, "failed", message, a.service, a.agent)
        self._changed()

    def _event(
        self, pipeline: StoredPipeline, kind: str, message: str, service: str = "", agent: str = ""
    ) -> None:
        event = Event(at=time.time(), service=service, agent=agent, kind=kind, message=message)
        pipeline.events = [*pipeline.events, event][-MAX_EVENTS:]
        self.ctx.log.info(
            f"controller.{kind}", pipeline=pipeline.spec.name, service=service, agent=agent,
            message=message,
        )  # fmt: skip

    def _changed(self) -> None:
        self.store.version += 1
        data = self.store.model_dump_json().encode()
        write_secret(self.ctx.data_dir / STATE_FILE, data)
        self._wake.set()

    async def _sync(self) -> None:
        """Bring each standby to this state, or take a standby's newer one."""
        me = self.ctx.identity.name
        # ACTIVE ones only: a STALE standby may be gone, and waiting on it would stall the step.
        standbys = [e.name for e in self.watch.discovery.entries.values()
                    if e.status is Status.ACTIVE and e.name != me and ROLE in e.roles
                    and PLUGIN in e.plugins]  # fmt: skip
        newer = await self.replicas.push(self.store, standbys)
        if newer is not None:
            self._take(newer)

    def _take(self, state: State) -> None:
        self.store = state
        write_secret(self.ctx.data_dir / STATE_FILE, state.model_dump_json().encode())

    # --- RPC -----------------------------------------------------------------------------------

    @rpc(SYNC.name, roles=(ROLE,))
    async def sync(self, params: Any, call: CallInfo) -> dict[str, Any]:
        keep, reply = answer(self.store, State.model_validate(SYNC.parse_params(params).state))
        if keep is not None:
            self._take(keep)
        return reply.model_dump()

    @rpc(APPLY.name, roles=OPERATORS)
    async def apply(self, params: Any, call: CallInfo) -> dict[str, Any]:
        self._require_active()
        spec = APPLY.parse_params(params).spec
        self._check(spec)
        old = self.store.pipelines.get(spec.name)
        if old is not None:
            same_kinds(old, spec)
        pipeline = StoredPipeline(
            spec=spec, revision=old.revision + 1 if old is not None else 1, applied_at=time.time(),
            services=old.services if old is not None else {},
            events=old.events if old is not None else [],
        )  # fmt: skip
        self.store.pipelines[spec.name] = pipeline
        # The operator's new word: agents backed off for this pipeline are tried again at once.
        self.failures = {k: v for k, v in self.failures.items() if k[0] != spec.name}
        self._event(pipeline, "applied", f"revision {pipeline.revision} applied by {call.src}")
        self._changed()
        return self._status(pipeline).model_dump(mode="json")

    @rpc(DELETE.name, roles=OPERATORS)
    async def delete(self, params: Any, call: CallInfo) -> dict[str, Any]:
        self._require_active()
        pipeline = self._pipeline(DELETE.parse_params(params).name)
        pipeline.deleting = True
        self._event(pipeline, "deleted", f"deleted by {call.src}: its replicas are removed")
        self._changed()
        return self._status(pipeline).model_dump(mode="json")

    @rpc("list", roles=CLIENTS)  # a gateway: for its admins' Pipelines page
    async def list_(self, params: Any, call: CallInfo) -> list[dict[str, Any]]:
        pipelines = sorted(self.store.pipelines.values(), key=lambda p: p.spec.name)
        return [self._status(p).model_dump(mode="json") for p in pipelines]

    @rpc(STATUS.name, roles=CLIENTS)
    async def status_(self, params: Any, call: CallInfo) -> dict[str, Any]:
        pipeline = self._pipeline(STATUS.parse_params(params).name)
        return self._status(pipeline).model_dump(mode="json")

    @rpc(DIFF.name, roles=CLIENTS)
    async def diff(self, params: Any, call: CallInfo) -> dict[str, Any]:
        spec = DIFF.parse_params(params).spec
        self._check(spec)
        old = self.store.pipelines.get(spec.name)
        now = self._status(old).services if old is not None else []
        return diff(old, spec, now).model_dump(mode="json")

    # --- helpers -------------------------------------------------------------------------------

    def _pipeline(self, name: str) -> StoredPipeline:
        pipeline = self.store.pipelines.get(name)
        if pipeline is None:
            known = ", ".join(sorted(self.store.pipelines)) or "none"
            raise InvalidRequest(f"no pipeline {name!r} (applied: {known})")
        return pipeline

    def _status(self, pipeline: StoredPipeline) -> PipelineStatus:
        step = plan(pipeline, self._views())
        return PipelineStatus(
            name=pipeline.spec.name, revision=pipeline.revision, applied_at=pipeline.applied_at,
            deleting=pipeline.deleting, controller=self.ctx.identity.name,
            active=self._leader() == self.ctx.identity.name, services=step.statuses,
            events=pipeline.events,
        )  # fmt: skip

    def _check(self, spec: PipelineSpec) -> None:
        """Each service's plugin kind installed here, and its config valid by the plugin's own
        model (what the target agent checks again before it changes anything)."""
        installed = available_plugins()
        for name, service in spec.services.items():
            kind = service.plugin
            if kind not in installed:
                names = ", ".join(sorted(installed))
                raise InvalidRequest(f"service {name!r}: no plugin {kind!r}; installed: {names}")
            model = installed[kind].load().config_model
            if model is not None:
                what = f"service {name!r}: plugin {kind!r} config"
                parse(model, service.config, what, context={"config_dir": None})
            elif service.config:
                raise InvalidRequest(f"service {name!r}: plugin {kind!r} takes no config")
