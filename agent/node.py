"""The agent: the asyncio shell around its session (``atoll.protocol.session``), which seals and
opens payloads; this module runs RPC and pub/sub over the broker link and hosts handlers.

Everything an agent sends to another agent is sealed end to end: direct messages with the Box key
shared with that peer (whose credential it fetches through the broker and verifies against the
operator key itself), publications with the tenant feed key. The session decides; the shell
writes the frames it makes, keeps the futures and tasks, and acts on its events.

It runs past 400 lines because it is the whole asyncio half of the session (calls made and
served, pub/sub, peers' keys), whose parts share one link, one session and one set of waiters.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from atoll.agent.connection import BrokerLink
from atoll.agent.errors import (
    AtollError,
    ConnectionLost,
    DeadlineExceeded,
    Forbidden,
    InternalError,
    NoResponder,
    NoSuchMethod,
)
from atoll.agent.grant_checks import granted
from atoll.agent.identity import AgentKeys
from atoll.agent.streams import Stream, StreamMux
from atoll.logs import EventLogger
from atoll.protocol.frames import Frame, FrameType, encode_frame
from atoll.protocol.grants import Grant
from atoll.protocol.session import (
    BrokerError,
    CallFailed,
    CallInfo,
    Cancelled,
    Event,
    Failure,
    ImportsKnown,
    KeyRequest,
    Peer,
    PeerKnown,
    PeerUnknown,
    Publication,
    Refused,
    Replied,
    Requested,
    Session,
    StreamMessage,
    Undelivered,
)
from atoll.protocol.streams import WINDOW
from atoll.protocol.subjects import SubjectIndex, check_subject, peer_name, split_remote
from atoll.protocol.trust import AgentIdentity, now_ms
from atoll.tenancy import permissions

Handler = Callable[[Any, CallInfo], Awaitable[Any]]


class Overlay(Protocol):
    """What code that talks over the overlay needs: an ``Agent`` (tools, the CLI) or a plugin's
    ``PluginContext`` (which stamps ``agent/plugin`` on everything it sends)."""

    log: EventLogger

    async def call(
        self, dst: str, method: str, params: Any = None, timeout: float | None = None
    ) -> Any: ...

    async def open_stream(
        self,
        dst: str,
        service: str,
        params: Any = None,
        timeout: float = 30.0,
        window: int = WINDOW,
    ) -> Stream: ...

    async def publish(self, subject: str, data: Any) -> None: ...

    async def subscribe(
        self, pattern: str, callback: Callable[[Publication], Any] | None = None
    ) -> Subscription: ...

    async def wait_connected(self, timeout: float) -> None: ...


@dataclass
class Subscription:
    """A subscription: delivered to ``callback`` or, without one, read with ``next()``."""

    agent: Agent
    sid: int
    pattern: str
    callback: Callable[[Publication], Any] | None
    queue: asyncio.Queue[Publication] = field(default_factory=lambda: asyncio.Queue(maxsize=10_000))
    dropped: int = 0
    _task: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        self._sync = self.callback is not None and not inspect.iscoroutinefunction(self.callback)

    def _deliver(self, pub: Publication) -> None:
        if self._sync:
            try:
                self.callback(pub)  # type: ignore[misc]  # _sync: there is one
            except Exception as exc:  # a subscriber's bug must not reach the broker link
                self.agent.log.error(
                    "agent.subscriber_failed", subject=pub.subject, error=exc, exc_info=True
                )
            return
        try:
            self.queue.put_nowait(pub)
        except asyncio.QueueFull:
            self.dropped += 1  # a slow local consumer loses messages, never stalls the agent

    async def _pump(self) -> None:
        assert self.callback is not None
        while True:
            pub = await self.queue.get()
            try:
                await self.callback(pub)
            except Exception as exc:
                self.agent.log.error(
                    "agent.subscriber_failed", subject=pub.subject, error=exc, exc_info=True
                )

    async def next(self, timeout: float | None = None) -> Publication:
        return await asyncio.wait_for(self.queue.get(), timeout)

    async def unsubscribe(self) -> None:
        await self.agent._unsubscribe(self)


class Agent:
    def __init__(
        self,
        keys: AgentKeys,
        brokers: list[str],
        *,
        log: EventLogger | None = None,
        call_timeout: float = 30.0,
        **link_options: Any,
    ) -> None:
        self.keys = keys
        self.ident = keys.ident
        self.name = self.ident.name
        self.tenant = self.ident.tenant
        self.log = log or EventLogger("agent", agent=self.name, tenant=self.tenant)
        self.call_timeout = call_timeout
        self._session = Session(
            self.tenant,
            keys.key._signing_key,  # the 64-byte Ed25519 secret key: Box keys derive from it
            keys.operator_pub,
            keys.feed_keys,
        )
        self._sids = itertools.count(1)
        # Key requests waited on: a Peer, or (for "@") the tenant's imports.
        self._key_waiters: dict[str, asyncio.Future[Any]] = {}
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._serving: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._handlers: dict[str, dict[str, tuple[Handler, tuple[str, ...]]]] = {}
        self._allowed: dict[tuple[str, str], bool] = {}  # (kind, subject) -> the table's answer
        self._subs: dict[int, Subscription] = {}
        self._sub_index: SubjectIndex[int, Subscription] = SubjectIndex()
        self.link = BrokerLink(
            brokers, keys, self._on_frames, self._on_up, self._on_down, self.log, **link_options
        )
        self.started_at = time.time()
        self.streams = StreamMux(self.name, self._send, self._peer, self.log)

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self, wait: float | None = 10.0) -> Agent:
        self.link.start()
        if wait:
            await self.link.wait_connected(wait)
        return self

    async def stop(self) -> None:
        for sub in list(self._subs.values()):
            if sub._task is not None:
                sub._task.cancel()
        for task in list(self._serving.values()):
            task.cancel()
        await self.link.stop()

    async def _on_up(self) -> None:
        for sub in self._subs.values():  # resubscribe after every (re)connect
            self.link.send(self._session.subscribe(sub.sid, sub.pattern))

    def _on_down(self, exc: ConnectionLost) -> None:
        self.streams.reset_all(ConnectionLost(f"{exc.message} (stream broken)"))
        for event in self._session.connection_lost(exc.message):
            self._dispatch(event)
        waiters, self._key_waiters = self._key_waiters, {}
        for fut in waiters.values():
            if not fut.done():
                fut.set_exception(ConnectionLost(exc.message))

    # --- handlers ------------------------------------------------------------------------------

    def handle(self, plugin: str, method: str, fn: Handler, roles: tuple[str, ...]) -> None:
        """Serve ``plugin``'s ``method`` to callers with one of ``roles`` (``permissions.ANY``:
        any agent of the tenant); the roles are checked here, before ``fn`` runs."""
        self._handlers.setdefault(plugin, {})[method] = (fn, tuple(roles))

    def unhandle(self, plugin: str) -> None:
        self._handlers.pop(plugin, None)

    # --- peers ---------------------------------------------------------------------------------

    async def _peer(self, name: str, timeout: float) -> Peer:
        peer = self._session.peers.get(name)
        if peer is not None:
            return peer
        found: Peer = await self._ask(name, timeout)
        return found

    async def _ask(self, name: str, timeout: float) -> Any:
        fut = self._key_waiters.get(name)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            fut.add_done_callback(_consume_exception)
            self._key_waiters[name] = fut
            frame = self._session.request_key(name)
            if frame is not None:
                try:
                    self.link.send(frame)
                except ConnectionLost:
                    del self._key_waiters[name]
                    self._session.key_request_failed(name)
                    raise
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            raise DeadlineExceeded(f"no key for agent {name!r} within {timeout}s") from None

    async def flush(self, timeout: float = 10.0) -> None:
        """A round trip through the broker: everything sent before has been processed there."""
        self._session.peers.pop(self.name, None)
        await self._peer(self.name, timeout)

    # --- what the session says -----------------------------------------------------------------

    def _on_frames(self, frames: list[Frame]) -> None:
        for event in self._session.receive(frames, now_ms()):
            if type(event) is Publication:  # the hot paths, inline
                for sub in self._sub_index.match(event.subject):
                    sub._deliver(event)
            elif type(event) is Replied:
                fut = self._calls.get(event.call)
                if fut is not None and not fut.done():
                    fut.set_result(event.result)
            else:
                self._dispatch(event)

    def _dispatch(self, event: Event) -> None:
        """Act on what the session says (publications and results: ``_on_frames``)."""
        if isinstance(event, Requested):
            self._on_request(event)
        elif isinstance(event, StreamMessage):
            self.streams.on_message(event.src, event.dst, event.peer, event.body)
        elif isinstance(event, CallFailed):
            fut = self._calls.get(event.call)
            if fut is not None and not fut.done():
                fut.set_exception(_call_error(event))
        elif isinstance(event, Cancelled):
            task = self._serving.get((event.src, event.call))
            if task is not None:
                task.cancel()
        elif isinstance(event, Undelivered):
            self.streams.on_no_responder(event.msg, event.dst, event.reason)
        elif isinstance(event, PeerKnown):
            waiter = self._key_waiters.pop(event.name, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(event.peer)
        elif isinstance(event, PeerUnknown):
            waiter = self._key_waiters.pop(event.name, None)
            if waiter is not None and not waiter.done():
                waiter.set_exception(NoResponder(event.reason))
        elif isinstance(event, ImportsKnown):
            waiter = self._key_waiters.pop("@", None)
            if waiter is not None and not waiter.done():
                waiter.set_result(event.imports)
        elif isinstance(event, KeyRequest):
            try:
                self.link.send(event.frame)
            except ConnectionLost:
                self._session.key_request_failed(event.name)
        elif isinstance(event, BrokerError):
            self.log.warning(
                "agent.broker_error", code=event.code, reason=event.reason, fatal=event.fatal
            )
            if event.fatal:
                self.link.last_error = event.reason
        elif isinstance(event, Refused):
            self.log.warning(event.event, **event.fields)

    def _send(self, peer: Peer, src: str, dst: str, body: dict[str, Any]) -> int:
        msg, frame = self._session.message(peer, src, dst, body)
        self.link.send(frame, True)
        return msg

    def _expire(self, now: float) -> None:
        for event in self._session.expire(now):
            self._dispatch(event)

    # --- RPC -----------------------------------------------------------------------------------

    async def call(
        self,
        dst: str,
        method: str,
        params: Any = None,
        timeout: float | None = None,
        src: str | None = None,
    ) -> Any:
        """Call ``method`` at ``dst`` (``agent`` or ``agent/plugin``) and return its result.

        Raises NoResponder, DeadlineExceeded, ConnectionLost, or the remote handler's error.
        """
        timeout = self.call_timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        agent = peer_name(dst)
        peer = self._session.peers.get(agent) or await self._peer(agent, timeout)
        session = self._session
        call_id, frame = session.call(
            peer, src or self.name, dst, method, params, timeout, deadline, loop.time()
        )
        try:
            self.link.send(frame, True)
        except ConnectionLost:
            session.forget(call_id)
            raise
        fut = self._calls[call_id] = loop.create_future()
        # One timer instead of wait_for's extra future and task wrapping per call.
        timer = loop.call_at(deadline, self._expire, deadline)
        try:
            return await fut
        except asyncio.CancelledError:
            if self.link.connected.is_set():
                cancel = session.cancel(call_id)
                if cancel is not None:
                    with contextlib.suppress(ConnectionLost):
                        self.link.send(cancel, True)
            raise
        finally:
            timer.cancel()
            del self._calls[call_id]
            session.forget(call_id)

    def _on_request(self, request: Requested) -> None:
        _, _, plugin = split_remote(request.dst)
        handler = self._handlers.get(plugin or "system", {}).get(request.method)
        task = asyncio.create_task(self._serve(handler, request))
        key = (request.src, request.call)
        self._serving[key] = task
        task.add_done_callback(lambda _t: self._serving.pop(key, None))

    async def _serve(
        self, handler: tuple[Handler, tuple[str, ...]] | None, request: Requested
    ) -> None:
        src, dst, peer, method = request.src, request.dst, request.peer, request.method
        result: Any = None
        error: AtollError | None = None
        try:
            if handler is None:
                raise NoSuchMethod(f"{dst} has no method {method!r}")
            fn, roles = handler
            grant = granted(peer, split_remote(dst)[2])
            if not permissions.may_call(peer.ident.roles, roles):
                raise Forbidden(permissions.refusal(peer.ident, dst, repr(method), roles))
            timeout_ms = request.timeout_ms
            limit = timeout_ms / 1000 if type(timeout_ms) is int and timeout_ms > 0 else None
            async with asyncio.timeout(limit):
                result = await fn(request.params, CallInfo(src, peer.ident, method, grant))
        except asyncio.CancelledError:
            return  # the caller cancelled (or we are stopping): nobody wants an answer
        except TimeoutError:
            error = DeadlineExceeded(f"{method!r} ran past its deadline")
        except AtollError as exc:
            error = exc
        except Exception as exc:
            self.log.error("agent.handler_failed", method=method, src=src, error=exc, exc_info=True)
            error = InternalError(f"{type(exc).__name__}: {exc}")
        session = self._session
        try:
            if error is None:
                frame = session.reply(peer, dst, src, request.call, result)
            else:
                frame = session.reply_error(peer, dst, src, request.call, error.to_wire())
        except (TypeError, ValueError, OverflowError) as exc:  # a result msgpack cannot carry
            error = InternalError(f"result of {method!r} cannot be sent: {exc}")
            frame = session.reply_error(peer, dst, src, request.call, error.to_wire())
        try:  # noqa: SIM105  # not contextlib.suppress: this runs once per call served
            self.link.send(frame, True)
        except ConnectionLost:
            pass

    # --- pub/sub -------------------------------------------------------------------------------

    def _check(self, kind: str, subject: str) -> None:
        """Fail at once, with the reason, what the broker would refuse (the same table)."""
        hit = self._allowed.get((kind, subject))
        if hit is None:
            if len(self._allowed) >= 1024:
                self._allowed.clear()
            hit = self._allowed[(kind, subject)] = permissions.allowed(
                self.ident.roles, self.name, kind, subject
            )
        if not hit:
            raise Forbidden(
                f"roles {', '.join(self.ident.roles)} may not {kind} {subject!r} "
                "(atoll.tenancy.permissions)"
            )

    async def publish(
        self, subject: str, data: Any, src: str | None = None, keep: bool = False
    ) -> None:
        """Publish on a tenant subject; ``keep`` asks brokers to hold it for later subscribers
        (the last one per subject, as discovery announcements)."""
        check_subject(subject)
        self._check("keep" if keep else "publish", subject)
        self.link.send(self._session.publish(subject, data, src or self.name, keep))
        if self.link.full():  # checked inline: a coroutine call per message is measurable
            await self.link.room()

    async def subscribe(
        self, pattern: str, callback: Callable[[Publication], Any] | None = None
    ) -> Subscription:
        check_subject(pattern, pattern=True, system=pattern.startswith("$"))  # brokers' notices
        self._check("subscribe", pattern)
        sid = next(self._sids)
        sub = Subscription(self, sid, pattern, callback)
        if callback is not None and inspect.iscoroutinefunction(callback):
            sub._task = asyncio.create_task(sub._pump())
        self._subs[sid] = sub
        self._sub_index.add(sid, pattern, sub)
        if self.link.connected.is_set():
            self.link.send(self._session.subscribe(sid, pattern))
        return sub

    async def _unsubscribe(self, sub: Subscription) -> None:
        if self._subs.pop(sub.sid, None) is None:
            return
        self._sub_index.remove(sub.sid)
        if sub._task is not None:
            sub._task.cancel()
        if self.link.connected.is_set():
            self.link.send(self._session.unsubscribe(sub.sid))

    async def wait_connected(self, timeout: float) -> None:
        await self.link.wait_connected(timeout)

    async def open_stream(
        self,
        dst: str,
        service: str,
        params: Any = None,
        timeout: float = 30.0,
        window: int = WINDOW,
        src: str | None = None,
    ) -> Stream:
        """Open a stream to ``service`` at ``dst`` (``agent/plugin``)."""
        return await self.streams.open(dst, service, params, src, timeout, window)

    async def send_revocation(self, blob: bytes) -> None:
        self.link.send(self._session.revoke(blob))

    async def send_grant(self, blob: bytes) -> None:
        """An operator-signed grant or grant revocation, for the broker to enforce and flood."""
        self.link.send(encode_frame(FrameType.GRANT, {}, blob))

    async def imports(self, timeout: float = 10.0) -> list[tuple[Grant, list[AgentIdentity]]]:
        """What this tenant imports now: per grant, the exporter's agents that serve it (the
        broker's answer, verified here against the operator key)."""
        found: list[tuple[Grant, list[AgentIdentity]]] = await self._ask("@", timeout)
        return found


def _call_error(event: CallFailed) -> AtollError:
    if event.failure is Failure.REMOTE:
        return AtollError.from_wire(event.detail)
    if event.failure is Failure.NO_RESPONDER:
        return NoResponder(event.detail)
    if event.failure is Failure.DEADLINE:
        return DeadlineExceeded(event.detail)
    return ConnectionLost(event.detail)


def _consume_exception(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()
