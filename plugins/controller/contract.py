"""The controller service, as the CLI and the gateway see it: the pipeline spec (what ``atoll
apply FILE`` sends), the status and diff replies, the method table and its client. A leaf: it
imports the contract kit, errors and pydantic (discovery only inside ``active_controller``).

A pipeline names services; each service is one plugin kind placed on ``replicas`` agents (or on
``"all"`` agents) that match its ``where`` selector. An agent hosts at most one plugin of a kind,
so the replicas of a service are on distinct agents, and an agent already running the kind
(another service's replica, or one an operator placed by hand) is never taken over: the
controller owns only what it placed, and remembers it.

Overlay surface of every agent running the ``controller`` plugin (only the active one acts;
see ``plugin.py``):

    RPC  apply   {spec: PipelineSpec}   -> PipelineStatus        (operator; active only)
    RPC  delete  {name}                 -> PipelineStatus        (operator; active only)
    RPC  list    {}                     -> list[PipelineStatus]  (admins, operator, gateway)
    RPC  status  {name}                 -> PipelineStatus        (admins, operator, gateway)
    RPC  diff    {spec: PipelineSpec}   -> PipelineDiff          (admins, operator, gateway)
    RPC  sync    {state}                -> {stamp, state?}       (controllers: active to standby)

(A gateway reads for its administrators: the web UI's Pipelines tab.)
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, Field, StringConstraints, model_validator

from atoll.agent.contract import Caller, Client, Method, NoParams, Strict, service_address
from atoll.agent.errors import AtollError, NoResponder

if TYPE_CHECKING:
    from atoll.agent.node import Agent

PLUGIN = "controller"
ROLE = "controller"  # the signed role an agent needs for its controller to count
Name = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_\-]{0,62}$")]
# Kinds a pipeline may not place: the agent itself, and controllers (they would manage
# themselves).
RESERVED_KINDS = frozenset({"system", PLUGIN})
MAX_EVENTS = 100  # kept per pipeline


class NotActive(AtollError):
    """This controller is a standby: apply and delete go to the active one (named)."""

    code = "not_active"


class Where(Strict):
    """Which agents a service may run on: all criteria given must hold."""

    labels: dict[str, str] = {}  # signed labels, e.g. {gpu = "true"}
    regions: list[str] = []  # any of these (empty: any region)
    agents: list[str] = []  # only these agents (empty: any)
    # Discovery capabilities of any plugin the agent runs, e.g. {base_model = "llama-3-8b"}:
    # equal, or a list holding the value.
    capabilities: dict[str, str | int | float | bool] = {}
    min_gpu_memory_mb: int | None = Field(None, ge=0)  # total, on one GPU (the metrics feed)
    # Free now, on one GPU: checked when placing only (a replica uses memory itself).
    min_free_gpu_memory_mb: int | None = Field(None, ge=0)


class Call(Strict):
    """An RPC the controller makes on each replica once it runs its config, e.g. inference's
    ``load_adapter`` with ``{id, pinned = true}``: what a plugin is told at run time rather
    than in its config. The plugin must accept the ``controller`` role (inference: ``callers``)."""

    method: str = Field(min_length=1, max_length=64)
    params: dict[str, Any] = {}


class ServiceSpec(Strict):
    plugin: Name  # the plugin kind (entry point name), e.g. inference
    config: dict[str, Any] = {}  # the plugin's section, checked by its own config model
    replicas: Annotated[int, Field(ge=0)] | Literal["all"] = 1  # "all": every matching agent
    where: Where = Where()
    anti_affinity: list[Name] = []  # services of this pipeline it must not share an agent with
    # Made in order after each placement and config change; a failed one is an event (the
    # replica runs: it is not retried until the next change).
    calls: list[Call] = []

    def digest(self) -> str:
        """What a rollout compares: the kind, its config and its calls (a selector change
        moves replicas, it restarts none)."""
        calls = [c.model_dump() for c in self.calls]
        blob = json.dumps([self.plugin, self.config, calls], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


class PipelineSpec(Strict):
    name: Name
    services: dict[Name, ServiceSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> PipelineSpec:
        for name, service in self.services.items():
            if service.plugin in RESERVED_KINDS:
                raise ValueError(f"service {name!r}: plugin {service.plugin!r} cannot be placed")
            for other in service.anti_affinity:
                if other == name or other not in self.services:
                    raise ValueError(
                        f"service {name!r}: anti_affinity names {other!r}, not another service"
                    )
        return self


# --- replies --------------------------------------------------------------------------------


class Event(BaseModel):
    at: float
    service: str = ""
    agent: str = ""
    kind: str  # placed, reconfigured, removed, failed, lost, applied, deleted
    message: str


ServiceStateName = Literal["converged", "progressing", "degraded", "halted", "removing"]


class ServiceStatus(BaseModel):
    name: str
    plugin: str
    desired: int
    actual: int  # replicas running on live agents that match
    agents: list[str]  # where it runs now
    out_of_date: list[str]  # of those, agents still on an older config
    state: ServiceStateName
    revision: str  # the config digest being rolled out


class PipelineStatus(BaseModel):
    name: str
    revision: int
    applied_at: float
    deleting: bool
    controller: str  # the controller that answered
    active: bool  # whether it is the active one (a standby answers from its replica)
    services: list[ServiceStatus]
    events: list[Event]


Change = Literal["added", "removed", "changed", "same"]


class ServiceDiff(BaseModel):
    name: str
    change: Change
    fields: list[str]  # which of plugin, config, replicas, where, anti_affinity differ
    drift: bool  # actual replicas differ from desired now


class PipelineDiff(BaseModel):
    name: str
    exists: bool
    services: list[ServiceDiff]


class NameParams(Strict):
    name: Name


class SpecParams(Strict):
    spec: PipelineSpec


class SyncParams(BaseModel):
    state: dict[str, Any]  # the active's whole state (reconcile.State), its stamp inside


class SyncReply(BaseModel):
    stamp: tuple[int, int]  # the standby's (term, version), after taking the state if newer
    state: dict[str, Any] | None = None  # the standby's own when newer (it was active later)


APPLY = Method[SpecParams, PipelineStatus]("apply", SpecParams, PipelineStatus, "pipeline")
DELETE = Method[NameParams, PipelineStatus]("delete", NameParams, PipelineStatus)
LIST = Method[NoParams, list[PipelineStatus]]("list", NoParams, list[PipelineStatus])
STATUS = Method[NameParams, PipelineStatus]("status", NameParams, PipelineStatus)
DIFF = Method[SpecParams, PipelineDiff]("diff", SpecParams, PipelineDiff, "pipeline")
SYNC = Method[SyncParams, SyncReply]("sync", SyncParams, SyncReply)

# --- client ---------------------------------------------------------------------------------


def _client(caller: Caller, controller: str, timeout: float | None) -> Client:
    return Client(caller, service_address(controller, PLUGIN), timeout)


async def apply_pipeline(
    caller: Caller, controller: str, spec: PipelineSpec | dict[str, Any], timeout: float = 30
) -> PipelineStatus:
    params = APPLY.parse_params({"spec": spec})
    return await _client(caller, controller, timeout).invoke(APPLY, params)


async def delete_pipeline(
    caller: Caller, controller: str, name: str, timeout: float = 30
) -> PipelineStatus:
    params = DELETE.parse_params({"name": name})
    return await _client(caller, controller, timeout).invoke(DELETE, params)


async def list_pipelines(
    caller: Caller, controller: str, timeout: float = 30
) -> list[PipelineStatus]:
    return await _client(caller, controller, timeout).invoke(LIST, NoParams())


async def pipeline_status(
    caller: Caller, controller: str, name: str, timeout: float = 30
) -> PipelineStatus:
    params = STATUS.parse_params({"name": name})
    return await _client(caller, controller, timeout).invoke(STATUS, params)


async def diff_pipeline(
    caller: Caller, controller: str, spec: PipelineSpec | dict[str, Any], timeout: float = 30
) -> PipelineDiff:
    params = DIFF.parse_params({"spec": spec})
    return await _client(caller, controller, timeout).invoke(DIFF, params)


def leader(candidates: list[tuple[str, tuple[str, ...], list[str], bool]]) -> str | None:
    """The active controller among ``(name, signed roles, plugins, alive)`` entries: the first
    name, in order, of a live agent holding the ``controller`` role and running the plugin.
    Every controller and client computes the same answer from the same discovery view, with no
    election round: when the active one is LOST the next name takes over."""
    live = sorted(n for n, roles, plugins, alive in candidates if alive and ROLE in roles
                  and PLUGIN in plugins)  # fmt: skip
    return live[0] if live else None


async def active_controller(agent: Agent) -> str:
    """The active controller of ``agent``'s tenant, from a discovery snapshot."""
    from atoll.agent.discovery import Discovery, Status

    view = await Discovery.snapshot(agent)
    found = leader(
        [(e.name, e.roles, e.plugins, e.status is not Status.LOST) for e in view.entries.values()]
    )
    if found is None:
        raise NoResponder("no controller is online (an agent with the controller role running it)")
    return found
