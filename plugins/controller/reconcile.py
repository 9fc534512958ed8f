"""The reconciler, sans-I/O: a pipeline as applied (its spec and what the controller placed),
the agents as observed (discovery, the metrics feed, the replies of the system plugin) in;
at most one action per service, and each service's status, out. ``plugin.py`` runs the actions
through the agents' ``system`` plugins and feeds the outcome back.

One action per service per step, each awaited before the service's next, is what makes changes
rolling: a replica is added before a misplaced one is removed (a move never takes a service
down), and a config change reaches one agent at a time, the next only once the previous came
back running (the system plugin answers after the restart, with the plugin's state). Replicas
on STALE agents still count (they may be back in a heartbeat); on LOST ones they do not, so a
replacement is placed at once, and a LOST agent that comes back with its plugin (agents keep
remote changes across restarts) is a surplus replica, removed.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel

from atoll.agent.errors import InvalidRequest
from atoll.plugins.controller.contract import (
    Call,
    Change,
    Event,
    PipelineDiff,
    PipelineSpec,
    ServiceDiff,
    ServiceSpec,
    ServiceStateName,
    ServiceStatus,
    Where,
)


@dataclass(frozen=True)
class AgentView:
    """One agent as the controller sees it now."""

    name: str
    region: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    plugins: frozenset[str] = frozenset()  # running
    capabilities: Mapping[str, Any] = field(default_factory=dict)  # by plugin, from discovery
    gpus: tuple[tuple[int, int], ...] = ()  # (total MB, free MB) per GPU
    active: bool = True  # ACTIVE: may take new replicas
    alive: bool = True  # not LOST: its replicas count

    def matches(self, where: Where, placing: bool = True) -> bool:
        """Does ``where`` hold here? Free GPU memory counts only when ``placing``: a replica
        uses memory itself, and must not be moved off for it."""
        if any(self.labels.get(k) != v for k, v in where.labels.items()):
            return False
        if where.regions and self.region not in where.regions:
            return False
        if where.agents and self.name not in where.agents:
            return False
        for key, value in where.capabilities.items():
            if not any(_offers(cap, key, value) for cap in self.capabilities.values()):
                return False
        if where.min_gpu_memory_mb is not None and not any(
            total >= where.min_gpu_memory_mb for total, _ in self.gpus
        ):
            return False
        return (
            not placing
            or where.min_free_gpu_memory_mb is None
            or any(free >= where.min_free_gpu_memory_mb for _, free in self.gpus)
        )


def _offers(cap: Any, key: str, value: Any) -> bool:
    have = cap.get(key) if isinstance(cap, dict) else None
    return bool(have == value or (isinstance(have, list) and value in have))


# --- what the controller keeps (and replicates to standbys) ---------------------------------


class ServiceState(BaseModel):
    plugin: str
    placed: dict[str, str] = {}  # agent -> the config digest it was given
    halted: str | None = None  # the digest whose rollout stopped on a failed start


class StoredPipeline(BaseModel):
    spec: PipelineSpec
    revision: int = 1
    applied_at: float
    deleting: bool = False
    # Every service with placements, those no longer in the spec too (removed step by step).
    services: dict[str, ServiceState] = {}
    events: list[Event] = []


class State(BaseModel):
    # Which state is newer: (term, version). A controller that becomes active raises the term
    # past every state it has seen, so changes an old active made after it was replaced (it
    # went on alone, or came back with its file) lose to its successor's, whatever their count.
    term: int = 0
    version: int = 0  # bumped at every change
    pipelines: dict[str, StoredPipeline] = {}

    def stamp(self) -> tuple[int, int]:
        return (self.term, self.version)


@dataclass(frozen=True)
class Action:
    kind: Literal["add", "reconfigure", "remove"]
    pipeline: str
    service: str
    agent: str
    plugin: str
    config: dict[str, Any] | None = None  # add, reconfigure
    digest: str = ""
    calls: tuple[Call, ...] = ()  # add, reconfigure: made once it runs


@dataclass
class Plan:
    actions: list[Action]
    statuses: list[ServiceStatus]
    gone: list[tuple[str, str]]  # (service, agent): placed, no longer running there


def plan(
    pipeline: StoredPipeline,
    views: Mapping[str, AgentView],
    blocked: Collection[tuple[str, str]] = (),
) -> Plan:
    """The next step for each of ``pipeline``'s services; ``blocked`` holds (service, agent)
    pairs in backoff after a failure (neither placed on nor reconfigured)."""
    out = Plan([], [], [])
    names = list(pipeline.spec.services) + [
        s for s in pipeline.services if s not in pipeline.spec.services
    ]
    for name in names:
        action, status, gone = _service(pipeline, name, views, blocked)
        if action is not None:
            out.actions.append(action)
        out.statuses.append(status)
        out.gone += [(name, agent) for agent in gone]
    return out


def _running(state: ServiceState, kind: str, views: Mapping[str, AgentView]) -> list[str]:
    alive = {a for a, v in views.items() if v.alive and kind in v.plugins}
    return [a for a in sorted(state.placed) if a in alive]


def _service(
    pipeline: StoredPipeline,
    name: str,
    views: Mapping[str, AgentView],
    blocked: Collection[tuple[str, str]],
) -> tuple[Action | None, ServiceStatus, list[str]]:
    declared = pipeline.spec.services.get(name)
    spec = None if pipeline.deleting else declared
    state = pipeline.services.get(name)
    if state is None:  # nothing placed yet (a service is in the spec or has a state)
        state = ServiceState(plugin=declared.plugin if declared is not None else "")
    kind = spec.plugin if spec is not None else state.plugin
    running = _running(state, kind, views)
    gone = [a for a in sorted(state.placed) if a not in running]
    removable = [a for a in running if (name, a) not in blocked]

    def act(kind_: Literal["add", "reconfigure", "remove"], agent: str) -> Action:
        if spec is None or kind_ == "remove":
            return Action(kind_, pipeline.spec.name, name, agent, kind)
        return Action(
            kind_, pipeline.spec.name, name, agent, kind, spec.config, spec.digest(),
            tuple(spec.calls),
        )  # fmt: skip

    if spec is None:  # retired: every replica goes, one at a time
        status = ServiceStatus(
            name=name, plugin=kind, desired=0, actual=len(running), agents=running,
            out_of_date=[], state="removing", revision="",
        )  # fmt: skip
        return (act("remove", removable[0]) if removable else None), status, gone

    avoid = _avoided(pipeline, spec, views)

    def fits(v: AgentView, placing: bool = True) -> bool:
        return v.name not in avoid and v.matches(spec.where, placing)

    keep = [a for a in running if fits(views[a], placing=False)]
    misplaced = [a for a in running if a not in keep]
    free = [v for v in views.values() if v.active and kind not in v.plugins and fits(v)]
    desired = len(keep) + len(free) if spec.replicas == "all" else spec.replicas
    digest = spec.digest()
    out_of_date = [a for a in keep if state.placed.get(a) != digest]

    def spread(v: AgentView) -> tuple[int, int, str]:
        # Regions with fewer replicas first, then the least busy agent, then by name.
        return (sum(views[a].region == v.region for a in keep), len(v.plugins), v.name)

    candidates = sorted((v for v in free if (name, v.name) not in blocked), key=spread)
    action: Action | None = None
    if len(keep) < desired and candidates:
        action = act("add", candidates[0].name)
    elif misplaced:
        action = act("remove", misplaced[0]) if misplaced[0] in removable else None
    elif len(keep) > desired:
        surplus = [a for a in out_of_date or keep if a in removable]
        action = act("remove", surplus[-1]) if surplus else None
    elif out_of_date and state.halted != digest:
        ready = [a for a in out_of_date if (name, a) not in blocked and views[a].active]
        if ready:
            action = act("reconfigure", ready[0])
    state_name: ServiceStateName
    if out_of_date and state.halted == digest:
        state_name = "halted"
    elif len(keep) == desired and not out_of_date and not misplaced:
        state_name = "converged"
    elif action is None:
        state_name = "degraded"
    else:
        state_name = "progressing"
    status = ServiceStatus(
        name=name, plugin=kind, desired=desired, actual=len(keep), agents=keep,
        out_of_date=out_of_date, state=state_name, revision=digest,
    )  # fmt: skip
    return action, status, gone


def _avoided(
    pipeline: StoredPipeline, spec: ServiceSpec, views: Mapping[str, AgentView]
) -> set[str]:
    """Agents running a replica of a service ``spec`` must not share an agent with."""
    avoid: set[str] = set()
    for other in spec.anti_affinity:
        state = pipeline.services.get(other)
        if state is not None:
            avoid.update(_running(state, pipeline.spec.services[other].plugin, views))
    return avoid


def same_kinds(old: StoredPipeline, spec: PipelineSpec) -> None:
    """A service keeps its plugin kind: its placements are of that kind."""
    for name, service in spec.services.items():
        was = old.services.get(name) or old.spec.services.get(name)
        if was is not None and was.plugin != service.plugin:
            raise InvalidRequest(
                f"service {name!r} places {was.plugin!r}: a new plugin kind needs a new "
                "service name (the old one's replicas are removed)"
            )


_SPEC_FIELDS = ("plugin", "config", "replicas", "where", "anti_affinity", "calls")


def diff(old: StoredPipeline | None, spec: PipelineSpec, now: list[ServiceStatus]) -> PipelineDiff:
    """What applying ``spec`` over ``old`` changes, service by service, and which services'
    replicas drift from what is applied (``now``: their statuses)."""
    before = old.spec.services if old is not None else {}
    drifting = {s.name for s in now if s.state != "converged"}
    services = []
    for name in sorted(set(spec.services) | set(before)):
        new, was = spec.services.get(name), before.get(name)
        fields = [] if new is None or was is None else [
            f for f in _SPEC_FIELDS if getattr(new, f) != getattr(was, f)
        ]  # fmt: skip
        change: Change = "added" if was is None else "removed" if new is None else (
            "changed" if fields else "same")  # fmt: skip
        services.append(
            ServiceDiff(name=name, change=change, fields=fields, drift=name in drifting)
        )
    return PipelineDiff(name=spec.name, exists=old is not None, services=services)


def record_placements(state: State, actions: list[Action]) -> bool:
    """Note each ``add`` among ``actions`` as placed, before it is made (an active that dies
    mid-step then leaves no replica its successor does not know of; one that did not start is
    forgotten when its agent is seen without it). Whether there was any."""
    adds = [a for a in actions if a.kind == "add" and a.pipeline in state.pipelines]
    for a in adds:
        services = state.pipelines[a.pipeline].services
        services.setdefault(a.service, ServiceState(plugin=a.plugin)).placed[a.agent] = a.digest
    return bool(adds)


# --- what agents report ---------------------------------------------------------------------

_MB = 1 << 20


def gpu_memory(feed: dict[str, Any] | None) -> tuple[tuple[int, int], ...]:
    """(total MB, free MB) of each GPU in an agent's metrics feed message (none without one)."""
    gpus = ((feed or {}).get("system") or {}).get("gpus") or []
    return tuple(
        (g["memory_total_bytes"] // _MB,
         (g["memory_total_bytes"] - g.get("memory_used_bytes", 0)) // _MB)
        for g in gpus if isinstance(g, dict) and isinstance(g.get("memory_total_bytes"), int)
    )  # fmt: skip


def _statuses(reply: Any) -> list[dict[str, Any]]:
    return [s for s in reply if isinstance(s, dict)] if isinstance(reply, list) else []


def running_plugins(reply: Any) -> frozenset[str]:
    """The plugins a ``plugin_*`` reply (the agent's plugin statuses) shows running."""
    return frozenset(str(s.get("name")) for s in _statuses(reply) if s.get("state") == "running")


def change_error(reply: Any, action: Action) -> str | None:
    """Why the reply shows ``action`` did not take (None: it did): running without an error
    after an add or a reconfigure, not running after a remove."""
    mine = next((s for s in _statuses(reply) if s.get("name") == action.plugin), None)
    running = mine is not None and mine.get("state") == "running"
    if action.kind == "remove":
        return "still running" if running else None
    if not running:
        return f"not running ({json.dumps(mine)})"
    error = mine.get("last_error") if mine is not None else None
    return str(error) if error else None
