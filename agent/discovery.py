"""Discovery: who is on the tenant's overlay, what they offer, and whether they are alive.

Every agent announces itself on ``discovery.announce.<agent>`` when it joins and at every
heartbeat. Announcements are *kept* publications: brokers hold the last one per agent, so a new
subscriber sees the whole tenant at once. A ``Discovery`` view turns them into entries with a
liveness status — ACTIVE, STALE after 3 missed heartbeats, LOST after 6 (or at once when an agent
leaves cleanly) — tells its listeners about transitions, optionally publishes them on
``discovery.events.<agent>``, and answers the selection queries policy routing needs.

A live view receives every agent's heartbeat, so it belongs to the few that route or watch (the
gateway, the training queue, admins): a view on every agent would cost the tenant O(agents²)
deliveries a heartbeat. An agent keeps one live view however many of its plugins watch
(``Discovery.shared``: one subscription, its users counted by ``start``/``stop``). A plugin
that only calls another service now and then (an inference node fetching adapters, a trainer
claiming jobs) uses a ``Finder``: one snapshot of what brokers keep, remembered until the
address fails.

Just over 400 lines: entries, their liveness clock and the view that keeps them belong together.

Region and policy labels are what the agent's signed credential says, never what it announces:
an announcement carries the credential, the view verifies it against the operator key (once per
credential) and takes the labels from it, so no node can declare itself ``phi=true``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from atoll.agent.contract import service_address
from atoll.agent.errors import NoResponder
from atoll.agent.node import Agent, Subscription
from atoll.protocol.errors import AuthError
from atoll.protocol.session import Publication
from atoll.protocol.trust import AgentIdentity, verify_agent

ANNOUNCE = "discovery.announce"
EVENTS = "discovery.events"
STALE_AFTER = 3  # missed heartbeats
LOST_AFTER = 6
_T = TypeVar("_T")


class Status(enum.StrEnum):
    ACTIVE = "ACTIVE"
    STALE = "STALE"
    LOST = "LOST"


@dataclass
class Entry:
    name: str
    region: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    roles: tuple[str, ...] = ()  # signed, as labels: who may act as a controller
    plugins: list[str] = field(default_factory=list)
    capabilities: dict[str, Any] = field(default_factory=dict)
    endpoints: dict[str, Any] = field(default_factory=dict)
    load: dict[str, Any] = field(default_factory=dict)
    interval: float = 5.0
    announced_at: float = 0.0  # the agent's clock, epoch seconds
    seen_at: float = 0.0  # our clock, epoch seconds
    status: Status = Status.ACTIVE
    leaving: bool = False
    blind_at: float = 0.0  # the view's blind time when this arrived (Discovery.blind)

    @property
    def age(self) -> float:
        return max(0.0, time.time() - max(self.announced_at, 0.0))

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "region": self.region, "labels": self.labels,
            "plugins": self.plugins, "capabilities": self.capabilities,
            "endpoints": self.endpoints, "load": self.load, "interval": self.interval,
            "status": str(self.status), "age_s": round(self.age, 3),
        }  # fmt: skip

    def status_now(self, now: float | None = None, unheard: float = 0.0) -> Status:
        """Liveness at ``now`` (default the wall clock), not counting ``unheard`` seconds of
        its silence: time since it arrived in which the view could hear nobody."""
        if self.leaving:
            return Status.LOST
        now = time.time() if now is None else now
        age = max(0.0, now - max(self.announced_at, 0.0) - max(0.0, unheard))
        missed = age / self.interval if self.interval > 0 else 0
        if missed >= LOST_AFTER:
            return Status.LOST
        if missed >= STALE_AFTER:
            return Status.STALE
        return Status.ACTIVE

    def offers(self, key: str, value: Any, plugin: str | None = None) -> bool:
        """Some plugin's capability ``key`` equals ``value`` or is a list holding it."""
        caps = [self.capabilities.get(plugin, {})] if plugin else self.capabilities.values()
        for cap in caps:
            have = cap.get(key) if isinstance(cap, dict) else None
            if have == value or (isinstance(have, list) and value in have):
                return True
        return False


def _entry(data: dict[str, Any], ident: AgentIdentity) -> Entry | None:
    try:
        return Entry(
            name=ident.name,
            region=ident.region,
            labels=dict(ident.labels),
            roles=tuple(ident.roles),
            plugins=[str(p) for p in data.get("plugins", [])],
            capabilities=dict(data.get("capabilities", {})),
            endpoints=dict(data.get("endpoints", {})),
            load=dict(data.get("load", {})),
            interval=float(data.get("interval", 5.0)),
            announced_at=float(data.get("time", 0.0)),
            seen_at=time.time(),
            leaving=bool(data.get("leaving", False)),
        )
    except (KeyError, TypeError, ValueError):
        return None


class Announcer:
    """Publishes this agent's announcement now and at every heartbeat."""

    def __init__(
        self, agent: Agent, describe: Callable[[], dict[str, Any]], interval: float = 5.0
    ) -> None:
        self.agent = agent
        self.describe = describe
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    def message(self, leaving: bool = False) -> dict[str, Any]:
        ident = self.agent.ident
        return {
            "name": ident.name, "cred": ident.credential, "interval": self.interval,
            "time": time.time(), "leaving": leaving, **self.describe(),
        }  # fmt: skip

    async def announce(self, leaving: bool = False) -> None:
        await self.agent.publish(f"{ANNOUNCE}.{self.agent.name}", self.message(leaving), keep=True)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            if self.agent.link.connected.is_set():
                try:
                    await self.announce()
                except Exception as exc:  # a lost connection: the next beat tries again
                    self.agent.log.info("discovery.announce_failed", error=exc)
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
            if self.agent.link.connected.is_set():
                try:
                    await self.announce(leaving=True)
                    await self.agent.flush(2)
                except Exception:
                    pass


class Discovery:
    """A live view of the tenant's agents."""

    def __init__(self, agent: Agent, publish_events: bool = False, tick: float = 0.5) -> None:
        self.agent = agent
        self.publish_events = publish_events
        self.tick = tick
        self.entries: dict[str, Entry] = {}
        self.listeners: list[Callable[[dict[str, Any]], Any]] = []
        self._idents: dict[bytes, AgentIdentity] = {}  # verified credentials, by their bytes
        self._sub: Subscription | None = None
        self._task: asyncio.Task[None] | None = None
        self._blind = 0.0  # seconds our own announcements were overdue, in past outages
        self._waiters: list[asyncio.Future[None]] = []
        self._users = 0  # started and not yet stopped

    @classmethod
    def shared(cls, agent: Agent, publish_events: bool = False) -> Discovery:
        """``agent``'s one live view, made on first use: every plugin of the agent that watches
        shares its subscription (each ``start`` it, then ``stop`` it when done)."""
        view = _SHARED.get(agent)
        if view is None:
            view = _SHARED[agent] = cls(agent)
        view.publish_events = view.publish_events or publish_events
        return view

    async def start(self) -> Discovery:
        self._users += 1
        if self._users == 1:
            self._sub = await self.agent.subscribe(f"{ANNOUNCE}.*", self._on_announce)
            self._task = asyncio.create_task(self._watch())
        return self

    @classmethod
    async def snapshot(cls, agent: Agent) -> Discovery:
        """The tenant's agents as brokers keep them now, without staying subscribed (statuses
        as of their last announcement)."""
        view = cls(agent)
        sub = await agent.subscribe(f"{ANNOUNCE}.*", view._on_announce)
        try:
            await agent.flush()  # what brokers keep has arrived once this returns
        finally:
            await sub.unsubscribe()
        return view

    async def stop(self) -> None:
        """One user done; the last one's stop ends the subscription."""
        self._users = max(0, self._users - 1)
        if self._users:
            return
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def _identity(self, blob: Any, src: str) -> AgentIdentity | None:
        """The announcer's verified credential; None unless it is the publisher's own."""
        if not isinstance(blob, bytes):
            return None
        ident = self._idents.get(blob)
        if ident is None:
            try:
                ident = verify_agent(blob, self.agent.keys.operator_pub)
            except AuthError as exc:
                self.agent.log.warning("discovery.credential_refused", src=src, reason=exc.reason)
                return None
            if len(self._idents) >= 4096:
                self._idents.clear()
            self._idents[blob] = ident
        # Only an agent may speak for itself: the broker stamped the source.
        if ident.tenant != self.agent.tenant or src.partition("/")[0] != ident.name:
            return None
        return ident

    def _on_announce(self, pub: Publication) -> None:
        if not isinstance(pub.data, dict):
            return
        ident = self._identity(pub.data.get("cred"), pub.src)
        entry = _entry(pub.data, ident) if ident is not None else None
        if entry is None:
            return
        self.heard(entry)

    def heard(self, entry: Entry) -> None:
        """Take in a verified announcement (received at ``entry.seen_at``)."""
        old = self.entries.get(entry.name)
        if old is not None and entry.announced_at < old.announced_at:
            return  # an older kept copy arriving late
        if entry.name == self.agent.name and old is not None and not old.leaving:
            # Our own announcement is back: the time it was overdue was an outage of ours,
            # never counted as anyone's silence (else all would go LOST the moment we recover).
            self._blind += max(0.0, entry.seen_at - _overdue_from(old))
        entry.blind_at = self.blind(entry.seen_at)
        entry.status = self.status(entry, entry.seen_at)
        self.entries[entry.name] = entry
        if old is None or old.status is not entry.status:
            self._emit(entry, old.status if old else None)
        self._changed()

    def blind(self, now: float | None = None) -> float:
        """Seconds this view could hear nobody, up to ``now``: the time its own announcements
        were overdue (they come back through its broker, so their absence means our link
        stalled). A bare watcher (announcing nothing) is never blind."""
        now = time.time() if now is None else now
        own = self.entries.get(self.agent.name)
        if own is None or own.leaving:
            return self._blind
        return self._blind + max(0.0, now - _overdue_from(own))

    def status(self, entry: Entry, now: float | None = None) -> Status:
        """``entry``'s liveness as this view judges it: its silence while we were blind does
        not count (a gateway whose broker hung for a few seconds must not see every node LOST
        and answer 404 for every model)."""
        now = time.time() if now is None else now
        return entry.status_now(now, self.blind(now) - entry.blind_at)

    def _changed(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def until(self, found: Callable[[], _T], timeout: float) -> _T:
        """``found()`` once it is truthy, re-asked at each change of the view; its last answer
        when ``timeout`` seconds pass first."""
        loop = asyncio.get_running_loop()
        limit = loop.time() + timeout
        while not (answer := found()) and (left := limit - loop.time()) > 0:
            waiter = loop.create_future()
            self._waiters.append(waiter)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter, left)
        return answer

    def _emit(self, entry: Entry, before: Status | None) -> None:
        event = {
            "agent": entry.name,
            "status": str(entry.status),
            "before": str(before) if before else None,
            "time": time.time(),
        }
        for listener in self.listeners:
            listener(event)
        # An imported entry (``agent@tenant``, ``atoll.agent.imports``) is this view's alone.
        if self.publish_events and "@" not in entry.name and self.agent.link.connected.is_set():
            task = asyncio.ensure_future(self.agent.publish(f"{EVENTS}.{entry.name}", event))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            now = time.time()
            for entry in list(self.entries.values()):
                status = self.status(entry, now)
                if status is not entry.status:
                    before, entry.status = entry.status, status
                    self._emit(entry, before)
                    self._changed()

    def select(
        self,
        plugin: str | None = None,
        capability: dict[str, Any] | None = None,
        labels: dict[str, str] | None = None,
        region: str | None = None,
        status: Status | None = Status.ACTIVE,
        load_key: str | None = None,
    ) -> list[Entry]:
        """Agents matching every criterion given, least loaded first when ``load_key`` names a
        load figure (e.g. ``queue_depth``)."""
        found = []
        for e in self.entries.values():
            if status is not None and e.status is not status:
                continue
            if plugin is not None and plugin not in e.plugins:
                continue
            if region is not None and e.region != region:
                continue
            if labels and any(e.labels.get(k) != v for k, v in labels.items()):
                continue
            if capability and not all(e.offers(k, v, plugin) for k, v in capability.items()):
                continue
            found.append(e)
        if load_key is not None:
            found.sort(key=lambda e: float(e.load.get(load_key, 0.0) or 0.0))
        return found


_SHARED: weakref.WeakKeyDictionary[Agent, Discovery] = weakref.WeakKeyDictionary()


def _overdue_from(own: Entry) -> float:
    """When our own next announcement is late (a beat and a half after the last one)."""
    return own.seen_at + 1.5 * own.interval


class Finder:
    """Where a service runs (an agent offering ``plugin``, with ``capability``), found with a
    snapshot and remembered until ``forget`` (the caller saw the address fail)."""

    def __init__(
        self,
        agent: Agent,
        plugin: str,
        capability: dict[str, Any] | None = None,
        wait: float = 1.0,
        what: str | None = None,
    ) -> None:
        self.agent = agent
        self.plugin = plugin
        self.capability = capability
        self.wait = wait  # a service that is just starting announces within moments
        self.what = what or f"{plugin} plugin"
        self.snapshots = 0  # how many were taken (each costs O(agents) deliveries)
        self._address: str | None = None

    async def address(self) -> str:
        if self._address is None:
            deadline = time.monotonic() + self.wait
            while True:
                self.snapshots += 1
                view = await Discovery.snapshot(self.agent)
                found = view.select(plugin=self.plugin, capability=self.capability)
                if found:
                    break
                if time.monotonic() >= deadline:
                    raise NoResponder(f"no agent offering the {self.what} is online")
                await asyncio.sleep(min(0.2, self.wait))
            self._address = service_address(found[0].name, self.plugin)
        return self._address

    def forget(self, address: str | None = None) -> None:
        """Look again next time (if ``address`` is given: only if it is the one found)."""
        if address is None or address == self._address:
            self._address = None
