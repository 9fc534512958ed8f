"""Who may do what inside a tenant: the one table of role permissions (sans-I/O).

Roles are signed into every credential; the broker derives from them the subjects an agent may
publish, subscribe to and keep, and refuses anything else. NATS carries explicit allow lists in
each user JWT because its users are arbitrary; Atoll's roles are a fixed vocabulary, so the broker
derives the lists from the signed roles: credentials stay small, an agent cannot widen what its
roles allow (the roles are signed), and a fix to the table reaches every agent without
re-issuing credentials. Brokers of one mesh run the same table.

Patterns use the subject syntax (``*`` one token, a final ``>`` the rest); ``{name}`` stands for
the agent's own name. A subject no role names is denied. Plugins declare the roles each RPC
method and stream service accepts with the same role names (``@rpc(roles=...)``); the groups
below name the common sets so each rule is stated once.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from atoll.protocol.subjects import REFUSALS
from atoll.protocol.trust import ROLES, AgentIdentity

ANY = ("*",)  # as an RPC's or stream service's roles: any agent of the tenant

# Groups for RPC methods and stream services.
ADMINS = ("admin", "operator")
CLIENTS = ("gateway", *ADMINS)  # act for users, who reach the overlay only through a gateway
DATASET_READERS = ("training", *CLIENTS)  # trainers fetch what they train on
ADAPTER_READERS = ("inference", "training", *CLIENTS)  # inference fetches weights to serve
ADAPTER_WRITERS = ("training", *CLIENTS)
RESULTS_WRITERS = ("training", *CLIENTS)  # trainers store a job's results file (no dataset)
TRAINERS = ("training",)  # a job's resume state: only trainers write and read it
FILE_USERS = ADMINS  # an agent's own files: operators' tooling only
# What runs on an agent, and with what config (which directories the files plugin serves, which
# model inference loads): the operator's call, never a tenant admin's.
# A pipeline controller (plugins/controller) places plugins for the operator, so it may too.
PLUGIN_MANAGERS = ("operator", "controller")
TUNNEL_USERS = ("inference", *ADMINS)  # an inference node reaching its LoRAX server


@dataclass(frozen=True)
class Permissions:
    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    keep: tuple[str, ...] = ()  # subjects whose last publication brokers hold (a subset of publish)


# What every agent of a tenant may do, whatever its roles: speak for itself on discovery and
# the metrics feed, and see who is there.
MEMBER = Permissions(
    publish=("discovery.announce.{name}", "metrics.{name}"),
    subscribe=("discovery.announce.*", "discovery.events.*", "metrics.{name}"),
    keep=("discovery.announce.{name}", "metrics.{name}"),
)

# Job events name the job's owner: only the roles that act on jobs see them.
JOB_EVENTS = "jobs.*.events"

TABLE: dict[str, Permissions] = {
    # Application plugins of a tenant's own: their own namespace, nothing of the system's.
    "agent": Permissions(publish=("app.>",), subscribe=("app.>",)),
    "admin": Permissions(
        publish=("discovery.events.*",),
        subscribe=("metrics.*", JOB_EVENTS, "jobs.queued", "adapters.*", f"{REFUSALS}.>"),
    ),
    "operator": Permissions(
        publish=("discovery.events.*",),
        subscribe=("metrics.*", JOB_EVENTS, "jobs.queued", "adapters.*", f"{REFUSALS}.>"),
    ),
    "gateway": Permissions(subscribe=("metrics.*", JOB_EVENTS, "adapters.*")),
    # Only storage announces adapters (new and deleted).
    "storage": Permissions(publish=("adapters.new", "adapters.deleted")),
    # Only the training queue and its trainers publish job events.
    "training": Permissions(
        publish=("jobs.queued", JOB_EVENTS), subscribe=("jobs.queued", JOB_EVENTS)
    ),
    "inference": Permissions(),
    "user": Permissions(),
    # Reads every agent's feed (GPU memory) to place services; acts through system RPCs only.
    "controller": Permissions(subscribe=("metrics.*",)),
}
assert set(TABLE) == ROLES


def _tokens(pattern: str) -> tuple[str, ...]:
    return tuple(pattern.split("."))


def _covers(rule: tuple[str, ...], tokens: list[str]) -> bool:
    """Does ``rule`` allow every subject ``tokens`` can match? A concrete subject, or a
    subscription pattern whose every wildcard sits where the rule has one at least as wide."""
    for i, r in enumerate(rule):
        if r == ">":
            return i < len(tokens)
        if i >= len(tokens):
            return False
        t = tokens[i]
        if t == ">":
            return False  # the pattern reaches wider than this rule
        if r == "*":
            continue
        if t != r:
            return False  # includes t == "*" against a literal rule token
    return len(tokens) == len(rule)


@lru_cache(maxsize=4096)
def _rules(roles: tuple[str, ...], name: str, kind: str) -> tuple[tuple[str, ...], ...]:
    perms = [MEMBER, *(TABLE[r] for r in roles if r in TABLE)]
    return tuple(_tokens(p.replace("{name}", name)) for perm in perms for p in getattr(perm, kind))


def allowed(roles: tuple[str, ...], name: str, kind: str, subject: str) -> bool:
    """May an agent called ``name`` with ``roles`` do ``kind`` (publish, subscribe, keep) on
    ``subject`` (a validated subject, or for subscribe a validated pattern)?"""
    tokens = subject.split(".")
    return any(_covers(rule, tokens) for rule in _rules(roles, name, kind))


def may_call(caller_roles: tuple[str, ...], accepted: tuple[str, ...]) -> bool:
    """An RPC method or stream service accepting ``accepted`` roles (or ANY)."""
    return "*" in accepted or any(r in accepted for r in caller_roles)


def refusal(caller: AgentIdentity, target: str, what: str, accepted: tuple[str, ...]) -> str:
    return (
        f"agent {caller.name!r} (roles {', '.join(caller.roles)}) may not use {what} at "
        f"{target}: it needs one of the roles {', '.join(accepted) or '(none)'}"
    )


def describe(roles: tuple[str, ...], name: str) -> dict[str, list[str]]:
    """The effective permission lists, for `atoll agent info` and error messages."""
    return {
        kind: [".".join(r) for r in _rules(roles, name, kind)]
        for kind in ("publish", "subscribe", "keep")
    }
