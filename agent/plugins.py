"""Plugins: the product features an agent hosts.

A plugin is a class registered under the entry-point group ``atoll.plugins``. It gets a
``PluginContext`` (its only door to the overlay: everything it sends carries ``agent/plugin``)
and exposes RPC methods marked with ``@rpc(roles=...)`` and stream services served with
``ctx.serve_stream(..., roles=...)``. The agent checks the caller's signed roles against those
before a handler runs, so every method states who may use it and no plugin repeats the check.

Operators change an agent's plugins remotely (the ``system`` plugin's ``plugin_*`` methods): a
config is validated by the plugin's own ``config_model`` before anything changes, a plugin that
fails to start with a new config is started again with its previous one, and what the agent was
told is kept in ``remote-plugins.json`` (0600: configs may hold secrets) and applied over its
config file at the next start, so a restart comes back the same.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel

from atoll.agent.contract import parse
from atoll.agent.discovery import Discovery, Finder
from atoll.agent.errors import InvalidRequest
from atoll.agent.metrics import MetricsRegistry, metrics_snapshot
from atoll.agent.node import Agent, Handler, Subscription
from atoll.agent.streams import Stream, StreamHandler
from atoll.agent.watch import TenantWatch
from atoll.logs import EventLogger
from atoll.protocol.grants import Grant
from atoll.protocol.session import Publication
from atoll.protocol.streams import WINDOW
from atoll.protocol.trust import ROLES, AgentIdentity
from atoll.tenancy.keys import write_secret

ENTRY_POINT_GROUP = "atoll.plugins"
# In the agent's data dir: what operators changed remotely ({plugin: config, or null: removed}).
REMOTE_CHANGES = "remote-plugins.json"

# Who may call: role names (``permissions.ANY`` for any agent of the tenant), or a function of
# the started plugin returning them (roles its config sets, as inference's ``callers``).
Roles = Sequence[str] | Callable[[Any], Sequence[str]]
F = TypeVar("F", bound=Callable[..., Any])


def rpc(name: str | None = None, *, roles: Roles) -> Callable[[F], F]:
    """Mark a plugin method ``async def m(self, params, call)`` as callable over the overlay by
    agents holding one of ``roles``."""

    def mark(fn: F) -> F:
        fn.__atoll_rpc__ = (name or fn.__name__, roles)  # type: ignore[attr-defined]
        return fn

    return mark


def _checked(roles: Sequence[str], where: str) -> tuple[str, ...]:
    unknown = [r for r in roles if r != "*" and r not in ROLES]
    if unknown or not roles:
        raise ValueError(f"{where}: unknown roles {unknown}; choose from {sorted(ROLES)} or '*'")
    return tuple(roles)


M = TypeVar("M", bound=BaseModel)


class PluginContext:
    """A plugin's only door to the overlay: calls, streams and publications carry its address
    ``agent/plugin``; services it offers state which roles may use them."""

    def __init__(self, host: PluginHost, name: str, config: dict[str, Any], data_dir: Path) -> None:
        self._host = host
        self._agent = agent = host.agent
        self.name = name
        self.config = config
        self.data_dir = data_dir
        self.address = f"{agent.name}/{name}"
        self.log = EventLogger(f"plugin.{name}", agent=agent.name, tenant=agent.tenant)
        self.metrics = MetricsRegistry()  # rides the agent's metrics feed under this plugin

    def settings(self, model: type[M], section: dict[str, Any] | None = None) -> M:
        """The plugin's config section (or a sub-``section`` of it) validated with ``model``;
        relative paths in ``ConfigPath`` fields are relative to the agent's config file."""
        raw = self.config if section is None else section
        return model.model_validate(raw, context={"config_dir": self._host.config_dir})

    @property
    def identity(self) -> AgentIdentity:
        return self._agent.ident

    @property
    def broker_url(self) -> str | None:
        return self._agent.link.url

    @property
    def started_at(self) -> float:
        return self._agent.started_at

    async def call(
        self, dst: str, method: str, params: Any = None, timeout: float | None = None
    ) -> Any:
        return await self._agent.call(dst, method, params, timeout, src=self.address)

    async def open_stream(
        self,
        dst: str,
        service: str,
        params: Any = None,
        timeout: float = 30.0,
        window: int = WINDOW,
    ) -> Stream:
        return await self._agent.streams.open(dst, service, params, self.address, timeout, window)

    def serve_stream(self, service: str, handler: StreamHandler, *, roles: Roles) -> None:
        """Accept streams to this plugin's ``service`` from agents holding one of ``roles``
        (withdrawn when the plugin is removed)."""
        accepted = roles(self._host.plugins[self.name]) if callable(roles) else roles
        where = f"stream {self.name}/{service}"
        self._agent.streams.serve(self.name, service, handler, _checked(accepted, where))

    async def publish(self, subject: str, data: Any) -> None:
        await self._agent.publish(subject, data, src=self.address)

    async def subscribe(
        self, pattern: str, callback: Callable[[Publication], Any] | None = None
    ) -> Subscription:
        return await self._agent.subscribe(pattern, callback)

    async def discovery(self, publish_events: bool = False) -> Discovery:
        """A started live view of the tenant's agents (the plugin stops it): for plugins that
        route or watch; one that only calls a service now and then uses ``finder``."""
        return await Discovery.shared(self._agent, publish_events).start()

    def finder(
        self, plugin: str, capability: dict[str, Any] | None = None, what: str | None = None
    ) -> Finder:
        """Where a service runs, from a snapshot remembered until ``forget`` (no live view)."""
        return Finder(self._agent, plugin, capability, what=what)

    def metrics_snapshot(self) -> dict[str, Any]:
        """This agent's feed message as the feed would build it now: every plugin's metrics as
        they are, the system section of the feed's last reading (empty before the first)."""
        host = self._host
        return metrics_snapshot(agent=self._agent.name, system=host.system, plugins=host.metrics())

    async def imports(self) -> list[tuple[Grant, list[AgentIdentity]]]:
        """What this tenant imports through grants (``Agent.imports``)."""
        return await self._agent.imports()

    async def watch(self) -> TenantWatch:
        """A started view of discovery and every agent's metrics feed (the roles that may
        watch other agents' metrics only; the plugin stops it)."""
        return await TenantWatch(self._agent).start()

    async def wait_connected(self, timeout: float) -> None:
        await self._agent.wait_connected(timeout)

    def plugin_statuses(self) -> list[dict[str, Any]]:
        return self._host.statuses()


class Plugin:
    name: ClassVar[str] = ""
    # The config section's model: a remote change is checked with it before anything changes
    # (None: the plugin takes no config).
    config_model: ClassVar[type[BaseModel] | None] = None

    def __init__(self) -> None:
        self._ctx: PluginContext | None = None
        self.state = "stopped"

    @property
    def ctx(self) -> PluginContext:
        """The plugin's context: the host binds it before ``start`` and it stays for the
        plugin's life, so every handler, stream and task may use it."""
        if self._ctx is None:
            raise RuntimeError(f"plugin {type(self).__name__} has no context: it was never added")
        return self._ctx

    def bind(self, ctx: PluginContext) -> None:
        """Give the plugin its context (``PluginHost.add`` does, before ``start``)."""
        self._ctx = ctx

    async def start(self, ctx: PluginContext) -> None:
        """Take what the plugin needs; ``self.ctx`` is ``ctx`` already."""
        self.bind(ctx)

    async def stop(self) -> None:
        """Release what ``start`` took."""

    def status(self) -> dict[str, Any]:
        return {}

    def describe(self) -> dict[str, Any]:
        """What discovery announces for this plugin: optional ``capabilities`` (e.g. base
        models, adapters loaded), ``endpoints`` and ``load`` (e.g. queue depth)."""
        return {}

    def rpc_methods(self) -> dict[str, tuple[Handler, tuple[str, ...]]]:
        """Each ``@rpc`` method by its overlay name, with the roles that may call it."""
        methods: dict[str, tuple[Handler, tuple[str, ...]]] = {}
        for attr in dir(type(self)):
            fn = getattr(type(self), attr)
            marked = getattr(fn, "__atoll_rpc__", None)
            if marked:
                rpc_name, roles = marked
                accepted = roles(self) if callable(roles) else roles
                methods[rpc_name] = (getattr(self, attr), tuple(accepted))
        return methods


def available_plugins() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def remote_changes(data_dir: Path) -> dict[str, dict[str, Any] | None]:
    """What operators told the agent in ``data_dir`` (``REMOTE_CHANGES``); {} if nothing."""
    try:
        changes = json.loads((Path(data_dir) / REMOTE_CHANGES).read_text())
    except FileNotFoundError:
        return {}
    if not isinstance(changes, dict):
        raise ValueError(f"{REMOTE_CHANGES} in {data_dir} is not an object")
    return changes


class PluginHost:
    """Loads, starts, stops and reports on an agent's plugins."""

    def __init__(self, agent: Agent, data_dir: Path, config_dir: Path | None = None) -> None:
        self.agent = agent
        self.data_dir = Path(data_dir)
        self.config_dir = config_dir  # where the config file is (None: plugins set up in code)
        self.plugins: dict[str, Plugin] = {}
        self.errors: dict[str, str] = {}
        self.system: dict[str, Any] = {}  # the metrics feed's last host reading
        self.log = EventLogger("plugins", agent=agent.name)
        self._changing = asyncio.Lock()  # one remote change at a time

    # --- remote changes (the system plugin's plugin_* methods) ----------------------------------

    def validate(self, name: str, config: dict[str, Any]) -> type[Plugin]:
        """The plugin class ``name`` if ``config`` passes its ``config_model``; InvalidRequest
        saying why otherwise (nothing has changed yet)."""
        _changeable(name)
        eps = available_plugins()
        if name not in eps:
            raise InvalidRequest(f"no plugin {name!r}; installed: {', '.join(sorted(eps))}")
        cls: type[Plugin] = eps[name].load()
        if cls.config_model is not None:
            where = {"config_dir": self.config_dir}
            parse(cls.config_model, config, f"plugin {name!r} config", context=where)
        elif config:
            raise InvalidRequest(f"plugin {name!r} takes no config")
        return cls

    async def change(self, name: str, config: dict[str, Any] | None) -> None:
        """Run ``name`` with ``config`` (added, or replaced; None: removed) and remember it for
        the next start. A plugin that fails to start with the new config is started again with
        its previous one, and the start's error is raised."""
        async with self._changing:
            _changeable(name)
            if config is not None:
                self.validate(name, config)
            elif name not in self.plugins:
                raise InvalidRequest(f"plugin {name!r} is not running here")
            old = self.plugins.get(name)
            previous = dict(old.ctx.config) if old is not None else None
            if old is not None:
                await self.remove(name)
            if config is not None:
                try:
                    await self.add(name, config)
                except Exception as exc:
                    error = self.errors.get(name, f"{type(exc).__name__}: {exc}")
                    if previous is not None:
                        await self.add(name, previous)
                        self.errors[name] = error  # kept beside the running plugin: why
                    raise InvalidRequest(
                        f"plugin {name!r} did not start with that config ({error})"
                        + ("; it runs on with its previous config" if previous is not None else "")
                    ) from None
            changes = remote_changes(self.data_dir)
            changes[name] = config
            write_secret(self.data_dir / REMOTE_CHANGES, json.dumps(changes, indent=1).encode())
            self.log.info("plugin.changed", plugin=name, removed=config is None)

    async def restart(self, name: str) -> None:
        async with self._changing:
            _changeable(name)
            if name not in self.plugins:
                raise InvalidRequest(f"plugin {name!r} is not running here")
            config = dict(self.plugins[name].ctx.config)
            await self.remove(name)
            await self.add(name, config)

    async def add(
        self, name: str, config: dict[str, Any] | None = None, plugin: Plugin | None = None
    ) -> Plugin:
        if name in self.plugins:
            raise ValueError(f"plugin {name!r} is already loaded")
        if plugin is None:
            eps = available_plugins()
            if name not in eps:
                raise KeyError(f"no plugin {name!r}; installed: {', '.join(sorted(eps))}")
            plugin = eps[name].load()()
        pdir = self.data_dir / "plugins" / name
        pdir.mkdir(parents=True, exist_ok=True)
        ctx = PluginContext(self, name, dict(config or {}), pdir)
        plugin.bind(ctx)
        plugin.state = "starting"
        self.plugins[name] = plugin
        try:
            await plugin.start(ctx)
        except Exception as exc:
            # Not loaded: the reason stays visible in statuses(), and it may be added again.
            del self.plugins[name]
            self.agent.streams.unserve(name)
            self.errors[name] = f"{type(exc).__name__}: {exc}"
            self.log.error("plugin.start_failed", plugin=name, error=exc)
            raise
        self.errors.pop(name, None)
        # The one check of declared roles, here so that a plugin's own rpc_methods() (the
        # gateway's admin table) cannot skip it.
        for method, (fn, roles) in plugin.rpc_methods().items():
            where = f"{type(plugin).__name__} method {method}"
            self.agent.handle(name, method, fn, _checked(roles, where))
        plugin.state = "running"
        self.log.info("plugin.started", plugin=name)
        return plugin

    async def remove(self, name: str) -> None:
        plugin = self.plugins.pop(name)
        self.agent.unhandle(name)
        self.agent.streams.unserve(name)
        plugin.state = "stopping"
        try:
            await asyncio.wait_for(plugin.stop(), 30)
        finally:
            plugin.state = "stopped"
            self.log.info("plugin.stopped", plugin=name)

    async def stop_all(self) -> None:
        for name in reversed(list(self.plugins)):
            try:
                await self.remove(name)
            except Exception as exc:
                self.log.error("plugin.stop_failed", plugin=name, error=exc)

    def describe(self) -> dict[str, Any]:
        """The announcement body for discovery, gathered from every running plugin."""
        out: dict[str, Any] = {"plugins": [], "capabilities": {}, "endpoints": {}, "load": {}}
        for name, plugin in self.plugins.items():
            if plugin.state != "running":
                continue
            out["plugins"].append(name)
            try:
                described = plugin.describe()
            except Exception as exc:  # one plugin's bug must not silence the agent
                self.log.error("plugin.describe_failed", plugin=name, error=exc)
                continue
            for key in ("capabilities", "endpoints"):
                if described.get(key):
                    out[key][name] = described[key]
            out["load"].update(described.get("load", {}))
        return out

    def metrics(self) -> dict[str, MetricsRegistry]:
        return {n: p.ctx.metrics for n, p in self.plugins.items()}  # each bound when added

    def statuses(self) -> list[dict[str, Any]]:
        """Each plugin's state (and the last start error of one that failed, or of one that
        runs on after a change it could not start with)."""
        out = []
        for n, p in self.plugins.items():
            last = {"last_error": self.errors[n]} if n in self.errors else {}
            out.append({"name": n, "state": p.state, **last, **p.status()})
        out += [
            {"name": n, "state": "failed", "error": e}
            for n, e in self.errors.items()
            if n not in self.plugins
        ]
        return out


def _changeable(name: str) -> None:
    if name == "system":  # it is how operators reach the agent at all
        raise InvalidRequest("the system plugin is part of the agent: it cannot be changed")


logging.getLogger("websockets").setLevel(logging.WARNING)
