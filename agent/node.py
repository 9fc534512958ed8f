"""The agent: seals and opens payloads, runs RPC and pub/sub over its broker link, hosts plugins.

Everything an agent sends to another agent is sealed end to end: direct messages with the Box key
shared with that peer (whose credential it fetches through the broker and verifies against the
operator key itself), publications with the tenant feed key.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

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
from atoll.agent.identity import AgentKeys
from atoll.agent.streams import WINDOW, Stream, StreamMux
from atoll.logs import EventLogger
from atoll.protocol.errors import AuthError, ProtocolError
from atoll.protocol.frames import Frame, FrameType, encode_frame
from atoll.protocol.seal import ReplayGuard, Sealer, box_key, open_sealed
from atoll.protocol.subjects import SubjectIndex, check_subject, split_address
from atoll.tenancy import permissions
from atoll.tenancy.credentials import AgentIdentity, now_ms, verify_agent

Handler = Callable[[Any, "CallInfo"], Awaitable[Any]]


@dataclass(frozen=True)
class CallInfo:
    """Who is calling: the caller's address and its verified identity (for role checks)."""

    src: str
    caller: AgentIdentity
    method: str


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


class Publication(NamedTuple):  # a tuple: built once per delivered message
    subject: str
    src: str
    data: Any


@dataclass
class _Peer:
    ident: AgentIdentity
    key: bytes


@dataclass
class _Call:
    future: asyncio.Future
    msg_id: int
    dst: str


@dataclass
class Subscription:
    """A subscription: delivered to ``callback`` or, without one, read with ``next()``."""

    agent: Agent
    sid: int
    pattern: str
    callback: Callable[[Publication], Any] | None
    queue: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(maxsize=10_000))
    dropped: int = 0
    _task: asyncio.Task | None = None

    def __post_init__(self) -> None:
        self._sync = self.callback is not None and not inspect.iscoroutinefunction(self.callback)

    def _deliver(self, pub: Publication) -> None:
        if self._sync:
            try:
                self.callback(pub)  # type: ignore[misc]
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
                await self.callback(pub)  # type: ignore[misc]
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
        self._sk = self.keys.key._signing_key  # 64-byte Ed25519 secret key for Box derivation
        self._feed_kid = max(keys.feed_keys)
        self._sealer = Sealer()
        self._replay = ReplayGuard()
        self._ids = itertools.count(int.from_bytes(os.urandom(4), "big") << 20)
        self._sids = itertools.count(1)
        self._peers: dict[str, _Peer] = {}
        self._key_waiters: dict[str, asyncio.Future] = {}
        self._held: dict[str, list[Frame]] = {}  # frames waiting for their sender's key
        self._calls: dict[int, _Call] = {}
        self._by_msg: dict[int, int] = {}
        self._serving: dict[tuple[str, int], asyncio.Task] = {}
        self._handlers: dict[str, dict[str, tuple[Handler, tuple[str, ...]]]] = {}
        self._allowed: dict[tuple[str, str], bool] = {}  # (kind, subject) -> the table's answer
        self._subs: dict[int, Subscription] = {}
        self._sub_index = SubjectIndex()
        self.link = BrokerLink(
            brokers, keys, self._on_frames, self._on_up, self._on_down, self.log, **link_options
        )
        self.started_at = time.time()
        self.streams = StreamMux(self)

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
            self.link.send(encode_frame(FrameType.SUB, {"sid": sub.sid, "subj": sub.pattern}))

    def _on_down(self, exc: ConnectionLost) -> None:
        self.streams.reset_all(ConnectionLost(f"{exc.message} (stream broken)"))
        calls, self._calls = self._calls, {}
        self._by_msg.clear()
        for call in calls.values():
            if not call.future.done():
                call.future.set_exception(ConnectionLost(f"{exc.message} (calling {call.dst})"))
        waiters, self._key_waiters = self._key_waiters, {}
        for fut in waiters.values():
            if not fut.done():
                fut.set_exception(ConnectionLost(exc.message))
        self._held.clear()

    # --- handlers ------------------------------------------------------------------------------

    def handle(self, plugin: str, method: str, fn: Handler, roles: tuple[str, ...]) -> None:
        """Serve ``plugin``'s ``method`` to callers with one of ``roles`` (``permissions.ANY``:
        any agent of the tenant); the roles are checked here, before ``fn`` runs."""
        self._handlers.setdefault(plugin, {})[method] = (fn, tuple(roles))

    def unhandle(self, plugin: str) -> None:
        self._handlers.pop(plugin, None)

    # --- peers ---------------------------------------------------------------------------------

    async def _peer(self, name: str, timeout: float) -> _Peer:
        peer = self._peers.get(name)
        if peer is not None:
            return peer
        fut = self._key_waiters.get(name)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            fut.add_done_callback(_consume_exception)
            self._key_waiters[name] = fut
            try:
                self.link.send(encode_frame(FrameType.KEYREQ, {"name": name}))
            except ConnectionLost:
                del self._key_waiters[name]
                raise
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            raise DeadlineExceeded(f"no key for agent {name!r} within {timeout}s") from None

    async def flush(self, timeout: float = 10.0) -> None:
        """A round trip through the broker: everything sent before has been processed there."""
        self._peers.pop(self.name, None)
        await self._peer(self.name, timeout)

    def _on_keyresp(self, f: Frame) -> None:
        name = f.header["name"]
        fut = self._key_waiters.pop(name, None)
        try:
            ident = verify_agent(f.payload, self.keys.operator_pub)
            if ident.name != name or ident.tenant != self.tenant:
                raise AuthError(f"broker answered for {name!r} with a credential of {ident.name!r}")
        except ProtocolError as exc:
            self.log.warning("agent.peer_key_refused", peer=name, reason=exc.reason)
            if fut is not None and not fut.done():
                fut.set_exception(NoResponder(f"agent {name!r}: {exc.reason}"))
            self._held.pop(name, None)
            return
        peer = _Peer(ident, box_key(self._sk, ident.pub))
        self._peers[name] = peer
        if fut is not None and not fut.done():
            fut.set_result(peer)
        now = now_ms()
        for held in self._held.pop(name, []):
            self._open_msg(peer, held, now)

    # --- inbound -------------------------------------------------------------------------------

    def _on_frames(self, frames: list[Frame]) -> None:
        now = now_ms()  # one clock reading for the replay checks of a batch
        for f in frames:
            t = f.type
            if t is FrameType.PUB:
                self._on_pub(f, now)
            elif t is FrameType.MSG:
                self._on_msg(f, now)
            elif t is FrameType.KEYRESP:
                self._on_keyresp(f)
            elif t is FrameType.NORESP:
                self._on_noresp(f)
            elif t is FrameType.ERROR:
                self._on_error(f)
            else:
                self.log.warning("agent.unexpected_frame", type=t.name)

    def _on_error(self, f: Frame) -> None:
        h = f.header
        self.log.warning(
            "agent.broker_error", code=h["code"], reason=h["reason"], fatal=h.get("fatal", False)
        )
        name = h.get("name")
        if name is not None:
            fut = self._key_waiters.pop(name, None)
            if fut is not None and not fut.done():
                fut.set_exception(NoResponder(h["reason"]))
            self._held.pop(name, None)
        if h.get("fatal"):
            self.link.last_error = h["reason"]

    def _on_noresp(self, f: Frame) -> None:
        if self.streams.on_no_responder(f.header["id"], f.header["reason"]):
            return
        call_id = self._by_msg.pop(f.header["id"], None)
        call = self._calls.get(call_id) if call_id is not None else None
        if call is not None and not call.future.done():
            call.future.set_exception(NoResponder(f.header["reason"]))

    def _on_msg(self, f: Frame, now: int) -> None:
        src = f.header.get("src", "")
        try:
            agent, _ = split_address(src)
        except ProtocolError:
            self.log.warning("agent.msg_refused", reason="bad source address")
            return
        peer = self._peers.get(agent)
        if peer is not None:
            self._open_msg(peer, f, now)
            return
        held = self._held.setdefault(agent, [])
        if len(held) < 1024:
            held.append(f)
        if agent not in self._key_waiters:
            self._key_waiters[agent] = asyncio.get_running_loop().create_future()
            self._key_waiters[agent].add_done_callback(_consume_exception)
            try:
                self.link.send(encode_frame(FrameType.KEYREQ, {"name": agent}))
            except ConnectionLost:
                self._key_waiters.pop(agent, None)

    def _open_msg(self, peer: _Peer, f: Frame, now: int) -> None:
        src, dst = f.header["src"], f.header["dst"]
        try:
            nonce, sent, msg = open_sealed(peer.key, f.payload, src, dst)
            self._replay.check(peer.ident.pub, nonce, sent, now)
            if type(msg) is not dict:
                raise ProtocolError("message body must be a map")
        except ProtocolError as exc:
            if exc.code == "tampered":
                self._peers.pop(peer.ident.name, None)  # the peer may have a new key: refetch
            self.log.warning("agent.msg_refused", src=src, code=exc.code, reason=exc.reason)
            return
        kind = msg.get("k")
        if kind == "q":
            self._on_request(src, dst, peer, msg)
        elif kind in ("r", "e"):
            call = self._calls.get(msg.get("c"))  # type: ignore[arg-type]
            if call is None or call.future.done():
                return
            self._by_msg.pop(call.msg_id, None)
            if kind == "r":
                call.future.set_result(msg.get("r"))
            else:
                call.future.set_exception(AtollError.from_wire(msg.get("e")))
        elif kind == "x":
            task = self._serving.get((src, msg.get("c")))  # type: ignore[arg-type]
            if task is not None:
                task.cancel()
        elif isinstance(kind, str) and kind[:1] == "s":
            self.streams.on_message(src, dst, peer, msg)

    def _on_pub(self, f: Frame, now: int) -> None:
        h = f.header
        key = self.keys.feed_keys.get(h["kid"])
        if key is None:
            self.log.warning("agent.pub_refused", subject=h["subj"], reason="unknown feed key")
            return
        src = h.get("src", "")
        try:
            nonce, sent, data = open_sealed(key, f.payload, src, h["subj"])
            self._replay.check(src, nonce, sent, now)  # per address: windows of one sealer epoch
        except ProtocolError as exc:
            self.log.warning(
                "agent.pub_refused", subject=h["subj"], code=exc.code, reason=exc.reason
            )
            return
        pub = Publication(h["subj"], src, data)
        for sub in self._sub_index.match(pub.subject):
            sub._deliver(pub)  # type: ignore[attr-defined]

    # --- RPC -----------------------------------------------------------------------------------

    def _send_sealed(self, peer: _Peer, src: str, dst: str, body: dict[str, Any]) -> int:
        msg_id = next(self._ids)
        sealed = self._sealer.seal(peer.key, src, dst, body)
        self.link.send(
            encode_frame(FrameType.MSG, {"id": msg_id, "src": src, "dst": dst}, sealed), True
        )
        return msg_id

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
        agent, _ = split_address(dst)
        peer = self._peers.get(agent) or await self._peer(agent, timeout)
        call_id = next(self._ids)
        fut = loop.create_future()
        remaining = max(0.0, deadline - loop.time())
        body = {"k": "q", "c": call_id, "m": method, "p": params, "t": int(remaining * 1000)}
        msg_id = self._send_sealed(peer, src or self.name, dst, body)
        self._calls[call_id] = _Call(fut, msg_id, dst)
        self._by_msg[msg_id] = call_id
        # One timer instead of wait_for's extra future and task wrapping per call.
        expired = DeadlineExceeded(f"{dst} did not answer {method!r} within {timeout}s")
        timer = loop.call_at(deadline, _fail, fut, expired)
        try:
            return await fut
        except asyncio.CancelledError:
            if self.link.connected.is_set():
                with contextlib.suppress(ConnectionLost):
                    self._send_sealed(peer, src or self.name, dst, {"k": "x", "c": call_id})
            raise
        finally:
            timer.cancel()
            self._calls.pop(call_id, None)
            self._by_msg.pop(msg_id, None)

    def _on_request(self, src: str, dst: str, peer: _Peer, msg: dict[str, Any]) -> None:
        call_id = msg.get("c")
        method = msg.get("m")
        if type(call_id) is not int or not isinstance(method, str):
            return
        _, plugin = split_address(dst)
        handler = self._handlers.get(plugin or "system", {}).get(method)
        task = asyncio.create_task(
            self._serve(handler, src, dst, peer, call_id, method, msg.get("p"), msg.get("t"))
        )
        self._serving[(src, call_id)] = task
        task.add_done_callback(lambda _t: self._serving.pop((src, call_id), None))

    async def _serve(
        self,
        handler: tuple[Handler, tuple[str, ...]] | None,
        src: str,
        dst: str,
        peer: _Peer,
        call_id: int,
        method: str,
        params: Any,
        timeout_ms: Any,
    ) -> None:
        try:
            if handler is None:
                raise NoSuchMethod(f"{dst} has no method {method!r}")
            fn, roles = handler
            if not permissions.may_call(peer.ident.roles, roles):
                raise Forbidden(permissions.refusal(peer.ident, dst, repr(method), roles))
            limit = timeout_ms / 1000 if type(timeout_ms) is int and timeout_ms > 0 else None
            async with asyncio.timeout(limit):
                result = await fn(params, CallInfo(src, peer.ident, method))
            body = {"k": "r", "c": call_id, "r": result}
        except asyncio.CancelledError:
            return  # the caller cancelled (or we are stopping): nobody wants an answer
        except TimeoutError:
            body = {
                "k": "e",
                "c": call_id,
                "e": DeadlineExceeded(f"{method!r} ran past its deadline").to_wire(),
            }
        except AtollError as exc:
            body = {"k": "e", "c": call_id, "e": exc.to_wire()}
        except Exception as exc:
            self.log.error("agent.handler_failed", method=method, src=src, error=exc, exc_info=True)
            body = {
                "k": "e",
                "c": call_id,
                "e": InternalError(f"{type(exc).__name__}: {exc}").to_wire(),
            }
        try:
            self._send_sealed(peer, dst, src, body)
        except (TypeError, ValueError, OverflowError) as exc:  # a result msgpack cannot carry
            error = InternalError(f"result of {method!r} cannot be sent: {exc}")
            with contextlib.suppress(ConnectionLost):
                self._send_sealed(peer, dst, src, {"k": "e", "c": call_id, "e": error.to_wire()})
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
        src = src or self.name
        sealed = self._sealer.seal(self.keys.feed_keys[self._feed_kid], src, subject, data)
        header = {"id": next(self._ids), "src": src, "subj": subject, "kid": self._feed_kid}
        if keep:
            header["keep"] = True
        self.link.send(encode_frame(FrameType.PUB, header, sealed))
        if self.link.full():  # checked inline: a coroutine call per message is measurable
            await self.link.room()

    async def subscribe(
        self, pattern: str, callback: Callable[[Publication], Any] | None = None
    ) -> Subscription:
        check_subject(pattern, pattern=True)
        self._check("subscribe", pattern)
        sid = next(self._sids)
        sub = Subscription(self, sid, pattern, callback)
        if callback is not None and inspect.iscoroutinefunction(callback):
            sub._task = asyncio.create_task(sub._pump())
        self._subs[sid] = sub
        self._sub_index.add(sid, pattern, sub)
        if self.link.connected.is_set():
            self.link.send(encode_frame(FrameType.SUB, {"sid": sid, "subj": pattern}))
        return sub

    async def _unsubscribe(self, sub: Subscription) -> None:
        if self._subs.pop(sub.sid, None) is None:
            return
        self._sub_index.remove(sub.sid)
        if sub._task is not None:
            sub._task.cancel()
        if self.link.connected.is_set():
            self.link.send(encode_frame(FrameType.UNSUB, {"sid": sub.sid}))

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
        self.link.send(encode_frame(FrameType.REVOKE, {}, blob))


def _fail(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


def _consume_exception(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()
